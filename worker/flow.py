"""A Celery worker's studies in flight as callbacks, not threads: claim, screen, commit, then acknowledge.

    Celery's consumer (its event-loop thread) ── ``screening_strategy``: a study's first delivery ──► StudyFlow.start
        claim thread: the claims of every study waiting, in one transaction (made in the worker's ledger process,
                      worker.ledger, as its commits are) ──► StudyBatcher.submit per study
        engine: the study's last outcome ──► ResultWriter.submit          (a callback on the engine's thread)
        writer: the commit that holds them ──► outputs, then ``ack``      (a callback on the writer's thread)
            ack: Celery's own acknowledgement promise, run on the consumer's event loop (Consumer.call_soon_ack)

A message is acknowledged only after its study's results are committed, as with ``acks_late``; a worker killed before
that leaves it unacknowledged and Redis delivers it again after the visibility timeout. No thread waits per study, so
a worker keeps 4 x batch studies in flight (``default_concurrency``) with three threads of its own instead of one
thread per study, and the claims of many studies share one database transaction.

What this path does not take goes to Celery's default strategy: a delivery that is a retry (its ``retries`` header,
or an ETA), and a body the lean path cannot read (Celery then rejects it as it would). There a pool thread runs
``ScreeningTask.screen``, which hands the study to the same flow (``StudyFlow.screen``) and waits for its end, so both
paths claim, commit, rescue duplicate copies and decide a retry by the same code.

A study that must be retried (the database away, an instance unreadable for now) is published again with Celery's
retry fields (same task id, ``retries`` + 1, a countdown of 2^retries s) before its first delivery is acknowledged,
so Celery's countdown, ``max_retries`` and ``neuron status`` see it exactly as a task that called ``self.retry``.

Celery lets a task choose how the worker handles its messages: ``Task.Strategy`` ("Task.Strategy" in the
celery.app.task API; celery-batches uses the same hook), called on the consumer's thread for each delivery.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

from celery import bootsteps
from celery.worker import state
from celery.worker.strategy import default as default_strategy

from db.store import Database
from db.writer import ResultWriter
from neuron.errors import RetryableError
from neuron.queue import SCREEN_STUDY, ScreenStudy
from neuron.work import Outcome, Status, WorkItem

log = logging.getLogger(__name__)

MAX_CLAIM_STUDIES = 256  # studies whose claims share one transaction
DRAIN_S = 60.0


@dataclass(eq=False)
class Study:
    """One delivered message: the task id, what to screen, and how it ends: acknowledged (the lean path: ``acks``,
    one per delivery of it; None once taken by its end), or answered to a caller that waits (a retried delivery on
    Celery's pool thread: ``waiter``)."""

    task_id: str
    payload: ScreenStudy
    acks: list[Callable[[], object]] | None
    queue: str  # where it came from: a retry goes back there
    todo: tuple[str, ...] = ()
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)
    waiter: Future | None = None  # gets the outcomes, or the error its task is retried for


