"""The contract between producer, worker and db: the values that cross a package boundary (torch-free, SQL-free).

    producer.scan ── FileEntry(InstanceEntry(InstanceHeader, StudyHeader)) ──► db (index)
    db ── WorkItem (IDs and a path, never pixels) ──► worker.pipeline ── Outcome(FrameResult(LabelScore ...)) ──► db
    producer.pull ── FoundStudy ──► db;  worker.dicom_out ── OutputObject ──► db ── DeliveryJob ──► worker.send

Every package imports these from here; ``db`` defines only how they are stored. Each type checks its invariants in
its constructor (an object that exists is valid): a route is held as ``Route``, a status as ``Status``, whatever
string came in at the boundary, and a reason never carries a control character into the database.

An instance's status moves along ``TRANSITIONS``; the only ways back to ``pending`` are the named ``Requeue``
operations, carried out by ``db.store.Database.requeue``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import date
from enum import Enum

# A label is positive at or above this calibrated probability. torchxrayvision's ``op_norm`` rescales each output so
# that 0.5 is that label's operating point (torchxrayvision/models.py, ``op_norm``), and the EfficientNet routes'
# softmax-free heads are trained and calibrated the same way; the SQL views are rendered from this one number.
POSITIVE = 0.5


class Route(str, Enum):
    """Model routes; the values are the strings stored in the database and the names of the broker's queues."""

    CHEST_XRAY = "chest-xray"
    MRI_US = "mri-us"
    SKIN = "skin"


class Status(str, Enum):
    """An instance's (or a file's) state; the values are the strings stored in the database and shown by
    ``neuron status``."""

    PENDING = "pending"  # indexed, not yet sent or screened
    QUEUED = "queued"  # sent to the broker or taken by a worker, not finished
    DONE = "done"
    FAILED = "failed"
    SKIPPED = "skipped"
    DUPLICATE = "duplicate"  # a file whose SOP Instance UID another path already holds (files only)


class Requeue(str, Enum):
    """The named operations that move an instance back to ``pending``; nothing else does."""

    AWAITING_MODEL = "awaiting-model"  # skipped while its route had no model; the route has one now
    LOST_MESSAGE = "requeue"  # queued, but the broker may have lost the message (neuron scan --requeue)
    SEND_FAILED = "send-failed"  # marked queued, then the message could not be sent
    RETRY_FAILED = "retry-failed"  # failed, its cause fixed (--retry-failed): the attempt count starts again
    DUPLICATE_COPY = "duplicate-copy"  # failed, and another file holds the same instance: screened from that copy
    RESCREEN = "rescreen"  # an operator asked for it (neuron rescreen --enqueue); results stay until replaced
    TRANSIENT = "transient"  # its file could not be read for now (storage, not the file): the next attempt reads it
    CHANGED_FILE = "changed-file"  # indexing found its file changed (size or mtime): the new content is screened

    @property
    def from_statuses(self) -> frozenset[Status]:
        return _REQUEUE_FROM[self]

    @property
    def resets_attempts(self) -> bool:
        """Only a fixed failure starts the count that stops a poison message again; a requeue must not wipe it."""
        return self is Requeue.RETRY_FAILED


_REQUEUE_FROM = {
    Requeue.AWAITING_MODEL: frozenset({Status.SKIPPED}),
    Requeue.LOST_MESSAGE: frozenset({Status.QUEUED}),
    Requeue.SEND_FAILED: frozenset({Status.QUEUED}),
    Requeue.RETRY_FAILED: frozenset({Status.FAILED}),
    Requeue.DUPLICATE_COPY: frozenset({Status.FAILED}),
    Requeue.RESCREEN: frozenset({Status.DONE, Status.FAILED, Status.SKIPPED, Status.QUEUED, Status.PENDING}),
    Requeue.TRANSIENT: frozenset({Status.PENDING, Status.QUEUED}),
    Requeue.CHANGED_FILE: frozenset({Status.DONE, Status.FAILED, Status.SKIPPED, Status.QUEUED, Status.PENDING}),
}

# Where an instance may go from each status, other than back to pending (``Requeue``): indexing decides the first
# status, a send marks it queued, an Outcome finishes it; a redelivered message or a rescreen finishes it again.
TRANSITIONS: dict[Status, frozenset[Status]] = {
    Status.PENDING: frozenset({Status.QUEUED, Status.DONE, Status.FAILED, Status.SKIPPED}),
    Status.QUEUED: frozenset({Status.DONE, Status.FAILED, Status.SKIPPED}),
    Status.DONE: frozenset({Status.DONE, Status.FAILED, Status.SKIPPED}),
    Status.FAILED: frozenset({Status.DONE, Status.FAILED, Status.SKIPPED}),
    Status.SKIPPED: frozenset({Status.DONE, Status.FAILED, Status.SKIPPED}),
}


