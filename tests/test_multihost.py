"""Several hosts, and faults across the network between them (tests/hosts.py builds the hosts).

Layout: a "db" host runs redis-server (append-only) and PostgreSQL on its own address; a "producer" host runs
`neuron scan`; "worker1", "worker2" (and "worker3", a replacement) run `neuron worker`. Each host mounts the archive
and the heatmap folder under its own local path and translates with NEURON_PATH_MAP, so the database holds the
shared names /archive and /heatmaps only. A fault is a link set down on the switch (a partition: no reset, no close)
or every process of a host SIGKILLed. Each test ends with every instance done exactly once in the results, no
duplicate row, the findings of `neuron run` on the same files, and nothing left queued or unacknowledged.

Each test prints a `cost:` line (`pytest -s`): seconds from the fault until every study was done, and the instances
screened twice (claimed more than once); RELIABILITY.md records them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from .conftest import seed_untrained_cache
from .hosts import Host, Network, unavailable
from .test_distributed import N_LABELS, make_archive

REASON = unavailable()
pytestmark = [pytest.mark.skipif(REASON is not None, reason=f"multi-host tests: {REASON}"),
              pytest.mark.timeout(300)]

VISIBILITY = 8
REDIS_PASSWORD = "multihost-test"
STUDIES = 6
SHARED_ARCHIVE, SHARED_HEATMAPS = "/archive", "/heatmaps"
PG_BIN = next((d for d in (Path("/usr/lib/postgresql") / v / "bin" for v in ("17", "16", "15", "14", "13"))
               if (d / "pg_ctl").exists()), None)


@dataclass
class Cluster:
    net: Network
    root: Path
    archive: Path  # the shared folders, as the NAS holds them
    heatmaps: Path
    db: Host
    producer: Host
    workers: dict[str, Host]
    reference: dict  # (sop, frame, label) -> (probability, rank) from `neuron run` on the archive
    n: int
    broker_url: str
    database_url: str

    def env(self, host: Host) -> dict[str, str]:
        """The environment of a Neuron process on ``host``: its own output folder (the session's calibrated untrained
        model linked in), its local paths of the shared folders."""
        local = {shared: local for local, shared in host.mounts.items()}
        out = self.root / host.name / "out"
        env = {**os.environ, "NEURON_BROKER_URL": self.broker_url, "NEURON_DATABASE_URL": self.database_url,
               "NEURON_OUT": str(out), "NEURON_VISIBILITY_TIMEOUT": str(VISIBILITY), "COLUMNS": "200",
               "PYTHONUNBUFFERED": "1",
               "NEURON_PATH_MAP": ";".join(f"{name}={local[folder]}" for name, folder in
                                           ((SHARED_ARCHIVE, self.archive), (SHARED_HEATMAPS, self.heatmaps))
                                           if folder in local)}
        if self.heatmaps in local:
            env["NEURON_HEATMAP_DIR"] = str(local[self.heatmaps])
        return env

    def local_archive(self, host: Host) -> Path:
        return next(local for local, shared in host.mounts.items() if shared == self.archive)

    def sql(self, query: str, **params) -> list:
        """A query from the db host itself (its own address stays reachable while its link is down)."""
        def run():
            from sqlalchemy import create_engine, text
            from sqlalchemy.pool import NullPool

            engine = create_engine(self.database_url, poolclass=NullPool)
            try:
                with engine.connect() as conn:
                    return [tuple(r) for r in conn.execute(text(query), params).all()]
            finally:
                engine.dispose()

        return self.db.call(run)

    def redis(self, *command):
        def run():
            import redis

            client = redis.Redis.from_url(self.broker_url, socket_timeout=5)
            try:
                return client.execute_command(*command)
            finally:
                client.close()

        return self.db.call(run)

    def count_done(self) -> int:
        return self.sql("select count(*) from instances where status = 'done'")[0][0]

    def scan(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        res = self.producer.run([sys.executable, "-m", "neuron", "scan", str(self.local_archive(self.producer)),
                                 *args], self.env(self.producer), timeout=timeout)
        assert res.returncode == 0, res.stderr[-3000:]
        return res

    def start_worker(self, host: Host) -> subprocess.Popen:
        return host.spawn([sys.executable, "-m", "neuron", "worker", "--device", "cpu", "--weights", "untrained",
                           "--batch-size", "2", "--concurrency", "2", "--max-wait-ms", "100", "--loglevel", "INFO"],
                          self.env(host), self.log(host))

    def log(self, host: Host) -> Path:
        return self.root / host.name / "log"


def wait_until(predicate, timeout: float, what: str, procs=(), poll: float = 0.25) -> float:
    """Poll ``predicate``; return the seconds it took. A process that exits early fails the wait at once."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if predicate():
            return time.monotonic() - start
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"{what}: a process exited with {p.returncode}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def start_postgres(db: Host, workdir: Path) -> str:
    import pwd

    pw = pwd.getpwnam("postgres")
    os.chown(workdir, pw.pw_uid, pw.pw_gid)
    as_postgres = ["runuser", "-u", "postgres", "--"]
    subprocess.run([*as_postgres, str(PG_BIN / "initdb"), "-D", str(workdir / "data"), "-U", "neuron",
                    "--auth=trust", "-E", "UTF8"], check=True, capture_output=True)
    with open(workdir / "data" / "pg_hba.conf", "a") as hba:  # the hosts' subnet, nothing wider
        hba.write(f"host all all {db.addr.rsplit('.', 1)[0]}.0/24 trust\n")
    res = db.run([*as_postgres, str(PG_BIN / "pg_ctl"), "-D", str(workdir / "data"), "-l", str(workdir / "log"),
                  "-w", "-o", f"-p 5432 -k {workdir} -c listen_addresses={db.addr} -c fsync=off", "start"],
                 dict(os.environ))
    assert res.returncode == 0, res.stdout + res.stderr
    res = db.run([*as_postgres, str(PG_BIN / "createdb"), "-h", db.addr, "-U", "neuron", "neuron"], dict(os.environ))
    assert res.returncode == 0, res.stderr
    return f"postgresql+psycopg2://neuron@{db.addr}:5432/neuron"


