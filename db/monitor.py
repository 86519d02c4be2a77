"""The data behind ``neuron monitor`` and the review app's Monitoring page: each model's results in a recent window and
a reference window, read from ``predictions`` and ``instances``, compared by ``neuron.drift``.

Windows are by the time results were written (``processed_at``; a film skipped by the gate counts at the time it was
indexed). The defaults follow the data, not the clock: the recent window is the last ``recent_days`` of screening
(ending at the newest result), the reference window the first ``reference_days`` (cut where the recent window starts),
so a database restored from last year compares the same way today.
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, date, datetime, time, timedelta

from sqlalchemy import and_, case, func, select

from db.schema import Instance, Prediction, needs_review_clause
from db.store import Database
from neuron.drift import ALPHA, PSI_FLOOR, DriftReport, Window, WindowData, compare, spacing_band
from neuron.work import Status

RECENT_DAYS = 7
REFERENCE_DAYS = 30


def _aware(t: datetime) -> datetime:
    return t if t.tzinfo is not None else t.replace(tzinfo=UTC)


def day_window(first: date, last: date) -> Window:
    """Whole days, ``last`` included (UTC)."""
    return Window(datetime.combine(first, time(), UTC), datetime.combine(last + timedelta(days=1), time(), UTC))


def default_windows(db: Database, recent_days: int = RECENT_DAYS, reference_days: int = REFERENCE_DAYS,
                    reference: Window | None = None, recent: Window | None = None
                    ) -> tuple[Window | None, Window | None, str | None]:
    """The reference and recent windows (each given, or by default from the data), or a note saying why there is
    nothing to compare."""
    with db.session() as s:
        first, last = s.execute(select(func.min(Prediction.processed_at), func.max(Prediction.processed_at))).one()
    if first is None:
        return reference, recent, "no results yet: screen some studies first"
    first, last = _aware(first), _aware(last)
    if recent is None:
        end = last + timedelta(seconds=1)
        recent = Window(end - timedelta(days=recent_days), end)
    if reference is None:
        end = min(first + timedelta(days=reference_days), recent.start)
        if end <= first:
            return None, recent, (f"not enough history: the first results ({first:%Y-%m-%d %H:%M} UTC) fall inside "
                                  f"the recent window ({recent.label()}); give a reference window with --reference "
                                  f"FROM:TO, or wait until more than {recent_days} days of screening are stored")
        reference = Window(first, end)
    return reference, recent, None


def _window_data(db: Database, window: Window) -> dict[str, WindowData]:
    """Per model: probabilities by label, per-frame review and OOD counts, the header facts of its instances, and the
    gate's counts for its route."""
    out: dict[str, WindowData] = {}
    inside = and_(Prediction.processed_at >= window.start, Prediction.processed_at < window.end)
    routes: dict[str, str | None] = {}
    with db.session() as s:
        for model, label, p in s.execute(select(Prediction.model, Prediction.label, Prediction.probability)
                                         .where(inside)):
            out.setdefault(model, WindowData()).probabilities.setdefault(label, []).append(p)
        review = func.max(case((needs_review_clause(), 1), else_=0))
        far = func.max(case((Prediction.out_of_distribution.is_(True), 1), else_=0))
        scored = func.max(case((Prediction.ood_score.is_not(None), 1), else_=0))
        frames = (select(Prediction.model, Prediction.sop_instance_uid, Prediction.frame, review, far, scored)
                  .join(Instance, Instance.sop_instance_uid == Prediction.sop_instance_uid).where(inside)
                  .group_by(Prediction.model, Prediction.sop_instance_uid, Prediction.frame))
        for model, _uid, _frame, r, o, sc in s.execute(frames):
            d = out.setdefault(model, WindowData())
            d.frames += 1
            d.needs_review_frames += int(r)
            d.ood_frames += int(o)
            d.scored_frames += int(sc)
        facts = (select(Prediction.model, Instance.sop_instance_uid, Instance.route, Instance.outside_population,
                        Instance.manufacturer, Instance.manufacturer_model, Instance.photometric,
                        Instance.bits_stored, Instance.pixel_spacing, Instance.view_position).distinct()
                 .join(Instance, Instance.sop_instance_uid == Prediction.sop_instance_uid)
                 .where(inside, Prediction.rank == 1))
        seen: set[tuple[str, str]] = set()
        for model, uid, route, outside, maker, maker_model, photometric, bits, spacing, view in s.execute(facts):
            if (model, uid) in seen:
                continue
            seen.add((model, uid))
            d = out.setdefault(model, WindowData())
            routes.setdefault(model, route)
            d.instances += 1
            d.gated += outside is not None
            for fact, value in (("manufacturer", maker), ("manufacturer_model", maker_model),
                                ("photometric", photometric), ("bits_stored", bits),
                                ("pixel_spacing_band", spacing_band(spacing)), ("view_position", view)):
                d.header.setdefault(fact, Counter())["unknown" if value is None else str(value)] += 1
        skipped = dict(s.execute(
            select(Instance.population_route, func.count())
            .where(Instance.status == Status.SKIPPED.value, Instance.route.is_(None),
                   Instance.outside_population.is_not(None), Instance.updated_at >= window.start,
                   Instance.updated_at < window.end)
            .group_by(Instance.population_route)).all())
    for model, d in out.items():
        gated = skipped.get(routes.get(model), 0)
        d.gated += gated
        d.instances += gated
        d.route = routes.get(model)
    return out


def monitor(db: Database, reference: Window | None = None, recent: Window | None = None,
            recent_days: int = RECENT_DAYS, reference_days: int = REFERENCE_DAYS, alpha: float = ALPHA,
            psi_floor: float = PSI_FLOOR) -> DriftReport:
    """Compare every model's recent window with its reference window (``neuron.drift``)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha {alpha} must be between 0 and 1, e.g. 0.01")
    reference, recent, note = default_windows(db, recent_days, reference_days, reference, recent)
    if note is not None:
        return DriftReport(reference, recent, alpha, psi_floor, note=note)
    before, now = _window_data(db, reference), _window_data(db, recent)
    models = []
    for model in sorted(set(before) | set(now)):
        ref, rec = before.get(model, WindowData()), now.get(model, WindowData())
        route = rec.route or ref.route
        models.append(compare(model, route, ref, rec, alpha, psi_floor))
    return DriftReport(reference, recent, alpha, psi_floor, tuple(models))
