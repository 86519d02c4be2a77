"""``neuron bench``: how close the whole pipeline comes to its bounds, measured in one run on one machine.

    synthetic archive (neuron.synthetic, cached) ─► model-only bound: the device job's model on device tensors
                                                 ─► decode-only bound: files to device tensors, the pipeline's readers
                                                 ─► end to end: files to committed rows and PNGs
                                                      embedded: worker.embedded.run_folder, fresh SQLite
                                                      celery:   neuron scan + one neuron worker, throwaway Redis and
                                                                PostgreSQL (neuron.servers)

One JSON object per (mode, archive) goes to ``<out>/<date>-<device>.json`` (a list; later runs of the same day and
device are appended to it) and, unless told not to, one row each to the ``neuron bench`` table in BENCHMARKS.md.

What each number is:
- ``model_only_images_per_s``: ``DeviceJob.model_job(route, x)`` on a prepared (N, C, S, S) batch already on the
  device, at the pipeline's batch size and precision; warmed up, CUDA synchronised around each call, the fastest call
  counted, measured before and again after the end-to-end runs (a bound: a busy shared CPU only ever makes a call
  slower).
- ``decode_images_per_s``: ``Pipeline.decode_only(items)`` over the whole archive, files in the page cache.
- ``end_to_end_images_per_s``: instances done / wall time. Embedded: the ``run_folder`` call (index, decode, infer,
  PNGs, commits); the models are loaded before the clock starts. Celery: from the start of ``neuron scan`` until the
  database says every instance is finished; the worker is started and ready (models loaded) before that.
- ``batch_fill``, ``time_to_first_batch_s``: embedded, from ``Pipeline.stats`` of a pipeline created just before the
  run (so the first batch is timed from the run's start, models already loaded). Celery, from the worker's log: the
  fill is the frames over (batches x batch size) summed over its "batch fill ..." lines (the last one is written when
  it stops); the time to first batch is the timestamp of its "first batch ran" line minus the scan's start, so it
  includes indexing the archive, which ``neuron scan`` finishes before it enqueues. Without those lines: fill null,
  and the first committed result (``instances.updated_at``) instead; ``stats_source`` says which.
- ``peak_rss_mb``: embedded, this process's peak (``getrusage``; it holds the model and the archive's decode bound
  too); Celery, the worker process's peak (``VmHWM``). ``peak_gpu_mb``: ``torch.cuda.max_memory_allocated`` over
  the mode (0 on CPU; null for a Celery worker on CUDA unless its stats line gives it).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from multiprocessing import forkserver
from pathlib import Path
from typing import Any

import torch

from db.store import Database
from neuron import servers, synthetic
from neuron.errors import ConfigError, SetupError
from neuron.settings import RUNTIMES, Settings, foreign_environment
from neuron.synthetic import default_workdir
from neuron.work import Route, WorkItem
from neuron_models.image import DecodedFrame
from neuron_models.preprocess import prepare_batch
from worker.bench_host import HostProbe, ShmWatch, TreeCpu, primed_job
from worker.decode import decode_instance
from worker.device import DeviceJob
from worker.embedded import run_folder
from worker.models import Models, default_readers
from worker.pipeline import Pipeline
from worker.readers import process_context

log = logging.getLogger(__name__)

ROUTE = Route.CHEST_XRAY
PRECISIONS = ("fp32", "bf16", "fp16")
REQUIRED_KEYS = ("device", "mode", "archive", "n_images", "batch_size", "precision", "model_only_images_per_s",
                 "decode_images_per_s", "end_to_end_images_per_s", "ratio", "batch_fill", "time_to_first_batch_s",
                 "peak_rss_mb", "peak_gpu_mb")
TABLE_HEADING = "## `neuron bench` results, by runtime"
TABLE_INTRO = ["Rows appended by `neuron bench` (synthetic CR archive, untrained weights, 5 TTA views, top-1 heatmap,",
               "rows committed). Ratio = end to end / model-only bound of the run's runtime; the other runtimes' "
               "bounds on the same batch after it; every field in `benchmarks/results/*.json`."]
TABLE_COLUMNS = ("date", "device", "mode", "archive", "images", "size", "batch", "precision", "runtime",
                 "model-only img/s", "other runtimes' bounds", "decode img/s", "end-to-end img/s", "ratio",
                 "batch fill", "first batch s", "load s", "peak RSS MB", "peak GPU MB")
HOST_TABLE_HEADING = "## `neuron bench --host-only` results"
HOST_TABLE_INTRO = ["Rows appended by `neuron bench --host-only`: the real pipeline with a device stage that answers "
                    "at once (`worker/bench_host.py`).", "CPU: user + system of every Neuron process of the run per "
                    "image, the driving process's own in brackets; GIL: held by the driving process per image "
                    "(py-spy `--gil --nonblocking`), its largest stages after it."]
HOST_TABLE_COLUMNS = ("date", "device", "mode", "archive", "images", "size", "batch", "dicom-out", "host-only img/s",
                      "CPU ms/img", "GIL ms/img", "GIL by stage ms/img", "peak RSS MB", "peak /dev/shm MB")


class Mode(str, Enum):
    EMBEDDED = "embedded"
    CELERY = "celery"


def repository_benchmarks_md() -> Path:
    return Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


@dataclass(frozen=True)
class BenchConfig:
    n: int = 256
    size: int = 2000
    device: str = "auto"
    batch_size: int | None = None
    precision: str = "fp32"
    runtime: str = "auto"  # what runs the network (neuron_models.runtime); the bound is also measured on the others
    archives: tuple[str, ...] = synthetic.FLAVOURS
    modes: tuple[Mode, ...] = (Mode.EMBEDDED, Mode.CELERY)
    out: Path = Path("benchmarks/results")
    workdir: Path = field(default_factory=default_workdir)
    append: bool = True
    benchmarks_md: Path = field(default_factory=repository_benchmarks_md)
    seed: int = 0
    concurrency: int | None = None  # Celery mode: studies in flight; None: the worker's default
    keep: bool = False
    host_only: bool = False  # the device stage answers at once: the host's side alone (worker.bench_host)
    dicom_out: bool = False  # also write the DICOM outputs (SR and secondary captures)

    def __post_init__(self) -> None:
        object.__setattr__(self, "modes", tuple(Mode(m) for m in self.modes))
        object.__setattr__(self, "archives", tuple(self.archives))
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "workdir", Path(self.workdir))
        if self.n < 1:
            raise ConfigError(f"--n {self.n}: the archive needs at least 1 image")
        if self.size < 64:
            raise ConfigError(f"--size {self.size}: use 64 or more (real CRs are about 2000)")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"--runtime {self.runtime!r} is not one of {', '.join(RUNTIMES)}")
        bad = [a for a in self.archives if a not in synthetic.FLAVOURS]
        if bad or not self.archives:
            raise ConfigError(f"--archives {','.join(self.archives)!r}: choose from {','.join(synthetic.FLAVOURS)}")
        if not self.modes:
            raise ConfigError("--modes is empty: choose embedded, celery or both")


# -- timing helpers ---------------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _best_rate(job: Callable[[], object], images_per_call: int, device: torch.device, min_seconds: float = 2.0,
               min_calls: int = 2, max_calls: int = 50) -> float:
    """Images per second of the fastest call of ``job``, after one warm-up call; at least ``min_calls`` calls and
    ``min_seconds`` in all."""
    job()
    _sync(device)
    best, calls, start = float("inf"), 0, time.perf_counter()
    while True:
        t = time.perf_counter()
        job()
        _sync(device)
        best = min(best, time.perf_counter() - t)
        calls += 1
        if calls >= max_calls or (calls >= min_calls and time.perf_counter() - start >= min_seconds):
            return images_per_call / best


def _warm_page_cache(paths: Sequence[Path]) -> None:
    for p in paths:
        with open(p, "rb") as fh:
            while fh.read(1 << 24):
                pass


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux


def _proc_peak_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        return None
    return None


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def machine_info(device: torch.device) -> dict[str, Any]:
    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "machine": platform.machine(),
            "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "cuda": torch.version.cuda if device.type == "cuda" else None}


# -- the bounds -------------------------------------------------------------------------------------------------------
def _items(archive: synthetic.Archive) -> list[WorkItem]:
    return [WorkItem(f"bench-{archive.flavour}-{i}", str(p), ROUTE, 1) for i, p in enumerate(archive.files)]


def _sample_frames(pipeline: Pipeline, archive: synthetic.Archive) -> list[DecodedFrame]:
    """One full batch of the archive's frames (cycled when the archive is smaller than a batch)."""
    files = archive.files[: pipeline.batch_size]
    decoded = [decode_instance(p, f"bench-{i}", 1, pipeline.settings.max_pixels)[0] for i, p in enumerate(files)]
    return [decoded[i % len(decoded)] for i in range(pipeline.batch_size)]