def sources_of(target: Status) -> frozenset[Status]:
    """The statuses an instance may move to ``target`` from: the edges of ``TRANSITIONS``, or for ``pending`` only an
    Outcome's transient failure (``Requeue.TRANSIENT``); every other way back to pending is a named ``Requeue``."""
    if target is Status.PENDING:
        return _REQUEUE_FROM[Requeue.TRANSIENT]
    return frozenset(s for s, targets in TRANSITIONS.items() if target in targets)


# What a study's status is, from the set of its instances' statuses, in order: the first rule that matches wins.
# One rule for `neuron status`, the review page and every other caller (``study_status``).
STUDY_STATUS_RULES: tuple[tuple[Status, str], ...] = (
    (Status.QUEUED, "queued"),
    (Status.PENDING, "pending"),
    (Status.FAILED, "failed"),
)


def study_status(instance_statuses: set[str] | set[Status]) -> str:
    """A study is ``queued`` while any instance is with the broker or a worker, else ``pending`` while any waits to be
    sent, else ``failed`` if any failed, else ``done`` (screened or deliberately skipped)."""
    values = {Status(s) for s in instance_statuses}
    for status, name in STUDY_STATUS_RULES:
        if status in values:
            return name
    return "done"


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def printable(text: str | None) -> str | None:
    """Control characters escaped as \\xNN, for text that may quote a file's content (header values, a decoder's
    error). A NUL above all: PostgreSQL refuses it in text ("invalid byte sequence for encoding UTF8: 0x00") while
    SQLite stores it, so unescaped, one hostile file fails a whole group commit of other studies' results on
    PostgreSQL and not on SQLite."""
    return None if text is None else _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


# -- what the producer learns from a header ------------------------------------------------------------------------
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
    # what gating and drift monitoring read (the birth date never gets here: only the age it gives)
    view_position: str | None = None  # canonical view (neuron.routes.VIEWS), from ViewPosition or a description
    age_years: int | None = None  # whole years at the study, at most AGE_CAP
    manufacturer: str | None = None
    manufacturer_model: str | None = None
    bits_stored: int | None = None
    pixel_spacing: float | None = None  # mm, PixelSpacing or ImagerPixelSpacing (row spacing)

    def __post_init__(self) -> None:
        if not self.sop_instance_uid:
            raise ValueError("an instance header needs a SOP Instance UID")
        if self.frames < 1:
            raise ValueError(f"frames {self.frames} must be at least 1")
        if self.age_years is not None and not 0 <= self.age_years <= AGE_CAP:
            raise ValueError(f"age {self.age_years} must be 0 to {AGE_CAP} years (older ages are stored as "
                             f"{AGE_CAP})")

    def row(self) -> dict:
        """The header as the ``instances`` columns it is stored in (a plain dict, built without reflection: indexing
        calls this once per file)."""
        return {"sop_instance_uid": self.sop_instance_uid, "study_instance_uid": self.study_instance_uid,
                "series_instance_uid": self.series_instance_uid, "sop_class_uid": self.sop_class_uid,
                "modality": self.modality, "body_part": self.body_part, "photometric": self.photometric,
                "transfer_syntax": self.transfer_syntax, "rows": self.rows, "columns": self.columns,
                "frames": self.frames, "view_position": self.view_position, "age_years": self.age_years,
                "manufacturer": self.manufacturer, "manufacturer_model": self.manufacturer_model,
                "bits_stored": self.bits_stored, "pixel_spacing": self.pixel_spacing}


HEADER_COLUMNS = ("study_instance_uid", "series_instance_uid", "sop_class_uid", "modality", "body_part", "photometric",
                  "transfer_syntax", "rows", "columns", "frames", "view_position", "age_years", "manufacturer",
                  "manufacturer_model", "bits_stored", "pixel_spacing")
GATING_COLUMNS = ("population_route", "outside_population", "gating_notes")  # InstanceEntry.gating_row
# Ages above 89 are stored as 90: HIPAA's Safe Harbor method aggregates them (45 CFR 164.514(b)(2)(i)(C)).
AGE_CAP = 90


@dataclass(frozen=True)
class StudyHeader:
    """What the worklist needs from one instance's header about its study (built by producer.scan)."""

    study_instance_uid: str
    study_date: date | None
    accession_number: str | None
    study_description: str | None
    patient_key: str | None  # HMAC of the Patient ID, never the ID itself

    def row(self) -> dict:
        return {"study_instance_uid": self.study_instance_uid, "study_date": self.study_date,
                "accession_number": self.accession_number, "study_description": self.study_description,
                "patient_key": self.patient_key}


