"""What `neuron status` shows while the work is live (and `--watch`): a killed worker's study
with real Redis, PostgreSQL and `neuron worker` processes; the refreshing view over a real database; a worker that
writes nothing into the folder it was started from. Nothing mocked."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from .test_distributed import make_archive, neuron, sql, start_worker, stop, wait_until

pytestmark = pytest.mark.timeout(300)


def _status(env) -> dict:
    res = neuron(env, "status", "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


# -- a dead worker's study ----------------------------------------------------------------------------------
def test_status_shows_a_killed_workers_study_as_held_by_no_live_worker(env, tmp_path, chest_small):
    """The worker claims the study, then holds it waiting for a batch of 64 that never fills (--max-wait-ms 10 min):
    caught mid-study without a slow file. After SIGKILL the message stays unacknowledged until the visibility timeout
    (an hour), and status must say that no live worker holds it."""
    env = {**env, "NEURON_VISIBILITY_TIMEOUT": "3600"}
    folder = tmp_path / "archive"
    make_archive(folder, chest_small, studies=1)
    worker = start_worker(env, tmp_path, "holder", "--batch-size", "64", "--max-wait-ms", "600000")
    try:
        assert neuron(env, "scan", str(folder)).returncode == 0  # while the worker loads its models
        wait_until(lambda: sql(env, "select attempts from instances")[0][0] == 1, 180, "the study claimed", [worker])
        live = _status(env)
        assert len(live["workers"]) == 1 and live["unacknowledged"] == 1
        assert live["held_by_no_live_worker"]["studies"] == 0  # the live worker holds it
        assert live["in_flight"] == {"studies": 1, "instances": 1}
    finally:
        stop(worker, signal.SIGKILL)
    dead = _status(env)
    assert dead["workers"] == {}  # the worker is not alive
    assert dead["unacknowledged"] == 1 and dead["queues"]["chest-xray"] == 0
    held = dead["held_by_no_live_worker"]
    assert held["studies"] == 1 and held["instances"] == 1, held
    assert 3000 < held["redelivered_in_s"] <= 3600
    assert dead["in_flight"] == {"studies": 1, "instances": 1} and dead["instances"] == {"queued": 1}
    table = neuron(env, "status").stdout
    assert "workers alive: 0" in table and "held by no live worker (a dead worker's)" in table
    assert "1 study tasks, 1 instances" in table


# -- --watch ----------------------------------------------------------------------------------------------------------
def test_status_watch_refreshes_the_numbers_of_a_database(tmp_path):
    """Two refreshes of `--watch` over a SQLite database filled through db.store; without a terminal each refresh
    is printed in full (a script can log it)."""
    from db.schema import FileRecord, Instance
    from db.store import Database

    db = Database(f"sqlite:///{tmp_path / 'neuron.db'}")
    db.create()
    with db.session() as s, s.begin():
        for i, status in enumerate(["done"] * 7 + ["failed"] * 3 + ["pending"] * 2):
            reason = "unreadable pixel data" if status == "failed" else None
            s.add(FileRecord(id=i + 1, path=f"/a/{i}", size=1, mtime_ns=1, sop_instance_uid=f"1.{i}", status=status))
            s.add(Instance(sop_instance_uid=f"1.{i}", study_instance_uid=f"2.{i}", series_instance_uid="3",
                           file_id=i + 1, status=status, reason=reason))
    db.dispose()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NEURON_")}
    res = subprocess.run([sys.executable, "-m", "neuron", "status", "--out", str(tmp_path), "--watch", "--interval",
                          "0.2", "--count", "2"], env={**clean, "NEURON_BROKER_URL": "redis://127.0.0.1:1/0",
                                                       "COLUMNS": "200"},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert out.count("neuron status") == 2, out
    for row, n in (("instances done", 7), ("instances failed", 3), ("instances pending", 2), ("studies done", 7)):
        assert re.findall(rf"{row}\s*│\s*(\d+) │", out) == [str(n)] * 2, row
    assert "unreadable pixel data" in out and "is not reachable" in out


# -- nothing in the working directory ---------------------------------------------------------------------
def _bare_worker(cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """A worker that stops at its database (a closed port): far enough to have built its engine and caches."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NEURON_")}
    return subprocess.run([sys.executable, "-m", "neuron", "worker", "--device", "cpu", "--weights", "untrained",
                           "--queues", "chest-xray"],
                          cwd=cwd, env={**clean, "NEURON_DATABASE_URL": "postgresql+psycopg2://n:n@127.0.0.1:1/n",
                                        "NEURON_BROKER_URL": "redis://127.0.0.1:1/0", "COLUMNS": "200", **env},
                          capture_output=True, text=True, timeout=180)


def test_a_worker_without_an_output_folder_writes_nothing_where_it_was_started(tmp_path):
    cwd, home = tmp_path / "cwd", tmp_path / "home"
    cwd.mkdir()
    res = _bare_worker(cwd, {"NEURON_HEATMAP_DIR": str(tmp_path / "heat"), "XDG_CACHE_HOME": str(home / "cache")})
    assert res.returncode == 4 and "is not reachable" in res.stderr, res.stderr
    assert list(cwd.iterdir()) == []  # it wrote ./results/.cache here
    assert f"caches in {home / 'cache' / 'neuron'}" in res.stderr
    assert any((home / "cache" / "neuron").iterdir())


def test_a_worker_with_nowhere_for_its_heatmaps_refuses_to_start_naming_both_variables(tmp_path):
    res = _bare_worker(tmp_path, {"XDG_CACHE_HOME": str(tmp_path / "cache")})
    assert res.returncode == 4, res.stderr
    assert "NEURON_HEATMAP_DIR" in res.stderr and "NEURON_OUT" in res.stderr
    assert list(tmp_path.iterdir()) == []
