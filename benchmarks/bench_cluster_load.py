"""What one Redis and one PostgreSQL are asked for, per study and per image, by ``neuron scan`` and by a worker; what
the two servers carry on this machine; and where, projected, they saturate.

    .venv/bin/python -m benchmarks.bench_cluster_load --n 512 [--size 256] [--batch-size 64] [--out benchmarks/results]

The run (throwaway servers from ``neuron.servers``; PostgreSQL restarted once with ``pg_stat_statements`` loaded):

    schema created (not counted)
    worker, fixed cost: a host-only worker (``worker.bench_host``) started on the empty queue, ready, idle for
                        ``--idle-s`` (its background: heartbeats, events, polls, per second), stopped
    producer:           ``neuron scan ARCHIVE`` (indexes the headers, one task per study), until it exits
    worker:             the same worker started again, until Redis holds no message and none unacknowledged (a
                        study is acknowledged after the commit of its results), stopped

Each phase ends once its processes have closed their connections (a PostgreSQL backend flushes its statistics when
it exits), and the counters are read before and after it: Redis ``INFO`` (commandstats, stats) less this script's
own commands and bytes; PostgreSQL ``pg_stat_database`` and ``pg_stat_statements`` of the ``neuron`` database (this
script reads them from the ``postgres`` database, so its own queries are not counted) and ``pg_current_wal_lsn()``;
the CPU of each server's processes (``/proc``, exited backends included through the postmaster's children time);
the bytes and packets each way on each server's port from an nftables table of this run's own (root only; this
script's own connections are left out), else ``network.available`` is false. Connections are sampled every 0.25 s:
PostgreSQL's ``pg_stat_activity`` and the established sockets on Redis's port (``/proc/net/tcp``).

Then the servers' capacity on this machine for the same mix: ``redis-benchmark`` for each command of the mix
(``RPOP`` stands in for ``BRPOP``, ``PING`` for ``MULTI``/``EXEC`` and the rest), the result writer's rows and
commits per second (``benchmarks.bench_db.bench_writer``: studies of 1-4 images, 18 findings each, group commits;
the cluster runs with ``fsync=off``) and the disk's ``fdatasync`` rate for 8 kB writes (what a commit costs with
``fsync=on``). Prints one JSON object and writes it to ``<out>/<date>-cluster-load.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.cluster_counters import (  # noqa: E402
    PG_DATABASE,
    PgProbe,
    PortCounters,
    Probes,
    RedisProbe,
    Snapshot,
    delta,
    enable_pg_stat_statements,
    statement_delta,
)
from neuron import servers, synthetic  # noqa: E402
from neuron.queue import queue_for  # noqa: E402
from neuron.work import Route  # noqa: E402
from worker.bench import (  # noqa: E402
    celery_environment,
    host_only_worker_command,
    start_worker,
    stop_worker,
    wait_for,
    wait_until_ready,
)

ROUTE = Route.CHEST_XRAY
GPU_WORKER_IMAGES_PER_S = {"fp32": 1000, "fp16": 1700}  # H100, DenseNet121 5 TTA views: ../shared/device/README.md
NIGHT_S = 10 * 3600
# shown beside the servers' limits, not counted among them: one client's rate, and a pool's size never reached here
NOT_SERVER_LIMITS = ("pg_writer_one_client", "pg_connections_at_pool_ceiling")
# kombu's Redis transport (kombu/transport/redis.py): messages are LPUSHed and BRPOPed; a delivered message waits
# in the "unacked" hash and "unacked_index" sorted set until its ack (HDEL/ZREM in a MULTI); events and remote
# control are PUBLISHed to fanout channels.
COMMAND_KINDS = {"messages": ("lpush", "rpush", "brpop", "rpop", "lpop", "llen"),
                 "unacked bookkeeping": ("hset", "hdel", "hget", "hgetall", "zadd", "zrem", "zrange",
                                         "zrevrangebyscore", "zrangebyscore", "multi", "exec", "watch", "unwatch"),
                 "events and control": ("publish", "subscribe", "psubscribe", "unsubscribe", "punsubscribe"),
                 "bindings": ("sadd", "smembers", "srem", "scard")}
LAGGED = ("pg.xact_", "pg.tup_", "pg.blks_")  # pg_stat_database's, flushed by each backend on its own schedule


# -- the run ----------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadConfig:
    n: int = 512
    size: int = 256  # pixels do not reach either server; small films keep the host's share of two cores small
    seed: int = 0
    batch_size: int = 64
    concurrency: int | None = None  # studies in flight; None: the worker's default (4 x batch)
    idle_s: float = 10.0
    quiet_s: float = 5.0  # the servers alone, no client: their own CPU per second
    redis_requests: int = 100_000  # per redis-benchmark command
    writer_studies: int = 400  # bench_db.bench_writer's studies of 1-4 images
    fsync_s: float = 2.0
    fixed: bool = True  # measure each process's fixed cost (an empty scan, an idle worker) to take it out
    workdir: Path = field(default_factory=synthetic.default_workdir)
    cache_dir: Path | None = None  # the worker's model caches; None: <workdir>/cache, kept between runs
    out: Path | None = Path("benchmarks/results")
    keep: bool = False  # keep the run's folder (the worker's logs)

    def __post_init__(self) -> None:
        if self.n < 1 or self.batch_size < 1:
            raise ValueError(f"--n {self.n} and --batch-size {self.batch_size} must be at least 1")
        if self.idle_s <= 0:
            raise ValueError(f"--idle-s {self.idle_s}: the worker's background needs a window of more than 0 s")


def _drained(redis: RedisProbe, queue: str) -> bool:
    return redis.command("LLEN", queue) == 0 and redis.command("HLEN", "unacked") == 0


def _mean_message_bytes(redis: RedisProbe, queue: str) -> int:
    messages = redis.command("LRANGE", queue, "0", "-1") or []
    return round(sum(map(len, messages)) / len(messages)) if messages else 0


def _fixed_costs(cfg: LoadConfig, probes: Probes, snaps: dict[str, Snapshot], worker_cmd: list[str],
                 env: dict[str, str], run_dir: Path) -> None:
    """What a process asks for whatever its work: ``neuron scan`` of an empty folder, then a worker started on the
    empty queue, idle for ``idle_s`` (its background per second), stopped."""
    empty = run_dir / "empty"
    empty.mkdir()
    with probes.sampling("producer_fixed"):
        _scan(empty, env)
        probes.wait_for_no_clients()
    snaps["scanned_empty"] = probes.snapshot()
    log = run_dir / "worker-fixed.log"
    with probes.sampling("worker_fixed"):
        proc = start_worker(worker_cmd, env, log)
        try:
            wait_until_ready(proc, log)
            snaps["idle_from"] = probes.snapshot()
            time.sleep(cfg.idle_s)
            snaps["idle_to"] = probes.snapshot()
        finally:
            stop_worker(proc)
        probes.wait_for_no_clients()
    snaps["fixed"] = probes.snapshot()


def _scan(folder: Path, env: dict[str, str]) -> None:
    scan = subprocess.run([sys.executable, "-m", "neuron", "scan", str(folder)], env=env, capture_output=True,
                          text=True, timeout=3600)
    if scan.returncode != 0:
        raise RuntimeError(f"neuron scan {folder} exited with {scan.returncode}: {scan.stderr[-2000:]}")


def measure(cfg: LoadConfig, say=print) -> dict:
    """The phases' counters (module docstring) and the servers' capacity on this machine; the projection is made
    from them by ``project``."""
    from db.store import Database

    archive = synthetic.ensure_archives(cfg.workdir / "archives", cfg.n, cfg.size, cfg.seed, ["uncompressed"],
                                        workers=os.cpu_count() or 1)["uncompressed"]
    say(f"archive: {archive.n_images} images in {archive.studies} studies ({archive.root})")
    run_dir = cfg.workdir / "runs" / f"cluster-load-{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"
    run_dir.mkdir(parents=True)
    queue = queue_for(ROUTE)
    try:
        with servers.redis_server(parent=run_dir) as broker, servers.postgres_server(parent=run_dir) as pg:
            enable_pg_stat_statements(pg)
            db = Database(pg.url)
            db.create()
            db.dispose()
            env = celery_environment(run_dir, broker.url, pg.url)
            # the untrained model's calibration and ONNX graph, computed once, not at every worker start
            env["NEURON_CACHE_DIR"] = str(cfg.cache_dir or cfg.workdir / "cache")
            worker_cmd = host_only_worker_command(archive.files[0], "cpu", cfg.batch_size, cfg.concurrency)
            redis, pgp = RedisProbe(broker.port), PgProbe(pg.url)
            postmaster = int((pg.data / "postmaster.pid").read_text().split()[0])
            assert broker.proc is not None
            try:
                with PortCounters({"redis": broker.port, "pg": pg.port}, [redis.port, pgp.port]) as ports:
                    probes = Probes(redis, pgp, ports, broker.proc.pid, postmaster, broker.port)
                    quiet_from = probes.snapshot()
                    time.sleep(cfg.quiet_s)
                    snaps: dict[str, Snapshot] = {"start": probes.snapshot()}
                    wall = snaps["start"].at - quiet_from.at
                    quiet = {k: (snaps["start"].counters[k] - quiet_from.counters[k]) / wall
                             for k in ("redis.cpu_s", "pg.cpu_s")}
                    if cfg.fixed:
                        _fixed_costs(cfg, probes, snaps, worker_cmd, env, run_dir)
                        say("fixed costs and the idle worker's background measured")
                    snaps["producer_from"] = probes.snapshot()
                    with probes.sampling("producer"):
                        _scan(archive.root, env)
                        probes.wait_for_no_clients()
                    snaps["producer"] = probes.snapshot()
                    message_bytes = _mean_message_bytes(redis, queue)
                    snaps["worker_from"] = probes.snapshot()
                    say(f"producer measured: {message_bytes} bytes per message")
                    log = run_dir / "worker.log"
                    with probes.sampling("worker"):
                        proc = start_worker(worker_cmd, env, log)
                        try:
                            wait_until_ready(proc, log)
                            t_ready = time.monotonic()
                            wait_for(lambda: _drained(redis, queue) and (time.sleep(0.5) or _drained(redis, queue)),
                                     max(600.0, 2.0 * archive.n_images), "every study to be acknowledged", proc, log)
                            busy_s = time.monotonic() - t_ready
                        finally:
                            stop_worker(proc)
                        probes.wait_for_no_clients()
                    snaps["worker"] = probes.snapshot()
                    say(f"worker measured: {busy_s:.1f} s from ready to the last acknowledgement")
                    network_note = ports.note
                limits = {name: int(pgp.query(f"SHOW {name}")[0][0])
                          for name in ("max_connections", "superuser_reserved_connections")}
            finally:
                redis.close()
                pgp.close()
            done, tables = _results(pg.url)
            if done != archive.n_images:
                raise RuntimeError(f"{done} of {archive.n_images} instances are done after every study was "
                                   f"acknowledged; see {run_dir / 'worker.log'}")
            phases = {"producer": delta(snaps["producer_from"], snaps["producer"], quiet),
                      "worker": delta(snaps["worker_from"], snaps["worker"], quiet)}
            statements = {"producer": statement_delta(snaps["producer_from"], snaps["producer"]),
                          "worker": statement_delta(snaps["worker_from"], snaps["worker"])}
            if cfg.fixed:
                phases.update({"producer_fixed": delta(snaps["start"], snaps["scanned_empty"], quiet),
                               "worker_fixed": delta(snaps["scanned_empty"], snaps["fixed"], quiet),
                               "worker_idle": delta(snaps["idle_from"], snaps["idle_to"], quiet)})
                statements["worker_fixed"] = statement_delta(snaps["scanned_empty"], snaps["fixed"], top=8)
            say("measuring capacity: redis-benchmark, the result writer, fdatasync")
            capacity = {"redis": redis_capacity(broker.port, phases, message_bytes, cfg.redis_requests),
                        "postgresql": pg_capacity(pg, cfg.writer_studies, cfg.fsync_s), **limits}
    finally:
        if not cfg.keep:
            shutil.rmtree(run_dir, ignore_errors=True)
    return {"n_images": archive.n_images, "studies": archive.studies, "image_size": cfg.size,
            "batch_size": cfg.batch_size, "concurrency": cfg.concurrency or 4 * cfg.batch_size,
            "idle_s": cfg.idle_s if cfg.fixed else None, "worker_busy_s": round(busy_s, 2), "instances_done": done,
            "message_bytes": message_bytes, "servers_quiet_cpu_s_per_s": quiet, "phases": phases,
            "statements": statements, "tables": tables,
            "connections": probes.peaks, "network": {"available": network_note is None, "note": network_note},
            "capacity": capacity}


def _results(url: str) -> tuple[int, list[dict]]:
    """Instances done, and the largest tables (rows, bytes with indexes and TOAST) after the run."""
    import psycopg2

    parts = urlsplit(url)
    conn = psycopg2.connect(host=parts.hostname, port=parts.port, user=parts.username, dbname=PG_DATABASE)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM instances WHERE status = 'done'")
            done = int(cur.fetchone()[0])
            cur.execute("SELECT relname, n_live_tup, pg_total_relation_size(relid) FROM pg_stat_user_tables "
                        "ORDER BY pg_total_relation_size(relid) DESC LIMIT 6")
            tables = [{"table": t, "rows": int(r), "bytes": int(b)} for t, r, b in cur.fetchall()]
    finally:
        conn.close()
    return done, tables


# -- capacity on this machine -----------------------------------------------------------------------------------------
def _bench_commands(payload: str) -> dict[str, tuple[str, ...]]:
    """redis-benchmark's stand-in for each command of the mix (``__rand_int__`` is its per-request random number)."""
    return {"lpush": ("LPUSH", "neuron-bench:q", payload), "rpush": ("RPUSH", "neuron-bench:q", payload),
            "brpop": ("RPOP", "neuron-bench:q"), "rpop": ("RPOP", "neuron-bench:q"),
            "lpop": ("LPOP", "neuron-bench:q"), "llen": ("LLEN", "neuron-bench:q"),
            "publish": ("PUBLISH", "neuron-bench:ev", payload),
            "hset": ("HSET", "neuron-bench:h", "f:__rand_int__", payload),
            "hdel": ("HDEL", "neuron-bench:h", "f:__rand_int__"), "hget": ("HGET", "neuron-bench:h", "f:__rand_int__"),
            "zadd": ("ZADD", "neuron-bench:z", "__rand_int__", "m:__rand_int__"),
            "zrem": ("ZREM", "neuron-bench:z", "m:__rand_int__")}


