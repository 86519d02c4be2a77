"""What Neuron did on the DICOM network, in three tables (defined in db/schema.py), and every query on them.

    associations   one row per association a listener accepted or refused: calling AE title and host, when, how it
                   ended (released, aborted, rejected), instances stored, bytes, instances refused and the last reason
    pulls          one row per study a ``neuron pull`` found on a source: what the PACS said it holds, what was
                   retrieved, attempts, status (found, retrieving, retrieved, failed) and the last error
    deliveries     one row per DICOM output (SR, secondary capture) and destination: attempts, status (pending,
                   sending, delivered, failed, superseded), the last error and when the next try is due

No patient attribute is stored here: UIDs, AE titles, hosts, counts and status texts only.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from enum import Enum

from sqlalchemy import func, or_, select
from sqlalchemy import update as sql_update

from db.schema import AssociationRecord, DeliveryRecord, Instance, PullRecord, utcnow
from db.store import Database, printable

CHUNK = 500


class DeliveryStatus(str, Enum):
    PENDING = "pending"  # waiting for its (next) try
    SENDING = "sending"  # taken by a sender; taken again by another once ``lease_until`` passes (the sender died)
    DELIVERED = "delivered"
    FAILED = "failed"  # out of tries, or refused for good; ``neuron send --failed`` tries again
    SUPERSEDED = "superseded"  # a newer version of the object (a rewritten SR) replaced the file before it was sent


class PullStatus(str, Enum):
    FOUND = "found"
    RETRIEVING = "retrieving"
    RETRIEVED = "retrieved"
    FAILED = "failed"


def aware_utc(value: datetime | None) -> datetime | None:
    """SQLite hands timestamps back without their zone; they were written in UTC."""
    if value is not None and value.tzinfo is None:
        from datetime import UTC

        return value.replace(tzinfo=UTC)
    return value


def _insert(db: Database, table):
    from sqlalchemy.dialects import postgresql, sqlite

    return (postgresql if db.engine.dialect.name == "postgresql" else sqlite).insert(table)


# -- instances already held -------------------------------------------------------------------------------------------
def held_instances(db: Database, sop_uids: Iterable[str]) -> set[str]:
    """Which of these SOP Instance UIDs are here already: indexed (from any folder, listener or pull), or made here (a
    DICOM output Neuron wrote and delivered, which a PACS then holds in the source study)."""
    wanted = list(dict.fromkeys(sop_uids))
    held: set[str] = set()
    with db.engine.connect() as conn:
        for start in range(0, len(wanted), CHUNK):
            chunk = wanted[start:start + CHUNK]
            held.update(conn.execute(select(Instance.sop_instance_uid).where(
                Instance.sop_instance_uid.in_(chunk))).scalars())
            held.update(conn.execute(select(DeliveryRecord.sop_instance_uid).where(
                DeliveryRecord.sop_instance_uid.in_(chunk))).scalars())
    return held


def backlog(db: Database) -> int:
    """Instances indexed and not finished: pending (waiting for their study to complete, or for the engine) and
    queued (sent to the workers)."""
    with db.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(Instance)
                            .where(Instance.status.in_(("pending", "queued")))).scalar_one()


# -- associations ---------------------------------------------------------------------------------------------------
def open_association(db: Database, listener: str, calling_ae: str, host: str) -> int:
    with db.engine.begin() as conn:
        return conn.execute(AssociationRecord.__table__.insert().values(
            listener=listener[:16], calling_ae=calling_ae[:16], peer_host=host[:64], started_at=utcnow(),
            outcome="open", instances=0, bytes=0, refused=0).returning(AssociationRecord.id)).scalar_one()


def close_association(db: Database, row_id: int, outcome: str, instances: int, size: int, refused: int,
                      reason: str | None) -> None:
    with db.engine.begin() as conn:
        conn.execute(sql_update(AssociationRecord).where(AssociationRecord.id == row_id).values(
            ended_at=utcnow(), outcome=outcome, instances=instances, bytes=size, refused=refused,
            reason=printable(reason)))


def record_rejection(db: Database, listener: str, calling_ae: str, host: str, reason: str) -> None:
    now = utcnow()
    with db.engine.begin() as conn:
        conn.execute(AssociationRecord.__table__.insert().values(
            listener=listener[:16], calling_ae=printable(calling_ae)[:16], peer_host=host[:64], started_at=now,
            ended_at=now, outcome="rejected", instances=0, bytes=0, refused=0, reason=reason))


# -- pulls ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FoundStudy:
    """One C-FIND match at study level (only what retrieval and the worklist need; never patient attributes)."""

    study_instance_uid: str
    study_date: date | None
    accession_number: str | None
    modalities: str | None
    instances: int | None


def record_found(db: Database, source: str, studies: Sequence[FoundStudy]) -> None:
    """Remember what a query found; a study found again keeps its status and attempts (resumable)."""
    if not studies:
        return
    now = utcnow()
    table = PullRecord.__table__
    stmt = _insert(db, table)
    stmt = stmt.on_conflict_do_update(
        index_elements=["source", "study_instance_uid"],
        set_={"instances_found": stmt.excluded.instances_found, "updated_at": stmt.excluded.updated_at})
    rows = [{"source": source, "study_instance_uid": s.study_instance_uid, "study_date": s.study_date,
             "accession_number": s.accession_number, "modalities": s.modalities, "instances_found": s.instances,
             "instances_retrieved": 0, "status": PullStatus.FOUND.value, "attempts": 0, "found_at": now,
             "updated_at": now} for s in studies]
    with db.engine.begin() as conn:
        for start in range(0, len(rows), CHUNK):
            conn.execute(stmt, rows[start:start + CHUNK])


def mark_pull(db: Database, source: str, study_uid: str, status: PullStatus, *, attempt: bool = False,
              error: str | None = None, retrieved: int | None = None) -> None:
    values: dict = {"status": status.value, "updated_at": utcnow()}
    if attempt:
        values["attempts"] = PullRecord.attempts + 1
    if status is PullStatus.FAILED or error is not None:
        values["last_error"] = printable(error)
    if status is PullStatus.RETRIEVED:
        values["retrieved_at"] = utcnow()
        values["last_error"] = None
    if retrieved is not None:
        values["instances_retrieved"] = retrieved
    with db.engine.begin() as conn:
        conn.execute(sql_update(PullRecord).where(PullRecord.source == source,
                                                  PullRecord.study_instance_uid == study_uid).values(**values))


def pull_rows(db: Database, source: str) -> dict[str, dict]:
    with db.engine.connect() as conn:
        return {r.study_instance_uid: dict(r._mapping) for r in conn.execute(
            select(PullRecord.study_instance_uid, PullRecord.status, PullRecord.attempts,
                   PullRecord.instances_retrieved, PullRecord.last_error).where(PullRecord.source == source))}


# -- deliveries -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OutputObject:
    """A DICOM output written to disk, to be delivered."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    kind: str  # sr, sc
    path: str


