"""Hosts for the multi-host tests: Linux network namespaces joined by veth pairs to a Linux bridge in a switch
namespace of their own, each host with its own mounts and host name.

Every host namespace holds one end of a veth pair (``eth0``, an address in ``SUBNET``); the other end is a port of
the bridge in the switch namespace. Setting that port down cuts the host off (its ``eth0`` loses carrier: packets
are dropped, connections are neither reset nor closed, as in a real partition); setting it up heals it. Nothing is
routed out of these namespaces, so traffic stays between the namespaces the harness made.

A process on a host runs as ``ip netns exec NS unshare --mount --uts --propagation private``: the host's network,
its own host name, and the shared folders bind-mounted at the host's own local paths, visible only inside (the
local paths are empty folders outside). ``Host.call`` runs a function on a thread that entered the host's network
namespace (setns(2) is per thread for network namespaces), so the test process itself can query PostgreSQL and
Redis on the database host.

``Network.close`` kills every process in each namespace (``ip netns pids``), deletes the namespaces (their veths go
with them) and removes the folders; namespaces left by a harness process that died are removed when the next one
starts. Needs root and ``ip netns`` (iproute2); ``unavailable()`` says why not.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import shlex
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

SUBNET = "10.231.22"  # a private /24 that exists only inside the namespaces made here
PREFIX = "nrn"  # namespace names: nrn<pid>-<host>, so a leftover is traced to the process that made it
CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and res.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: exit {res.returncode}: {res.stderr.strip()}")
    return res


def unavailable() -> str | None:
    """Why hosts cannot be made here, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (iproute2, util-linux)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    res = ip("netns", "add", probe, check=False)
    if res.returncode != 0:
        return f"`ip netns add` failed: {res.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


def namespaces() -> list[str]:
    return [line.split()[0] for line in ip("netns", "list").stdout.splitlines() if line.strip()]


def ns_pids(ns: str) -> list[int]:
    res = ip("netns", "pids", ns, check=False)
    return [int(p) for p in res.stdout.split()] if res.returncode == 0 else []


def kill_namespace(ns: str, timeout: float = 10.0) -> None:
    """SIGKILL every process in the namespace, until none is left."""
    deadline = time.monotonic() + timeout
    while pids := ns_pids(ns):
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"processes {pids} in namespace {ns} survived SIGKILL for {timeout} s")
        time.sleep(0.1)


def remove_leftovers() -> None:
    """Namespaces of a harness process that no longer runs (killed before its teardown)."""
    for ns in namespaces():
        owner = ns[len(PREFIX):].split("-", 1)[0]
        if ns.startswith(PREFIX) and owner.isdigit() and not Path(f"/proc/{owner}").exists():
            kill_namespace(ns)
            ip("netns", "del", ns, check=False)