def stop_postgres(db: Host, workdir: Path) -> None:
    db.run(["runuser", "-u", "postgres", "--", str(PG_BIN / "pg_ctl"), "-D", str(workdir / "data"), "-m",
            "immediate", "-w", "stop"], dict(os.environ), timeout=30)


@pytest.fixture(scope="module")
def cluster(untrained_settings, models, chest_small):
    if PG_BIN is None or shutil.which("redis-server") is None:
        pytest.fail("redis-server and PostgreSQL are needed; run `bash .ci/run` once as root")
    # under the system temp folder, not pytest's (mode 0700): the postgres user must enter it
    root = Path(tempfile.mkdtemp(prefix="neuron-hosts-"))
    root.chmod(0o755)
    archive, heatmaps = root / "nas" / "archive", root / "nas" / "heatmaps"
    heatmaps.mkdir(parents=True)
    n = make_archive(archive, chest_small, studies=STUDIES)
    pg_dir = root / "db" / "pg"
    try:
        net = Network(root)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    db = None
    try:
        db = net.add("db")
        producer = net.add("producer", {root / "producer" / "srv" / "dicom": archive})
        workers = {name: net.add(name, {root / name / "mnt" / f"nas-{name}" / "studies": archive,
                                        root / name / "mnt" / f"nas-{name}" / "maps": heatmaps})
                   for name in ("worker1", "worker2", "worker3")}
        for host in (producer, *workers.values()):
            out = root / host.name / "out"
            out.mkdir(parents=True)
            seed_untrained_cache(untrained_settings, out)
        pg_dir.mkdir(parents=True)
        database_url = start_postgres(db, pg_dir)
        (root / "db" / "redis").mkdir()
        # a password, as a broker other hosts reach must have (protected mode refuses them without one)
        db.spawn(["redis-server", "--port", "6379", "--bind", db.addr, "--requirepass", REDIS_PASSWORD,
                  "--save", "", "--appendonly", "yes",
                  "--appendfsync", "always", "--dir", str(root / "db" / "redis")], dict(os.environ),
                 root / "db" / "redis.log")
        db.wait_for_port(db.addr, 6379)
        reference = neuron_run(archive, untrained_settings.with_(out_dir=root / "embedded"), models)
        yield Cluster(net, root, archive, heatmaps, db, producer, workers, reference, n,
                      f"redis://:{REDIS_PASSWORD}@{db.addr}:6379/0", database_url)
    finally:
        try:
            if db is not None and (pg_dir / "data" / "postmaster.pid").exists():
                stop_postgres(db, pg_dir)
        finally:
            net.close()
            shutil.rmtree(root, ignore_errors=True)


def neuron_run(folder: Path, settings, models) -> dict:
    """What `neuron run` finds on the same files (the embedded engine, in this process, on SQLite)."""
    import sqlite3

    from worker.embedded import run_folder
    from worker.pipeline import Pipeline

    run_folder(folder, settings, pipeline=Pipeline(models, settings))
    with sqlite3.connect(settings.out_dir / "neuron.db") as conn:
        return {(r[0], r[1], r[2]): (r[3], r[4]) for r in conn.execute(
            "select sop_instance_uid, frame, label, probability, rank from findings")}


