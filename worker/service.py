"""The distributed worker: a Celery worker whose studies are handed to one shared pipeline without a thread each.

    Celery consumer ──(worker.flow.screening_strategy)──► StudyFlow: claims ──► StudyBatcher queue ──► Pipeline.run
           ▲                                                                  (one thread; frames of all studies
           │                                                                   batched together)
           └── ack ◄── commit callback ◄── ResultWriter: one thread, group commits ◄── Future per study ◄──┘

Why not celery-batches: 0.11 pins celery<5.7 and acknowledges messages when they are buffered, so a crash loses the
buffered batch. Here a study's message is acknowledged from the callback of the commit that holds its results
(``worker.flow``), so a killed worker's messages are redelivered. A retried study runs the older way: a Celery pool
thread (``ScreeningTask.screen``) waits for its results and its commit, then returns (``acks_late``).

Studies in flight are sized to fill batches: a batch of 128 from 1-image studies needs 128 studies in flight, and
several batches' worth keeps the next batch filling while one runs (``default_concurrency``); Celery's prefetch
follows it. The models are loaded once per process, before the worker consumes; nothing forks, so CUDA is safe. The
task is module-level (``screen_study``) and thin; its payload is named and versioned (``neuron.queue.ScreenStudy``);
the process's caches live on the task instance (``ScreeningTask``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

from celery import Task, shared_task, signals

from db.store import Database
from db.writer import ResultWriter
from neuron.errors import RetryableError
from neuron.queue import (
    SCREEN_STUDY,
    Heartbeat,
    ScreenStudy,
    default_worker_name,
    make_app,
    mask_url,
    node_name,
    queue_for,
    register_info_command,
    take_turn,
)
from neuron.settings import Settings
from neuron.work import Outcome, Route, WorkItem
from producer.enqueue import send_lost
from worker import metrics
from worker.device import DeviceJob
from worker.flow import DrainStudies, StudyFlow
from worker.ledger import Ledger, claimed_by, committed_by
from worker.models import Models
from worker.outputs import Outputs, open_outputs
from worker.pipeline import IDLE, Pipeline
from worker.readers import process_context
from worker.results import prepare_database
from worker.stats import PipelineStats

log = logging.getLogger(__name__)

FILL_REPORT_SECONDS = 60.0


def default_concurrency(batch_size: int) -> int:
    """Studies in flight (Celery's prefetch) so that batches fill even from 1-image studies. A study is in flight from
    delivery to commit: while one batch runs on the device and the next fills, the studies of the batch before wait
    for their group commit (up to 0.2 s), so four batches' worth keeps the device fed (Little's law: studies in
    flight = rate x time each one is in flight). No thread waits per study (``worker.flow``)."""
    return max(8, 4 * batch_size)


class FillReport:
    """Logs how full the engine's batches were, once per ``every`` seconds of work (never per batch), from the
    engine's counters. Counts only: nothing about the studies or patients."""

    def __init__(self, stats: PipelineStats, every: float = FILL_REPORT_SECONDS, clock=time.monotonic):
        self.stats, self.every, self.clock = stats, every, clock
        self._since = clock()
        self._batches = self._frames = 0
        self._first_reported = False

    def tick(self, final: bool = False) -> None:
        now = self.clock()
        if not self._first_reported and self.stats.time_to_first_batch_s is not None:
            self._first_reported = True
            log.info("first batch ran %.2f s after the engine was created", self.stats.time_to_first_batch_s)
        if not final and now - self._since < self.every:
            return
        batches, frames = self.stats.batches - self._batches, self.stats.frames - self._frames
        if batches:
            why = ", ".join(f"{k} {v}" for k, v in sorted(self.stats.why.items()))
            log.info("batch fill %s: %d batches, %d frames, mean fill %.0f%% of %d (run total %.0f%%; by reason: %s)",
                     "over the run" if final else f"in the last {now - self._since:.0f} s", batches, frames,
                     100.0 * frames / (batches * self.stats.batch_size), self.stats.batch_size,
                     100.0 * self.stats.fill, why or "n/a")
        self._since, self._batches, self._frames = now, self.stats.batches, self.stats.frames


