"""Send indexed work to the broker: one task per study and route, IDs only, after the database commit."""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import timedelta

from celery import Celery

from db.schema import utcnow
from db.store import Database
from neuron.errors import BrokerUnavailable
from neuron.queue import MAX_INSTANCES_PER_TASK, SCREEN_STUDY, ScreenStudy, messages_in_broker, queue_for
from neuron.routes import MODEL_ROUTES
from neuron.settings import Settings
from neuron.work import FileEntry, Requeue, Route

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
    sent = 0
    tasks = study_tasks((route, study, uid) for study, route, uid in db.pending_by_study(MODEL_ROUTES, study_uids))
    if tasks:
        wait_for_broker(app, broker_wait_s)
    # Tasks go out in blocks: one transaction marks a block's instances queued, then its messages are sent over one
    # broker connection (one commit and one connection per task held a 50,000-instance scan to a few hundred tasks/s).
    with app.producer_or_acquire() as producer:
        for block in _blocks(tasks):
            db.mark_queued([uid for _, _, chunk in block for uid in chunk])
            for i, (route, _study, chunk) in enumerate(block):
                try:
                    _send(app, producer, route, chunk)
                except Exception:
                    db.requeue(Requeue.SEND_FAILED, sop_uids=[uid for _, _, unsent in block[i:] for uid in unsent])
                    raise
                sent += 1
    if sent:
        log.info("enqueued %d tasks", sent)
    return sent


def study_tasks(instances: Iterable[tuple[Route, str, str]]) -> list[tuple[Route, str, list[str]]]:
    """(route, study, SOP Instance UIDs) of each task that sends these (route, study, SOP Instance UID): one per study
    and route, split at ``MAX_INSTANCES_PER_TASK``, in route and study order."""
    groups: dict[tuple[Route, str], list[str]] = defaultdict(list)
    for route, study, uid in instances:
        groups[(route, study)].append(uid)
    return [(route, study, uids[start:start + MAX_INSTANCES_PER_TASK])
            for (route, study), uids in sorted(groups.items())
            for start in range(0, len(uids), MAX_INSTANCES_PER_TASK)]


def _send(app: Celery, producer, route: Route, uids: list[str]) -> None:
    app.send_task(SCREEN_STUDY, kwargs=ScreenStudy(tuple(uids)).kwargs(), queue=queue_for(route), producer=producer)


class EnqueueAsIndexed:
    """``neuron scan``'s sending while it indexes (``index_folder``'s ``on_indexed``): after each committed batch of
    the index, the pending instances of the batch's studies go out, all but the study of the batch's last file, which
    the walk may not have finished (it goes with the next batch, or with the scan's final ``enqueue_pending``). So the
    workers start on the first batch instead of after the whole walk. A study whose files lie apart in the walk goes
    out as more than one task, each instance in one. The broker unreachable mid-walk does not stop the index: sending
    pauses until the end, where ``enqueue_pending`` waits for the broker as before."""

    def __init__(self, db: Database, app: Celery):
        self.db, self.app = db, app
        self.sent = 0
        self._held: set[str] = set()  # the study the walk may not have finished
        self._paused = False

    def __call__(self, entries: list[FileEntry]) -> None:
        studies = [e.instance.header.study_instance_uid for e in entries if e.instance is not None]
        if self._paused or not studies:
            return
        ready = (self._held | set(studies)) - {studies[-1]}
        self._held = {studies[-1]}
        if not ready:
            return
        try:
            self.sent += enqueue_pending(self.db, self.app, study_uids=ready, broker_wait_s=0)
        except BrokerUnavailable as exc:
            self._paused = True
            log.warning("broker %s could not be reached while indexing (%s): indexing goes on, and what it indexes "
                        "is sent once the index is committed", broker_uri(self.app), exc.__cause__ or exc)


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


# -- messages the broker lost ----------------------------------------------------------------------------------------
LOST_AFTER_S = 60.0  # queued this long, unchanged, and in no message: lost (a send follows its commit within seconds)
LOST_CONFIRM_S = 5.0  # the broker is read twice this far apart: a message is out of both lists only if it is gone
LOST_READ_LIMIT = 2_000  # a queue longer than this is not read (its lost messages are found once it is shorter)
LOST_CANDIDATES = 20_000  # at most this many queued instances are checked at once (the oldest first)


def send_lost(db: Database, app: Celery, settings: Settings, routes: list[Route], confirm_s: float = LOST_CONFIRM_S,
              sleep: Callable[[float], object] = time.sleep) -> int:
    """Send again the queued instances that no message in the broker carries. Returns how many were sent. ``sleep``
    waits between the two readings; a true answer (a stop event's ``wait``: the caller is stopping) ends the look.

    kombu's Redis transport takes a message off its list (BRPOP) and only in a second round trip records it as
    unacknowledged (``QoS.append``): a worker killed between the two loses the message, and its instances would stay
    ``queued`` until an operator ran ``neuron scan --requeue``. So do a producer killed after it committed ``queued``
    and before it sent, and a broker restarted without its append-only file.

    An instance is lost when it has been queued and unchanged (not claimed, not finished) for ``LOST_AFTER_S``, and
    two readings of the broker ``confirm_s`` apart, each in one transaction (``neuron.queue.messages_in_broker``),
    find it in no waiting and no unacknowledged message. A live worker's pop-then-record window is a round trip, so it
    is not open at both readings. Its instances stay ``queued`` and go out in a new message. A false alarm (a worker
    stalled inside that window for ``confirm_s``) costs a screening done twice, never a second row: a redelivered
    study's finished instances are skipped at the claim, and a prediction is one row per instance, frame, model, weights
    and label (``uq_prediction_natural_key``)."""
    queues = {queue_for(r): Route(r) for r in routes}
    first = messages_in_broker(settings, list(queues), LOST_READ_LIMIT)
    readable = [queues[q] for q in first.queues]
    if not readable:
        return 0
    candidates = db.queued_before(readable, utcnow() - timedelta(seconds=LOST_AFTER_S), LOST_CANDIDATES)
    missing = {u for u in candidates if u not in first.uids}
    if not missing:
        return 0
    if sleep(confirm_s):
        return 0
    second = messages_in_broker(settings, list(queues), LOST_READ_LIMIT)
    still = db.queued_before(readable, utcnow() - timedelta(seconds=LOST_AFTER_S), LOST_CANDIDATES)
    lost = sorted(u for u in missing if u not in second.uids and still.get(u) == candidates[u]
                  and queue_for(candidates[u][0]) in second.queues)
    if not lost:
        return 0
    tasks = study_tasks((candidates[uid][0], candidates[uid][1], uid) for uid in lost)
    with app.producer_or_acquire() as producer:
        for route, _study, uids in tasks:
            _send(app, producer, route, uids)
    log.warning("%d queued instances (%d studies) were in no message of the broker (lost: a worker killed between "
                "taking a message and recording it, a producer stopped before it sent, or a broker restarted without "
                "its data); sent again", len(lost), len({(route, study) for route, study, _ in tasks}))
    return len(lost)