@dataclass(frozen=True)
class InstanceEntry:
    header: InstanceHeader
    route: Route | None
    status: Status
    reason: str | None = None
    study: StudyHeader | None = None  # the study's header facts for the worklist
    # input gating (neuron.routes.gate): the route whose trained population was checked, why the instance is outside
    # it (screened and flagged, or skipped), and what the header could not tell
    population_route: Route | None = None
    outside_population: str | None = None
    gating_notes: str | None = None

    def __post_init__(self) -> None:
        if self.route is not None:
            object.__setattr__(self, "route", Route(self.route))
        if self.population_route is not None:
            object.__setattr__(self, "population_route", Route(self.population_route))
        object.__setattr__(self, "status", Status(self.status))
        object.__setattr__(self, "reason", printable(self.reason))
        object.__setattr__(self, "outside_population", printable(self.outside_population))
        object.__setattr__(self, "gating_notes", printable(self.gating_notes))
        if self.outside_population is not None and self.population_route is None:
            raise ValueError("an instance outside a trained population names the route whose population it is")

    def gating_row(self) -> dict:
        return {"population_route": self.population_route.value if self.population_route else None,
                "outside_population": self.outside_population, "gating_notes": self.gating_notes}


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

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", Status(self.status))
        object.__setattr__(self, "reason", printable(self.reason))


# -- what the engine takes and gives back --------------------------------------------------------------------------
@dataclass(frozen=True)
class WorkItem:
    """One instance to screen: IDs and a path, never pixels."""

    sop_instance_uid: str
    file_path: str
    route: Route
    frames: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "route", Route(self.route))
        object.__setattr__(self, "frames", max(1, int(self.frames or 1)))


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
    # distance of the frame's penultimate features from the route's reference (neuron_models.ood), and whether it is
    # above the reference's threshold; both None without a reference
    ood_score: float | None = None
    out_of_distribution: bool | None = None

    def __post_init__(self) -> None:
        if (self.ood_score is None) != (self.out_of_distribution is None):
            raise ValueError("ood_score and out_of_distribution go together: both set (a reference) or both None")
        if self.ood_score is not None:
            if not math.isfinite(self.ood_score) or self.ood_score < 0:
                raise ValueError(f"ood_score {self.ood_score} must be a finite distance, 0 or more")
            object.__setattr__(self, "ood_score", float(self.ood_score))
            object.__setattr__(self, "out_of_distribution", bool(self.out_of_distribution))


@dataclass(frozen=True)
class Outcome:
    """The end of one instance's processing: done with results, or failed/skipped (or pending: tried again later)
    with a reason."""

    sop_instance_uid: str
    status: Status
    reason: str | None = None
    frames: tuple[FrameResult, ...] = ()
    worker: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", Status(self.status))
        object.__setattr__(self, "reason", printable(self.reason))
        if self.frames and self.status is not Status.DONE:
            raise ValueError(f"an outcome with results must be done, not {self.status.value}")


# -- what the DICOM network records (db/network.py stores them; producer.listen, producer.pull, worker.send) --------
class AssociationOutcome(str, Enum):
    """How an association a listener saw ended (the ``associations`` table)."""

    OPEN = "open"  # still going (or the listener was killed while it was)
    RELEASED = "released"  # A-RELEASE: the sender finished
    ABORTED = "aborted"  # A-ABORT, or the connection dropped
    REJECTED = "rejected"  # A-ASSOCIATE-RJ: a calling AE title outside --allow-ae


class PullStatus(str, Enum):
    """Where the retrieval of one study a ``neuron pull`` found stands (the ``pulls`` table)."""

    FOUND = "found"
    RETRIEVING = "retrieving"
    RETRIEVED = "retrieved"
    FAILED = "failed"


class DeliveryStatus(str, Enum):
    """Where the delivery of one DICOM output to one destination stands (the ``deliveries`` table)."""

    PENDING = "pending"  # waiting for its (next) try
    SENDING = "sending"  # taken by a sender; taken again by another once its lease passes (the sender died)
    DELIVERED = "delivered"
    FAILED = "failed"  # out of tries, or refused for good; ``neuron send --failed`` tries again
    SUPERSEDED = "superseded"  # a newer version of the object (a rewritten SR) replaced the file before it was sent


@dataclass(frozen=True)
class FoundStudy:
    """One study-level C-FIND match: only what retrieval and the worklist need, never a patient attribute."""

    study_instance_uid: str
    study_date: date | None
    accession_number: str | None
    modalities: str | None
    instances: int | None


@dataclass(frozen=True)
class OutputObject:
    """A DICOM output written to disk (an SR or a secondary capture), to be delivered."""

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    kind: str  # sr, sc
    path: str


@dataclass(frozen=True)
class DeliveryJob:
    """One delivery a sender has taken: which object to which destination, and how many tries it had."""

    id: int
    destination: str
    sop_instance_uid: str
    path: str
    attempts: int
    study_instance_uid: str = ""  # STOW-RS posts a study's objects together, to that study's resource