@dataclass
class _Submission:
    future: Future
    remaining: set[str]
    outcomes: list[Outcome] = field(default_factory=list)


class StudyBatcher:
    """Feeds work from many concurrent studies into one pipeline, so their images share device batches."""

    def __init__(self, pipeline: Pipeline, poll_seconds: float = 0.02, report_seconds: float = FILL_REPORT_SECONDS):
        self.pipeline = pipeline
        self.poll = poll_seconds
        self.report = FillReport(pipeline.stats, report_seconds)
        self._queue: queue.Queue[WorkItem] = queue.Queue()
        self._waiting: dict[str, list[_Submission]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="engine", daemon=True)
        self._thread.start()

    def submit(self, items: list[WorkItem]) -> Future:
        fut: Future = Future()
        if not items:
            fut.set_result([])
            return fut
        sub = _Submission(fut, {i.sop_instance_uid for i in items})
        with self._lock:
            for item in items:
                self._waiting.setdefault(item.sop_instance_uid, []).append(sub)
        for item in items:
            self._queue.put(item)
        return fut

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.report.tick(final=True)
        self.pipeline.close()  # its reader processes and shared-memory slots

    def _feed(self) -> Iterator[WorkItem | object]:
        while not self._stop.is_set():
            self.report.tick()
            try:
                yield self._queue.get(timeout=self.poll)
            except queue.Empty:
                yield IDLE

    def _sink(self, outcomes: list[Outcome]) -> None:
        """The outcomes that finished together: each to the studies waiting for it."""
        with self._lock:
            waiting = [(o, self._waiting.pop(o.sop_instance_uid, [])) for o in outcomes]
        for outcome, subs in waiting:
            for sub in subs:
                sub.outcomes.append(outcome)
                sub.remaining.discard(outcome.sop_instance_uid)
                if not sub.remaining and not sub.future.done():
                    sub.future.set_result(sub.outcomes)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.pipeline.run(self._feed(), batch_sink=self._sink)
            except Exception as exc:  # a device error: fail what is waiting; their tasks retry
                log.exception("engine failed; failing the studies in flight so they are retried")
                with self._lock:
                    waiting, self._waiting = self._waiting, {}
                error = exc if isinstance(exc, RetryableError) else RetryableError(f"engine failed: {exc}")
                for subs in waiting.values():
                    for sub in subs:
                        if not sub.future.done():
                            sub.future.set_exception(error)


@dataclass
class WorkerRuntime:
    """What one worker process holds while it consumes: its settings, database, the shared pipeline behind the
    StudyBatcher, the result writer and (with --dicom-out) the output processes."""

    settings: Settings
    name: str
    db: Database
    batcher: StudyBatcher
    writer: ResultWriter
    flow: StudyFlow
    ledger: Ledger
    outputs: Outputs | None = None  # --dicom-out, --fhir-out

    def close(self) -> None:
        """The pool has stopped and the flow drained: nothing waits on these any more. The flow stops retrying first,
        so what the engine or the writer still ends meanwhile is left to Redis's redelivery."""
        self.flow.close()
        self.writer.close()
        self.ledger.close()  # after the writer's last commit
        self.batcher.close()
        if self.outputs is not None:  # the outputs of every committed result, then the processes stop
            self.outputs.close()


