"""Find DICOM files by content and read their headers only. Never imports torch, never decodes pixels.

A file is DICOM when it has the 'DICM' marker at byte 128, or, lacking the 128-byte preamble (older or hand-written
files), when pydicom can parse it and it carries a SOP Instance UID. Extensions mean nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from datetime import date
from multiprocessing import get_context
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom.multival import MultiValue

from db.store import Database
from neuron.errors import FailedInput, InputError, SkippedInput
from neuron.photos import photo_kind, photo_uids
from neuron.routes import PopulationFacts, PopulationPolicy, RoutingFacts, ViewFact, gate, route_for
from neuron.work import AGE_CAP, FileEntry, InstanceEntry, InstanceHeader, Route, Status, StudyHeader, printable

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
DB_INT_MAX = 2**31 - 1  # the integer columns (frames, rows, columns) of PostgreSQL; SQLite would store more


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


def header_from_dataset(ds: pydicom.Dataset, facts: PopulationFacts | None = None) -> InstanceHeader:
    """The header facts of one instance, checked on the way in (an object that exists is valid). A Study or Series
    Instance UID may be absent (the instance is still identified), but one that is present must be valid. ``facts``
    (``population_facts``): the view and age kept with it."""
    uid = checked_uid(ds.get("SOPInstanceUID"), "SOP Instance UID", "(0008,0018)", required=True)
    study = checked_uid(ds.get("StudyInstanceUID"), "Study Instance UID", "(0020,000D)", required=False)
    series = checked_uid(ds.get("SeriesInstanceUID"), "Series Instance UID", "(0020,000E)", required=False)
    try:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        frames = 1
    if frames > DB_INT_MAX:
        raise FailedInput(f"Number of Frames (0028,0008) {frames} is over {DB_INT_MAX}: no instance holds that many "
                          "frames, the header is corrupt; fix it at the source and re-export")
    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    return InstanceHeader(
        sop_instance_uid=uid,
        study_instance_uid=study,
        series_instance_uid=series,
        sop_class_uid=_valid_uid_or_none(ds.get("SOPClassUID")),
        modality=_code(ds, "Modality", 16),
        body_part=_code(ds, "BodyPartExamined", 64),
        photometric=_code(ds, "PhotometricInterpretation", 32),
        transfer_syntax=_valid_uid_or_none(ts),  # descriptive: the decoder reads the file's own
        rows=_int_or_none(ds.get("Rows")),
        columns=_int_or_none(ds.get("Columns")),
        frames=max(1, frames),
        view_position=facts.view.view if facts is not None else None,
        age_years=None if facts is None or facts.age_years is None else min(AGE_CAP, int(facts.age_years)),
        manufacturer=_text(ds, "Manufacturer", 64),
        manufacturer_model=_text(ds, "ManufacturerModelName", 64),
        bits_stored=_int_or_none(_safe(ds, "BitsStored")),
        pixel_spacing=_spacing(ds),
    )


def population_facts(ds: pydicom.Dataset) -> PopulationFacts:
    """What gating reads from a header (``neuron.routes.gate``): modality, body part, the view (ViewPosition, else
    SeriesDescription or ProtocolName) and the age (PatientAge, else the birth date and the study date). The birth
    date is read here to compute the age and goes nowhere else."""
    view = ViewFact.of(_text(ds, "ViewPosition", 16), _text(ds, "SeriesDescription", 64),
                       _text(ds, "ProtocolName", 64))
    age, source = parse_as(_text(ds, "PatientAge", 8)), None
    if age is not None:
        source = f"PatientAge '{_text(ds, 'PatientAge', 8)}'"
    else:
        born = parse_da(_text(ds, "PatientBirthDate", 16))
        when = next((d for d in (parse_da(_text(ds, k, 16)) for k in ("StudyDate", "SeriesDate", "AcquisitionDate",
                                                                        "ContentDate")) if d is not None), None)
        if born is not None and when is not None and born <= when:
            age, source = age_at(born, when), "from the birth date and the study date"
    return PopulationFacts(modality=_code(ds, "Modality", 16) or "", body_part=_code(ds, "BodyPartExamined", 64) or "",
                           view=view, age_years=age, age_source=source)


def age_at(born: date, when: date) -> float:
    """Age in years on ``when``: whole years, plus the fraction of the year since the last birthday (a birthday on
    29 February falls on 28 February in other years)."""
    years = when.year - born.year - ((when.month, when.day) < (born.month, born.day))
    try:
        last = born.replace(year=born.year + years)
    except ValueError:
        last = date(born.year + years, 2, 28)
    return years + (when - last).days / 366.0


_AGE_UNITS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


def parse_as(value: str | None) -> float | None:
    """A DICOM AS value (``nnnD``, ``nnnW``, ``nnnM`` or ``nnnY``, PS3.5 6.2) in years; None when absent or not an
    age string."""
    text = (value or "").strip().upper()
    if len(text) < 2 or text[-1] not in _AGE_UNITS or not text[:-1].isdigit():
        return None
    return int(text[:-1]) * _AGE_UNITS[text[-1]]


def _safe(ds: pydicom.Dataset, keyword: str):
    try:
        return ds.get(keyword)
    except Exception:  # pydicom converts lazily: a malformed descriptive value is left out
        return None


def _spacing(ds: pydicom.Dataset) -> float | None:
    """The row spacing in mm from PixelSpacing, else ImagerPixelSpacing (projection radiographs); None if neither is a
    positive number."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = _safe(ds, keyword)
        try:
            first = float(value[0] if isinstance(value, MultiValue | list | tuple) else value)
        except (TypeError, ValueError, IndexError):
            continue
        if 0 < first < 1000:
            return round(first, 4)
    return None


