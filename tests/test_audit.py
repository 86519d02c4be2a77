"""The audit trail: every study page view, heatmap view, verdict and sign-in of the review app (over HTTP), and every
export, purge and rescreen of the command line (real `neuron` processes), appends a row saying who, what, which study
or filter, when and from where, through one code path (db.audit.record). The trail is append-only on SQLite and
PostgreSQL (triggers refuse UPDATE, DELETE and TRUNCATE; only `neuron audit --prune-before` deletes, and records that
it did), a purge of results keeps the audit of who saw them, and `neuron audit` exports CSV and FHIR R4 AuditEvent
resources that a FHIR library validates."""

from __future__ import annotations

import csv
import inspect
import io
import json
import os
import pwd
import re
import socket
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from starlette.testclient import TestClient

from db import audit
from db.store import Database
from neuron.settings import Settings
from review.app import create_app

from .conftest import empty_database_url
from .test_review import TOKEN, _fill

ROOT = Path(__file__).resolve().parents[1]
ME = pwd.getpwuid(os.getuid()).pw_name
pytestmark = pytest.mark.timeout(180)


def neuron(*args, timeout=120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEURON_")}
    return subprocess.run([sys.executable, "-m", "neuron", *args], capture_output=True, text=True, timeout=timeout,
                          env={**env, "COLUMNS": "200"})


@pytest.fixture(params=["sqlite", "postgresql"])
def archive(request, tmp_path):
    """A screened archive of 6 studies with heatmaps (the review tests' generator), on each database."""
    url = empty_database_url(request, tmp_path, request.param)
    settings = Settings(out_dir=tmp_path, database_url=url)
    db = Database(url)
    _fill(db, settings.heatmap_dir, n=6)
    yield db, settings
    db.dispose()


def rows(db: Database, sql: str, **params) -> list[tuple]:
    with db.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(sql), params)]


def trail(db: Database) -> list[tuple]:
    return rows(db, "SELECT actor, address, action, outcome, study_instance_uid, target FROM audit ORDER BY id")


def test_the_review_app_records_who_saw_which_study_and_heatmap_and_gave_which_verdict(archive):
    db, settings = archive
    client = TestClient(create_app(db, settings, TOKEN))
    study, pid, label = rows(db, "SELECT i.study_instance_uid, p.id, p.label FROM predictions p JOIN instances i ON "
                                 "i.sop_instance_uid = p.sop_instance_uid WHERE p.heatmap_path IS NOT NULL "
                                 "ORDER BY p.id LIMIT 1")[0]
    assert client.get(f"/study/{study}").status_code == 200
    assert client.get(f"/heatmap/{pid}").status_code == 200
    assert client.get(f"/heatmap/{pid}/gray").status_code == 200
    assert client.get("/").status_code == 200 and client.get("/summary").status_code == 200  # aggregates: not rows
    assert client.post("/signin", data={"token": "wrong", "reviewer": "Mallory"}).status_code == 403
    client.post("/signin", data={"token": TOKEN, "reviewer": "Dr Audit"}, follow_redirects=False)
    assert client.post(f"/finding/{pid}/verdict", data={"verdict": "agree"}, follow_redirects=False).status_code == 303
    assert client.get(f"/study/{study}").status_code == 200
    assert trail(db) == [
        ("loopback", "testclient", "view-study", "success", study, None),
        ("loopback", "testclient", "view-heatmap", "success", study, f"finding {pid} ({label}), heatmap"),
        ("loopback", "testclient", "view-heatmap", "success", study, f"finding {pid} ({label}), heatmap in grayscale"),
        ("Mallory", "testclient", "sign-in", "failure", None, None),
        ("Dr Audit", "testclient", "sign-in", "success", None, None),
        ("Dr Audit", "testclient", "verdict", "success", study, f"finding {pid} ({label})"),
        ("Dr Audit", "testclient", "view-study", "success", study, None),
    ]
    at = rows(db, "SELECT MIN(at), MAX(at) FROM audit")[0]
    assert all(a is not None for a in at)


def test_the_audit_is_append_only_and_only_a_prune_deletes_and_records_itself(archive):
    db, _ = archive
    me = audit.Actor("Dr Old", "10.0.0.7")
    old = datetime.now(UTC) - timedelta(days=400)
    audit.record(db, audit.Event(me, audit.Action.VIEW_STUDY, "1.2.3", at=old),
                 audit.Event(me, audit.Action.VIEW_STUDY, "1.2.4"))
    for statement in ("UPDATE audit SET actor = 'someone else'", "DELETE FROM audit",
                      "DELETE FROM audit WHERE study_instance_uid = '1.2.3'"):
        with pytest.raises(DBAPIError, match="append-only"):
            with db.engine.begin() as conn:
                conn.execute(text(statement))
    if db.engine.dialect.name == "postgresql":
        with pytest.raises(DBAPIError, match="append-only"):
            with db.engine.begin() as conn:
                conn.execute(text("TRUNCATE audit"))
    assert len(trail(db)) == 2
    cut = datetime.now(UTC) - timedelta(days=30)
    assert audit.prune(db, cut, audit.Actor("admin", "cli@host")) == 1
    left = trail(db)
    assert [r[2] for r in left] == ["view-study", "audit-prune"] and left[0][4] == "1.2.4"
    assert left[1][0] == "admin" and f"rows before {cut.isoformat()}" == left[1][5]
    assert rows(db, "SELECT COUNT(*) FROM audit_prune") == [(0,)]  # the cut-off does not outlive its transaction