class ScreeningTask(Task):
    """The task's base: Celery instantiates a task class once per worker process ("Tasks" > "Instantiation" in the
    Celery user guide), so the instance holds that process's caches. ``start`` builds them (the models are loaded
    before the worker consumes); ``close`` commits and releases them. A study's first delivery takes the lean path
    (``worker.flow``: ``Strategy``); ``screen`` runs its retries on a pool thread."""

    Strategy = "worker.flow:screening_strategy"
    runtime: WorkerRuntime | None = None

    @property
    def flow(self) -> StudyFlow | None:
        """The lean path of this process's runtime; None before ``start`` and after ``close``."""
        return self.runtime.flow if self.runtime is not None else None

    def start(self, settings: Settings, pipeline: Pipeline, name: str) -> WorkerRuntime:
        db = Database(settings.resolved_database_url)
        db.create()
        prepare_database(db, pipeline.models, settings, pipeline.heatmap_dir)
        outputs = open_outputs(settings, "worker", complete_only=False, flush_after_s=1.0)
        # the claims and commits in a process of their own (worker.ledger): quoting the findings for COPY, the
        # status statements and the claims were the largest shares of this process's GIL per image after the
        # engine's own
        ledger = Ledger(settings.resolved_database_url, (), process_context())
        batcher, writer = StudyBatcher(pipeline), ResultWriter(db, record=committed_by(ledger, db))
        flow = StudyFlow(db, batcher, writer, settings.max_attempts, self._publish_retry,
                         outputs.add if outputs is not None else None, claim=claimed_by(ledger, db))
        self.runtime = WorkerRuntime(settings, name, db, batcher, writer, flow, ledger, outputs)
        return self.runtime

    def _publish_retry(self, payload: ScreenStudy, task_id: str, queue: str, retries: int, countdown: int) -> None:
        """What ``Task.retry`` publishes: the same task id, ``retries`` counted, to the queue it came from."""
        self.apply_async(kwargs=payload.kwargs(), task_id=task_id, queue=queue, retries=retries, countdown=countdown)

    def close(self) -> None:
        runtime, self.runtime = self.runtime, None  # a late delivery goes to Celery's own path, not a closing flow
        if runtime is not None:
            runtime.close()

    def screen(self, payload: ScreenStudy) -> list[Outcome]:
        """A retried delivery (Celery's pool thread): claimed, screened with the other studies in flight, committed
        and ended as a first delivery is (``StudyFlow.screen``); returns the final outcomes. Raises RetryableError
        for what may work later (a database outage, an instance unreadable for now: the rest is committed)."""
        flow = self.flow
        if flow is None:
            raise RetryableError("this worker process has not started its engine yet")
        return flow.screen(payload)


@shared_task(bind=True, base=ScreeningTask, name=SCREEN_STUDY, acks_late=True, reject_on_worker_lost=True,
             max_retries=8)
def screen_study(self: ScreeningTask, **payload) -> int:
    """Screen one study's instances and commit the results; returns how many instances finished. Keyword arguments
    only: the named, versioned ``neuron.queue.ScreenStudy`` payload."""
    try:
        outcomes = self.screen(ScreenStudy.from_kwargs(payload))
    except RetryableError as exc:
        countdown = min(300, 2 ** self.request.retries)
        log.warning("study task retrying in %d s: %s", countdown, exc)
        raise self.retry(exc=RetryableError(str(exc)), countdown=countdown) from None
    return len(outcomes)


LOST_SWEEP_S = 30.0


class LostMessageSweep:
    """Every ``LOST_SWEEP_S`` one worker of the cluster (``neuron.queue.take_turn``) sends again the queued instances
    that no message in the broker carries (``producer.enqueue.send_lost``), for the routes this worker consumes; the
    first look comes as the worker starts. A broker or database that cannot be reached skips the turn, said once."""

    def __init__(self, settings: Settings, app, db: Database, name: str, routes: list[Route],
                 every: float = LOST_SWEEP_S):
        self.settings, self.app, self.db, self.name, self.routes, self.every = settings, app, db, name, routes, every
        self.sent = 0
        self._stop = threading.Event()
        self._failing = False
        self._thread = threading.Thread(target=self._loop, name="lost-messages", daemon=True)

    def start(self) -> LostMessageSweep:
        self._thread.start()
        return self

    def sweep(self) -> None:
        if take_turn(self.settings, "lost-messages", self.name, self.every):
            self.sent += send_lost(self.db, self.app, self.settings, self.routes, sleep=self._stop.wait)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sweep()
                if self._failing:
                    log.info("lost-message check: the broker and the database answer again")
                self._failing = False
            except Exception as exc:  # noqa: BLE001 - an outage skips a turn; the next one looks again
                if not self._failing:
                    log.warning("lost-message check skipped while the broker or the database cannot be reached "
                                "(%s: %s); it looks again every %.0f s", type(exc).__name__, exc, self.every)
                self._failing = True
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def _quiet_reconnect_warning(**_) -> None:
    """Celery warns on every broker reconnect that the default of worker_cancel_long_running_tasks_on_connection_loss
    will change; Neuron sets it on purpose (neuron/queue.py). Added after Celery's own logging setup, which turns
    its pending-deprecation warnings to 'always'."""
    warnings.filterwarnings("ignore", message=r"(?s).*worker_cancel_long_running_tasks_on_connection_loss")