@pytest.fixture
def fresh(cluster):
    """An empty database and broker and no heatmaps; afterwards every link is up again and every process on the
    producer and worker hosts is gone, whatever the test's outcome."""
    from .services import reset_postgres

    cluster.db.call(reset_postgres, cluster.database_url)
    cluster.redis("FLUSHALL")
    shutil.rmtree(cluster.heatmaps)
    cluster.heatmaps.mkdir()
    for host in (cluster.producer, *cluster.workers.values()):
        cluster.log(host).unlink(missing_ok=True)
    try:
        yield cluster
    finally:
        for host in cluster.net.hosts.values():
            host.heal()
        for port in (5432, 6379):
            cluster.db.unblock(port)
        for host in (cluster.producer, *cluster.workers.values()):
            host.kill_all()


def settled(c: Cluster) -> bool:
    """Nothing waits in the queue or is delivered and unacknowledged."""
    return c.redis("LLEN", "chest-xray") == 0 and c.redis("HLEN", "unacked") == 0


def assert_exactly_once(c: Cluster) -> None:
    """Every instance done, once; the findings of `neuron run`; shared names only; nothing left in the broker."""
    assert {r[0] for r in c.sql("select status from instances")} == {"done"}
    assert c.count_done() == c.n
    assert c.sql("select count(*) from predictions")[0][0] == c.n * N_LABELS
    dupes = c.sql("select sop_instance_uid, frame, model, weights, label from predictions "
                  "group by sop_instance_uid, frame, model, weights, label having count(*) > 1")
    assert dupes == []
    found = {(r[0], r[1], r[2]): (r[3], r[4]) for r in c.sql(
        "select sop_instance_uid, frame, label, probability, rank from findings")}
    assert found.keys() == c.reference.keys()
    for key, (p, rank) in c.reference.items():
        assert abs(found[key][0] - p) < 1e-5 and found[key][1] == rank, key
    assert all(r[0].startswith(SHARED_ARCHIVE + "/") for r in c.sql("select file_path from ingest_status"))
    heatmaps = [r[0] for r in c.sql("select heatmap_path from findings where heatmap_path is not null")]
    assert len(heatmaps) == c.n
    for path in heatmaps:
        assert path.startswith(SHARED_HEATMAPS + "/"), path
        assert (c.heatmaps / path[len(SHARED_HEATMAPS) + 1:]).is_file(), path
    wait_until(lambda: settled(c), 60, "an empty queue and no unacknowledged message")


def held_at_last_beat(c: Cluster, host: Host) -> set[str]:
    """Task ids of the studies a host's worker held at its last heartbeat (neuron.queue.Heartbeat's record)."""
    import json

    records = [json.loads(v) for v in (c.redis("HGETALL", "neuron:workers") or {}).values()]
    return {t for r in records if r.get("host") == host.name for t in r.get("held") or ()}


def status_of(c: Cluster, from_host: Host) -> dict:
    res = from_host.run([sys.executable, "-m", "neuron", "status", "--json"], c.env(from_host), timeout=60)
    assert res.returncode == 0, res.stderr[-3000:]
    import json

    return json.loads(res.stdout)


def ready(c: Cluster, host: Host) -> bool:
    log = c.log(host)
    return log.exists() and " ready." in log.read_text(errors="replace")


def snapshot(c: Cluster) -> list:
    return c.sql("select sop_instance_uid, frame, label, probability, rank, heatmap_path, needs_review "
                 "from findings order by 1, 2, 3")


def screened_twice(c: Cluster) -> int:
    return c.sql("select count(*) from instances where attempts > 1")[0][0]


def worker_done(c: Cluster, host: Host) -> int:
    return c.sql("select count(distinct sop_instance_uid) from findings where worker like :w",
                 w=f"{host.name}/%")[0][0]


