"""The database behind one narrow interface: the producer indexes through it, the engine's results land through it.

Writes are upserts on natural keys (files by path, instances by SOP Instance UID, predictions by
instance/frame/model/weights/label), so running the same work twice never adds or changes rows.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timedelta

from sqlalchemy import bindparam, case, create_engine, event, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from db.migrate import upgrade
from db.schema import FileRecord, Instance, PipelineConfig, Prediction, Status, Study, utcnow
from db.studies import StudyHeader, refresh_studies, study_of
from neuron.errors import RetryableError


@dataclass(frozen=True)
class FileEntry:
    """What the producer learned about one file (header only)."""

    path: str
    size: int
    mtime_ns: int
    status: Status
    reason: str | None = None
    sop_instance_uid: str | None = None
    instance: InstanceEntry | None = None


@dataclass(frozen=True)
class InstanceHeader:
    """The header facts of one DICOM instance that indexing and routing use (built by producer.scan)."""

    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str | None
    modality: str | None
    body_part: str | None
    photometric: str | None
    transfer_syntax: str | None
    rows: int | None
    columns: int | None
    frames: int


@dataclass(frozen=True)
class InstanceEntry:
    header: InstanceHeader
    route: str | None
    status: Status
    reason: str | None = None
    study: StudyHeader | None = None  # the study's header facts for the worklist (db.studies)


@dataclass(frozen=True)
class WorkItem:
    """One instance to screen: IDs and a path, never pixels."""

    sop_instance_uid: str
    file_path: str
    route: str
    frames: int


@dataclass(frozen=True)
class LabelScore:
    label: str
    probability: float
    uncertainty: float
    rank: int
    heatmap_path: str | None
    needs_review: bool = False


@dataclass(frozen=True)
class FrameResult:
    frame: int
    model: str
    weights: str
    config_hash: str
    untrained: bool
    scores: tuple[LabelScore, ...]
    decoder: str | None = None  # which decoder produced the pixels (provenance)


@dataclass(frozen=True)
class Outcome:
    """The end of one instance's processing: done with results, or failed/skipped with a reason."""

    sop_instance_uid: str
    status: Status
    reason: str | None = None
    frames: tuple[FrameResult, ...] = ()
    worker: str | None = None


@dataclass
class Summary:
    files: Counter[str] = field(default_factory=Counter)
    top_findings: list[tuple[str, int]] = field(default_factory=list)
    failures: list[tuple[str, str]] = field(default_factory=list)


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


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def printable(text: str | None) -> str | None:
    """Control characters escaped as \\xNN, for text that may quote a file's content (header values, a decoder's
    error). A NUL above all: PostgreSQL refuses it in text while SQLite stores it, so unescaped, one hostile file
    fails a whole group commit of other studies' results in the distributed mode and not in the embedded one."""
    return None if text is None else _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def _owner_files(sop_uids: Sequence[str]):
    """The file each instance is screened from (not its ``duplicate`` copies, not a corrupt first copy it was moved
    away from): the one whose ``ingest_status`` row follows the instance's status."""
    return select(Instance.file_id).where(Instance.sop_instance_uid.in_(sop_uids))


def prediction_rows(outcomes: Sequence[Outcome], now: datetime) -> dict[tuple, dict]:
    """The predictions rows of these outcomes by natural key, the last one winning as in sequential upserts: a
    multi-row ON CONFLICT DO UPDATE must not touch a row twice (a redelivered study may share a group commit with its
    first delivery)."""
    return {(o.sop_instance_uid, fr.frame, fr.model, fr.weights, sc.label): {
        "sop_instance_uid": o.sop_instance_uid, "frame": fr.frame, "model": fr.model, "weights": fr.weights,
        "label": sc.label, "probability": sc.probability, "uncertainty": sc.uncertainty, "rank": sc.rank,
        "heatmap_path": sc.heatmap_path, "config_hash": fr.config_hash, "untrained": fr.untrained,
        "worker": o.worker, "needs_review": sc.needs_review, "processed_at": now, "decoder": fr.decoder}
        for o in outcomes for fr in o.frames for sc in fr.scores}


