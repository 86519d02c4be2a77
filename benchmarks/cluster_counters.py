"""The counters ``benchmarks/bench_cluster_load.py`` reads from a Redis and a PostgreSQL, and what it takes out of
them: Redis's INFO through a socket of its own (so its own commands and bytes are known), PostgreSQL's statistics
views from the ``postgres`` database, each server's CPU from /proc, bytes on each server's port from nftables, and
the snapshots and differences between phases.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from neuron import servers

PG_DATABASE = "neuron"


# -- Redis, read with a socket of our own so its own traffic is known to the byte ----------------------------------
class RedisProbe:
    """A minimal RESP client that counts what it sends and receives, so this script's own commands and bytes can be
    taken out of the server's counters (Redis counts a command's input when it reads it, the command itself once it
    has run, and its reply's bytes when it writes them)."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.port = self.sock.getsockname()[1]
        self.sent = self.received = self.commands = 0
        self.by_command: dict[str, int] = {}
        self._buf = b""

    def command(self, *args: str) -> bytes | int | list | None:
        raw = f"*{len(args)}\r\n".encode() + b"".join(f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args)
        self.sock.sendall(raw)
        self.sent += len(raw)
        reply = self._read()
        self.commands += 1
        self.by_command[args[0].lower()] = self.by_command.get(args[0].lower(), 0) + 1
        return reply

    def _fill(self, n: int) -> None:
        while len(self._buf) < n:
            chunk = self.sock.recv(1 << 16)
            if not chunk:
                raise ConnectionError("Redis closed the probe's connection")
            self._buf += chunk
            self.received += len(chunk)

    def _line(self) -> bytes:
        while b"\r\n" not in self._buf:
            self._fill(len(self._buf) + 1)
        line, self._buf = self._buf.split(b"\r\n", 1)
        return line

    def _read(self) -> bytes | int | list | None:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            self._fill(n + 2)
            data, self._buf = self._buf[:n], self._buf[n + 2:]
            return data
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._read() for _ in range(n)]
        if kind == b":":
            return int(rest)
        if kind == b"-":
            raise RuntimeError(f"Redis answered the probe with an error: {rest.decode(errors='replace')}")
        return rest

    def info(self) -> dict[str, float]:
        """Counters of Redis's INFO, the probe's own traffic until now taken out."""
        own_out, own_cmds, own_by = self.received, self.commands, dict(self.by_command)
        text = self.command("INFO", "all")
        own_in = self.sent  # this INFO's request is in the input counter already; its reply is not in the output
        out: dict[str, float] = {}
        for line in text.decode().splitlines():
            key, _, value = line.partition(":")
            if key.startswith("cmdstat_"):
                fields = dict(kv.split("=") for kv in value.split(","))
                name = key[len("cmdstat_"):].split("|")[0]
                out[f"redis.calls.{name}"] = out.get(f"redis.calls.{name}", 0) + int(fields["calls"])
                out[f"redis.usec.{name}"] = out.get(f"redis.usec.{name}", 0) + int(fields["usec"])
            elif key in ("total_commands_processed", "total_net_input_bytes", "total_net_output_bytes",
                         "total_connections_received"):
                out[f"redis.{key}"] = float(value)
        out["redis.total_commands_processed"] -= own_cmds
        out["redis.total_net_input_bytes"] -= own_in
        out["redis.total_net_output_bytes"] -= own_out
        for name, calls in own_by.items():
            out[f"redis.calls.{name}"] = out.get(f"redis.calls.{name}", 0) - calls
        out["redis.total_connections_received"] -= 1  # the probe's
        return out

    def close(self) -> None:
        self.sock.close()


# -- PostgreSQL, read from the postgres database ----------------------------------------------------------------------
class PgProbe:
    def __init__(self, url: str):
        import psycopg2

        parts = urlsplit(url)
        self.conn = psycopg2.connect(host=parts.hostname, port=parts.port, user=parts.username, dbname="postgres")
        self.conn.autocommit = True
        self.port = _local_port(self.conn.fileno())
        self.lock = threading.Lock()

    def query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self.lock, self.conn.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall()

    def counters(self) -> tuple[dict[str, float], dict[int, tuple[str, int, int, float]]]:
        (row,) = self.query("SELECT xact_commit, xact_rollback, tup_returned, tup_fetched, tup_inserted, "
                            "tup_updated, tup_deleted, blks_read, blks_hit FROM pg_stat_database WHERE datname = %s",
                            (PG_DATABASE,))
        names = ("xact_commit", "xact_rollback", "tup_returned", "tup_fetched", "tup_inserted", "tup_updated",
                 "tup_deleted", "blks_read", "blks_hit")
        out = {f"pg.{n}": float(v) for n, v in zip(names, row, strict=True)}
        (lsn,) = self.query("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")[0]
        out["pg.wal_bytes"] = float(lsn)
        statements = {qid: (q, int(c), int(r), float(t)) for qid, q, c, r, t in self.query(
            "SELECT queryid, min(query), sum(calls), sum(rows), sum(total_exec_time) "
            "FROM neuron_stats.pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid "
            "WHERE d.datname = %s GROUP BY queryid", (PG_DATABASE,))}
        out["pg.statements"] = float(sum(s[1] for s in statements.values()))
        out["pg.statement_rows"] = float(sum(s[2] for s in statements.values()))
        out["pg.exec_ms"] = sum(s[3] for s in statements.values())
        return out, statements

    def clients(self) -> int:
        return int(self.query("SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND "
                              "backend_type = 'client backend'", (PG_DATABASE,))[0][0])

    def close(self) -> None:
        self.conn.close()


