"""Tables and the public views (``findings``, ``ingest_status``, ``study_findings``, ``reviews``).

Tables are ours to change; the views are the documented interface that users and tools query, so their columns only
ever grow. Status and route columns hold the string values of ``neuron.work.Status`` and ``neuron.routes.Route``; the
views' ``positive`` is rendered from ``neuron.work.POSITIVE``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import UTC, date, datetime
from typing import TypeVar

from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    or_,
    text,
)
from sqlalchemy import false as sa_false
from sqlalchemy.engine import Connection
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from neuron.work import POSITIVE

T = TypeVar("T")


def utcnow() -> datetime:
    return datetime.now(UTC)


def aware_utc(value: datetime | None) -> datetime | None:
    """A timestamp read back from the database, with its zone: on SQLite a ``DateTime(timezone=True)`` column comes
    back without one (``sqlalchemy.dialects.sqlite.DATETIME`` stores "YYYY-MM-DD HH:MM:SS.ffffff", no offset); every
    timestamp here is written in UTC (``utcnow``)."""
    return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


# Values per bounded ``IN (...)``: SQLite before 3.32 allowed at most 999 bound parameters per statement
# (SQLITE_MAX_VARIABLE_NUMBER, https://www.sqlite.org/limits.html), and long IN lists plan badly on both databases.
IN_CHUNK = 500


def chunks(values: Iterable[T], size: int = IN_CHUNK) -> Iterator[list[T]]:
    """``values`` (duplicates dropped, order kept) in lists of at most ``size``: the one way a query over many keys
    is split into bounded ``IN`` lists."""
    unique = list(dict.fromkeys(values))
    for start in range(0, len(unique), size):
        yield unique[start:start + size]


class Base(DeclarativeBase):
    pass


class FileRecord(Base):
    """One row per file seen under a scanned folder, DICOM or not."""

    __tablename__ = "files"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    path: Mapped[str] = mapped_column(Text, unique=True)
    size: Mapped[int] = mapped_column(BigInteger)
    mtime_ns: Mapped[int] = mapped_column(BigInteger)
    sop_instance_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    seen_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Instance(Base):
    """One row per SOP Instance UID; the file it is read from is the first path it was seen at."""

    __tablename__ = "instances"

    sop_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str | None] = mapped_column(String(64))
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part: Mapped[str | None] = mapped_column(String(64))
    photometric: Mapped[str | None] = mapped_column(String(32))
    transfer_syntax: Mapped[str | None] = mapped_column(String(64))
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    frames: Mapped[int] = mapped_column(Integer, default=1)
    file_id: Mapped[int] = mapped_column(ForeignKey("files.id"))
    route: Mapped[str | None] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), index=True)
    reason: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # what gating and drift monitoring read from the header (never the birth date: the age it gave, capped at 90)
    view_position: Mapped[str | None] = mapped_column(String(16))
    age_years: Mapped[int | None] = mapped_column(Integer)
    manufacturer: Mapped[str | None] = mapped_column(String(64))
    manufacturer_model: Mapped[str | None] = mapped_column(String(64))
    bits_stored: Mapped[int | None] = mapped_column(Integer)
    pixel_spacing: Mapped[float | None] = mapped_column(Float)
    # input gating (neuron.routes.gate): the route whose trained population was checked (NULL: indexed before gating
    # existed), why the instance is outside it (screened and flagged; or skipped, then with no route), and what the
    # header could not tell
    population_route: Mapped[str | None] = mapped_column(String(32))
    outside_population: Mapped[str | None] = mapped_column(Text)
    gating_notes: Mapped[str | None] = mapped_column(Text)


class Study(Base):
    """One row per Study Instance UID: what the worklist needs from the header (written when the study's files are
    indexed) and a summary of its results (kept current by every results commit, rescreen and purge: the worklist
    orders and pages on indexed columns instead of aggregating the predictions table on every request).

    Patient identity is not stored: ``patient_key`` is HMAC-SHA256(secret, Patient ID), and only with --patient-key.
    """

    __tablename__ = "studies"
    __table_args__ = (
        Index("ix_studies_top_probability", "top_probability"),
        Index("ix_studies_study_date", "study_date"),
        Index("ix_studies_patient_key", "patient_key"),
    )

    study_instance_uid: Mapped[str] = mapped_column(String(64), primary_key=True)
    study_date: Mapped[date | None] = mapped_column(Date)
    accession_number: Mapped[str | None] = mapped_column(String(16))
    study_description: Mapped[str | None] = mapped_column(String(64))
    patient_key: Mapped[str | None] = mapped_column(String(64))
    modalities: Mapped[str | None] = mapped_column(String(64))
    top_probability: Mapped[float | None] = mapped_column(Float)
    top_label: Mapped[str | None] = mapped_column(String(64))
    top_model: Mapped[str | None] = mapped_column(String(64))
    positive_findings: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    needs_review: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    screened_instances: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    screened_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Verdict(Base):
    """A reviewer's verdict on one finding (by its natural key, so it survives a rescreen that replaces the
    prediction row). History is kept; the newest verdict of a reviewer on a finding is the one that counts."""

    __tablename__ = "verdicts"
    __table_args__ = (
        Index("ix_verdicts_study", "study_instance_uid"),
        Index("ix_verdicts_finding", "sop_instance_uid", "frame", "model", "weights", "label"),
    )
    VALUES = ("agree", "disagree", "unsure")

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    frame: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(64))
    weights: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(64))
    verdict: Mapped[str] = mapped_column(String(16))
    note: Mapped[str | None] = mapped_column(Text)
    reviewer: Mapped[str] = mapped_column(String(128))
    reviewed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class HeatmapFolder(Base):
    """A folder a screening run or worker wrote heatmaps into (its shared name): the review page serves a finding's
    heatmap only from inside one of these, wherever the review server was started."""

    __tablename__ = "heatmap_folders"

    path: Mapped[str] = mapped_column(Text, primary_key=True)
    first_used_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class PipelineConfig(Base):
    """The exact preprocessing and TTA settings behind a set of predictions, keyed by their hash."""

    __tablename__ = "pipeline_configs"

    config_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    model: Mapped[str] = mapped_column(String(64))
    settings_json: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Prediction(Base):
    """One probability for one label of one frame of one instance from one model and set of weights."""

    __tablename__ = "predictions"
    __table_args__ = (
        UniqueConstraint("sop_instance_uid", "frame", "model", "weights", "label", name="uq_prediction_natural_key"),
        Index("ix_predictions_label_probability", "label", "probability"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(ForeignKey("instances.sop_instance_uid"))
    frame: Mapped[int] = mapped_column(Integer)
    model: Mapped[str] = mapped_column(String(64))
    weights: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(64))
    probability: Mapped[float] = mapped_column(Float)
    uncertainty: Mapped[float] = mapped_column(Float)
    rank: Mapped[int] = mapped_column(Integer)
    heatmap_path: Mapped[str | None] = mapped_column(Text)
    config_hash: Mapped[str] = mapped_column(ForeignKey("pipeline_configs.config_hash"))
    untrained: Mapped[bool] = mapped_column(Boolean)
    worker: Mapped[str | None] = mapped_column(String(128))
    needs_review: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa_false())
    decoder: Mapped[str | None] = mapped_column(String(64))  # provenance: e.g. "native", "imagecodecs-... jpeg2k"
    processed_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)
    # the frame's distance from the route's reference and whether it passes the reference's threshold (NULL: no
    # reference); the same on every label's row of a frame
    ood_score: Mapped[float | None] = mapped_column(Float)
    out_of_distribution: Mapped[bool | None] = mapped_column(Boolean)


# -- the DICOM network (queries in db/network.py) --------------------------------------------------------------------
class AssociationRecord(Base):
    """One association a listener accepted or rejected (no patient attribute: AE titles, hosts, counts)."""

    __tablename__ = "associations"
    __table_args__ = (Index("ix_associations_started_at", "started_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    listener: Mapped[str] = mapped_column(String(16))  # the called AE title (the listener's own)
    calling_ae: Mapped[str] = mapped_column(String(16))
    peer_host: Mapped[str] = mapped_column(String(64))
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    outcome: Mapped[str] = mapped_column(String(16))  # open, released, aborted, rejected
    instances: Mapped[int] = mapped_column(Integer, default=0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    refused: Mapped[int] = mapped_column(Integer, default=0)
    reason: Mapped[str | None] = mapped_column(Text)


class PullRecord(Base):
    """One study a `neuron pull` found on a source, and how its retrieval went."""

    __tablename__ = "pulls"
    __table_args__ = (UniqueConstraint("source", "study_instance_uid", name="uq_pull_source_study"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    source: Mapped[str] = mapped_column(String(200))  # AE@host:port
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    study_date: Mapped[date | None] = mapped_column(Date)
    accession_number: Mapped[str | None] = mapped_column(String(16))
    modalities: Mapped[str | None] = mapped_column(String(64))
    instances_found: Mapped[int | None] = mapped_column(Integer)  # what the source's C-FIND said it holds
    instances_retrieved: Mapped[int] = mapped_column(Integer, default=0)  # by the last retrieval of this study
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    found_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    retrieved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class DeliveryRecord(Base):
    """One DICOM output (SR, secondary capture) for one destination, and how its delivery went."""

    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("destination", "sop_instance_uid", name="uq_delivery_destination_object"),
                      Index("ix_deliveries_status_due", "status", "next_attempt_at"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    destination: Mapped[str] = mapped_column(String(200))  # AE@host:port
    sop_instance_uid: Mapped[str] = mapped_column(String(64))  # of the output object
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(8))  # sr, sc
    path: Mapped[str] = mapped_column(Text)
    status: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class AuditEntry(Base):
    """Who saw or changed what, when and from where: one row per study page view, heatmap view, verdict, sign-in,
    export, purge, rescreen and audit export or prune (``db.audit``). Append-only: triggers refuse every UPDATE, and
    every DELETE except those of ``db.audit.prune`` (``neuron audit --prune-before``)."""

    __tablename__ = "audit"
    __table_args__ = (Index("ix_audit_at", "at"), Index("ix_audit_study", "study_instance_uid"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    actor: Mapped[str] = mapped_column(String(128))
    address: Mapped[str | None] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(32))
    outcome: Mapped[str] = mapped_column(String(16), default="success")
    study_instance_uid: Mapped[str | None] = mapped_column(String(64))
    target: Mapped[str | None] = mapped_column(Text)  # the finding, selection or filter acted on
    detail: Mapped[str | None] = mapped_column(Text)  # what came of it (rows exported, results deleted)


class AuditPrune(Base):
    """The cut-off of the prune in progress: the audit's DELETE trigger lets through only rows older than a cut-off
    that the deleting transaction itself wrote here (and removes before it commits)."""

    __tablename__ = "audit_prune"

    before: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)


# A finding needs review when its uncertainty passed the review threshold (``predictions.needs_review``), its frame is
# out of distribution, or its instance is outside the model's trained population: the one rule of the views, the
# study summaries (``db.studies``) and the review page, each over predictions ``p`` joined to instances ``i``.
NEEDS_REVIEW = "(p.needs_review OR p.out_of_distribution IS TRUE OR i.outside_population IS NOT NULL)"


def needs_review_clause():
    """``NEEDS_REVIEW`` as a SQLAlchemy expression over ``Prediction`` and ``Instance`` (the study summaries, the
    review page); a test checks that both count the same."""
    return or_(Prediction.needs_review, Prediction.out_of_distribution.is_(True),
               Instance.outside_population.is_not(None))


# Why, each reason that holds, joined by '; ' (NULL when none does).
REVIEW_REASON = """NULLIF(SUBSTR(
           CASE WHEN i.outside_population IS NOT NULL
                THEN '; outside the trained population: ' || i.outside_population ELSE '' END
           || CASE WHEN p.out_of_distribution IS TRUE
                   THEN '; out of distribution: ood_score above the reference''s 99th percentile' ELSE '' END
           || CASE WHEN p.needs_review THEN '; uncertainty above the review threshold' ELSE '' END, 3), '')"""

FINDINGS_VIEW = """
CREATE VIEW findings AS
SELECT i.study_instance_uid, i.series_instance_uid, p.sop_instance_uid, p.frame, i.modality,
       f.path AS file_path, p.model, p.weights, p.label, p.probability, p.uncertainty, p.rank,
       p.heatmap_path, p.processed_at, p.config_hash AS preprocessing, p.untrained,
       CASE WHEN p.probability >= {positive} THEN 1 ELSE 0 END AS positive, p.worker,
       {needs_review} AS needs_review, p.decoder,
       s.study_date, s.accession_number, s.study_description,
       p.ood_score, p.out_of_distribution,
       CASE WHEN i.outside_population IS NOT NULL THEN 1 ELSE 0 END AS outside_population,
       {review_reason} AS review_reason, i.gating_notes, i.view_position, i.age_years
