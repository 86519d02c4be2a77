"""Queries an operator runs: the numbers behind ``neuron status``, and the selections that ``neuron rescreen`` and
``neuron purge`` act on, with the atomic replacement of an instance's results.

Status vocabulary (one for ``neuron status``, ``ingest_status.status`` and the README): ``pending`` (indexed, not yet
sent), ``queued`` (sent to the broker or taken by a worker, not finished), ``done``, ``failed``, ``skipped``,
``duplicate``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select, update

from db.schema import FileRecord, Instance, Prediction, Status, utcnow
from db.store import Database, Outcome, WorkItem, prediction_rows
from db.studies import refresh_studies, study_of

STATUSES = tuple(s.value for s in Status)


@dataclass(frozen=True)
class Throughput:
    frames: int
    seconds: float  # the time the frames actually cover (first to last commit in the window)

    @property
    def per_second(self) -> float | None:
        return self.frames / self.seconds if self.seconds > 0 else None


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=utcnow().tzinfo)


def throughput(db: Database, window_s: float = 300.0, now: datetime | None = None) -> Throughput:
    """Frames screened per second over the last ``window_s``, divided by the time the results actually cover: from the
    first commit in the window to the last, counting the frames committed after the first (a rate between events).
    Dividing by the whole window made 10 images finished in 11 s read as 0.03 images/s."""
    now = now or utcnow()
    since = now - timedelta(seconds=window_s)
    frames = (select(Prediction.sop_instance_uid, Prediction.frame, func.min(Prediction.processed_at).label("t"))
              .where(Prediction.processed_at >= since)
              .group_by(Prediction.sop_instance_uid, Prediction.frame).subquery())
    with db.session() as s:
        per_commit = s.execute(select(frames.c.t, func.count()).group_by(frames.c.t).order_by(frames.c.t)).all()
    if len(per_commit) < 2:
        return Throughput(sum(n for _, n in per_commit), 0.0)
    first, last = _aware(per_commit[0][0]), _aware(per_commit[-1][0])
    return Throughput(sum(n for _, n in per_commit[1:]), (last - first).total_seconds())


@dataclass
class DbStatus:
    instances: dict[str, int]
    files: dict[str, int]
    studies: dict[str, int]
    in_flight_studies: int  # a worker has claimed at least one of their queued instances
    in_flight_instances: int
    remaining_instances: int  # pending + queued
    failures_by_reason: list[tuple[str, int]] = field(default_factory=list)


def db_status(db: Database, failure_limit: int = 5) -> DbStatus:
    """Counts in the one vocabulary, in-flight work and the most common failure reasons."""
    with db.session() as s:
        instances = dict(s.execute(select(Instance.status, func.count()).group_by(Instance.status)).all())
        files = dict(s.execute(select(FileRecord.status, func.count()).group_by(FileRecord.status)).all())
        per_study = s.execute(select(Instance.study_instance_uid, Instance.status).distinct()).all()
        in_flight = s.execute(select(func.count(), func.count(func.distinct(Instance.study_instance_uid)))
                              .where(Instance.status == Status.QUEUED.value, Instance.attempts > 0)).one()
        reasons = s.execute(select(Instance.reason, func.count()).where(Instance.status == Status.FAILED.value)
                            .group_by(Instance.reason).order_by(func.count().desc(), Instance.reason)
                            .limit(failure_limit)).all()
    by_study: dict[str, set[str]] = {}
    for study, st in per_study:
        by_study.setdefault(study, set()).add(st)
    studies: Counter[str] = Counter()
    for statuses in by_study.values():
        if Status.QUEUED.value in statuses:
            studies["queued"] += 1
        elif Status.PENDING.value in statuses:
            studies["pending"] += 1
        elif Status.FAILED.value in statuses:
            studies["failed"] += 1
        else:
            studies["done"] += 1
    remaining = instances.get(Status.PENDING.value, 0) + instances.get(Status.QUEUED.value, 0)
    return DbStatus(instances=instances, files=files, studies=dict(studies), in_flight_instances=in_flight[0],
                    in_flight_studies=in_flight[1], remaining_instances=remaining,
                    failures_by_reason=[(r or "no reason recorded", n) for r, n in reasons])


# -- rescreen and purge --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Selection:
    """Which instances an operator acts on; every given criterion must hold (at least one must be given)."""

    study: str | None = None
    series: str | None = None
    folder: str | None = None  # a path prefix as stored (the shared name)
    model: str | None = None  # results of this model (and of these weights, if given)
    weights: str | None = None
    reason: str | None = None  # failed instances whose reason contains this text

    def __post_init__(self) -> None:
        if not any((self.study, self.series, self.folder, self.model, self.reason)):
            raise ValueError("select what to act on: --study, --series, --folder, --model or --reason")
        if self.weights and not self.model:
            raise ValueError(f"--weights {self.weights} needs --model: weights belong to one model")

    def instance_query(self):
        q = select(Instance.sop_instance_uid).join(FileRecord, FileRecord.id == Instance.file_id)
        if self.study:
            q = q.where(Instance.study_instance_uid == self.study)
        if self.series:
            q = q.where(Instance.series_instance_uid == self.series)
        if self.folder:
            prefix = self.folder.rstrip("/")
            q = q.where((FileRecord.path == prefix) | FileRecord.path.startswith(prefix + "/", autoescape=True))
        if self.reason:
            q = q.where(Instance.status == Status.FAILED.value, Instance.reason.contains(self.reason, autoescape=True))
        if self.model:
            having = select(Prediction.sop_instance_uid).where(Prediction.model == self.model)
            if self.weights:
                having = having.where(Prediction.weights.startswith(self.weights, autoescape=True))
            q = q.where(Instance.sop_instance_uid.in_(having))
        return q

    def prediction_filter(self, q):
        if self.model:
            q = q.where(Prediction.model == self.model)
        if self.weights:
            q = q.where(Prediction.weights.startswith(self.weights, autoescape=True))
        return q


def select_instances(db: Database, selection: Selection) -> list[str]:
    with db.session() as s:
        return list(s.execute(selection.instance_query().order_by(Instance.sop_instance_uid)).scalars())


def work_items(db: Database, uids: Sequence[str]) -> list[WorkItem]:
    """The instances to screen again, whatever their status (only instances with a route can be screened)."""
    items: list[WorkItem] = []
    with db.session() as s:
        for start in range(0, len(uids), 500):
            rows = s.execute(select(Instance.sop_instance_uid, FileRecord.path, Instance.route, Instance.frames)
                             .join(FileRecord, FileRecord.id == Instance.file_id)
                             .where(Instance.sop_instance_uid.in_(uids[start:start + 500]),
                                    Instance.route.is_not(None))
                             .order_by(Instance.study_instance_uid, Instance.sop_instance_uid)).all()
            items += [WorkItem(uid, path, route, frames or 1) for uid, path, route, frames in rows]
    return items


def _heatmaps(conn, uids: Sequence[str], selection: Selection | None = None) -> set[str]:
    q = select(Prediction.heatmap_path).where(Prediction.sop_instance_uid.in_(uids),
                                              Prediction.heatmap_path.is_not(None))
    if selection is not None:
        q = selection.prediction_filter(q)
    return set(conn.execute(q).scalars())


def replace_results(db: Database, outcomes: Sequence[Outcome]) -> set[str]:
    """Replace every result of these instances with ``outcomes`` in one transaction: a reader sees the old results or
    the new ones, never a mix or none. Returns the heatmap files the old results referenced and the new ones do not,
    for the caller to delete after the commit."""
    uids = [o.sop_instance_uid for o in outcomes]
    upsert, instance_status, file_status = db._outcome_statements()
    now = utcnow()
    rows = prediction_rows(outcomes, now)
    new_maps = {r["heatmap_path"] for r in rows.values() if r["heatmap_path"]}
    old_maps: set[str] = set()
    with db.engine.begin() as conn:
        for start in range(0, len(uids), 500):
            chunk = uids[start:start + 500]
            old_maps |= _heatmaps(conn, chunk)
            conn.execute(delete(Prediction).where(Prediction.sop_instance_uid.in_(chunk)))
        if rows:
            conn.execute(upsert, list(rows.values()))
        for o in outcomes:
            params = {"b_uids": [o.sop_instance_uid], "b_status": o.status.value, "b_reason": o.reason, "b_now": now}
            conn.execute(instance_status, params)
            conn.execute(file_status, params)
        refresh_studies(conn, set(study_of(conn, uids).values()), now)
    return old_maps - new_maps



def queue_again(db: Database, uids: Sequence[str]) -> int:
    """For the distributed mode: put instances back to ``pending`` with a fresh attempt count, keeping their results
    until the worker's upserts replace them. The next ``neuron scan`` (or the watcher) enqueues them."""
    with db.session() as s, s.begin():
        for start in range(0, len(uids), 500):
            chunk = list(uids[start:start + 500])
            s.execute(update(Instance).where(Instance.sop_instance_uid.in_(chunk), Instance.route.is_not(None))
                      .values(status=Status.PENDING.value, reason=None, attempts=0, updated_at=utcnow()))
            s.execute(update(FileRecord).where(FileRecord.id.in_(
                select(Instance.file_id).where(Instance.sop_instance_uid.in_(chunk), Instance.route.is_not(None))))
                .values(status=Status.PENDING.value, reason=None))
    return len(uids)


def purge_results(db: Database, selection: Selection, uids: Iterable[str]) -> tuple[int, set[str]]:
    """Delete the selected results (only the selected model's or weights', if given) in one transaction; the
    instances stay indexed with their status, so a later run does not screen them again unless asked
    (``neuron rescreen``). Returns the rows deleted and the heatmap files no remaining row references."""
    uids = list(uids)
    deleted, maps = 0, set()
    with db.engine.begin() as conn:
        for start in range(0, len(uids), 500):
            chunk = uids[start:start + 500]
            maps |= _heatmaps(conn, chunk, selection)
            res = conn.execute(selection.prediction_filter(delete(Prediction).where(
                Prediction.sop_instance_uid.in_(chunk))))
            deleted += res.rowcount or 0
        if maps:
            still = set(conn.execute(select(Prediction.heatmap_path).where(
                Prediction.heatmap_path.in_(list(maps)))).scalars())
            maps -= still
        refresh_studies(conn, set(study_of(conn, uids).values()))
    return deleted, maps
