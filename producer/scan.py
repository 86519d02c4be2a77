"""Find DICOM files by content and read their headers only. Never imports torch, never decodes pixels.

A file is DICOM when it has the 'DICM' marker at byte 128, or, lacking the 128-byte preamble (older or hand-written
files), when pydicom can parse it and it carries a SOP Instance UID. Extensions mean nothing.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.multival import MultiValue

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


UID_MAX_LENGTH = 64
_UID_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)*")
_UID_PADDING = " \x00"


def checked_uid(value: object, keyword: str, tag: str, required: bool) -> str:
    """A UID exactly as the file holds it (trailing padding removed), or FailedInput naming what is wrong with it.
    Never shortened or repaired: two instances whose UIDs differ only past the limit are still two instances.
    PS3.5 9.1: digits in dot-separated components, no empty component, at most 64 characters."""
    if isinstance(value, MultiValue):  # backslashes split a value into several: show it as the file holds it
        value = "\\".join(str(v) for v in value)
    uid = str(value or "").rstrip(_UID_PADDING)
    if not uid:
        if required:
            raise FailedInput(f"no {keyword} {tag}: the instance cannot be identified; fix the file's header or "
                              "leave it out of the archive")
        return ""
    shown = repr(uid) if len(uid) <= 100 else repr(uid[:100]) + "..."
    if len(uid) > UID_MAX_LENGTH:
        problem = f"is {len(uid)} characters long, over the limit of {UID_MAX_LENGTH}"
    elif not _UID_PATTERN.fullmatch(uid):
        problem = ("has an empty component (two dots in a row, or a dot at either end)"
                   if set(uid) <= set("0123456789.") else "has characters other than digits and dots")
    else:
        return uid
    raise FailedInput(f"{keyword} {tag} {shown} is not a valid DICOM UID: it {problem} (PS3.5 9.1); it is not "
                      "shortened or repaired into a different UID: fix the header at the source and re-export")


def header_from_dataset(ds: pydicom.Dataset) -> InstanceHeader:
    """The header facts of one instance, checked on the way in (an object that exists is valid). A Study or Series
    Instance UID may be absent (the instance is still identified), but one that is present must be valid."""
    uid = checked_uid(ds.get("SOPInstanceUID"), "SOP Instance UID", "(0008,0018)", required=True)
    study = checked_uid(ds.get("StudyInstanceUID"), "Study Instance UID", "(0020,000D)", required=False)
    series = checked_uid(ds.get("SeriesInstanceUID"), "Series Instance UID", "(0020,000E)", required=False)
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    return InstanceHeader(
        sop_instance_uid=uid,
        study_instance_uid=study,
        series_instance_uid=series,
        sop_class_uid=_valid_uid_or_none(ds.get("SOPClassUID")),
        modality=_code(ds, "Modality", 16),
        body_part=_code(ds, "BodyPartExamined", 64),
        photometric=_code(ds, "PhotometricInterpretation", 32),
        transfer_syntax=str(ts) if ts else None,
        rows=_int_or_none(ds.get("Rows")),
        columns=_int_or_none(ds.get("Columns")),
        frames=max(1, frames),
    )


def _valid_uid_or_none(value: object) -> str | None:
    """A descriptive UID (not an identity): kept when valid, else left out rather than stored altered."""
    uid = str(value or "").rstrip(_UID_PADDING)
    return uid if len(uid) <= UID_MAX_LENGTH and _UID_PATTERN.fullmatch(uid) else None


def _code(ds: pydicom.Dataset, keyword: str, limit: int) -> str | None:
    """A code string for routing and reporting. A value longer than its VR allows (CS: 16) is no code Neuron
    routes on; it is kept to the database column's width so one hostile header cannot fail a whole batch's insert."""
    return str(ds.get(keyword, "") or "").strip().upper()[:limit] or None


def _int_or_none(value) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def iter_files(root: Path, exclude: Iterable[Path] = ()) -> Iterator[Path]:
    """Every regular file below root, in a stable order, skipping excluded folders (e.g. our own output)."""
    excluded = {p.resolve() for p in exclude}

    def unreadable_folder(exc: OSError) -> None:
        log.error("folder %s could not be listed (%s): its files are not indexed; fix its permissions and scan "
                  "again", exc.filename, exc.strerror or exc)

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable_folder):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if (here / d).resolve() not in excluded)
        for name in sorted(filenames):
            path = here / name
            try:
                regular = path.is_file()
            except OSError:
                regular = True  # cannot tell (e.g. permission denied): index_entry records why it cannot be read
            if regular:
                yield path


def read_header(path: Path) -> InstanceHeader:
    """Parse the header of one file, or raise InputError saying why it is not a usable DICOM instance. An OSError
    (the file could not be read: permissions, a network share) is raised as it is: the caller decides."""
    size = path.stat().st_size
    if size == 0:
        raise FailedInput("empty file (0 bytes): not DICOM; remove it or re-export it from the source")
    with path.open("rb") as fh:
        head = fh.read(PREAMBLE_MARKER_OFFSET + 4)
    has_marker = head[PREAMBLE_MARKER_OFFSET:PREAMBLE_MARKER_OFFSET + 4] == b"DICM"
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=not has_marker)
    except OSError:
        raise
    except Exception as exc:  # pydicom raises many types on malformed input (BytesLengthException ...)
        if has_marker:
            raise FailedInput(f"DICOM header is unreadable ({type(exc).__name__}: {_short(exc)}); "
                              "the file is truncated or corrupt: re-export it from the source") from exc
        raise SkippedInput("not a DICOM file: no 'DICM' marker at byte 128 and no parseable DICOM header") from exc
    try:
        if not has_marker and "SOPInstanceUID" not in ds:
            raise SkippedInput("not a DICOM file: no 'DICM' marker at byte 128 and no SOP Instance UID")
        return header_from_dataset(ds)
    except InputError:
        raise
    except Exception as exc:  # pydicom raises lazily while converting malformed values
        raise FailedInput(f"DICOM header has malformed values ({type(exc).__name__}: {_short(exc)}); "
                          "re-export the file from the source") from exc


def _short(exc: BaseException, limit: int = 300) -> str:
    """An exception's message for a reason column: a hostile file must not make its own reason megabytes long."""
    text = str(exc)
    return text if len(text) <= limit else text[:limit] + "..."