class Database:
    def __init__(self, url: str):
        self.url = url
        self.engine: Engine = create_engine(url, future=True, pool_pre_ping=True)
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._outcome_stmts = None
        self._index_stmts = None

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

    def add_files(self, entries: Sequence[FileEntry]) -> None:
        """Record a batch of scanned files and their instances. A SOP Instance UID already known at another path
        makes the file a ``duplicate``; a changed file is re-indexed and its instance screened again.

        Statuses are decided here in order, as sequential upserts would (the first path of a SOP Instance UID owns
        it), then the batch is written as two multi-row upserts built once per Database: one round trip per page
        instead of two per file (a 50,000-file first scan went from ~800 to several thousand files/s)."""
        if not entries:
            return
        now = utcnow()
        file_upsert, instance_upsert = self._index_statements()
        with self.engine.begin() as conn:
            uids = list({e.sop_instance_uid for e in entries if e.sop_instance_uid})
            owners: dict[str, str] = {}
            for start in range(0, len(uids), 500):
                owners.update(conn.execute(
                    select(Instance.sop_instance_uid, FileRecord.path)
                    .join(FileRecord, FileRecord.id == Instance.file_id)
                    .where(Instance.sop_instance_uid.in_(uids[start:start + 500]))).all())
            files: dict[str, dict] = {}
            instances: dict[str, tuple[str, dict]] = {}
            for e in entries:
                status, reason, inst = e.status, e.reason, e.instance
                owner = owners.get(e.sop_instance_uid) if e.sop_instance_uid else None
                if inst is not None and owner is not None and owner != e.path:
                    status, reason, inst = Status.DUPLICATE, f"same SOP Instance UID as {owner}; processed once", None
                files[e.path] = {"path": e.path, "size": e.size, "mtime_ns": e.mtime_ns,
                                 "sop_instance_uid": e.sop_instance_uid, "status": status.value, "reason": reason,
                                 "seen_at": now}
                if inst is None:
                    continue
                irow = asdict(inst.header)
                irow.update(route=inst.route, reason=inst.reason, status=inst.status.value, updated_at=now)
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
                    conn.execute(self._study_upsert(), [{**asdict(h), "updated_at": now} for h in studies.values()])
                refresh_studies(conn, {irow["study_instance_uid"] for _, irow in instances.values()}, now)

    def _study_upsert(self):
        """A study's header facts: a value an instance of it has wins over one it lacks (instances of one study
        normally agree; a later scan fills what an earlier one did not have)."""
        studies = Study.__table__
        upsert = self._insert(studies)
        return upsert.on_conflict_do_update(
            index_elements=["study_instance_uid"],
            set_={**{c: func.coalesce(upsert.excluded[c], studies.c[c]) for c in (
                "study_date", "accession_number", "study_description", "patient_key")},
                "updated_at": upsert.excluded.updated_at})

    def refresh_studies(self, study_uids: Iterable[str]) -> None:
        """Recompute the results summary of these studies (after a rescreen or purge changed their predictions)."""
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
            columns = [f.name for f in fields(InstanceHeader) if f.name != "sop_instance_uid"]
            instance_upsert = self._insert(instances)
            instance_upsert = instance_upsert.on_conflict_do_update(
                index_elements=["sop_instance_uid"],
                set_={c: instance_upsert.excluded[c] for c in (*columns, "route", "reason", "status", "file_id",
                                                               "updated_at")}
            ).returning(instances.c.sop_instance_uid)
            self._index_stmts = (file_upsert, instance_upsert)
        return self._index_stmts

    # -- worker side -----------------------------------------------------------------------------------------------
    def pending(self, routes: Iterable[str] | None = None, sop_uids: Iterable[str] | None = None,
                paths: Iterable[str] | None = None) -> list[WorkItem]:
        """Instances waiting to be screened (of these routes, UIDs or file paths), study by study."""
        q = (select(Instance.sop_instance_uid, FileRecord.path, Instance.route, Instance.frames)
             .join(FileRecord, FileRecord.id == Instance.file_id)
             .where(Instance.status == Status.PENDING.value)
             .order_by(Instance.study_instance_uid, Instance.sop_instance_uid))
        if routes is not None:
            q = q.where(Instance.route.in_(list(routes)))
        if sop_uids is not None:
            q = q.where(Instance.sop_instance_uid.in_(list(sop_uids)))
        if paths is not None:
            q = q.where(FileRecord.path.in_(list(paths)))
        with self.session() as s:
            return [WorkItem(uid, path, route, frames or 1) for uid, path, route, frames in s.execute(q)]

    def pending_by_study(self, routes: list[str], study_uids: set[str] | None = None) -> list[tuple[str, str, str]]:
        q = (select(Instance.study_instance_uid, Instance.route, Instance.sop_instance_uid)
             .where(Instance.status == Status.PENDING.value, Instance.route.in_(routes))
             .order_by(Instance.study_instance_uid, Instance.sop_instance_uid))
        if study_uids is not None:
            q = q.where(Instance.study_instance_uid.in_(list(study_uids)))
        with self.session() as s:
            return [tuple(r) for r in s.execute(q)]

    def _set_status(self, uids: list[str], status: Status, only_from: Status | None = None) -> None:
        with self.session() as s, s.begin():
            q = update(Instance).where(Instance.sop_instance_uid.in_(uids))
            if only_from is not None:
                q = q.where(Instance.status == only_from.value)
            s.execute(q.values(status=status.value, updated_at=utcnow()))

    def mark_queued(self, uids: list[str]) -> None:
        self._set_status(uids, Status.QUEUED, only_from=Status.PENDING)

    def mark_pending(self, uids: list[str]) -> None:
        self._set_status(uids, Status.PENDING, only_from=Status.QUEUED)

    def claim(self, uids: list[str], max_attempts: int) -> list[WorkItem]:
        """Take queued instances for screening: count the attempt, and fail those that already took the worker
        down ``max_attempts`` times (a poison message must not block a queue). Finished instances are skipped, so
        a redelivered message does no work twice."""
        items = []
        with self.session() as s, s.begin():
            rows = s.execute(
                select(Instance.sop_instance_uid, FileRecord.path, Instance.route, Instance.frames, Instance.attempts)
                .join(FileRecord, FileRecord.id == Instance.file_id)
                .where(Instance.sop_instance_uid.in_(uids),
                       Instance.status.in_([Status.QUEUED.value, Status.PENDING.value]))).all()
            for uid, path, route, frames, attempts in rows:
                if attempts >= max_attempts:
                    reason = (f"screening was interrupted {attempts} times (worker crash or lost connection) and "
                              f"the limit is {max_attempts}; check the file and the worker logs, then run `neuron "
                              f"scan FOLDER --retry-failed` to try again")
                    s.execute(update(Instance).where(Instance.sop_instance_uid == uid)
                              .values(status=Status.FAILED.value, reason=reason, updated_at=utcnow()))
                    s.execute(update(FileRecord).where(FileRecord.id.in_(_owner_files([uid])))
                              .values(status=Status.FAILED.value, reason=reason))
                    continue
                s.execute(update(Instance).where(Instance.sop_instance_uid == uid)
                          .values(attempts=Instance.attempts + 1, updated_at=utcnow()))
                items.append(WorkItem(uid, path, route, frames or 1))
        return items

    def status_counts(self) -> dict[str, dict[str, int]]:
        """Instances and studies by status; a study is done when none of its instances is pending or queued."""
        with self.session() as s:
            instances = dict(s.execute(select(Instance.status, func.count()).group_by(Instance.status)).all())
            per_study = s.execute(select(Instance.study_instance_uid, Instance.status).distinct()).all()
            processed = s.execute(select(func.count(func.distinct(Prediction.sop_instance_uid)))).scalar_one()
        studies: dict[str, set[str]] = {}
        for study, status in per_study:
            studies.setdefault(study, set()).add(status)
        study_counts: Counter[str] = Counter()
        for statuses in studies.values():
            if statuses & {Status.PENDING.value, Status.QUEUED.value}:
                study_counts["pending"] += 1
            elif Status.FAILED.value in statuses:
                study_counts["failed"] += 1
            else:
                study_counts["done"] += 1
        return {"instances": instances, "studies": dict(study_counts), "screened_instances": {"total": processed}}

    def recent_rate(self, seconds: int = 300) -> float:
        """Frames screened per second over the last ``seconds``."""
        since = utcnow() - timedelta(seconds=seconds)
        with self.session() as s:
            n = s.execute(select(func.count()).select_from(
                select(Prediction.sop_instance_uid, Prediction.frame).where(Prediction.processed_at >= since)
                .distinct().subquery())).scalar_one()
        return n / seconds

    def skip_routes_without_model(self, available: Iterable[str], reason_for: dict[str, str]) -> int:
        """Pending instances whose route has no model are skipped, with a reason, never dropped."""
        available = list(available)
        n = 0
        with self.session() as s, s.begin():
            routes = s.execute(select(Instance.route).where(Instance.status == Status.PENDING.value,
                                                            Instance.route.not_in(available)).distinct()).scalars()
            for route in list(routes):
                reason = reason_for.get(route, f"no model is available for route '{route}'")
                uids = select(Instance.sop_instance_uid).where(Instance.status == Status.PENDING.value,
                                                               Instance.route == route)
                uid_list = list(s.execute(uids).scalars())
                n += len(uid_list)
                s.execute(update(Instance).where(Instance.sop_instance_uid.in_(uid_list))
                          .values(status=Status.SKIPPED.value, reason=reason, updated_at=utcnow()))
                s.execute(update(FileRecord).where(FileRecord.id.in_(_owner_files(uid_list)))
                          .values(status=Status.SKIPPED.value, reason=reason))
        return n

    def reset_to_pending(self, *, awaiting_model: Iterable[str] = (), queued: bool = False,
                         failed: bool = False) -> int:
        """Put instances back in line; returns how many. ``awaiting_model``: instances skipped because their route had
        no model, for routes that now have one (a model trained after the archive was scanned). ``queued``: sent to
        a broker that may have lost the message (a broker restarted without its append-only file); a message that
        still exists is harmless, the claim skips finished work. ``failed``: failed instances get a fresh attempt
        count, after the cause (a file, a worker) has been fixed. Scan-time skips (modality, body part) stay."""
        conditions = []
        if awaiting_model:
            conditions.append((Instance.status == Status.SKIPPED.value) & Instance.route.in_(list(awaiting_model)))
        if queued:
            conditions.append(Instance.status == Status.QUEUED.value)
        if failed:
            conditions.append((Instance.status == Status.FAILED.value) & Instance.route.is_not(None))
        if not conditions:
            return 0
        with self.session() as s, s.begin():
            uids = list(s.execute(select(Instance.sop_instance_uid).where(or_(*conditions))).scalars())
            for start in range(0, len(uids), 500):
                chunk = uids[start:start + 500]
                s.execute(update(Instance).where(Instance.sop_instance_uid.in_(chunk))
                          .values(status=Status.PENDING.value, reason=None, updated_at=utcnow(),
                                  # only a failed instance starts its attempt count again: a requeue must not
                                  # wipe the count that stops a poison message
                                  attempts=case((Instance.status == Status.FAILED.value, 0),
                                                else_=Instance.attempts)))
                s.execute(update(FileRecord).where(FileRecord.id.in_(_owner_files(chunk)))
                          .values(status=Status.PENDING.value, reason=None))
        return len(uids)

    def ensure_config(self, config_hash: str, model: str, settings: dict) -> None:
        row = {"config_hash": config_hash, "model": model,
               "settings_json": json.dumps(settings, sort_keys=True), "created_at": utcnow()}
        with self.session() as s, s.begin():
            s.execute(self._insert(PipelineConfig).values(**row).on_conflict_do_nothing(
                index_elements=["config_hash"]))

    def record_outcomes(self, outcomes: Sequence[Outcome]) -> None:
        """Write results and statuses of finished instances in one transaction (upserts: redelivery is harmless).

        Three statement constructs built once per Database, so SQLAlchemy compiles each once and then hits its cache:
        the findings upsert executed with all rows as parameter sets (PostgreSQL: multi-VALUES pages), and the
        instance and file status updates once per distinct (status, reason)."""
        if not outcomes:
            return
        now = utcnow()
        rows = prediction_rows(outcomes, now)
        # statuses grouped by (status, reason): one statement per group, usually one (all done) per call
        groups: dict[tuple[str, str | None], list[str]] = {}
        for o in outcomes:
            groups.setdefault((o.status.value, printable(o.reason)), []).append(o.sop_instance_uid)
        upsert, instance_status, file_status = self._outcome_statements()
        with self.engine.begin() as conn:
            if rows:
                conn.execute(upsert, list(rows.values()))
            for (status, reason), uids in groups.items():
                for start in range(0, len(uids), 500):
                    params = {"b_uids": uids[start:start + 500], "b_status": status, "b_reason": reason, "b_now": now}
                    conn.execute(instance_status, params)
                    conn.execute(file_status, params)
            if rows:  # the worklist's summary of every study these results belong to, in the same transaction
                studies = set(study_of(conn, (o.sop_instance_uid for o in outcomes if o.frames)).values())
                refresh_studies(conn, studies, now, create=False)

    def _outcome_statements(self):
        """The three statement constructs of ``record_outcomes``, built once per Database so SQLAlchemy's compiled
        cache always hits."""
        if self._outcome_stmts is None:
            predictions, instances, files = Prediction.__table__, Instance.__table__, FileRecord.__table__
            upsert = self._insert(predictions)
            upsert = upsert.on_conflict_do_update(
                index_elements=["sop_instance_uid", "frame", "model", "weights", "label"],
                set_={c: upsert.excluded[c] for c in ("probability", "uncertainty", "rank", "heatmap_path",
                                                      "config_hash", "untrained", "worker", "needs_review",
                                                      "processed_at", "decoder")})
            # RETURNING lets SQLAlchemy send the rows as multi-VALUES pages ("insertmanyvalues"); without it, an
            # upsert's executemany is one round trip per row on psycopg2 (sqlalchemy#13130)
            upsert = upsert.returning(predictions.c.id)
            uids = bindparam("b_uids", expanding=True)  # compiled once, the list is rendered per execution
            instance_status = (update(instances).where(instances.c.sop_instance_uid.in_(uids))
                               .values(status=bindparam("b_status"), reason=bindparam("b_reason"),
                                       updated_at=bindparam("b_now")))
            # the instances' own files (_owner_files), never their duplicate copies
            owners = select(instances.c.file_id).where(instances.c.sop_instance_uid.in_(uids))
            file_status = (update(files).where(files.c.id.in_(owners))
                           .values(status=bindparam("b_status"), reason=bindparam("b_reason")))
            self._outcome_stmts = (upsert, instance_status, file_status)
        return self._outcome_stmts

    def retry_failed_from_duplicates(self, sop_uids: Iterable[str] | None = None) -> list[str]:
        """A failed instance (of ``sop_uids``, or any) whose SOP Instance UID is also held by a ``duplicate`` file gets
        another try from that file: a corrupt first copy must not hide a good second one. The instance moves to the
        copy and is ``pending`` again; the failed file keeps its reason and says which copy was screened instead.
        Returns the SOP Instance UIDs put back in line, for the caller to screen or enqueue. Each call uses up one
        copy per instance, so calling it until it returns nothing ends."""
        q = (select(Instance.sop_instance_uid, Instance.file_id, FileRecord.id, FileRecord.path)
             .join(FileRecord, (FileRecord.sop_instance_uid == Instance.sop_instance_uid)
                   & (FileRecord.id != Instance.file_id))
             .where(Instance.status == Status.FAILED.value, FileRecord.status == Status.DUPLICATE.value)
             .order_by(Instance.sop_instance_uid, FileRecord.path))
        wanted = None if sop_uids is None else list(dict.fromkeys(sop_uids))
        if wanted == []:
            return []
        moved: list[str] = []
        with self.session() as s, s.begin():
            rows = []
            if wanted is None:
                rows = s.execute(q).all()
            else:
                for start in range(0, len(wanted), 500):
                    rows += s.execute(q.where(Instance.sop_instance_uid.in_(wanted[start:start + 500]))).all()
            for uid, failed_file, dup_id, dup_path in rows:
                if moved and moved[-1] == uid:
                    continue  # one copy per call: the first by path
                instead = f"; the copy at {dup_path} was screened instead"
                s.execute(update(FileRecord).where(FileRecord.id == failed_file).values(
                    status=Status.FAILED.value, reason=func.coalesce(FileRecord.reason, "failed") + instead))
                s.execute(update(FileRecord).where(FileRecord.id == dup_id)
                          .values(status=Status.PENDING.value, reason=None))
                s.execute(update(Instance).where(Instance.sop_instance_uid == uid)
                          .values(file_id=dup_id, status=Status.PENDING.value, reason=None, updated_at=utcnow()))
                moved.append(uid)
        return moved

    # -- reporting -------------------------------------------------------------------------------------------------
    def summary(self, since: datetime | None = None, limit: int = 5) -> Summary:
        out = Summary()
        with self.session() as s:
            out.files.update(dict(s.execute(select(FileRecord.status, func.count()).group_by(FileRecord.status)).all()))
            q = (select(Prediction.label, func.count()).where(Prediction.rank == 1, Prediction.probability >= 0.5)
                 .group_by(Prediction.label).order_by(func.count().desc()).limit(limit))
            if since is not None:
                q = q.where(Prediction.processed_at >= since)
            out.top_findings = [(label, n) for label, n in s.execute(q)]
            out.failures = [(p, r) for p, r in s.execute(
                select(FileRecord.path, FileRecord.reason).where(FileRecord.status == Status.FAILED.value)
                .order_by(FileRecord.path).limit(limit))]
        return out
