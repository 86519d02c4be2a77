"""CPU time of the DICOM outputs (``--dicom-out``) per study: the secondary captures (PNG read, burned-in band, the
object, the file) and the structured report (the object, the file), measured with ``time.process_time`` around the
writer's own per-study steps, without the database (the rows are made here, as the ``findings`` view gives them).

    .venv/bin/python -m benchmarks.bench_dicom_out [--studies 200] [--labels 18] [--seed 0] [--highdicom]

Studies of 1-4 single-frame CR instances (RG1's header from pydicom-data, new UIDs and patient per study), 18
findings per frame like the chest model's, a 224x224 heatmap overlay PNG per frame (a Grad-CAM-like blob blended over
RG1's pixels, so the PNG decodes like a real one). The first ``--warmup`` studies are not timed: they include the
one-time work (imports, templates). ``--highdicom`` builds every object with highdicom and saves it with pydicom
instead (what the writer did before templates), to measure both ways on the same machine and load. Prints one JSON
object: median and p95 of CPU ms per study for each part.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from neuron.sample_data import pydicom_data_dir  # noqa: E402
from neuron.settings import Settings  # noqa: E402

MODEL = "xrv-densenet121-res224-all"
LABELS = ["Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema", "Fibrosis",
          "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule", "Mass", "Hernia", "Lung Lesion",
          "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum"]


def heatmap_base(size: int = 224) -> np.ndarray:
    ds = pydicom.dcmread(pydicom_data_dir() / "RG1_UNCR.dcm")
    arr = ds.pixel_array.astype(np.float32)
    arr = 1.0 - (arr - arr.min()) / (arr.max() - arr.min())  # MONOCHROME1
    side = min(arr.shape)
    top, left = (arr.shape[0] - side) // 2, (arr.shape[1] - side) // 2
    return cv2.resize(arr[top:top + side, left:left + side], (size, size), interpolation=cv2.INTER_AREA)


def overlay_png(base: np.ndarray, rng: random.Random, path: Path) -> None:
    """A JET class activation map blended over the image, as neuron_models.cam.overlay makes it."""
    size = base.shape[0]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx, s = rng.uniform(0.2, 0.8) * size, rng.uniform(0.2, 0.8) * size, rng.uniform(0.1, 0.3) * size
    cam = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    heat = cv2.applyColorMap((cam * 255).astype(np.uint8), cv2.COLORMAP_JET)
    gray = cv2.cvtColor((base * 255).astype(np.uint8), cv2.COLOR_GRAY2BGR)
    cv2.imwrite(str(path), cv2.addWeighted(heat, 0.5, gray, 0.5, 0.0))


def make_studies(root: Path, n: int, labels: int, seed: int, untrained: bool):
    """[(study uid, [Finding], )] with the sources and heatmaps written under root."""
    from worker.dicom_templates import Finding

    rng = random.Random(seed)
    header = pydicom.dcmread(pydicom_data_dir() / "RG1_UNCR.dcm", stop_before_pixels=True)
    base = heatmap_base()
    weights = "untrained" if untrained else f"{rng.getrandbits(256):064x}"
    config_hash = f"{rng.getrandbits(256):064x}"
    studies = []
    for s in range(n):
        study = generate_uid()
        header.StudyInstanceUID = study
        header.SeriesInstanceUID = generate_uid()
        header.PatientName, header.PatientID = f"Bench^Patient{s}", f"PID{s:06d}"
        rows = []
        for i in range(rng.randint(1, 4)):
            sop = generate_uid()
            header.SOPInstanceUID = header.file_meta.MediaStorageSOPInstanceUID = sop
            source = root / "archive" / f"{s}" / f"{i}.dcm"
            source.parent.mkdir(parents=True, exist_ok=True)
            header.save_as(source, enforce_file_format=True)
            heatmap = root / "heatmaps" / f"{s}-{i}.png"
            heatmap.parent.mkdir(parents=True, exist_ok=True)
            overlay_png(base, rng, heatmap)
            probs = [rng.random() for _ in range(labels)]
            order = sorted(range(labels), key=lambda k: -probs[k])
            for rank, k in enumerate(order, 1):
                rows.append(Finding(study, header.SeriesInstanceUID, sop, 0, str(source), MODEL, weights,
                                    LABELS[k % len(LABELS)] + ("" if k < len(LABELS) else f" {k}"), probs[k],
                                    rng.random() * 0.2, rank, str(heatmap) if rank == 1 else None, config_hash,
                                    untrained, probs[k] > 0.45))
        rows.sort(key=lambda f: (f.sop_uid, f.frame, f.model, f.rank))
        studies.append((study, rows))
    return studies


def summary(values_s: list[float]) -> dict:
    ms = sorted(1000 * v for v in values_s)
    return {"median": round(statistics.median(ms), 3), "p95": round(ms[min(len(ms) - 1, int(0.95 * len(ms)))], 3),
            "mean": round(statistics.fmean(ms), 3), "max": round(ms[-1], 3)}


def highdicom_writers(writer):
    """The writer's two steps as they were before templates: highdicom builds, pydicom saves."""
    from worker.dicom_out import burn_in, sc_with_highdicom, sr_with_highdicom

    def write_sc(src, rows):
        top = min(rows, key=lambda f: f.rank)
        overlay = cv2.cvtColor(cv2.imread(top.heatmap_path, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        path = writer.study_dir(top.study_uid) / f"sc-{top.sop_uid}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        sc_with_highdicom(src, top, burn_in(overlay, top)).save_as(path, enforce_file_format=True)

    def write_sr(study, rows, headers, partial):
        path = writer.study_dir(study) / "sr.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        sr_with_highdicom(study, rows, headers, partial).save_as(path, enforce_file_format=True)

    return write_sc, write_sr


def run(n: int, labels: int, seed: int, warmup: int, untrained: bool, highdicom: bool) -> dict:
    from worker.dicom_out import DicomWriter, burn_in

    with tempfile.TemporaryDirectory(prefix="bench-dicom-out-") as tmp:
        root = Path(tmp)
        studies = make_studies(root, n + warmup, labels, seed, untrained)
        settings = Settings(out_dir=root / "out", dicom_out=root / "dicom")
        writer = DicomWriter(settings, db=None)  # the database is only read by write(); the steps below are given rows
        write_sc, write_sr = highdicom_writers(writer) if highdicom else (writer._write_sc, writer._write_sr)
        parts: dict[str, list[float]] = {k: [] for k in ("headers", "sc", "sc_pixels", "sr", "study")}
        per_sc: list[float] = []
        first_study = None
        for index, (study, rows) in enumerate(studies):
            clock = time.process_time
            t_study = clock()
            headers = {}
            for f in rows:
                if f.sop_uid not in headers:
                    headers[f.sop_uid] = writer._header(f)
            t_headers = clock()
            images: dict[tuple, list] = {}
            for f in rows:
                images.setdefault(f.image_key, []).append(f)
            sc_total = 0.0
            for image_rows in images.values():
                t0 = clock()
                write_sc(headers[image_rows[0].sop_uid], image_rows)
                sc_total += clock() - t0
                if index >= warmup:
                    per_sc.append(clock() - t0)
            t_sr = clock()
            write_sr(study, rows, headers, False)
            t_end = clock()
            # the pixel work alone, again (outside the study's clock): PNG decode, colour order, enlarge, band
            pixels = 0.0
            for image_rows in images.values():
                top = min(image_rows, key=lambda f: f.rank)
                t0 = clock()
                bgr = cv2.imread(top.heatmap_path, cv2.IMREAD_COLOR)
                burn_in(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), top)
                pixels += clock() - t0
            if index == 0:
                first_study = t_end - t_study
            if index < warmup:
                continue
            parts["headers"].append(t_headers - t_study)
            parts["sc"].append(sc_total)
            parts["sc_pixels"].append(pixels)
            parts["sr"].append(t_end - t_sr)
            parts["study"].append(t_end - t_study)
        files = list((root / "dicom").rglob("*.dcm"))
        return {
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "python": platform.python_version(),
            "load_average": os.getloadavg(),
            "studies": n, "instances": sum(len({f.sop_uid for f in rows}) for _, rows in studies[warmup:]),
            "findings_per_frame": labels, "untrained": untrained, "built_by": "highdicom" if highdicom else "templates",
            "files_written": len(files),
            "first_study_ms": round(1000 * (first_study or 0.0), 1),
            "cpu_ms_per_study": {k: summary(v) for k, v in parts.items()},
            "cpu_ms_per_sc": summary(per_sc),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=200)
    parser.add_argument("--labels", type=int, default=len(LABELS))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--untrained", action="store_true", help="rows of untrained weights (4-line band)")
    parser.add_argument("--highdicom", action="store_true", help="build with highdicom, as before templates")
    args = parser.parse_args()
    print(json.dumps(run(args.studies, args.labels, args.seed, args.warmup, args.untrained, args.highdicom), indent=1))


if __name__ == "__main__":
    main()
