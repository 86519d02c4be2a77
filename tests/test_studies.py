"""The worklist's study columns: StudyDate, AccessionNumber and StudyDescription kept from the header, the Patient ID
only as a keyed hash (--patient-key), and a per-study results summary kept current by commits, rescreens and purges,
on SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import subprocess
import sys

import pytest
from sqlalchemy import text

from db.admin import Selection, purge_results
from db.migrate import upgrade
from db.store import Database
from neuron.work import FrameResult, LabelScore, Outcome, Status
from producer.scan import index_folder

from .conftest import empty_database_url, small_chest

pytestmark = pytest.mark.timeout(120)
SECRET = "s" * 32
PATIENT = "PAT-4711"
CONFIG = "c" * 64
MODEL = "xrv-densenet121-res224-all"


@pytest.fixture(scope="module")
def archive(tmp_path_factory, rg1):
    """Three real CR instances: two studies of one patient, one of another; one header with an impossible date."""
    root = tmp_path_factory.mktemp("archive")
    small_chest(rg1, root / "a1.dcm", step=16, StudyInstanceUID="1.2.826.0.1.1", StudyDate="20260301",
                AccessionNumber="ACC001", StudyDescription="CHEST PA", PatientID=PATIENT, PatientName="Doe^Jane")
    small_chest(rg1, root / "a2.dcm", step=16, StudyInstanceUID="1.2.826.0.1.1", StudyDate="20260301",
                AccessionNumber="ACC001", StudyDescription="CHEST PA", PatientID=PATIENT, PatientName="Doe^Jane")
    small_chest(rg1, root / "b1.dcm", step=16, StudyInstanceUID="1.2.826.0.1.2", StudyDate="20261131",
                AccessionNumber="ACC002", StudyDescription="CHEST AP", PatientID=PATIENT, PatientName="Doe^Jane")
    small_chest(rg1, root / "c1.dcm", step=16, StudyInstanceUID="1.2.826.0.1.3", StudyDate="20260305",
                AccessionNumber="", StudyDescription="", PatientID="OTHER-1", PatientName="Roe^Rick")
    return root


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    database = Database(empty_database_url(request, tmp_path, request.param))
    database.create()
    database.ensure_config(CONFIG, MODEL, {"test": True})
    yield database
    database.dispose()


def rows(db: Database, sql: str) -> list[tuple]:
    with db.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(sql))]


def outcome(uid: str, probabilities: dict[str, float], review: str | None = None) -> Outcome:
    scores = tuple(LabelScore(label, p, 0.2 if label == review else 0.01, rank + 1, None, label == review)
                   for rank, (label, p) in enumerate(sorted(probabilities.items(), key=lambda kv: -kv[1])))
    return Outcome(uid, Status.DONE, None, (FrameResult(0, MODEL, "untrained", CONFIG, True, scores),))


def sop_uids(db: Database, study: str) -> list[str]:
    return [r[0] for r in rows(db, f"SELECT sop_instance_uid FROM instances WHERE study_instance_uid = '{study}' "
                                   "ORDER BY sop_instance_uid")]


def test_header_columns_are_kept_and_the_patient_only_as_a_keyed_hash(db, archive):
    index_folder(archive, db, workers=0, patient_secret=SECRET)
    got = {r[0]: r[1:] for r in rows(db, "SELECT study_instance_uid, study_date, accession_number, "
                                         "study_description, patient_key, modalities FROM studies")}
    key = hmac.new(SECRET.encode(), PATIENT.encode(), hashlib.sha256).hexdigest()
    a, b, c = got["1.2.826.0.1.1"], got["1.2.826.0.1.2"], got["1.2.826.0.1.3"]
    assert str(a[0]) == "2026-03-01" and a[1:3] == ("ACC001", "CHEST PA") and a[3] == key and a[4] == "CR"
    assert b[0] is None, "20261131 is not a date: stored as NULL, not guessed"
    assert b[3] == key, "two studies of one patient share the key"
    assert c[3] not in (None, key) and c[1] is None and c[2] is None
    # nothing anywhere in the database names the patient
    for table in ("files", "instances", "studies"):
        dump = " ".join(map(str, rows(db, f"SELECT * FROM {table}")))
        assert PATIENT not in dump and "Doe" not in dump and hashlib.sha256(PATIENT.encode()).hexdigest() not in dump


def test_without_patient_key_no_patient_identity_is_stored(db, archive):
    index_folder(archive, db, workers=0)
    assert rows(db, "SELECT DISTINCT patient_key FROM studies") == [(None,)]
    assert rows(db, "SELECT accession_number FROM studies WHERE study_instance_uid = '1.2.826.0.1.2'") == [("ACC002",)]


def test_the_summary_follows_commits_rescreens_and_purges_and_matches_the_views(db, archive):
    index_folder(archive, db, workers=0)
    a1, a2 = sop_uids(db, "1.2.826.0.1.1")
    assert rows(db, "SELECT top_probability, screened_instances FROM studies "
                    "WHERE study_instance_uid = '1.2.826.0.1.1'") == [(None, 0)]
    db.record_outcomes([outcome(a1, {"Effusion": 0.7, "Nodule": 0.2}),
                        outcome(a2, {"Effusion": 0.4, "Nodule": 0.9}, review="Effusion")])
    summary = rows(db, "SELECT top_probability, top_label, top_model, positive_findings, needs_review, "
                       "screened_instances FROM studies WHERE study_instance_uid = '1.2.826.0.1.1'")
    assert summary == [(pytest.approx(0.9), "Nodule", MODEL, 2, 1, 2)]
    view = rows(db, "SELECT max_probability, top_finding, top_model, positive_findings, needs_review, instances, "
                    "study_date, accession_number FROM study_findings WHERE study_instance_uid = '1.2.826.0.1.1'")
    assert view == [(pytest.approx(0.9), "Nodule", MODEL, 2, 1, 2, view[0][6], "ACC001")]
    assert str(view[0][6]).startswith("2026-03-01")
    assert rows(db, "SELECT DISTINCT accession_number FROM findings") == [("ACC001",)]
    # a rescreen replaces a2's results: the summary follows
    db.record_outcomes([outcome(a2, {"Effusion": 0.1, "Nodule": 0.3})], replace=[a2])
    assert rows(db, "SELECT top_probability, top_label, positive_findings, needs_review FROM studies "
                    "WHERE study_instance_uid = '1.2.826.0.1.1'") == [(pytest.approx(0.7), "Effusion", 1, 0)]
    # a purge of every result empties it again
    purge_results(db, Selection(study="1.2.826.0.1.1"), [a1, a2])
    assert rows(db, "SELECT top_probability, top_label, positive_findings, screened_instances, screened_at "
                    "FROM studies WHERE study_instance_uid = '1.2.826.0.1.1'") == [(None, None, 0, 0, None)]


def test_a_database_from_before_the_studies_table_gets_its_rows_and_summaries(tmp_path, archive):
    db = Database(f"sqlite:///{tmp_path / 'old.db'}")
    upgrade(db.engine, "0003")
    index_folder_old = [(p.name, p) for p in sorted(archive.glob("*.dcm"))]
    assert index_folder_old
    with db.engine.begin() as conn:  # what revision 0003 held: files, instances, predictions
        conn.execute(text("INSERT INTO pipeline_configs VALUES (:h, :m, '{}', :t)"),
                     {"h": CONFIG, "m": MODEL, "t": dt.datetime.now(dt.UTC)})
        conn.execute(text("INSERT INTO files (id, path, size, mtime_ns, sop_instance_uid, status, seen_at) "
                          "VALUES (1, '/a/1.dcm', 1, 1, '9.1', 'done', :t)"), {"t": dt.datetime.now(dt.UTC)})
        conn.execute(text("INSERT INTO instances (sop_instance_uid, study_instance_uid, series_instance_uid, modality, "
                          "frames, file_id, route, status, attempts, updated_at) VALUES ('9.1', '9.9', '9.8', 'DX', 1, "
                          "1, 'chest-xray', 'done', 1, :t)"), {"t": dt.datetime.now(dt.UTC)})
        conn.execute(text("INSERT INTO predictions (sop_instance_uid, frame, model, weights, label, probability, "
                          "uncertainty, rank, config_hash, untrained, needs_review, processed_at) VALUES "
                          "('9.1', 0, :m, 'untrained', 'Mass', 0.8, 0.01, 1, :h, 1, 0, :t)"),
                     {"m": MODEL, "h": CONFIG, "t": dt.datetime.now(dt.UTC)})
    db.create()
    assert rows(db, "SELECT study_instance_uid, modalities, top_probability, top_label, positive_findings "
                    "FROM studies") == [("9.9", "DX", pytest.approx(0.8), "Mass", 1)]
    db.dispose()


def test_patient_key_without_a_secret_stops_with_the_fix(tmp_path, archive):
    env = {"PATH": "/usr/bin:/bin", "NEURON_PATIENT_KEY": "short"}
    proc = subprocess.run([sys.executable, "-m", "neuron", "scan", str(archive), "--db",
                           f"sqlite:///{tmp_path / 'x.db'}", "--patient-key"], capture_output=True, text=True,
                          env=env, timeout=60)
    assert proc.returncode == 2, proc.stderr
    said = " ".join(proc.stderr.split())
    assert "NEURON_PATIENT_KEY" in said and "5 characters" in said and "secrets.token_hex" in said
    assert not (tmp_path / "x.db").exists()