def redis_capacity(port: int, phases: dict[str, dict[str, float]], payload_bytes: int, requests: int) -> dict:
    """Requests per second of redis-benchmark (50 clients, no pipelining, as kombu sends) for each command the run
    used; a command without a stand-in gets PING's rate (the cost of a round trip)."""
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return {"note": "redis-benchmark is not installed (Debian's redis-tools); Redis capacity not measured"}
    used = sorted({k.split(".")[2] for p in phases.values() for k, v in p.items() if k.startswith("redis.calls.")
                   and v > 0})
    stand_in = _bench_commands("x" * max(payload_bytes, 1))
    rates: dict[tuple[str, ...], float] = {}
    out: dict[str, dict] = {}
    for cmd in ["lpush", *[c for c in used if c != "lpush"]]:  # LPUSH first: RPOP then finds a full list
        argv = stand_in.get(cmd, ("PING",))
        if argv not in rates:
            done = subprocess.run([binary, "-h", "127.0.0.1", "-p", str(port), "-c", "50", "-n", str(requests),
                                   "-r", "100000", "-q", "--csv", *argv], capture_output=True, text=True, timeout=600)
            row = [ln for ln in done.stdout.splitlines() if ln.strip() and not ln.startswith('"test"')]
            if done.returncode != 0 or not row:
                raise RuntimeError(f"redis-benchmark {argv[0]} failed ({done.returncode}): {done.stderr[-500:]}")
            rates[argv] = float(row[-1].split(",")[1].strip('"'))
        if cmd in used:
            out[cmd] = {"as": " ".join(a if len(a) < 24 else f"<{len(a)} bytes>" for a in argv),
                        "requests_per_s": rates[argv]}
    return {"requests_per_command": requests, "clients": 50, "payload_bytes": payload_bytes, "commands": out}


