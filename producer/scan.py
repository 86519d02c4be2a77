"""Find DICOM files by content and read their headers only. Never imports torch, never decodes pixels.

A file is DICOM when it has the 'DICM' marker at byte 128, or, lacking the 128-byte preamble (older or hand-written
files), when pydicom can parse it and it carries a SOP Instance UID. Extensions mean nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from db.schema import Status
from db.store import Database, FileEntry, InstanceEntry, InstanceHeader
from neuron.errors import FailedInput, InputError, SkippedInput
from neuron.photos import photo_kind, photo_uids
from neuron.routes import Route, RoutingFacts, route_for

log = logging.getLogger(__name__)

PREAMBLE_MARKER_OFFSET = 128
# Only the attributes routing, indexing and decoding limits need; everything else waits for the worker.
HEADER_TAGS = [
    "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "Modality", "BodyPartExamined",
    "PhotometricInterpretation", "Rows", "Columns", "NumberOfFrames", "SamplesPerPixel",
]


def header_from_dataset(ds: pydicom.Dataset) -> InstanceHeader:
    """The header facts of one instance, checked on the way in (an object that exists is valid)."""
    uid = str(ds.get("SOPInstanceUID", "") or "").strip()
    if not uid:
        raise FailedInput("no SOP Instance UID (0008,0018): the instance cannot be identified; "
                          "fix the file's header or leave it out of the archive")
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    return InstanceHeader(
        sop_instance_uid=uid[:64],
        study_instance_uid=str(ds.get("StudyInstanceUID", "") or "")[:64],
        series_instance_uid=str(ds.get("SeriesInstanceUID", "") or "")[:64],
        sop_class_uid=str(ds.get("SOPClassUID", "") or "") or None,
        modality=str(ds.get("Modality", "") or "").strip().upper() or None,
        body_part=str(ds.get("BodyPartExamined", "") or "").strip().upper() or None,
        photometric=str(ds.get("PhotometricInterpretation", "") or "").strip().upper() or None,
        transfer_syntax=str(ts) if ts else None,
        rows=_int_or_none(ds.get("Rows")),
        columns=_int_or_none(ds.get("Columns")),
        frames=max(1, frames),
    )


def _int_or_none(value) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def iter_files(root: Path, exclude: Iterable[Path] = ()) -> Iterator[Path]:
    """Every regular file below root, in a stable order, skipping excluded folders (e.g. our own output)."""
    excluded = {p.resolve() for p in exclude}
    for dirpath, dirnames, filenames in os.walk(root):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if (here / d).resolve() not in excluded)
        for name in sorted(filenames):
            path = here / name
            if path.is_file():
                yield path


def read_header(path: Path) -> InstanceHeader:
    """Parse the header of one file, or raise InputError saying why it is not a usable DICOM instance."""
    size = path.stat().st_size
    if size == 0:
        raise FailedInput("empty file (0 bytes): not DICOM; remove it or re-export it from the source")
    with path.open("rb") as fh:
        head = fh.read(PREAMBLE_MARKER_OFFSET + 4)
    has_marker = head[PREAMBLE_MARKER_OFFSET:PREAMBLE_MARKER_OFFSET + 4] == b"DICM"
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=not has_marker)
    except (InvalidDicomError, EOFError, ValueError, KeyError, TypeError, OSError, OverflowError) as exc:
        if has_marker:
            raise FailedInput(f"DICOM header is unreadable ({type(exc).__name__}: {exc}); "
                              "the file is truncated or corrupt: re-export it from the source") from exc
        raise SkippedInput("not a DICOM file: no 'DICM' marker at byte 128 and no parseable DICOM header") from exc
    if not has_marker and "SOPInstanceUID" not in ds:
        raise SkippedInput("not a DICOM file: no 'DICM' marker at byte 128 and no SOP Instance UID")
    try:
        return header_from_dataset(ds)
    except InputError:
        raise
    except Exception as exc:  # pydicom raises lazily while converting malformed values
        raise FailedInput(f"DICOM header has malformed values ({type(exc).__name__}: {exc}); "
                          "re-export the file from the source") from exc


def photo_header(path: Path, kind: str) -> InstanceHeader:
    sop_uid, study_uid = photo_uids(path)
    return InstanceHeader(sop_instance_uid=sop_uid, study_instance_uid=study_uid, series_instance_uid=study_uid,
                          sop_class_uid=None, modality="XC", body_part=None, photometric=None,
                          transfer_syntax=kind, rows=None, columns=None, frames=1)


def index_entry(path: Path, route_override: Route | None = None) -> FileEntry:
    """Header pass over one file: identity, route (or the reason it has none) and status. With ``route_override``
    every instance goes to that route, and plain JPEG/PNG photographs are taken too (``neuron run --route skin``)."""
    st = path.stat()
    base = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    kind = photo_kind(path) if route_override is not None else None
    try:
        h = photo_header(path, kind) if kind is not None else read_header(path)
    except InputError as exc:
        reason = exc.reason
        if isinstance(exc, SkippedInput) and photo_kind(path) is not None:
            reason += "; a folder of JPEG/PNG photographs is screened with --route skin"
        return FileEntry(**base, status=Status(exc.status), reason=reason)
    try:
        route = route_override or route_for(RoutingFacts.of(h.modality, h.body_part))
        status, reason = Status.PENDING, None
    except SkippedInput as exc:
        route, status, reason = None, Status.SKIPPED, exc.reason
    inst = InstanceEntry(h, route=route.value if route else None, status=status, reason=reason)
    return FileEntry(**base, status=status, reason=reason, sop_instance_uid=h.sop_instance_uid, instance=inst)


@dataclass
class ScanResult:
    seen: int = 0
    indexed: int = 0
    unchanged: int = 0


def index_folder(root: Path, db: Database, exclude: Iterable[Path] = (), batch: int = 256,
                 on_file: Callable[[int], None] | None = None, route_override: Route | None = None) -> ScanResult:
    """Index every file below root into the database. Files already indexed with the same size and mtime are
    skipped, so a re-scan of an unchanged archive reads no headers at all."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"'{root}' is not a folder")
    known = db.file_index()
    result = ScanResult()
    pending: list[FileEntry] = []
    for path in iter_files(root, exclude):
        result.seen += 1
        try:
            st = path.stat()
        except OSError:
            continue  # vanished between listing and stat
        if known.get(str(path.resolve())) == (st.st_size, st.st_mtime_ns):
            result.unchanged += 1
        else:
            pending.append(index_entry(path, route_override))
            result.indexed += 1
        if len(pending) >= batch:
            db.add_files(pending)
            pending.clear()
        if on_file is not None:
            on_file(result.seen)
    db.add_files(pending)
    log.info("scanned %d files: %d indexed, %d unchanged", result.seen, result.indexed, result.unchanged)
    return result