FROM predictions p
JOIN instances i ON i.sop_instance_uid = p.sop_instance_uid
JOIN files f ON f.id = i.file_id
LEFT JOIN studies s ON s.study_instance_uid = i.study_instance_uid
"""

# A file that holds its instance shows the instance's status (pending, queued, done, failed, skipped); any other file
# (a duplicate copy, a file that is not DICOM or not readable) shows its own. ``attempts`` counts the workers that took
# the instance; ``worker`` is the one that produced its results.
INGEST_STATUS_VIEW = """
CREATE VIEW ingest_status AS
SELECT f.path AS file_path, f.sop_instance_uid, COALESCE(i.status, f.status) AS status,
       COALESCE(i.reason, f.reason) AS reason, f.seen_at, COALESCE(i.attempts, 0) AS attempts,
       (SELECT MAX(p.worker) FROM predictions p WHERE p.sop_instance_uid = i.sop_instance_uid) AS worker,
       i.outside_population, i.gating_notes
FROM files f
LEFT JOIN instances i ON i.file_id = f.id
"""

# One row per screened study: its top finding (highest probability over every frame and model), how many findings
# are positive and how many need review. ``screened_at`` is when its latest result was written; ``study_date``,
# ``accession_number`` and ``study_description`` come from the header, ``patient_key`` (with --patient-key) groups one
# patient's studies without naming the patient.
STUDY_FINDINGS_VIEW = """
CREATE VIEW study_findings AS
WITH scored AS (
    SELECT i.study_instance_uid, p.sop_instance_uid, p.label, p.model, p.probability,
           {needs_review} AS needs_review, p.processed_at,
           ROW_NUMBER() OVER (PARTITION BY i.study_instance_uid
                              ORDER BY p.probability DESC, p.label, p.model) AS position
    FROM predictions p
    JOIN instances i ON i.sop_instance_uid = p.sop_instance_uid
)
SELECT study_instance_uid, MAX(processed_at) AS screened_at, COUNT(DISTINCT sop_instance_uid) AS instances,
       MAX(CASE WHEN position = 1 THEN label END) AS top_finding,
       MAX(CASE WHEN position = 1 THEN model END) AS top_model,
       MAX(probability) AS max_probability,
       SUM(CASE WHEN probability >= {positive} THEN 1 ELSE 0 END) AS positive_findings,
       SUM(CASE WHEN needs_review THEN 1 ELSE 0 END) AS needs_review,
       (SELECT s.study_date FROM studies s WHERE s.study_instance_uid = scored.study_instance_uid) AS study_date,
       (SELECT s.accession_number FROM studies s
        WHERE s.study_instance_uid = scored.study_instance_uid) AS accession_number,
       (SELECT s.study_description FROM studies s
        WHERE s.study_instance_uid = scored.study_instance_uid) AS study_description,
       (SELECT s.patient_key FROM studies s WHERE s.study_instance_uid = scored.study_instance_uid) AS patient_key
