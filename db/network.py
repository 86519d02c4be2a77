"""What Neuron did on the DICOM network, in three tables (defined in db/schema.py), and every query on them.

    associations   one row per association a listener accepted or refused: calling AE title and host, when, how it
                   ended (``neuron.work.AssociationOutcome``), instances stored, bytes, instances refused and the
                   last reason
    pulls          one row per study a ``neuron pull`` found on a source: what the PACS said it holds, what was
                   retrieved, attempts, status (``neuron.work.PullStatus``) and the last error
    deliveries     one row per DICOM output (SR, secondary capture) and destination: attempts, status
                   (``neuron.work.DeliveryStatus``), the last error and when the next try is due

Also the two questions the receiver asks of the index (is this stored file indexed; when was the last file of the
store indexed). No patient attribute is stored here: UIDs, AE titles, hosts, counts and status texts only.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta

from sqlalchemy import func, inspect, or_, select
from sqlalchemy import update as sql_update

from db.schema import AssociationRecord, DeliveryRecord, FileRecord, Instance, PullRecord, aware_utc, chunks, utcnow
from db.store import Database, _mapped
from neuron.work import (
    AssociationOutcome,
    DeliveryJob,
    DeliveryStatus,
    FoundStudy,
    OutputObject,
    PullStatus,
    Status,
    printable,
)


# -- the receiver's store and the index ---------------------------------------------------------------------------
@_mapped("the index could not be read")
def is_indexed(db: Database, path: str) -> bool:
    """Whether a file at this (resolved) path is indexed."""
    with db.engine.connect() as conn:
        return conn.execute(select(FileRecord.id).where(FileRecord.path == path)).first() is not None


@_mapped("the index could not be read")
def last_indexed_under(db: Database, prefix: str) -> datetime | None:
    """When the newest file whose path starts with ``prefix`` was indexed (None: none is)."""
    with db.engine.connect() as conn:
        return aware_utc(conn.execute(select(func.max(FileRecord.seen_at))
                                      .where(FileRecord.path.startswith(prefix))).scalar_one())


# -- instances already held -------------------------------------------------------------------------------------------
@_mapped("the instances held could not be read")
def held_instances(db: Database, sop_uids: Iterable[str]) -> set[str]:
    """Which of these SOP Instance UIDs are here already: indexed (from any folder, listener or pull), or made here (a
    DICOM output Neuron wrote and delivered, which a PACS then holds in the source study)."""
    held: set[str] = set()
    with db.engine.connect() as conn:
        for chunk in chunks(sop_uids):
            held.update(conn.execute(select(Instance.sop_instance_uid).where(
                Instance.sop_instance_uid.in_(chunk))).scalars())
            held.update(conn.execute(select(DeliveryRecord.sop_instance_uid).where(
                DeliveryRecord.sop_instance_uid.in_(chunk))).scalars())
    return held


@_mapped("the backlog could not be counted")
def backlog(db: Database) -> int:
    """Instances indexed and not finished: pending (waiting for their study to complete, or for the engine) and
    queued (sent to the workers)."""
    with db.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(Instance)
                            .where(Instance.status.in_((Status.PENDING.value, Status.QUEUED.value)))).scalar_one()


# -- associations ---------------------------------------------------------------------------------------------------
@_mapped("the association could not be recorded")
def open_association(db: Database, listener: str, calling_ae: str, host: str) -> int:
    with db.engine.begin() as conn:
        return conn.execute(AssociationRecord.__table__.insert().values(
            listener=listener[:16], calling_ae=calling_ae[:16], peer_host=host[:64], started_at=utcnow(),
            outcome=AssociationOutcome.OPEN.value, instances=0, bytes=0, refused=0)
            .returning(AssociationRecord.id)).scalar_one()


@_mapped("the association's end could not be recorded")
def close_association(db: Database, row_id: int, outcome: AssociationOutcome, instances: int, size: int,
                      refused: int, reason: str | None) -> None:
    with db.engine.begin() as conn:
        conn.execute(sql_update(AssociationRecord).where(AssociationRecord.id == row_id).values(
            ended_at=utcnow(), outcome=AssociationOutcome(outcome).value, instances=instances, bytes=size,
            refused=refused, reason=printable(reason)))


@_mapped("the rejected association could not be recorded")
def record_rejection(db: Database, listener: str, calling_ae: str, host: str, reason: str) -> None:
    now = utcnow()
    with db.engine.begin() as conn:
        conn.execute(AssociationRecord.__table__.insert().values(
            listener=listener[:16], calling_ae=printable(calling_ae)[:16], peer_host=host[:64], started_at=now,
            ended_at=now, outcome=AssociationOutcome.REJECTED.value, instances=0, bytes=0, refused=0, reason=reason))


# -- pulls ------------------------------------------------------------------------------------------------------------
@_mapped("the studies found could not be recorded")
def record_found(db: Database, source: str, studies: Sequence[FoundStudy]) -> None:
    """Remember what a query found; a study found again keeps its status and attempts (resumable)."""
    if not studies:
        return
    now = utcnow()
    table = PullRecord.__table__
    stmt = db._insert(table)
    stmt = stmt.on_conflict_do_update(
        index_elements=["source", "study_instance_uid"],
        set_={"instances_found": stmt.excluded.instances_found, "updated_at": stmt.excluded.updated_at})
    rows = [{"source": source, "study_instance_uid": s.study_instance_uid, "study_date": s.study_date,
             "accession_number": s.accession_number, "modalities": s.modalities, "instances_found": s.instances,
             "instances_retrieved": 0, "status": PullStatus.FOUND.value, "attempts": 0, "found_at": now,
             "updated_at": now} for s in studies]
    with db.engine.begin() as conn:
        conn.execute(stmt, rows)  # one executemany: SQLAlchemy sends it as multi-VALUES pages


@_mapped("the pull's progress could not be recorded")
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


# -- deliveries -------------------------------------------------------------------------------------------------------
@_mapped("the deliveries could not be recorded")
def add_deliveries(db: Database, destinations: Sequence[str], objects: Sequence[OutputObject]) -> int:
    """A delivery per object and destination, due now. An object already recorded for a destination (the same UID:
    the same content) is left as it is, delivered or not; an older object at the same path that has not been
    delivered yet (an SR rewritten as more of its study was screened, an SC of changed results) is superseded."""
    if not objects or not destinations:
        return 0
    now = utcnow()
    table = DeliveryRecord.__table__
    stmt = db._insert(table).on_conflict_do_nothing(index_elements=["destination", "sop_instance_uid"])
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


@_mapped("the due deliveries could not be taken")
def claim_deliveries(db: Database, limit: int = 64, lease_s: float = 120.0,
                     destinations: Sequence[str] | None = None) -> list[DeliveryJob]:
    """Take up to ``limit`` deliveries that are due (pending, or sending with a lapsed lease: their sender died).
    Each is taken by a compare-and-set update, so two senders (two workers) never take the same one."""
    now = utcnow()
    due = or_((DeliveryRecord.status == DeliveryStatus.PENDING.value) & (DeliveryRecord.next_attempt_at <= now),
              (DeliveryRecord.status == DeliveryStatus.SENDING.value) & (DeliveryRecord.lease_until < now))
    q = (select(DeliveryRecord.id, DeliveryRecord.destination, DeliveryRecord.sop_instance_uid, DeliveryRecord.path,
                DeliveryRecord.attempts, DeliveryRecord.study_instance_uid)
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
                taken.append(DeliveryJob(row.id, row.destination, row.sop_instance_uid, row.path, row.attempts,
                                         row.study_instance_uid))
    return taken


@_mapped("the delivery's try could not be recorded")
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


@_mapped("the failed deliveries could not be put back in line")
def retry_failed_deliveries(db: Database, destinations: Sequence[str] | None = None) -> int:
    """Failed deliveries (of these destinations, or all) are due again with a fresh count of tries."""
    now = utcnow()
    q = sql_update(DeliveryRecord).where(DeliveryRecord.status == DeliveryStatus.FAILED.value)
    if destinations is not None:
        q = q.where(DeliveryRecord.destination.in_(list(destinations)))
    with db.engine.begin() as conn:
        return conn.execute(q.values(status=DeliveryStatus.PENDING.value, attempts=0, next_attempt_at=now,
                                     updated_at=now)).rowcount


@_mapped("the open deliveries could not be counted")
def open_deliveries(db: Database, destinations: Sequence[str] | None = None) -> tuple[int, datetime | None]:
    """Deliveries still to try (pending or being sent) and when the earliest pending one is due."""
    q = select(func.count(), func.min(DeliveryRecord.next_attempt_at)).where(
        DeliveryRecord.status.in_((DeliveryStatus.PENDING.value, DeliveryStatus.SENDING.value)))
    if destinations is not None:
        q = q.where(DeliveryRecord.destination.in_(list(destinations)))
    with db.engine.connect() as conn:
        n, due = conn.execute(q).one()
    return int(n), aware_utc(due)


@_mapped("the deliveries could not be read")
def deliveries_of(db: Database, study_uids: Iterable[str] | None = None) -> list[dict]:
    """Every delivery (of these studies) as a dict of its columns, in the order they were recorded."""
    q = select(DeliveryRecord.__table__)
    with db.engine.connect() as conn:
        if study_uids is None:
            rows = conn.execute(q).all()
        else:
            rows = [r for chunk in chunks(study_uids)
                    for r in conn.execute(q.where(DeliveryRecord.study_instance_uid.in_(chunk))).all()]
    return sorted((dict(r._mapping) for r in rows), key=lambda d: d["id"])


# -- neuron status -----------------------------------------------------------------------------------------------------
@_mapped("the network's status could not be read")
def network_status(db: Database, window_s: int = 3600) -> dict | None:
    """Receiving (the last hour), pulls and deliveries by status, for ``neuron status``. Empty dicts when this
    database never saw the network; None for a database from before the network tables (``neuron db upgrade`` adds
    them)."""
    if not inspect(db.engine).has_table(DeliveryRecord.__tablename__):
        return None
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
            if outcome == AssociationOutcome.REJECTED.value:
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
                                    a.outcome == AssociationOutcome.OPEN.value, a.started_at >= since)).scalar_one(),
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
