"""A deterministic synthetic CR archive for ``neuron bench`` (torch-free: numpy, OpenCV, pydicom).

Every instance is a function of (seed, index) alone: a chest-radiograph-like picture (a smooth body, darker lungs,
ribs, spine and heart shadow, collimator edges, low-frequency shading and pixel noise) stored in 12-15 bits, as
MONOCHROME1 or MONOCHROME2 with a window that frames the body. Studies hold 1-4 images. Patients are synthetic and
named so (``SYNTHETIC^...``, IDs ``FAKE...``). The same instances come in two flavours: uncompressed (Explicit VR
Little Endian) and JPEG 2000 lossless, with the same UIDs and stored values.

Archives are cached: ``ensure_archives`` writes each flavour once into a folder keyed by its parameters and reuses it
while its manifest (``<flavour>.json`` beside the folder, written last) is there; the folder
holds DICOM files only.
"""

from __future__ import annotations

import copy
import json
import logging
import tempfile
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import cv2
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2  # bump when the pictures or headers change, so cached archives are rebuilt
FLAVOURS = ("uncompressed", "jpeg2000")
CR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1"


@dataclass(frozen=True)
class InstancePlan:
    """Where one instance sits in the archive; everything else follows from (seed, index)."""

    index: int
    study: int
    position: int  # 0-based within its study


@dataclass(frozen=True)
class Archive:
    flavour: str
    root: Path
    files: tuple[Path, ...]
    studies: int
    encoder: str

    @property
    def n_images(self) -> int:
        return len(self.files)


def plan_studies(n: int, seed: int) -> list[InstancePlan]:
    """N instances grouped into studies of 1-4 images (the last study takes what is left)."""
    if n < 1:
        raise ValueError(f"an archive needs at least 1 image, not {n}")
    rng = np.random.default_rng([seed, 1])
    plans, study = [], 0
    while len(plans) < n:
        first, size = len(plans), min(int(rng.integers(1, 5)), n - len(plans))
        plans.extend(InstancePlan(first + j, study, j) for j in range(size))
        study += 1
    return plans


def _uid(seed: int, *parts: object) -> str:
    return generate_uid(entropy_srcs=["neuron-bench-synthetic", str(seed), *map(str, parts)])


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 + 0.5 * np.tanh(0.5 * x)


def _ellipse(u: np.ndarray, v: np.ndarray, cu: float, cv: float, ru: float, rv: float, sharp: float) -> np.ndarray:
    return _sigmoid((1.0 - ((u - cu) / ru) ** 2 - ((v - cv) / rv) ** 2) * sharp)