FROM scored
GROUP BY study_instance_uid
"""

# Every verdict with the finding it is on (the finding's columns are NULL once its results were purged). ``latest``
# is 1 for the newest verdict of a reviewer on a finding: agreement is counted over those.
REVIEWS_VIEW = """
CREATE VIEW reviews AS
SELECT v.study_instance_uid, v.sop_instance_uid, v.frame, v.model, v.weights, v.label,
       p.probability, p.uncertainty, CASE WHEN p.probability >= {positive} THEN 1 ELSE 0 END AS positive,
       CASE WHEN p.id IS NOT NULL THEN {needs_review} END AS needs_review, v.verdict, v.note, v.reviewer,
       v.reviewed_at,
       CASE WHEN ROW_NUMBER() OVER (PARTITION BY v.sop_instance_uid, v.frame, v.model, v.weights, v.label, v.reviewer
                                    ORDER BY v.reviewed_at DESC, v.id DESC) = 1 THEN 1 ELSE 0 END AS latest
FROM verdicts v
LEFT JOIN predictions p ON p.sop_instance_uid = v.sop_instance_uid AND p.frame = v.frame AND p.model = v.model
                       AND p.weights = v.weights AND p.label = v.label
LEFT JOIN instances i ON i.sop_instance_uid = v.sop_instance_uid
"""

# The views' DDL with the positive threshold filled in: one number for the views, the studies summary and the pages.
VIEWS = {name: ddl.format(positive=repr(float(POSITIVE)), needs_review=NEEDS_REVIEW, review_reason=REVIEW_REASON)
         for name, ddl in (
    ("findings", FINDINGS_VIEW), ("ingest_status", INGEST_STATUS_VIEW), ("study_findings", STUDY_FINDINGS_VIEW),
    ("reviews", REVIEWS_VIEW))}


def drop_views(conn: Connection) -> None:
    for name in VIEWS:
        conn.execute(text(f"DROP VIEW IF EXISTS {name}"))


def create_views(conn: Connection) -> None:
    """(Re)create the public views; safe to call on every start."""
    drop_views(conn)
    for ddl in VIEWS.values():
        conn.execute(text(ddl))