@dataclass(frozen=True)
class DeliveryJob:
    id: int
    destination: str
    sop_instance_uid: str
    path: str
    attempts: int


def add_deliveries(db: Database, destinations: Sequence[str], objects: Sequence[OutputObject]) -> int:
    """A delivery per object and destination, due now. An object already recorded for a destination (the same UID:
    the same content) is left as it is, delivered or not; an older object at the same path that has not been
    delivered yet (an SR rewritten as more of its study was screened, an SC of changed results) is superseded."""
    if not objects or not destinations:
        return 0
    now = utcnow()
    table = DeliveryRecord.__table__
    stmt = _insert(db, table).on_conflict_do_nothing(index_elements=["destination", "sop_instance_uid"])
    rows = [{"destination": d, "sop_instance_uid": o.sop_instance_uid, "sop_class_uid": o.sop_class_uid,
             "study_instance_uid": o.study_instance_uid, "kind": o.kind, "path": o.path,
             "status": DeliveryStatus.PENDING.value, "attempts": 0, "created_at": now, "updated_at": now,
             "next_attempt_at": now} for d in destinations for o in objects]
    with db.engine.begin() as conn:
        for o in objects:
            conn.execute(sql_update(DeliveryRecord).where(
                DeliveryRecord.path == o.path, DeliveryRecord.sop_instance_uid != o.sop_instance_uid,
                DeliveryRecord.status.in_((DeliveryStatus.PENDING.value, DeliveryStatus.FAILED.value)))
                .values(status=DeliveryStatus.SUPERSEDED.value, updated_at=now,
                        last_error="a newer version of this object replaced it before it was delivered"))
        conn.execute(stmt, rows)
    return len(rows)