def model_only_bound(pipeline: Pipeline, frames: Sequence[DecodedFrame]) -> float:
    """The model job alone, on a batch prepared and left on the device beforehand."""
    x = prepare_batch(frames, pipeline.models.routes[ROUTE].preprocess, pipeline.device)[0]
    return _best_rate(lambda: pipeline.job.model_job(ROUTE, x), x.shape[0], pipeline.device)


def other_runtime_bounds(models: Models, pipeline: Pipeline, frames: Sequence[DecodedFrame], measured: str,
                         say: Callable[[str], None]) -> dict[str, float | None]:
    """The model-only bound of the same batch on each runtime the run did not use (torch eager beside ONNX Runtime
    and the other way round), each loaded the way screening would load it."""
    out: dict[str, float | None] = {}
    for name in ("torch", "onnxruntime"):
        if name == measured:
            continue
        try:
            other = Models.from_settings(models.settings.with_(runtime=name), only=[ROUTE])
        except SetupError as exc:  # onnxruntime without its CUDA provider, say
            say(f"model-only bound on {name}: not measured ({exc})")
            out[name] = None
            continue
        out[name] = _round(model_only_bound(Pipeline(other, pipeline.settings), frames), 2)
        say(f"model-only bound on {name}: {out[name]} img/s")
    return out