def fdatasync_rate(folder: Path, seconds: float) -> float:
    """8 kB writes each followed by fdatasync, per second, on ``folder``'s file system: what one commit waits for
    with ``fsync=on`` (pg_test_fsync's "one 8kB write" line measures the same)."""
    path = folder / "neuron-fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    block, n = b"\0" * 8192, 0
    try:
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            os.pwrite(fd, block, 0)
            os.fdatasync(fd)
            n += 1
        return n / (time.perf_counter() - start)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)


def pg_capacity(pg: servers.PgServer, studies: int, fsync_s: float) -> dict:
    """The result writer's rate on this cluster (``benchmarks.bench_db.bench_writer``: one client, group commits of
    up to 256 instances with 18 findings each), and the disk's fdatasync rate."""
    from benchmarks.bench_db import LABELS, bench_writer
    from db.store import Database

    db = Database(pg.url)
    try:
        writer = bench_writer(db, studies)
    finally:
        db.dispose()
    images = writer["rows"] / len(LABELS)
    return {"writer": {**writer, "images": images, "images_per_s": round(images / writer["seconds"], 1),
                       "note": "one client; fsync=off (the throwaway cluster's setting)"},
            "fdatasync_per_s": round(fdatasync_rate(pg.workdir, fsync_s), 1)}


