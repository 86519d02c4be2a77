"""The embedded default: index a folder, screen it and write results, in one process on one database; and
``rescreen``, the same engine over instances an operator selected.

The same steps the distributed mode splits between producer and workers, overlapped:

    walk + index (a thread: ``producer.scan.index_folder``) ──► instances pending, a committed batch at a time
        ──► Pipeline.run (the staged engine) ──► ResultWriter (one thread, group commits) ──► the database

Indexing streams into screening: the first batch reaches the device while the walk is still going. Every result goes
through the one write path (``db.writer.ResultWriter`` -> ``Database.record_outcomes``), a rescreen's too.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from db.schema import utcnow
from db.store import Database, Summary
from db.writer import ResultWriter
from neuron.errors import OutputUnwritable
from neuron.settings import Settings
from neuron.work import Outcome, Requeue, Route, Status, WorkItem
from producer.scan import ScanResult, index_folder
from worker.models import Models
from worker.pipeline import Pipeline
from worker.results import prepare_database

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
    routes: list[Route]
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
                                       policy=self.settings.population_policy,
                                       on_indexed=lambda paths: self.batches.put(list(paths)))
            if self.hooks.on_scanned is not None:
                self.hooks.on_scanned(self.result)
        except BaseException as exc:
            self.error = exc
        finally:
            self.batches.put(None)

    def items(self, backlog: list[WorkItem]) -> Iterator[WorkItem]:
        """The backlog (instances pending before this walk), then what the walk indexes, as it indexes it. A file
        re-indexed during the walk is not sent twice; an instance sent before and now pending from another file (a
        failed first copy, rescued when its copy was indexed) is."""
        handed = {i.sop_instance_uid: i.file_path for i in backlog}
        found = self._found(0, backlog)
        yield from backlog
        while (paths := self.batches.get()) is not None:
            fresh = [i for i in self.db.pending(routes=self.routes, paths=paths)
                     if handed.get(i.sop_instance_uid) != i.file_path]
            handed.update((i.sop_instance_uid, i.file_path) for i in fresh)
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
    that stops the run: what was committed stays, and a re-run screens the rest. Collects the instances a commit put
    back in line from a duplicate copy (``rescued``) and, for a rescreen, the heatmaps nothing references any more."""

    def __init__(self, writer: ResultWriter, dicom=None, replace: bool = False):
        self.writer, self.count, self._futures = writer, 0, []
        self.dicom = dicom  # worker.dicom_out.BackgroundOutputs: told of each committed result (--dicom-out)
        self.replace = replace
        self.rescued: list[str] = []
        self.stale_heatmaps: set[str] = set()

    def __call__(self, outcome: Outcome) -> None:
        self.count += 1
        future = self.writer.submit([outcome], replace=self.replace)
        future.add_done_callback(self._committed)
        if self.dicom is not None and outcome.status is Status.DONE and outcome.frames:
            uid = outcome.sop_instance_uid
            future.add_done_callback(lambda f: f.exception() is None and self.dicom.add([uid]))
        self._futures.append(future)
        if len(self._futures) >= 256:
            self.check(wait=False)

    def _committed(self, future) -> None:
        if future.exception() is None:
            committed = future.result()
            self.rescued.extend(committed.rescued)
            self.stale_heatmaps |= committed.stale_heatmaps

    def take_rescued(self) -> list[str]:
        rescued, self.rescued = self.rescued, []
        return rescued

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


def run_folder(folder: Path, settings: Settings, pipeline: Pipeline | None = None,
               hooks: ProgressHooks | None = None, retry_failed: bool = False) -> RunReport:
    """Index FOLDER while screening every instance still to do: new ones, ones skipped earlier because their route
    had no model and now has one, and (``retry_failed``) failed ones. ``pipeline``: the engine to screen with
    (default: one over lazily loaded models). A database that refuses writes (read-only, full) stops the run with
    ``OutputUnwritable``; what was committed stays."""
    try:
        return _run_folder(folder, settings, pipeline, hooks, retry_failed)
    except Exception as exc:
        cause = _database_error(exc)
        if cause is None:
            raise
        raise _unwritable(settings.resolved_database_url, cause) from exc