def claim_deliveries(db: Database, limit: int = 64, lease_s: float = 120.0,
                     destinations: Sequence[str] | None = None) -> list[DeliveryJob]:
    """Take up to ``limit`` deliveries that are due (pending, or sending with a lapsed lease: their sender died).
    Each is taken by a compare-and-set update, so two senders (two workers) never take the same one."""
    now = utcnow()
    due = or_((DeliveryRecord.status == DeliveryStatus.PENDING.value) & (DeliveryRecord.next_attempt_at <= now),
              (DeliveryRecord.status == DeliveryStatus.SENDING.value) & (DeliveryRecord.lease_until < now))
    q = (select(DeliveryRecord.id, DeliveryRecord.destination, DeliveryRecord.sop_instance_uid, DeliveryRecord.path,
                DeliveryRecord.attempts)
         .where(due).order_by(DeliveryRecord.next_attempt_at, DeliveryRecord.id).limit(limit))
    if destinations is not None:
        q = q.where(DeliveryRecord.destination.in_(list(destinations)))
    taken: list[DeliveryJob] = []
    lease = now + timedelta(seconds=lease_s)
    with db.engine.begin() as conn:
        for row in conn.execute(q).all():  # still due when updated: another sender may have taken it meanwhile
            done = conn.execute(sql_update(DeliveryRecord).where(DeliveryRecord.id == row.id, due).values(
                status=DeliveryStatus.SENDING.value, lease_until=lease, updated_at=now))
            if done.rowcount == 1:
                taken.append(DeliveryJob(row.id, row.destination, row.sop_instance_uid, row.path, row.attempts))
    return taken


def finish_delivery(db: Database, job: DeliveryJob, status: DeliveryStatus, error: str | None = None,
                    retry_at: datetime | None = None) -> None:
    """Record one try: delivered, failed for good, superseded, or pending again at ``retry_at``."""
    now = utcnow()
    values: dict = {"status": status.value, "attempts": job.attempts + 1, "updated_at": now, "lease_until": None,
                    "last_error": printable(error)[:2000] if error else None}
    if status is DeliveryStatus.DELIVERED:
        values["delivered_at"] = now
    if status is DeliveryStatus.PENDING:
        values["next_attempt_at"] = retry_at or now
    if status is DeliveryStatus.SUPERSEDED:
        values["attempts"] = job.attempts
    with db.engine.begin() as conn:
        conn.execute(sql_update(DeliveryRecord).where(DeliveryRecord.id == job.id).values(**values))


def retry_failed_deliveries(db: Database, destinations: Sequence[str] | None = None) -> int:
    """Failed deliveries (of these destinations, or all) are due again with a fresh count of tries."""
    now = utcnow()
    q = sql_update(DeliveryRecord).where(DeliveryRecord.status == DeliveryStatus.FAILED.value)
    if destinations is not None:
        q = q.where(DeliveryRecord.destination.in_(list(destinations)))
    with db.engine.begin() as conn:
        return conn.execute(q.values(status=DeliveryStatus.PENDING.value, attempts=0, next_attempt_at=now,
                                     updated_at=now)).rowcount