def decode_bound(pipeline: Pipeline, archive: synthetic.Archive) -> tuple[float, int]:
    """Images per second from files (in the page cache) to frames on the device, and the frames decoded."""
    _warm_page_cache(archive.files)
    start = time.perf_counter()
    frames = pipeline.decode_only(_items(archive))
    _sync(pipeline.device)
    return frames / (time.perf_counter() - start), frames


# -- end to end -------------------------------------------------------------------------------------------------------
@dataclass
class EndToEnd:
    images_per_s: float
    elapsed_s: float
    done: int
    heatmaps: int
    batch_fill: float | None
    time_to_first_batch_s: float | None
    stats_source: str
    peak_rss_mb: float | None
    peak_gpu_mb: float | None
    extra: dict[str, Any] = field(default_factory=dict)


def _count_pngs(folder: Path) -> int:
    return sum(1 for _ in folder.rglob("*.png")) if folder.is_dir() else 0


def _gpu_peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _gpu_peak_mb(device: torch.device) -> float:
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else 0.0


def run_embedded(models: Models, settings: Settings, archive: synthetic.Archive,
                 job: DeviceJob | None = None, samples: Path | None = None) -> EndToEnd:
    """``run_folder`` on a fresh SQLite database and output folder, with a new pipeline over the loaded models, so
    its stats (batch fill, time to first batch) count this run alone, from its start. ``job``: the device stage's
    job (the host-only mode's); the CPU and GIL of the run are measured around it (``HostProbe``, its py-spy
    samples kept at ``samples``)."""
    pipe = Pipeline(models, settings, clock_from=time.monotonic(), job=job)
    _gpu_peak_reset(pipe.device)
    # the database layer's one-off imports (the SQLite driver, the migrations: once per process, 0.1-0.2 s under the
    # readers' load) before the window, like the models' load: the window's figures are per image
    warm = Database("sqlite://")
    warm.create()
    warm.dispose()
    # and the readers' forkserver, which imports the readers' and the ledger's modules once per process (0.7 s of
    # CPU): a worker starts it before it consumes, so the Celery mode's window does not hold it either
    if process_context().get_start_method() == "forkserver":
        forkserver.ensure_running()
    with HostProbe(os.getpid(), samples=samples) as probe, ShmWatch() as shm:
        start = time.perf_counter()
        report = run_folder(archive.root, settings, pipeline=pipe)
        _sync(pipe.device)
        elapsed = time.perf_counter() - start
    done = report.summary.files.get("done", 0)
    return EndToEnd(done / elapsed, elapsed, done, _count_pngs(settings.heatmap_dir), pipe.stats.fill,
                    pipe.stats.time_to_first_batch_s, "pipeline.stats", _peak_rss_mb(), _gpu_peak_mb(pipe.device),
                    {**probe.per_image(done), "peak_shm_mb": shm.peak_mb})


