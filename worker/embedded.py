"""The embedded default: index a folder, screen it and write results, in one process on one database.

The same steps the distributed mode splits between producer and workers, overlapped:

    walk + index (a thread: ``producer.scan.index_folder``) ──► instances pending, a committed batch at a time
        ──► Engine.run (the staged engine) ──► ResultWriter (one thread, group commits) ──► the database

Indexing streams into screening: the first batch reaches the device while the walk is still going.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from db.schema import Status, utcnow
from db.store import Database, Outcome, Summary, WorkItem
from db.writer import ResultWriter
from neuron.errors import OutputUnwritable
from neuron.routes import Route
from neuron.settings import Settings
from producer.scan import ScanResult, index_folder
from worker.engine import Engine

log = logging.getLogger(__name__)


@dataclass
class RunReport:
    scan: ScanResult
    screened: int
    started_at: datetime
    summary: Summary


@dataclass
class ProgressHooks:
    """Callbacks a front end (the CLI's progress bar) may set; all optional. ``on_total`` is called with the number
    of frames found to screen so far, each time it grows; ``on_scanned`` once the walk has ended."""

    on_scan: Callable[[int], None] | None = None
    on_total: Callable[[int], None] | None = None
    on_images: Callable[[int], None] | None = None
    on_scanned: Callable[[ScanResult], None] | None = None


@dataclass
class _Indexer:
    """Walks and indexes in a thread; hands out each committed batch's newly pending instances."""

    folder: Path
    db: Database
    settings: Settings
    routes: list[str]
    hooks: ProgressHooks
    batches: queue.Queue = field(default_factory=lambda: queue.Queue(maxsize=64))
    result: ScanResult | None = None
    error: BaseException | None = None

    def start(self) -> None:
        threading.Thread(target=self._walk, name="indexer", daemon=True).start()

    def _walk(self) -> None:
        try:
            override = Route(self.settings.route_override) if self.settings.route_override else None
            self.result = index_folder(self.folder, self.db, exclude=[self.settings.out_dir],
                                       batch=64, on_file=self.hooks.on_scan, route_override=override,
                                       follow_links=self.settings.follow_links,
                                       patient_secret=self.settings.patient_key,
                                       on_indexed=lambda paths: self.batches.put(list(paths)))
            if self.hooks.on_scanned is not None:
                self.hooks.on_scanned(self.result)
        except BaseException as exc:
            self.error = exc
        finally:
            self.batches.put(None)

    def items(self, backlog: list[WorkItem]) -> Iterator[WorkItem]:
        """The backlog (instances pending before this walk), then what the walk indexes, as it indexes it."""
        handed = {i.sop_instance_uid for i in backlog}  # a changed file re-indexed during the walk is not sent twice
        found = self._found(0, backlog)
        yield from backlog
        while (paths := self.batches.get()) is not None:
            fresh = [i for i in self.db.pending(routes=self.routes, paths=paths) if i.sop_instance_uid not in handed]
            found = self._found(found, fresh)
            yield from fresh
        if self.error is not None:
            raise self.error

    def _found(self, found: int, items: list[WorkItem]) -> int:
        if items:
            found += sum(min(i.frames, self.settings.max_frames) for i in items)
            if self.hooks.on_total is not None:
                self.hooks.on_total(found)
        return found


class _Sink:
    """Hands each outcome to the writer and surfaces a failed commit (a full or read-only database) as an error
    that stops the run: what was committed stays, and a re-run screens the rest."""

    def __init__(self, writer: ResultWriter, dicom=None):
        self.writer, self.count, self._futures = writer, 0, []
        self.dicom = dicom  # worker.dicom_out.BackgroundOutputs: told of each committed result (--dicom-out)

    def __call__(self, outcome: Outcome) -> None:
        self.count += 1
        future = self.writer.submit([outcome])
        if self.dicom is not None and outcome.status is Status.DONE and outcome.frames:
            uid = outcome.sop_instance_uid
            future.add_done_callback(lambda f: f.exception() is None and self.dicom.add([uid]))
        self._futures.append(future)
        if len(self._futures) >= 256:
            self.check(wait=False)

    def check(self, wait: bool = True) -> None:
        if wait:
            self.writer.flush()
        keep = []
        for fut in self._futures:
            if not fut.done():
                keep.append(fut)
            elif fut.exception() is not None:
                raise fut.exception()
        self._futures = keep


def _database_error(exc: BaseException) -> DBAPIError | None:
    """The SQLAlchemy error behind ``exc`` (itself, or a cause in its chain), if any."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, DBAPIError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _unwritable(url: str, exc: DBAPIError) -> OutputUnwritable:
    """A refused write, translated at the boundary: names the database, what SQLite said and the fix."""
    parsed = make_url(url)
    where = parsed.database if parsed.get_backend_name() == "sqlite" else parsed.render_as_string(hide_password=True)
    said = str(getattr(exc, "orig", exc))
    if "readonly" in said or "read-only" in said or "unable to open" in said:
        fix = (f"make {where}, its folder and its -wal/-shm files writable by this user (or mount the volume "
               f"read-write)")
    elif "full" in said or "No space" in said:
        fix = f"free space on the volume that holds {where}, or point --db / NEURON_DATABASE_URL at one with room"
    else:
        fix = f"check that {where} is a writable, healthy database"
    return OutputUnwritable(f"the results database {where} refused a write ({said}); the run stopped. Results "
                            f"committed so far are kept: {fix}, then run the same command again to screen the rest")


def _dicom_outputs(settings: Settings):
    """The DICOM output processes when --dicom-out is set (highdicom is only imported then), else None."""
    if settings.dicom_out is None:
        return None
    from worker.dicom_out import BackgroundOutputs

    return BackgroundOutputs(settings)


def run_folder(folder: Path, settings: Settings, engine: Engine | None = None,
               hooks: ProgressHooks | None = None, retry_failed: bool = False) -> RunReport:
    """Index FOLDER while screening every instance still to do: new ones, ones skipped earlier because their route
    had no model and now has one, and (``retry_failed``) failed ones. A database that refuses writes (read-only, full)
    stops the run with ``OutputUnwritable``; what was committed stays."""
    try:
        return _run_folder(folder, settings, engine, hooks, retry_failed)
    except Exception as exc:
        cause = _database_error(exc)
        if cause is None:
            raise
        raise _unwritable(settings.resolved_database_url, cause) from exc


def _run_folder(folder: Path, settings: Settings, engine: Engine | None, hooks: ProgressHooks | None,
                retry_failed: bool) -> RunReport:
    hooks = hooks or ProgressHooks()
    started = utcnow()
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.resolved_database_url)
    try:
        db.create()
        dicom = _dicom_outputs(settings)  # before screening: an unwritable --dicom-out stops the run early
        engine = engine or Engine.from_settings(settings, lazy=True)
        for lr in engine.routes.values():
            db.ensure_config(lr.spec.config_hash, lr.spec.model, lr.spec.as_dict())
        engine.on_load = lambda lr: db.ensure_config(lr.spec.config_hash, lr.spec.model, lr.spec.as_dict())
        routes = [r.value for r in engine.available_routes]
        unavailable = {r.value: why for r, why in engine.unavailable.items()}
        db.reset_to_pending(awaiting_model=routes, failed=retry_failed)
        db.skip_routes_without_model(routes, unavailable)
        backlog = db.pending(routes=routes)
        indexer = _Indexer(Path(folder), db, settings, routes, hooks)
        indexer.start()
        try:
            with ResultWriter(db) as writer:
                sink = _Sink(writer, dicom)
                engine.run(indexer.items(backlog), sink, progress=hooks.on_images)
                sink.check()
                # A corrupt first copy must not hide a good duplicate: those get one more pass, from the other file.
                while db.retry_failed_from_duplicates():
                    engine.run(db.pending(routes=routes), sink, progress=hooks.on_images)
                    sink.check()
            db.skip_routes_without_model(routes, unavailable)  # instances of routes with no model, found by this walk
        finally:
            if dicom is not None:  # the outputs of what was committed, also when the run stopped early
                dicom.close()
        return RunReport(indexer.result or ScanResult(), sink.count, started, db.summary(since=started))
    finally:
        db.dispose()