class Host:
    """One namespace on the switch: an address, a host name, and local paths for the shared folders."""

    def __init__(self, network: Network, name: str, index: int, mounts: dict[Path, Path]):
        self.network, self.name = network, name
        self.ns = f"{network.tag}-{name}"
        self.port = f"p{index}"  # its bridge port in the switch namespace
        self.addr = f"{SUBNET}.{index}"
        self.mounts = mounts  # local path on this host -> the shared folder it shows
        self.procs: list[subprocess.Popen] = []
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None
        ip("netns", "add", self.ns)
        try:
            ip("link", "add", self.port, "netns", network.switch, "type", "veth", "peer", "name", "eth0", "netns",
               self.ns)
            ip("-n", network.switch, "link", "set", self.port, "master", "br0", "up")
            ip("-n", self.ns, "addr", "add", f"{self.addr}/24", "dev", "eth0")
            ip("-n", self.ns, "link", "set", "eth0", "up")
            ip("-n", self.ns, "link", "set", "lo", "up")
        except RuntimeError:
            ip("netns", "del", self.ns, check=False)  # its veth goes with it
            raise
        for local in mounts:
            local.mkdir(parents=True, exist_ok=True)

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` as run on this host: its network, its host name, its mounts."""
        steps = [f"hostname {shlex.quote(self.name)}"]
        steps += [f"mount --bind {shlex.quote(str(src))} {shlex.quote(str(local))}"
                  for local, src in self.mounts.items()]
        script = " && ".join(steps) + ' && exec "$@"'
        return ["ip", "netns", "exec", self.ns, "unshare", "--mount", "--uts", "--propagation", "private",
                "sh", "-c", script, "host", *argv]

    def spawn(self, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        with open(log, "ab") as out:
            proc = subprocess.Popen(self.command(argv), env=env, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        self.procs.append(proc)
        return proc

    def run(self, argv: list[str], env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(self.command(argv), env=env, capture_output=True, text=True, timeout=timeout)

    def cut(self) -> None:
        ip("-n", self.network.switch, "link", "set", self.port, "down")

    def heal(self) -> None:
        ip("-n", self.network.switch, "link", "set", self.port, "up")

    def block(self, port: int) -> None:
        """Drop every packet to or from TCP ``port`` on this host's link (an nftables table in its namespace): that
        server is unreachable from the other hosts, as if on a host of its own that was cut off, while the host's
        other servers stay reachable and its own processes still reach it."""
        rules = (f"table inet neuron_cut_{port} {{\n"
                 f"  chain i {{ type filter hook input priority 0; iifname \"eth0\" tcp dport {port} drop; }}\n"
                 f"  chain o {{ type filter hook output priority 0; oifname \"eth0\" tcp sport {port} drop; }}\n}}\n")
        res = subprocess.run(["ip", "netns", "exec", self.ns, "nft", "-f", "-"], input=rules, capture_output=True,
                             text=True)
        if res.returncode != 0:
            raise RuntimeError(f"nft in {self.ns}: {res.stderr.strip()}")

    def unblock(self, port: int) -> None:
        subprocess.run(["ip", "netns", "exec", self.ns, "nft", "delete", "table", "inet", f"neuron_cut_{port}"],
                       capture_output=True)

    def kill_all(self) -> None:
        """SIGKILL every process of the host, as a power cut would."""
        kill_namespace(self.ns)
        for proc in self.procs:
            proc.wait(timeout=10)
        self.procs.clear()

    def call(self, fn: Callable[..., T], *args, timeout: float = 60) -> T:
        """``fn(*args)`` on a thread inside this host's network namespace (sockets it opens belong to the host)."""
        if self._thread is None:
            self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=self.ns,
                                                                 initializer=_enter_netns, initargs=(self.ns,))
        return self._thread.submit(fn, *args).result(timeout)

    def wait_for_port(self, addr: str, port: int, timeout: float = 30) -> None:
        def probe() -> bool:
            with socket.socket() as s:
                s.settimeout(1)
                return s.connect_ex((addr, port)) == 0

        deadline = time.monotonic() + timeout
        while not self.call(probe):
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {addr}:{port} (seen from {self.name}) after {timeout} s")
            time.sleep(0.1)

    def close(self) -> None:
        if self._thread is not None:
            self._thread.shutdown(wait=False, cancel_futures=True)
        kill_namespace(self.ns)
        for proc in self.procs:
            proc.wait(timeout=10)
        ip("netns", "del", self.ns, check=False)


def _enter_netns(ns: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(f"/var/run/netns/{ns}", os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {ns}: {os.strerror(err)}")
    finally:
        os.close(fd)


class Network:
    """A switch namespace with a bridge, and the hosts on it. ``close`` removes all of it."""

    def __init__(self, root: Path):
        remove_leftovers()
        self.root = root
        self.tag = f"{PREFIX}{os.getpid()}"
        self.switch = f"{self.tag}-sw"
        self.hosts: dict[str, Host] = {}
        ip("netns", "add", self.switch)
        try:
            ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            ip("-n", self.switch, "link", "set", "br0", "up")
        except RuntimeError:
            ip("netns", "del", self.switch, check=False)
            raise

    def add(self, name: str, mounts: dict[Path, Path] | None = None) -> Host:
        host = Host(self, name, len(self.hosts) + 2, mounts or {})
        self.hosts[name] = host
        return host

    def close(self) -> None:
        errors = []
        for host in self.hosts.values():
            try:
                host.close()
            except Exception as exc:  # every host is still removed; the first error is raised after
                errors.append(exc)
        kill_namespace(self.switch)
        ip("netns", "del", self.switch, check=False)
        if errors:
            raise errors[0]
