"""Faults a hospital deployment meets each against the real thing: redis-server, PostgreSQL, `neuron worker`
and `neuron scan` processes, real forward passes (untrained weights), real file systems.

Each test ends with every instance accounted for (``done`` exactly once, or ``pending`` with a reason where the fault
is the output's and not the file's), no duplicate rows, and prints its counts (``-s`` shows them; RELIABILITY.md
"Fault and load results" records them). Where a tmpfs cannot be mounted (not root, no CAP_SYS_ADMIN) the same fault is
injected through a seam (the pipeline's ``png_writer``), but for the full database: its writes are the embedded run's
ledger's, a process that a seam in this one would not reach, so that test needs the tmpfs (it skips without one).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest

from neuron.errors import BrokerUnavailable, OutputUnwritable
from neuron.servers import RedisServer, free_port
from worker.embedded import run_folder

from .conftest import seed_untrained_cache
from .test_distributed import (
    N_LABELS,
    count_done,
    make_archive,
    neuron,
    no_duplicate_rows,
    screen_through_an_outage,
    sql,
    start_worker,
    stop,
    wait_until,
)

pytestmark = pytest.mark.timeout(420)


def statuses(env) -> dict[str, int]:
    return dict(sql(env, "select status, count(*) from instances group by status"))


def report(scenario: str, before, after) -> None:
    print(f"\n[fault] {scenario}: before {before} -> after {after}")


# -- 1. two workers killed in turn ---------------------------------------------------------------------------------

def test_two_workers_killed_one_after_the_other_mid_batch_lose_nothing(env, tmp_path, chest_small):
    folder = tmp_path / "archive"
    n = make_archive(folder, chest_small, studies=12)
    killed_at = []
    for name in ("victim1", "victim2"):
        w = start_worker(env, tmp_path, name, "--batch-size", "2", "--concurrency", "3")
        try:
            if not killed_at:  # the first worker loads its models while the scan runs
                assert neuron(env, "scan", str(folder)).returncode == 0
            target = count_done(env) + 1
            wait_until(lambda t=target: count_done(env) >= t, 180, f"results from {name}", [w])
        finally:
            stop(w, signal.SIGKILL)
        killed_at.append(count_done(env))
    assert killed_at[-1] < n, "the workers finished before they could be killed; make the archive larger"
    before = statuses(env)
    rescuer = start_worker(env, tmp_path, "rescuer")
    try:
        wait_until(lambda: count_done(env) == n, 240, "every study after two kills", [rescuer])
    finally:
        stop(rescuer)
    after = statuses(env)
    report("two workers SIGKILLed", {"done at kills": killed_at, **before}, after)
    assert after == {"done": n}
    assert sql(env, "select count(*) from predictions")[0][0] == n * N_LABELS and no_duplicate_rows(env)
    assert sql(env, "select max(attempts) from instances")[0][0] <= 3


# -- 2. PostgreSQL down for 30 s -----------------------------------------------------------------------------------

def test_postgres_down_for_30_seconds_is_ridden_out(env, servers, tmp_path, chest_small):
    """Tasks fail to claim or commit, retry with backoff (1 s doubling) and finish once PostgreSQL is back. A long
    visibility timeout keeps the broker from redelivering the tasks waiting out their backoff."""
    env = {**env, "NEURON_VISIBILITY_TIMEOUT": "600"}
    folder = tmp_path / "archive"
    n = make_archive(folder, chest_small, studies=8)
    done_before, log = screen_through_an_outage(env, tmp_path, folder, n, servers[1], "database", seconds=30)
    after = statuses(env)
    report("PostgreSQL down 30 s", {"done": done_before}, after)
    assert done_before < n and after == {"done": n}
    assert "retrying" in log


# -- 3. Redis down when the producer starts ------------------------------------------------------------------------

def test_the_producer_waits_for_a_broker_that_is_down_and_enqueues_once_it_is_up(env, tmp_path, chest_small):
    folder = tmp_path / "archive"
    n = make_archive(folder, chest_small, studies=3)
    workdir = tmp_path / "redis"
    workdir.mkdir()
    broker = RedisServer(workdir, free_port(), durable=False)
    url = f"redis://:s3cret-pw@127.0.0.1:{broker.port}/0"
    env = {**env, "NEURON_BROKER_URL": url}
    scan = subprocess.Popen([sys.executable, "-m", "neuron", "scan", str(folder)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(scan.stdout), daemon=True)
    reader.start()
    try:
        wait_until(lambda: any("not reachable" in ln for ln in lines), 90, "the producer to say it waits")
        before = statuses(env)
        assert before == {"pending": n}  # indexed and committed; nothing marked queued while the broker is down
        broker.proc = subprocess.Popen(["redis-server", "--port", str(broker.port), "--bind", "127.0.0.1",
                                        "--save", "", "--appendonly", "no", "--dir", str(workdir),
                                        "--requirepass", "s3cret-pw"], stdout=subprocess.DEVNULL)
        assert scan.wait(timeout=90) == 0
        reader.join(timeout=10)
    finally:
        if scan.poll() is None:
            scan.kill()
        broker.stop()
    out = "".join(lines)
    waited = next(ln for ln in lines if "not reachable" in ln)
    assert f"127.0.0.1:{broker.port}" in waited and "retrying in" in waited, waited
    assert "s3cret-pw" not in out, "the broker password must never be printed"
    assert "enqueued 3 study tasks" in out, out
    after = statuses(env)
    report("Redis down when neuron scan starts", before, after)
    assert after == {"queued": n}


def test_a_broker_that_never_comes_up_stops_the_producer_and_leaves_the_instances_pending(env, tmp_path,
                                                                                          chest_small):
    from db.store import Database
    from neuron.queue import make_app
    from neuron.settings import Settings
    from producer.enqueue import enqueue_pending
    from producer.scan import index_folder

    folder = tmp_path / "archive"
    n = make_archive(folder, chest_small, studies=2)
    down = f"redis://:s3cret-pw@127.0.0.1:{free_port()}/0"
    settings = Settings.from_env({**env, "NEURON_BROKER_URL": down})
    db = Database(settings.resolved_database_url)
    db.create()
    try:
        index_folder(folder, db)
        t0 = time.monotonic()
        with pytest.raises(BrokerUnavailable) as err:
            enqueue_pending(db, make_app(settings), broker_wait_s=3)
        waited = time.monotonic() - t0
        message = str(err.value)
        assert "was not reachable within 3 s" in message and "run `neuron scan` again" in message, message
        assert "s3cret-pw" not in message and f"127.0.0.1:{down.rsplit(':', 1)[1][:-2]}" in message, message
        before = statuses(env)
        assert before == {"pending": n} and 2.5 <= waited < 20
        # a later scan, with the broker up, sends them
        sent = enqueue_pending(db, make_app(Settings.from_env(env)))
        after = statuses(env)
    finally:
        db.dispose()
    report("Redis never up (3 s bound)", before, after)
    assert sent == 2 and after == {"queued": n}


# -- tmpfs helpers (as root); the seams stand in where mounting is refused ------------------------------------------

@contextmanager
def tmpfs(path: Path, size: str, ro: bool = False) -> Iterator[bool]:
    """Mount a tmpfs of ``size`` at ``path``; yields whether it worked (not root, or no CAP_SYS_ADMIN: False)."""
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size},mode=0755" + (",ro" if ro else "")
    mounted = os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                                                   capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=True)


def leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp" in p.name]


def embedded_rows(db_path: Path) -> tuple[dict[str, int], int, int]:
    with closing(sqlite3.connect(db_path)) as conn:
        counts = dict(conn.execute("select status, count(*) from instances group by status").fetchall())
        rows = conn.execute("select count(*) from predictions").fetchone()[0]
        dupes = conn.execute("select count(*) from (select 1 from predictions group by sop_instance_uid, frame, "
                             "model, weights, label having count(*) > 1)").fetchone()[0]
    return counts, rows, dupes


def _pipeline(settings, models, png_writer=None):
    from worker.pipeline import Pipeline
    from worker.results import write_png

    return Pipeline(models, settings, png_writer=png_writer or write_png)


def _full_disk_writer(budget: int):
    """The real PNG writer in front of a disk with ``budget`` bytes free: once it is used up, every write raises
    ENOSPC, as the kernel would."""
    from worker.pipeline import write_png

    left = [budget]
    lock = threading.Lock()

    def writer(path, image):
        with lock:
            fits = left[0] > 0
            left[0] -= image.nbytes // 8
        if not fits:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
        write_png(path, image)

    return writer


# -- 4. heatmap folder unwritable, then full -----------------------------------------------------------------------

def test_an_unwritable_then_full_heatmap_folder_leaves_instances_pending_and_a_rerun_screens_them(
        tmp_path, chest_small, untrained_settings, models):
    """The output's fault, not the file's: affected instances stay `pending` with the reason (no findings rows, no
    temporary PNG left), the run goes on; the next run after the folder is fixed screens them."""
    folder = tmp_path / "archive"
    heat = tmp_path / "heat"
    settings = untrained_settings.with_(out_dir=tmp_path / "out", heatmap_root=heat)
    db_path = settings.out_dir / "neuron.db"
    n = make_archive(folder, chest_small, studies=4)

    # unwritable: a read-only tmpfs (EROFS); without mount, a folder whose place is taken by a file (ENOTDIR)
    with tmpfs(heat, "1m", ro=True) as mounted:
        if not mounted:
            heat.rmdir()
            heat.write_text("not a folder")
        run_folder(folder, settings, pipeline=_pipeline(settings, models))
        first, rows, _ = embedded_rows(db_path)
        with closing(sqlite3.connect(db_path)) as conn:
            reasons = {r for (r,) in conn.execute("select reason from instances")}
        if not mounted:
            heat.unlink()
    assert first == {"pending": n} and rows == 0, (first, rows)
    for reason in reasons:
        assert "heatmap could not be written" in reason and str(heat) in reason and "run again" in reason, reason
    report("heatmap folder unwritable" + (" (ro tmpfs)" if mounted else " (ENOTDIR)"), {"pending": n}, first)

    # full: a tmpfs with room for about two PNGs; without mount, the real writer behind a disk that fills up
    more = make_archive(folder / "more", chest_small, studies=4)
    png_size = 70_000
    with tmpfs(heat, f"{2 * png_size // 1024 + 16}k") as mounted:
        seam = None if mounted else _full_disk_writer(2 * png_size)
        if not mounted:
            heat.mkdir(exist_ok=True)
        run_folder(folder, settings, pipeline=_pipeline(settings, models, seam))
        second, rows, dupes = embedded_rows(db_path)
        assert leftovers(heat) == [], leftovers(heat)
        with closing(sqlite3.connect(db_path)) as conn:
            done = conn.execute("select count(*) from instances where status = 'done'").fetchone()[0]
            pending_rows = conn.execute("select count(*) from predictions p join instances i using "
                                        "(sop_instance_uid) where i.status != 'done'").fetchone()[0]
            full_reason = conn.execute("select reason from instances where status = 'pending' limit 1").fetchone()
            stored = [Path(p) for (p,) in conn.execute("select heatmap_path from findings "
                                                       "where heatmap_path is not null")]
        assert all(p.is_file() and p.stat().st_size > 0 for p in stored)  # every stored PNG complete
        if mounted:
            kept = {p.name for p in heat.rglob("*.png")}  # copied out before the tmpfs goes away
            saved = tmp_path / "saved"
            shutil.copytree(heat, saved)
    assert done == rows // N_LABELS and pending_rows == 0 and dupes == 0
    assert second.get("pending", 0) >= 1 and full_reason is not None, second
    assert "No space left on device" in full_reason[0], full_reason
    report("heatmap folder full" + (" (tmpfs)" if mounted else " (ENOSPC seam)"), first, second)

    # fixed: the next run screens exactly what is left
    if mounted:
        shutil.copytree(saved, heat, dirs_exist_ok=True)
        assert {p.name for p in heat.rglob("*.png")} == kept
    run_folder(folder, settings, pipeline=_pipeline(settings, models))
    third, rows, dupes = embedded_rows(db_path)
    report("heatmap folder fixed, re-run", second, third)
    assert third == {"done": n + more} and rows == (n + more) * N_LABELS and dupes == 0
    assert leftovers(heat) == []


# -- 5. the database read-only, then full, in embedded mode --------------------------------------------------------

def _neuron_run(folder: Path, out: Path, db_url: str, heat: Path) -> subprocess.CompletedProcess:
    environ = {**os.environ, "NEURON_HEATMAP_DIR": str(heat), "COLUMNS": "250"}
    return subprocess.run([sys.executable, "-m", "neuron", "run", str(folder), "--out", str(out), "--db", db_url,
                           "--weights", "untrained", "--device", "cpu", "--batch-size", "4"], env=environ,
                          capture_output=True, text=True, timeout=300)


def test_a_read_only_database_stops_neuron_run_with_the_fix_and_a_rerun_finishes(tmp_path, chest_small,
                                                                                untrained_settings, models):
    folder = tmp_path / "archive"
    n = make_archive(folder, chest_small, studies=2)
    dbdir, out, heat = tmp_path / "db", tmp_path / "out", tmp_path / "heat"
    seed_untrained_cache(untrained_settings, out)
    with tmpfs(dbdir, "8m") as mounted:
        db_file = dbdir / "neuron.db"
        url = f"sqlite:///{db_file}"
        res = _neuron_run(folder, out, url, heat)
        assert res.returncode == 0, res.stdout + res.stderr
        before, _, _ = embedded_rows(db_file)
        more = make_archive(folder / "more", chest_small, studies=2)
        if mounted:  # the folder read-only, as a full remount of the volume makes it
            subprocess.run(["mount", "-o", "remount,ro", str(dbdir)], check=True)
            ro_url = url
        else:  # SQLite opens the file read-only, as it does a file without write permission
            ro_url = f"sqlite:///file:{db_file}?mode=ro&uri=true"
        res = _neuron_run(folder, out, ro_url, heat)
        text = res.stdout + res.stderr
        assert res.returncode == 4, text
        assert "Traceback" not in text, text
        flat = " ".join(text.split())
        assert f"the results database {db_file}" in flat and "writable" in flat, flat
        assert "run the same command again" in flat, flat
        if mounted:
            subprocess.run(["mount", "-o", "remount,rw", str(dbdir)], check=True)
        kept, _, _ = embedded_rows(db_file)
        assert kept == before == {"done": n}  # what was committed stays
        res = _neuron_run(folder, out, url, heat)
        assert res.returncode == 0, res.stdout + res.stderr
        after, rows, dupes = embedded_rows(db_file)
    report("SQLite read-only" + (" (ro remount)" if mounted else " (mode=ro)"), kept, after)
    assert after == {"done": n + more} and rows == (n + more) * N_LABELS and dupes == 0


def test_a_full_database_stops_the_run_with_the_fix_keeps_what_was_committed_and_a_rerun_finishes(
        tmp_path, chest_small, untrained_settings, models):
    """The database's volume (a tmpfs) fills up part way through: the run stops with OutputUnwritable naming the
    file and the fix; results committed before stay; the same run, with room, screens the rest once. The writes are
    the ledger's, a process of its own (worker/ledger.py): it stops, and the run's own process meets the full volume
    and says so. No seam stands in here: a limit set on this process's connections would not reach the ledger."""
    folder, dbdir = tmp_path / "archive", tmp_path / "db"
    with tmpfs(dbdir, "8m") as mounted:
        if not mounted:
            pytest.skip("a full volume needs a tmpfs: run as root (CI does)")
        db_path = dbdir / "neuron.db"
        settings = untrained_settings.with_(out_dir=tmp_path / "out", batch_size=2,
                                            database_url=f"sqlite:///{db_path}")
        n = make_archive(folder, chest_small, studies=3)
        run_folder(folder, settings, pipeline=_pipeline(settings, models))
        before, _, _ = embedded_rows(db_path)
        # room for SQLite's shared-memory index (32 KiB), the index of the new files and a few commits of results
        room = shutil.disk_usage(dbdir).used + 640 * 1024
        subprocess.run(["mount", "-o", f"remount,size={room}", str(dbdir)], check=True)
        more = make_archive(folder / "more", chest_small, studies=24)
        with pytest.raises(OutputUnwritable) as err:
            run_folder(folder, settings, pipeline=_pipeline(settings, models))
        message = str(err.value)
        assert f"the results database {db_path}" in message and "full" in message, message
        assert "free space" in message and "run the same command again" in message, message
        full, rows_full, dupes = embedded_rows(db_path)
        assert full.get("done", 0) >= n and dupes == 0 and rows_full == full["done"] * N_LABELS, full
        assert full.get("done", 0) < n + more, "the limit must stop the run part way"
        subprocess.run(["mount", "-o", "remount,size=8m", str(dbdir)], check=True)
        run_folder(folder, settings, pipeline=_pipeline(settings, models))
        after, rows, dupes = embedded_rows(db_path)
    report("SQLite full (tmpfs)", {"first run": before, "when full": full}, after)
    assert after == {"done": n + more} and rows == (n + more) * N_LABELS and dupes == 0
