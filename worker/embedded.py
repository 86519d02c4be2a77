"""The embedded default: index a folder, screen it and write results, in one process on one database; and
``rescreen``, the same engine over instances an operator selected.

The same steps the distributed mode splits between producer and workers, overlapped:

    walk (new or changed files) ──► reader processes: header parsed once, FileEntry back, frames into a slot
        ──► admission (worker.admission: entries recorded in walk order, db.add_files) ──► the instances to screen
        ──► Pipeline.run (the staged engine) ──► ResultWriter (one thread, group commits) ──► the database

Indexing streams into screening: the first batch reaches the device while the walk is still going, and each file is
parsed once for both. Every result goes
through the one write path (``db.writer.ResultWriter`` -> ``Database.record_outcomes``), a rescreen's too.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from db.schema import utcnow
from db.store import Database, Summary
from db.studies import study_of
from db.writer import ResultWriter
from neuron.errors import OutputUnwritable
from neuron.settings import Settings
from neuron.work import Outcome, Requeue, Route, Status, WorkItem
from producer.scan import ScanResult, changed_files
from worker.admission import Admit
from worker.ledger import Ledger, committed_by, record_batch
from worker.models import Models
from worker.outputs import open_outputs
from worker.pipeline import Pipeline
from worker.readers import IndexItem, process_context
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
class _Walk:
    """The embedded run's feed: the backlog (instances pending before this run), then every new or changed file of
    the folder as an index request, read by the reader processes in the same pass as its pixels; ``admit`` records
    their entries and says which to screen (``worker.admission``)."""

    folder: Path
    db: Database
    settings: Settings
    routes: list[Route]
    hooks: ProgressHooks
    result: ScanResult = field(default_factory=ScanResult)
    handed: dict[str, str] = field(default_factory=dict)  # SOP Instance UID -> the file it was sent from
    found: int = 0
    ledger: Ledger | None = None  # records the entries in a process of its own; None: this process does

    def items(self, backlog: list[WorkItem]) -> Iterator[WorkItem | IndexItem]:
        self._hand(backlog)
        yield from backlog
        known = self.db.file_index()
        for seq, path in enumerate(changed_files(self.folder, known, [self.settings.out_dir],
                                                 self.settings.follow_links, self.hooks.on_scan, self.result)):
            yield IndexItem(seq, str(path))
        if self.hooks.on_scanned is not None:
            self.hooks.on_scanned(self.result)

    def admit(self, batch: list[tuple[IndexItem, bytes]]) -> list[WorkItem | None]:
        """Record a batch of packed entries in walk order; the instances now pending from these files are screened
        from the frames read with them. A file re-indexed during the run is not sent twice; an instance sent before
        and now pending from another file (a failed first copy, rescued when its copy was indexed) is."""
        packed = [e for _, e in batch]
        pending = self.ledger.admit(packed) if self.ledger is not None else None
        if pending is None:
            pending = record_batch(self.db, packed, self.routes)
        decisions: list[WorkItem | None] = []
        fresh = []
        for w in pending:
            if w is None or self.handed.get(w.sop_instance_uid) == w.file_path:
                decisions.append(None)
                continue
            fresh.append(w)
            decisions.append(w)
        self._hand(fresh)
        return decisions

    def _hand(self, items: list[WorkItem]) -> None:
        self.handed.update((i.sop_instance_uid, i.file_path) for i in items)
        if items:
            self.found += sum(min(i.frames, self.settings.max_frames) for i in items)
            if self.hooks.on_total is not None:
                self.hooks.on_total(self.found)


class _Sink:
    """Hands each outcome to the writer and surfaces a failed commit (a full or read-only database) as an error
    that stops the run: what was committed stays, and a re-run screens the rest. Collects the instances a commit put
    back in line from a duplicate copy (``rescued``) and, for a rescreen, the heatmaps nothing references any more."""

    def __init__(self, writer: ResultWriter, outputs=None, replace: bool = False):
        self.writer, self.count, self._futures = writer, 0, []
        self.outputs = outputs  # worker.outputs.Outputs: told of each committed result (--dicom-out, --fhir-out)
        self.replace = replace
        self.rescued: list[str] = []
        self.stale_heatmaps: set[str] = set()

    def __call__(self, outcome: Outcome) -> None:
        self.batch([outcome])

    def batch(self, outcomes: list[Outcome]) -> None:
        """The outcomes that finished together (a batch's): one submission to the writer."""
        self.count += len(outcomes)
        future = self.writer.submit(outcomes, replace=self.replace)
        future.add_done_callback(self._committed)
        if self.outputs is not None:
            done = [o.sop_instance_uid for o in outcomes if o.status is Status.DONE and o.frames]
            if done:
                future.add_done_callback(lambda f: f.exception() is None and self.outputs.add(done))
        self._futures.append(future)
        if len(self._futures) >= 64:
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


def _screen(pipeline: Pipeline, items: Iterable[WorkItem | IndexItem], sink: _Sink, db: Database,
            progress: Callable[[int], None] | None, admit: Admit | None = None) -> None:
    """Run the pipeline over ``items``, then once more over what the commits put back in line from a duplicate copy
    (each pass uses up one copy per instance, so it ends)."""
    pipeline.run(items, progress=progress, admit=admit, batch_sink=sink.batch)
    sink.check()
    while rescued := sink.take_rescued():
        pipeline.run(db.work_items(sop_uids=rescued), progress=progress, batch_sink=sink.batch)
        sink.check()


def _run_folder(folder: Path, settings: Settings, pipeline: Pipeline | None, hooks: ProgressHooks | None,
                retry_failed: bool) -> RunReport:
    hooks = hooks or ProgressHooks()
    started = utcnow()
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.resolved_database_url)
    try:
        db.create()
        outputs = open_outputs(settings, "run")  # before screening: an unwritable --dicom-out/--fhir-out stops it
        own = pipeline is None  # a pipeline made here is closed here (its reader processes and slots)
        pipeline = pipeline or Pipeline(Models.from_settings(settings, lazy=True), settings)
        models = pipeline.models
        prepare_database(db, models, pipeline.settings, pipeline.heatmap_dir)
        routes = models.available_routes
        db.requeue(Requeue.AWAITING_MODEL, routes=routes)
        if retry_failed:
            db.requeue(Requeue.RETRY_FAILED, routes=routes)
        db.skip_routes_without_model(routes, models.unavailable)
        backlog = db.pending(routes=routes)
        ledger = Ledger(settings.resolved_database_url, routes, process_context())
        walk = _Walk(Path(folder), db, settings, routes, hooks, ledger=ledger)
        try:
            with ResultWriter(db, record=committed_by(ledger, db)) as writer:
                sink = _Sink(writer, outputs)
                _screen(pipeline, walk.items(backlog), sink, db, hooks.on_images, walk.admit)
            db.skip_routes_without_model(routes, models.unavailable)  # routes with no model, found by this walk
        finally:
            ledger.close()
            if outputs is not None:  # the outputs of what was committed, also when the run stopped early
                outputs.close()
            if own:
                pipeline.close()
        return RunReport(walk.result, sink.count, started, db.summary(since=started))
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
    fhir_written: int = 0
    fhir_failed: int = 0


