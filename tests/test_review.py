"""The review page over HTTP (starlette's TestClient, the app in-process) on real databases: the worklist's order,
paging and filters, the study page, the token rule for verdicts, the confinement of heatmap files, escaping, the
summary's numbers, and the worklist's plan on a 54,000-row predictions table. One test repeats the core on
PostgreSQL. The browser test is tests/test_review_browser.py."""

from __future__ import annotations

import os
import re
from datetime import date
from pathlib import Path

import cv2
import numpy as np
import pytest
from sqlalchemy import text
from starlette.testclient import TestClient

from benchmarks.bench_worklist import MODEL, fill
from db import review as queries
from db.store import Database
from neuron.settings import Settings
from review.app import create_app, is_loopback

TOKEN = "review-test-token-abcdef0123456789"


def _fill(db: Database, heatmaps: Path, n: int = 120) -> None:
    """``n`` screened studies (bench_worklist's generator) and a real PNG for each stored heatmap path, moved under
    this test's heatmap folder."""
    fill(db, n, reviewed_every=10)
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE predictions SET heatmap_path = :root || heatmap_path WHERE heatmap_path IS NOT NULL"),
                     {"root": str(heatmaps.parent)})
        paths = conn.execute(text("SELECT heatmap_path FROM predictions WHERE heatmap_path IS NOT NULL")).scalars()
        overlay = np.zeros((32, 32, 3), np.uint8)
        overlay[..., 2] = 200
        for p in paths:
            Path(p).parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(p, overlay)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    out = tmp_path_factory.mktemp("review-http")
    settings = Settings(out_dir=out)
    db = Database(settings.resolved_database_url)
    _fill(db, settings.heatmap_dir)
    yield db, settings
    db.dispose()


@pytest.fixture(scope="module")
def client(archive):
    db, settings = archive
    return TestClient(create_app(db, settings, TOKEN))


def _rows(db: Database, sql: str, **params):
    with db.engine.connect() as conn:
        return conn.execute(text(sql), params).all()


def _accessions(html: str) -> list[str]:
    """The accession numbers of the worklist's rows, in order."""
    return re.findall(r'<td><a href="/study/[^"]+">(A\d{8})</a></td>', html)


def test_the_worklist_is_ordered_by_top_finding_and_paged_by_fifty(archive, client):
    db, _ = archive
    expected = [f"A{i:08d}" for (i,) in _rows(db, "SELECT CAST(SUBSTR(accession_number, 2) AS INTEGER) FROM studies "
                                                   "ORDER BY top_probability DESC, study_instance_uid")]
    pages = [client.get("/", params={"page": p}) for p in (1, 2, 3)]
    assert all(r.status_code == 200 for r in pages)
    shown = [_accessions(r.text) for r in pages]
    assert [len(s) for s in shown] == [50, 50, 20]
    assert [a for s in shown for a in s] == expected
    assert 'rel="next"' in pages[0].text and 'rel="prev"' not in pages[0].text
    assert 'rel="prev"' in pages[2].text and 'rel="next"' not in pages[2].text


def _expected(db: Database, where: str, **params) -> set[str]:
    return {a for (a,) in _rows(db, f"SELECT s.accession_number FROM studies s WHERE {where}", **params)}


@pytest.mark.parametrize("params, where", [
    ({"label": "Effusion", "min_probability": "0.3"},
     "EXISTS (SELECT 1 FROM predictions p JOIN instances i ON i.sop_instance_uid = p.sop_instance_uid WHERE "
     "i.study_instance_uid = s.study_instance_uid AND p.label = 'Effusion' AND p.probability >= 0.3)"),
    ({"min_probability": "0.6"}, "s.top_probability >= 0.6"),
    ({"needs_review": "1", "modality": "dx"}, "s.needs_review > 0 AND s.modalities = 'DX'"),
    ({"date_from": "2026-03-01", "date_to": "2026-05-31"}, "s.study_date BETWEEN '2026-03-01' AND '2026-05-31'"),
    ({"reviewed": "yes"}, "EXISTS (SELECT 1 FROM verdicts v WHERE v.study_instance_uid = s.study_instance_uid)"),
    ({"reviewed": "no", "min_probability": "0.5"},
     "s.top_probability >= 0.5 AND NOT EXISTS (SELECT 1 FROM verdicts v WHERE "
     "v.study_instance_uid = s.study_instance_uid)"),
])
def test_each_filter_shows_exactly_the_matching_studies(archive, params, where):
    db, _ = archive
    expected = _expected(db, where)
    assert 0 < len(expected) < 120
    f = queries.WorklistFilter.from_query(params)
    shown = {r.accession_number for r in queries.worklist(db, f, page_size=200).rows}
    assert shown == expected


@pytest.mark.parametrize("query, message", [
    ("min_probability=lots", "'lots' is not a number"),
    ("min_probability=1.5", "outside 0..1"),
    ("date_from=27.11.2026", "use YYYY-MM-DD"),
    ("reviewed=maybe", "not one of any, yes, no"),
    ("page=-1", "not a page number"),
    ("date_from=2026-05-01&date_to=2026-04-01", "swap them"),
])
def test_a_bad_filter_is_a_400_that_names_the_value(client, query, message):
    r = client.get(f"/?{query}")
    assert r.status_code == 400 and message in r.text.replace("&#39;", "'")


def test_the_study_page_shows_every_finding_with_provenance_and_its_verdicts(archive, client):
    db, _ = archive
    uid, label = _rows(db, "SELECT v.study_instance_uid, v.label FROM verdicts v ORDER BY v.id LIMIT 1")[0]
    r = client.get(f"/study/{uid}")
    assert r.status_code == 200
    for expected in (MODEL, "untrained", "c0ffee0123456789", "native", label, "heatmap opacity", "bench"):
        assert expected in r.text
    assert r.text.count('class="verdict-form"') == 18
    assert "default-src 'self'" in r.headers["content-security-policy"]
    assert client.get("/study/1.2.3.not.there").status_code == 404


def test_a_verdict_needs_the_token_and_is_stored_with_the_reviewer(archive, client):
    db, settings = archive
    pid, uid = _rows(db, "SELECT p.id, i.study_instance_uid FROM predictions p JOIN instances i "
                         "ON i.sop_instance_uid = p.sop_instance_uid WHERE p.label = 'Nodule' ORDER BY p.id LIMIT 1")[0]
    form = {"verdict": "disagree", "reviewer": "Dr Http", "note": "rib crossing"}
    count = "SELECT COUNT(*) FROM verdicts WHERE reviewer = 'Dr Http'"
    readonly = TestClient(create_app(db, settings, None))
    r = readonly.post(f"/finding/{pid}/verdict", data=form)
    assert r.status_code == 403 and "NEURON_REVIEW_TOKEN" in r.text
    assert client.post(f"/finding/{pid}/verdict", data=form).status_code == 403  # no token at all
    assert client.post(f"/finding/{pid}/verdict", data=form,
                       headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert client.post(f"/finding/{pid}/verdict", data={**form, "token": TOKEN[:-1]}).status_code == 403
    assert client.post(f"/finding/{pid}/verdict", data=form, headers={"Authorization": f"Bearer {TOKEN}",
                       "Origin": "http://evil.example"}).status_code == 403
    assert _rows(db, count)[0][0] == 0

    r = client.post(f"/finding/{pid}/verdict", data=form, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 201
    r = client.post(f"/finding/{pid}/verdict", data={**form, "verdict": "agree", "note": "", "token": TOKEN},
                    follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == f"/study/{uid}#finding-{pid}"
    rows = _rows(db, "SELECT verdict, note, reviewer, latest, label FROM reviews WHERE reviewer = 'Dr Http' "
                     "ORDER BY reviewed_at")
    assert [tuple(r) for r in rows] == [("disagree", "rib crossing", "Dr Http", 0, "Nodule"),
                                        ("agree", None, "Dr Http", 1, "Nodule")]

    for bad, message in (({"verdict": "maybe"}, "not one of agree, disagree, unsure"),
                         ({"reviewer": "  "}, "reviewer name is empty")):
        r = client.post(f"/finding/{pid}/verdict", data={**form, **bad}, headers={"Authorization": f"Bearer {TOKEN}"})
        assert r.status_code == 400 and message in r.text
    assert client.post("/finding/999999999/verdict", data=form,
                       headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 400


def test_signing_in_keeps_a_cookie_that_is_not_the_token(archive):
    db, settings = archive
    browser = TestClient(create_app(db, settings, TOKEN))
    assert browser.post("/signin", data={"token": "nope", "reviewer": "Dr C"}).status_code == 403
    r = browser.post("/signin", data={"token": TOKEN, "reviewer": "Dr C", "next": "//evil.example/x"},
                     follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    assert TOKEN not in r.headers.get("set-cookie", "")
    pid = _rows(db, "SELECT id FROM predictions ORDER BY id DESC LIMIT 1")[0][0]
    r = browser.post(f"/finding/{pid}/verdict", data={"verdict": "unsure"}, follow_redirects=False)
    assert r.status_code == 303
    assert _rows(db, "SELECT reviewer FROM verdicts ORDER BY id DESC LIMIT 1")[0][0] == "Dr C"


def test_heatmaps_are_served_only_from_inside_the_heatmap_folder(archive, client, tmp_path):
    db, settings = archive
    pid, stored = _rows(db, "SELECT id, heatmap_path FROM predictions WHERE heatmap_path IS NOT NULL "
                            "ORDER BY id LIMIT 1")[0]
    r = client.get(f"/heatmap/{pid}")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    gray = cv2.imdecode(np.frombuffer(client.get(f"/heatmap/{pid}/gray").content, np.uint8), cv2.IMREAD_UNCHANGED)
    assert gray.shape == (32, 32)

    secret = tmp_path / "secret.png"
    cv2.imwrite(str(secret), np.zeros((4, 4, 3), np.uint8))
    link = settings.heatmap_dir / "ab" / "link.png"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.unlink(missing_ok=True)
    os.symlink(secret, link)
    victims = _rows(db, "SELECT id FROM predictions WHERE heatmap_path IS NOT NULL ORDER BY id LIMIT 4 OFFSET 1")
    tampered = {victims[0][0]: str(settings.heatmap_dir / os.path.relpath(secret, settings.heatmap_dir)),
                victims[1][0]: str(secret), victims[2][0]: str(link), victims[3][0]: "/etc/passwd"}
    with db.engine.begin() as conn:
        for vid, path in tampered.items():
            conn.execute(text("UPDATE predictions SET heatmap_path = :p WHERE id = :id"), {"p": path, "id": vid})
    try:
        for vid in tampered:
            assert client.get(f"/heatmap/{vid}").status_code == 404, tampered[vid]
            assert client.get(f"/heatmap/{vid}/gray").status_code == 404, tampered[vid]
    finally:
        with db.engine.begin() as conn:
            conn.execute(text("UPDATE predictions SET heatmap_path = :p WHERE id = :id"), {"p": stored, "id": pid})
    for path in ("/heatmap/..%2F..%2Fetc%2Fpasswd", "/heatmap/%2e%2e/%2e%2e/etc/passwd", "/heatmap/../neuron.db",
                 f"/heatmap/{stored}", "/heatmap/-1", "/static/..%2F..%2Fdb%2Freview.py"):
        assert client.get(path).status_code == 404, path


def test_every_page_escapes_what_the_database_holds(archive, client):
    db, _ = archive
    uid = _rows(db, "SELECT study_instance_uid FROM studies ORDER BY top_probability DESC LIMIT 1")[0][0]
    with db.engine.begin() as conn:
        conn.execute(text("UPDATE studies SET study_description = '<script>alert(1)</script>' WHERE "
                          "study_instance_uid = :u"), {"u": uid})
    try:
        for r in (client.get("/"), client.get(f"/study/{uid}")):
            assert "<script>alert(1)" not in r.text and "&lt;script&gt;alert(1)" in r.text
    finally:
        with db.engine.begin() as conn:
            conn.execute(text("UPDATE studies SET study_description = 'CHEST PA' WHERE study_instance_uid = :u"),
                         {"u": uid})


def test_the_summary_counts_positives_uncertainty_and_agreement(archive, client):
    db, _ = archive
    data = queries.summary(db, days=400, now=None)
    total, positives = _rows(db, "SELECT COUNT(*), SUM(CASE WHEN probability >= 0.5 THEN 1 ELSE 0 END) "
                                 "FROM predictions")[0]
    assert sum(n for _, _, n in data.histogram) == total
    assert sum(data.positives.values()) == positives
    latest = _rows(db, "SELECT label, SUM(CASE WHEN verdict = 'agree' THEN 1 ELSE 0 END), COUNT(*) FROM reviews "
                       "WHERE latest = 1 GROUP BY label ORDER BY label")
    assert data.agreement == [tuple(r) for r in latest] and data.agreement
    r = client.get("/summary")
    assert r.status_code == 200 and r.text.count("<svg") == 3 and "<script" not in r.text.split("</head>")[1]


def test_the_worklist_plan_walks_the_indexes(tmp_path):
    """On 3,000 studies (54,000 predictions rows): the page order comes from ix_studies_top_probability and a label
    filter probes ix_predictions_label_probability; neither scans a table. The 1,000,000-row numbers and plans, on
    SQLite and PostgreSQL, are in BENCHMARKS.md (benchmarks/bench_worklist.py)."""
    db = Database(f"sqlite:///{tmp_path / 'plan.db'}")
    fill(db, 3000)
    plain = queries.explain(db, queries.worklist_query(queries.WorklistFilter(page=20)))
    labelled = queries.explain(db, queries.worklist_query(queries.WorklistFilter(label="Mass", min_probability=0.8)))
    dated = queries.explain(db, queries.worklist_query(queries.WorklistFilter(date_from=date(2026, 3, 1))))
    common = queries.WorklistFilter(label="Hernia")  # every study has a Hernia finding: walk, probe, stop
    assert queries.label_is_common(db, common) and not queries.label_is_common(db, queries.WorklistFilter(
        label="Mass", min_probability=0.8))
    walked = queries.explain(db, queries.worklist_query(common, common_label=True))
    assert walked[0].startswith("SEARCH studies USING INDEX ix_studies_top_probability"), walked
    assert any("SEARCH predictions USING INDEX sqlite_autoindex_predictions_1 (sop_instance_uid=?)" in line
               for line in walked), walked
    assert any("USING INDEX ix_studies_top_probability" in line for line in plain), plain
    assert any("USING INDEX ix_predictions_label_probability (label=? AND probability>?)" in line
               for line in labelled), labelled
    assert any("USING INDEX ix_studies_study_date" in line or "ix_studies_top_probability" in line
               for line in dated), dated
    assert not any(line.startswith("SCAN studies") or line.startswith("SCAN predictions")
                   for line in plain + labelled + dated + walked), (plain, labelled, dated, walked)
    db.dispose()


def test_a_server_beyond_loopback_needs_the_token_to_read_too(archive, tmp_path):
    """Off loopback (``private``) every page and heatmap is a 401 with the sign-in form until the reader signs in
    or sends the token; the stylesheet still loads. Without a token ``neuron review --host`` refuses to start."""
    import subprocess
    import sys

    db, settings = archive
    reader = TestClient(create_app(db, settings, TOKEN, private=True))
    pid = _rows(db, "SELECT id FROM predictions WHERE heatmap_path IS NOT NULL LIMIT 1")[0][0]
    study = _rows(db, "SELECT study_instance_uid FROM studies LIMIT 1")[0][0]
    pages = ("/", f"/study/{study}", "/summary", f"/heatmap/{pid}", f"/heatmap/{pid}/gray")
    for url in pages:
        r = reader.get(url)
        assert r.status_code == 401 and 'action="/signin"' in r.text and "A0000" not in r.text, url
    assert reader.get("/static/review.css").status_code == 200
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    assert reader.get("/", headers={"Authorization": "Bearer wrong-token"}).status_code == 401
    assert all(reader.get(url, headers=bearer).status_code == 200 for url in pages)
    r = reader.post("/signin", data={"token": TOKEN, "reviewer": "Dr D", "next": "/summary"}, follow_redirects=False)
    assert r.status_code == 303
    assert all(reader.get(url).status_code == 200 for url in pages)  # the sign-in cookie
    with pytest.raises(ValueError):
        create_app(db, settings, None, private=True)
    env = {k: v for k, v in os.environ.items() if k != "NEURON_REVIEW_TOKEN"}
    proc = subprocess.run([sys.executable, "-m", "neuron", "review", "--host", "0.0.0.0", "--out", str(tmp_path)],
                          capture_output=True, text=True, env={**env, "COLUMNS": "200"}, timeout=60)
    assert proc.returncode == 4 and "NEURON_REVIEW_TOKEN is unset" in proc.stderr, proc.stderr
    assert not any(tmp_path.iterdir())  # refused before opening (or creating) a database


def test_only_loopback_addresses_count_as_local():
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.0.1", "::1", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "192.168.1.5", "::", "example.org"))


def test_the_review_works_on_postgresql(servers, tmp_path):
    from .services import reset_postgres

    _, pg = servers
    reset_postgres(pg.url)
    settings = Settings(out_dir=tmp_path, database_url=pg.url)
    db = Database(pg.url)
    _fill(db, settings.heatmap_dir, n=80)
    client = TestClient(create_app(db, settings, TOKEN))
    expected = [a for (a,) in _rows(db, "SELECT accession_number FROM studies ORDER BY top_probability DESC, "
                                         "study_instance_uid LIMIT 50")]
    assert _accessions(client.get("/").text) == expected
    f = queries.WorklistFilter.from_query({"label": "Effusion", "min_probability": "0.3", "modality": "CR",
                                           "date_from": "2026-02-01", "reviewed": "no"})
    shown = {r.accession_number for r in queries.worklist(db, f, page_size=100).rows}
    expected_filtered = _expected(db, "s.modalities = 'CR' AND s.study_date >= '2026-02-01' AND NOT EXISTS (SELECT 1 "
                                  "FROM verdicts v WHERE v.study_instance_uid = s.study_instance_uid) AND EXISTS "
                                  "(SELECT 1 FROM predictions p JOIN instances i ON i.sop_instance_uid = "
                                  "p.sop_instance_uid WHERE i.study_instance_uid = s.study_instance_uid AND "
                                  "p.label = 'Effusion' AND p.probability >= 0.3)")
    assert shown == expected_filtered and shown
    pid, uid = _rows(db, "SELECT p.id, i.study_instance_uid FROM predictions p JOIN instances i "
                         "ON i.sop_instance_uid = p.sop_instance_uid WHERE p.heatmap_path IS NOT NULL LIMIT 1")[0]
    assert client.get(f"/study/{uid}").status_code == 200
    assert client.get(f"/heatmap/{pid}").status_code == 200
    r = client.post(f"/finding/{pid}/verdict", data={"verdict": "agree", "reviewer": "Dr Pg"},
                    headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 201
    assert _rows(db, "SELECT verdict, latest FROM reviews WHERE reviewer = 'Dr Pg'") == [("agree", 1)]
    data = queries.summary(db, days=400)
    assert sum(n for _, _, n in data.histogram) == 80 * 18
    assert client.get("/summary").status_code == 200
    assert queries.labels(db) == sorted(queries.labels(db)) and len(queries.labels(db)) == 18
    db.dispose()


def test_the_review_hint_of_a_run_followed_from_another_folder_shows_the_heatmaps(tmp_path, monkeypatch, chest_small,
                                                                                   models, untrained_settings):
    """With NEURON_DATABASE_URL set, `neuron run` ends by printing `neuron review --db URL`. Started exactly so from
    another folder, the server looked for heatmaps under that folder's ./results/heatmaps and every study page showed
    broken images. It now serves the file each finding records, confined to the folders the runs recorded."""
    import shlex
    import subprocess
    import sys
    import urllib.request

    from neuron_cli.screening import review_hint
    from worker.embedded import run_folder
    from worker.pipeline import Pipeline

    from .conftest import small_chest
    from .services import free_port, wait_for_port

    archive, here, elsewhere = tmp_path / "archive", tmp_path / "here", tmp_path / "elsewhere"
    small_chest(chest_small, archive / "a.dcm", step=4)
    here.mkdir()
    elsewhere.mkdir()
    monkeypatch.chdir(here)  # `neuron run ARCHIVE` from here, results in the default ./results
    settings = untrained_settings.with_(out_dir=Path("results"), database_url=f"sqlite:///{tmp_path / 'n.db'}")
    run_folder(archive, settings, pipeline=Pipeline(models, settings))
    hint = review_hint(settings)
    assert hint.startswith("neuron review --db sqlite:///")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEURON_")}
    proc = subprocess.Popen([sys.executable, "-m", "neuron", *shlex.split(hint)[1:], "--port", str(port)],
                            cwd=elsewhere, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_port(port, timeout=60)
        base = f"http://127.0.0.1:{port}"
        worklist = urllib.request.urlopen(base + "/").read().decode()
        (study,) = set(re.findall(r'href="(/study/[^"]+)"', worklist))
        page = urllib.request.urlopen(base + study).read().decode()
        maps = set(re.findall(r'src="(/heatmap/\d+)"', page))
        assert maps, page
        for url in maps:
            with urllib.request.urlopen(base + url) as r:
                assert r.status == 200 and r.headers["content-type"] == "image/png"
                assert cv2.imdecode(np.frombuffer(r.read(), np.uint8), cv2.IMREAD_COLOR).shape == (224, 224, 3)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert not (elsewhere / "results").exists()  # nothing written where the review was started