def test_a_worker_cut_off_past_the_visibility_timeout_is_redone_by_the_other_and_its_late_commit_changes_nothing(
        fresh):
    """Also the layout itself: the workers read the scan's shared names through their own mounts (a local path seen
    from outside its host's processes is an empty folder) and name their hosts in the results."""
    c = fresh
    w1, w2 = c.workers["worker1"], c.workers["worker2"]
    assert not any(c.local_archive(w1).iterdir())
    procs = [c.start_worker(w1)]
    wait_until(lambda: ready(c, w1), 180, "worker1 ready", procs)
    procs.append(c.start_worker(w2))  # starts while worker1 takes the first studies (a batch of 2 at a time)
    c.scan()
    wait_until(lambda: held_at_last_beat(c, w1) and worker_done(c, w1) >= 1, 180,
               "worker1's first results while it holds more", procs, poll=0.1)
    w1.cut()
    cut_at = time.monotonic()
    held = held_at_last_beat(c, w1)
    redone = wait_until(lambda: c.count_done() == c.n, 120,
                        "worker2 to finish every study while worker1 is cut off", procs[1:])
    # `neuron status` on another host names the cut-off worker by its host, its heartbeat stopped, what it held
    seen: dict = {}

    def stopped() -> bool:
        seen.update(status_of(c, c.producer))
        mine = seen["hosts"].get("worker1", [])
        return bool(mine) and all(w["state"] == "heartbeat stopped" and not w["answered"] for w in mine)

    noticed = wait_until(stopped, 60, "status to see worker1's heartbeat stopped", procs[1:], poll=1)
    assert [w["state"] for w in seen["hosts"]["worker2"]] == ["beating"] and seen["hosts"]["worker2"][0]["answered"]
    assert set(seen["hosts"]["worker1"][0]["held_tasks"]) <= held
    # the partition outlasts the visibility timeout whatever the redo took
    time.sleep(max(0.0, VISIBILITY + 4 - (time.monotonic() - cut_at)))
    before = snapshot(c)
    cut_for = time.monotonic() - cut_at
    w1.heal()
    late = wait_until(lambda: not (held_at_last_beat(c, w1) & held), 150, "worker1's studies to end after the heal",
                      procs)
    assert snapshot(c) == before, "the cut-off worker's late commit changed the findings"
    assert_exactly_once(c)
    names = {r[0].split("/")[0] for r in c.sql("select distinct worker from findings")}
    assert names == {"worker1", "worker2"}, names
    twice = screened_twice(c)
    print(f"\ncost: worker cut off {cut_for:.0f} s holding {len(held)} tasks: every study done {redone:.1f} s after "
          f"the cut; {twice} of {c.n} instances screened twice; worker1's tasks ended {late:.1f} s after the heal; "
          f"status named its heartbeat stopped {noticed + redone:.0f} s after the cut")


def test_a_worker_host_killed_whole_is_replaced_and_loses_nothing(fresh):
    c = fresh
    w1, w3 = c.workers["worker1"], c.workers["worker3"]
    first = c.start_worker(w1)
    c.scan()  # while worker1 loads its models
    wait_until(lambda: c.count_done() >= 1, 180, "worker1's first results", [first])
    w1.kill_all()
    assert c.count_done() < c.n, "worker1 finished before it could be killed; make the archive larger"
    replacement = c.start_worker(w3)
    redone = wait_until(lambda: c.count_done() == c.n, 180, "the new worker host to finish every study",
                        [replacement])
    assert_exactly_once(c)
    print(f"\ncost: worker host killed: every study done {redone:.1f} s after the kill (a new host started at "
          f"once); {screened_twice(c)} of {c.n} instances screened twice")


# 30 s each: past the visibility timeout (8 s), so unacknowledged studies are redelivered meanwhile. A longer cut
# lengthens the wait after the heal by TCP's retransmission backoff (after 30 s of the whole db host: about 25 s),
# until TCP gives up after minutes.
OUTAGES = {"host": (None, 30), "database": (5432, 30), "broker": (6379, 30)}


@pytest.mark.parametrize("outage", list(OUTAGES))
def test_the_database_host_or_one_of_its_servers_unreachable_while_both_workers_commit_is_ridden_out(fresh, outage):
    """host: the db host's link is down, PostgreSQL and Redis both gone; database or broker: only that server's port
    is dropped on the db host's link, as if it ran on a host of its own. Claims, commits, acknowledgements and
    fetches hang on their connections (no reset, no close) until it is back."""
    port, seconds = OUTAGES[outage]
    if port is not None and shutil.which("nft") is None:
        pytest.skip("cutting one server off needs nft (nftables); .ci/run installs it")
    c = fresh
    w1, w2 = c.workers["worker1"], c.workers["worker2"]
    procs = [c.start_worker(w1), c.start_worker(w2)]
    c.scan()  # while the workers load their models
    wait_until(lambda: worker_done(c, w1) >= 1 and worker_done(c, w2) >= 1, 180, "results from both workers", procs)
    done_at_cut = c.count_done()
    if port is None:
        c.db.cut()
    else:
        c.db.block(port)
    time.sleep(seconds)
    assert all(p.poll() is None for p in procs), f"a worker died while the {outage} was unreachable"
    if port is None:
        c.db.heal()
    else:
        c.db.unblock(port)
    healed = wait_until(lambda: c.count_done() == c.n, 180, f"every study after the {outage} is back", procs)
    settle = wait_until(lambda: settled(c), 120, "an empty queue and no unacknowledged message")
    assert_exactly_once(c)
    assert c.sql("select max(attempts) from instances")[0][0] <= 2
    print(f"\ncost: {outage} unreachable {seconds} s with {done_at_cut} of {c.n} done: every study done "
          f"{healed:.1f} s after it was back, the broker settled {settle:.1f} s after it was back; "
          f"{screened_twice(c)} of {c.n} instances screened twice")


