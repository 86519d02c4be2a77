"""Drift without ground truth: the statistics that compare a recent window of screening with a reference window.

    per model and label: the distribution of probabilities (two-sample Kolmogorov-Smirnov test, and the population
        stability index as the size of the shift), and the positive rate against control limits
    per model: the share of findings that need review, of out-of-distribution frames and of gated films, and the
        mix of the header facts that drive drift (manufacturer, model, photometric interpretation, bits stored,
        pixel spacing band, view)

Microsoft's CheXstray (microsoft/MedImaging-ModelDriftMonitoring) shows that chest X-ray drift shows in metadata and
output distributions before any ground truth arrives; these are the same two families of signals.

A check is flagged when its test is significant at the family's alpha split over every check of the model
(Bonferroni: nightly monitoring of 18 labels must not cry wolf every few days) and, for distributions, when the
shift is also material (PSI at or above ``psi_floor``): on a large archive a test finds shifts too small to matter.
Control limits are those of a p-chart on the difference of two proportions: reference rate
+- z * sqrt(p (1 - p) (1/n_recent + 1/n_reference)), z for the same alpha, so a small reference widens them.
Torch-free and SQL-free: ``db.monitor`` reads the windows, this module only counts.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
from scipy import stats

ALPHA = 0.01
PSI_FLOOR = 0.1  # "a moderate shift, investigate" in the usual reading of the PSI (0.1 / 0.25)
BINS = 10
MIN_SAMPLES = 10  # fewer values in a window: the check is reported, never flagged
HEADER_FACTS = ("manufacturer", "manufacturer_model", "photometric", "bits_stored", "pixel_spacing_band",
                "view_position")


@dataclass(frozen=True)
class Window:
    start: datetime
    end: datetime  # exclusive

    def __post_init__(self) -> None:
        if self.end <= self.start:
            raise ValueError(f"a window must end after it starts: {self.start:%Y-%m-%d} to {self.end:%Y-%m-%d}")

    def label(self) -> str:
        return f"{self.start:%Y-%m-%d %H:%M} to {self.end:%Y-%m-%d %H:%M} UTC"


def psi(expected: Sequence[float], actual: Sequence[float]) -> float:
    """Population stability index of two distributions over the same bins (proportions; a bin empty on one side
    counts as half an observation, so the index stays finite)."""
    e, a = np.asarray(expected, dtype=float), np.asarray(actual, dtype=float)
    return float(np.sum((a - e) * np.log(a / e)))


def _shares(counts: np.ndarray) -> np.ndarray:
    n = counts.sum()
    return (counts + 0.5) / (n + 0.5 * len(counts))


def binned_psi(reference: np.ndarray, recent: np.ndarray, bins: int = BINS) -> float:
    """PSI over the reference's quantile bins (equal reference mass per bin, ties merged)."""
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    ref = np.bincount(np.searchsorted(edges, reference, side="right"), minlength=len(edges) + 1)
    now = np.bincount(np.searchsorted(edges, recent, side="right"), minlength=len(edges) + 1)
    return psi(_shares(ref), _shares(now))


def z_for(alpha: float) -> float:
    return float(stats.norm.ppf(1 - alpha / 2))


@dataclass(frozen=True)
class DistributionCheck:
    """The probabilities of one label in the two windows."""

    n_reference: int
    n_recent: int
    ks: float | None  # the two-sample Kolmogorov-Smirnov statistic
    p_value: float | None
    alpha: float  # the threshold p_value is held to (the family's alpha over its checks)
    psi: float | None
    psi_floor: float
    mean_reference: float | None
    mean_recent: float | None

    @property
    def flagged(self) -> bool:
        return (self.p_value is not None and self.p_value < self.alpha and self.psi is not None
                and self.psi >= self.psi_floor)


def distribution_check(reference: np.ndarray, recent: np.ndarray, alpha: float,
                       psi_floor: float = PSI_FLOOR) -> DistributionCheck:
    n_ref, n_now = len(reference), len(recent)
    if min(n_ref, n_now) < MIN_SAMPLES:
        return DistributionCheck(n_ref, n_now, None, None, alpha, None, psi_floor,
                                 float(np.mean(reference)) if n_ref else None,
                                 float(np.mean(recent)) if n_now else None)
    test = stats.ks_2samp(reference, recent)
    return DistributionCheck(n_ref, n_now, float(test.statistic), float(test.pvalue), alpha,
                             binned_psi(reference, recent), psi_floor, float(np.mean(reference)),
                             float(np.mean(recent)))


