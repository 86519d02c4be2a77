"""The audit trail: who saw or changed what, when, and from where, in the ``audit`` table; one code path for the review
app and the command line (``record``), an export as CSV or as FHIR AuditEvent resources, and the one way rows leave
(``prune``).

    review app (study page, heatmap, verdict, sign-in) ─┐
    neuron export / purge / rescreen / audit ───────────┤
    --fhir-out (a study's Bundle written) ──────────────┴─► record(db, Event) ─► INSERT INTO audit

Append-only by construction and by the database: nothing here updates a row, and triggers (migration 0007) refuse
every UPDATE and every DELETE except the rows older than a cut-off that ``prune`` writes into ``audit_prune`` within
its own transaction. A purge of results keeps the audit of who saw them: audit rows name studies by UID and hold no
foreign key to the results. Rows carry no patient name or ID (there is none in the database).

The FHIR form follows the R4 AuditEvent resource (https://hl7.org/fhir/R4/auditevent.html) with the event types of
DICOM PS3.15 Annex A.5 (DCM 110103 "DICOM Instances Accessed", 110106 "Export", 110105 "DICOM Study Deleted", 110101
"Audit Log Used", 110114 "User Authentication"), the codings IHE ATNA uses.
"""

from __future__ import annotations

import base64
import csv
import io
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum

from sqlalchemy import delete, func, insert, select
from sqlalchemy.engine import Connection

from db.schema import AuditEntry, AuditPrune, utcnow
from db.store import Database
from neuron.work import printable


class Action(str, Enum):
    """What was done; the values are the strings stored in ``audit.action``."""

    VIEW_STUDY = "view-study"
    VIEW_HEATMAP = "view-heatmap"
    VERDICT = "verdict"
    SIGN_IN = "sign-in"
    EXPORT = "export"
    PURGE = "purge"
    RESCREEN = "rescreen"
    AUDIT_EXPORT = "audit-export"
    AUDIT_PRUNE = "audit-prune"


@dataclass(frozen=True)
class Actor:
    """Who: the signed-in reviewer, "loopback" for an anonymous reader on this machine, or the operating-system user
    of a command; from where: the client's address, or the host a command ran on."""

    who: str
    address: str | None = None

    def __post_init__(self) -> None:
        who = printable((self.who or "").strip())[:128]
        if not who:
            raise ValueError("an audit actor needs a name: the reviewer, 'loopback' or the command's user")
        object.__setattr__(self, "who", who)
        object.__setattr__(self, "address", printable(self.address)[:128] if self.address else None)


def process_actor(role: str) -> Actor:
    """This process, for the audit trail: the operating-system account (from the process's user ID, not from the
    environment, which anyone can set) and ``role@host`` (``cli`` for a command, ``run``, ``worker``... for what a
    screening process writes on its own)."""
    import os
    import pwd
    import socket

    try:
        who = pwd.getpwuid(os.getuid()).pw_name
    except KeyError:  # a container's UID with no passwd entry
        who = f"uid {os.getuid()}"
    return Actor(who, f"{role}@{socket.gethostname()}")


@dataclass(frozen=True)
class Event:
    actor: Actor
    action: Action
    study_instance_uid: str | None = None
    target: str | None = None  # the finding, selection or filter
    detail: str | None = None  # what came of it
    outcome: str = "success"  # or "failure" (a refused sign-in)
    at: datetime | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "action", Action(self.action))
        if self.outcome not in ("success", "failure"):
            raise ValueError(f"audit outcome {self.outcome!r} is not success or failure")
        object.__setattr__(self, "target", printable(self.target))
        object.__setattr__(self, "detail", printable(self.detail))

    def row(self) -> dict:
        return {"at": self.at or utcnow(), "actor": self.actor.who, "address": self.actor.address,
                "action": self.action.value, "outcome": self.outcome, "study_instance_uid": self.study_instance_uid,
                "target": self.target, "detail": self.detail}


def record(target: Database | Connection, *events: Event) -> None:
    """Append these events; on a Connection, inside its transaction (a purge and its audit row commit together)."""
    if not events:
        return
    rows = [e.row() for e in events]
    if isinstance(target, Connection):
        target.execute(insert(AuditEntry), rows)
        return
    with target.engine.begin() as conn:
        conn.execute(insert(AuditEntry), rows)


@dataclass(frozen=True)
class Row:
    id: int
    at: datetime
    actor: str
    address: str | None
    action: str
    outcome: str
    study_instance_uid: str | None
    target: str | None
    detail: str | None

    @property
    def utc(self) -> datetime:
        return self.at.replace(tzinfo=UTC) if self.at.tzinfo is None else self.at.astimezone(UTC)


COLUMNS = ("id", "at", "actor", "address", "action", "outcome", "study_instance_uid", "target", "detail")


def entries(db: Database, since: datetime | None = None, until: datetime | None = None) -> list[Row]:
    """The audit rows from ``since`` (inclusive) to ``until`` (exclusive), oldest first."""
    q = select(*(getattr(AuditEntry, c) for c in COLUMNS)).order_by(AuditEntry.at, AuditEntry.id)
    if since is not None:
        q = q.where(AuditEntry.at >= since)
    if until is not None:
        q = q.where(AuditEntry.at < until)
    with db.session() as s:
        return [Row(*r) for r in s.execute(q)]


