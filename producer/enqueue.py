"""Send indexed work to the broker: one task per study and route, IDs only, after the database commit."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable

from celery import Celery

from db.store import Database
from neuron.errors import BrokerUnavailable
from neuron.queue import MAX_INSTANCES_PER_TASK, SCREEN_STUDY, ScreenStudy, queue_for
from neuron.routes import MODEL_ROUTES
from neuron.work import Requeue, Route

log = logging.getLogger(__name__)

BROKER_WAIT_SECONDS = 120.0  # how long the producer waits for an unreachable broker before giving up
_BROKER_RETRY_MAX_S = 10.0


def broker_uri(app: Celery) -> str:
    """The broker URL with its password masked: safe for logs and messages."""
    with app.connection_for_write() as conn:
        return conn.as_uri()  # kombu masks the password (redis://:**@host:6379/0)


def wait_for_broker(app: Celery, wait_s: float = BROKER_WAIT_SECONDS, clock: Callable[[], float] = time.monotonic,
                    sleep: Callable[[float], None] = time.sleep) -> None:
    """Return once the broker accepts a connection; retry with backoff (1 s doubling to 10 s), saying so each time;
    raise ``BrokerUnavailable`` after ``wait_s`` seconds. Nothing has been marked queued yet, so instances stay
    pending and a later scan sends them."""
    deadline, delay, tries = clock() + wait_s, 1.0, 0
    while True:
        tries += 1
        try:
            with app.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0, timeout=5)
            if tries > 1:
                log.warning("broker %s is reachable again after %d tries; enqueueing", broker_uri(app), tries)
            return
        except Exception as exc:  # kombu raises OperationalError or the transport's own connection errors
            left = deadline - clock()
            if left <= 0:
                raise BrokerUnavailable(
                    f"broker {broker_uri(app)} was not reachable within {wait_s:.0f} s ({type(exc).__name__}: "
                    f"{exc}); nothing was sent and the instances stay pending: start the broker (or fix "
                    f"NEURON_BROKER_URL) and run `neuron scan` again, which sends them") from exc
            pause = min(delay, left)
            log.warning("broker %s is not reachable (%s: %s); retrying in %.0f s, giving up in %.0f s",
                        broker_uri(app), type(exc).__name__, exc, pause, left)
            sleep(pause)
            delay = min(2 * delay, _BROKER_RETRY_MAX_S)


def enqueue_pending(db: Database, app: Celery, study_uids: set[str] | None = None,
                    broker_wait_s: float = BROKER_WAIT_SECONDS) -> int:
    """Queue every pending instance (of the given studies, or all). Returns the number of tasks sent.
    Instances are marked ``queued`` and committed first; a send that fails puts them back to ``pending``
    (``Requeue.SEND_FAILED``). An instance rescued from a duplicate copy is pending like any other (``db.store``
    decides that when the failure or the copy is recorded).

    An unreachable broker is waited for (``wait_for_broker``) before anything is marked queued."""
    groups: dict[tuple[Route, str], list[str]] = defaultdict(list)
    for study, route, uid in db.pending_by_study(MODEL_ROUTES, study_uids):
        groups[(route, study)].append(uid)
    sent = 0
    tasks = [(route, study, uids[start:start + MAX_INSTANCES_PER_TASK])
             for (route, study), uids in sorted(groups.items())
             for start in range(0, len(uids), MAX_INSTANCES_PER_TASK)]
    if tasks:
        wait_for_broker(app, broker_wait_s)
    # Tasks go out in blocks: one transaction marks a block's instances queued, then its messages are sent over one
    # broker connection (one commit and one connection per task held a 50,000-instance scan to a few hundred tasks/s).
    with app.producer_or_acquire() as producer:
        for block in _blocks(tasks):
            db.mark_queued([uid for _, _, chunk in block for uid in chunk])
            for i, (route, _study, chunk) in enumerate(block):
                try:
                    app.send_task(SCREEN_STUDY, kwargs=ScreenStudy(tuple(chunk)).kwargs(), queue=queue_for(route),
                                  producer=producer)
                except Exception:
                    db.requeue(Requeue.SEND_FAILED, sop_uids=[uid for _, _, unsent in block[i:] for uid in unsent])
                    raise
                sent += 1
    if sent:
        log.info("enqueued %d tasks", sent)
    return sent


SEND_BLOCK_INSTANCES = 2_000


def _blocks(tasks: list[tuple[Route, str, list[str]]]) -> list[list[tuple[Route, str, list[str]]]]:
    """Consecutive tasks holding about SEND_BLOCK_INSTANCES instances together (one commit each)."""
    blocks: list[list[tuple[Route, str, list[str]]]] = [[]]
    size = 0
    for task in tasks:
        if size >= SEND_BLOCK_INSTANCES:
            blocks.append([])
            size = 0
        blocks[-1].append(task)
        size += len(task[2])
    return [b for b in blocks if b]
