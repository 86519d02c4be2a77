"""A seeded, bounded fuzzer for hostile DICOM input: mutations of real files, and a child process that reads them.

Every case ``i`` is a pure function of (``SEED``, ``i``): ``make_case(seeds, i)`` rebuilds it byte for byte, so a
failure names a case that can be replayed alone (``python -m tests.fuzz CASE``). A case is one real seed file with
fresh UIDs (so it is decoded, never skipped as a duplicate), perhaps another Modality (to reach every route), and one
to three mutations:

- ``flip``       random bytes overwritten, in the header or anywhere;
- ``truncate``   the file cut short;
- ``length``     an element's (or an encapsulated item's) length field rewritten to a lie;
- ``absurd``     Rows/Columns/NumberOfFrames/BitsAllocated/... (and windows, rescale, LUTs) set to absurd values;
- ``syntax``     the Transfer Syntax UID replaced by a wrong, unknown or invalid one;
- ``deep``       a sequence nested hundreds to thousands of levels deep, sometimes never closed.

``Reader`` runs cases in a child process (the header pass ``producer.scan.index_entry``, then the readers'
``worker.decode.decode_instance``), so a hang is cut at ``PER_FILE_TIMEOUT_S`` and a crash of a C decoder is caught
and reported instead of killing the test; the child reports its peak RSS after each case.
"""

from __future__ import annotations

import io
import os
import resource
import sys
import time
import traceback
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing import get_context
from multiprocessing.connection import wait as connection_wait
from pathlib import Path

import numpy as np
import pydicom
from pydicom import uid as uids
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence

SEED = 20261127
MUTATIONS = 3000            # in-process cases (header pass + decoders); NEURON_FUZZ_SCALE=10 runs ten times as many
END_TO_END = 240            # of those, the first N also go through a real `neuron run`
PER_FILE_TIMEOUT_S = 10.0   # one case's header pass + decode, on a loaded 2-core machine
RSS_LIMIT_MB = 1024         # the reader child's peak resident memory over all cases
ADDRESS_SPACE_GB = 8        # the child's hard limit: an allocation past it is a MemoryError, never the OOM killer
MAX_FRAMES = 16
MAX_PIXELS = 8192 * 8192


def scale() -> float:
    """NEURON_FUZZ_SCALE multiplies MUTATIONS (a nightly run may set 10; CI runs 1)."""
    value = os.environ.get("NEURON_FUZZ_SCALE", "1")
    try:
        factor = float(value)
    except ValueError as exc:
        raise ValueError(f"NEURON_FUZZ_SCALE={value!r} is not a number; use e.g. 1 (CI) or 10 (nightly)") from exc
    if factor <= 0:
        raise ValueError(f"NEURON_FUZZ_SCALE={value!r} must be above 0; use e.g. 1 (CI) or 10 (nightly)")
    return factor


# -- seeds ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SeedFile:
    name: str
    data: bytes


# (file, folder, Modality to give it or None): every decoder, every route, multi-frame MR and US, colour.
TEST_FILES = [
    ("MR_small.dcm", None), ("MR_small_RLE.dcm", None), ("MR_small_jp2klossless.dcm", None),
    ("MR_small_jpeg_ls_lossless.dcm", None), ("MR_small_bigendian.dcm", None), ("MR_small_implicit.dcm", None),
    ("image_dfl.dcm", "MR"), ("JPGExtended.dcm", "DX"), ("JPEG2000.dcm", "CR"), ("JPEGLSNearLossless_16.dcm", "US"),
    ("SC_rgb_rle.dcm", "XC"), ("SC_rgb_rle_2frame.dcm", "US"), ("SC_rgb_jpeg_dcmtk.dcm", "XC"),
    ("SC_rgb_small_odd.dcm", "XC"), ("SC_rgb_jls_lossy_line.dcm", "XC"), ("SC_rgb_rle_16bit.dcm", "XC"),
    ("SC_rgb_jpeg_gdcm.dcm", "XC"),
    ("ExplVR_LitEndNoMeta.dcm", None), ("693_J2KI.dcm", "MR"), ("rtdose_rle_1frame.dcm", None),
]
DATA_FILES = [("emri_small.dcm", None), ("emri_small_RLE.dcm", None), ("SC_rgb.dcm", "XC")]
CHEST_STEP = 16  # RG1 decimated 16x: 123x116, a real chest radiograph small enough to fuzz by the thousand