def prune(db: Database, before: datetime, actor: Actor) -> int:
    """Delete the audit rows older than ``before`` and record that it was done, by whom (the only deletion the
    triggers let through: the cut-off is written to ``audit_prune`` and removed in the same transaction)."""
    with db.engine.begin() as conn:
        n = conn.execute(select(func.count()).select_from(AuditEntry).where(AuditEntry.at < before)).scalar_one()
        conn.execute(insert(AuditPrune).values(before=before))
        conn.execute(delete(AuditEntry).where(AuditEntry.at < before))
        conn.execute(delete(AuditPrune).where(AuditPrune.before == before))
        record(conn, Event(actor, Action.AUDIT_PRUNE, target=f"rows before {before.isoformat()}",
                           detail=f"{n} rows deleted"))
    return n


# -- exports --------------------------------------------------------------------------------------------------------
def to_csv(rows: Sequence[Row]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(COLUMNS)
    for r in rows:
        writer.writerow([r.id, r.utc.isoformat(), r.actor, r.address or "", r.action, r.outcome,
                         r.study_instance_uid or "", r.target or "", r.detail or ""])
    return out.getvalue()


DCM = "http://dicom.nema.org/resources/ontology/DCM"
# action -> (DICOM audit event ID, its display, FHIR AuditEvent.action: C create, R read, U update, D delete, E execute)
EVENT_TYPES = {
    Action.VIEW_STUDY: ("110103", "DICOM Instances Accessed", "R"),
    Action.VIEW_HEATMAP: ("110103", "DICOM Instances Accessed", "R"),
    Action.VERDICT: ("110103", "DICOM Instances Accessed", "C"),
    Action.SIGN_IN: ("110114", "User Authentication", "E"),
    Action.EXPORT: ("110106", "Export", "R"),
    Action.PURGE: ("110105", "DICOM Study Deleted", "D"),
    Action.RESCREEN: ("110103", "DICOM Instances Accessed", "U"),
    Action.AUDIT_EXPORT: ("110101", "Audit Log Used", "R"),
    Action.AUDIT_PRUNE: ("110101", "Audit Log Used", "D"),
}
OBJECT_TYPE = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLE = "http://terminology.hl7.org/CodeSystem/object-role"
NETWORK_TYPE_MACHINE, NETWORK_TYPE_IP = "1", "2"


def _network(address: str | None) -> dict | None:
    if not address:
        return None
    import ipaddress

    try:
        ipaddress.ip_address(address)
        kind = NETWORK_TYPE_IP
    except ValueError:
        kind = NETWORK_TYPE_MACHINE
    return {"address": address, "type": kind}


def audit_event(r: Row, source: str) -> dict:
    """One audit row as a FHIR R4 AuditEvent resource."""
    code, display, action = EVENT_TYPES.get(Action(r.action), ("110100", "Application Activity", "E"))
    agent = {"type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/extra-security-role-type",
                                  "code": "humanuser", "display": "human user"}]},
             "who": {"display": r.actor}, "requestor": True}
    network = _network(r.address)
    if network is not None:
        agent["network"] = network
    entities = []
    if r.study_instance_uid:
        entities.append({"what": {"identifier": {"system": "urn:dicom:uid",
                                                 "value": f"urn:oid:{r.study_instance_uid}",
                                                 "type": {"coding": [{"system": DCM, "code": "110180",
                                                                      "display": "Study Instance UID"}]}}},
                         "type": {"system": OBJECT_TYPE, "code": "2", "display": "System Object"},
                         "role": {"system": OBJECT_ROLE, "code": "3", "display": "Report"}})
    if r.target:
        entities.append({"type": {"system": OBJECT_TYPE, "code": "2", "display": "System Object"},
                         "role": {"system": OBJECT_ROLE, "code": "24", "display": "Query"},
                         "description": r.target,
                         "query": base64.b64encode(r.target.encode()).decode()})
    event = {"resourceType": "AuditEvent", "id": f"neuron-audit-{r.id}",
             "type": {"system": DCM, "code": code, "display": display},
             "subtype": [{"system": "urn:neuron:audit-action", "code": r.action}],
             "action": action, "recorded": r.utc.isoformat(),
             "outcome": "0" if r.outcome == "success" else "4",
             "agent": [agent],
             "source": {"observer": {"display": source},
                        "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                                  "code": "4", "display": "Application Server"}]}}
    if r.detail:
        event["outcomeDesc"] = r.detail
    if entities:
        event["entity"] = entities
    return event


def fhir_bundle(rows: Iterable[Row], source: str = "neuron") -> dict:
    """The rows as a FHIR R4 Bundle (type collection) of AuditEvent resources."""
    events = [audit_event(r, source) for r in rows]
    return {"resourceType": "Bundle", "type": "collection", "timestamp": utcnow().isoformat(),
            "entry": [{"fullUrl": f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, 'neuron-audit:' + e['id'])}",
                       "resource": e} for e in events]}
