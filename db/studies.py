"""The ``studies`` table: header facts the worklist shows, and a per-study summary of the results.

The summary (top finding, positives, needs-review count, when screened) is derived data, recomputed from
``predictions`` for exactly the studies a change touched: a results commit, a rescreen, a purge, or the migration that
created the table. The review worklist then orders and pages on indexed columns of one small table instead of
aggregating millions of predictions rows per request.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from functools import lru_cache

from sqlalchemy import bindparam, case, func, select, update
from sqlalchemy.engine import Connection

from db.schema import Instance, Prediction, Study, chunks, needs_review_clause, utcnow
from neuron.work import POSITIVE, Status

WAITING = (Status.PENDING.value, Status.QUEUED.value)  # an instance still to be screened


def study_of(conn: Connection, sop_uids: Iterable[str]) -> dict[str, str]:
    """The Study Instance UID of each of these SOP Instance UIDs that is indexed, asked in chunks (a bounded IN)."""
    found: dict[str, str] = {}
    for chunk in chunks(sop_uids):
        found.update(conn.execute(select(Instance.sop_instance_uid, Instance.study_instance_uid)
                                  .where(Instance.sop_instance_uid.in_(chunk))).all())
    return found


def open_studies(conn: Connection, study_uids: Iterable[str]) -> set[str]:
    """Those of these studies with instances still to be screened (pending or queued), asked in chunks: a report
    written for one of them is partial."""
    found: set[str] = set()
    for chunk in chunks(study_uids):
        found.update(conn.execute(select(Instance.study_instance_uid).distinct().where(
            Instance.study_instance_uid.in_(chunk), Instance.status.in_(WAITING))).scalars())
    return found


def refresh_studies(conn: Connection, study_uids: Iterable[str], now: datetime | None = None,
                    create: bool = True, needs_review=None) -> None:
    """Recompute the summary columns (and, with ``create``, the modalities) of these studies from their instances
    and predictions, in SQL: one aggregate query and one executemany update per chunk of studies. ``create`` also
    makes the rows of studies missing from ``studies`` (instances indexed before it existed); a results commit
    passes False (its studies were indexed first). ``needs_review``: the rule to count by (default
    ``db.schema.needs_review_clause``; a migration older than the columns that rule reads passes its own)."""
    uids = sorted({u for u in study_uids if u is not None})
    now = now or utcnow()
    for chunk in chunks(uids):
        values = {u: {"b_uid": u, "top_probability": None, "top_label": None, "top_model": None,
                      "positive_findings": 0, "needs_review": 0, "screened_instances": 0, "screened_at": None,
                      "updated_at": now} for u in chunk}
        for study, top_p, top_label, top_model, positives, review, screened, at in conn.execute(
                _summary_query(needs_review), {"b_studies": chunk}):
            values[study].update(top_probability=top_p, top_label=top_label, top_model=top_model,
                                 positive_findings=int(positives or 0), needs_review=int(review or 0),
                                 screened_instances=int(screened or 0), screened_at=at)
        if create:
            _create_missing(conn, chunk, values, now)
        conn.execute(_summary_update(), list(values.values()))


def _create_missing(conn: Connection, chunk: list[str], values: dict[str, dict], now: datetime) -> None:
    existing_query, modalities_query, modalities_update = _create_statements()
    existing = set(conn.execute(existing_query, {"b_studies": chunk}).scalars())
    missing = [{"study_instance_uid": u, "updated_at": now} for u in chunk if u not in existing]
    if missing:
        conn.execute(Study.__table__.insert(), missing)
    modalities: dict[str, set[str]] = {u: set() for u in chunk}
    for study, modality in conn.execute(modalities_query, {"b_studies": chunk}):
        if modality:
            modalities[study].add(modality)
    conn.execute(modalities_update,
                 [{"b_uid": u, "b_modalities": ",".join(sorted(m))[:64] or None} for u, m in modalities.items()])


# The statements below are built once: indexing and every results commit refresh studies, and rebuilding a
# statement costs SQLAlchemy its cache key and column proxies each time (Database.add_files in batches of 16 on
# SQLite: 0.46-0.60 ms of its thread's CPU per file before, 0.25-0.45 after); the studies are an expanding parameter.
@lru_cache(maxsize=1)
def _create_statements():
    studies = bindparam("b_studies", expanding=True)
    return (select(Study.study_instance_uid).where(Study.study_instance_uid.in_(studies)),
            select(Instance.study_instance_uid, Instance.modality).distinct()
            .where(Instance.study_instance_uid.in_(studies)),
            update(Study).where(Study.study_instance_uid == bindparam("b_uid"))
            .values(modalities=bindparam("b_modalities")))


@lru_cache(maxsize=4)
def _summary_query(needs_review=None):
    """Per study: the top finding (highest probability, then label, then model: the order of the study_findings
    view), positives, findings needing review (``db.schema.NEEDS_REVIEW``; ``needs_review``: another rule to count
    by, for a migration older than the columns that one reads), screened instances and the latest result time."""
    needs_review = needs_review_clause() if needs_review is None else needs_review
    studies = bindparam("b_studies", expanding=True)
    position = func.row_number().over(partition_by=Instance.study_instance_uid,
                                      order_by=(Prediction.probability.desc(), Prediction.label, Prediction.model))
    scored = (select(Instance.study_instance_uid.label("study"), Prediction.sop_instance_uid, Prediction.label,
                     Prediction.model, Prediction.probability, needs_review.label("needs_review"),
                     Prediction.processed_at,
                     position.label("position"))
              .join(Instance, Instance.sop_instance_uid == Prediction.sop_instance_uid)
              .where(Instance.study_instance_uid.in_(studies))).subquery()
    first = scored.c.position == 1
    return (select(scored.c.study,
                   func.max(case((first, scored.c.probability))),
                   func.max(case((first, scored.c.label))),
                   func.max(case((first, scored.c.model))),
                   func.sum(case((scored.c.probability >= POSITIVE, 1), else_=0)),
                   func.sum(case((scored.c.needs_review, 1), else_=0)),
                   func.count(func.distinct(scored.c.sop_instance_uid)),
                   func.max(scored.c.processed_at))
            .group_by(scored.c.study))


@lru_cache(maxsize=1)
def _summary_update():
    columns = ("top_probability", "top_label", "top_model", "positive_findings", "needs_review",
               "screened_instances", "screened_at", "updated_at")
    return (update(Study).where(Study.study_instance_uid == bindparam("b_uid"))
            .values({c: bindparam(c) for c in columns}))