# -- per image, per study, and the projection -----------------------------------------------------------------------
SUMMARY_KEYS = {  # JSON name: counter (the net.* ones only with nftables)
    "redis_commands": "redis.total_commands_processed", "redis_bytes_in": "redis.total_net_input_bytes",
    "redis_bytes_out": "redis.total_net_output_bytes", "redis_connections": "redis.total_connections_received",
    "redis_cpu_ms": "redis.cpu_s", "pg_statements": "pg.statements", "pg_commits": "pg.xact_commit",
    "pg_rollbacks": "pg.xact_rollback", "pg_rows_returned": "pg.tup_returned", "pg_rows_fetched": "pg.tup_fetched",
    "pg_rows_inserted": "pg.tup_inserted", "pg_rows_updated": "pg.tup_updated", "pg_rows_deleted": "pg.tup_deleted",
    "pg_statement_rows": "pg.statement_rows", "pg_wal_bytes": "pg.wal_bytes", "pg_cpu_ms": "pg.cpu_s",
    "redis_wire_bytes_in": "net.redis_in_bytes", "redis_wire_bytes_out": "net.redis_out_bytes",
    "redis_packets_in": "net.redis_in_packets", "pg_wire_bytes_in": "net.pg_in_bytes",
    "pg_wire_bytes_out": "net.pg_out_bytes", "pg_packets_in": "net.pg_in_packets"}