BULK_N = 3000  # instances, 4 to a study: a scan that commits batches of 32, 64, 128, then 256 (producer.scan)


def queued_messages(c: Cluster) -> list[list[str]]:
    """The SOP Instance UIDs of each study task waiting in the broker (kombu's Redis list, Celery's message body)."""
    import base64
    import json

    bodies = [json.loads(m) for m in c.redis("LRANGE", "chest-xray", 0, -1)]
    return [json.loads(base64.b64decode(b["body"]))[1]["sop_instance_uids"] for b in bodies]


def test_a_producer_cut_off_during_a_large_scan_is_completed_by_a_rerun_and_nothing_is_enqueued_twice(fresh):
    """The scan commits its index in batches and sends each batch's finished studies after its commit: cut off
    mid-index (between two batches: the last batch's studies sent, the next batch being read), it waits on its
    database (no reset reaches it); the host is then stopped (SIGKILL, as an operator or a reboot would) and healed.
    The re-run skips what was committed, indexes the rest, and sends what the first did not: every instance in
    exactly one task."""
    from .test_load import PER_STUDY, make_load_archive

    c = fresh
    bulk = c.root / "nas" / "bulk"
    local = c.root / "producer" / "srv" / "bulk"
    local.mkdir(parents=True, exist_ok=True)
    c.producer.mounts[local] = bulk
    try:
        studies = make_load_archive(bulk, BULK_N, run=22)
        env = c.env(c.producer)
        env["NEURON_PATH_MAP"] += f";/bulk={local}"
        assert c.producer.run([sys.executable, "-m", "neuron", "db", "upgrade"], env).returncode == 0
        scan = c.producer.spawn([sys.executable, "-m", "neuron", "scan", str(local)], env, c.log(c.producer))
        files = lambda: c.sql("select count(*) from files")[0][0]  # noqa: E731

        def between_batches() -> bool:  # a batch of >= 256 committed, its studies sent, the next one being read
            (indexed, queued), = c.sql("select count(*), count(*) filter (where status = 'queued') from instances")
            return indexed >= 480 and indexed - queued <= PER_STUDY and \
                int(c.redis("LLEN", "chest-xray")) * PER_STUDY == queued

        wait_until(between_batches, 120, "the scan's fourth committed and sent batch", [scan], poll=0.05)
        c.producer.cut()
        time.sleep(3)
        at_cut, sent_at_cut = files(), int(c.redis("LLEN", "chest-xray"))
        assert at_cut < BULK_N, "the scan finished before the cut; make the folder larger"
        assert scan.poll() is None and sent_at_cut * PER_STUDY >= at_cut - PER_STUDY
        c.producer.kill_all()
        c.producer.heal()
        started = time.monotonic()
        res = c.producer.run([sys.executable, "-m", "neuron", "scan", str(local)], env, timeout=180)
        rerun = time.monotonic() - started
        assert res.returncode == 0, res.stderr[-3000:]
        assert f"({at_cut} unchanged)" in res.stderr, res.stderr[-2000:]
        assert f"enqueued {studies - sent_at_cut} study tasks" in res.stderr, res.stderr[-2000:]
        assert c.sql("select count(*), count(distinct sop_instance_uid) from files") == [(BULK_N, BULK_N)]
        assert c.sql("select status, count(*) from instances group by status") == [("queued", BULK_N)]
        assert all(p.startswith("/bulk/") for (p,) in c.sql("select path from files"))
        messages = queued_messages(c)
        uids = [u for m in messages for u in m]
        assert len(messages) == studies and len(uids) == len(set(uids)) == BULK_N
        assert max(len(m) for m in messages) == PER_STUDY
    finally:
        del c.producer.mounts[local]
        shutil.rmtree(bulk, ignore_errors=True)
    print(f"\ncost: producer cut off after {at_cut} of {BULK_N} files were indexed and {sent_at_cut} tasks sent, then "
          f"stopped: the re-run indexed the other {BULK_N - at_cut} and sent the other {studies - sent_at_cut} "
          f"tasks, each instance once, in {rerun:.1f} s")
