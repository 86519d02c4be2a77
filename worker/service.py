"""The distributed worker: a Celery worker whose thin tasks hand studies to one shared batch engine.

    Celery thread pool (N studies in flight) ──submit(items)──► StudyBatcher queue ──► Engine.run (one thread)
           ▲                                                                           │ frames of all studies
           └── commit results, then ack ◄── Future[list[Outcome]] per study ◄──────────┘ batched together

Why not celery-batches: 0.11 pins celery<5.7 and acknowledges messages when they are buffered, so a crash loses the
buffered batch. Here each task waits for its own study's results, commits them and only then returns, so with
``acks_late`` a message is acknowledged after its rows are in the database; a killed worker's messages are redelivered.
The thread pool never forks, so CUDA is safe; the engine is built once per process, before the worker consumes.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field

from celery import Celery, Task, signals
from sqlalchemy.exc import OperationalError

from db.store import Database, Outcome, WorkItem
from neuron.errors import RetryableError
from neuron.queue import SCREEN_STUDY, make_app, queue_for
from neuron.routes import Route
from neuron.settings import Settings
from worker.engine import IDLE, Engine

log = logging.getLogger(__name__)


@dataclass
class _Submission:
    future: Future
    remaining: set[str]
    outcomes: list[Outcome] = field(default_factory=list)


class StudyBatcher:
    """Feeds work from many concurrent studies into one engine, so their images share device batches."""

    def __init__(self, engine: Engine, poll_seconds: float = 0.02):
        self.engine = engine
        self.poll = poll_seconds
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

    def _feed(self) -> Iterator[WorkItem | object]:
        while not self._stop.is_set():
            try:
                yield self._queue.get(timeout=self.poll)
            except queue.Empty:
                yield IDLE

    def _sink(self, outcome: Outcome) -> None:
        with self._lock:
            subs = self._waiting.pop(outcome.sop_instance_uid, [])
        for sub in subs:
            sub.outcomes.append(outcome)
            sub.remaining.discard(outcome.sop_instance_uid)
            if not sub.remaining and not sub.future.done():
                sub.future.set_result(sub.outcomes)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.engine.run(self._feed(), self._sink)
            except Exception as exc:  # a device error: fail what is waiting; their tasks retry
                log.exception("engine failed; failing the studies in flight so they are retried")
                with self._lock:
                    waiting, self._waiting = self._waiting, {}
                error = exc if isinstance(exc, RetryableError) else RetryableError(f"engine failed: {exc}")
                for subs in waiting.values():
                    for sub in subs:
                        if not sub.future.done():
                            sub.future.set_exception(error)


class ScreeningTask(Task):
    """Custom base holding the per-process caches: settings, database and the batcher (STYLE 9)."""

    settings: Settings | None = None
    _db: Database | None = None
    _batcher: StudyBatcher | None = None

    @property
    def db(self) -> Database:
        if ScreeningTask._db is None:
            ScreeningTask._db = Database(self.settings.resolved_database_url)
        return ScreeningTask._db

    @property
    def batcher(self) -> StudyBatcher:
        if ScreeningTask._batcher is None:
            ScreeningTask._batcher = StudyBatcher(Engine.from_settings(self.settings))
        return ScreeningTask._batcher


def register_tasks(app: Celery) -> None:
    @app.task(bind=True, base=ScreeningTask, name=SCREEN_STUDY, acks_late=True, reject_on_worker_lost=True,
              max_retries=8)
    def screen_study(self: ScreeningTask, study_uid: str, sop_uids: list[str]) -> int:
        """Screen one study's instances and commit the results; returns how many instances finished."""
        try:
            items = self.db.claim(sop_uids, self.settings.max_attempts)
            outcomes = self.batcher.submit(items).result()
            self.db.record_outcomes(outcomes)
        except (RetryableError, OperationalError) as exc:
            countdown = min(300, 2 ** self.request.retries)
            log.warning("study task retrying in %d s: %s", countdown, exc)
            raise self.retry(exc=RetryableError(str(exc)), countdown=countdown) from None
        return len(outcomes)


def _quiet_reconnect_warning(**_) -> None:
    """Celery warns on every broker reconnect that the default of worker_cancel_long_running_tasks_on_connection_loss
    will change; Neuron sets it on purpose (neuron/queue.py). Added after Celery's own logging setup, which turns
    its pending-deprecation warnings to 'always'."""
    warnings.filterwarnings("ignore", message=r"(?s).*worker_cancel_long_running_tasks_on_connection_loss")


def run_worker(settings: Settings, queues: list[str], concurrency: int, loglevel: str = "INFO") -> None:
    """Build the engine (models on the device) first, then consume. Blocks until the worker stops."""
    engine = Engine.from_settings(settings, only=[r for r in Route if queue_for(r) in queues])
    db = Database(settings.resolved_database_url)
    db.create()
    for lr in engine.routes.values():
        db.ensure_config(lr.spec.config_hash, lr.spec.model, lr.spec.as_dict())
    ScreeningTask.settings = settings
    ScreeningTask._db = db
    ScreeningTask._batcher = StudyBatcher(engine)
    app = make_app(settings)
    register_tasks(app)
    signals.celeryd_after_setup.connect(_quiet_reconnect_warning, weak=False)
    name = f"neuron-{socket.gethostname()}-{str(engine.device).replace(':', '')}@%h"
    app.worker_main(["worker", "--pool=threads", f"--concurrency={concurrency}", "-Q", ",".join(queues),
                     "--prefetch-multiplier=1", "-E", f"--loglevel={loglevel}", "-n", name, "--without-gossip",
                     "--without-mingle"])