def _local_port(fd: int) -> int:
    sock = socket.socket(fileno=os.dup(fd))  # a duplicate of libpq's socket: closing it leaves the connection open
    try:
        return sock.getsockname()[1]
    finally:
        sock.close()


def enable_pg_stat_statements(pg: servers.PgServer) -> None:
    """Load pg_stat_statements (a restart: ``shared_preload_libraries`` is read at start) and create it in a schema
    of its own, which the benchmark's schema reset leaves alone."""
    import psycopg2

    def run(dbname: str, *sql: str) -> None:
        conn = psycopg2.connect(host="127.0.0.1", port=pg.port, user="neuron", dbname=dbname)
        conn.autocommit = True
        with conn.cursor() as cur:
            for s in sql:
                cur.execute(s)
        conn.close()

    run("postgres", "ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
    pg.stop()
    pg.start()
    run("postgres", "CREATE SCHEMA neuron_stats", "CREATE EXTENSION pg_stat_statements SCHEMA neuron_stats")


# -- CPU of a server's processes, and its connections --------------------------------------------------------------
_TICKS = os.sysconf("SC_CLK_TCK")


def server_cpu_s(root: int) -> float:
    """User + system seconds of ``root`` and every live process below it, each with its waited-for children's
    (a PostgreSQL backend that exited is in the postmaster's children time)."""
    stats = {}
    for entry in os.listdir("/proc"):
        try:
            raw = Path(f"/proc/{entry}/stat").read_text() if entry.isdigit() else ""
        except OSError:
            continue
        if raw:
            f = raw[raw.rindex(")") + 2:].split()
            stats[int(entry)] = (int(f[1]), sum(int(x) for x in f[11:15]) / _TICKS)
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            total += stats[pid][1]
            todo += [child for child, (parent, _) in stats.items() if parent == pid]
    return total


def established(port: int) -> int:
    """Established TCP connections whose server side is 127.0.0.1:``port`` (/proc/net/tcp, state 01)."""
    want = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as fh:
        return sum(1 for line in fh.readlines()[1:] if (f := line.split())[1] == want and f[3] == "01")


# -- network bytes per server port: nftables counters ---------------------------------------------------------------
class PortCounters:
    """Bytes and packets to and from each server's port, counted by a table of this run's own in the input hook
    (a loopback packet passes it once); the probes' own connections are not counted. Removed on exit."""

    def __init__(self, ports: dict[str, int], own: Sequence[int]):
        self.ports, self.own = ports, list(own)
        self.table = f"neuron_load_{os.getpid()}"
        self.available, self.note = False, None

    def __enter__(self) -> PortCounters:
        nft = shutil.which("nft")
        if os.geteuid() != 0 or nft is None:
            self.note = "nftables counters need root and nft; network bytes per server not measured"
            return self
        own = ", ".join(map(str, self.own))
        rules = [f"table inet {self.table} {{"]
        rules += [f"  counter {name}_{d} {{ }}" for name in self.ports for d in ("in", "out")]
        rules += ["  chain input {", "    type filter hook input priority 0; policy accept;"]
        for name, port in self.ports.items():
            rules += [f"    tcp dport {port} tcp sport {{ {own} }} accept",
                      f"    tcp sport {port} tcp dport {{ {own} }} accept",
                      f"    tcp dport {port} counter name {name}_in", f"    tcp sport {port} counter name {name}_out"]
        rules += ["  }", "}"]
        done = subprocess.run([nft, "-f", "-"], input="\n".join(rules), text=True, capture_output=True)
        if done.returncode != 0:
            self.note = f"nft refused the counters table: {done.stderr.strip()[-300:]}"
            return self
        self.available = True
        return self

    def read(self) -> dict[str, float]:
        if not self.available:
            return {}
        raw = subprocess.run(["nft", "-j", "list", "counters", "table", "inet", self.table], check=True,
                             capture_output=True, text=True).stdout
        out = {}
        for item in json.loads(raw)["nftables"]:
            if c := item.get("counter"):
                out[f"net.{c['name']}_bytes"] = float(c["bytes"])
                out[f"net.{c['name']}_packets"] = float(c["packets"])
        return out

    def __exit__(self, *exc) -> None:
        if self.available:
            subprocess.run(["nft", "delete", "table", "inet", self.table], capture_output=True)


# -- snapshots and phases -------------------------------------------------------------------------------------------
@dataclass
class Snapshot:
    at: float
    counters: dict[str, float]
    statements: dict[int, tuple[str, int, int, float]]


@dataclass
class Probes:
    redis: RedisProbe
    pg: PgProbe
    ports: PortCounters
    redis_pid: int
    postmaster_pid: int
    redis_port: int
    peaks: dict[str, int] = field(default_factory=dict)

    def snapshot(self) -> Snapshot:
        counters = {**self.redis.info()}
        pg, statements = self.pg.counters()
        counters.update(pg)
        counters.update(self.ports.read())
        counters["redis.cpu_s"] = server_cpu_s(self.redis_pid)
        counters["pg.cpu_s"] = server_cpu_s(self.postmaster_pid)
        return Snapshot(time.monotonic(), counters, statements)

    def wait_for_no_clients(self, timeout: float = 30.0) -> None:
        """Until no client backend is connected to the neuron database (an exiting backend flushes its
        statistics) and Redis holds only the probe's connection."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.pg.clients() == 0 and established(self.redis_port) <= 1:
                time.sleep(0.3)
                return
            time.sleep(0.1)
        raise TimeoutError(f"clients still connected {timeout:.0f} s after the phase's processes ended")

    @contextmanager
    def sampling(self, phase: str) -> Iterator[None]:
        """The most PostgreSQL backends and Redis connections seen while the block runs."""
        stop, pg_max, redis_max = threading.Event(), [0], [0]

        def sample() -> None:
            while not stop.wait(0.25):
                pg_max[0] = max(pg_max[0], self.pg.clients())
                redis_max[0] = max(redis_max[0], established(self.redis_port) - 1)

        thread = threading.Thread(target=sample, name="connections", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.peaks[f"{phase}.pg_backends"] = pg_max[0]
            self.peaks[f"{phase}.redis_connections"] = redis_max[0]


def delta(a: Snapshot, b: Snapshot, quiet: dict[str, float] | None = None) -> dict[str, float]:
    """Counters between two snapshots; ``quiet``: the servers' own CPU per second with no client (Redis's
    serverCron, PostgreSQL's checkpointer, WAL writer, autovacuum launcher), taken out over the window."""
    keys = set(a.counters) | set(b.counters)
    out = {k: b.counters.get(k, 0.0) - a.counters.get(k, 0.0) for k in keys}
    out["wall_s"] = b.at - a.at
    for key, per_s in (quiet or {}).items():
        out[key] = max(0.0, out.get(key, 0.0) - per_s * out["wall_s"])
    return {k: v for k, v in sorted(out.items()) if v}


def statement_shape(query: str) -> str:
    """A statement with its parameter lists folded: multi-row VALUES and IN lists of any length are one shape
    (pg_stat_statements keeps one entry per list length; it leaves a NULL as it is)."""
    q = re.sub(r"\$\d+(::(TIMESTAMP WITH(OUT)? TIME ZONE|[A-Za-z_]+(\(\d+\))?))?", "$", re.sub(r"\s+", " ", query))
    q = re.sub(r"\((\$|NULL)(, (\$|NULL))*\)", "(...)", q)
    return re.sub(r"\(\.\.\.\)(, \(\.\.\.\))+", "(...)", q)


def statement_delta(a: Snapshot, b: Snapshot, top: int = 12) -> list[dict]:
    """The statements run between two snapshots, by shape, the most called first (and any of the most
    time-consuming that are not among them)."""
    shapes: dict[str, dict] = {}
    for qid, (query, calls, nrows, ms) in b.statements.items():
        _, c0, r0, t0 = a.statements.get(qid, ("", 0, 0, 0.0))
        if calls - c0:
            row = shapes.setdefault(statement_shape(query), {"calls": 0, "rows": 0, "exec_ms": 0.0})
            row["calls"] += calls - c0
            row["rows"] += nrows - r0
            row["exec_ms"] += ms - t0
    rows = [{"query": q[:160], **v, "exec_ms": round(v["exec_ms"], 2)} for q, v in shapes.items()]
    by_calls = sorted(rows, key=lambda r: -r["calls"])[:top]
    by_time = [r for r in sorted(rows, key=lambda r: -r["exec_ms"])[:top // 2] if r not in by_calls]
    return by_calls + by_time