@dataclass(frozen=True)
class RateCheck:
    """A proportion in the recent window against control limits from the reference window."""

    name: str
    count_reference: int
    n_reference: int
    count_recent: int
    n_recent: int
    lower: float | None
    upper: float | None
    alpha: float

    @property
    def reference_rate(self) -> float | None:
        return self.count_reference / self.n_reference if self.n_reference else None

    @property
    def recent_rate(self) -> float | None:
        return self.count_recent / self.n_recent if self.n_recent else None

    @property
    def flagged(self) -> bool:
        rate = self.recent_rate
        return self.lower is not None and rate is not None and not self.lower <= rate <= self.upper


def rate_check(name: str, count_reference: int, n_reference: int, count_recent: int, n_recent: int,
               alpha: float) -> RateCheck:
    """p-chart limits for the recent rate: the reference rate (with half an observation added each way, so a rate of
    0 or 1 still has a spread) +- z * sqrt(p (1 - p) (1/n_recent + 1/n_reference))."""
    if min(n_reference, n_recent) < MIN_SAMPLES:
        return RateCheck(name, count_reference, n_reference, count_recent, n_recent, None, None, alpha)
    p = (count_reference + 0.5) / (n_reference + 1.0)
    half = z_for(alpha) * math.sqrt(p * (1 - p) * (1 / n_recent + 1 / n_reference))
    return RateCheck(name, count_reference, n_reference, count_recent, n_recent, max(0.0, p - half),
                     min(1.0, p + half), alpha)


@dataclass(frozen=True)
class MixCheck:
    """The mix of one header fact (categories) in the two windows: a chi-square test of homogeneity and the PSI."""

    fact: str
    reference: dict[str, int]
    recent: dict[str, int]
    chi2: float | None
    p_value: float | None
    alpha: float
    psi: float | None
    psi_floor: float

    @property
    def new_values(self) -> list[str]:
        """Values of the recent window the reference window never had (a new scanner, a new protocol)."""
        return sorted(v for v, n in self.recent.items() if n and not self.reference.get(v))

    @property
    def flagged(self) -> bool:
        return (self.p_value is not None and self.p_value < self.alpha and self.psi is not None
                and self.psi >= self.psi_floor)


def mix_check(fact: str, reference: Counter, recent: Counter, alpha: float, psi_floor: float = PSI_FLOOR
              ) -> MixCheck:
    values = sorted(set(reference) | set(recent))
    ref = {v: int(reference.get(v, 0)) for v in values}
    now = {v: int(recent.get(v, 0)) for v in values}
    n_ref, n_now = sum(ref.values()), sum(now.values())
    if len(values) < 2 or min(n_ref, n_now) < MIN_SAMPLES:
        return MixCheck(fact, ref, now, None, None, alpha, 0.0 if len(values) < 2 else None, psi_floor)
    table = np.array([[ref[v] for v in values], [now[v] for v in values]])
    chi2, p_value, _, _ = stats.chi2_contingency(table, correction=False)
    return MixCheck(fact, ref, now, float(chi2), float(p_value), alpha,
                    psi(_shares(table[0]), _shares(table[1])), psi_floor)


def spacing_band(mm: float | None) -> str:
    """Pixel spacing in bands that separate detector generations and binning modes."""
    if mm is None:
        return "unknown"
    for upper, band in ((0.1, "<0.10 mm"), (0.15, "0.10-0.15 mm"), (0.2, "0.15-0.20 mm"), (0.3, "0.20-0.30 mm")):
        if mm < upper:
            return band
    return ">=0.30 mm"


# -- the report ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LabelDrift:
    label: str
    probabilities: DistributionCheck
    positive_rate: RateCheck

    @property
    def flagged(self) -> bool:
        return self.probabilities.flagged or self.positive_rate.flagged


