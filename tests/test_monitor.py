"""Drift monitoring without ground truth: synthetic CR batches (neuron.synthetic, the benchmark's generator) screened
"a week apart" by the embedded engine. A batch from the same generator is not flagged; one with a shifted exposure
(the detector dose up 50 %, the protocol's window unchanged) or from a new manufacturer is, by `neuron monitor` (a
real process, with its JSON and Prometheus textfile), the review app's Monitoring page and /metrics, on SQLite and
PostgreSQL alike. A week is simulated by moving the first batch's result times back eight days, the only thing the
windows read."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections import defaultdict
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import text
from starlette.testclient import TestClient

from db.monitor import monitor
from db.store import Database
from neuron.synthetic import InstancePlan, make_instance
from neuron.work import FrameResult, LabelScore, Outcome, Status

N = 24  # images per batch
MODEL = "xrv-densenet121-res224-all"
pytestmark = pytest.mark.timeout(300)


def batch(root, seed: int, **variant):
    root.mkdir(parents=True)
    for i in range(N):
        make_instance(InstancePlan(i, i, 0), 128, seed, **variant).dataset.save_as(root / f"{i}.dcm",
                                                                                   enforce_file_format=True)
    return root


def age(url: str, days: int = 8) -> None:
    """Move every result written so far back ``days`` days: the first batch was screened a week before the next."""
    db = Database(url)
    with db.engine.begin() as conn:
        then = datetime.now(UTC) - timedelta(days=days)
        conn.execute(text("UPDATE predictions SET processed_at = :t"), {"t": then})
        conn.execute(text("UPDATE instances SET updated_at = :t"), {"t": then})
    db.dispose()


@pytest.fixture(scope="module")
def weeks(tmp_path_factory, job_plain, untrained_settings):
    """Week 1 (one batch) in a database, then three copies of it, each given a week-2 batch: from the same generator,
    with a shifted exposure, from a new manufacturer. Returns {variant: (Settings, batch folder)}. Screened by the
    session's models without TTA and CLAHE (``job_plain``), five times faster; the checks read only the results."""
    from worker.embedded import run_folder
    from worker.pipeline import Pipeline

    models = job_plain.models

    root = tmp_path_factory.mktemp("weeks")
    first = untrained_settings.with_(out_dir=root / "week1")
    run_folder(batch(root / "a", 1000), first, pipeline=Pipeline(models, first))
    age(first.resolved_database_url)
    out = {}
    for name, seed, variant in (("same", 2000, {}), ("exposure", 3000, {"exposure": 1.5}),
                                ("manufacturer", 4000, {"manufacturer": "ACME Imaging"})):
        settings = untrained_settings.with_(out_dir=root / name)
        settings.out_dir.mkdir()
        shutil.copy(first.out_dir / "neuron.db", settings.out_dir / "neuron.db")
        folder = batch(root / f"b-{name}", seed, **variant)
        run_folder(folder, settings, pipeline=Pipeline(models, settings))
        out[name] = (settings, folder)
    out["week1"] = (first, root / "a")
    return out


def report_of(settings):
    db = Database(settings.resolved_database_url)
    try:
        return monitor(db)
    finally:
        db.dispose()


def test_two_batches_from_the_same_generator_are_not_flagged(weeks):
    report = report_of(weeks["same"][0])
    (m,) = report.models
    assert m.model == MODEL and m.frames_reference == N and m.frames_recent == N
    assert not report.flagged, m.reasons()
    assert all(lab.probabilities.p_value is not None for lab in m.labels)  # compared, not skipped for size


def test_a_shifted_exposure_a_week_later_is_flagged_by_the_probabilities(weeks):
    report = report_of(weeks["exposure"][0])
    (m,) = report.models
    assert report.flagged
    shifted = [lab for lab in m.labels if lab.probabilities.flagged]
    assert shifted, m.reasons()
    for lab in shifted:
        d = lab.probabilities
        assert d.p_value < d.alpha == m.alpha and d.psi >= d.psi_floor
    assert not any(h.flagged for h in m.header), "the header did not change"


def test_a_new_manufacturer_a_week_later_is_flagged_by_the_header_mix(weeks):
    report = report_of(weeks["manufacturer"][0])
    (m,) = report.models
    maker = next(h for h in m.header if h.fact == "manufacturer")
    assert report.flagged and maker.flagged and maker.new_values == ["ACME Imaging"]
    assert any("manufacturer mix changed" in r and "new: ACME Imaging" in r for r in m.reasons())