def photo_header(path: Path, kind: str) -> InstanceHeader:
    sop_uid, study_uid = photo_uids(path)
    return InstanceHeader(sop_instance_uid=sop_uid, study_instance_uid=study_uid, series_instance_uid=study_uid,
                          sop_class_uid=None, modality="XC", body_part=None, photometric=None,
                          transfer_syntax=kind, rows=None, columns=None, frames=1)


def index_entry(path: Path, route_override: Route | None = None) -> FileEntry:
    """Header pass over one file: identity, route (or the reason it has none) and status. With ``route_override``
    every instance goes to that route, and plain JPEG/PNG photographs are taken too (``neuron run --route skin``).
    Never raises for one file's sake: whatever reading it raises, the file is recorded with the reason."""
    try:
        st = path.stat()
    except OSError as exc:
        return _unreadable(path, None, exc)
    base = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        kind = photo_kind(path) if route_override is not None else None
        h = photo_header(path, kind) if kind is not None else read_header(path)
    except InputError as exc:
        reason = exc.reason
        if isinstance(exc, SkippedInput) and photo_kind(path) is not None:
            reason += "; a folder of JPEG/PNG photographs is screened with --route skin"
        return FileEntry(**base, status=Status(exc.status), reason=reason)
    except OSError as exc:
        return _unreadable(path, st, exc)
    except Exception as exc:  # one file must never stop the walk; recorded, with the traceback logged
        log.exception("unexpected error reading the header of %s", path)
        return FileEntry(**base, status=Status.FAILED,
                         reason=f"header could not be read ({type(exc).__name__}: {_short(exc)}); this is a fault "
                                "in Neuron or one of its libraries: report it with the log; the file is left alone")
    try:
        route = route_override or route_for(RoutingFacts.of(h.modality, h.body_part))
        status, reason = Status.PENDING, None
    except SkippedInput as exc:
        route, status, reason = None, Status.SKIPPED, exc.reason
    inst = InstanceEntry(h, route=route.value if route else None, status=status, reason=reason)
    return FileEntry(**base, status=status, reason=reason, sop_instance_uid=h.sop_instance_uid, instance=inst)


UNREAD_MTIME = -1  # never equals a real mtime, so the next scan reads the file again


def _unreadable(path: Path, st: os.stat_result | None, exc: OSError) -> FileEntry:
    """A file that could not be read (permissions, a network share that went away) is recorded as failed with the
    reason, and with a size and mtime that make the next scan read it again: an I/O error is often transient."""
    log.warning("could not read %s: %s", path, exc)
    reason = (f"could not be read ({type(exc).__name__}: {exc.strerror or exc}); check the file's permissions and the "
              "share it is on; the next scan reads it again")
    try:
        resolved = str(path.resolve())
    except (OSError, RuntimeError):
        resolved = str(path.absolute())
    return FileEntry(path=resolved, size=st.st_size if st is not None else -1, mtime_ns=UNREAD_MTIME,
                     status=Status.FAILED, reason=reason)


@dataclass
class ScanResult:
    seen: int = 0
    indexed: int = 0
    unchanged: int = 0


def index_folder(root: Path, db: Database, exclude: Iterable[Path] = (), batch: int = 256,
                 on_file: Callable[[int], None] | None = None, route_override: Route | None = None,
                 on_indexed: Callable[[list[str]], None] | None = None) -> ScanResult:
    """Index every file below root into the database. Files already indexed with the same size and mtime are
    skipped, so a re-scan of an unchanged archive reads no headers at all. ``on_indexed`` gets the paths of each
    committed batch (the embedded run screens them while the walk goes on)."""
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
        except FileNotFoundError:
            continue  # vanished between listing and stat
        except OSError:
            st = None  # index_entry records why it cannot be read
        if st is not None and known.get(str(path.resolve())) == (st.st_size, st.st_mtime_ns):
            result.unchanged += 1
        else:
            pending.append(index_entry(path, route_override))
            result.indexed += 1
        if len(pending) >= batch:
            _commit(db, pending, on_indexed)
        if on_file is not None:
            on_file(result.seen)
    _commit(db, pending, on_indexed)
    log.info("scanned %d files: %d indexed, %d unchanged", result.seen, result.indexed, result.unchanged)
    return result


def _commit(db: Database, entries: list[FileEntry], on_indexed: Callable[[list[str]], None] | None) -> None:
    db.add_files(entries)
    if on_indexed is not None and entries:
        on_indexed([e.path for e in entries])
    entries.clear()
