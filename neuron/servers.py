"""Throwaway Redis and PostgreSQL servers on free loopback ports, in folders of their own (torch-free).

Used by the distributed tests (``tests/services.py``) and by ``neuron bench``'s Celery mode. Debian's
``redis-server`` and PostgreSQL 13-17 (``.ci/run`` installs them when missing). PostgreSQL refuses to run as root, so
as root its cluster is created and started as the ``postgres`` user. Each server lives in a temporary folder (under
``parent`` when given) that is removed when its context ends.
"""

from __future__ import annotations

import logging
import os
import pwd
import shutil
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

PG_BIN_DIRS = [Path("/usr/lib/postgresql") / v / "bin" for v in ("17", "16", "15", "14", "13")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout} s")


def _need(binary: str | None, what: str) -> str:
    if binary is None:
        raise RuntimeError(f"{what} is not installed; run `bash .ci/run` once as root, or apt-get install "
                           f"redis-server postgresql")
    return binary


def _find_pg_bin(name: str) -> str | None:
    for d in PG_BIN_DIRS:
        if (d / name).exists():
            return str(d / name)
    return shutil.which(name)


def _pg_bin(name: str) -> str:
    return _need(_find_pg_bin(name), f"PostgreSQL ({name})")


def redis_available() -> bool:
    return shutil.which("redis-server") is not None


def postgres_available() -> bool:
    return all(_find_pg_bin(name) is not None for name in ("initdb", "pg_ctl", "createdb"))


class RedisServer:
    """A redis-server in a temporary folder. ``durable`` keeps an append-only file, as a production broker does, so
    ``stop``/``start`` simulate an outage that loses no queued message."""

    def __init__(self, workdir: Path, port: int, durable: bool):
        self.workdir, self.port, self.durable = workdir, port, durable
        self.url = f"redis://127.0.0.1:{port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        binary = _need(shutil.which("redis-server"), "redis-server")
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.durable else ["--appendonly", "no"]
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      *persistence, "--dir", str(self.workdir)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@contextmanager
def redis_server(durable: bool = False, parent: Path | None = None) -> Iterator[RedisServer]:
    server = RedisServer(Path(tempfile.mkdtemp(prefix="neuron-redis-", dir=parent)), free_port(), durable)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.workdir, ignore_errors=True)


class PgServer:
    """A PostgreSQL cluster in a temporary folder; ``stop``/``start`` simulate an outage."""

    def __init__(self, workdir: Path, port: int, prefix: list[str]):
        self.workdir, self.port, self.prefix = workdir, port, prefix
        self.data = workdir / "data"
        self.url = f"postgresql+psycopg2://neuron@127.0.0.1:{port}/neuron"

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*self.prefix, *args], check=True, capture_output=True, text=True)

    def start(self) -> None:
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.workdir / "log"), "-w", "-o",
                  f"-p {self.port} -k {self.workdir} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        wait_for_port(self.port)

    def stop(self) -> None:
        subprocess.run([*self.prefix, _pg_bin("pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop"],
                       capture_output=True)

    @property
    def pid(self) -> int:
        """The postmaster's process id (its connections' backends are its children)."""
        return int((self.data / "postmaster.pid").read_text().split()[0])


def _others_can_enter(folder: Path) -> bool:
    """Whether a user other than the owner (``postgres``, when we are root) can reach files below ``folder``."""
    for p in (folder.resolve(), *folder.resolve().parents):
        if not p.stat().st_mode & stat.S_IXOTH:
            return False
    return True


@contextmanager
def postgres_server(parent: Path | None = None) -> Iterator[PgServer]:
    root = os.geteuid() == 0
    if root and parent is not None and not _others_can_enter(Path(parent)):
        log.warning("%s is not reachable by the postgres user; the PostgreSQL cluster goes under %s instead",
                    parent, tempfile.gettempdir())
        parent = None
    workdir = Path(tempfile.mkdtemp(prefix="neuron-pg-", dir=parent))
    prefix: list[str] = []
    if root:
        pw = pwd.getpwnam("postgres")
        os.chown(workdir, pw.pw_uid, pw.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    server = PgServer(workdir, free_port(), prefix)
    server._run(_pg_bin("initdb"), "-D", str(server.data), "-U", "neuron", "--auth=trust", "-E", "UTF8")
    server.start()
    try:
        server._run(_pg_bin("createdb"), "-h", "127.0.0.1", "-p", str(server.port), "-U", "neuron", "neuron")
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def reset_postgres(url: str) -> None:
    """Drop everything Neuron created, so each test starts from an empty database."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()
