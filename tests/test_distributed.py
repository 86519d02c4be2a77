"""Distributed mode against real servers: Redis (redis-server), PostgreSQL 15, real producer and worker processes.

Nothing is mocked: the producer is `neuron scan`, workers are `neuron worker` processes (CPU, untrained weights),
results land in PostgreSQL. Servers start once per session on free loopback ports (tests/services.py).
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text

from neuron.routes import MODEL_ROUTES
from neuron.servers import free_port
from neuron.settings import Settings
from worker.embedded import run_folder

from .conftest import small_chest
from .services import redis_server

pytestmark = pytest.mark.timeout(300)
N_LABELS = 18


def neuron(env, *args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neuron", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def start_worker(env, tmp_path: Path, name: str, *extra: str) -> subprocess.Popen:
    log = open(tmp_path / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen([sys.executable, "-m", "neuron", "worker", "--device", "cpu", "--weights", "untrained",
                             "--batch-size", "4", "--concurrency", "4", "--max-wait-ms", "100", "--loglevel",
                             "INFO", *extra], env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)


def stop(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def sql(env, query: str, **params):
    engine = create_engine(env["NEURON_DATABASE_URL"])
    try:
        with engine.connect() as conn:
            return conn.execute(text(query), params).all()
    finally:
        engine.dispose()


def wait_until(predicate, timeout: float, what: str, procs=(), poll: float = 0.5) -> None:
    """Poll ``predicate`` every ``poll`` seconds (a process that exits early fails the wait at once)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        for p in procs:
            if p.poll() is not None and p.returncode not in (0, -9, -15):
                raise AssertionError(f"{what}: a process exited with {p.returncode}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def count_done(env) -> int:
    try:
        return sql(env, "select count(*) from instances where status = 'done'")[0][0]
    except Exception:
        return 0


def make_archive(root: Path, chest: Path, studies: int, per_study: int = 1) -> int:
    from pydicom.uid import generate_uid

    n = 0
    for s in range(studies):
        study = generate_uid()
        for i in range(per_study):
            small_chest(chest, root / f"study{s}" / f"img{i}.dcm", step=4 + (n % 3), StudyInstanceUID=study)
            n += 1
    return n


def test_model_routes_match_the_registry():
    from neuron_models.factory import list_models

    assert {cfg.route for cfg in list_models()} == set(MODEL_ROUTES)


def test_worker_results_in_postgres_equal_the_embedded_run(env, tmp_path, chest_small, data_dir, untrained_settings,
                                                          models):
    folder = tmp_path / "archive"
    n = make_archive(folder, chest_small, studies=3, per_study=2)
    shutil.copy(data_dir / "693_J2KR.dcm", folder / "ct.dcm")
    res = neuron(env, "db", "upgrade")
    assert res.returncode == 0, res.stderr
    outputs = {"NEURON_DICOM_OUT": str(tmp_path / "dicom"), "NEURON_FHIR_OUT": str(tmp_path / "fhir")}
    worker = start_worker({**env, **outputs}, tmp_path, "w1")  # it loads its models while the embedded run and
    try:  # the scan run here
        local = untrained_settings.with_(out_dir=tmp_path / "embedded")
        from worker.pipeline import Pipeline

        run_folder(folder, local, pipeline=Pipeline(models, local))
        res = neuron(env, "scan", str(folder))
        assert res.returncode == 0, res.stderr
        assert "enqueued 3 study tasks" in res.stderr
        wait_until(lambda: count_done(env) == n, 180, "all instances done", [worker])
    finally:
        stop(worker)
    distributed = {(r[0], r[1], r[2]): (r[3], r[4]) for r in sql(
        env, "select sop_instance_uid, frame, label, probability, rank from findings")}
    assert len(distributed) == n * N_LABELS
    heatmaps = [r[0] for r in sql(env, "select heatmap_path from findings where heatmap_path is not null")]
    assert len(heatmaps) == n and all(Path(p).is_file() for p in heatmaps)
    workers = {r[0] for r in sql(env, "select distinct worker from findings")}
    assert len(workers) == 1 and "/cpu" in next(iter(workers))
    # the worker wrote the DICOM outputs after each commit (tests/test_dicom_out.py checks them in depth)
    import pydicom

    reports = [pydicom.dcmread(p) for p in (tmp_path / "dicom").rglob("sr.dcm")]
    studies = {r[0] for r in sql(env, "select distinct study_instance_uid from findings")}
    assert {r.StudyInstanceUID for r in reports} == studies and len(reports) == 3
    assert all(r.CompletionFlag == "COMPLETE" for r in reports)
    assert len(list((tmp_path / "dicom").rglob("sc-*.dcm"))) == n
    # and a FHIR Bundle per study, as the findings in PostgreSQL say (tests/test_fhir.py checks them in depth)
    from fhir.resources.R4B.bundle import Bundle

    bundles = [json.loads(p.read_text()) for p in (tmp_path / "fhir").glob("*.json")]
    resources = [e["resource"] for b in bundles if Bundle.model_validate(b) for e in b.get("entry", [])]
    assert sorted(r["identifier"][0]["value"] for r in resources if r["resourceType"] == "ImagingStudy") == sorted(
        f"urn:oid:{s}" for s in studies) and len(bundles) == 3
    assert all(r["numberOfInstances"] == 2 for r in resources if r["resourceType"] == "ImagingStudy")
    positive = sql(env, "select count(*) from findings where positive = 1")[0][0]
    assert sum(r["resourceType"] == "Observation" for r in resources) == positive > 0

    import sqlite3

    with sqlite3.connect(local.out_dir / "neuron.db") as conn:
        embedded = {(r[0], r[1], r[2]): (r[3], r[4]) for r in conn.execute(
            "select sop_instance_uid, frame, label, probability, rank from findings")}
    assert embedded.keys() == distributed.keys()
    for key, (p, rank) in embedded.items():
        assert abs(distributed[key][0] - p) < 1e-5 and distributed[key][1] == rank, key

    # the CT file is recorded as skipped; a re-scan of the unchanged folder enqueues nothing
    (ct,) = sql(env, "select status from ingest_status where file_path like '%ct.dcm'")
    assert ct[0] == "skipped"
    res = neuron(env, "scan", str(folder))
    assert "enqueued 0 study tasks" in res.stderr and f"({n + 1} unchanged)" in res.stderr
    assert redis.Redis.from_url(env["NEURON_BROKER_URL"]).llen("chest-xray") == 0
    res = neuron(env, "status")
    assert res.returncode == 0 and "studies done" in res.stdout and "queue chest-xray" in res.stdout


def no_duplicate_rows(env) -> bool:
    dupes = sql(env, "select sop_instance_uid, frame, model, weights, label, count(*) from predictions "
                     "group by sop_instance_uid, frame, model, weights, label having count(*) > 1")
    return not dupes


def test_two_workers_do_every_study_exactly_once(env, tmp_path, chest_small):
    folder = tmp_path / "archive"
    n = make_archive(folder, chest_small, studies=8)
    workers = [start_worker(env, tmp_path, f"w{i}") for i in range(2)]  # they load their models during the scan
    try:
        assert neuron(env, "scan", str(folder)).returncode == 0
        wait_until(lambda: count_done(env) == n, 240, "all instances done", workers)
    finally:
        for w in workers:
            stop(w)
    assert sql(env, "select count(*) from predictions")[0][0] == n * N_LABELS
    assert no_duplicate_rows(env)
    assert {r[0] for r in sql(env, "select attempts from instances")} == {1}  # nobody screened anything twice


def test_a_worker_killed_mid_batch_loses_nothing(env, tmp_path, chest_small):
    folder = tmp_path / "archive"
    n = make_archive(folder, chest_small, studies=10)
    first = start_worker(env, tmp_path, "victim", "--batch-size", "2", "--concurrency", "3")
    try:
        assert neuron(env, "scan", str(folder)).returncode == 0  # while the worker loads its models
        wait_until(lambda: count_done(env) >= 1, 180, "the first results", [first])
    finally:
        stop(first, signal.SIGKILL)
    done_at_kill = count_done(env)
    assert done_at_kill < n, "the worker finished before it could be killed; make the archive larger"
    second = start_worker(env, tmp_path, "rescuer")
    try:
        wait_until(lambda: count_done(env) == n, 240, "every study after the restart", [second])
    finally:
        stop(second)
    assert sql(env, "select count(*) from predictions")[0][0] == n * N_LABELS
    assert no_duplicate_rows(env)
    assert {r[0] for r in sql(env, "select status from instances")} == {"done"}


def test_a_worker_stopped_by_sigterm_commits_and_acknowledges_the_studies_it_holds(env, tmp_path, chest_small):
    """A warm shutdown (SIGTERM, as systemd or Kubernetes stop a service) waits for the studies in flight: their
    results are committed and their messages acknowledged before the connection closes, so the next worker screens
    none of them again."""
    folder = tmp_path / "archive"
    n = make_archive(folder, chest_small, studies=12)
    broker = redis.Redis.from_url(env["NEURON_BROKER_URL"])
    first = start_worker(env, tmp_path, "stopped", "--batch-size", "2", "--concurrency", "6")
    try:
        assert neuron(env, "scan", str(folder)).returncode == 0  # while the worker loads its models
        wait_until(lambda: count_done(env) >= 2 and broker.hlen("unacked") >= 2, 180, "results, and studies held",
                   [first])
    finally:
        stop(first)
    assert first.returncode == 0, (tmp_path / "stopped.log").read_text()[-3000:]
    assert broker.hlen("unacked") == 0, "the stopped worker left messages unacknowledged"
    claimed = sql(env, "select count(*) from instances where attempts > 0")[0][0]
    assert count_done(env) == claimed < n, "every study it claimed is committed, and some were left for the next"
    second = start_worker(env, tmp_path, "next")
    try:
        wait_until(lambda: count_done(env) == n, 240, "every study after the restart", [second])
    finally:
        stop(second)
    assert {r[0] for r in sql(env, "select attempts from instances")} == {1}  # nobody screened anything twice
    assert no_duplicate_rows(env)


def write_slowly(src: Path, dest: Path, chunks: int = 6, pause: float = 0.5) -> None:
    data = src.read_bytes()
    step = len(data) // chunks + 1
    with open(dest, "wb") as fh:
        for i in range(0, len(data), step):
            fh.write(data[i:i + step])
            fh.flush()
            time.sleep(pause)


def test_a_study_delivered_again_while_a_worker_still_screens_it_is_not_claimed_twice(env, tmp_path, chest_small):
    """A worker holds more studies than it screens at once; with a visibility timeout shorter than their wait (2 s
    here; an operator's short setting, or a long backlog in flight), Redis delivers them again. The worker that still
    holds one acknowledges the second delivery with the first instead of claiming it again: one attempt each, no work
    done twice, nothing left unacknowledged."""
    env = {**env, "NEURON_VISIBILITY_TIMEOUT": "2"}
    folder = tmp_path / "archive"
    # 20 studies at one a batch: the last waits ~8 s on this CPU, past the 2 s timeout and kombu's 1 s look for
    # expired ones (8 studies were done in 3.3 s on a fast machine, none delivered again)
    n = make_archive(folder, chest_small, studies=20)
    assert neuron(env, "scan", str(folder)).returncode == 0
    worker = start_worker(env, tmp_path, "w", "--batch-size", "1", "--concurrency", "16")
    try:
        wait_until(lambda: count_done(env) == n, 240, "every study", [worker])
        broker = redis.Redis.from_url(env["NEURON_BROKER_URL"])
        wait_until(lambda: broker.llen("chest-xray") == 0 and broker.hlen("unacked") == 0, 30,
                   "an empty queue and no unacknowledged message", [worker])
    finally:
        stop(worker)
    log = (tmp_path / "w.log").read_text()
    assert sql(env, "select max(attempts) from instances")[0][0] == 1, log[-3000:]
    assert "delivered again while in flight here" in log, log[-3000:]
    assert no_duplicate_rows(env)


def test_watch_folder_takes_complete_files_and_screens_without_a_scan(env, tmp_path, chest_small):
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    assert neuron(env, "db", "upgrade").returncode == 0
    watcher = subprocess.Popen([sys.executable, "-m", "neuron", "scan", str(incoming), "--watch",
                                "--stable-seconds", "1.5", "--quiet-seconds", "1"], env=env,
                               stdout=open(tmp_path / "watch.log", "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
                               start_new_session=True)
    worker = start_worker(env, tmp_path, "w")
    try:
        wait_until(lambda: "watching" in (tmp_path / "watch.log").read_text(), 60, "the watcher to start",
                   [watcher])
        slow = incoming / "slow.dcm"
        source = small_chest(chest_small, tmp_path / "src" / "slow.dcm", step=2)
        import threading

        writer = threading.Thread(target=write_slowly, args=(source, slow))
        writer.start()
        while writer.is_alive():  # while the file grows, nobody has read it
            rows = sql(env, "select status from ingest_status where file_path = :p", p=str(slow.resolve()))
            assert rows == [], rows
            time.sleep(0.2)
        writer.join()
        # a second study arrives the safe way: written under a temporary name, then renamed
        part = incoming / "study2.dcm.part"
        shutil.copy(small_chest(chest_small, tmp_path / "src" / "s2.dcm"), part)
        part.rename(incoming / "study2.dcm")
        wait_until(lambda: count_done(env) == 2, 180, "both watched files screened", [watcher, worker])
    finally:
        stop(watcher)
        stop(worker)
    paths = {r[0] for r in sql(env, "select file_path from ingest_status")}
    assert paths == {str(slow.resolve()), str((incoming / "study2.dcm").resolve())}  # never the .part name


def test_a_file_still_being_copied_when_the_watcher_starts_is_not_read_half_written(env, tmp_path, chest_small):
    """Files already in the folder at start go through the same stability rule as new ones; an instance that arrives
    after its study was enqueued gets a task of its own."""
    from db.store import Database
    from neuron.queue import make_app
    from producer.watch import FolderWatcher

    incoming = tmp_path / "incoming"
    incoming.mkdir()
    source = small_chest(chest_small, tmp_path / "src" / "a.dcm", step=2)
    partial = incoming / "a.dcm"
    partial.write_bytes(source.read_bytes()[:2000])  # a copy in progress
    settings = Settings.from_env(env, watch_stable_seconds=0.5, watch_quiet_seconds=0.2)
    db = Database(settings.resolved_database_url)
    db.create()
    watcher = FolderWatcher(incoming, db, make_app(settings), settings, poll=True)
    watcher.start()
    try:
        t0 = time.monotonic()
        watcher.step(now=t0 + 0.1)
        assert sql(env, "select count(*) from files")[0][0] == 0  # not stable yet: not read
        partial.write_bytes(source.read_bytes())  # the copy finishes
        watcher.step(now=t0 + 0.2)  # changed: the stability clock restarts
        assert sql(env, "select count(*) from files")[0][0] == 0
        watcher.step(now=t0 + 1.0)  # stable for 0.8 s: indexed, complete
        watcher.step(now=t0 + 1.5)  # the study is quiet: enqueued
        assert [r[0] for r in sql(env, "select status from instances")] == ["queued"]
        assert redis.Redis.from_url(env["NEURON_BROKER_URL"]).llen("chest-xray") == 1
        # a later instance of the same study, after its task went out, gets a task of its own
        import pydicom

        study = pydicom.dcmread(source, stop_before_pixels=True).StudyInstanceUID
        small_chest(chest_small, incoming / "b.dcm", step=3, StudyInstanceUID=study)
        wait_until(lambda: incoming / "b.dcm" in watcher.collector.seen, 30, "the observer to see the new file")
        watcher.step(now=t0 + 2.0)  # first seen
        watcher.step(now=t0 + 3.0)  # stable: indexed
        watcher.step(now=t0 + 4.0)  # quiet: enqueued
        assert sorted(r[0] for r in sql(env, "select status from instances")) == ["queued", "queued"]
        assert redis.Redis.from_url(env["NEURON_BROKER_URL"]).llen("chest-xray") == 2
    finally:
        watcher.stop()
        db.dispose()


def test_docker_compose_file_is_valid():
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose is not installed; .ci/run installs Debian's docker-compose"
    root = Path(__file__).resolve().parents[1]
    res = subprocess.run([binary, "-f", str(root / "docker-compose.yml"), "config", "-q"], capture_output=True,
                         text=True, cwd=root)
    assert res.returncode == 0, res.stderr
    config = subprocess.run([binary, "-f", str(root / "docker-compose.yml"), "config"], capture_output=True,
                            text=True, cwd=root).stdout
    for service in ("redis:", "postgres:", "worker:", "producer:", "flower:"):
        assert service in config
    assert "driver: nvidia" in config and "capabilities" in config


def test_workers_starting_together_on_a_new_database_migrate_it_once(env):
    """Two workers started at the same moment on an empty PostgreSQL both ran the migrations and one died on
    CREATE TABLE alembic_version (seen in CI). Upgrades now take turns under an advisory lock."""
    import threading

    from db.migrate import current
    from db.store import Database

    url = env["NEURON_DATABASE_URL"]
    start, errors = threading.Barrier(4), []

    def upgrade() -> None:
        db = Database(url)
        try:
            start.wait()
            db.create()
        except Exception as exc:  # collected: the test names what each one raised
            errors.append(exc)
        finally:
            db.dispose()

    threads = [threading.Thread(target=upgrade) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    db = Database(url)
    assert current(db.engine) is not None
    db.dispose()


def test_migrations_build_the_same_schema_on_sqlite_and_postgres(env, tmp_path):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from db.schema import Base
    from db.store import Database

    for url in (f"sqlite:///{tmp_path / 'm.db'}", env["NEURON_DATABASE_URL"]):
        db = Database(url)
        db.create()
        db.create()  # idempotent
        with db.engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
            for view in ("findings", "ingest_status"):
                conn.execute(text(f"select * from {view}")).all()
        db.dispose()


def test_settings_path_map_translates_both_ways():
    s = Settings.from_env({"NEURON_PATH_MAP": "/archive=/mnt/nas/archive;/heatmaps=/mnt/nas/heat"})
    assert s.to_local("/archive/2024/a.dcm") == "/mnt/nas/archive/2024/a.dcm"
    assert s.to_shared("/mnt/nas/heat/ab/cd.png") == "/heatmaps/ab/cd.png"
    assert s.to_local("/elsewhere/x") == "/elsewhere/x"
    assert s.to_local("/archive2/a.dcm") == "/archive2/a.dcm"  # a prefix is a whole folder name
    assert s.to_shared("/mnt/nas/heatmaps-old/x.png") == "/mnt/nas/heatmaps-old/x.png"


def screen_through_an_outage(env, tmp_path, folder: Path, n: int, server, what: str, seconds: float = 6
                             ) -> tuple[int, str]:
    """Start a worker, scan, take ``server`` down for ``seconds`` once results flow, bring it back: every study must
    finish, once. Returns how many were done when the outage began, and the worker's log."""
    worker = start_worker(env, tmp_path, "w", "--batch-size", "2", "--concurrency", "2")
    stopped = False
    try:
        assert neuron(env, "scan", str(folder)).returncode == 0  # while the worker loads its models
        wait_until(lambda: count_done(env) >= 1, 180, "the first results", [worker])
        done_before = count_done(env)
        server.stop()
        stopped = True
        time.sleep(seconds)
        assert worker.poll() is None, f"the worker must survive a {seconds:g} s {what} outage"
        server.start()
        stopped = False
        wait_until(lambda: count_done(env) == n, 240, f"every study after the {what} outage", [worker])
    finally:
        if stopped:  # a failed check must not leave the session's server down for the tests after it
            server.start()
        stop(worker)
    assert sql(env, "select count(*) from predictions")[0][0] == n * N_LABELS
    assert no_duplicate_rows(env)
    return done_before, (tmp_path / "w.log").read_text()


def test_a_database_outage_mid_run_is_ridden_out_by_retries(env, servers, tmp_path, chest_small):
    """PostgreSQL goes away while studies are in flight; tasks fail to claim or commit, retry with backoff and finish
    once it is back."""
    folder = tmp_path / "archive"
    n = make_archive(folder, chest_small, studies=6)
    _, log = screen_through_an_outage(env, tmp_path, folder, n, servers[1], "database")
    assert "retrying" in log


def test_a_broker_outage_mid_run_is_ridden_out(env, tmp_path, chest_small):
    """Redis goes away while studies are queued and in flight (a durable broker, as in docker-compose.yml: its
    append-only file keeps the queue). The worker survives, reconnects when it is back and finishes every study;
    messages whose acknowledgement was lost with the connection are redelivered, and claims make them harmless."""
    folder = tmp_path / "archive"
    n = make_archive(folder, chest_small, studies=12)
    with redis_server(durable=True) as broker:
        env = {**env, "NEURON_BROKER_URL": broker.url}
        done_before, log = screen_through_an_outage(env, tmp_path, folder, n, broker, "broker")
    assert done_before < n, "the outage must come while studies are still queued"
    assert sql(env, "select max(attempts) from instances")[0][0] <= 2
    assert "Connection to broker lost" in log and "CPendingDeprecationWarning" not in log


def test_a_lost_queue_is_sent_again_with_requeue(env, tmp_path, chest_small):
    """A broker restarted without its append-only file has lost the queue: instances stay `queued` and a plain re-scan
    sends nothing; `neuron scan --requeue` puts them back in line and a worker finishes them."""
    folder = tmp_path / "archive"
    n = make_archive(folder, chest_small, studies=3)
    assert neuron(env, "scan", str(folder)).returncode == 0
    redis.Redis.from_url(env["NEURON_BROKER_URL"]).flushall()
    assert "0 instances back in line, enqueued 0 study tasks" in neuron(env, "scan", str(folder)).stderr
    res = neuron(env, "scan", str(folder), "--requeue")
    assert f"{n} instances back in line, enqueued 3 study tasks" in res.stderr, res.stderr
    worker = start_worker(env, tmp_path, "w")
    try:
        wait_until(lambda: count_done(env) == n, 180, "every study", [worker])
    finally:
        stop(worker)
    assert no_duplicate_rows(env)


def test_a_message_the_broker_lost_is_sent_again_by_a_running_worker(env, tmp_path, chest_small):
    """kombu's Redis transport takes a message off its list (BRPOP) before it records it as unacknowledged; a worker
    SIGKILLed between the two loses it. Here one of three studies' messages is taken off the list, the state that pop
    leaves, and the instances are made older than LOST_AFTER_S: a worker started on that queue finds the study in no
    message, sends it again, and leaves the two studies whose messages wait in the list alone."""
    from producer.enqueue import LOST_AFTER_S

    folder = tmp_path / "archive"
    n = make_archive(folder, chest_small, studies=3, per_study=2)
    assert neuron(env, "scan", str(folder)).returncode == 0
    broker = redis.Redis.from_url(env["NEURON_BROKER_URL"])
    popped = json.loads(broker.rpop("chest-xray"))
    lost = json.loads(base64.b64decode(popped["body"]))[1]["sop_instance_uids"]
    engine = create_engine(env["NEURON_DATABASE_URL"])
    with engine.begin() as conn:
        conn.execute(text("update instances set updated_at = now() - make_interval(secs => :s)"),
                     {"s": 2 * LOST_AFTER_S})
    engine.dispose()
    worker = start_worker(env, tmp_path, "w")
    try:
        wait_until(lambda: count_done(env) == n, 180, "every study", [worker])
    finally:
        stop(worker)
    log = (tmp_path / "w.log").read_text()
    assert f"{len(lost)} queued instances (1 studies) were in no message of the broker" in log, log[-3000:]
    assert log.count("in no message of the broker") == 1
    assert {r[0] for r in sql(env, "select attempts from instances")} == {1}
    assert no_duplicate_rows(env)


def _copies(src: Path, root: Path, studies: int, per_study: int) -> None:
    """``studies`` x ``per_study`` copies of one file, each with its own UIDs, a folder per study."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(src)
    for s in range(studies):
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        (root / f"study{s:03d}").mkdir(parents=True)
        for i in range(per_study):
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.save_as(root / f"study{s:03d}" / f"img{i}.dcm")


def test_a_scan_sends_each_study_as_soon_as_its_files_are_committed(servers, tmp_path, chest_small):
    """`neuron scan` sends while it indexes (producer.enqueue.EnqueueAsIndexed), so workers start on the first
    committed batch, not after the whole walk: after the first 32 files the 10 studies they complete are in the
    broker, the 11th (the walk was inside it) goes with the next batch; every instance goes out once and each study in
    one task. A broker away mid-walk pauses the sending; the index goes on and the instances stay pending for the scan's
    final send, which waits for the broker."""
    from db.store import Database
    from neuron.queue import make_app
    from producer.enqueue import EnqueueAsIndexed, enqueue_pending
    from producer.scan import FIRST_COMMIT, index_folder

    from .services import reset_postgres

    broker, pg = servers
    folder = tmp_path / "archive"
    _copies(chest_small, folder, studies=30, per_study=3)
    r = redis.Redis.from_url(broker)
    for reachable in (True, False):
        reset_postgres(pg.url)
        r.flushall()
        db = Database(pg.url)
        db.create()
        url = broker if reachable else f"redis://127.0.0.1:{free_port()}/0"
        app = make_app(Settings(broker_url=url, database_url=pg.url))
        as_indexed = EnqueueAsIndexed(db, app)
        seen: list[tuple[int, int]] = []

        def on_indexed(entries, as_indexed=as_indexed, seen=seen):
            as_indexed(entries)
            seen.append((len(entries), r.llen("chest-xray")))

        index_folder(folder, db, on_indexed=on_indexed, workers=0)
        try:
            if not reachable:
                assert as_indexed.sent == 0 and [n for n, _ in seen] == [FIRST_COMMIT, 90 - FIRST_COMMIT]
                assert db.instance_statuses() == {"pending": 90}
                continue
            assert seen == [(FIRST_COMMIT, 10), (90 - FIRST_COMMIT, 29)]
            assert as_indexed.sent == 29 and enqueue_pending(db, app) == 1
            bodies = [json.loads(m) for m in r.lrange("chest-xray", 0, -1)]  # kombu's list, Celery's message body
            messages = [json.loads(base64.b64decode(b["body"]))[1]["sop_instance_uids"] for b in bodies]
            uids = [u for m in messages for u in m]
            assert len(messages) == 30 and len(uids) == len(set(uids)) == 90
            assert all(len(m) == 3 for m in messages) and db.instance_statuses() == {"queued": 90}
        finally:
            db.dispose()


def test_a_stream_of_small_studies_fills_the_batches_at_the_default_concurrency(env, tmp_path, chest_small):
    """Studies of 1-4 images and a worker at its default concurrency (studies in flight sized from the batch size):
    batches run full instead of waiting out --max-wait-ms, results are committed in groups, and the worker logs a
    fill summary rather than a line per batch."""
    import random
    import re

    from worker.service import default_concurrency

    assert default_concurrency(128) >= 2 * 128 and default_concurrency(1) == 8
    # every study is in flight from the start, the last for the whole run: on a busy 2-core machine that outlasts the
    # suite's 8 s visibility timeout, and a redelivered study would be screened twice (README: the timeout must be
    # longer than a study's time in flight). Redelivery is not what this test is about.
    env = {**env, "NEURON_VISIBILITY_TIMEOUT": "600"}
    rng = random.Random(0)
    folder = tmp_path / "archive"
    n = sum(make_archive(folder / f"part{s}", chest_small, studies=1, per_study=rng.randint(1, 4)) for s in range(14))
    assert neuron(env, "scan", str(folder)).returncode == 0
    log_path = tmp_path / "fill.log"
    worker = subprocess.Popen([sys.executable, "-m", "neuron", "worker", "--device", "cpu", "--weights", "untrained",
                               "--batch-size", "4", "--no-tta", "--max-wait-ms", "300", "--loglevel", "INFO"],
                              env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT,  # noqa: SIM115
                              start_new_session=True)
    try:
        wait_until(lambda: count_done(env) == n, 240, "all instances done", [worker])
    finally:
        stop(worker)
    log = log_path.read_text()
    assert "16 studies in flight" in log, log[-3000:]
    summary = re.search(r"batch fill over the run: (\d+) batches, (\d+) frames, mean fill (\d+)%", log)
    assert summary, log[-3000:]
    batches, frames = int(summary.group(1)), int(summary.group(2))
    assert frames == n and frames / (4 * batches) >= 0.9, summary.group(0)
    assert log.count("batch fill") <= 2  # a summary, not a line per batch
    assert sql(env, "select count(*) from predictions")[0][0] == n * N_LABELS and no_duplicate_rows(env)


def corrupt_first_copy(folder: Path, chest: Path) -> tuple[Path, Path]:
    """A truncated copy of a radiograph (same SOP Instance UID) at a path that sorts before the good copy."""
    folder.mkdir(parents=True, exist_ok=True)
    raw = chest.read_bytes()
    (folder / "a_corrupt.dcm").write_bytes(raw[: len(raw) - 5000])
    shutil.copy(chest, folder / "b_good.dcm")
    return folder / "a_corrupt.dcm", folder / "b_good.dcm"


def test_a_corrupt_first_copy_does_not_hide_a_good_duplicate_in_the_distributed_mode(
        env, tmp_path, chest_small, untrained_settings, models):
    """`neuron scan` + `neuron worker` end as `neuron run` does: findings for the radiograph from the good copy, the
    truncated file failed with the reason and the copy that was screened instead; ingest_status row for row."""
    import sqlite3

    folder = tmp_path / "archive"
    corrupt, good = corrupt_first_copy(folder, chest_small)
    other = small_chest(chest_small, folder / "c_other.dcm", step=3)
    worker = start_worker(env, tmp_path, "w")  # it loads its models while `neuron run`'s engine and the scan run
    try:
        local = untrained_settings.with_(out_dir=tmp_path / "embedded")
        from worker.pipeline import Pipeline

        run_folder(folder, local, pipeline=Pipeline(models, local))
        assert neuron(env, "scan", str(folder)).returncode == 0
        wait_until(lambda: count_done(env) == 2, 180, "the radiograph screened from its good copy", [worker])
    finally:
        stop(worker)
    rows = {Path(p).name: (s, r) for p, s, r in sql(env, "select file_path, status, reason from ingest_status")}
    status, reason = rows[corrupt.name]
    assert status == "failed" and "could not be decoded" in reason and f"{good} was screened instead" in reason
    assert rows[good.name] == ("done", None) and rows[other.name] == ("done", None)
    uid = sql(env, "select sop_instance_uid from ingest_status where file_path = :p", p=str(good))[0][0]
    assert len(sql(env, "select label from findings where sop_instance_uid = :u", u=uid)) == N_LABELS
    assert no_duplicate_rows(env)

    with sqlite3.connect(local.out_dir / "neuron.db") as conn:
        embedded = {Path(p).name: (s, r) for p, s, r in conn.execute(
            "select file_path, status, reason from ingest_status")}
    assert embedded == rows


def test_the_watch_folder_screens_a_good_copy_that_arrives_after_the_corrupt_one_failed(env, tmp_path, chest_small):
    """The truncated copy arrives first, is queued and failed by a worker; the good copy arrives later: it is not
    left a `duplicate` of a failed instance, the instance is screened from it."""
    from db.store import Database
    from neuron.queue import make_app
    from producer.watch import FolderWatcher

    incoming = tmp_path / "incoming"
    incoming.mkdir()
    raw = chest_small.read_bytes()
    (incoming / "a_corrupt.dcm").write_bytes(raw[: len(raw) - 5000])
    settings = Settings.from_env(env, watch_stable_seconds=0.5, watch_quiet_seconds=0.2)
    db = Database(settings.resolved_database_url)
    db.create()
    watcher = FolderWatcher(incoming, db, make_app(settings), settings, poll=True)
    watcher.start()
    worker = start_worker(env, tmp_path, "w")
    try:
        t0 = time.monotonic()
        watcher.step(now=t0 + 1.0)  # stable: indexed
        watcher.step(now=t0 + 1.5)  # quiet: enqueued
        wait_until(lambda: sql(env, "select status from instances") == [("failed",)], 180,
                   "the worker to fail the truncated copy", [worker])
        shutil.copy(chest_small, incoming / "b_good.dcm")
        wait_until(lambda: incoming / "b_good.dcm" in watcher.collector.seen, 30, "the observer to see the copy")
        watcher.step(now=t0 + 2.0)  # first seen
        watcher.step(now=t0 + 3.0)  # stable: indexed (a duplicate of the failed instance)
        watcher.step(now=t0 + 4.0)  # quiet: the instance is sent again, from the good copy
        wait_until(lambda: count_done(env) == 1, 180, "the instance screened from the good copy", [worker])
    finally:
        stop(worker)
        watcher.stop()
        db.dispose()
    rows = {Path(p).name: (s, r) for p, s, r in sql(env, "select file_path, status, reason from ingest_status")}
    assert rows["b_good.dcm"] == ("done", None)
    assert rows["a_corrupt.dcm"][0] == "failed"
    assert f"{(incoming / 'b_good.dcm').resolve()} was screened instead" in rows["a_corrupt.dcm"][1]
    assert sql(env, "select count(*) from findings")[0][0] == N_LABELS