def test_a_purge_of_results_keeps_the_audit_of_who_saw_them(archive):
    db, settings = archive
    study = rows(db, "SELECT study_instance_uid FROM studies ORDER BY study_instance_uid LIMIT 1")[0][0]
    assert TestClient(create_app(db, settings, None)).get(f"/study/{study}").status_code == 200
    res = neuron("purge", "--study", study, "--yes", "--db", settings.resolved_database_url)
    assert res.returncode == 0, res.stderr
    assert rows(db, "SELECT COUNT(*) FROM findings WHERE study_instance_uid = :s", s=study) == [(0,)]
    (viewed, purged) = rows(db, "SELECT actor, action, study_instance_uid, target, detail, address FROM audit "
                                "ORDER BY id")
    assert viewed[:3] == ("loopback", "view-study", study)
    assert purged[:4] == (ME, "purge", study, f"--study {study}") and purged[5] == f"cli@{socket.gethostname()}"
    assert purged[4] == "results of 1 instances purged (18 rows)"


def test_neuron_audit_exports_csv_and_fhir_auditevents_and_is_audited_itself(tmp_path):
    from fhir.resources.R4B.bundle import Bundle

    settings = Settings(out_dir=tmp_path)
    db = Database(settings.resolved_database_url)
    _fill(db, settings.heatmap_dir, n=3)
    study = rows(db, "SELECT study_instance_uid FROM studies LIMIT 1")[0][0]
    client = TestClient(create_app(db, settings, TOKEN))
    client.get(f"/study/{study}")
    client.post("/signin", data={"token": "nope", "reviewer": "Eve"})
    export = neuron("export", "--out", str(tmp_path), "--where", "label = 'Effusion'", "-o", str(tmp_path / "e.csv"))
    assert export.returncode == 0, export.stderr
    res = neuron("audit", "--out", str(tmp_path), "--since", "2000-01-01", "--format", "json", "--output",
                 str(tmp_path / "audit.json"))
    assert res.returncode == 0, res.stderr
    bundle = json.loads((tmp_path / "audit.json").read_text())
    Bundle.model_validate(bundle)  # a FHIR R4(B) Bundle of valid AuditEvent resources
    events = [e["resource"] for e in bundle["entry"]]
    assert [(e["type"]["code"], e["action"], e["outcome"]) for e in events] == [
        ("110103", "R", "0"), ("110114", "E", "4"), ("110106", "R", "0")]
    assert events[0]["entity"][0]["what"]["identifier"]["value"] == f"urn:oid:{study}"
    assert events[2]["agent"][0]["who"]["display"] == ME and "label = 'Effusion'" in events[2]["entity"][0][
        "description"]
    res = neuron("audit", "--out", str(tmp_path), "--format", "csv")
    assert res.returncode == 0, res.stderr
    table = list(csv.DictReader(io.StringIO(res.stdout)))
    assert [r["action"] for r in table] == ["view-study", "sign-in", "export", "audit-export"]
    assert table[3]["detail"] == "3 rows" and table[3]["actor"] == ME
    assert all(datetime.fromisoformat(r["at"]).tzinfo is not None for r in table)
    pruned = neuron("audit", "--out", str(tmp_path), "--prune-before", "2000-01-01", "--yes")
    assert pruned.returncode == 0 and "deleted 0 audit rows" in pruned.stderr
    assert rows(db, "SELECT action FROM audit ORDER BY id")[-1] == ("audit-prune",)
    db.dispose()


def test_a_rescreen_is_recorded_per_study_with_the_selection(tmp_path, chest_small, untrained_settings, cache):
    from .conftest import small_chest

    folder = tmp_path / "archive"
    small_chest(chest_small, folder / "a.dcm", step=2)
    settings = untrained_settings.with_(out_dir=tmp_path / "out")
    settings.out_dir.mkdir()
    db = Database(settings.resolved_database_url)
    db.create()
    from producer.scan import index_folder

    index_folder(folder, db, workers=0)
    study = rows(db, "SELECT study_instance_uid FROM instances")[0][0]
    res = neuron("rescreen", "--study", study, "--out", str(settings.out_dir), "--weights", "untrained", "--device",
                 "cpu", "--cache-dir", str(cache), timeout=200)
    assert res.returncode == 0, res.stderr
    assert rows(db, "SELECT actor, action, study_instance_uid, target, detail FROM audit") == [
        (ME, "rescreen", study, f"--study {study}", "1 instances screened here")]
    assert rows(db, "SELECT COUNT(*) FROM findings") == [(18,)]
    db.dispose()


def test_nothing_but_the_prune_deletes_or_changes_audit_rows():
    """Every statement in the source that could change or remove audit rows is the prune's."""
    risky = re.compile(r"(delete|update)\(\s*(AuditEntry|audit_table)|\b(DELETE\s+FROM|UPDATE|TRUNCATE)\s+audit\b",
                       re.IGNORECASE)
    found = []
    for path in sorted(p for pkg in ("neuron", "neuron_cli", "producer", "worker", "neuron_models", "db", "review")
                       for p in (ROOT / pkg).rglob("*.py")):
        for line in path.read_text().splitlines():
            if risky.search(line):
                found.append((str(path.relative_to(ROOT)), line.strip()))
    assert found == [("db/audit.py", "conn.execute(delete(AuditEntry).where(AuditEntry.at < before))")]
    assert found[0][1] in inspect.getsource(audit.prune)


def test_a_command_that_records_itself_refuses_a_database_without_an_audit_trail(tmp_path):
    from db.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'old.db'}"
    db = Database(url)
    upgrade(db.engine, "0006")  # the schema before the audit trail
    db.dispose()
    res = neuron("export", "--db", url, "-o", str(tmp_path / "out.csv"))
    said = " ".join(res.stderr.split())
    assert res.returncode == 4 and "older schema without the audit table" in said and "neuron db upgrade" in said
    assert not (tmp_path / "out.csv").exists()
