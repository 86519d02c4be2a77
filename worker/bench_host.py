"""``neuron bench --host-only``: the host's side of the pipeline alone, and what it costs in CPU and in GIL time.

    the real pipeline (walk + index, readers, batcher, stager, results, PNG pool, result writer)
        with its device stage answering at once (``InstantDeviceJob``: outputs of the real job's shapes and dtypes,
        computed once on a real batch of the archive, so the PNGs encode real overlays)
        measured by ``HostProbe``: CPU (user + system) of every process of the run, and the time the driving process
        holds the GIL, sampled by py-spy (``record --gil --nonblocking``) over the screening window

The mode exists only inside the benchmark: no setting or command-line option of ``neuron run`` or ``neuron worker``
selects it. The Celery mode's worker runs it through this module's own entry point (``python -m worker.bench_host``).
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from neuron.settings import Settings
from neuron.work import Route
from neuron_models.image import DecodedFrame
from neuron_models.preprocess import Prepared
from neuron_models.staging import StagedBatch
from worker.decode import decode_instance
from worker.device import Chunk, DeviceJob, ModelOutput
from worker.models import Models, default_batch_size

SAMPLE_RATE_HZ = 250


class InstantDeviceJob(DeviceJob):
    """A device stage that takes no time: every batch gets, at once, the outputs the real job gave for one primed
    batch (mean, std, order, uint8 overlays, and the out-of-distribution scores when the route has a reference;
    nothing rejected), as views of the same tensors: no model, no preprocessing, no copy. ``prime`` runs the real job
    once per route before the clock starts."""

    def __init__(self, models: Models, top_k: int | None = None, batch_size: int | None = None):
        super().__init__(models, top_k)
        self.batch_size = batch_size or models.settings.batch_size or default_batch_size(models.device)
        self._ready: dict[Route, ModelOutput] = {}

    def prime(self, route: Route, frames: Sequence[DecodedFrame]) -> None:
        """The real job's outputs for a full batch made of ``frames`` (cycled)."""
        batch = [frames[i % len(frames)] for i in range(self.batch_size)]
        chunks = super().run(route, batch)
        ood = None if chunks[0][2].ood is None else torch.cat([c[2].ood for c in chunks])  # a route with a reference
        self._ready[route] = ModelOutput(*(torch.cat([getattr(c[2], name) for c in chunks]) for name in
                                           ("mean", "std", "order", "maps", "overlays")), ood=ood)

    def run(self, route: Route, frames: Sequence[DecodedFrame], staged: StagedBatch | None = None,
            uploaded: torch.Tensor | None = None) -> list[Chunk]:
        if route not in self._ready:
            self.prime(route, frames)
        ready, n = self._ready[route], len(frames)
        if n > ready.mean.shape[0]:  # a batch larger than the primed one: answered in primed-size chunks
            step = ready.mean.shape[0]
            return [c for start in range(0, n, step) for c in self.run(route, frames[start:start + step], None)]
        photometric = staged.photometric if staged is not None else tuple(f.params.photometric for f in frames)
        prepared = Prepared(torch.empty(0), torch.zeros(n, dtype=torch.bool), torch.zeros(n), photometric)
        return [(frames, prepared, ModelOutput(ready.mean[:n], ready.std[:n], ready.order[:n], ready.maps[:n],
                                               ready.overlays[:n],
                                               ood=None if ready.ood is None else ready.ood[:n]))]


def primed_job(models: Models, batch_size: int, sample: Path, route: Route = Route.CHEST_XRAY) -> InstantDeviceJob:
    job = InstantDeviceJob(models, batch_size=batch_size)
    job.prime(route, decode_instance(sample, "bench-sample", 1, models.settings.max_pixels))
    return job


# -- measuring ----------------------------------------------------------------------------------------------------
_TICKS = os.sysconf("SC_CLK_TCK")
# the probe's own threads (``ShmWatch``, ``TreeCpu``) run in the embedded mode's driving process: their GIL time is
# the measurement's, not the run's, and is kept apart
PROBE = "probe"
# py-spy --threads prefixes each stack with "thread (ID): NAME"; the pipeline names its stage threads
# (a worker runs the pipeline's own loop on the StudyBatcher's "engine" thread, and Celery's consumer on MainThread)
_STAGES = (("shm-watch", PROBE), ("cpu-watch", PROBE),
           ("engine-feed", "feed"), ("engine-batch", "batcher"), ("engine-stage", "stager"),
           ("engine-device", "device"), ("engine-results", "results"), ("engine", "sink"), ("flow", "claims"),
           ("read", "readers"), ("png", "png"), ("result-writer", "writer"), ("indexer", "indexing"),
           ("MainThread", "sink"))