def build_seeds(test_dir: Path, data_dir: Path) -> list[SeedFile]:
    """The real files the mutations start from, each checked to decode cleanly before it is mutated."""
    from worker.decode import decode_instance  # the child imports it anyway; keep this module light to import

    seeds = [SeedFile(f"chest-{ts.name}", data) for ts, data in _tiny_chests(data_dir / "RG1_UNCR.dcm")]
    for folder, names in ((test_dir, TEST_FILES), (data_dir, DATA_FILES)):
        for name, modality in names:
            ds = pydicom.dcmread(folder / name, force=True)
            if modality:
                ds.Modality = modality
            seeds.append(SeedFile(Path(name).stem, _to_bytes(ds)))
    for s in seeds:
        ds = pydicom.dcmread(io.BytesIO(s.data), force=True)
        if "PixelData" in ds:
            path = Path(os.environ.get("TMPDIR", "/tmp")) / f"neuron-fuzz-seed-{os.getpid()}.dcm"
            path.write_bytes(s.data)
            try:
                assert decode_instance(path, "seed", MAX_FRAMES, MAX_PIXELS), s.name
            finally:
                path.unlink()
    return seeds


def _tiny_chests(rg1: Path) -> Iterator[tuple[uids.UID, bytes]]:
    """RG1's real pixels, decimated, in every syntax Neuron decodes itself: native, RLE, JPEG 2000, JPEG-LS and
    JPEG lossless (encoded with imagecodecs, lossless, and checked by the seed decode)."""
    import imagecodecs

    ds = pydicom.dcmread(rg1)
    arr = np.ascontiguousarray(ds.pixel_array[::CHEST_STEP, ::CHEST_STEP]).astype(np.uint16)
    ds.Rows, ds.Columns = arr.shape
    ds.PixelData = arr.tobytes()
    ds.file_meta.TransferSyntaxUID = uids.ExplicitVRLittleEndian
    yield uids.ExplicitVRLittleEndian, _to_bytes(ds)
    rle = pydicom.dcmread(io.BytesIO(_to_bytes(ds)))
    rle.compress(uids.RLELossless, encoding_plugin="pydicom")
    yield uids.RLELossless, _to_bytes(rle)
    for ts, encode in ((uids.JPEG2000Lossless, lambda a: imagecodecs.jpeg2k_encode(a, level=0)),
                       (uids.JPEGLSLossless, imagecodecs.jpegls_encode),
                       (uids.JPEGLosslessSV1, imagecodecs.ljpeg_encode)):
        enc = pydicom.dcmread(io.BytesIO(_to_bytes(ds)))
        enc.PixelData = encapsulate([bytes(encode(arr))])
        enc["PixelData"].VR = "OB"
        enc.file_meta.TransferSyntaxUID = ts
        yield ts, _to_bytes(enc)


def _to_bytes(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=False)
    return buf.getvalue()


# -- mutations --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    index: int
    seed: str
    ops: tuple[str, ...]
    data: bytes
    sop_instance_uid: str

    def __str__(self) -> str:
        return f"case {self.index} (seed file {self.seed}, {' + '.join(self.ops) or 'clean'})"


ROUTE_MODALITIES = ("CR", "DX", "MR", "US", "XC", "CT")
# Values an absurd header may hold; each stays inside its VR's encoding so the file is written as a lie, not refused.
ABSURD: dict[str, tuple[str, list]] = {
    "Rows": ("US", [0, 1, 2, 3, 4097, 32768, 65535]),
    "Columns": ("US", [0, 1, 3, 65535]),
    "NumberOfFrames": ("IS", ["0", "-1", "3", "999999", "2147483647", "2147483648", "1e9", "abc", ""]),
    "BitsAllocated": ("US", [0, 1, 7, 12, 24, 32, 64, 65535]),
    "BitsStored": ("US", [0, 1, 17, 33, 64, 65535]),
    "HighBit": ("US", [0, 64, 65535]),
    "SamplesPerPixel": ("US", [0, 2, 3, 4, 65535]),
    "PixelRepresentation": ("US", [1, 2, 65535]),
    "PlanarConfiguration": ("US", [1, 2, 65535]),
    "PhotometricInterpretation": ("CS", ["", "MONOCHROME1", "RGB", "PALETTE COLOR", "YBR_FULL_422", "YBR_ICT",
                                         "HSV", "ARGB", "X" * 16]),
    "WindowWidth": ("DS", ["0", "-5", "1e308", "NaN", "inf", "0.0001"]),
    "WindowCenter": ("DS", ["NaN", "-1e308", "inf", "1e38"]),
    "RescaleSlope": ("DS", ["0", "NaN", "inf", "1e308", "-1e308", "1e-300"]),
    "RescaleIntercept": ("DS", ["NaN", "-inf", "1e308"]),
    "VOILUTFunction": ("CS", ["SIGMOID", "BOGUS", ""]),
}
LUT_DESCRIPTORS = [[0, 0, 16], [4096, 0, 16], [1, 65535, 16], [2, 0, 64], [65535, 65535, 65535], [3]]
SYNTAXES = [uids.ImplicitVRLittleEndian, uids.ExplicitVRLittleEndian, uids.ExplicitVRBigEndian,
            uids.DeflatedExplicitVRLittleEndian, uids.JPEGBaseline8Bit, uids.JPEGExtended12Bit, uids.JPEGLosslessSV1,
            uids.JPEGLSLossless, uids.JPEG2000Lossless, uids.RLELossless, uids.MPEG2MPML, uids.HTJ2KLossless,
            "1.2.840.10008.1.2.4.999", "1.2.3.4", "", "1..2", "not-a-uid", "1." * 40]
