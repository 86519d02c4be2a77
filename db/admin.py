"""Queries an operator runs: the numbers behind ``neuron status``, and the selections that ``neuron rescreen`` and
``neuron purge`` act on.

Status vocabulary (one for ``neuron status``, ``ingest_status.status`` and the README): ``neuron.work.Status``; a
study's status follows ``neuron.work.study_status``. Results are replaced only through the one write path
(``Database.record_outcomes`` with ``replace``); instances go back in line only through ``Database.requeue``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import delete, func, select

from db import audit
from db.schema import FileRecord, Instance, Prediction, aware_utc, chunks, utcnow
from db.store import Database, heatmaps_of
from db.studies import refresh_studies, study_of
from neuron.work import Status


@dataclass(frozen=True)
class Throughput:
    frames: int
    seconds: float  # the time the frames actually cover (first to last commit in the window)

    @property
    def per_second(self) -> float | None:
        return self.frames / self.seconds if self.seconds > 0 else None


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
    first, last = aware_utc(per_commit[0][0]), aware_utc(per_commit[-1][0])
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
    instances = db.instance_statuses()
    with db.session() as s:
        files = dict(s.execute(select(FileRecord.status, func.count()).group_by(FileRecord.status)).all())
        in_flight = s.execute(select(func.count(), func.count(func.distinct(Instance.study_instance_uid)))
                              .where(Instance.status == Status.QUEUED.value, Instance.attempts > 0)).one()
        reasons = s.execute(select(Instance.reason, func.count()).where(Instance.status == Status.FAILED.value)
                            .group_by(Instance.reason).order_by(func.count().desc(), Instance.reason)
                            .limit(failure_limit)).all()
    remaining = instances.get(Status.PENDING.value, 0) + instances.get(Status.QUEUED.value, 0)
    return DbStatus(instances=instances, files=files, studies=db.study_statuses(), in_flight_instances=in_flight[0],
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

    def describe(self) -> str:
        """The selection in words, for the audit."""
        return " ".join(f"--{k} {v}" for k, v in (("study", self.study), ("series", self.series),
                                                   ("folder", self.folder), ("model", self.model),
                                                   ("weights-id", self.weights), ("reason", self.reason)) if v)

    def prediction_filter(self, q):
        if self.model:
            q = q.where(Prediction.model == self.model)
        if self.weights:
            q = q.where(Prediction.weights.startswith(self.weights, autoescape=True))
        return q


def select_instances(db: Database, selection: Selection) -> list[str]:
    with db.session() as s:
        return list(s.execute(selection.instance_query().order_by(Instance.sop_instance_uid)).scalars())


def select_studies(db: Database, uids: Iterable[str]) -> dict[str, int]:
    """How many of these instances each study holds (the audit names a rescreen per study)."""
    with db.engine.connect() as conn:
        studies = study_of(conn, uids)
    counts: dict[str, int] = {}
    for study in studies.values():
        counts[study] = counts.get(study, 0) + 1
    return dict(sorted(counts.items()))


def purge_results(db: Database, selection: Selection, uids: Iterable[str],
                  actor: audit.Actor | None = None) -> tuple[int, set[str]]:
    """Delete the selected results (only the selected model's or weights', if given) in one transaction; the
    instances stay indexed with their status, so a later run does not screen them again unless asked
    (``neuron rescreen``). With ``actor`` the purge is audited in the same transaction, one row per study (the
    audit of who saw the results stays). Returns the rows deleted and the heatmap files no remaining row
    references."""
    uids = list(uids)
    deleted, maps = 0, set()
    with db.engine.begin() as conn:
        for chunk in chunks(uids):
            maps |= heatmaps_of(conn, chunk, selection.prediction_filter)
            res = conn.execute(selection.prediction_filter(delete(Prediction).where(
                Prediction.sop_instance_uid.in_(chunk))))
            deleted += res.rowcount or 0
        for chunk in chunks(sorted(maps)):
            still = conn.execute(select(Prediction.heatmap_path).where(Prediction.heatmap_path.in_(chunk)))
            maps -= set(still.scalars())
        studies = set(study_of(conn, uids).values())
        refresh_studies(conn, studies)
        if actor is not None:
            audit.record(conn, *(audit.Event(actor, audit.Action.PURGE, study, target=selection.describe(),
                                             detail=f"results of {len(uids)} instances purged ({deleted} rows)")
                                 for study in sorted(studies)))
    return deleted, maps