def patient_key(secret: str, patient_id: str | None) -> str | None:
    """HMAC-SHA256(secret, Patient ID) as hex: the same patient gives the same key under the same secret, and the key
    reveals nothing about the ID without the secret (a plain hash of an ID would: IDs are short and guessable)."""
    if not patient_id:
        return None
    return hmac.new(secret.encode(), patient_id.strip().encode(), hashlib.sha256).hexdigest()


def parse_da(value: object) -> date | None:
    """A DICOM DA value (YYYYMMDD; the old YYYY.MM.DD form too) as a date, None when absent or not a real date."""
    text = str(value or "").strip().replace(".", "")
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return None


def study_from_dataset(ds: pydicom.Dataset, study_uid: str, patient_secret: str | None = None) -> StudyHeader:
    """StudyDate, AccessionNumber and StudyDescription for the worklist. The Patient ID leaves this function only as
    a keyed hash, and only when a secret is given (--patient-key); the patient's name is never read."""
    return StudyHeader(
        study_instance_uid=study_uid,
        study_date=parse_da(_text(ds, "StudyDate", 16)),
        accession_number=_text(ds, "AccessionNumber", 16),
        study_description=_text(ds, "StudyDescription", 64),
        patient_key=patient_key(patient_secret, _text(ds, "PatientID", 64)) if patient_secret else None,
    )


def _text(ds: pydicom.Dataset, keyword: str, limit: int) -> str | None:
    """A short descriptive text as stored (spaces trimmed), control characters escaped, cut to the column's width
    (a longer value breaks its VR's limit; it is shown, not used as an identity)."""
    try:
        value = ds.get(keyword)
    except Exception:  # pydicom converts lazily: a malformed value of a descriptive field is left out
        return None
    if isinstance(value, MultiValue):
        value = "\\".join(str(v) for v in value)
    return printable(str(value or "").strip())[:limit] or None


def _valid_uid_or_none(value: object) -> str | None:
    """A descriptive UID (not an identity): kept when valid, else left out rather than stored altered."""
    uid = str(value or "").rstrip(_UID_PADDING)
    return uid if len(uid) <= UID_MAX_LENGTH and _UID_PATTERN.fullmatch(uid) else None


def _code(ds: pydicom.Dataset, keyword: str, limit: int) -> str | None:
    """A code string for routing and reporting. A value longer than its VR allows (CS: 16) is no code Neuron
    routes on; it is kept to the database column's width, control characters escaped (PostgreSQL refuses a NUL,
    SQLite stores it), so one hostile header cannot fail a whole batch's insert in one mode and not the other."""
    return printable(str(ds.get(keyword, "") or "").strip().upper())[:limit] or None