def run_worker(settings: Settings, queues: list[str], concurrency: int | None = None, loglevel: str = "INFO",
               name: str | None = None, job: Callable[[Models], DeviceJob] | None = None) -> None:
    """Build the models on the device first, then consume. Blocks until the worker stops, then commits what is
    left. ``concurrency`` None: ``default_concurrency`` of the batch size. ``name`` is this worker's identity, in its
    Celery node name and its results' ``worker`` column (default: host + device + pid). ``job``: builds the device
    stage's job over the models (the benchmark's host-only worker, ``worker.bench_host``; default the real one)."""
    models = Models.from_settings(settings, only=[r for r in Route if queue_for(r) in queues])
    name = name or default_worker_name(str(models.device))
    pipeline = Pipeline(models, settings, worker_id=name, job=job(models) if job is not None else None)
    served = metrics.start(settings, pipeline)  # /metrics with --metrics-port; ConfigError when the port is taken
    concurrency = concurrency or default_concurrency(pipeline.batch_size)
    app = make_app(settings)
    app.steps["consumer"].add(DrainStudies)
    task: ScreeningTask = app.tasks[SCREEN_STUDY]
    task.start(settings, pipeline, name)
    register_info_command()
    started = time.monotonic()

    def _info() -> dict:  # answered to `neuron status` (inspect neuron_info): counts only, nothing about patients
        stats = pipeline.stats
        busy = time.monotonic() - (stats.first_batch_at or time.monotonic())
        return {"name": name, "device": str(pipeline.device), "batch_size": pipeline.batch_size,
                "concurrency": concurrency, "queues": queues, "images": stats.frames,
                "held": task.flow.held() if task.flow is not None else [],
                "images_per_s": round(stats.frames / busy, 2) if busy > 0 else None,
                "up_s": round(time.monotonic() - started, 1)}

    app.neuron_info = _info
    heartbeat = Heartbeat(settings, name, lambda: {
        "node": node_name(name), "device": str(pipeline.device), "queues": queues, "images": pipeline.stats.frames,
        "held": task.flow.held() if task.flow is not None else []}).start()
    sweep = LostMessageSweep(settings, app, task.runtime.db, name, [r for r in Route if queue_for(r) in queues]).start()
    signals.celeryd_after_setup.connect(_quiet_reconnect_warning, weak=False)

    def _announce(**_) -> None:  # after Celery's logging setup, so the line reaches the worker's log
        log.info("worker %s: batch size %d, %d studies in flight, batches wait at most %d ms; database %s, "
                 "broker %s", name, pipeline.batch_size, concurrency, settings.max_wait_ms,
                 mask_url(settings.resolved_database_url), mask_url(settings.broker_url))
        if served is not None:
            log.info("Prometheus metrics at %s", served.url)

    signals.worker_ready.connect(_announce, weak=False)
    try:
        app.worker_main(["worker", "--pool=threads", f"--concurrency={concurrency}", "-Q", ",".join(queues),
                         "--prefetch-multiplier=1", "-E", f"--loglevel={loglevel}", "-n", node_name(name),
                         "--without-gossip", "--without-mingle"])
    finally:
        sweep.stop()
        heartbeat.stop()
        task.close()