OPS = ("flip", "truncate", "length", "absurd", "syntax", "deep")
WEIGHTS = (0.26, 0.14, 0.2, 0.24, 0.08, 0.08)
LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
ITEM_TAG = (0xFFFE, 0xE000)


def make_case(seeds: list[SeedFile], index: int, seed: int = SEED) -> Case:
    """Case ``index``: a pure function of (seed, index), whatever ran before it."""
    rng = np.random.default_rng([seed, index])
    src = seeds[int(rng.integers(len(seeds)))]
    with _lenient_pydicom():
        ds = pydicom.dcmread(io.BytesIO(src.data), force=True)
        uid = _fresh_uid(rng)
        ds.SOPInstanceUID = uid
        ds.StudyInstanceUID = _fresh_uid(rng)
        ds.SeriesInstanceUID = _fresh_uid(rng)
        if hasattr(ds, "file_meta") and "TransferSyntaxUID" in ds.file_meta:
            ds.file_meta.MediaStorageSOPInstanceUID = uid
        ops: list[str] = []
        if rng.random() < 0.25:
            ds.Modality = ROUTE_MODALITIES[int(rng.integers(len(ROUTE_MODALITIES)))]
            ops.append(f"modality={ds.Modality}")
        if rng.random() < 0.05:  # a clean copy now and then: the run must screen those
            return Case(index, src.name, tuple(ops), _to_bytes(ds), uid)
        chosen = list(rng.choice(len(OPS), size=int(rng.integers(1, 4)), replace=False, p=WEIGHTS))
        chosen.sort(key=lambda k: OPS[k] not in ("absurd",))  # dataset edits before byte edits
        data = None
        for k in chosen:
            op = OPS[k]
            if op == "absurd":
                ops.append(_absurd(ds, rng))
                continue
            if data is None:
                data = _to_bytes(ds)
            data, what = _BYTE_OPS[op](data, rng)
            ops.append(what)
        if data is None:
            data = _to_bytes(ds)
    return Case(index, src.name, tuple(ops), data, uid)


def _fresh_uid(rng: np.random.Generator) -> str:
    return "2.25." + str(int.from_bytes(rng.bytes(15), "big"))


@contextmanager
def _lenient_pydicom():
    """Write absurd values as they are: pydicom would otherwise warn or refuse (restored on exit)."""
    settings = pydicom.config.settings
    saved = settings.writing_validation_mode, settings.reading_validation_mode
    settings.writing_validation_mode = settings.reading_validation_mode = pydicom.config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        settings.writing_validation_mode, settings.reading_validation_mode = saved