FILL_LINE = re.compile(r"batch fill [^:]*: (\d+) batches, (\d+) frames, mean fill [\d.]+% of (\d+)")
FIRST_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): [^\]]*\] first batch ran")
FLIGHT_LINE = re.compile(r"(\d+) studies in flight")


@dataclass(frozen=True)
class WorkerLog:
    """What ``neuron worker`` logs about its batches (worker/service.py's FillReport)."""

    batches: int = 0
    frames: int = 0
    batch_size: int | None = None
    first_batch_at: datetime | None = None  # local time, as Celery's log writes it
    concurrency: int | None = None

    @property
    def fill(self) -> float | None:
        return self.frames / (self.batches * self.batch_size) if self.batches and self.batch_size else None


def parse_worker_log(text: str) -> WorkerLog:
    batches = frames = 0
    batch_size = concurrency = None
    first = None
    for line in text.splitlines():
        if m := FILL_LINE.search(line):
            batches, frames, batch_size = batches + int(m[1]), frames + int(m[2]), int(m[3])
        elif first is None and (m := FIRST_LINE.search(line)):
            first = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f")
        elif concurrency is None and (m := FLIGHT_LINE.search(line)):
            concurrency = int(m[1])
    return WorkerLog(batches, frames, batch_size, first, concurrency)


def celery_environment(run_dir: Path, broker_url: str, pg_url: str, readers: int | None = None,
                       dicom_out: Path | None = None) -> dict[str, str]:
    """The environment of the benchmark's ``neuron scan`` and worker processes: this one's without any stray
    ``NEURON_*`` variable, the throwaway servers, and the run's own output and temporary folders."""
    (run_dir / "tmp").mkdir(parents=True, exist_ok=True)
    env = {**foreign_environment(), "NEURON_BROKER_URL": broker_url, "NEURON_DATABASE_URL": pg_url,
           "NEURON_OUT": str(run_dir / "out"), "TMPDIR": str(run_dir / "tmp"), "PYTHONUNBUFFERED": "1",
           "COLUMNS": "200"}
    if dicom_out is not None:
        env["NEURON_DICOM_OUT"] = str(dicom_out)
    if readers is not None:
        env["NEURON_READERS"] = str(readers)
    return env


def host_only_worker_command(prime: Path, device: str, batch_size: int, concurrency: int | None = None,
                             queues: str = ROUTE.value) -> list[str]:
    """A ``neuron worker`` whose device stage answers at once (``worker.bench_host``'s own entry point).

    Started with ``-c``, not ``-m worker.bench_host``: a forkserver or spawn child first runs the parent's main module
    again (multiprocessing.spawn.prepare: ``init_main_from_name``, skipped only for a ``__main__`` module, and
    ``init_main_from_path``), so each reader process of a ``-m worker.bench_host`` worker imported torch and the whole
    engine: seconds of CPU and of start-up per reader that ``neuron worker`` (its main is the ``neuron`` script) does
    not pay. ``-c`` leaves the children nothing to import."""
    cmd = [sys.executable, "-c", "import sys; from worker.bench_host import main; main(sys.argv[1:])", "--prime",
           str(prime), "--device", device, "--batch-size", str(batch_size), "--queues", queues]
    return cmd + (["--concurrency", str(concurrency)] if concurrency is not None else [])