@dataclass(frozen=True)
class ModelDrift:
    model: str
    route: str | None
    frames_reference: int
    frames_recent: int
    alpha: float  # per check: the family's alpha over this model's checks
    labels: tuple[LabelDrift, ...]
    rates: tuple[RateCheck, ...]  # needs_review, out_of_distribution, gated
    header: tuple[MixCheck, ...]

    @property
    def flagged(self) -> bool:
        return (any(lab.flagged for lab in self.labels) or any(r.flagged for r in self.rates)
                or any(m.flagged for m in self.header))

    def reasons(self) -> list[str]:
        """One line per flagged check, naming the statistic and its threshold."""
        out = []
        for lab in self.labels:
            d, r = lab.probabilities, lab.positive_rate
            if d.flagged:
                out.append(f"{lab.label}: probabilities shifted (KS {d.ks:.3f}, p {d.p_value:.2g} < {d.alpha:.2g}; "
                           f"PSI {d.psi:.2f} >= {d.psi_floor}; mean {d.mean_reference:.3f} -> {d.mean_recent:.3f})")
            if r.flagged:
                out.append(f"{lab.label}: positive rate {r.recent_rate:.3f} outside {r.lower:.3f}-{r.upper:.3f}")
        for r in self.rates:
            if r.flagged:
                out.append(f"share {r.name} {r.recent_rate:.3f} outside {r.lower:.3f}-{r.upper:.3f} "
                           f"(reference {r.reference_rate:.3f})")
        for m in self.header:
            if m.flagged:
                new = f"; new: {', '.join(m.new_values)}" if m.new_values else ""
                out.append(f"{m.fact} mix changed (chi2 p {m.p_value:.2g} < {m.alpha:.2g}; PSI {m.psi:.2f} >= "
                           f"{m.psi_floor}{new})")
        return out


@dataclass(frozen=True)
class DriftReport:
    reference: Window | None
    recent: Window | None
    alpha: float
    psi_floor: float
    models: tuple[ModelDrift, ...] = ()
    note: str | None = None  # why nothing could be compared

    @property
    def flagged(self) -> bool:
        return any(m.flagged for m in self.models)

    def as_dict(self) -> dict:
        def window(w: Window | None):
            return None if w is None else {"start": w.start.isoformat(), "end": w.end.isoformat()}

        def rate(r: RateCheck) -> dict:
            return {"name": r.name, "reference": r.reference_rate, "recent": r.recent_rate, "lower": r.lower,
                    "upper": r.upper, "n_reference": r.n_reference, "n_recent": r.n_recent, "flagged": r.flagged}

        return {
            "reference": window(self.reference), "recent": window(self.recent), "alpha": self.alpha,
            "psi_floor": self.psi_floor, "flagged": self.flagged, "note": self.note,
            "models": [{
                "model": m.model, "route": m.route, "frames_reference": m.frames_reference,
                "frames_recent": m.frames_recent, "alpha_per_check": m.alpha, "flagged": m.flagged,
                "reasons": m.reasons(),
                "labels": [{"label": lab.label, "flagged": lab.flagged,
                            "ks": lab.probabilities.ks, "p_value": lab.probabilities.p_value,
                            "psi": lab.probabilities.psi, "psi_floor": lab.probabilities.psi_floor,
                            "mean_reference": lab.probabilities.mean_reference,
                            "mean_recent": lab.probabilities.mean_recent,
                            "positive_rate": rate(lab.positive_rate)} for lab in m.labels],
                "rates": [rate(r) for r in m.rates],
                "header": [{"fact": h.fact, "reference": h.reference, "recent": h.recent, "chi2": h.chi2,
                            "p_value": h.p_value, "psi": h.psi, "new_values": h.new_values, "flagged": h.flagged}
                           for h in m.header]} for m in self.models]}


def checks_per_model(labels: int) -> int:
    """How many checks share a model's alpha: two per label, three rates, the header facts."""
    return 2 * labels + 3 + len(HEADER_FACTS)