def _absurd(ds: Dataset, rng: np.random.Generator) -> str:
    if rng.random() < 0.12:
        keyword = "ModalityLUTSequence" if rng.random() < 0.5 else "VOILUTSequence"
        item = Dataset()
        desc = LUT_DESCRIPTORS[int(rng.integers(len(LUT_DESCRIPTORS)))]
        item.add_new(0x00283002, "US", desc)
        item.add_new(0x00283006, "OW", rng.bytes(int(rng.choice([0, 2, 6, 8192]))))
        setattr(ds, keyword, Sequence([item]))
        shadowed = ("WindowCenter", "WindowWidth") if keyword == "VOILUTSequence" else ("RescaleSlope",
                                                                                           "RescaleIntercept")
        for k in shadowed:  # what would take precedence over the broken table
            if k in ds:
                delattr(ds, k)
        return f"{keyword}(descriptor={desc})"
    keyword = list(ABSURD)[int(rng.integers(len(ABSURD)))]
    vr, values = ABSURD[keyword]
    value = values[int(rng.integers(len(values)))]
    tag = pydicom.datadict.tag_for_keyword(keyword)
    try:
        ds[tag] = DataElement(tag, vr, value)
    except ValueError:  # 'abc' as an IS: written as text (in explicit VR files under the VR LO, a lie of its own)
        ds[tag] = DataElement(tag, "LO", value)
    return f"{keyword}={value!r}"