def _screen(pipeline: Pipeline, items: Iterable[WorkItem], sink: _Sink, db: Database,
            progress: Callable[[int], None] | None) -> None:
    """Run the pipeline over ``items``, then once more over what the commits put back in line from a duplicate copy
    (each pass uses up one copy per instance, so it ends)."""
    pipeline.run(items, sink, progress=progress)
    sink.check()
    while rescued := sink.take_rescued():
        pipeline.run(db.work_items(sop_uids=rescued), sink, progress=progress)
        sink.check()


def _run_folder(folder: Path, settings: Settings, pipeline: Pipeline | None, hooks: ProgressHooks | None,
                retry_failed: bool) -> RunReport:
    hooks = hooks or ProgressHooks()
    started = utcnow()
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.resolved_database_url)
    try:
        db.create()
        dicom = _dicom_outputs(settings)  # before screening: an unwritable --dicom-out stops the run early
        pipeline = pipeline or Pipeline(Models.from_settings(settings, lazy=True), settings)
        models = pipeline.models
        prepare_database(db, models, pipeline.settings, pipeline.heatmap_dir)
        routes = models.available_routes
        db.requeue(Requeue.AWAITING_MODEL, routes=routes)
        if retry_failed:
            db.requeue(Requeue.RETRY_FAILED, routes=routes)
        db.skip_routes_without_model(routes, models.unavailable)
        backlog = db.pending(routes=routes)
        indexer = _Indexer(Path(folder), db, settings, routes, hooks)
        indexer.start()
        try:
            with ResultWriter(db) as writer:
                sink = _Sink(writer, dicom)
                _screen(pipeline, indexer.items(backlog), sink, db, hooks.on_images)
            db.skip_routes_without_model(routes, models.unavailable)  # routes with no model, found by this walk
        finally:
            if dicom is not None:  # the outputs of what was committed, also when the run stopped early
                dicom.close()
        return RunReport(indexer.result or ScanResult(), sink.count, started, db.summary(since=started))
    finally:
        db.dispose()


@dataclass
class RescreenReport:
    selected: int
    screened: int  # instances whose results were replaced
    without_route: int
    left_pending: int  # unreadable for now: left as they were
    failed: int
    heatmaps_removed: int
    dicom_written: int = 0
    dicom_failed: int = 0


def rescreen(uids: list[str], settings: Settings, pipeline: Pipeline) -> RescreenReport:
    """Screen these instances again in this process: each instance's results are replaced in one transaction through
    the result writer (``replace``), and the heatmaps nothing references any more are removed after the commit.
    Instances unreadable for now keep their old results. DICOM outputs are rewritten when ``--dicom-out`` is set."""
    db = Database(settings.resolved_database_url)
    try:
        outputs = None
        if settings.dicom_out is not None:  # checked before screening: an unwritable folder stops here
            from worker.dicom_out import DicomWriter

            outputs = DicomWriter(settings, db)
        prepare_database(db, pipeline.models, pipeline.settings, pipeline.heatmap_dir)
        items = db.work_items(statuses=None, sop_uids=uids)
        outcomes: list[Outcome] = []
        pipeline.run(iter(items), outcomes.append)
        final = [o for o in outcomes if o.status is not Status.PENDING]
        with ResultWriter(db) as writer:
            sink = _Sink(writer, replace=True)
            for outcome in final:
                sink(outcome)
            sink.check()
        removed = remove_heatmaps(settings, sink.stale_heatmaps)
        report = RescreenReport(len(uids), len(final), len(uids) - len(items), len(outcomes) - len(final),
                                sum(1 for o in final if o.status is Status.FAILED), removed)
        if outputs is not None:  # the new results' DICOM outputs replace the old ones (same files, new UIDs)
            written = outputs.write_for_instances([o.sop_instance_uid for o in final if o.status is Status.DONE])
            report.dicom_written, report.dicom_failed = len(written.written), len(written.failed)
        return report
    finally:
        db.dispose()


def remove_heatmaps(settings: Settings, paths: Iterable[str]) -> int:
    """Delete heatmap files by their stored (shared) names; returns how many were there."""
    removed = 0
    for p in paths:
        try:
            Path(settings.to_local(p)).unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed
