"""Operating Neuron day to day: status, one option set, distinct workers, views, rescreen and purge, the
compose stack. Real SQLite, PostgreSQL and Redis (tests/services.py), real `neuron` processes; nothing mocked."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
import redis
import typer.main
from sqlalchemy import create_engine, text

from neuron.settings import Settings
from worker.pipeline import Pipeline

from .conftest import small_chest
from .services import free_port, wait_for_port
from .test_distributed import count_done, make_archive, neuron, sql, start_worker, stop, wait_until

pytestmark = pytest.mark.timeout(300)
ROOT = Path(__file__).resolve().parents[1]


def _cli():
    from neuron_cli import app

    return typer.main.get_command(app)


# -- status without a database, --db, --json ----------------------------------------------------------
def test_status_without_a_database_says_what_it_could_not_open_and_exits_4(tmp_path):
    import os

    clean = {k: v for k, v in os.environ.items() if not k.startswith("NEURON_")}
    res = subprocess.run([sys.executable, "-m", "neuron", "status"], cwd=tmp_path, env={**clean, "COLUMNS": "200"},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 4, res.stderr
    assert "Traceback" not in res.stderr
    assert str(tmp_path / "results" / "neuron.db") in res.stderr and "--db" in res.stderr
    assert not (tmp_path / "results").exists()  # status creates nothing


def test_status_and_scan_take_db_and_status_speaks_one_vocabulary_in_json(env, tmp_path, chest_small):
    folder = tmp_path / "archive"
    make_archive(folder, chest_small, studies=2)
    plain = {k: v for k, v in env.items() if k != "NEURON_DATABASE_URL"}
    res = neuron(plain, "scan", str(folder), "--db", env["NEURON_DATABASE_URL"])
    assert res.returncode == 0, res.stderr
    res = neuron(plain, "status", "--db", env["NEURON_DATABASE_URL"], "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["instances"] == {"queued": 2} and data["studies"] == {"queued": 2}
    assert data["queues"]["chest-xray"] == 2 and data["workers"] == {}
    # ingest_status says the same word as neuron status (it said "pending" for queued files)
    assert {r[0] for r in sql(env, "select status from ingest_status")} == {"queued"}
    assert {r[0] for r in sql(env, "select attempts from ingest_status")} == {0}


# -- images/s ---------------------------------------------------------------------------------------------
def test_images_per_second_divide_by_the_time_the_results_cover(tmp_path):
    from db.admin import throughput
    from db.schema import FileRecord, Instance, PipelineConfig, Prediction, utcnow
    from db.store import Database

    db = Database(f"sqlite:///{tmp_path / 'n.db'}")
    db.create()
    t0 = utcnow() - timedelta(seconds=12)
    with db.session() as s, s.begin():
        s.add(PipelineConfig(config_hash="h", model="m", settings_json="{}"))
        for i in range(10):  # 10 images finished over 11 s, one commit each ~1.2 s
            s.add(FileRecord(id=i + 1, path=f"/a/{i}", size=1, mtime_ns=1, sop_instance_uid=f"1.{i}", status="done"))
            s.add(Instance(sop_instance_uid=f"1.{i}", study_instance_uid="1", series_instance_uid="1", file_id=i + 1,
                           status="done"))
            s.add(Prediction(sop_instance_uid=f"1.{i}", frame=0, model="m", weights="w", label="x", probability=0.5,
                             uncertainty=0.0, rank=1, config_hash="h", untrained=True,
                             processed_at=t0 + timedelta(seconds=i * 11 / 9)))
    rate = throughput(db, window_s=300).per_second
    db.dispose()
    assert rate == pytest.approx(9 / 11, rel=0.01)  # not 10 / 300 = 0.03


# -- one option set, help texts ------------------------------------------------------------------
def _options(command) -> dict[str, object]:
    return {p.name: p for p in command.params}


def test_run_worker_listen_and_pull_share_every_screening_option_and_its_environment_variable():
    from neuron.settings import ENVIRONMENT
    from neuron_cli.options import SCREENING_OPTIONS

    cli = _cli()
    run, worker = _options(cli.commands["run"]), _options(cli.commands["worker"])
    for name in ("review_threshold", "max_frames", "max_pixels", "clahe_clip", "clahe_grid", "xrv_cache_dir",
                 "xrv_sha256", "tta", "clahe", "device", "batch_size", "precision", "cache_dir"):
        assert name in run and name in worker, name
    shared = {o.param for o in SCREENING_OPTIONS}
    for other in (worker, _options(cli.commands["listen"]), _options(cli.commands["pull"])):
        assert {n: run[n].opts for n in shared} == {n: other[n].opts for n in shared}
        assert {n: run[n].help for n in shared} == {n: other[n].help for n in shared}
    assert {"send_to", "tls_cert", "tls_key", "tls_ca"} <= shared
    for o in SCREENING_OPTIONS:
        assert o.env in ENVIRONMENT
    env = {"NEURON_REVIEW_THRESHOLD": "0.3", "NEURON_MAX_FRAMES": "4", "NEURON_TTA": "0", "NEURON_CACHE_DIR": "/c"}
    s = Settings.from_env(env)
    assert (s.review_threshold, s.max_frames, s.tta, s.resolved_cache_dir) == (0.3, 4, False, Path("/c"))


def test_help_texts_describe_every_option_with_its_default_uncut_at_80_columns():
    import os

    res = subprocess.run([sys.executable, "-m", "neuron", "worker", "--help"], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "80"}, timeout=60)
    assert "…" not in res.stdout and "[default: max(8, 4 x batch size)" in res.stdout
    for command in ("run", "worker", "scan", "status", "rescreen", "purge", "listen", "pull", "send"):
        for p in _cli().commands[command].params:
            if p.param_type_name == "option":
                assert p.help, f"{command} {p.opts} has no help"
    tta = _options(_cli().commands["worker"])["tta"].help
    assert "[default: on; env NEURON_TTA]" in tta


# -- the README's SQL runs on both databases ------------------------------------------------------------
def readme_queries() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    queries = re.findall(r'sqlite3 \S+ "([^"]+)"', readme)
    for block in re.findall(r"```sql\n(.*?)```", readme, re.S):
        queries += [q.strip() for q in block.split(";") if q.strip() and not q.strip().startswith("--")]
    return queries


def test_every_sql_example_in_the_readme_runs_on_sqlite_and_postgres(env, tmp_path, chest_small, models,
                                                                     untrained_settings):
    from worker.embedded import run_folder

    queries = readme_queries()
    assert len(queries) >= 4
    folder = tmp_path / "a"
    make_archive(folder, chest_small, studies=1)
    for url in (f"sqlite:///{tmp_path / 'n.db'}", env["NEURON_DATABASE_URL"]):
        settings = untrained_settings.with_(database_url=url)
        run_folder(folder, settings, pipeline=Pipeline(models, settings))
        eng = create_engine(url)
        with eng.connect() as conn:
            for q in queries:
                conn.execute(text(q.replace("\\'", "'"))).all()
        eng.dispose()


# -- ingest_status columns, study_findings: two workers on one host -------------------------------
def test_two_workers_on_one_host_have_distinct_names_and_status_shows_them(env, tmp_path, chest_small):
    folder = tmp_path / "archive"
    n = make_archive(folder, chest_small, studies=4)
    workers = [start_worker(env, tmp_path, "a", "--name", "night-a"), start_worker(env, tmp_path, "b")]
    try:
        wait_until(lambda: all(" ready." in (tmp_path / f"{w}.log").read_text() for w in "ab"), 180,
                   "both workers ready", workers)
        assert neuron(env, "scan", str(folder)).returncode == 0
        wait_until(lambda: count_done(env) == n, 240, "all instances done", workers)
        res = neuron(env, "status", "--json")
        assert res.returncode == 0, res.stderr
        data = json.loads(res.stdout)
        nodes = data["workers"]
        assert len(nodes) == 2 and any(k.startswith("neuron-night-a@") for k in nodes), nodes
        assert all(w["device"] == "cpu" and w["batch_size"] == 4 for w in nodes.values())
        assert data["instances"] == {"done": n} and data["unacknowledged"] == 0
        table = neuron(env, "status")
        assert "workers alive: 2" in table.stdout
    finally:
        for w in workers:
            stop(w)
    names = {r[0] for r in sql(env, "select distinct worker from findings")}
    default = [w for w in names if w != "night-a"]
    assert all(re.fullmatch(r".+/cpu/\d+", w) for w in default), names
    rows = sql(env, "select attempts, worker from ingest_status")
    assert {r[0] for r in rows} == {1} and {r[1] for r in rows} == names
    studies = sql(env, "select study_instance_uid, instances, top_finding, max_probability, needs_review "
                       "from study_findings")
    assert len(studies) == 4 and all(r[1] == 1 and r[2] and 0 < r[3] < 1 for r in studies)


# -- rescreen and purge on PostgreSQL ---------------------------------------------------------------------------
def test_rescreen_replaces_a_studys_results_and_removes_old_heatmaps_then_purge_deletes_them(
        env, tmp_path, chest_small, models, untrained_settings):
    from typer.testing import CliRunner

    from neuron_cli import app
    from worker.embedded import run_folder

    folder = tmp_path / "archive"
    make_archive(folder, chest_small, studies=2)
    settings = untrained_settings.with_(database_url=env["NEURON_DATABASE_URL"], out_dir=tmp_path / "out")
    run_folder(folder, settings, pipeline=Pipeline(models, settings))
    study = sql(env, "select min(study_instance_uid) from instances")[0][0]
    before = dict(sql(env, "select sop_instance_uid || label, preprocessing from findings where study_instance_uid "
                           "= :s", s=study))
    old_maps = [r[0] for r in sql(env, "select heatmap_path from findings where study_instance_uid = :s "
                                       "and heatmap_path is not null", s=study)]
    assert old_maps and all(Path(p).is_file() for p in old_maps)
    cli_env = {"NEURON_DATABASE_URL": env["NEURON_DATABASE_URL"], "NEURON_OUT": str(tmp_path / "out"),
               "NEURON_CACHE_DIR": str(untrained_settings.out_dir / ".cache")}
    runner = CliRunner()
    res = runner.invoke(app, ["rescreen", "--study", study, "--weights", "untrained", "--device", "cpu",
                              "--no-tta", "--batch-size", "8", "--dicom-out", str(tmp_path / "dicom")], env=cli_env)
    assert res.exit_code == 0, res.output
    # --dicom-out, a shared screening option, is honoured by rescreen too: the study's new SCs and its SR
    written = sorted((tmp_path / "dicom").rglob("*.dcm"))
    instances = sql(env, "select count(*) from instances where study_instance_uid = :s", s=study)[0][0]
    assert [p.name for p in written].count("sr.dcm") == 1 and len(written) == instances + 1, written
    assert {pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID for p in written} == {study}
    after = dict(sql(env, "select sop_instance_uid || label, preprocessing from findings where study_instance_uid "
                          "= :s", s=study))
    assert after.keys() == before.keys() and set(after.values()).isdisjoint(before.values())
    assert not any(Path(p).exists() for p in old_maps)  # the old settings' heatmaps are gone
    new_maps = [r[0] for r in sql(env, "select heatmap_path from findings where study_instance_uid = :s "
                                       "and heatmap_path is not null", s=study)]
    assert new_maps and all(Path(p).is_file() for p in new_maps)
    other = sql(env, "select count(*) from findings where study_instance_uid <> :s", s=study)[0][0]
    res = runner.invoke(app, ["purge", "--study", study, "--yes"], env=cli_env)
    assert res.exit_code == 0, res.output
    assert sql(env, "select count(*) from findings where study_instance_uid = :s", s=study)[0][0] == 0
    assert sql(env, "select count(*) from findings")[0][0] == other
    assert not any(Path(p).exists() for p in new_maps)
    res = runner.invoke(app, ["purge", "--weights-id", "untrained"], env=cli_env)
    assert res.exit_code == 2 and "--model" in res.output


# -- the README's setup names every variable the compose file reads, and the role and database ----------
def test_the_readme_lists_every_variable_the_compose_file_reads_and_how_to_create_the_role_and_database():
    readme = (ROOT / "README.md").read_text()
    variables = set(re.findall(r"\$\{([A-Z0-9_]+)", (ROOT / "docker-compose.yml").read_text()))
    assert "POSTGRES_PASSWORD" in variables
    table = {m for m in re.findall(r"^\| `([A-Z0-9_]+)` \|", readme, re.M)}
    assert variables <= table, f"compose variables missing from the README's table: {sorted(variables - table)}"
    assert re.search(r"CREATE ROLE neuron LOGIN PASSWORD", readme) and "CREATE DATABASE neuron OWNER neuron" in readme
    assert "Flower" in readme and "5555" in readme


# -- the compose stack ---------------------------------------------------------------------------------
def compose_config() -> dict:
    import yaml

    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is not installed; .ci/run installs Debian's docker-compose"
    res = subprocess.run([binary, "-f", str(ROOT / "docker-compose.yml"), "config"], capture_output=True, text=True,
                         cwd=ROOT, env={"PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    return yaml.safe_load(res.stdout)


def test_compose_migrates_once_first_never_loops_and_runs_commands_the_cli_accepts():
    services = compose_config()["services"]
    assert services["migrate"]["command"] == ["db", "upgrade"]
    for name in ("worker", "producer"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert services["worker"]["restart"] != "unless-stopped" and "on-failure" in services["worker"]["restart"]
    assert any(str(v).split(":")[1] == "/models" for v in services["worker"]["volumes"])
    assert services["worker"]["environment"]["NEURON_MODEL_DIR"] == "/models"
    cli = _cli()
    for name, svc in services.items():
        if svc.get("image") != "neuron:latest":
            continue
        args = list(svc["command"])
        command = cli
        while args and hasattr(command, "commands") and args[0] in command.commands:
            command = command.commands[args.pop(0)]
        assert not hasattr(command, "commands"), f"{name}: {svc['command']} names no neuron command"
        known = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
        for a in args:
            if a.startswith("-"):
                assert a.split("=")[0] in known, f"{name}: neuron {command.name} has no option {a}"


# -- a broker with a password, and passwords masked ----------------------------------------------------------
def test_a_redis_with_a_password_works_and_status_masks_it(env, tmp_path, chest_small):
    port = free_port()
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--requirepass", "s3cret-pw", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port)
        locked = {**env, "NEURON_BROKER_URL": f"redis://:s3cret-pw@127.0.0.1:{port}/0"}
        folder = tmp_path / "a"
        make_archive(folder, chest_small, studies=1)
        res = neuron(locked, "scan", str(folder))
        assert res.returncode == 0 and "enqueued 1 study tasks" in res.stderr, res.stderr
        assert redis.Redis(port=port, password="s3cret-pw").llen("chest-xray") == 1
        res = neuron(locked, "status")
        assert res.returncode == 0 and "s3cret-pw" not in res.stdout + res.stderr
        assert "redis://:***@127.0.0.1" in res.stdout
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# -- SIGTERM to the watcher enqueues what it indexed -----------------------------------------------------
def test_sigterm_to_the_watcher_enqueues_what_it_indexed_then_exits(env, tmp_path, chest_small):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    assert neuron(env, "db", "upgrade").returncode == 0
    log = tmp_path / "watch.log"
    watcher = subprocess.Popen([sys.executable, "-m", "neuron", "scan", str(incoming), "--watch", "--stable-seconds",
                                "0.5", "--quiet-seconds", "600"], env=env, stdout=open(log, "w"),  # noqa: SIM115
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_until(lambda: "watching" in log.read_text(), 60, "the watcher to start", [watcher])
        small_chest(chest_small, incoming / "a.dcm")
        wait_until(lambda: sql(env, "select count(*) from instances")[0][0] == 1, 60, "the file indexed", [watcher])
        time.sleep(0.5)
        watcher.send_signal(signal.SIGTERM)
        assert watcher.wait(timeout=30) == 0
    finally:
        stop(watcher)
    assert [r[0] for r in sql(env, "select status from instances")] == ["queued"]
    assert redis.Redis.from_url(env["NEURON_BROKER_URL"]).llen("chest-xray") == 1
    assert "enqueued study 1 of 1" in log.read_text()



# -- one rule for a study's status ---------------------------------------------------------------------------------
def test_neuron_status_and_every_other_caller_give_one_answer_for_a_studys_status(tmp_path):
    """The study-status rule was written twice and drifted: a study with one instance queued and one pending was
    'queued' in `neuron status` and 'pending' in the database's own summary. One rule (neuron.work.study_status)
    now answers for the database, `neuron status --json` and anything else that asks."""
    from db.admin import db_status
    from db.store import Database
    from neuron.work import FileEntry, InstanceEntry, InstanceHeader, Outcome, Status, study_status

    db = Database(f"sqlite:///{tmp_path / 'neuron.db'}")
    db.create()
    plan = {"1.2.3.1": ("pending", "queued"), "1.2.3.2": ("pending", "failed"), "1.2.3.3": ("done", "failed"),
            "1.2.3.4": ("done", "skipped")}
    entries, finish = [], []
    for study, statuses in plan.items():
        for n, status in enumerate(statuses):
            uid = f"{study}.{n}"
            header = InstanceHeader(uid, study, f"{study}.9", None, "CR", "CHEST", "MONOCHROME2", None, 8, 8, 1)
            entries.append(FileEntry(f"/a/{uid}.dcm", 1, 1, Status.PENDING, None, uid,
                                     InstanceEntry(header, "chest-xray", Status.PENDING)))
            if status == "queued":
                finish.append(("queue", uid))
            elif status != "pending":
                finish.append((status, uid))
    db.add_files(entries)
    db.mark_queued([uid for what, uid in finish if what == "queue"])
    db.record_outcomes([Outcome(uid, Status(what), "why") for what, uid in finish if what != "queue"])
    expected = {"queued": 1, "pending": 1, "failed": 1, "done": 1}
    assert {study: study_status(set(s)) for study, s in plan.items()} == dict(zip(plan, expected, strict=True))
    assert db.study_statuses() == expected
    assert db_status(db).studies == expected
    res = subprocess.run([sys.executable, "-m", "neuron", "status", "--json", "--db", str(db.url)],
                         capture_output=True, text=True, timeout=120,
                         env={"PATH": "/usr/bin:/bin", "NEURON_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0",
                              "HOME": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["studies"] == expected
    db.dispose()


# -- a failure reason that quotes a NUL survives a rescreen on PostgreSQL ------------------------------------------
def test_a_nul_in_a_failure_reason_survives_a_rescreen_on_postgres(env, tmp_path, chest_small, models,
                                                                   untrained_settings):
    """PostgreSQL refuses a NUL in text. The first write path escaped control characters in reasons, the rescreen's
    second copy of it did not, so rescreening a file whose decode error quotes a NUL (a transfer syntax UID holding
    one) failed on PostgreSQL only. One write path now serves both, and a reason never holds a control character."""
    from typer.testing import CliRunner

    from neuron_cli import app
    from worker.embedded import run_folder

    from .test_scenarios import with_transfer_syntax

    folder = tmp_path / "archive"
    bad = small_chest(chest_small, folder / "nul_ts.dcm", step=8)
    with_transfer_syntax(bad, "1.2.840.10008.1.2.1.9\x009")
    settings = untrained_settings.with_(database_url=env["NEURON_DATABASE_URL"], out_dir=tmp_path / "out")
    run_folder(folder, settings, pipeline=Pipeline(models, settings))
    (reason,) = [r[0] for r in sql(env, "select reason from ingest_status where status = 'failed'")]
    assert "\\x00" in reason and "\x00" not in reason
    cli_env = {"NEURON_DATABASE_URL": env["NEURON_DATABASE_URL"], "NEURON_OUT": str(tmp_path / "out"),
               "NEURON_CACHE_DIR": str(untrained_settings.out_dir / ".cache")}
    res = CliRunner().invoke(app, ["rescreen", "--reason", "transfer syntax", "--weights", "untrained", "--device",
                                   "cpu", "--no-tta", "--batch-size", "8"], env=cli_env)
    assert res.exit_code == 3, res.output  # screened again, failed again: no database error
    assert "rescreened 1 of 1" in " ".join(res.output.split())
    assert [r[0] for r in sql(env, "select reason from ingest_status where status = 'failed'")] == [reason]