def _flip(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    buf = bytearray(data)
    n = int(rng.integers(1, 9))
    span = min(len(buf), 2048) if rng.random() < 0.6 else len(buf)  # the header is where parsers get hurt
    for pos in rng.integers(0, span, size=n):
        buf[int(pos)] = int(rng.integers(256))
    return bytes(buf), f"flip({n} in first {span})"


def _truncate(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    cut = int(rng.integers(1, len(data)))
    return data[:cut], f"truncate({cut}/{len(data)})"


def _element_positions(data: bytes, big: bool) -> list[int]:
    """Where element tags we know occur in the file: the dataset's own top-level tags, Pixel Data and items."""
    with _lenient_pydicom():
        try:
            ds = pydicom.dcmread(io.BytesIO(data), force=True)
            tags = [int(t) for t in ds.keys()] + [int(t) for t in getattr(ds, "file_meta", {}).keys()]
        except Exception:  # the generator reads its own damage: any tag will do then
            tags = []
    tags += [0x7FE00010, 0xFFFEE000, 0x00280010, 0x00280011]
    positions = []
    for tag in tags:
        group, elem = tag >> 16, tag & 0xFFFF
        order = "big" if big and group != 2 else "little"
        needle = group.to_bytes(2, order) + elem.to_bytes(2, order)
        start = data.find(needle, 132 if len(data) > 132 else 0)
        while start != -1 and len(positions) < 400:
            positions.append(start)
            start = data.find(needle, start + 4) if tag == 0xFFFEE000 else -1
    return positions


def _length(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    big = b"\x02\x00\x10\x00" in data[:400] and uids.ExplicitVRBigEndian.encode() in data[:400]
    positions = _element_positions(data, big)
    if not positions:
        return _flip(data, rng)
    pos = positions[int(rng.integers(len(positions)))]
    order = "big" if big and data[pos:pos + 2] != b"\x02\x00" else "little"
    vr = data[pos + 4:pos + 6]
    if data[pos:pos + 4] in (b"\xfe\xff\x00\xe0", b"\xff\xfe\xe0\x00") or not vr.isalpha() or not vr.isupper():
        at, size = pos + 4, 4  # an item, or implicit VR: a 4-byte length after the tag
    elif vr in LONG_VRS:
        at, size = pos + 8, 4
    else:
        at, size = pos + 6, 2
    if at + size > len(data):
        return _flip(data, rng)
    old = int.from_bytes(data[at:at + size], order)
    top = (1 << (8 * size)) - 1
    new = int(rng.choice([0, 1, max(0, old - 1), old + 1, old + 2, old * 2, top, top - 1, top // 2,
                          int(rng.integers(0, top))]))
    new = min(new, top)
    return data[:at] + new.to_bytes(size, order) + data[at + size:], f"length(@{pos}: {old}->{new})"


def with_transfer_syntax(data: bytes, ts: str, fix_group_length: bool = True) -> bytes | None:
    """The file with its Transfer Syntax UID replaced (the dataset left as it is); None without a file meta."""
    at = data.find(b"\x02\x00\x10\x00UI", 132)
    if data[128:132] != b"DICM" or at == -1 or at > 1024:
        return None
    old_len = int.from_bytes(data[at + 6:at + 8], "little")
    value = ts.encode() + (b"\x00" if len(ts) % 2 else b"")
    out = bytearray(data[:at + 6] + len(value).to_bytes(2, "little") + value + data[at + 8 + old_len:])
    group = out.find(b"\x02\x00\x00\x00UL\x04\x00", 132)
    if group != -1 and fix_group_length:
        old_group = int.from_bytes(out[group + 8:group + 12], "little")
        out[group + 8:group + 12] = ((old_group + len(value) - old_len) % (1 << 32)).to_bytes(4, "little")
    return bytes(out)


def _syntax(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """Replace the Transfer Syntax UID in the file meta, fixing the group length (or, sometimes, not)."""
    ts = str(SYNTAXES[int(rng.integers(len(SYNTAXES)))])
    keep_lie = rng.random() < 0.2
    out = with_transfer_syntax(data, ts, fix_group_length=not keep_lie)
    if out is None:
        return _flip(data, rng)
    return out, f"syntax({ts!r}{', group length not fixed' if keep_lie else ''})"


def _deep(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """A ReferencedSeriesSequence nested ``depth`` levels deep (undefined lengths), at the start of the dataset."""
    if data[128:132] != b"DICM":
        return _flip(data, rng)
    group = data.find(b"\x02\x00\x00\x00UL\x04\x00", 132)
    if group == -1:
        return _flip(data, rng)
    body = group + 12 + int.from_bytes(data[group + 8:group + 12], "little")
    meta = data[132:body]
    implicit = uids.ImplicitVRLittleEndian.encode() + b"\x00" in meta
    big = uids.ExplicitVRBigEndian.encode() in meta
    if uids.DeflatedExplicitVRLittleEndian.encode() in meta:
        return _flip(data, rng)
    order = "big" if big else "little"

    def tag(group_: int, elem: int) -> bytes:
        return group_.to_bytes(2, order) + elem.to_bytes(2, order)

    undefined = b"\xff\xff\xff\xff"
    seq = tag(0x0008, 0x1115) + (undefined if implicit else b"SQ\x00\x00" + undefined)
    item = tag(0xFFFE, 0xE000) + undefined
    item_end = tag(0xFFFE, 0xE00D) + b"\x00" * 4
    seq_end = tag(0xFFFE, 0xE0DD) + b"\x00" * 4
    depth = int(rng.choice([64, 400, 1500, 5000]))
    closed = rng.random() < 0.7
    nest = (seq + item) * depth + ((item_end + seq_end) * depth if closed else b"")
    return data[:body] + nest + data[body:], f"deep({depth}{'' if closed else ', never closed'})"


_BYTE_OPS = {"flip": _flip, "truncate": _truncate, "length": _length, "syntax": _syntax, "deep": _deep}


# -- the reader children ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Result:
    """What reading one case gave: the header pass's status and reason, then the decode's, and any finding (a raw
    exception, a retryable error for a file on a local disk, a reason-less failure) that the test reports."""

    index: int
    case: str
    status: str
    reason: str | None
    frames: int
    stage: str  # "header" when the header pass settled it, else "decode"
    seconds: float
    peak_rss_mb: float
    finding: str | None = None
    decoders: frozenset[str] = frozenset()  # what decoded its frames (DecodedFrame.decoder)


def read_case(path: Path, index: int, case: str) -> Result:
    """The header pass, then (for a file it keeps) the decode the readers do, on one file; never raises."""
    from neuron.errors import InputError, NeuronError, RetryableError
    from neuron.work import Status
    from neuron_models.image import DecodedFrame
    from producer.scan import index_entry
    from worker.decode import decode_instance

    started = time.perf_counter()
    finding, frames, decoders = None, 0, frozenset()
    entry = index_entry(path)
    status, reason = entry.status.value, entry.reason
    if entry.status is not Status.PENDING and not reason:
        finding = f"header pass gave {status} without a reason"
    elif reason and "fault in Neuron" in reason:
        finding = f"header pass raised something unexpected: {reason}"
    if entry.status is Status.PENDING:
        try:
            got = decode_instance(path, entry.sop_instance_uid, MAX_FRAMES, MAX_PIXELS)
            frames = len(got)
            decoders = frozenset(str(getattr(f, "decoder", "")) for f in got)
            if not got or not all(isinstance(f, DecodedFrame) and f.pixels.size for f in got):
                finding = f"decode returned {got!r:.200}: no frames and no error"
            status = "decoded"
        except InputError as exc:
            status, reason = exc.status, exc.reason
            if not reason:
                finding = f"{type(exc).__name__} without a reason"
        except RetryableError as exc:  # a local file: nothing transient about it
            status, reason = "pending", str(exc)
            finding = f"retryable {type(exc).__name__} for a file on a local disk: {exc}"
        except NeuronError as exc:
            status, reason = "error", str(exc)
            finding = f"{type(exc).__name__} is not a per-file error: {exc}"
        except BaseException as exc:  # noqa: BLE001 - a finding, reported with its traceback
            status, reason = "error", str(exc)[:300]
            finding = f"decode raised {type(exc).__name__}: {str(exc)[:300]}\n{traceback.format_exc()[-1500:]}"
    elapsed = time.perf_counter() - started
    peak = peak_rss_mb()
    stage = "decode" if entry.status is Status.PENDING else "header"
    return Result(index, case, status, reason, frames, stage, elapsed, peak, finding, decoders)


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM). Not ``ru_maxrss``: Linux keeps that across fork and exec, so a
    freshly spawned child would report the peak of the pytest process that started it."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _serve(conn, scratch: str, test_dir: str, data_dir: str) -> None:
    """A child: build the seeds, then make and read case after case (indices from the pipe), until told None."""
    import logging

    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_GB << 30, ADDRESS_SPACE_GB << 30))
    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)  # index_entry logs unexpected errors; they come back as findings here
    seeds = build_seeds(Path(test_dir), Path(data_dir))
    path = Path(scratch) / f"case-{os.getpid()}.dcm"
    conn.send("ready")
    while (index := conn.recv()) is not None:
        case = make_case(seeds, index)
        path.write_bytes(case.data)
        conn.send(read_case(path, index, str(case)))
    path.unlink(missing_ok=True)


class _Child:
    def __init__(self, ctx, args: tuple):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, *args), daemon=True)
        self.proc.start()
        child.close()
        self.index: int | None = None  # the case it is reading
        self.since = time.monotonic()
        self.ready = False

    def stop(self) -> None:
        try:
            self.conn.send(None)
            self.proc.join(timeout=10)
        except OSError:
            pass
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()