def rescreen(uids: list[str], settings: Settings, pipeline: Pipeline) -> RescreenReport:
    """Screen these instances again in this process: each instance's results are replaced in one transaction through
    the result writer (``replace``), and the heatmaps nothing references any more are removed after the commit.
    Instances unreadable for now keep their old results. DICOM outputs are rewritten when ``--dicom-out`` is set, the
    studies' FHIR Bundles when ``--fhir-out`` is."""
    db = Database(settings.resolved_database_url)
    try:
        outputs = None
        if settings.dicom_out is not None:  # checked before screening: an unwritable folder stops here
            from worker.dicom_out import DicomWriter

            outputs = DicomWriter(settings, db)
        fhir = None
        if settings.fhir_out is not None:  # likewise
            from worker.fhir_out import FhirWriter

            fhir = FhirWriter(settings, db, "rescreen")
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
        done = [o.sop_instance_uid for o in final if o.status is Status.DONE]
        if outputs is not None:  # the new results' DICOM outputs replace the old ones (same files, new UIDs)
            written = outputs.write_for_instances(done)
            report.dicom_written, report.dicom_failed = len(written.written), len(written.failed)
        if fhir is not None and done:  # and their studies' Bundles (same files)
            try:
                with db.engine.connect() as conn:
                    studies = set(study_of(conn, done).values())
                bundles, _ = fhir.write(studies)
                report.fhir_written, report.fhir_failed = len(bundles.written), len(bundles.failed)
            except Exception as exc:  # the new results are committed; only the files are missing
                log.warning("FHIR Bundles of the rescreened studies not written: %s; `neuron export --format fhir` "
                            "writes them from the database", exc)
                report.fhir_failed = 1
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