# -- Prometheus ------------------------------------------------------------------------------------------------------
def metric_families(report: DriftReport) -> Iterator:
    """Gauges per model and label for alerting (e.g. ``max_over_time(neuron_drift[1h]) == 1``)."""
    from prometheus_client.core import GaugeMetricFamily

    drift = GaugeMetricFamily("neuron_drift", "1 when a label's probabilities or positive rate drifted from the "
                              "reference window (neuron monitor), else 0.", labels=["model", "label"])
    ks = GaugeMetricFamily("neuron_drift_ks", "Two-sample KS statistic of a label's probabilities, recent vs "
                           "reference window.", labels=["model", "label"])
    shift = GaugeMetricFamily("neuron_drift_psi", "Population stability index of a label's probabilities, recent "
                              "vs reference window.", labels=["model", "label"])
    positive = GaugeMetricFamily("neuron_drift_positive_rate", "Share of a label's findings at or above the "
                                 "operating point, per window.", labels=["model", "label", "window"])
    model_flag = GaugeMetricFamily("neuron_drift_model", "1 when any check of the model drifted.", labels=["model"])
    check = GaugeMetricFamily("neuron_drift_check", "1 when a model-level check drifted (needs_review, "
                              "out_of_distribution, gated and header mixes), else 0.", labels=["model", "check"])
    for m in report.models:
        model_flag.add_metric([m.model], float(m.flagged))
        for lab in m.labels:
            drift.add_metric([m.model, lab.label], float(lab.flagged))
            if lab.probabilities.ks is not None:
                ks.add_metric([m.model, lab.label], lab.probabilities.ks)
                shift.add_metric([m.model, lab.label], lab.probabilities.psi)
            for window, value in (("reference", lab.positive_rate.reference_rate),
                                  ("recent", lab.positive_rate.recent_rate)):
                if value is not None:
                    positive.add_metric([m.model, lab.label, window], value)
        for r in m.rates:
            check.add_metric([m.model, r.name], float(r.flagged))
        for h in m.header:
            check.add_metric([m.model, h.fact], float(h.flagged))
    yield from (drift, ks, shift, positive, model_flag, check)


def prometheus_text(report: DriftReport) -> bytes:
    """The report's gauges in the Prometheus text format (the review app's /metrics, a node_exporter textfile)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.registry import Collector

    class _Report(Collector):
        def collect(self):
            return metric_families(report)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Report())
    return generate_latest(registry)


@dataclass
class WindowData:
    """What ``db.monitor`` reads for one model and one window."""

    probabilities: dict[str, list[float]] = field(default_factory=dict)  # label -> one value per frame
    frames: int = 0
    needs_review_frames: int = 0  # frames with any finding that needs review
    ood_frames: int = 0
    scored_frames: int = 0  # frames with an ood_score (a reference existed)
    gated: int = 0  # instances of the route outside its population (flagged or skipped)
    instances: int = 0  # instances of the route screened or skipped by the gate
    header: dict[str, Counter] = field(default_factory=dict)
    route: str | None = None


def compare(model: str, route: str | None, reference: WindowData, recent: WindowData, alpha: float,
            psi_floor: float) -> ModelDrift:
    """Every check of one model, at the family's alpha split over them."""
    labels = sorted(set(reference.probabilities) | set(recent.probabilities))
    per_check = alpha / checks_per_model(len(labels))
    from neuron.work import POSITIVE

    out = []
    for label in labels:
        ref = np.asarray(reference.probabilities.get(label, []), dtype=float)
        now = np.asarray(recent.probabilities.get(label, []), dtype=float)
        out.append(LabelDrift(label, distribution_check(ref, now, per_check, psi_floor),
                              rate_check("positive", int((ref >= POSITIVE).sum()), len(ref),
                                         int((now >= POSITIVE).sum()), len(now), per_check)))
    rates = (rate_check("needs_review", reference.needs_review_frames, reference.frames,
                        recent.needs_review_frames, recent.frames, per_check),
             rate_check("out_of_distribution", reference.ood_frames, reference.scored_frames, recent.ood_frames,
                        recent.scored_frames, per_check),
             rate_check("gated", reference.gated, reference.instances, recent.gated, recent.instances, per_check))
    header = tuple(mix_check(fact, reference.header.get(fact, Counter()), recent.header.get(fact, Counter()),
                             per_check, psi_floor) for fact in HEADER_FACTS)
    return ModelDrift(model, route, reference.frames, recent.frames, per_check, tuple(out), rates, header)