def open_deliveries(db: Database, destinations: Sequence[str] | None = None) -> tuple[int, datetime | None]:
    """Deliveries still to try (pending or being sent) and when the earliest pending one is due."""
    q = select(func.count(), func.min(DeliveryRecord.next_attempt_at)).where(
        DeliveryRecord.status.in_((DeliveryStatus.PENDING.value, DeliveryStatus.SENDING.value)))
    if destinations is not None:
        q = q.where(DeliveryRecord.destination.in_(list(destinations)))
    with db.engine.connect() as conn:
        n, due = conn.execute(q).one()
    return int(n), aware_utc(due)


def deliveries_of(db: Database, study_uids: Iterable[str] | None = None) -> list[dict]:
    q = select(DeliveryRecord).order_by(DeliveryRecord.id)
    if study_uids is not None:
        q = q.where(DeliveryRecord.study_instance_uid.in_(list(study_uids)))
    with db.session() as s:
        return [{c.name: getattr(r, c.name) for c in DeliveryRecord.__table__.columns} for r in s.scalars(q)]


# -- neuron status -----------------------------------------------------------------------------------------------------
def network_status(db: Database, window_s: int = 3600) -> dict:
    """Receiving (the last hour), pulls and deliveries by status, for ``neuron status``. Empty dicts when this
    database never saw the network."""
    since = utcnow() - timedelta(seconds=window_s)
    out: dict = {"receiving": {}, "pulls": {}, "deliveries": {}}
    with db.engine.connect() as conn:
        a = AssociationRecord
        callers: dict[str, dict] = defaultdict(lambda: {"associations": 0, "instances": 0, "bytes": 0, "refused": 0,
                                                        "rejected": 0})
        for calling, host, outcome, n, instances, size, refused in conn.execute(
                select(a.calling_ae, a.peer_host, a.outcome, func.count(), func.sum(a.instances), func.sum(a.bytes),
                       func.sum(a.refused)).where(a.started_at >= since)
                .group_by(a.calling_ae, a.peer_host, a.outcome)):
            entry = callers[f"{calling}@{host}"]
            if outcome == "rejected":
                entry["rejected"] += n
            else:
                entry["associations"] += n
            entry["instances"] += int(instances or 0)
            entry["bytes"] += int(size or 0)
            entry["refused"] += int(refused or 0)
        if callers:
            last = conn.execute(select(a.reason, a.started_at).where(a.reason.is_not(None))
                                .order_by(a.started_at.desc()).limit(1)).first()
            out["receiving"] = {"window_s": window_s, "by_caller": dict(callers),
                                "open_associations": conn.execute(select(func.count()).select_from(a).where(
                                    a.outcome == "open", a.started_at >= since)).scalar_one(),
                                "last_refusal": None if last is None else last[0]}
        pulls: dict[str, dict[str, int]] = defaultdict(dict)
        for source, status, n in conn.execute(select(PullRecord.source, PullRecord.status, func.count())
                                              .group_by(PullRecord.source, PullRecord.status)):
            pulls[source][status] = n
        out["pulls"] = dict(pulls)
        deliveries: dict[str, dict[str, int]] = defaultdict(dict)
        for dest, status, n in conn.execute(select(DeliveryRecord.destination, DeliveryRecord.status, func.count())
                                            .group_by(DeliveryRecord.destination, DeliveryRecord.status)):
            deliveries[dest][status] = n
        out["deliveries"] = dict(deliveries)
        failed = conn.execute(select(DeliveryRecord.destination, DeliveryRecord.last_error)
                              .where(DeliveryRecord.status == DeliveryStatus.FAILED.value)
                              .order_by(DeliveryRecord.updated_at.desc()).limit(1)).first()
        out["last_delivery_error"] = None if failed is None else f"{failed[0]}: {failed[1]}"
    return out