def radiograph(rows: int, cols: int, rng: np.random.Generator) -> np.ndarray:
    """Attenuation in [0, 1] (1 = dense, bright on a MONOCHROME2 display), with collimator edges and noise."""
    r, c = max(16, rows // 8), max(16, cols // 8)  # the smooth anatomy is drawn coarse, then upsampled
    v, u = np.meshgrid(np.linspace(-1, 1, r, dtype=np.float32), np.linspace(-1, 1, c, dtype=np.float32),
                       indexing="ij")
    j = rng.uniform(-1, 1, size=8).astype(np.float32) * 0.04
    body = _ellipse(u, v, j[0], 0.1 + j[1], 0.86 + j[2], 1.05, 10.0)
    lungs = (_ellipse(u, v, -0.38 + j[3], -0.08, 0.26 + j[4], 0.55 + j[5], 8.0)
             + _ellipse(u, v, 0.38 + j[6], -0.08, 0.27 + j[4], 0.53 + j[7], 8.0))
    heart = _ellipse(u, v, 0.1 + j[3], 0.28, 0.26, 0.24, 6.0)
    spine = np.exp(-(((u - j[0]) / 0.07) ** 2)) * body
    phase = (v + 0.35 * (np.abs(u) - 0.15) ** 2 + rng.uniform(0, 0.13)) / 0.13  # ribs: arcs falling to the sides
    ribs = ((0.5 + 0.5 * np.cos(2 * np.pi * phase)) ** 6) * _ellipse(u, v, 0, -0.1, 0.75, 0.7, 6.0)
    shade = cv2.resize(rng.normal(0, 1, (6, 6)).astype(np.float32), (c, r), interpolation=cv2.INTER_CUBIC)
    a = 0.5 * body - 0.28 * np.clip(lungs, 0, 1) + 0.18 * heart * body + 0.2 * spine + 0.12 * ribs + 0.03 * shade
    img = cv2.resize(np.clip(a, 0, 1), (cols, rows), interpolation=cv2.INTER_LINEAR)
    img += rng.standard_normal((rows, cols), dtype=np.float32) * 0.006  # quantum noise
    top, bottom = (int(x * rows) for x in rng.uniform(0.01, 0.05, size=2))
    left, right = (int(x * cols) for x in rng.uniform(0.01, 0.05, size=2))
    for region in (np.s_[:top, :], np.s_[rows - bottom:, :], np.s_[:, :left], np.s_[:, cols - right:]):
        img[region] = 0.95  # unexposed behind the collimator: bright, with a sharp edge
    return np.clip(img, 0, 1)


@dataclass(frozen=True)
class SyntheticInstance:
    dataset: Dataset  # uncompressed, Explicit VR Little Endian
    pixels: np.ndarray  # the stored values (uint16)


MANUFACTURER = "neuron.synthetic"


def make_instance(plan: InstancePlan, size: int, seed: int, manufacturer: str = MANUFACTURER,
                  exposure: float = 1.0) -> SyntheticInstance:
    """``manufacturer`` and ``exposure`` make the shifted batches drift monitoring must notice: another vendor's
    header, or a detector dose scaled by ``exposure`` (clipped at the top of the range) while the window stays the one
    the protocol set for the nominal dose, as a fixed VOI LUT would."""
    if exposure <= 0:
        raise ValueError(f"exposure {exposure} must be a positive factor of the nominal dose (1.0)")
    rng = np.random.default_rng([seed, 2, plan.index])
    bits = int(rng.integers(12, 16))
    monochrome1 = bool(rng.random() < 0.5)
    rows = size
    cols = size if rng.random() < 0.5 else max(16, round(size * 0.92))  # square and portrait detectors
    maxval = (1 << bits) - 1
    att = radiograph(rows, cols, rng)
    nominal = np.rint((0.04 + 0.9 * att) * maxval)
    stored = nominal if exposure == 1.0 else np.rint((0.04 + 0.9 * att) * maxval * exposure)
    if monochrome1:
        nominal, stored = maxval - nominal, maxval - stored
    pixels = np.clip(stored, 0, maxval).astype(np.uint16)
    lo, hi = np.percentile(np.clip(nominal, 0, maxval)[::4, ::4], [1, 99])
    width = max(2.0, float(hi - lo))

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CR_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = _uid(seed, "sop", plan.index)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CR_IMAGE_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = _uid(seed, "study", plan.study)
    ds.SeriesInstanceUID = _uid(seed, "series", plan.study)
    ds.PatientName = f"SYNTHETIC^PATIENT{plan.study:05d}"
    ds.PatientID = f"FAKE{seed:04d}-{plan.study:05d}"
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "synthetic image generated by neuron.synthetic; no patient"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = "20260101"
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = f"SYN{plan.study:07d}"
    ds.StudyID = str(plan.study)
    ds.StudyDescription = "SYNTHETIC NEURON BENCH - NOT A PATIENT"
    ds.Manufacturer = manufacturer
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA" if plan.position % 2 == 0 else "AP"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SeriesNumber = 1
    ds.InstanceNumber = plan.position + 1
    ds.ImagerPixelSpacing = [round(0.15 * 2000 / size, 4)] * 2
    ds.BurnedInAnnotation = "NO"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 16
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.WindowCenter = round(float(lo) + width / 2, 1)
    ds.WindowWidth = round(width, 1)
    ds.VOILUTFunction = "LINEAR"
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OW"
    return SyntheticInstance(ds, pixels)


def j2k_encoder() -> str:
    """pydicom's own JPEG 2000 lossless encoder when its plugin is installed, else imagecodecs (OpenJPEG)."""
    from pydicom.pixels.encoders import JPEG2000LosslessEncoder

    return "pydicom" if JPEG2000LosslessEncoder.is_available else "imagecodecs"


def to_jpeg2000(inst: SyntheticInstance, encoder: str) -> Dataset:
    ds = copy.deepcopy(inst.dataset)
    if encoder == "pydicom":
        ds.compress(JPEG2000Lossless, inst.pixels, generate_instance_uid=False)  # the same instance, re-encoded
    else:
        import imagecodecs

        stream = imagecodecs.jpeg2k_encode(inst.pixels, level=0, reversible=True, codecformat="J2K",
                                           bitspersample=int(ds.BitsStored))
        ds.PixelData = encapsulate([stream])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.LossyImageCompression = "00"
    return ds


def default_workdir() -> Path:
    """``neuron bench``'s scratch and archive cache: stable, so generated archives are reused between runs."""
    return Path(tempfile.gettempdir()) / "neuron-bench"


def relative_path(plan: InstancePlan) -> Path:
    return Path(f"study_{plan.study:05d}") / f"img_{plan.position}.dcm"


def _write(plan: InstancePlan, size: int, seed: int, targets: Sequence[tuple[str, str]], encoder: str) -> None:
    inst = make_instance(plan, size, seed)
    for flavour, root in targets:
        path = Path(root) / relative_path(plan)
        path.parent.mkdir(parents=True, exist_ok=True)
        ds = inst.dataset if flavour == "uncompressed" else to_jpeg2000(inst, encoder)
        ds.save_as(path, enforce_file_format=True)


def archive_key(n: int, size: int, seed: int) -> str:
    return f"n{n}-size{size}-seed{seed}-v{GENERATOR_VERSION}"


def ensure_archives(cache: Path, n: int, size: int, seed: int = 0, flavours: Iterable[str] = FLAVOURS,
                    workers: int = 1) -> dict[str, Archive]:
    """The requested flavours of archive (n, size, seed) under ``cache``, generated once and reused after.
    Pixels are made once per instance for all the flavours still missing; ``workers`` > 1 uses processes."""
    flavours = list(dict.fromkeys(flavours))
    unknown = [f for f in flavours if f not in FLAVOURS]
    if unknown:
        raise ValueError(f"unknown archive flavour(s) {unknown}; choose from {', '.join(FLAVOURS)}")
    if size < 16:
        raise ValueError(f"image size {size} is too small; use 16 or more (real CRs are about 2000)")
    base = Path(cache) / archive_key(n, size, seed)
    plans = plan_studies(n, seed)
    missing = [f for f in flavours if not (base / f"{f}.json").is_file()]
    if missing:
        encoder = j2k_encoder()
        targets = [(f, str(base / f)) for f in missing]
        start = time.perf_counter()
        log.info("generating %d synthetic images (%s) into %s", n, ", ".join(missing), base)
        if workers <= 1 or n <= 4:
            for p in plans:
                _write(p, size, seed, targets, encoder)
        else:  # spawn: the caller may already hold CUDA or OpenMP threads, which fork would copy half-alive
            with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
                list(pool.map(_write, plans, [size] * n, [seed] * n, [targets] * n, [encoder] * n,
                              chunksize=max(1, n // (8 * workers))))
        seconds = round(time.perf_counter() - start, 1)
        for f in missing:
            manifest = {"flavour": f, "n": n, "size": size, "seed": seed, "version": GENERATOR_VERSION,
                        "studies": plans[-1].study + 1, "encoder": encoder if f == "jpeg2000" else "none",
                        "generation_s": seconds, "files": [str(relative_path(p)) for p in plans]}
            (base / f"{f}.json").write_text(json.dumps(manifest, indent=1))
    out = {}
    for f in flavours:
        manifest = json.loads((base / f"{f}.json").read_text())
        out[f] = Archive(f, base / f, tuple(base / f / p for p in manifest["files"]), manifest["studies"],
                         manifest["encoder"])
    return out
