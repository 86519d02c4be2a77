"""The database behind one narrow interface: the producer indexes through it, the engine's results land through it.

Writes are upserts on natural keys (files by path, instances by SOP Instance UID, predictions by
instance/frame/model/weights/label), so running the same work twice never adds or changes rows.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import ParamSpec, TypeVar

from sqlalchemy import bindparam, create_engine, delete, event, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from db.migrate import upgrade
from db.schema import FileRecord, HeatmapFolder, Instance, PipelineConfig, Prediction, Study, chunks, utcnow
from db.studies import refresh_studies, study_of
from neuron.errors import RetryableError
from neuron.work import (
    GATING_COLUMNS,
    HEADER_COLUMNS,
    POSITIVE,
    FileEntry,
    Outcome,
    Requeue,
    Route,
    Status,
    WorkItem,
    sources_of,
    study_status,
)

P = ParamSpec("P")
R = TypeVar("R")


@dataclass
class Summary:
    files: Counter[str] = field(default_factory=Counter)
    top_findings: list[tuple[str, int]] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class Committed:
    """What one results commit did besides writing the rows: instances put back in line from a duplicate copy
    (a failure recorded for an instance another file also holds), and heatmap files that no row references any more
    (the old results of replaced instances), for the caller to delete after the commit."""

    written: int = 0
    rescued: tuple[str, ...] = ()
    stale_heatmaps: frozenset[str] = frozenset()


def retryable(exc: BaseException, what: str = "the database operation failed") -> BaseException:
    """A connection-level database error as the project's ``RetryableError`` (the cause kept: the embedded run tells a
    full or read-only SQLite file from an outage by it); any other error unchanged."""
    if isinstance(exc, OperationalError) or (isinstance(exc, DBAPIError) and exc.connection_invalidated):
        error = RetryableError(f"{what}, the database is not reachable: {getattr(exc, 'orig', exc)}; it is tried "
                               "again")
        error.__cause__ = exc
        return error
    return exc


def _mapped(what: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Database errors leave ``db`` as the project's exceptions: callers (the Celery task, the producer) handle
    ``RetryableError`` and never see SQLAlchemy's types. ``what`` says what failed, for the message."""

    def decorate(method: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(method)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            try:
                return method(*args, **kwargs)
            except DBAPIError as exc:
                mapped = retryable(exc, what)
                if mapped is exc:
                    raise
                raise mapped from exc

        return wrapper

    return decorate


SQLITE_BUSY_TIMEOUT_MS = 30_000


def _sqlite_pragmas(dbapi_conn, _record) -> None:  # pragma: no cover - trivial
    """WAL lets readers (``neuron status``, the views) work while the writer commits; ``synchronous=NORMAL`` is
    durable across application crashes in WAL mode (a power loss may lose the last commits, which are redone: the
    instances are still queued); the busy timeout makes a second writer wait for the lock instead of failing."""
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _owner_files(sop_uids: Sequence[str]):
    """The file each instance is screened from (not its ``duplicate`` copies, not a corrupt first copy it was moved
    away from): the one whose ``ingest_status`` row follows the instance's status."""
    return select(Instance.file_id).where(Instance.sop_instance_uid.in_(sop_uids))


PREDICTION_COLUMNS = ("sop_instance_uid", "frame", "model", "weights", "label", "probability", "uncertainty", "rank",
                      "heatmap_path", "config_hash", "untrained", "worker", "needs_review", "processed_at", "decoder",
                      "ood_score", "out_of_distribution")
_NATURAL_KEY = ("sop_instance_uid", "frame", "model", "weights", "label")
_HEATMAP, _WORKER, _DECODER = (PREDICTION_COLUMNS.index(c) for c in ("heatmap_path", "worker", "decoder"))


def prediction_rows(outcomes: Sequence[Outcome], stamp: object) -> dict[tuple, tuple]:
    """The predictions rows of these outcomes (tuples in ``PREDICTION_COLUMNS`` order, ``stamp`` as processed_at) by
    natural key, the last one winning as in sequential upserts: a multi-row ON CONFLICT DO UPDATE must not touch a row
    twice (a redelivered study may share a group commit with its first delivery)."""
    return {(o.sop_instance_uid, fr.frame, fr.model, fr.weights, sc.label):
            (o.sop_instance_uid, fr.frame, fr.model, fr.weights, sc.label, sc.probability, sc.uncertainty, sc.rank,
             sc.heatmap_path, fr.config_hash, fr.untrained, o.worker, sc.needs_review, stamp, fr.decoder,
             fr.ood_score, fr.out_of_distribution)
            for o in outcomes for fr in o.frames for sc in fr.scores}


def _upsert_sql(values: str) -> str:
    updated = [c for c in PREDICTION_COLUMNS if c not in _NATURAL_KEY]
    return (f"INSERT INTO predictions ({', '.join(PREDICTION_COLUMNS)}) VALUES {values} "
            f"ON CONFLICT ({', '.join(_NATURAL_KEY)}) DO UPDATE SET "
            + ", ".join(f"{c} = excluded.{c}" for c in updated))


def _copy_predictions(dbapi_conn, rows: list[tuple]) -> None:
    """Append predictions rows with PostgreSQL's COPY, as CSV written by the ``csv`` module: a row costs a third of
    the interpreter time of ``execute_values``'s per-row ``mogrify`` (0.10 against 0.29 ms of CPU per image of 18
    rows, measured on the bench's 2-core machine), and the server parses less. Floats go as ``repr``, which reads
    back to the same double; None as an unquoted empty field, which COPY's CSV format reads as NULL (so would an
    empty string: the caller upserts rows holding one). A row whose key exists fails the whole COPY
    (``uq_prediction_natural_key``): the caller then upserts."""
    import csv
    import io

    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    buffer.seek(0)
    with dbapi_conn.cursor() as cursor:
        cursor.copy_expert(f"COPY predictions ({', '.join(PREDICTION_COLUMNS)}) FROM STDIN WITH (FORMAT csv)",
                           buffer)


def _finished_elsewhere(conn: Connection, uids: Iterable[str], replace: list[str]) -> set[str]:
    """Of these instances, those already ``done`` that ``replace`` does not name. A claim skips finished instances, so
    only a worker whose claim outlived a partition or the visibility timeout, while another redid the study, gets
    here: its results (equal within float32 rounding, from another batch) must not overwrite findings already
    reported, nor its failure undo them. A rescreen names what it replaces. The rows are read, not locked: locking
    them (SELECT ... FOR UPDATE) left a worker's commit waiting for good behind a SIGKILLed worker's transaction
    (test_a_worker_killed_mid_batch_loses_nothing); two commits of one instance at the same moment still write one
    row each per key (the upsert), the later one's."""
    keep, found = set(replace), set()
    for chunk in chunks(sorted(set(uids) - keep)):
        found.update(uid for uid, status in conn.execute(_STATUS_OF, {"b_uids": chunk}) if status == Status.DONE.value)
    return found


# Built once, the lists rendered per execution: statements built per call were a fifth of the writer thread's
# interpreter time (_STATUS_OF) and a third of a worker's claim thread's (claim) in the host-only bench's samples.
_STATUS_OF = select(Instance.sop_instance_uid, Instance.status).where(
    Instance.sop_instance_uid.in_(bindparam("b_uids", expanding=True)))
_CLAIMABLE = (select(Instance.sop_instance_uid, FileRecord.path, Instance.route, Instance.frames, Instance.attempts)
              .join(FileRecord, FileRecord.id == Instance.file_id)
              .where(Instance.sop_instance_uid.in_(bindparam("b_uids", expanding=True)),
                     Instance.status.in_([Status.QUEUED.value, Status.PENDING.value])))
_COUNT_ATTEMPT = (update(Instance).where(Instance.sop_instance_uid.in_(bindparam("b_uids", expanding=True)))
                  .values(attempts=Instance.attempts + 1, updated_at=bindparam("b_now")))


class Database:
    def __init__(self, url: str):
        self.url = url
        self.engine: Engine = create_engine(url, future=True, pool_pre_ping=True)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._outcome_stmts = None
        self._index_stmts = None
        self._study_stmt = None
        self._stamp_processor = None

    def session(self) -> Session:
        return self._sessions()

    def create(self) -> None:
        """Bring the schema to the newest migration and (re)create the public views."""
        try:
            upgrade(self.engine)
        except OperationalError as exc:
            raise RetryableError(f"database {self.engine.url.render_as_string(hide_password=True)} "
                                 f"is not reachable: {exc.orig}") from exc

    def dispose(self) -> None:
        self.engine.dispose()

    # -- upsert helper ---------------------------------------------------------------------------------------------
    def _insert(self, table):
        if self.engine.dialect.name == "postgresql":
            return postgresql.insert(table)
        return sqlite.insert(table)

    # -- producer side ---------------------------------------------------------------------------------------------
    def file_index(self) -> dict[str, tuple[int, int]]:
        """Every indexed path with the (size, mtime_ns) it had, for skipping unchanged files on a re-scan."""
        with self.session() as s:
            return {p: (size, mt) for p, size, mt in s.execute(select(FileRecord.path, FileRecord.size,
                                                                      FileRecord.mtime_ns))}

    @_mapped("the files could not be indexed")
    def add_files(self, entries: Sequence[FileEntry]) -> list[str]:
        """Record a batch of scanned files and their instances. A SOP Instance UID already known at another path
        makes the file a ``duplicate``; a changed file is re-indexed and its instance screened again
        (``Requeue.CHANGED_FILE``). Returns the SOP Instance UIDs put back in line from a duplicate copy found by this
        batch (``_rescue_from_copies``).

        Statuses are decided here in order, as sequential upserts would (the first path of a SOP Instance UID owns
        it), then the batch is written as two multi-row upserts built once per Database: one round trip per page
        instead of two per file (a 50,000-file first scan went from ~800 to several thousand files/s)."""
        if not entries:
            return []
        now = utcnow()
        file_upsert, instance_upsert = self._index_statements()
        with self.engine.begin() as conn:
            owners: dict[str, str] = {}
            for chunk in chunks(e.sop_instance_uid for e in entries if e.sop_instance_uid):
                owners.update(conn.execute(
                    select(Instance.sop_instance_uid, FileRecord.path)
                    .join(FileRecord, FileRecord.id == Instance.file_id)
                    .where(Instance.sop_instance_uid.in_(chunk))).all())
            files: dict[str, dict] = {}
            instances: dict[str, tuple[str, dict]] = {}
            copies: list[str] = []
            for e in entries:
                status, reason, inst = e.status, e.reason, e.instance
                owner = owners.get(e.sop_instance_uid) if e.sop_instance_uid else None
                if inst is not None and owner is not None and owner != e.path:
                    status, reason, inst = Status.DUPLICATE, f"same SOP Instance UID as {owner}; processed once", None
                    copies.append(e.sop_instance_uid)
                files[e.path] = {"path": e.path, "size": e.size, "mtime_ns": e.mtime_ns,
                                 "sop_instance_uid": e.sop_instance_uid, "status": status.value, "reason": reason,
                                 "seen_at": now}
                if inst is None:
                    continue
                irow = inst.header.row()
                irow.update(route=inst.route.value if inst.route else None, reason=inst.reason,
                            status=inst.status.value, updated_at=now, **inst.gating_row())
                instances[inst.header.sop_instance_uid] = (e.path, irow)
                owners[inst.header.sop_instance_uid] = e.path
            file_ids = {path: file_id for file_id, path in conn.execute(file_upsert, list(files.values()))}
            if instances:
                conn.execute(instance_upsert,
                             [{**irow, "file_id": file_ids[path]} for path, irow in instances.values()])
                studies = {e.instance.study.study_instance_uid: e.instance.study for e in entries
                           if e.instance is not None and e.instance.study is not None
                           and e.instance.header.sop_instance_uid in instances}
                if studies:
                    conn.execute(self._study_upsert(), [{**h.row(), "updated_at": now} for h in studies.values()])
                refresh_studies(conn, {irow["study_instance_uid"] for _, irow in instances.values()}, now)
            # a copy of an instance that already failed (a truncated copy indexed first): screened from this copy
            return _rescue_from_copies(conn, copies) if copies else []

    def _study_upsert(self):
        """A study's header facts: a value an instance of it has wins over one it lacks (instances of one study
        normally agree; a later scan fills what an earlier one did not have). Built once per Database."""
        if self._study_stmt is None:
            self._study_stmt = self._build_study_upsert()
        return self._study_stmt

    def _build_study_upsert(self):
        studies = Study.__table__
        upsert = self._insert(studies)
        return upsert.on_conflict_do_update(
            index_elements=["study_instance_uid"],
            set_={**{c: func.coalesce(upsert.excluded[c], studies.c[c]) for c in (
                "study_date", "accession_number", "study_description", "patient_key")},
                "updated_at": upsert.excluded.updated_at})

    @_mapped("the studies' summaries could not be updated")
    def refresh_studies(self, study_uids: Iterable[str]) -> None:
        """Recompute the results summary of these studies (after a purge changed their predictions)."""
        with self.engine.begin() as conn:
            refresh_studies(conn, study_uids)

    def _index_statements(self):
        """The files and instances upserts of ``add_files``, built once per Database so SQLAlchemy compiles each once.
        RETURNING makes an executemany go out as multi-VALUES pages on both dialects ("insertmanyvalues")."""
        if self._index_stmts is None:
            files, instances = FileRecord.__table__, Instance.__table__
            file_upsert = self._insert(files)
            file_upsert = file_upsert.on_conflict_do_update(
                index_elements=["path"],
                set_={c: file_upsert.excluded[c] for c in ("size", "mtime_ns", "sop_instance_uid", "status", "reason",
                                                           "seen_at")}
            ).returning(files.c.id, files.c.path)
            instance_upsert = self._insert(instances)
            instance_upsert = instance_upsert.on_conflict_do_update(
                index_elements=["sop_instance_uid"],
                set_={c: instance_upsert.excluded[c] for c in (*HEADER_COLUMNS, *GATING_COLUMNS, "route", "reason",
                                                               "status", "file_id", "updated_at")}
            ).returning(instances.c.sop_instance_uid)
            self._index_stmts = (file_upsert, instance_upsert)
        return self._index_stmts

    # -- work ------------------------------------------------------------------------------------------------------
    @_mapped("the work to screen could not be read")
    def work_items(self, *, statuses: Iterable[Status] | None = (Status.PENDING,),
                   routes: Iterable[Route] | None = None, sop_uids: Iterable[str] | None = None,
                   paths: Iterable[str] | None = None) -> list[WorkItem]:
        """The one query for instances to screen, study by study: those in ``statuses`` (None: any status; only
        instances with a route can be screened), of these routes, UIDs or file paths (each a bounded IN list)."""
        q = (select(Instance.study_instance_uid, Instance.sop_instance_uid, FileRecord.path, Instance.route,
                    Instance.frames)
             .join(FileRecord, FileRecord.id == Instance.file_id)
             .where(Instance.route.is_not(None))
             .order_by(Instance.study_instance_uid, Instance.sop_instance_uid))
        if statuses is not None:
            q = q.where(Instance.status.in_([Status(s).value for s in statuses]))
        if routes is not None:
            q = q.where(Instance.route.in_([Route(r).value for r in routes]))
        with self.session() as s:
            if sop_uids is None and paths is None:
                rows = s.execute(q).all()
            else:
                if sop_uids is not None and paths is not None:
                    raise ValueError("select work by SOP Instance UIDs or by file paths, not both")
                column, keys = (Instance.sop_instance_uid, sop_uids) if sop_uids is not None else \
                    (FileRecord.path, paths)
                rows = sorted(r for chunk in chunks(keys) for r in s.execute(q.where(column.in_(chunk))).all())
        return [WorkItem(uid, path, route, frames) for _, uid, path, route, frames in rows]

    def pending(self, routes: Iterable[Route] | None = None, paths: Iterable[str] | None = None) -> list[WorkItem]:
        """Instances waiting to be screened (of these routes, or files), study by study."""
        return self.work_items(routes=routes, paths=paths)

    @_mapped("the pending instances could not be read")
    def pending_by_study(self, routes: Iterable[Route], study_uids: set[str] | None = None
                         ) -> list[tuple[str, Route, str]]:
        """(study, route, SOP Instance UID) of every pending instance of these routes (and studies)."""
        q = (select(Instance.study_instance_uid, Instance.route, Instance.sop_instance_uid)
             .where(Instance.status == Status.PENDING.value, Instance.route.in_([Route(r).value for r in routes]))
             .order_by(Instance.study_instance_uid, Instance.sop_instance_uid))
        with self.session() as s:
            if study_uids is None:
                rows = s.execute(q).all()
            else:
                rows = [r for chunk in chunks(sorted(study_uids))
                        for r in s.execute(q.where(Instance.study_instance_uid.in_(chunk))).all()]
        return [(study, Route(route), uid) for study, route, uid in rows]

    @_mapped("the queued instances could not be read")
    def queued_before(self, routes: Iterable[Route], before: datetime, limit: int
                      ) -> dict[str, tuple[Route, str, datetime]]:
        """SOP Instance UID -> (route, study, last change) of at most ``limit`` instances of these routes queued and
        unchanged since ``before`` (neither sent nor claimed since): the candidates for a lost message."""
        q = (select(Instance.sop_instance_uid, Instance.route, Instance.study_instance_uid, Instance.updated_at)
             .where(Instance.status == Status.QUEUED.value, Instance.updated_at < before,
                    Instance.route.in_([Route(r).value for r in routes]))
             .order_by(Instance.updated_at).limit(limit))
        with self.session() as s:
            return {uid: (Route(route), study, at) for uid, route, study, at in s.execute(q).all()}

    @_mapped("the instances could not be marked queued")
    def mark_queued(self, uids: Sequence[str]) -> None:
        """Sent to the broker (committed before the message goes out: a crash between leaves them queued, and
        ``neuron scan --requeue`` sends them again)."""
        with self.engine.begin() as conn:
            for chunk in chunks(uids):
                conn.execute(update(Instance).where(Instance.sop_instance_uid.in_(chunk),
                                                    Instance.status == Status.PENDING.value)
                             .values(status=Status.QUEUED.value, updated_at=utcnow()))

    @_mapped("the study's instances could not be claimed")
    def claim(self, uids: Sequence[str], max_attempts: int) -> list[WorkItem]:
        """Take queued instances for screening: count the attempt, and fail those that already took the worker
        down ``max_attempts`` times (a poison message must not block a queue). Finished instances are skipped, so
        a redelivered message does no work twice."""
        items = []
        with self.engine.begin() as conn:
            rows = [r for chunk in chunks(uids) for r in conn.execute(_CLAIMABLE, {"b_uids": chunk}).all()]
            poisoned = []
            for uid, path, route, frames, attempts in rows:
                if attempts >= max_attempts:
                    reason = (f"screening was interrupted {attempts} times (worker crash or lost connection) and "
                              f"the limit is {max_attempts}; check the file and the worker logs, then run `neuron "
                              f"scan FOLDER --retry-failed` to try again")
                    _set_status(conn, [uid], Status.FAILED, reason)
                    poisoned.append(uid)
                    continue
                items.append(WorkItem(uid, path, route, frames))
            now = utcnow()
            for chunk in chunks([item.sop_instance_uid for item in items]):  # one statement per chunk, not per row
                conn.execute(_COUNT_ATTEMPT, {"b_uids": chunk, "b_now": now})
            if poisoned:
                _rescue_from_copies(conn, poisoned)  # another copy of the file gets its own attempts
        return items

    @_mapped("the instances without a model could not be marked skipped")
    def skip_routes_without_model(self, available: Iterable[Route], reason_for: dict[Route, str]) -> int:
        """Pending instances whose route has no model are skipped, with a reason, never dropped."""
        available = [Route(r).value for r in available]
        n = 0
        with self.engine.begin() as conn:
            routes = conn.execute(select(Instance.route).where(Instance.status == Status.PENDING.value,
                                                               Instance.route.not_in(available)).distinct()).scalars()
            for route in [Route(r) for r in routes]:
                reason = reason_for.get(route, f"no model is available for route '{route.value}'")
                uids = list(conn.execute(select(Instance.sop_instance_uid).where(
                    Instance.status == Status.PENDING.value, Instance.route == route.value)).scalars())
                n += len(uids)
                _set_status(conn, uids, Status.SKIPPED, reason)
        return n

    @_mapped("the instances could not be put back in line")
    def requeue(self, operation: Requeue, *, sop_uids: Iterable[str] | None = None,
                routes: Iterable[Route] | None = None) -> list[str]:
        """Put instances back to ``pending`` by one of the named operations (``neuron.work.Requeue``): those in the
        operation's from-statuses (of these UIDs and routes; at least one of the two for a rescreen). Only the
        operator's requests (retry-failed, rescreen) restart the attempt count; a requeue must not wipe the count
        that stops a poison message. Returns the SOP Instance UIDs put back in line."""
        if operation is Requeue.DUPLICATE_COPY:
            with self.engine.begin() as conn:
                return _rescue_from_copies(conn, sop_uids)
        q = (select(Instance.sop_instance_uid)
             .where(Instance.status.in_([s.value for s in operation.from_statuses]), Instance.route.is_not(None)))
        if routes is not None:
            q = q.where(Instance.route.in_([Route(r).value for r in routes]))
        with self.engine.begin() as conn:
            if sop_uids is None:
                if operation is Requeue.RESCREEN and routes is None:
                    raise ValueError("a rescreen names its instances or routes")
                uids = list(conn.execute(q).scalars())
            else:
                uids = [u for chunk in chunks(sop_uids) for u in conn.execute(
                    q.where(Instance.sop_instance_uid.in_(chunk))).scalars()]
            values = {"status": Status.PENDING.value, "reason": None, "updated_at": utcnow()}
            if operation.resets_attempts:
                values["attempts"] = 0
            for chunk in chunks(uids):
                conn.execute(update(Instance).where(Instance.sop_instance_uid.in_(chunk)).values(**values))
                conn.execute(update(FileRecord).where(FileRecord.id.in_(_owner_files(chunk)))
                             .values(status=Status.PENDING.value, reason=None))
        return uids

    @_mapped("the pipeline settings could not be recorded")
    def ensure_config(self, config_hash: str, model: str, settings: dict) -> None:
        row = {"config_hash": config_hash, "model": model,
               "settings_json": json.dumps(settings, sort_keys=True), "created_at": utcnow()}
        with self.engine.begin() as conn:
            conn.execute(self._insert(PipelineConfig).values(**row).on_conflict_do_nothing(
                index_elements=["config_hash"]))

    @_mapped("the heatmap folder could not be recorded")
    def record_heatmap_folder(self, path: str) -> None:
        """The folder (its shared name) this process writes heatmaps into, for the review page to serve them from."""
        with self.engine.begin() as conn:
            conn.execute(self._insert(HeatmapFolder).values(path=path, first_used_at=utcnow())
                         .on_conflict_do_nothing(index_elements=["path"]))

    @_mapped("the heatmap folders could not be read")
    def heatmap_folders(self) -> list[str]:
        with self.session() as s:
            return list(s.execute(select(HeatmapFolder.path).order_by(HeatmapFolder.path)).scalars())

    # -- results ---------------------------------------------------------------------------------------------------
    @_mapped("the results could not be committed")
    def record_outcomes(self, outcomes: Sequence[Outcome], replace: Iterable[str] = ()) -> Committed:
        """The one write path of results, for ``neuron run``, the workers and ``neuron rescreen`` (through
        ``db.writer.ResultWriter``): results and statuses of finished instances in one transaction (upserts:
        redelivery is harmless). ``replace``: instances whose previous results are deleted first, in the same
        transaction (a reader sees the old results or the new ones, never a mix or none).

        A failure recorded for an instance that another file also holds moves the instance to that copy, pending,
        in the same transaction (``Committed.rescued``): a corrupt first copy must not hide a good second one.

        The findings upsert goes as plain DBAPI tuples (``_write_predictions``); the instance and file status updates
        are statement constructs built once per Database (SQLAlchemy compiles each once), run once per distinct
        (status, reason)."""
        if not outcomes:
            return Committed()
        now = utcnow()
        rows = prediction_rows(outcomes, self._stamp(now))
        replace = list(dict.fromkeys(replace))
        # statuses grouped by (status, reason): one statement per group, usually one (all done) per call
        groups: dict[tuple[str, str | None], list[str]] = {}
        for o in outcomes:
            groups.setdefault((o.status.value, o.reason), []).append(o.sop_instance_uid)
        instance_status, file_status = self._outcome_statements()
        stale: set[str] = set()
        with self.engine.begin() as conn:
            for chunk in chunks(replace):
                stale |= heatmaps_of(conn, chunk)
                conn.execute(delete(Prediction).where(Prediction.sop_instance_uid.in_(chunk)))
            finished = _finished_elsewhere(conn, (o.sop_instance_uid for o in outcomes), replace)
            if finished:
                rows = {key: row for key, row in rows.items() if key[0] not in finished}
                groups = {g: kept for g, uids in groups.items() if (kept := [u for u in uids if u not in finished])}
            if rows:
                self._write_predictions(conn, list(rows.values()))
            for (status, reason), uids in groups.items():
                allowed = [s.value for s in sources_of(Status(status))]  # the edges of neuron.work.TRANSITIONS
                for chunk in chunks(uids):
                    params = {"b_uids": chunk, "b_status": status, "b_reason": reason, "b_now": now, "b_from": allowed}
                    conn.execute(file_status, params)  # first: it finds the files by their instances' old status
                    conn.execute(instance_status, params)
            failed = [u for (status, _), uids in groups.items() if status == Status.FAILED.value for u in uids]
            rescued = _rescue_from_copies(conn, failed) if failed else []
            if rows or replace:  # the worklist's summary of every study these results belong to, same transaction
                changed = [o.sop_instance_uid for o in outcomes if o.frames] + replace
                refresh_studies(conn, set(study_of(conn, changed).values()), now, create=False)
        stale -= {r[8] for r in rows.values() if r[8]}  # heatmap_path
        return Committed(len(outcomes), tuple(rescued), frozenset(stale))

    def _stamp(self, now: datetime) -> object:
        """``processed_at`` as the driver takes it: what SQLAlchemy's own DateTime type sends (a string on SQLite), so
        rows written here read back like every other timestamp."""
        if self._stamp_processor is None:
            dialect = self.engine.dialect
            kind = Prediction.__table__.c.processed_at.type.dialect_impl(dialect)
            self._stamp_processor = (kind.bind_processor(dialect) or (lambda v: v),)
        return self._stamp_processor[0](now)

    def _write_predictions(self, conn: Connection, rows: list[tuple]) -> None:
        """The predictions upsert as plain DBAPI tuples: one ``executemany`` of a prepared statement on SQLite; on
        PostgreSQL a COPY (``_copy_predictions``), or where a row is already there the multi-VALUES upsert
        (psycopg2's ``execute_values``, one round trip per page instead of per row). Going past SQLAlchemy's per-row
        parameter processing takes ~0.25 ms of interpreter time per image (18 rows) off the process that drives the
        device; the values are plain floats, ints, strings and booleans."""
        if self.engine.dialect.name == "postgresql":
            from psycopg2 import IntegrityError
            from psycopg2.extras import execute_values

            if not any("" in (r[_HEATMAP], r[_WORKER], r[_DECODER]) for r in rows):  # COPY would read "" as NULL
                try:
                    with conn.begin_nested():
                        _copy_predictions(conn.connection.dbapi_connection, rows)
                    return
                except IntegrityError:  # a row of these keys exists (a redelivery, a rescreen): the upsert replaces it
                    pass
            with conn.connection.dbapi_connection.cursor() as cursor:
                execute_values(cursor, _upsert_sql("%s"), rows, page_size=1000)
            return
        placeholders = "(" + ", ".join("?" * len(PREDICTION_COLUMNS)) + ")"
        conn.exec_driver_sql(_upsert_sql(placeholders), rows)

    def _outcome_statements(self):
        """The two status statement constructs of ``record_outcomes``, built once per Database so SQLAlchemy's
        compiled cache always hits."""
        if self._outcome_stmts is None:
            instances, files = Instance.__table__, FileRecord.__table__
            uids = bindparam("b_uids", expanding=True)  # compiled once, the list is rendered per execution
            allowed = bindparam("b_from", expanding=True)  # the statuses an instance may move to b_status from
            instance_status = (update(instances).where(instances.c.sop_instance_uid.in_(uids),
                                                       instances.c.status.in_(allowed))
                               .values(status=bindparam("b_status"), reason=bindparam("b_reason"),
                                       updated_at=bindparam("b_now")))
            # the instances' own files (_owner_files), never their duplicate copies
            owners = select(instances.c.file_id).where(instances.c.sop_instance_uid.in_(uids),
                                                       instances.c.status.in_(allowed))
            file_status = (update(files).where(files.c.id.in_(owners))
                           .values(status=bindparam("b_status"), reason=bindparam("b_reason")))
            self._outcome_stmts = (instance_status, file_status)
        return self._outcome_stmts

    # -- reporting -------------------------------------------------------------------------------------------------
    @_mapped("the studies' statuses could not be read")
    def study_statuses(self) -> dict[str, int]:
        """Studies by status, by the one rule (``neuron.work.study_status``)."""
        with self.session() as s:
            per_study = s.execute(select(Instance.study_instance_uid, Instance.status).distinct()).all()
        by_study: dict[str, set[str]] = {}
        for study, st in per_study:
            by_study.setdefault(study, set()).add(st)
        return dict(Counter(study_status(statuses) for statuses in by_study.values()))

    @_mapped("the instances' statuses could not be read")
    def instance_statuses(self) -> dict[str, int]:
        with self.session() as s:
            return dict(s.execute(select(Instance.status, func.count()).group_by(Instance.status)).all())

    @_mapped("the run's summary could not be read")
    def summary(self, since: datetime | None = None, limit: int = 5) -> Summary:
        out = Summary()
        with self.session() as s:
            out.files.update(dict(s.execute(select(FileRecord.status, func.count()).group_by(FileRecord.status)).all()))
            q = (select(Prediction.label, func.count()).where(Prediction.rank == 1, Prediction.probability >= POSITIVE)
                 .group_by(Prediction.label).order_by(func.count().desc()).limit(limit))
            if since is not None:
                q = q.where(Prediction.processed_at >= since)
            out.top_findings = [(label, n) for label, n in s.execute(q)]
            out.failures = [(p, r) for p, r in s.execute(
                select(FileRecord.path, FileRecord.reason).where(FileRecord.status == Status.FAILED.value)
                .order_by(FileRecord.path).limit(limit))]
        return out


def _set_status(conn: Connection, uids: Sequence[str], status: Status, reason: str | None) -> None:
    """An instance's status and reason, and its own file's (never its duplicate copies'), along the edges of
    ``neuron.work.TRANSITIONS`` only."""
    allowed = [s.value for s in sources_of(status)]
    for chunk in chunks(uids):
        conn.execute(update(FileRecord).where(FileRecord.id.in_(
            select(Instance.file_id).where(Instance.sop_instance_uid.in_(chunk), Instance.status.in_(allowed))))
            .values(status=status.value, reason=reason))
        conn.execute(update(Instance).where(Instance.sop_instance_uid.in_(chunk), Instance.status.in_(allowed))
                     .values(status=status.value, reason=reason, updated_at=utcnow()))


def heatmaps_of(conn: Connection, uids: Sequence[str], prediction_filter=None) -> set[str]:
    """The heatmap files the predictions of these instances reference (those a filter selects)."""
    q = select(Prediction.heatmap_path).where(Prediction.sop_instance_uid.in_(uids),
                                              Prediction.heatmap_path.is_not(None))
    if prediction_filter is not None:
        q = prediction_filter(q)
    return set(conn.execute(q).scalars())


def _rescue_from_copies(conn: Connection, sop_uids: Iterable[str] | None) -> list[str]:
    """A failed instance (of ``sop_uids``, or any) whose SOP Instance UID is also held by a ``duplicate`` file gets
    another try from that file: a corrupt first copy must not hide a good second one. The instance moves to the copy
    and is ``pending`` again; the failed file keeps its reason and says which copy was screened instead. Returns the
    SOP Instance UIDs put back in line. Each call uses up one copy per instance, so it ends.

    Called where a failure is recorded (``record_outcomes``, a poisoned ``claim``) and where a copy is indexed
    (``add_files``): the one place that decides, whichever mode and whichever came first."""
    q = (select(Instance.sop_instance_uid, Instance.file_id, FileRecord.id, FileRecord.path)
         .join(FileRecord, (FileRecord.sop_instance_uid == Instance.sop_instance_uid)
               & (FileRecord.id != Instance.file_id))
         .where(Instance.status == Status.FAILED.value, FileRecord.status == Status.DUPLICATE.value)
         .order_by(Instance.sop_instance_uid, FileRecord.path))
    if sop_uids is None:
        rows = conn.execute(q).all()
    else:
        rows = [r for chunk in chunks(sop_uids)
                for r in conn.execute(q.where(Instance.sop_instance_uid.in_(chunk))).all()]
    moved: list[str] = []
    for uid, failed_file, dup_id, dup_path in rows:
        if moved and moved[-1] == uid:
            continue  # one copy per call: the first by path
        instead = f"; the copy at {dup_path} was screened instead"
        conn.execute(update(FileRecord).where(FileRecord.id == failed_file).values(
            status=Status.FAILED.value, reason=func.coalesce(FileRecord.reason, "failed") + instead))
        conn.execute(update(FileRecord).where(FileRecord.id == dup_id)
                     .values(status=Status.PENDING.value, reason=None))
        conn.execute(update(Instance).where(Instance.sop_instance_uid == uid)
                     .values(file_id=dup_id, status=Status.PENDING.value, reason=None, updated_at=utcnow()))
        moved.append(uid)
    return moved