class StudyFlow:
    """The lean path (module docstring). ``retry(study, exc)`` publishes the study again as Celery's retry would;
    ``outputs_add`` gets the SOP Instance UIDs of screened instances after their commit (DICOM outputs)."""

    def __init__(self, db: Database, batcher, writer: ResultWriter, max_attempts: int,
                 retry: Callable[[ScreenStudy, str, str, int, int], None],
                 outputs_add: Callable[[list[str]], None] | None = None,
                 claim: Callable[[Sequence[str], int], list[WorkItem]] | None = None):
        self.db, self.batcher, self.writer = db, batcher, writer
        self.claim = claim or db.claim  # a worker's are made in its ledger process (worker.ledger.claimed_by)
        self.max_attempts = max_attempts
        self._publish_retry = retry
        self.outputs_add = outputs_add
        self._claims: queue.Queue[Study | None] = queue.Queue()
        self._in_flight: dict[str, Study] = {}
        self._lock = threading.Condition()
        self._closed = False
        self._retries = ThreadPoolExecutor(1, thread_name_prefix="flow-retry")
        self._claimer = threading.Thread(target=self._claim_loop, name="flow-claim", daemon=True)
        self._claimer.start()

    # -- the consumer's side ----------------------------------------------------------------------------------------
    def start(self, task_id: str, payload: ScreenStudy, ack: Callable[[], object], routing_key: str) -> None:
        with self._lock:
            held = self._in_flight.get(task_id)
            if held is not None and held.acks is not None:
                # Redis delivered it again while this worker still screens it (held past the visibility timeout,
                # behind a long queue in flight): acknowledged with it, not claimed and screened a second time
                held.acks.append(ack)
                log.info("Task %s[%s] delivered again while in flight here; acknowledged with the first delivery",
                         SCREEN_STUDY, task_id)
                return
            study = Study(task_id, payload, [ack], routing_key, payload.sop_instance_uids)
            self._in_flight[task_id] = study
        self._claims.put(study)

    def screen(self, payload: ScreenStudy) -> list[Outcome]:
        """A retried delivery's path (``ScreeningTask.screen``, on Celery's pool thread): the same claim, screening,
        commit and ending as a first delivery's, waited for. Returns the outcomes; raises what a first delivery would
        be retried for (the database away, an instance unreadable for now: the rest is committed), for Celery's
        retry to count."""
        waiter: Future = Future()
        self._claims.put(Study("", payload, None, "", payload.sop_instance_uids, waiter=waiter))
        return waiter.result()

    def held(self) -> list[str]:
        """The task ids of the studies in flight (``neuron status`` counts them as held by this worker)."""
        with self._lock:
            return list(self._in_flight)

    # -- claim, screen, commit --------------------------------------------------------------------------------------
    def _claim_loop(self) -> None:
        while True:
            first = self._claims.get()
            if first is None or self._closed:
                return
            batch = [first]
            while len(batch) < MAX_CLAIM_STUDIES:
                try:
                    more = self._claims.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._claims.put(None)
                    break
                batch.append(more)
            try:
                self._claim(batch)
            except Exception as exc:  # noqa: BLE001 - every study of the batch is retried; the thread goes on
                if not isinstance(exc, RetryableError):  # the database away is expected; anything else is a bug
                    log.exception("handing %d studies to the engine failed; they are retried", len(batch))
                for study in batch:
                    self._retry(study, exc)

    def _claim(self, batch: list[Study]) -> None:
        items = self.claim([uid for s in batch for uid in s.todo], self.max_attempts)
        by_uid = {item.sop_instance_uid: item for item in items}
        for study in batch:
            mine = [by_uid[uid] for uid in study.todo if uid in by_uid]
            self.batcher.submit(mine).add_done_callback(partial(self._screened, study))

    def _screened(self, study: Study, future: Future) -> None:
        """On the engine's thread (or the claimer's, for a study with nothing left to screen): hand to the writer."""
        if future.exception() is not None:
            self._retry(study, future.exception())
            return
        outcomes = future.result()
        for o in outcomes:
            study.outcomes[o.sop_instance_uid] = o
        try:
            self.writer.submit(outcomes).add_done_callback(partial(self._committed, study, outcomes))
        except Exception as exc:  # noqa: BLE001 - the writer is closing: retried by another delivery
            self._retry(study, exc)

    def _committed(self, study: Study, outcomes: list[Outcome], future: Future) -> None:
        """On the writer's thread, after the commit that holds the study's outcomes (or its failure)."""
        if future.exception() is not None:
            self._retry(study, future.exception())
            return
        rescued = future.result().rescued
        if self.outputs_add is not None:
            done = [o.sop_instance_uid for o in outcomes if o.status is Status.DONE and o.frames]
            if done:
                self.outputs_add(done)
        if rescued:  # a corrupt first copy must not hide a good duplicate: screened again from that copy
            study.todo = tuple(rescued)
            self._claims.put(study)
            return
        transient = [o for o in study.outcomes.values() if o.status is Status.PENDING]
        if transient:  # a storage hiccup: the rest is committed, these are claimed again by the retry
            self._retry(study, RetryableError(f"{len(transient)} instance(s) of the study could not be read for "
                                              f"now: {transient[0].reason}"))
            return
        self._finish(study)

    # -- the two endings --------------------------------------------------------------------------------------------
    def _finish(self, study: Study, retried: str | None = None) -> None:
        if study.waiter is not None:
            study.waiter.set_result(list(study.outcomes.values()))
            return
        with self._lock:
            acks, study.acks = study.acks or [], None  # a delivery from now on is a new study
        for ack in acks:
            ack()  # scheduled on Celery's event loop, which runs what is scheduled before it stops
        if retried is None:
            log.info("Task %s[%s] succeeded in %.3fs: %d", SCREEN_STUDY, study.task_id,
                     time.monotonic() - study.started, len(study.outcomes))
        else:
            log.info("Task %s[%s] retry: %s", SCREEN_STUDY, study.task_id, retried)
        with self._lock:
            if self._in_flight.get(study.task_id) is study:
                del self._in_flight[study.task_id]
            self._lock.notify_all()

    def _retry(self, study: Study, exc: BaseException) -> None:
        if study.waiter is not None:  # its task raises it, and Celery's retry publishes it again
            if not study.waiter.done():
                study.waiter.set_exception(exc)
            return
        if self._closed:  # stopping: left unacknowledged, Redis delivers it again (to this worker's successor)
            return
        countdown = 1  # Celery's countdown for the first retry: 2 ** 0 (worker.service.screen_study)
        log.warning("study task retrying in %d s: %s", countdown, exc)
        self._retries.submit(self._publish_then_ack, study, str(exc), countdown)

    def _publish_then_ack(self, study: Study, why: str, countdown: int) -> None:
        try:
            self._publish_retry(study.payload, study.task_id, study.queue, 1, countdown)
        except Exception as exc:  # noqa: BLE001 - unacknowledged, Redis delivers it again after the visibility timeout
            log.error("could not publish the retry of a study (%s: %s); its message stays unacknowledged and is "
                      "delivered again after the visibility timeout", type(exc).__name__, exc)
            with self._lock:
                study.acks = None  # a delivery from now on is a new study
                if self._in_flight.get(study.task_id) is study:
                    del self._in_flight[study.task_id]
                self._lock.notify_all()
            return
        self._finish(study, f"Retry in {countdown}s: {why}")

    # -- stopping ---------------------------------------------------------------------------------------------------
    def drain(self, timeout: float = DRAIN_S) -> int:
        """Wait (at most ``timeout`` s) until the studies in flight are committed and their acknowledgements
        scheduled. Returns how many were still in flight after it."""
        deadline = time.monotonic() + timeout
        with self._lock:
            if self._in_flight:
                log.info("waiting for %d studies in flight to be committed", len(self._in_flight))
            while self._in_flight and (left := deadline - time.monotonic()) > 0:
                self._lock.wait(left)
            return len(self._in_flight)

    def close(self) -> None:
        """After the engine and the writer stopped: what is still in flight stays unacknowledged."""
        self._closed = True
        self._claims.put(None)
        self._claimer.join(timeout=10)
        while True:  # a caller still waiting on an unclaimed study is told, not left hanging
            try:
                study = self._claims.get_nowait()
            except queue.Empty:
                break
            if study is not None:
                self._retry(study, RetryableError("the worker is stopping"))
        self._retries.shutdown(wait=True)