def _summary(counters: dict[str, float], per: float) -> dict[str, float]:
    out = {}
    for name, key in SUMMARY_KEYS.items():
        if key.startswith("net.") and key not in counters:
            continue
        value = counters.get(key, 0.0) * (1000 if key.endswith("cpu_s") else 1)
        out[name] = round(value / per, 4)
    return out


def by_kind(counters: dict[str, float], per: float) -> dict[str, float]:
    """Redis calls grouped by what they are for (COMMAND_KINDS), per ``per``."""
    out: dict[str, float] = {}
    for key, calls in counters.items():
        if key.startswith("redis.calls.") and calls:
            name = key.split(".")[2]
            kind = next((k for k, names in COMMAND_KINDS.items() if name in names), "other")
            out[kind] = out.get(kind, 0.0) + calls / per
    return {k: round(v, 4) for k, v in sorted(out.items())}


def steady(result: dict) -> tuple[dict[str, float], dict[str, float], dict[str, float]]:
    """The producer's counters less an empty scan's; the worker's less its start and stop (the empty-queue
    worker's, less its idle window) and less its background over the busy window; and that background per second
    (heartbeats, events, polls). Without the fixed phases (``fixed=False``): the counters as measured, no
    background."""
    p, busy_s = result["phases"], result["worker_busy_s"]
    if "worker_fixed" not in p:
        return p["producer"], p["worker"], {}
    producer = {k: max(0.0, v - p["producer_fixed"].get(k, 0.0)) for k, v in p["producer"].items()}
    keys = set(p["worker"]) | set(p["worker_fixed"])
    # pg_stat_database's counters reach the view when a backend flushes them (at most every 10 s while it idles,
    # and when it exits): what the idle window shows of them is the worker's start, so they count as fixed
    rate = {k: 0.0 if k.startswith(LAGGED) else p["worker_idle"].get(k, 0.0) / result["idle_s"] for k in keys}
    fixed = {k: p["worker_fixed"].get(k, 0.0) - rate[k] * result["idle_s"] for k in keys}
    worker = {k: max(0.0, p["worker"].get(k, 0.0) - fixed[k] - rate[k] * busy_s) for k in keys}
    return producer, worker, rate