_LINE = re.compile(r"^thread \(\d+\): ([^;]*);.* (\d+)$")


def _proc_stat(pid: int) -> tuple[int, float, str] | None:
    """(parent pid, user + system seconds, name) of a live process, or None. The name is the kernel's (``comm``):
    reader processes and the ledger name themselves (``worker.readers.name_process``)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICKS, raw[raw.index("(") + 1:raw.rindex(")")]


def _tree_stats(root: int) -> dict[int, tuple[int, float, str]]:
    """(parent, user + system seconds, name) of ``root`` and every live process below it (readers are
    grandchildren: the forkserver starts them)."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (st := _proc_stat(int(entry))) is not None:
            stats[int(entry)] = st
    tree, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in stats:
            tree[pid] = stats[pid]
            todo += [child for child, (parent, _, _) in stats.items() if parent == pid]
    return tree


# what a process of the run is, by the name it gave itself
_ROLES = {"neuron-reader": "readers", "neuron-ledger": "ledger"}


class TreeCpu:
    """CPU seconds (user + system) of ``root`` and every process below it over a window, by role: ``driver`` (``root``
    itself), ``readers``, ``ledger`` and ``other`` (the forkserver, a worker's pool). The tree is read every
    ``every`` seconds, so a process that ends inside the window (the embedded run's ledger ends with the run) counts
    up to its last reading; ``exclude`` names processes that are not the run's (the GIL sampler)."""

    def __init__(self, root: int, every: float = 1.0):
        self.root, self.every = root, every
        self.exclude: set[int] = set()
        self._start: dict[int, float] = {}
        self._last: dict[int, tuple[float, str]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read(self) -> None:
        for pid, (_, cpu, name) in _tree_stats(self.root).items():
            if pid not in self.exclude:
                self._last[pid] = (cpu, name)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self._read()

    def start(self) -> None:
        self._read()
        self._start = {pid: cpu for pid, (cpu, _) in self._last.items()}
        self._thread = threading.Thread(target=self._loop, name="cpu-watch", daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, float]:
        """Seconds by role, over the window."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._read()
        roles: dict[str, float] = {}
        for pid, (cpu, name) in self._last.items():
            role = "driver" if pid == self.root else _ROLES.get(name, "other")
            roles[role] = roles.get(role, 0.0) + cpu - self._start.get(pid, 0.0)
        return roles


def stage_of(thread_name: str, main: str = "sink") -> str:
    for prefix, stage in _STAGES:
        if thread_name.startswith(prefix):
            return main if prefix == "MainThread" else stage
    return "other"


def parse_gil_samples(raw: str, main: str = "sink") -> Counter[str]:
    """Samples per pipeline stage in py-spy's raw (collapsed) output recorded with ``--threads``; ``main`` names
    what the main thread does (the embedded run's sink; a worker's Celery consumer)."""
    counts: Counter[str] = Counter()
    for line in raw.splitlines():
        if m := _LINE.match(line.strip()):
            counts[stage_of(m[1], main)] += int(m[2])
    return counts


@dataclass
class HostProbe:
    """CPU of the run's processes and GIL time of the driving process over a window (a ``with`` block).

    ``driver``: the process that drives the device (this one for the embedded mode, the worker for Celery); its CPU
    and that of every process below it, by role (``TreeCpu``), plus (for this process) the children that ended and
    were waited for inside the window. ``samples``: where to keep py-spy's raw samples (``neuron bench
    --keep``), for a look at which functions hold the GIL (``py-spy``'s collapsed stacks, one per line)."""

    driver: int
    main: str = "sink"  # what the driver's main thread is: the embedded run's sink, or a worker's Celery consumer
    samples: Path | None = None
    rate: int = SAMPLE_RATE_HZ
    cpu_s: float = 0.0
    cpu_by_role: dict[str, float] = field(default_factory=dict)
    gil_s: float | None = None
    gil_probe_s: float = 0.0  # the probe's own threads' (ShmWatch, TreeCpu), when they run in the driver: not counted
    gil_by_stage: dict[str, float] = field(default_factory=dict)
    note: str | None = None
    _spy: subprocess.Popen | None = None
    _out: Path | None = None
    _cpu: TreeCpu | None = None

    def _waited_children_s(self) -> float:
        """CPU of this process's children that ended and were waited for (when the driver is this process)."""
        if self.driver != os.getpid():
            return 0.0
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return children.ru_utime + children.ru_stime

    def __enter__(self) -> HostProbe:
        spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if Path(spy).exists():
            self._out = self.samples or Path(tempfile.mkstemp(prefix="neuron-gil-", suffix=".txt")[1])
            self._spy = subprocess.Popen([spy, "record", "--pid", str(self.driver), "--gil", "--nonblocking",
                                          "--threads", "--rate", str(self.rate), "--format", "raw", "--output",
                                          str(self._out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                         text=True)
            time.sleep(0.3)  # py-spy attaches
        else:
            self.note = "py-spy is not installed (pip install py-spy): no GIL figures"
        self._cpu = TreeCpu(self.driver)
        if self._spy is not None:  # a child of this process in the embedded mode: its sampling is not the run's CPU
            self._cpu.exclude.add(self._spy.pid)
        self._waited0 = self._waited_children_s()
        self._cpu.start()
        return self

    def __exit__(self, *exc) -> None:
        roles = self._cpu.stop()
        waited = self._waited_children_s() - self._waited0
        if waited:
            roles["other"] = roles.get("other", 0.0) + waited
        self.cpu_by_role = dict(sorted(roles.items()))
        self.cpu_s = sum(roles.values())
        if self._spy is None:
            return
        self._spy.send_signal(signal.SIGINT)
        try:
            _, err = self._spy.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self._spy.kill()
            _, err = self._spy.communicate()
        raw = self._out.read_text() if self._out and self._out.exists() else ""
        if self._out and self.samples is None:
            self._out.unlink(missing_ok=True)
        if not raw.strip():
            self.note = f"py-spy recorded nothing ({(err or '').strip()[-300:]})"
            return
        by_stage = parse_gil_samples(raw, self.main)
        self.gil_probe_s = by_stage.pop(PROBE, 0) / self.rate
        self.gil_by_stage = {k: v / self.rate for k, v in sorted(by_stage.items())}
        self.gil_s = sum(self.gil_by_stage.values())

    def per_image(self, images: int) -> dict:
        """The probe's figures per image, in milliseconds, for the benchmark's JSON."""
        per = 1000.0 / max(images, 1)
        return {"cpu_ms_per_image": round(self.cpu_s * per, 3),
                "cpu_ms_per_image_by_process": {k: round(v * per, 3) for k, v in self.cpu_by_role.items()},
                "gil_ms_per_image": None if self.gil_s is None else round(self.gil_s * per, 3),
                "gil_ms_per_image_by_stage": {k: round(v * per, 3) for k, v in self.gil_by_stage.items()},
                "gil_ms_per_image_of_the_probe": round(self.gil_probe_s * per, 3),
                "host_probe_note": self.note}


class ShmWatch:
    """The peak of ``/dev/shm``'s use above its level at the start, sampled every 50 ms while the block runs."""

    def __init__(self, path: str = "/dev/shm", every: float = 0.05):
        self.path, self.every = path, every
        self.peak_mb: float | None = None
        self._stop = threading.Event()

    def _used(self) -> int:
        return shutil.disk_usage(self.path).used

    def _sample(self) -> None:
        while not self._stop.wait(self.every):
            self._peak = max(self._peak, self._used())

    def __enter__(self) -> ShmWatch:
        if not os.path.isdir(self.path):
            return self
        self._base = self._peak = self._used()
        self._thread = threading.Thread(target=self._sample, name="shm-watch", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if not os.path.isdir(self.path):
            return
        self._stop.set()
        self._thread.join()
        self.peak_mb = round(max(0, max(self._peak, self._used()) - self._base) / 2**20, 1)


# -- the Celery mode's worker ---------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> None:
    """``python -m worker.bench_host --prime FILE --queues chest-xray [worker settings...]``: a ``neuron worker``
    whose device stage is an ``InstantDeviceJob``, for the benchmark's Celery host-only mode only."""
    from worker.service import run_worker

    ap = argparse.ArgumentParser(prog="python -m worker.bench_host")
    ap.add_argument("--prime", type=Path, required=True, help="a file of the archive: its outputs answer every batch")
    ap.add_argument("--queues", default=Route.CHEST_XRAY.value)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--concurrency", type=int, default=None)
    ap.add_argument("--loglevel", default="INFO")
    args = ap.parse_args(argv)
    settings = Settings.from_env(weights="untrained", device=args.device, batch_size=args.batch_size)
    queues = [q for q in args.queues.split(",") if q]

    def job(models: Models) -> DeviceJob:
        return primed_job(models, settings.batch_size or default_batch_size(models.device), args.prime)

    run_worker(settings, queues, args.concurrency, args.loglevel, job=job)


if __name__ == "__main__":  # pragma: no cover - the benchmark starts it as a process
    main()