def test_neuron_monitor_shows_each_statistic_with_its_threshold_and_exits_3_on_drift(weeks, tmp_path):
    def run(name, *extra):
        return subprocess.run([sys.executable, "-m", "neuron", "monitor", "--out", str(weeks[name][0].out_dir),
                               *extra], capture_output=True, text=True, timeout=120)

    stable = run("same")
    assert stable.returncode == 0, stable.stderr
    assert "stable" in stable.stdout and "KS" in stable.stdout and "limits" in stable.stdout
    gauges = tmp_path / "neuron.prom"
    drifted = run("exposure", "--json", "--textfile", str(gauges))
    assert drifted.returncode == 3, drifted.stderr
    data = json.loads(drifted.stdout)
    (m,) = data["models"]
    assert data["flagged"] and m["flagged"] and m["reasons"] and m["alpha_per_check"] == pytest.approx(0.01 / 45)
    flagged = {lab["label"] for lab in m["labels"] if lab["flagged"]}
    prom = gauges.read_text()
    for label in flagged:
        assert f'neuron_drift{{label="{label}",model="{MODEL}"}} 1.0' in prom
    assert f'neuron_drift_model{{model="{MODEL}"}} 1.0' in prom
    # an explicit reference window that holds nothing compares nothing and says so
    empty = run("exposure", "--reference", "2001-01-01:2001-01-31")
    assert empty.returncode == 0 and "0 frames" in empty.stdout


def test_the_monitoring_page_and_the_prometheus_gauges_show_the_same_report(weeks):
    from review.app import create_app

    settings = weeks["manufacturer"][0]
    db = Database(settings.resolved_database_url)
    try:
        client = TestClient(create_app(db, settings, None))
        page = client.get("/monitoring")
        assert page.status_code == 200 and "drift" in page.text and "ACME Imaging 24 (new)" in page.text
        metrics = client.get("/metrics")
        assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
        assert f'neuron_drift_check{{check="manufacturer",model="{MODEL}"}} 1.0' in metrics.text
        assert client.get("/monitoring?alpha=2").status_code == 400
        custom = client.get("/monitoring?reference_from=2001-01-01&reference_to=2001-01-02")
        assert custom.status_code == 200 and "stable" in custom.text
    finally:
        db.dispose()


def _outcomes(url: str) -> list[Outcome]:
    """The results a database holds, as the Outcomes that wrote them (to replay them into another database)."""
    db = Database(url)
    with db.engine.connect() as conn:
        found = conn.execute(text(
            "SELECT sop_instance_uid, frame, model, weights, config_hash, untrained, decoder, label, probability, "
            "uncertainty, rank, heatmap_path, needs_review FROM predictions ORDER BY sop_instance_uid, frame, rank"))
        frames: dict = defaultdict(list)
        for r in found:
            frames[(r[0], r[1], r[2], r[3], r[4], bool(r[5]), r[6])].append(
                LabelScore(r[7], r[8], r[9], r[10], r[11], bool(r[12])))
    db.dispose()
    by_uid: dict = defaultdict(list)
    for (uid, frame, model, weights, config, untrained, decoder), scores in frames.items():
        by_uid[uid].append(FrameResult(frame, model, weights, config, untrained, tuple(scores), decoder))
    return [Outcome(uid, Status.DONE, None, tuple(f)) for uid, f in by_uid.items()]


def test_the_monitor_reads_postgresql_as_it_reads_sqlite(weeks, servers):
    """Week 1 and the new manufacturer's week 2 replayed into PostgreSQL (headers indexed, results recorded through
    the one write path): the same checks, statistics and flags."""
    from producer.scan import index_folder

    from .services import reset_postgres

    _, pg = servers
    reset_postgres(pg.url)
    db = Database(pg.url)
    db.create()
    week1, week2 = weeks["week1"], weeks["manufacturer"]
    db.ensure_config(_outcomes(week1[0].resolved_database_url)[0].frames[0].config_hash, MODEL, {"replayed": True})
    index_folder(week1[1], db, workers=0)
    db.record_outcomes(_outcomes(week1[0].resolved_database_url))
    age(pg.url)
    index_folder(week2[1], db, workers=0)
    week2_only = [o for o in _outcomes(week2[0].resolved_database_url)
                  if o.sop_instance_uid not in {x.sop_instance_uid for x in _outcomes(week1[0].resolved_database_url)}]
    db.record_outcomes(week2_only)
    on_pg = monitor(db)
    db.dispose()
    on_sqlite = report_of(week2[0])
    assert on_pg.flagged and on_sqlite.flagged
    (a,), (b,) = on_pg.models, on_sqlite.models
    assert a.reasons() == b.reasons()
    assert [(x.label, x.probabilities.ks, x.positive_rate.count_recent) for x in a.labels] == \
           [(x.label, x.probabilities.ks, x.positive_rate.count_recent) for x in b.labels]
