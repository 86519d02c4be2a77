"""Every query of the review page (``neuron review``): the worklist with its filters and paging, one study's images
and findings with their provenance, writing a verdict, and the summary page's aggregates.

The worklist reads only the ``studies`` table (one row per study, summary columns kept current by every results
commit) and its indexes: ordering by ``top_probability`` walks ``ix_studies_top_probability``, a label filter probes
``ix_predictions_label_probability``, so a page costs the same with 1,000,000 predictions rows as with 1,000
(``benchmarks/bench_worklist.py`` measures it and prints the plans). Nothing here reads or returns patient identity.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import date, datetime, timedelta

from sqlalchemy import Integer, cast, exists, func, literal, select, text
from sqlalchemy.sql import Select

from db.schema import Instance, PipelineConfig, Prediction, Study, Verdict, needs_review_clause, utcnow
from db.store import Database
from neuron.work import POSITIVE  # one operating point for the views, the summaries and the pages

PAGE_SIZE = 50
REVIEWED_CHOICES = ("any", "yes", "no")
MAX_NOTE = 2000
MAX_REVIEWER = 128
HISTOGRAM_BINS = 20


class FilterError(ValueError):
    """A worklist query parameter that cannot be used; the message names the value, the rule and the fix."""


def _optional(params: Mapping[str, str], key: str) -> str | None:
    value = (params.get(key) or "").strip()
    return value or None


def _parse_date(key: str, value: str | None) -> date | None:
    if value is None:
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise FilterError(f"{key}={value!r} is not a date; use YYYY-MM-DD, e.g. 2026-11-27") from None


@dataclass(frozen=True)
class WorklistFilter:
    """The worklist's filters, as the GET form sends them. An object that exists is valid: its constructor checks
    every value."""

    label: str | None = None
    min_probability: float | None = None
    needs_review: bool = False
    modality: str | None = None
    date_from: date | None = None
    date_to: date | None = None
    reviewed: str = "any"
    page: int = 1

    def __post_init__(self) -> None:
        if self.min_probability is not None and not 0.0 <= self.min_probability <= 1.0:
            raise FilterError(f"min probability {self.min_probability} is outside 0..1; use e.g. 0.7")
        if self.reviewed not in REVIEWED_CHOICES:
            raise FilterError(f"reviewed={self.reviewed!r} is not one of {', '.join(REVIEWED_CHOICES)}")
        if self.page < 1:
            raise FilterError(f"page {self.page} must be 1 or more")
        if self.date_from and self.date_to and self.date_from > self.date_to:
            raise FilterError(f"study date from {self.date_from} is after to {self.date_to}; swap them")

    @classmethod
    def from_query(cls, params: Mapping[str, str]) -> WorklistFilter:
        """Lift the raw query parameters; empty fields mean "no filter"."""
        min_p = _optional(params, "min_probability")
        page = _optional(params, "page") or "1"
        try:
            threshold = float(min_p) if min_p is not None else None
        except ValueError:
            raise FilterError(f"min probability {min_p!r} is not a number; use e.g. 0.7") from None
        if not page.isdigit():
            raise FilterError(f"page {page!r} is not a page number; use 1, 2, ...")
        modality = _optional(params, "modality")
        return cls(label=_optional(params, "label"), min_probability=threshold,
                   needs_review=(params.get("needs_review") or "") in ("1", "on", "yes", "true"),
                   modality=modality.upper() if modality else None,
                   date_from=_parse_date("date_from", _optional(params, "date_from")),
                   date_to=_parse_date("date_to", _optional(params, "date_to")),
                   reviewed=_optional(params, "reviewed") or "any", page=int(page))

    def as_query(self, **changes) -> dict[str, str]:
        """The non-empty filters as query parameters (for the paging links), with ``changes`` applied."""
        f = replace(self, **changes)
        out = {"label": f.label, "min_probability": None if f.min_probability is None else f"{f.min_probability:g}",
               "needs_review": "1" if f.needs_review else None, "modality": f.modality,
               "date_from": f.date_from.isoformat() if f.date_from else None,
               "date_to": f.date_to.isoformat() if f.date_to else None,
               "reviewed": None if f.reviewed == "any" else f.reviewed, "page": None if f.page == 1 else str(f.page)}
        return {k: v for k, v in out.items() if v is not None}


@dataclass(frozen=True)
class StudyRow:
    study_instance_uid: str
    study_date: date | None
    accession_number: str | None
    study_description: str | None
    modalities: str | None
    top_probability: float | None
    top_label: str | None
    top_model: str | None
    positive_findings: int
    needs_review: int
    screened_instances: int
    screened_at: datetime | None
    reviewed: bool


@dataclass(frozen=True)
class WorklistPage:
    rows: list[StudyRow]
    filter: WorklistFilter
    page_size: int
    has_next: bool

    @property
    def first_position(self) -> int:
        return (self.filter.page - 1) * self.page_size + 1


def _reviewed():
    return exists().where(Verdict.study_instance_uid == Study.study_instance_uid)


_STUDY_COLUMNS = (Study.study_instance_uid, Study.study_date, Study.accession_number, Study.study_description,
                  Study.modalities, Study.top_probability, Study.top_label, Study.top_model, Study.positive_findings,
                  Study.needs_review, Study.screened_instances, Study.screened_at)


def _label_filter(f: WorklistFilter, common: bool):
    """Studies with a finding of ``f.label`` at or above the threshold, in the form that is fast for how many match.

    Few matches (``common`` False): collect them through ``ix_predictions_label_probability`` and sort that short
    list. Many: walk the studies in page order (``ix_studies_top_probability``) and probe each one's findings by SOP
    Instance UID, stopping once the page is full; collecting 55,000 matches to show 50 took 550 ms on 1,000,000
    rows, the walk a few ms. The planner cannot tell the two apart, so ``label_is_common`` counts first."""
    finding = (Prediction.label == f.label,)
    if f.min_probability is not None:
        finding += (Prediction.probability >= f.min_probability,)
    if common:
        return exists().where(Instance.study_instance_uid == Study.study_instance_uid,
                              Prediction.sop_instance_uid == Instance.sop_instance_uid, *finding)
    return Study.study_instance_uid.in_(select(Instance.study_instance_uid)
                                        .join(Prediction, Prediction.sop_instance_uid == Instance.sop_instance_uid)
                                        .where(*finding))


COMMON_LABEL_ROWS = 2000


def label_is_common(db: Database, f: WorklistFilter) -> bool:
    """True when more than COMMON_LABEL_ROWS findings match the label filter: a count over the covering index
    ``ix_predictions_label_probability`` that stops at the limit (a few ms at most)."""
    if f.label is None:
        return False
    matching = select(Prediction.id).where(Prediction.label == f.label)
    if f.min_probability is not None:
        matching = matching.where(Prediction.probability >= f.min_probability)
    with db.session() as s:
        n = s.execute(select(func.count()).select_from(matching.limit(COMMON_LABEL_ROWS + 1).subquery())).scalar()
    return n > COMMON_LABEL_ROWS


def worklist_query(f: WorklistFilter, page_size: int = PAGE_SIZE, common_label: bool = False) -> Select:
    """The first ``page_size + 1`` studies of page ``f.page`` (one more than shown, to know whether a next page
    exists without counting every match).

    Screened studies only (``top_probability`` is NULL until a study has results). Ties are broken by UID so paging
    is stable. ``common_label``: see ``_label_filter``."""
    stmt = select(*_STUDY_COLUMNS, _reviewed().label("reviewed")).where(Study.top_probability.is_not(None))
    if f.label is not None:
        stmt = stmt.where(_label_filter(f, common_label))
    elif f.min_probability is not None:
        stmt = stmt.where(Study.top_probability >= f.min_probability)
    if f.needs_review:
        stmt = stmt.where(Study.needs_review > 0)
    if f.modality is not None:
        # modalities is "CR" or "CR,DX": match whole entries, so "C" or "R,D" matches nothing
        stmt = stmt.where((literal(",") + Study.modalities + literal(",")).like(f"%,{f.modality},%"))
    if f.date_from is not None:
        stmt = stmt.where(Study.study_date >= f.date_from)
    if f.date_to is not None:
        stmt = stmt.where(Study.study_date <= f.date_to)
    if f.reviewed == "yes":
        stmt = stmt.where(_reviewed())
    elif f.reviewed == "no":
        stmt = stmt.where(~_reviewed())
    return (stmt.order_by(Study.top_probability.desc(), Study.study_instance_uid)
            .limit(page_size + 1).offset((f.page - 1) * page_size))


def worklist(db: Database, f: WorklistFilter, page_size: int = PAGE_SIZE) -> WorklistPage:
    with db.session() as s:
        rows = [StudyRow(**r._mapping) for r in s.execute(worklist_query(f, page_size, label_is_common(db, f)))]
    return WorklistPage(rows[:page_size], f, page_size, has_next=len(rows) > page_size)


def explain(db: Database, stmt: Select) -> list[str]:
    """The database's plan for ``stmt`` as lines of text (SQLite: EXPLAIN QUERY PLAN; PostgreSQL: EXPLAIN)."""
    dialect = db.engine.dialect
    compiled = stmt.compile(dialect=dialect, compile_kwargs={"literal_binds": True})
    with db.engine.connect() as conn:
        if dialect.name == "sqlite":
            return [row[-1] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {compiled}")]
        return [row[0] for row in conn.exec_driver_sql(f"EXPLAIN {compiled}")]


def labels(db: Database) -> list[str]:
    """The distinct labels in ``predictions`` for the filter's choices: a skip scan over
    ``ix_predictions_label_probability`` (one index probe per label, not a pass over a million rows)."""
    skip = text("""
        WITH RECURSIVE l(label) AS (
            SELECT MIN(label) FROM predictions
            UNION ALL
            SELECT (SELECT MIN(p.label) FROM predictions p WHERE p.label > l.label) FROM l WHERE l.label IS NOT NULL
        )
        SELECT label FROM l WHERE label IS NOT NULL""")
    with db.engine.connect() as conn:
        return list(conn.execute(skip).scalars())


# -- one study -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VerdictRow:
    verdict: str
    note: str | None
    reviewer: str
    reviewed_at: datetime


@dataclass
class Finding:
    prediction_id: int
    label: str
    probability: float
    uncertainty: float
    rank: int
    needs_review: bool
    has_heatmap: bool
    verdicts: list[VerdictRow] = field(default_factory=list)

    @property
    def positive(self) -> bool:
        return self.probability >= POSITIVE


@dataclass
class ScreenedImage:
    """One frame of one instance as screened by one model and set of weights, with everything that produced it."""

    sop_instance_uid: str
    series_instance_uid: str
    frame: int
    modality: str | None
    model: str
    weights: str
    untrained: bool
    config_hash: str
    settings: dict
    decoder: str | None
    worker: str | None
    processed_at: datetime
    findings: list[Finding] = field(default_factory=list)
    # clinical safety: the frame's distance from the route's reference (None: no reference) and the instance's gate
    ood_score: float | None = None
    out_of_distribution: bool | None = None
    outside_population: str | None = None
    gating_notes: str | None = None
    view_position: str | None = None
    age_years: int | None = None

    @property
    def heatmaps(self) -> list[Finding]:
        return [f for f in self.findings if f.has_heatmap]


@dataclass
class StudyDetail:
    study: StudyRow
    images: list[ScreenedImage]
    unscreened: list[tuple[str, str, str | None]]  # (SOP Instance UID, status, reason) of instances without results


def _settings(settings_json: str | None) -> dict:
    try:
        return json.loads(settings_json) if settings_json else {}
    except ValueError:
        return {"unreadable settings_json": settings_json}


def study_detail(db: Database, study_uid: str) -> StudyDetail | None:
    """The study, each screened frame with its findings (highest probability first) and provenance, and the
    verdicts on every finding (newest first). None when the study is unknown."""
    with db.session() as s:
        row = s.execute(select(*_STUDY_COLUMNS, _reviewed().label("reviewed"))
                        .where(Study.study_instance_uid == study_uid)).first()
        if row is None:
            return None
        preds = s.execute(
            select(Prediction.id, Prediction.sop_instance_uid, Instance.series_instance_uid, Instance.modality,
                   Prediction.frame, Prediction.model, Prediction.weights, Prediction.label, Prediction.probability,
                   Prediction.uncertainty, Prediction.rank, needs_review_clause().label("needs_review"),
                   Prediction.heatmap_path, Prediction.untrained, Prediction.config_hash,
                   PipelineConfig.settings_json, Prediction.decoder, Prediction.worker, Prediction.processed_at,
                   Prediction.ood_score, Prediction.out_of_distribution, Instance.outside_population,
                   Instance.gating_notes, Instance.view_position, Instance.age_years)
            .join(Instance, Instance.sop_instance_uid == Prediction.sop_instance_uid)
            .outerjoin(PipelineConfig, PipelineConfig.config_hash == Prediction.config_hash)
            .where(Instance.study_instance_uid == study_uid)
            .order_by(Instance.series_instance_uid, Prediction.sop_instance_uid, Prediction.frame,
                      Prediction.model, Prediction.weights, Prediction.probability.desc(), Prediction.label)).all()
        verdicts = s.execute(select(Verdict).where(Verdict.study_instance_uid == study_uid)
                             .order_by(Verdict.reviewed_at.desc(), Verdict.id.desc())).scalars().all()
        unscreened = s.execute(
            select(Instance.sop_instance_uid, Instance.status, Instance.reason)
            .where(Instance.study_instance_uid == study_uid,
                   ~exists().where(Prediction.sop_instance_uid == Instance.sop_instance_uid))
            .order_by(Instance.sop_instance_uid)).all()
    by_finding: dict[tuple, list[VerdictRow]] = {}
    for v in verdicts:
        by_finding.setdefault((v.sop_instance_uid, v.frame, v.model, v.weights, v.label), []).append(
            VerdictRow(v.verdict, v.note, v.reviewer, v.reviewed_at))
    images: dict[tuple, ScreenedImage] = {}
    for p in preds:
        key = (p.sop_instance_uid, p.frame, p.model, p.weights)
        image = images.get(key)
        if image is None:
            image = images[key] = ScreenedImage(p.sop_instance_uid, p.series_instance_uid, p.frame, p.modality,
                                                p.model, p.weights, bool(p.untrained), p.config_hash,
                                                _settings(p.settings_json), p.decoder, p.worker, p.processed_at,
                                                ood_score=p.ood_score, out_of_distribution=p.out_of_distribution,
                                                outside_population=p.outside_population,
                                                gating_notes=p.gating_notes, view_position=p.view_position,
                                                age_years=p.age_years)
        image.findings.append(Finding(p.id, p.label, p.probability, p.uncertainty, p.rank, bool(p.needs_review),
                                      p.heatmap_path is not None, by_finding.get((*key, p.label), [])))
    return StudyDetail(StudyRow(**row._mapping), list(images.values()),
                       [(u, st, reason) for u, st, reason in unscreened])


@dataclass(frozen=True)
class HeatmapRef:
    path: str | None  # stored (shared) path; the caller maps and confines it
    study_instance_uid: str
    label: str


def heatmap_of(db: Database, prediction_id: int) -> HeatmapRef | None:
    """A finding's heatmap path and what the audit names it by; None when the finding does not exist."""
    with db.session() as s:
        row = s.execute(select(Prediction.heatmap_path, Instance.study_instance_uid, Prediction.label)
                        .join(Instance, Instance.sop_instance_uid == Prediction.sop_instance_uid)
                        .where(Prediction.id == prediction_id)).first()
    return None if row is None else HeatmapRef(*row)


# -- verdicts --------------------------------------------------------------------------------------------------------
class VerdictError(ValueError):
    """A verdict that cannot be stored; the message says which field and how to fix it."""


@dataclass(frozen=True)
class StoredVerdict:
    id: int
    study_instance_uid: str
    label: str


def add_verdict(db: Database, prediction_id: int, verdict: str, reviewer: str, note: str | None = None,
                now: datetime | None = None) -> StoredVerdict:
    """Record a reviewer's verdict on one finding, keyed by the finding's natural key (it outlives a rescreen that
    replaces the prediction row). History is kept: a second verdict adds a row, the ``reviews`` view marks the newest
    of each reviewer as ``latest``."""
    reviewer = (reviewer or "").strip()
    note = (note or "").strip() or None
    if verdict not in Verdict.VALUES:
        raise VerdictError(f"verdict {verdict!r} is not one of {', '.join(Verdict.VALUES)}")
    if not reviewer:
        raise VerdictError("the reviewer name is empty; type your name so the verdict says who gave it")
    if len(reviewer) > MAX_REVIEWER:
        raise VerdictError(f"the reviewer name has {len(reviewer)} characters; at most {MAX_REVIEWER}")
    if note is not None and len(note) > MAX_NOTE:
        raise VerdictError(f"the note has {len(note)} characters; at most {MAX_NOTE}")
    with db.session() as s, s.begin():
        finding = s.execute(
            select(Instance.study_instance_uid, Prediction.sop_instance_uid, Prediction.frame, Prediction.model,
                   Prediction.weights, Prediction.label)
            .join(Instance, Instance.sop_instance_uid == Prediction.sop_instance_uid)
            .where(Prediction.id == prediction_id)).first()
        if finding is None:
            raise VerdictError(f"finding {prediction_id} does not exist (rescreened or purged since the page was "
                               f"loaded?); reload the study page")
        row = Verdict(**finding._mapping, verdict=verdict, note=note, reviewer=reviewer,
                      reviewed_at=now or utcnow())
        s.add(row)
        s.flush()
        return StoredVerdict(row.id, finding.study_instance_uid, finding.label)


# -- summary ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SummaryData:
    days: list[date]
    labels: list[str]
    positives: dict[tuple[str, date], int]  # (label, day) -> positive findings screened that day (UTC)
    histogram: list[tuple[float, float, int]]  # (from, to, findings) of uncertainty
    agreement: list[tuple[str, int, int]]  # (label, agree, latest verdicts)
    since: date


def _day(value) -> date:
    return value if isinstance(value, date) else date.fromisoformat(str(value)[:10])


def summary(db: Database, days: int = 14, now: datetime | None = None) -> SummaryData:
    """Positives per label per screening day over the last ``days`` days, the uncertainty distribution of every
    finding, and per label the share of 'agree' among the latest verdicts of each reviewer (``reviews`` view)."""
    since = ((now or utcnow()) - timedelta(days=days - 1)).date()
    day = func.date(Prediction.processed_at)
    with db.session() as s:
        positives = {(label, _day(d)): n for label, d, n in s.execute(
            select(Prediction.label, day, func.count())
            .where(Prediction.probability >= POSITIVE,
                   Prediction.processed_at >= datetime(since.year, since.month, since.day, tzinfo=utcnow().tzinfo))
            .group_by(Prediction.label, day))}
        top = s.execute(select(func.max(Prediction.uncertainty))).scalar() or 0.0
        width = (top / HISTOGRAM_BINS) or 1.0
        scaled = Prediction.uncertainty / width
        # uncertainties are >= 0: SQLite's CAST truncates, which is floor here; PostgreSQL's CAST rounds, so floor
        bin_ = (func.floor(scaled) if db.engine.dialect.name == "postgresql" else cast(scaled, Integer)).label("b")
        counts: dict[int, int] = {}
        for b, n in s.execute(select(bin_, func.count()).group_by(bin_)):
            index = min(int(b), HISTOGRAM_BINS - 1)  # the top value itself falls into the last bin
            counts[index] = counts.get(index, 0) + n
        agreement = s.execute(text(
            "SELECT label, SUM(CASE WHEN verdict = 'agree' THEN 1 ELSE 0 END), COUNT(*) FROM reviews "
            "WHERE latest = 1 GROUP BY label ORDER BY label")).all()
    hist = [(i * width, (i + 1) * width, int(counts.get(i, 0))) for i in range(HISTOGRAM_BINS)]
    all_days = sorted({d for _, d in positives} | {since + timedelta(days=i) for i in range(days)})
    all_days = [d for d in all_days if d >= since]
    return SummaryData(all_days, sorted({label for label, _ in positives}), positives, hist,
                       [(label, int(a), int(n)) for label, a, n in agreement], since)