def screening_strategy(task, app, consumer, **kwargs):
    """``ScreeningTask.Strategy``: a study's first delivery goes to the process's ``StudyFlow``; everything else to
    Celery's default strategy (module docstring)."""
    fallback = default_strategy(task, app, consumer, **kwargs)
    connection_errors = consumer.connection_errors

    def handle(message, body, ack, reject, callbacks, **kw):
        flow = task.flow
        headers = message.headers or {}
        if flow is None or headers.get("retries") or headers.get("eta"):
            return fallback(message, body, ack, reject, callbacks, **kw)
        try:
            payload = ScreenStudy.from_body(message.decode())
        except Exception:  # noqa: BLE001 - Celery's own path rejects it with its reason
            return fallback(message, body, ack, reject, callbacks, **kw)
        # the line Celery logs for each task it receives, so a worker's log reads the same on either path
        log.info("Task %s[%s] received", task.name, headers["id"])
        came_from = (message.delivery_info or {}).get("routing_key") or app.conf.task_default_queue
        # what Celery's Request.acknowledge passes to the promise: Message.ack_log_error(logger, errors)
        flow.start(headers["id"], payload, partial(ack, log, connection_errors), came_from)

    return handle


class DrainStudies(bootsteps.StartStopStep):
    """A consumer step: at a warm shutdown the lean path's studies in flight are committed before Celery's event loop
    stops (it runs the acknowledgements scheduled on it as it stops, while the broker connection is still open). The
    consumer's steps stop before the worker's event loop (celery.worker.components: Hub, Pool, Consumer); they also
    stop when the broker connection is lost and the consumer restarts, and then there is nothing to wait for."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def stop(self, c) -> None:
        if (state.should_stop is None or state.should_stop is False) and (
                state.should_terminate is None or state.should_terminate is False):  # a warm stop sets 0 (EX_OK)
            return  # the consumer restarts after a lost connection: the studies go on
        flow = getattr(c.app.tasks.get(SCREEN_STUDY), "flow", None)
        if flow is not None:
            left = flow.drain()
            if left:
                log.warning("%d studies were still in flight at shutdown; Redis delivers them again after the "
                            "visibility timeout", left)
