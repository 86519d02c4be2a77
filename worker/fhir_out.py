"""FHIR outputs (``--fhir-out DIR``): one R4 Bundle per screened study, ``DIR/<study hash>.json``, from the results
already committed (``db.fhir`` decides what the resources say; this module decides when and where they are written).

    a commit's instances ─► FhirOutputs.add (never blocks) ─► its thread, every ``flush_after_s``:
        the instances' studies ─► db.fhir.read_studies ─► Bundle (type collection) ─► DIR/<hash>.json.<pid>.partial
        ─► rename ─► one audit row per Bundle (DCM 110106 "Export", the study's UID, the file)

``neuron run``, ``listen`` and ``pull`` (``complete_only``): a study's Bundle is written once none of its instances
waits to be screened, and ``close`` writes the studies still open as they stand (their Observations
``preliminary``). ``neuron worker``: each commit's studies are (re)written as they stand, so the Bundle of a study
grows with its tasks. A file name is the hash ``neuron.codes.study_key`` gives the study, the same as its DICOM
output folder's (``worker.dicom_out``): nothing from a header reaches a path. A rewrite replaces the file whole
(rename), so a reader never sees half a Bundle.

A Bundle costs a few queries and a few kilobytes of JSON per study (no pixels, no highdicom): a thread of the
process that commits is enough, unlike the DICOM outputs' processes. A failure (the folder became unwritable, the
database went away for a moment) is logged with its reason and never touches the results or stops the run; the
studies wait for the next flush, and ``neuron export --format fhir`` writes the same resources from the database at
any time.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from db import audit
from db.fhir import atomic_write, bundle, read_studies, study_bundle_path
from db.schema import chunks
from db.store import Database
from db.studies import open_studies, study_of
from neuron.errors import ConfigError
from neuron.settings import Settings

log = logging.getLogger(__name__)


@dataclass
class FhirReport:
    written: list[Path] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # the reasons


def _reason(exc: BaseException) -> str:
    """Why, without a path: an OSError gives its strerror, anything else its message."""
    if isinstance(exc, OSError):
        return f"{type(exc).__name__}: {exc.strerror or 'I/O error'}"
    return f"{type(exc).__name__}: {exc}"


def writable_folder(folder: Path) -> Path:
    """``folder``, created, once a file could be written in it; ConfigError naming the fix otherwise."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe.{os.getpid()}.{threading.get_ident()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"--fhir-out {folder} is not a writable folder ({exc.strerror}); create it with write "
                          f"permission for this user, or point --fhir-out / NEURON_FHIR_OUT at one that is") from exc
    return folder


class FhirWriter:
    """Writes the Bundles of studies whose results are committed (module docstring). ``role`` names the process in
    the audit trail (``run``, ``worker``, ``listen``, ``pull``, ``rescreen``)."""

    def __init__(self, settings: Settings, db: Database, role: str):
        if settings.fhir_out is None:
            raise ConfigError("FhirWriter needs --fhir-out DIR (NEURON_FHIR_OUT); it is unset")
        self.root = writable_folder(settings.fhir_out)
        self.db = db
        self.actor = audit.process_actor(role)

    def write(self, study_uids: Iterable[str], complete_only: bool = False) -> tuple[FhirReport, set[str]]:
        """Write the Bundle of each of these studies that has screened instances (``complete_only``: of those with
        none left to screen). Returns what was written and failed, and the studies left open. Never raises for one
        study's problem: it is logged and listed."""
        report, left = FhirReport(), set()
        events = []
        with self.db.engine.connect() as conn:
            for chunk in chunks(sorted(set(study_uids))):
                if complete_only:  # asked before any resource is built: a study may wait long for its last image
                    waiting = open_studies(conn, chunk)
                    left |= waiting
                    chunk = [uid for uid in chunk if uid not in waiting]
                for study in read_studies(conn, chunk):
                    path = study_bundle_path(self.root, study.uid)
                    try:
                        atomic_write(path, [json.dumps(bundle(study.resources()), indent=1), "\n"])
                    except OSError as exc:  # this study's file only; the results are committed
                        report.failed.append(_reason(exc))
                        log.warning("FHIR Bundle %s not written: %s; the results are committed, and `neuron export "
                                    "--format fhir` writes them from the database", path.name, _reason(exc))
                        continue
                    report.written.append(path)
                    events.append(audit.Event(self.actor, audit.Action.EXPORT, study.uid, target="fhir-out",
                                              detail=f"FHIR Bundle of {len(study.observations)} observations to "
                                                     f"{path.resolve()}"))
        audit.record(self.db, *events)
        return report, left


class FhirOutputs:
    """The Bundles of committed results, written by a thread of their own while screening goes on; ``add`` is
    called after a commit and never blocks on the writing (module docstring)."""

    def __init__(self, settings: Settings, role: str, complete_only: bool = True, flush_after_s: float = 1.0):
        self.db = Database(settings.resolved_database_url)
        self.writer = FhirWriter(settings, self.db, role)  # before screening: an unwritable folder stops here
        self.complete_only = complete_only
        self.lock = threading.Lock()
        self.waiting: list[str] = []
        self.open: set[str] = set()  # complete_only: studies seen with instances still to screen
        self.report = FhirReport()
        self.failing = False
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._flush_every, args=(flush_after_s,), name="fhir-outputs",
                                       daemon=True)
        self.thread.start()

    def add(self, sop_uids: Sequence[str]) -> None:
        with self.lock:
            self.waiting.extend(sop_uids)

    def _flush_every(self, seconds: float) -> None:
        while not self.stopped.wait(seconds):
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        with self.lock:
            sops, self.waiting = self.waiting, []
        try:
            with self.db.engine.connect() as conn:
                studies = set(study_of(conn, sops).values())
            studies |= self.open
            if not studies:
                return
            done, left = self.writer.write(studies, complete_only=self.complete_only and not final)
        except Exception as exc:  # the database is away for a moment: the instances wait for the next flush
            with self.lock:
                self.waiting = sops + self.waiting
            if final:
                log.warning("FHIR outputs of %d instance(s) not written: %s; their results are committed, and "
                            "`neuron export --format fhir` writes them from the database", len(sops), _reason(exc))
                self.report.failed.append(_reason(exc))
            elif not self.failing:  # once per outage, not every second
                log.warning("FHIR outputs wait: %s; tried again every second", _reason(exc))
            self.failing = True
            return
        self.failing = False
        self.open = left
        self.report.written += done.written
        self.report.failed += done.failed
        del self.report.written[:-1000], self.report.failed[:-1000]  # bounded in a worker that runs for weeks

    def close(self) -> FhirReport:
        """Write what waits, the studies still open as they stand included; stop the thread."""
        self.stopped.set()
        self.thread.join()
        try:
            self._flush(final=True)
        finally:
            self.db.dispose()
        return self.report