def per_unit(result: dict) -> dict:
    n, studies = result["n_images"], result["studies"]
    producer, worker, rate = steady(result)
    p = result["phases"]
    out: dict = {}
    for unit, per in (("per_image", n), ("per_study", studies)):
        out[unit] = {"producer": _summary(p["producer"], per), "worker": _summary(p["worker"], per),
                     "producer_steady": _summary(producer, per), "worker_steady": _summary(worker, per)}
        out[f"redis_calls_by_kind_{unit}"] = {"producer": by_kind(p["producer"], per),
                                              "worker": by_kind(p["worker"], per),
                                              "worker_steady": by_kind(worker, per)}
    if "worker_fixed" in p:
        out["fixed_per_process"] = {
            "producer": _summary(p["producer_fixed"], 1),
            "worker": _summary({k: p["worker_fixed"].get(k, 0.0) - rate.get(k, 0.0) * result["idle_s"]
                                for k in p["worker_fixed"]}, 1)}
        out["worker_background_per_s"] = _summary(rate, 1)
        out["redis_calls_by_kind_worker_background_per_s"] = by_kind(rate, 1)
    return out


def project(result: dict) -> dict:
    """How many GPU workers one Redis and one PostgreSQL carry, resource by resource, at each worker rate; the
    first to saturate, and the images of a 10-hour night there."""
    n = result["n_images"]
    prod, work, bg = steady(result)

    def img(key: str) -> float:  # each image is indexed once and screened once
        return (prod.get(key, 0.0) + work.get(key, 0.0)) / n

    cap, conns = result["capacity"], result["connections"]
    cores = os.cpu_count() or 1
    limits: dict[str, tuple[float, float, float, str]] = {}  # (per image, per worker per s, capacity, unit)
    limits["redis_cpu"] = (img("redis.cpu_s"), bg.get("redis.cpu_s", 0.0), 1.0, "Redis's one thread, CPU s/s")
    rates = {c: v["requests_per_s"] for c, v in (cap["redis"].get("commands") or {}).items()}
    if rates:
        ping = min(rates.values())
        cost = sum(img(k) / rates.get(k.split(".")[2], ping) for k in set(prod) | set(work)
                   if k.startswith("redis.calls."))
        cost_bg = sum(v / rates.get(k.split(".")[2], ping) for k, v in bg.items() if k.startswith("redis.calls."))
        limits["redis_requests"] = (cost, cost_bg, 1.0, "redis-benchmark rates of the mix's commands, s/s")
    limits["pg_cpu"] = (img("pg.cpu_s"), bg.get("pg.cpu_s", 0.0), float(cores),
                        f"PostgreSQL's processes, CPU s/s on this machine's {cores} cores")
    limits["pg_commits_fsync_on"] = (img("pg.xact_commit"), bg.get("pg.xact_commit", 0.0),
                                     cap["postgresql"]["fdatasync_per_s"],
                                     "commits/s, one fdatasync each (fsync=on, no commit_delay)")
    limits["pg_writer_one_client"] = (1.0, 0.0, cap["postgresql"]["writer"]["images_per_s"],
                                      "one worker's result writer (fsync=off): images/s it commits")
    per_worker_conns = max(1, conns.get("worker.pg_backends", 1))
    pool_ceiling = 5 + 10  # SQLAlchemy's QueuePool defaults (pool_size, max_overflow): one engine per worker
    spare = cap["max_connections"] - cap["superuser_reserved_connections"] - conns.get("producer.pg_backends", 0)
    out: dict = {"per_image": {k: v[0] for k, v in limits.items() if k != "pg_writer_one_client"},
                 "worker_background_per_s": {k: v[1] for k, v in limits.items()},
                 "capacity": {k: v[2] for k, v in limits.items()}, "meaning": {k: v[3] for k, v in limits.items()},
                 "pg_connections_per_worker": per_worker_conns, "pg_connections_spare": spare,
                 "pg_connections_pool_ceiling_per_worker": pool_ceiling,
                 "wal_bytes_per_image": round(img("pg.wal_bytes"), 1),
                 "table_bytes_per_image": round(sum(t["bytes"] for t in result["tables"]) / n, 1),
                 "by_worker_rate": {}}
    for precision, rate in GPU_WORKER_IMAGES_PER_S.items():
        workers = {}
        for name, (per_image, background, capacity, _) in limits.items():
            if name == "pg_writer_one_client":
                workers[name] = None if capacity >= rate else round(capacity / rate, 2)
                continue
            load = rate * per_image + background  # of one worker
            workers[name] = round(capacity / load, 2) if load > 0 else None
        workers["pg_connections"] = float(spare // per_worker_conns)
        workers["pg_connections_at_pool_ceiling"] = float(spare // pool_ceiling)
        bounded = {k: v for k, v in workers.items() if v is not None and k not in NOT_SERVER_LIMITS}
        first = min(bounded, key=bounded.get)
        # whole workers below the limit; under one, the one worker runs at the fraction the server allows
        n_workers = bounded[first] if bounded[first] < 1 else float(int(bounded[first]))
        images = round(n_workers * rate * NIGHT_S)
        out["by_worker_rate"][precision] = {
            "images_per_s_per_worker": rate, "workers_before_saturation": workers, "saturates_first": first,
            "workers": n_workers, "images_per_night": images,
            "wal_gb_per_night": round(images * img("pg.wal_bytes") / 1e9, 1),
            "table_gb_per_night": round(images * out["table_bytes_per_image"] / 1e9, 1)}
    return out


def machine() -> dict:
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "processor": platform.processor() or platform.machine()}


def run(cfg: LoadConfig, say=print) -> dict:
    result = measure(cfg, say)
    now = datetime.now().astimezone()
    result = {"date": now.date().isoformat(), "timestamp": now.isoformat(timespec="seconds"), "machine": machine(),
              **result, **per_unit(result)}
    result["projection"] = project(result)
    if cfg.out is not None:
        cfg.out.mkdir(parents=True, exist_ok=True)
        path = cfg.out / f"{now:%Y-%m-%d}-cluster-load.json"
        path.write_text(json.dumps(result, indent=2) + "\n")
        say(f"results: {path}")
    return result


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=512, help="images in the synthetic archive (studies of 1-4)")
    ap.add_argument("--size", type=int, default=256, help="image side in pixels")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=None, help="studies in flight (default 4 x batch)")
    ap.add_argument("--idle-s", type=float, default=10.0, help="the idle worker's window for its background")
    ap.add_argument("--quiet-s", type=float, default=5.0, help="the servers alone, for their own CPU per second")
    ap.add_argument("--redis-requests", type=int, default=100_000, help="redis-benchmark requests per command")
    ap.add_argument("--writer-studies", type=int, default=400, help="studies through bench_db's writer run")
    ap.add_argument("--fsync-s", type=float, default=2.0, help="seconds of the fdatasync probe")
    ap.add_argument("--no-fixed", action="store_true", help="skip the empty scan and the idle worker (faster; the "
                    "per-image figures then include each process's start)")
    ap.add_argument("--keep", action="store_true", help="keep the run's folder (the workers' logs)")
    ap.add_argument("--workdir", type=Path, default=synthetic.default_workdir())
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="folder of the JSON")
    args = ap.parse_args(argv)
    cfg = LoadConfig(n=args.n, size=args.size, batch_size=args.batch_size, concurrency=args.concurrency,
                     idle_s=args.idle_s, quiet_s=args.quiet_s, redis_requests=args.redis_requests,
                     writer_studies=args.writer_studies, fsync_s=args.fsync_s, fixed=not args.no_fixed,
                     workdir=args.workdir, out=args.out, keep=args.keep)
    print(json.dumps(run(cfg, say=lambda s: print(s, file=sys.stderr)), indent=2))


if __name__ == "__main__":
    main()