def start_worker(cmd: Sequence[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """The worker in a session of its own (``stop_worker`` signals its whole group), its output to ``log_path``."""
    with open(log_path, "w") as log_file:
        return subprocess.Popen(list(cmd), env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop_worker(proc: subprocess.Popen) -> None:
    """A warm shutdown (SIGTERM to the worker's group), SIGKILL after a minute."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, proc: subprocess.Popen, log_path: Path,
             poll: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-3000:]
            raise SetupError(f"the Celery worker exited with {proc.returncode} while waiting for {what}; "
                             f"its log ({log_path}) ends:\n{tail}")
        time.sleep(poll)
    raise SetupError(f"timed out after {timeout:.0f} s waiting for {what}; see {log_path}")


def wait_until_ready(proc: subprocess.Popen, log_path: Path, timeout: float = 900) -> None:
    """Until Celery logs `` ready.`` (models loaded, consuming)."""
    wait_for(lambda: " ready." in log_path.read_text(errors="replace"), timeout, "the worker to be ready", proc,
             log_path, poll=0.5)


def run_celery(cfg: BenchConfig, pipeline: Pipeline, archive: synthetic.Archive, run_dir: Path, broker_url: str,
               pg_url: str, servers_pids: dict[str, int] | None = None) -> EndToEnd:
    """The worker's rate with ``neuron scan`` enqueueing as it indexes; besides the worker's CPU and GIL (``HostProbe``)
    the CPU the scan and the servers (``servers_pids``: name -> process id; a server's children count) spent on the
    same machine in the window, since on one host they share its cores with the worker."""
    import redis
    from sqlalchemy import create_engine, text

    servers.reset_postgres(pg_url)
    redis.Redis.from_url(broker_url).flushall()
    env = celery_environment(run_dir, broker_url, pg_url, pipeline.settings.readers,
                             run_dir / "dicom" if cfg.dicom_out else None)
    neuron = [sys.executable, "-m", "neuron"]
    worker_cmd = [*neuron, "worker", "--device", str(pipeline.device), "--weights", "untrained", "--batch-size",
                  str(pipeline.batch_size), "--queues", ROUTE.value, "--loglevel", "INFO", "--precision",
                  cfg.precision, "--runtime", cfg.runtime]
    if cfg.concurrency is not None:
        worker_cmd += ["--concurrency", str(cfg.concurrency)]
    if cfg.host_only:
        worker_cmd = host_only_worker_command(archive.files[0], str(pipeline.device), pipeline.batch_size,
                                              cfg.concurrency)
    log_path = run_dir / "worker.log"
    db = Database(pg_url)
    t_worker = time.perf_counter()
    proc = start_worker(worker_cmd, env, log_path)
    try:
        wait_until_ready(proc, log_path)
        ready_s = time.perf_counter() - t_worker
        scan_started, scan_started_local = datetime.now(UTC), datetime.now()
        beside = {name: TreeCpu(pid) for name, pid in (servers_pids or {}).items()}
        for watch in beside.values():
            watch.start()
        waited = resource.getrusage(resource.RUSAGE_CHILDREN)
        with HostProbe(proc.pid, main="celery", samples=run_dir / "gil-samples.txt" if cfg.keep else None) as probe, \
                ShmWatch() as shm:
            start = time.perf_counter()
            scan = subprocess.run([*neuron, "scan", str(archive.root)], env=env, capture_output=True, text=True,
                                  timeout=3600)
            if scan.returncode != 0:
                raise SetupError(f"neuron scan failed ({scan.returncode}): {scan.stderr[-2000:]}")
            scan_s = time.perf_counter() - start
            after_scan = resource.getrusage(resource.RUSAGE_CHILDREN)

            def finished() -> bool:
                counts = db.instance_statuses()
                return sum(counts.get(s, 0) for s in ("done", "failed", "skipped")) >= archive.n_images

            wait_for(finished, max(600.0, 10.0 * archive.n_images), "every instance to finish", proc, log_path)
            elapsed = time.perf_counter() - start
        cpu_beside = {name: sum(watch.stop().values()) for name, watch in beside.items()}
        cpu_beside["scan"] = (after_scan.ru_utime + after_scan.ru_stime) - (waited.ru_utime + waited.ru_stime)
        rss = _proc_peak_rss_mb(proc.pid)
    finally:
        stop_worker(proc)
    done = db.instance_statuses().get("done", 0)
    db.dispose()
    sa = create_engine(pg_url)
    try:
        with sa.connect() as conn:
            first_done = conn.execute(text("select min(updated_at) from instances where status = 'done'")).scalar()
    finally:
        sa.dispose()
    wlog = parse_worker_log(log_path.read_text(errors="replace"))
    fill, ttfb, source = wlog.fill, None, "worker log"
    if wlog.first_batch_at is not None:
        ttfb = (wlog.first_batch_at - scan_started_local).total_seconds()
    elif first_done is not None:
        first_done = first_done if first_done.tzinfo else first_done.replace(tzinfo=UTC)
        ttfb, source = (first_done - scan_started).total_seconds(), "database (first committed result)"
    if fill is None:
        source += "; no batch fill lines in the worker log"
    gpu = 0.0 if pipeline.device.type == "cpu" else None  # the worker's CUDA peak is not visible from here
    return EndToEnd(done / elapsed, elapsed, done, _count_pngs(run_dir / "out" / "heatmaps"), fill, ttfb, source,
                    rss, gpu, {"worker_ready_s": round(ready_s, 2), "scan_s": round(scan_s, 2),
                               "concurrency": wlog.concurrency or cfg.concurrency, "worker_batches": wlog.batches,
                               **probe.per_image(done), "peak_shm_mb": shm.peak_mb,
                               "cpu_ms_per_image_beside_worker": {k: round(v * 1000 / max(done, 1), 3)
                                                                  for k, v in sorted(cpu_beside.items())}})


# -- the whole run ----------------------------------------------------------------------------------------------------
def _round(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(float(x), digits)


def run_bench(cfg: BenchConfig, models: Models | None = None, say: Callable[[str], None] = print) -> list[dict]:
    """Generate (or reuse) the archives, measure every requested (mode, archive), write the JSON and, if asked, the
    BENCHMARKS.md rows. ``models`` may be already loaded untrained models (tests); they are reused."""
    # host-only stands in for a GPU box's host, whose cores are all the readers' (worker.models.default_readers)
    readers = default_readers(torch.device("cuda")) if cfg.host_only else None
    base = Settings(weights="untrained", device=cfg.device, batch_size=cfg.batch_size, precision=cfg.precision,
                    readers=readers, runtime=cfg.runtime)
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    run_root = cfg.workdir / "runs" / f"{datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}"
    run_root.mkdir(parents=True)
    try:
        t = time.perf_counter()
        archives = synthetic.ensure_archives(cfg.workdir / "archives", cfg.n, cfg.size, cfg.seed, cfg.archives,
                                             workers=os.cpu_count() or 1)
        say(f"archives ready in {time.perf_counter() - t:.1f} s: " +
            ", ".join(f"{a.flavour} {a.n_images} images in {a.studies} studies ({a.root})" for a in archives.values()))
        load_s = None
        if models is None:
            t = time.perf_counter()
            models = Models.from_settings(base.with_(out_dir=run_root / "engine"), only=[ROUTE])
            load_s = time.perf_counter() - t
            say(f"models loaded on {models.device} in {load_s:.1f} s")
        pipeline = Pipeline(models, models.settings.with_(batch_size=cfg.batch_size))
        name = device_name(pipeline.device)
        first = archives[cfg.archives[0]]
        job = primed_job(models, pipeline.batch_size, first.files[0]) if cfg.host_only else None
        sample = _sample_frames(pipeline, first)
        runtime = models.routes[ROUTE].spec.runtime or {"name": "torch"}
        # the host-only mode's device stage answers at once: a model bound (minutes at its batch size on a CPU) says
        # nothing about it, and its ratio would compare the host with a network it does not run
        model = None if cfg.host_only else model_only_bound(pipeline, sample)
        if model is not None:
            say(f"model-only bound: {model:.1f} img/s ({runtime['name']})")
        celery_ok = Mode.CELERY in cfg.modes and servers.redis_available() and servers.postgres_available()
        if Mode.CELERY in cfg.modes and not celery_ok:
            say("celery mode skipped: redis-server and PostgreSQL (initdb, pg_ctl) must both be installed")
        runs: list[tuple[Mode, str, EndToEnd, datetime]] = []
        common: dict[str, Any] = {"device": name, "device_type": pipeline.device.type,
                  "batch_size": pipeline.batch_size, "readers": pipeline.readers_n, "precision": cfg.precision,
                  "precision_applied": True,
                  "model_only_images_per_s": _round(model, 2), "runtime": runtime,
                  "runtime_startup": models.routes[ROUTE].startup,
                  "image_size": cfg.size, "seed": cfg.seed, "weights": "untrained", "tta": pipeline.settings.tta,
                  "heatmap_top_k": pipeline.settings.heatmap_top_k,
                  "model_load_s": _round(load_s, 2), "machine": machine_info(pipeline.device)}
        decode: dict[str, tuple[float, int]] = {}
        for flavour, archive in archives.items():
            decode[flavour] = decode_bound(pipeline, archive)
            say(f"decode-only bound, {flavour}: {decode[flavour][0]:.1f} img/s ({decode[flavour][1]} frames)")
        todo = [(m, f) for m in cfg.modes for f in cfg.archives if m is Mode.EMBEDDED or celery_ok]
        with ExitStack() as stack:
            broker = stack.enter_context(servers.redis_server(parent=run_root)) if celery_ok else None
            pg = stack.enter_context(servers.postgres_server(parent=run_root)) if celery_ok else None
            for mode, flavour in todo:
                archive, run_dir = archives[flavour], run_root / f"{mode.value}-{flavour}"
                run_dir.mkdir()
                if mode is Mode.EMBEDDED:
                    settings = pipeline.settings.with_(out_dir=run_dir / "out", database_url=None,
                                                       batch_size=pipeline.batch_size,
                                                       dicom_out=run_dir / "dicom" if cfg.dicom_out else None)
                    e2e = run_embedded(models, settings, archive, job,
                                       samples=run_dir / "gil-samples.txt" if cfg.keep else None)
                else:
                    assert broker is not None and pg is not None
                    e2e = run_celery(cfg, pipeline, archive, run_dir, broker.url, pg.url,
                                     {"redis": broker.proc.pid, "postgresql": pg.pid})
                say(f"{mode.value}, {flavour}: {e2e.images_per_s:.2f} img/s end to end ({e2e.done}/"
                    f"{archive.n_images} done in {e2e.elapsed_s:.1f} s)")
                runs.append((mode, flavour, e2e, datetime.now().astimezone()))
        if model is not None:
            model = max(model, model_only_bound(pipeline, sample))
            say(f"model-only bound, best of before and after: {model:.1f} img/s")
            common["model_only_images_per_s"] = _round(model, 2)
            common["model_only_by_runtime"] = {runtime["name"]: _round(model, 2),
                                               **other_runtime_bounds(models, pipeline, sample, runtime["name"], say)}
        results = []
        for mode, flavour, e2e, now in runs:
            archive = archives[flavour]
            results.append({
                **common, "mode": mode.value, "archive": flavour, "n_images": archive.n_images,
                "studies": archive.studies, "archive_encoder": archive.encoder,
                "decode_images_per_s": _round(decode[flavour][0], 2), "decoded_frames": decode[flavour][1],
                "end_to_end_images_per_s": _round(e2e.images_per_s, 3),
                "ratio": None if model is None else _round(e2e.images_per_s / model, 3),
                "batch_fill": _round(e2e.batch_fill), "time_to_first_batch_s": _round(e2e.time_to_first_batch_s),
                "stats_source": e2e.stats_source, "peak_rss_mb": e2e.peak_rss_mb, "peak_gpu_mb": e2e.peak_gpu_mb,
                "instances_done": e2e.done, "heatmaps_written": e2e.heatmaps, "elapsed_s": _round(e2e.elapsed_s, 2),
                "host_only": cfg.host_only, "dicom_out": cfg.dicom_out,
                "host_only_images_per_s": _round(e2e.images_per_s, 3) if cfg.host_only else None,
                **e2e.extra, "date": now.date().isoformat(), "timestamp": now.isoformat(timespec="seconds")})
        path = write_json(cfg.out, results, name)
        say(f"results: {path}")
        if cfg.append:
            append_rows(cfg.benchmarks_md, results, host_only=cfg.host_only)
            say(f"rows appended to {cfg.benchmarks_md}")
        return results
    finally:
        if not cfg.keep:
            shutil.rmtree(run_root, ignore_errors=True)


# -- output -----------------------------------------------------------------------------------------------------------
def write_json(out: Path, results: list[dict], name: str) -> Path:
    """``<out>/<date>-<device>.json``; another run on the same day and device adds its objects to the list."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{datetime.now().astimezone():%Y-%m-%d}-{device_slug(name)}.json"
    previous = json.loads(path.read_text()) if path.is_file() else []
    path.write_text(json.dumps([*previous, *results], indent=2) + "\n")
    return path


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0:
            return "0"
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


def table_row(r: dict) -> str:
    runtime = (r.get("runtime") or {}).get("name", "torch")
    others = ", ".join(f"{k} {_cell(v)}" for k, v in (r.get("model_only_by_runtime") or {}).items() if k != runtime)
    cells = [r["date"], r["device"], r["mode"], r["archive"], r["n_images"], r["image_size"], r["batch_size"],
             r["precision"], runtime, r["model_only_images_per_s"], others or None, r["decode_images_per_s"],
             r["end_to_end_images_per_s"], r["ratio"], r["batch_fill"], r["time_to_first_batch_s"],
             r.get("model_load_s"), r["peak_rss_mb"], r["peak_gpu_mb"]]
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def host_table_row(r: dict) -> str:
    stages = sorted((r.get("gil_ms_per_image_by_stage") or {}).items(), key=lambda kv: -kv[1])[:4]
    split = ", ".join(f"{k} {v:.2f}" for k, v in stages) or "-"
    driver = (r.get("cpu_ms_per_image_by_process") or {}).get("driver")
    cpu = r.get("cpu_ms_per_image") if driver is None else f"{r.get('cpu_ms_per_image')} ({driver})"
    cells = [r["date"], r["device"], r["mode"], r["archive"], r["n_images"], r["image_size"], r["batch_size"],
             "yes" if r.get("dicom_out") else "no", r["host_only_images_per_s"], cpu,
             r.get("gil_ms_per_image"), split, r["peak_rss_mb"], r.get("peak_shm_mb")]
    return "| " + " | ".join(_cell(c) for c in cells) + " |"


def append_rows(md: Path, results: list[dict], host_only: bool = False) -> None:
    """Add one row per result to the table under its heading (after its last row), creating the heading and the
    table once: at the end of the file, or below the heading if someone wrote the heading without a table."""
    heading, intro, columns, row = ((HOST_TABLE_HEADING, HOST_TABLE_INTRO, HOST_TABLE_COLUMNS, host_table_row)
                                    if host_only else (TABLE_HEADING, TABLE_INTRO, TABLE_COLUMNS, table_row))
    lines = md.read_text().splitlines() if md.is_file() else []
    rows = [row(r) for r in results]
    header = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    if heading not in lines:
        lines += [*([""] if lines else []), heading, "", *intro, "", *header, *rows]
    else:
        start = lines.index(heading) + 1
        end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
        table = [i for i in range(start, end) if lines[i].startswith("|")]
        if table:
            lines[table[-1] + 1:table[-1] + 1] = rows
        else:
            at = end
            while at > start and not lines[at - 1].strip():
                at -= 1
            lines[at:at] = ["", *header, *rows, *([""] if at < len(lines) else [])]
    md.write_text("\n".join(lines) + "\n")
