"""Input gating at indexing: each route's trained population, stated once (neuron.routes.POPULATIONS) and referred to
by its model config; lateral chest films skipped with the reason, children screened and flagged or skipped by the
site's policy, what the header could not tell recorded; the flags reach the findings view, the study summary and the
review page, and the birth date is never stored. Real DICOM files derived from RG1 (a CR chest radiograph, PA, born
1940, studied 2004) with only the header attributes under test changed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import text
from starlette.testclient import TestClient

from db.store import Database
from neuron.routes import POPULATIONS, PopulationPolicy, ViewFact
from neuron.work import Route, Status
from producer.scan import age_at, index_entry, parse_as

from .conftest import empty_database_url, small_chest


@pytest.fixture(scope="module")
def films(tmp_path_factory, rg1):
    """Real chest CRs that differ only in the header facts gating reads, and a knee CR without a body part."""
    root = tmp_path_factory.mktemp("gating")
    small_chest(rg1, root / "adult_pa.dcm", step=8)
    small_chest(rg1, root / "lateral.dcm", step=8, ViewPosition="LL")
    small_chest(rg1, root / "lateral_by_description.dcm", step=8, ViewPosition="", SeriesDescription="CHEST LAT")
    small_chest(rg1, root / "child.dcm", step=8, PatientAge="009Y")
    small_chest(rg1, root / "child_by_birth_date.dcm", step=8, PatientBirthDate="19970101", StudyDate="20070615")
    small_chest(rg1, root / "unknown.dcm", step=8, ViewPosition="", PatientBirthDate="", PatientAge="")
    return root


def test_each_model_config_refers_to_the_population_indexing_gates_with():
    from neuron_models.factory import list_models

    assert {cfg.route for cfg in list_models()} == set(POPULATIONS)
    for cfg in list_models():
        assert cfg.population is POPULATIONS[cfg.route], cfg.name
    chest = POPULATIONS[Route.CHEST_XRAY]
    assert chest.views == {"PA", "AP", "FRONTAL"} and chest.min_age_years == 18


@pytest.mark.parametrize("name, said", [("lateral.dcm", "ViewPosition 'LL' is a lateral view"),
                                        ("lateral_by_description.dcm", "SeriesDescription 'CHEST LAT' is a lateral")])
@pytest.mark.parametrize("policy", list(PopulationPolicy))
def test_a_lateral_chest_film_is_skipped_with_the_reason_under_either_policy(films, name, said, policy):
    entry = index_entry(films / name, policy=policy)
    inst = entry.instance
    assert entry.status is Status.SKIPPED and inst.status is Status.SKIPPED and inst.route is None
    assert said in inst.reason and "trained on PA/AP/FRONTAL films only" in inst.reason
    assert inst.population_route is Route.CHEST_XRAY and inst.outside_population == inst.reason


@pytest.mark.parametrize("name, age", [("child.dcm", "patient age 9 years (PatientAge '009Y')"),
                                       ("child_by_birth_date.dcm", "patient age 10 years (from the birth date")])
def test_a_child_is_screened_and_flagged_or_skipped_by_the_sites_policy(films, name, age):
    flagged = index_entry(films / name, policy="flag").instance
    assert flagged.status is Status.PENDING and flagged.route is Route.CHEST_XRAY
    assert age in flagged.outside_population and "flagged for review" in flagged.outside_population
    assert flagged.header.age_years in (9, 10) and flagged.gating_notes is None
    skipped = index_entry(films / name, policy="skip").instance
    assert skipped.status is Status.SKIPPED and skipped.route is None
    assert age in skipped.reason and "--population-policy skip" in skipped.reason


def test_what_the_header_cannot_tell_is_recorded_and_the_film_screened(films):
    inst = index_entry(films / "unknown.dcm").instance
    assert inst.status is Status.PENDING and inst.outside_population is None
    assert "view unknown: no ViewPosition" in inst.gating_notes and "age unknown" in inst.gating_notes
    adult = index_entry(films / "adult_pa.dcm").instance
    assert adult.outside_population is None and adult.gating_notes is None
    assert adult.header.view_position == "PA" and adult.header.age_years == 64


def test_views_ages_and_their_sources_are_read_as_the_standard_writes_them():
    from datetime import date

    assert ViewFact.of("RL").view == "LATERAL" and ViewFact.of("AP").view == "AP"
    assert ViewFact.of(None, "PA AND LAT").view is None and "names several views" in ViewFact.of(None, "PA LAT").unclear
    assert ViewFact.of("", None, "THORAX PA ERECT").source == "ProtocolName"
    assert ViewFact.of("XY").unclear.startswith("ViewPosition 'XY' is not a known view term")
    assert ViewFact.of(None, "PAEDIATRIC CHEST").view is None  # a word starting with PA is not the view
    assert parse_as("045Y") == 45 and parse_as("006M") == 0.5 and parse_as("45") is None and parse_as("") is None
    assert int(age_at(date(2000, 2, 29), date(2018, 2, 28))) == 17 and int(age_at(date(2000, 2, 29),
                                                                                  date(2018, 3, 1))) == 18


def test_a_modality_forced_onto_the_chest_route_is_outside_its_population(data_dir):
    inst = index_entry(data_dir / "MR2_UNCR.dcm", route_override=Route.CHEST_XRAY).instance
    assert inst.route is Route.CHEST_XRAY and inst.status is Status.PENDING
    assert "Modality 'MR' is not one the chest-xray model was trained on (CR, DX)" in inst.outside_population


@pytest.mark.parametrize("policy", list(PopulationPolicy))
def test_the_embedded_runs_reader_processes_gate_and_never_read_the_pixels_of_a_skipped_film(films, policy):
    """The embedded run indexes in its reader processes (one header parse per file): the policy reaches them through
    ReaderConfig, a film the gate skips comes back as its entry alone (its file closed unread), and a flagged film's
    frames are read in the same pass."""
    import threading

    from worker.readers import IndexItem, ReaderConfig, ReaderPool, unpack_entry
    from worker.slots import SlotPool

    names = ["adult_pa.dcm", "lateral.dcm", "child.dcm"]
    entries, answers, lock = {}, {}, threading.Lock()
    with SlotPool(len(names), 1 << 22) as slots:
        pool = ReaderPool(2, ReaderConfig(16, 1 << 26, frozenset(), population_policy=policy), slots)

        def on_entry(item, packed):
            with lock:
                entries[Path(item.path).name] = unpack_entry(packed)

        def done(item, slot, result, _seconds):
            with lock:  # what came back, not the frames themselves: they view the slot released here
                answers[Path(item.path).name] = result if result is None or isinstance(result, BaseException) \
                    else len(result)
            slots.release(slot)

        try:
            for seq, name in enumerate(names):
                pool.submit(IndexItem(seq, str(films / name)), slots.acquire(timeout=60), done, on_entry)
            assert pool.wait_idle(timeout=120)
        finally:
            pool.close()
    assert entries["lateral.dcm"].status is Status.SKIPPED and answers["lateral.dcm"] is None
    child = entries["child.dcm"].instance
    assert "patient age 9 years" in child.outside_population
    if policy is PopulationPolicy.SKIP:
        assert child.status is Status.SKIPPED and answers["child.dcm"] is None
    else:
        assert child.status is Status.PENDING and child.route is Route.CHEST_XRAY
        assert answers["child.dcm"] == 1  # its one frame read, in the same pass as its header
    assert entries["adult_pa.dcm"].instance.outside_population is None and answers["adult_pa.dcm"] == 1


def test_neuron_run_under_the_skip_policy_screens_no_child(films, tmp_path, models, untrained_settings):
    """`neuron run --population-policy skip`'s engine: the children are skipped with the reason and have no findings;
    the adult and the film the header tells nothing about are screened."""
    from worker.embedded import run_folder
    from worker.pipeline import Pipeline

    settings = untrained_settings.with_(out_dir=tmp_path / "out", population_policy="skip")
    run_folder(films, settings, pipeline=Pipeline(models, settings))
    db = Database(settings.resolved_database_url)
    try:
        screened = {r[0].rsplit("/", 1)[1] for r in rows(db, "SELECT DISTINCT file_path FROM findings")}
        assert screened == {"adult_pa.dcm", "unknown.dcm"}
        skipped = dict(rows(db, "SELECT file_path, reason FROM ingest_status WHERE status = 'skipped'"))
        by_name = {p.rsplit("/", 1)[1]: r for p, r in skipped.items()}
        assert set(by_name) == {"lateral.dcm", "lateral_by_description.dcm", "child.dcm", "child_by_birth_date.dcm"}
        assert "--population-policy skip" in by_name["child.dcm"]
    finally:
        db.dispose()


@pytest.mark.parametrize("policy", list(PopulationPolicy))
def test_instances_received_over_the_network_are_gated_by_the_policy(films, tmp_path, policy):
    """`neuron listen` and `neuron pull` index what they receive through producer.receive's indexer: the same gate,
    with the policy handed to ``open_receiver`` (here the restart path, which indexes what the store holds)."""
    import hashlib
    import shutil

    from producer.receive import InstanceStore, open_receiver

    db = Database(f"sqlite:///{tmp_path / 'neuron.db'}")
    db.create()
    store = InstanceStore.under(tmp_path / "out")
    for name in ("adult_pa.dcm", "lateral.dcm", "child.dcm"):
        target = store.path_for(hashlib.sha256((films / name).read_bytes()).hexdigest())
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(films / name, target)
    open_receiver(db, tmp_path / "out", policy=policy).indexer.close()
    try:
        got = {r[0]: r[1:] for r in rows(db, "SELECT sop_instance_uid, status, outside_population FROM instances")}
        by_name = {name: got[str(pydicom.dcmread(films / name, stop_before_pixels=True).SOPInstanceUID)]
                   for name in ("adult_pa.dcm", "lateral.dcm", "child.dcm")}
        assert by_name["adult_pa.dcm"] == ("pending", None) and by_name["lateral.dcm"][0] == "skipped"
        assert by_name["child.dcm"][0] == ("skipped" if policy is PopulationPolicy.SKIP else "pending")
        assert "patient age 9 years" in by_name["child.dcm"][1]
    finally:
        db.dispose()


@pytest.fixture(scope="module")
def screened(films, tmp_path_factory, models, untrained_settings):
    """The films screened by `neuron run`'s engine (embedded, SQLite, the session's untrained models)."""
    from worker.embedded import run_folder
    from worker.pipeline import Pipeline

    settings = untrained_settings.with_(out_dir=tmp_path_factory.mktemp("gated-run"))
    run_folder(films, settings, pipeline=Pipeline(models, settings))
    db = Database(settings.resolved_database_url)
    yield db, settings
    db.dispose()


def rows(db: Database, sql: str, **params) -> list[tuple]:
    with db.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(sql), params)]


def test_every_finding_of_a_flagged_film_carries_outside_population_and_needs_review(screened):
    db, _ = screened
    per_file = {r[0].rsplit("/", 1)[1]: r[1:] for r in rows(
        db, "SELECT file_path, COUNT(*), SUM(outside_population), SUM(needs_review), MIN(review_reason) "
            "FROM findings GROUP BY file_path")}
    assert set(per_file) == {"adult_pa.dcm", "child.dcm", "child_by_birth_date.dcm", "unknown.dcm"}
    for name in ("child.dcm", "child_by_birth_date.dcm"):
        n, outside, review, reason = per_file[name]
        assert n == 18 and outside == 18 and review == 18
        assert reason.startswith("outside the trained population: patient age")
    assert per_file["adult_pa.dcm"][1] == 0
    skipped = rows(db, "SELECT file_path, status, reason FROM ingest_status WHERE status = 'skipped'")
    assert sorted(r[0].rsplit("/", 1)[1] for r in skipped) == ["lateral.dcm", "lateral_by_description.dcm"]
    assert all("lateral view" in r[2] for r in skipped)
    notes = rows(db, "SELECT DISTINCT gating_notes FROM findings WHERE file_path LIKE '%unknown.dcm'")[0][0]
    assert "view unknown" in notes and "age unknown" in notes
    # the study summary counts the flagged findings the way the view does
    assert rows(db, "SELECT SUM(needs_review) FROM studies") == rows(db, "SELECT SUM(needs_review) FROM findings")


def test_the_birth_date_is_never_stored(screened, films):
    db, _ = screened
    born = str(pydicom.dcmread(films / "child_by_birth_date.dcm").PatientBirthDate)
    for table in ("files", "instances", "studies", "predictions"):
        dump = " ".join(map(str, rows(db, f"SELECT * FROM {table}")))
        assert born not in dump and "1997-01-01" not in dump, table


def test_the_review_page_shows_why_a_film_is_flagged(screened):
    from review.app import create_app

    db, settings = screened
    study = rows(db, "SELECT DISTINCT study_instance_uid FROM findings WHERE file_path LIKE '%/child.dcm'")[0][0]
    page = TestClient(create_app(db, settings, None)).get(f"/study/{study}").text
    assert "outside the trained population" in page and "patient age 9 years" in page


def test_scan_skips_children_under_the_skip_policy_in_the_distributed_mode(env, films):
    """`neuron scan --population-policy skip` (the producer, a real process) on PostgreSQL."""
    res = subprocess.run([sys.executable, "-m", "neuron", "scan", str(films), "--population-policy", "skip"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    db = Database(env["NEURON_DATABASE_URL"])
    try:
        got = dict(rows(db, "SELECT f.path, i.status FROM instances i JOIN files f ON f.id = i.file_id"))
        by_name = {p.rsplit("/", 1)[1]: s for p, s in got.items()}
        assert by_name["child.dcm"] == by_name["lateral.dcm"] == "skipped"
        assert by_name["adult_pa.dcm"] == "queued" and by_name["unknown.dcm"] == "queued"
        reason = rows(db, "SELECT reason FROM ingest_status WHERE file_path LIKE '%/child.dcm'")[0][0]
        assert "--population-policy skip" in reason
    finally:
        db.dispose()


@pytest.mark.parametrize("start", ["0005", "0006"])
@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_an_older_database_gains_the_safety_columns_and_keeps_its_rows(dialect, start, request, tmp_path):
    """Migration 0007 (after the network's 0006) only adds: the old finding is still in the views, with the new
    columns NULL or false, and its instance says it was indexed before gating existed; a delivery recorded under 0006
    is kept; the audit trail starts append-only."""
    import datetime as dt

    from db.migrate import current, upgrade
    from db.migrations.versions import __path__ as versions

    db = Database(empty_database_url(request, tmp_path, dialect))
    upgrade(db.engine, start)
    now = dt.datetime.now(dt.UTC)
    with db.engine.begin() as conn:
        conn.execute(text("INSERT INTO pipeline_configs VALUES ('h', 'm', '{}', :t)"), {"t": now})
        conn.execute(text("INSERT INTO files (id, path, size, mtime_ns, sop_instance_uid, status, seen_at) "
                          "VALUES (1, '/a/1.dcm', 1, 1, '9.1', 'done', :t)"), {"t": now})
        conn.execute(text("INSERT INTO instances (sop_instance_uid, study_instance_uid, series_instance_uid, modality, "
                          "frames, file_id, route, status, attempts, updated_at) VALUES ('9.1', '9.9', '9.8', 'CR', 1, "
                          "1, 'chest-xray', 'done', 1, :t)"), {"t": now})
        conn.execute(text("INSERT INTO predictions (sop_instance_uid, frame, model, weights, label, probability, "
                          "uncertainty, rank, config_hash, untrained, needs_review, processed_at) VALUES "
                          "('9.1', 0, 'm', 'untrained', 'Mass', 0.8, 0.01, 1, 'h', :f, :f, :t)"),
                     {"t": now, "f": False})
        if start == "0006":
            conn.execute(text("INSERT INTO deliveries (destination, sop_instance_uid, sop_class_uid, "
                              "study_instance_uid, kind, path, status, attempts, created_at, updated_at, "
                              "next_attempt_at) VALUES "
                              "('PACS@h:104', '9.7', '1.2', '9.9', 'sr', '/o/sr.dcm', 'pending', 0, :t, :t, :t)"),
                         {"t": now})
    db.create()
    assert current(db.engine) == "0007" and any(Path(v, "0007_safety.py").is_file() for v in versions)
    got = rows(db, "SELECT label, needs_review, outside_population, ood_score, out_of_distribution, review_reason, "
                   "gating_notes FROM findings")
    assert len(got) == 1 and got[0][:6] == ("Mass", False, 0, None, None, None)
    assert got[0][6].startswith("indexed before input gating existed")
    assert rows(db, "SELECT needs_review FROM study_findings") == [(0,)]
    if start == "0006":
        assert rows(db, "SELECT destination, status FROM deliveries") == [("PACS@h:104", "pending")]
    from db import audit

    audit.record(db, audit.Event(audit.Actor("a"), audit.Action.VIEW_STUDY, "9.9"))
    with pytest.raises(Exception, match="append-only"):
        with db.engine.begin() as conn:
            conn.execute(text("DELETE FROM audit"))
    db.dispose()