def run_cases(indices: list[int], scratch: Path, test_dir: Path, data_dir: Path, workers: int = 2,
              timeout: float = PER_FILE_TIMEOUT_S) -> list[Result]:
    """Read the cases in ``workers`` child processes. A child that does not answer within ``timeout`` is killed
    (the case is a "hang") and one that dies is a "crash"; either is replaced and the run goes on."""
    ctx = get_context("spawn")  # never fork a process that holds torch's threads
    args = (str(scratch), str(test_dir), str(data_dir))
    todo = list(reversed(indices))
    children = [_Child(ctx, args) for _ in range(max(1, min(workers, len(indices))))]
    results: list[Result] = []
    try:
        while todo or any(c.index is not None for c in children):
            for c in children:
                if c.ready and c.index is None and todo:
                    c.index, c.since = todo.pop(), time.monotonic()
                    c.conn.send(c.index)
            ready = connection_wait([c.conn for c in children], timeout=0.5)
            for k, c in enumerate(children):
                got = None
                if c.conn in ready:
                    try:
                        got = c.conn.recv()
                    except (EOFError, OSError):  # died: handled below
                        pass
                if got == "ready":
                    c.ready, c.since = True, time.monotonic()
                elif isinstance(got, Result):
                    results.append(got)
                    c.index = None
                elif c.conn in ready or not c.proc.is_alive() or (c.index is not None and
                                                                  time.monotonic() - c.since > timeout):
                    if c.index is None:
                        raise RuntimeError(f"a fuzz reader process died before reading a case: exit "
                                           f"{c.proc.exitcode}")
                    waited = time.monotonic() - c.since
                    hang = c.proc.is_alive()
                    what = f"no answer within {timeout:.0f} s" if hang else \
                        f"the reader process died (exit {c.proc.exitcode})"
                    results.append(Result(c.index, f"case {c.index}", "hang" if hang else "crash", None, 0, "?",
                                          waited, 0.0, f"{what}: replay with python -m tests.fuzz {c.index}"))
                    c.proc.kill()
                    c.proc.join()
                    children[k] = _Child(ctx, args)
                elif not c.ready and time.monotonic() - c.since > 120:
                    raise RuntimeError("a fuzz reader process did not start within 120 s")
    finally:
        for c in children:
            c.stop()
    return sorted(results, key=lambda r: r.index)


def main(argv: list[str]) -> int:
    """Replay cases by index: ``python -m tests.fuzz 17 123`` prints what each one gave."""
    from neuron.sample_data import pydicom_data_dir, pydicom_test_dir

    scratch = Path(os.environ.get("TMPDIR", "/tmp"))
    for result in run_cases([int(a) for a in argv], scratch, pydicom_test_dir(), pydicom_data_dir(), workers=1):
        print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