def _int_or_none(value) -> int | None:
    try:
        return int(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def iter_files(root: Path, exclude: Iterable[Path] = (), follow_links: bool = False) -> Iterator[Path]:
    """Every regular file below root, in a stable order, skipping excluded folders (e.g. our own output).

    Symbolic links are not followed by default (``Settings.follow_links``, NEURON_FOLLOW_LINKS): a link would bring
    in files that are not part of the archive being scanned, from anywhere the link points, and a link loop would
    never end. A link that leads out of root is logged as a warning naming the link and the setting, so an operator
    who expected it screened knows why it was not; a link inside root is left silently (the walk finds its target
    anyway). With ``follow_links`` links are followed wherever they lead, and every folder and every file is still
    visited once (by its device and inode, by its resolved path), so a loop ends and no file is indexed twice."""
    root = Path(root)
    excluded = {p.resolve() for p in exclude}
    real_root = root.resolve()
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[str] = set()

    def unreadable_folder(exc: OSError) -> None:
        log.error("folder %s could not be listed (%s): its files are not indexed; fix its permissions and scan "
                  "again", exc.filename, exc.strerror or exc)

    def resolved(path: Path) -> Path | None:
        try:
            return path.resolve()
        except (OSError, RuntimeError):  # a link loop (RuntimeError before Python 3.13)
            return None

    def not_followed(link: Path) -> None:
        target = resolved(link)
        if target is None or not target.is_relative_to(real_root):
            log.warning("symbolic link %s leads out of the scanned folder %s (to %s) and is not followed: its "
                        "target is not screened; scan the target's folder, or set NEURON_FOLLOW_LINKS=1 to follow "
                        "links", link, root, target if target is not None else "a link loop")

    for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable_folder, followlinks=follow_links):
        here = Path(dirpath)
        if follow_links:
            try:
                st = os.stat(here)
            except OSError:
                dirnames[:] = []
                continue
            if (st.st_dev, st.st_ino) in seen_dirs:  # reached again through a link: a loop, or a second way in
                dirnames[:] = []
                continue
            seen_dirs.add((st.st_dev, st.st_ino))
        kept = []
        for d in sorted(dirnames):
            sub = here / d
            if resolved(sub) in excluded:
                continue
            if not follow_links and sub.is_symlink():
                not_followed(sub)
                continue
            kept.append(d)
        dirnames[:] = kept
        for name in sorted(filenames):
            path = here / name
            if not follow_links and path.is_symlink():
                not_followed(path)
                continue
            try:
                regular = path.is_file()
            except OSError:
                regular = True  # cannot tell (e.g. permission denied): index_entry records why it cannot be read
            if not regular:
                continue
            if follow_links:
                key = str(resolved(path) or path)
                if key in seen_files:
                    continue
                seen_files.add(key)
            yield path


def read_header(path: Path) -> InstanceHeader:
    """Parse the header of one file, or raise InputError saying why it is not a usable DICOM instance. An OSError
    (the file could not be read: permissions, a network share) is raised as it is: the caller decides."""
    return read_headers(path)[0]


def read_headers(path: Path, patient_secret: str | None = None
                 ) -> tuple[InstanceHeader, StudyHeader, PopulationFacts]:
    """``read_header``, what the worklist needs about the instance's study (``study_from_dataset``) and what gating
    reads (``population_facts``)."""
    with path.open("rb") as fp:
        header, study, facts, _ = parse_headers(path, fp, patient_secret)
    return header, study, facts


def parse_headers(path: Path, fp: BinaryIO, patient_secret: str | None = None, defer_size: int | None = None
                  ) -> tuple[InstanceHeader, StudyHeader, PopulationFacts, pydicom.Dataset]:
    """The headers of the file open as ``fp``, what gating reads from them, and its dataset. ``defer_size`` None stops
    before the pixels (the producer needs no more); a size keeps every element but those larger than it unread
    (pydicom's deferred read), so a reader that indexes and decodes the file parses it once (``worker.readers``)."""
    size = os.fstat(fp.fileno()).st_size
    if size == 0:
        raise FailedInput("empty file (0 bytes): not DICOM; remove it or re-export it from the source")
    head = fp.read(PREAMBLE_MARKER_OFFSET + 4)
    fp.seek(0)
    has_marker = head[PREAMBLE_MARKER_OFFSET:PREAMBLE_MARKER_OFFSET + 4] == b"DICM"
    try:
        if defer_size is None:
            ds = pydicom.dcmread(fp, stop_before_pixels=True, force=not has_marker)
        else:
            ds = pydicom.dcmread(fp, force=not has_marker, defer_size=defer_size)
    except OSError as exc:
        if exc.errno is not None:  # the storage failed (permissions, a share): the caller records and re-reads it
            raise
        # pydicom raises a bare OSError ("No tag to read at file position ...") for a corrupt header: the file's fault
        if has_marker:
            raise FailedInput(f"DICOM header is unreadable ({type(exc).__name__}: {_short(exc)}); "
                              "the file is truncated or corrupt: re-export it from the source") from exc
        raise SkippedInput("not a DICOM file: no 'DICM' marker at byte 128 and no parseable DICOM header") from exc
    except Exception as exc:  # pydicom raises many types on malformed input (BytesLengthException ...)
        if has_marker:
            raise FailedInput(f"DICOM header is unreadable ({type(exc).__name__}: {_short(exc)}); "
                              "the file is truncated or corrupt: re-export it from the source") from exc
        raise SkippedInput("not a DICOM file: no 'DICM' marker at byte 128 and no parseable DICOM header") from exc
    try:
        if not has_marker and "SOPInstanceUID" not in ds:
            raise SkippedInput("not a DICOM file: no 'DICM' marker at byte 128 and no SOP Instance UID")
        facts = population_facts(ds)
        header = header_from_dataset(ds, facts)
        return header, study_from_dataset(ds, header.study_instance_uid, patient_secret), facts, ds
    except InputError:
        raise
    except Exception as exc:  # pydicom raises lazily while converting malformed values
        raise FailedInput(f"DICOM header has malformed values ({type(exc).__name__}: {_short(exc)}); "
                          "re-export the file from the source") from exc


def _short(exc: BaseException, limit: int = 300) -> str:
    """An exception's message for a reason column: a hostile file must not make its own reason megabytes long."""
    text = printable(str(exc))
    return text if len(text) <= limit else text[:limit] + "..."


def photo_header(path: Path, kind: str) -> InstanceHeader:
    sop_uid, study_uid = photo_uids(path)
    return InstanceHeader(sop_instance_uid=sop_uid, study_instance_uid=study_uid, series_instance_uid=study_uid,
                          sop_class_uid=None, modality="XC", body_part=None, photometric=None,
                          transfer_syntax=kind, rows=None, columns=None, frames=1)


def index_entry(path: Path, route_override: Route | None = None, patient_secret: str | None = None,
                policy: PopulationPolicy | str = PopulationPolicy.FLAG) -> FileEntry:
    """Header pass over one file: identity, route (or the reason it has none), the gate against the route's trained
    population (``neuron.routes.gate``: a film outside it is skipped, or screened and flagged, by ``policy``) and
    status. With ``route_override`` every instance goes to that route, and plain JPEG/PNG photographs are taken too
    (``neuron run --route skin``). ``patient_secret`` (--patient-key) keeps a keyed hash of the Patient ID with the
    study. Never raises for one file's sake: whatever reading it raises, the file is recorded with the reason."""
    return index_and_open(path, route_override, patient_secret, policy=policy)[0]


@dataclass
class Opened:
    """A pending instance's file left open after indexing, with its parsed dataset, for the caller to decode
    (``worker.decode.decode_dataset``) and close; ``dataset`` is None for a photograph."""

    fp: BinaryIO | None
    dataset: pydicom.Dataset | None


def index_and_open(path: Path, route_override: Route | None = None, patient_secret: str | None = None,
                   defer_size: int | None = None, policy: PopulationPolicy | str = PopulationPolicy.FLAG
                   ) -> tuple[FileEntry, Opened | None]:
    """``index_entry``, gate included; with ``defer_size`` the file of a pending instance (screened, flagged or not)
    is also kept open with its whole dataset parsed (elements larger than ``defer_size`` deferred), so a reader
    decodes it without parsing it again. A film the gate skips is closed here: its pixels are never read."""
    try:
        st = path.stat()
    except OSError as exc:
        return _unreadable(path, None, exc), None
    base = {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    fp = ds = None
    try:
        kind = photo_kind(path) if route_override is not None else None
        if kind is not None:
            h = photo_header(path, kind)
            study = StudyHeader(h.study_instance_uid, None, None, None, None)
            facts = PopulationFacts(modality="XC")
        else:
            fp = path.open("rb")
            h, study, facts, ds = parse_headers(path, fp, patient_secret, defer_size)
    except InputError as exc:
        _close(fp)
        reason = exc.reason
        if isinstance(exc, SkippedInput) and photo_kind(path) is not None:
            reason += "; a folder of JPEG/PNG photographs is screened with --route skin"
        return FileEntry(**base, status=exc.status, reason=reason), None
    except OSError as exc:
        _close(fp)
        return _unreadable(path, st, exc), None
    except Exception as exc:  # one file must never stop the walk; recorded, with the traceback logged
        _close(fp)
        log.exception("unexpected error reading the header of %s", path)
        return FileEntry(**base, status=Status.FAILED,
                         reason=f"header could not be read ({type(exc).__name__}: {_short(exc)}); this is a fault "
                                "in Neuron or one of its libraries: report it with the log; the file is left alone"), \
            None
    try:
        route = route_override or route_for(RoutingFacts.of(h.modality, h.body_part))
        status, reason = Status.PENDING, None
    except SkippedInput as exc:
        route, status, reason = None, Status.SKIPPED, exc.reason
    gated = {}
    if route is not None:
        decision = gate(route, facts, policy)
        gated = {"population_route": route, "outside_population": decision.outside,
                 "gating_notes": decision.notes}
        if decision.skip:  # no route: nothing selects it for screening (a rescreen, a requeue) unless re-indexed
            route, status, reason = None, Status.SKIPPED, decision.outside
    inst = InstanceEntry(h, route=route, status=status, reason=reason, study=study, **gated)
    entry = FileEntry(**base, status=status, reason=reason, sop_instance_uid=h.sop_instance_uid, instance=inst)
    if defer_size is None or status is not Status.PENDING:
        _close(fp)
        return entry, None
    return entry, Opened(fp, ds)


def _close(fp: BinaryIO | None) -> None:
    if fp is not None:
        fp.close()


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


# Header parsing is the producer's CPU cost (~0.3 ms a file in pydicom). A large scan moves it to a pool of spawned
# processes: the producer never imports torch, so a worker starts in about a second, which pays off past a few thousand
# files; a small scan (and every test of a few files) never starts one.
PARSE_POOL_AFTER = 4096
PARSE_CHUNK = 64
PARSE_WORKERS_MAX = 8


def _parse_workers() -> int:
    return min(PARSE_WORKERS_MAX, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else
               (os.cpu_count() or 1))


def _index_chunk(paths: list[Path], route_override: Route | None, secret: str | None,
                 policy: PopulationPolicy = PopulationPolicy.FLAG) -> list[FileEntry]:
    return [index_entry(p, route_override, secret, policy) for p in paths]


class _HeaderReader:
    """index_entry for the files of one scan, results in walk order (the first path of a SOP Instance UID owns it).
    In this process until ``pool_after`` files were read, then in a process pool with at most two chunks per worker
    in flight, so the walk waits for the parsers and memory stays flat. If a pool process dies (the OOM killer), its
    chunk and the rest are read here: a file is never lost to a parser's crash."""

    def __init__(self, route_override: Route | None, workers: int, pool_after: int = PARSE_POOL_AFTER,
                 patient_secret: str | None = None, policy: PopulationPolicy = PopulationPolicy.FLAG):
        self.route_override, self.workers, self.pool_after = route_override, workers, pool_after
        self.secret, self.policy = patient_secret, PopulationPolicy(policy)
        self.read = 0
        self.pool: ProcessPoolExecutor | None = None
        self.chunk: list[Path] = []
        self.in_flight: deque[tuple[list[Path], Future]] = deque()

    def add(self, path: Path) -> list[FileEntry]:
        """Read one file's header; returns the entries finished so far, in walk order."""
        self.read += 1
        if self.pool is None and (self.workers < 2 or self.read <= self.pool_after):
            return [index_entry(path, self.route_override, self.secret, self.policy)]
        self.chunk.append(path)
        if len(self.chunk) < PARSE_CHUNK:
            return self._collect(block_over=None)
        self._submit()
        return self._collect(block_over=2 * self.workers)

    def finish(self) -> list[FileEntry]:
        if self.chunk:
            self._submit()
        done = self._collect(block_over=0)
        self.close()
        return done

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def _submit(self) -> None:
        paths, self.chunk = self.chunk, []
        if self.pool is None and self.workers >= 2:
            self.pool = ProcessPoolExecutor(self.workers, mp_context=get_context("spawn"))
        if self.pool is None:  # the pool broke: read here
            fut: Future = Future()
            fut.set_result(_index_chunk(paths, self.route_override, self.secret, self.policy))
        else:
            fut = self.pool.submit(_index_chunk, paths, self.route_override, self.secret, self.policy)
        self.in_flight.append((paths, fut))

    def _collect(self, block_over: int | None) -> list[FileEntry]:
        done: list[FileEntry] = []
        while self.in_flight and ((block_over is not None and len(self.in_flight) > block_over)
                                  or self.in_flight[0][1].done()):
            paths, fut = self.in_flight.popleft()
            try:
                done += fut.result()
            except BrokenProcessPool:
                log.error("a header-parsing process died (out of memory?); reading the rest of this scan in the "
                          "producer itself")
                self.workers = 0
                self.close()
                done += _index_chunk(paths, self.route_override, self.secret, self.policy)
        return done


@dataclass
class ScanResult:
    seen: int = 0
    indexed: int = 0
    unchanged: int = 0


def changed_files(root: Path, known: dict[str, tuple[int, int]], exclude: Iterable[Path] = (),
                  follow_links: bool = False, on_file: Callable[[int], None] | None = None,
                  result: ScanResult | None = None, to_shared: Callable[[str], str] = str) -> Iterator[Path]:
    """The files below ``root`` that are new or changed since they were indexed (``known``: shared path -> size,
    mtime), in walk order, counted in ``result``; ``on_file`` gets the number of files seen so far."""
    result = result if result is not None else ScanResult()
    for path in iter_files(root, exclude, follow_links=follow_links):
        result.seen += 1
        try:
            st = path.stat()
        except FileNotFoundError:
            continue  # vanished between listing and stat
        except OSError:
            st = None  # index_entry records why it cannot be read
        if st is not None and known.get(to_shared(str(path.resolve()))) == (st.st_size, st.st_mtime_ns):
            result.unchanged += 1
        else:
            result.indexed += 1
            yield path
        if on_file is not None:
            on_file(result.seen)


FIRST_COMMIT = 32  # files in the scan's first committed batch; each next one doubles, up to ``batch``


def index_folder(root: Path, db: Database, exclude: Iterable[Path] = (), batch: int = 256,
                 on_file: Callable[[int], None] | None = None, route_override: Route | None = None,
                 on_indexed: Callable[[list[FileEntry]], None] | None = None, workers: int | None = None,
                 follow_links: bool = False, patient_secret: str | None = None,
                 policy: PopulationPolicy | str = PopulationPolicy.FLAG,
                 to_shared: Callable[[str], str] = str) -> ScanResult:
    """Index every file below root into the database. Files already indexed with the same size and mtime are skipped,
    so a re-scan of an unchanged archive reads no headers at all. ``on_indexed`` gets the entries of each committed
    batch (under their shared paths), in walk order; the first batch holds FIRST_COMMIT files and each next one
    twice as many, up to ``batch``, so what is sent as it is indexed (``producer.enqueue.EnqueueAsIndexed``) reaches
    the workers within the first files. ``workers``: header-parsing processes once the scan has read
    PARSE_POOL_AFTER files (default: one per CPU, at most 8; 0 or 1 reads every header in this process).
    ``patient_secret``: keep a keyed hash of each study's Patient ID (--patient-key). ``policy``: what happens to a
    film outside its route's trained population (--population-policy). ``to_shared``: this host's path -> the name
    every host shares (``Settings.to_shared``, NEURON_PATH_MAP): the database holds shared names, so a worker that
    mounts the archive elsewhere finds the file and a re-scan from any host recognises it."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"'{root}' is not a folder")
    result = ScanResult()
    pending: list[FileEntry] = []
    reader = _HeaderReader(route_override, _parse_workers() if workers is None else workers,
                           patient_secret=patient_secret, policy=PopulationPolicy(policy))
    limit = min(batch, FIRST_COMMIT)
    try:
        for path in changed_files(root, db.file_index(), exclude, follow_links, on_file, result, to_shared):
            pending += reader.add(path)
            if len(pending) >= limit:
                _commit(db, pending, on_indexed, to_shared)
                limit = min(batch, 2 * limit)
        pending += reader.finish()
    finally:
        reader.close()
    _commit(db, pending, on_indexed, to_shared)
    log.info("scanned %d files: %d indexed, %d unchanged", result.seen, result.indexed, result.unchanged)
    return result


def _commit(db: Database, entries: list[FileEntry], on_indexed: Callable[[list[FileEntry]], None] | None,
            to_shared: Callable[[str], str] = str) -> None:
    shared = [shared_entry(e, to_shared) for e in entries]
    db.add_files(shared)
    if on_indexed is not None and shared:
        on_indexed(shared)
    entries.clear()


def shared_entry(entry: FileEntry, to_shared: Callable[[str], str]) -> FileEntry:
    """The entry under the path's shared name (NEURON_PATH_MAP), as the database records it."""
    path = to_shared(entry.path)
    return entry if path == entry.path else replace(entry, path=path)
