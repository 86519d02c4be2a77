"""One thread that owns the result writes: outcomes from many studies share a commit (group commit).

    submit(outcomes) ──► bounded queue ──► writer thread: gather until 256 outcomes or 0.2 s after the first
         │                                   uncommitted one ──► Database.record_outcomes (one transaction)
         └── Future ◄── result after that commit, or the commit's exception ◄──┘

A distributed task waits on its future and only then returns, so its message is acknowledged after its rows are
committed (``acks_late``); a crash before the commit leaves the message unacknowledged and it is redelivered. A
failed commit fails the futures of every outcome in it, never silently: database connection errors arrive as
``RetryableError`` (``db.store`` maps them; the tasks retry); any other error is retried per submission so one bad
study does not fail its neighbours. Whether to commit now is a small pure object (``CommitPolicy``) tested on a fake
clock.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

from db.store import Committed, Database
from neuron.errors import RetryableError
from neuron.work import Outcome

log = logging.getLogger(__name__)

DEFAULT_MAX_OUTCOMES = 256
DEFAULT_MAX_DELAY_S = 0.2
DEFAULT_QUEUE_SUBMISSIONS = 1024

# record(outcomes, replace) -> Committed: what a commit runs (Database.record_outcomes, by default in this process)
Record = Callable[[Sequence[Outcome], list[str]], Committed]


@dataclass
class CommitPolicy:
    """Commit when ``max_outcomes`` are waiting, or ``max_delay`` seconds after the first uncommitted one arrived."""

    max_outcomes: int = DEFAULT_MAX_OUTCOMES
    max_delay: float = DEFAULT_MAX_DELAY_S
    waiting: int = 0
    first_at: float | None = None

    def __post_init__(self) -> None:
        if self.max_outcomes < 1:
            raise ValueError(f"max_outcomes {self.max_outcomes} must be at least 1")
        if self.max_delay < 0:
            raise ValueError(f"max_delay {self.max_delay} must be 0 or more seconds")

    def add(self, n: int, now: float) -> None:
        if self.first_at is None:
            self.first_at = now
        self.waiting += n

    def due(self, now: float) -> bool:
        return self.first_at is not None and (self.waiting >= self.max_outcomes
                                              or now - self.first_at >= self.max_delay)

    def wait_for(self, now: float) -> float | None:
        """Seconds until the time rule fires; None when nothing is waiting (block until input)."""
        if self.first_at is None:
            return None
        return max(0.0, self.first_at + self.max_delay - now)

    def reset(self) -> None:
        self.waiting, self.first_at = 0, None


@dataclass
class _Submission:
    outcomes: Sequence[Outcome]
    future: Future
    replace: bool = False


class _Flush:
    def __init__(self) -> None:
        self.future: Future = Future()


_CLOSE = object()


class ResultWriter:
    """Owns the result writes of one process. ``submit`` blocks when ``max_queue`` submissions are waiting
    (back-pressure on the engine or the tasks), so a slow database slows the producers of outcomes instead of
    filling memory."""

    def __init__(self, db: Database, max_outcomes: int = DEFAULT_MAX_OUTCOMES,
                 max_delay: float = DEFAULT_MAX_DELAY_S, max_queue: int = DEFAULT_QUEUE_SUBMISSIONS,
                 clock: Callable[[], float] = time.monotonic, record: Record | None = None):
        self.db = db
        # neuron run and neuron worker commit in their ledger process (worker.ledger.committed_by), here otherwise
        self._record: Record = record or (lambda outcomes, replace: db.record_outcomes(outcomes, replace=replace))
        self.policy = CommitPolicy(max_outcomes, max_delay)
        self._clock = clock
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self._closed = False
        self._close_lock = threading.Lock()
        self.commits = 0
        self.outcomes_written = 0
        self._thread = threading.Thread(target=self._loop, name="result-writer", daemon=True)
        self._thread.start()

    # -- the callers' side ------------------------------------------------------------------------------------------
    def submit(self, outcomes: Sequence[Outcome], replace: bool = False) -> Future:
        """Queue outcomes for the next commit; the future's result is a ``db.store.Committed`` for them (how many
        were written, which of them went back in line from a duplicate copy), set after the commit that contains
        them, or the commit's exception. ``replace``: their instances' previous results are deleted in the same
        commit (``neuron rescreen``), and ``Committed.stale_heatmaps`` names the files nothing references any more."""
        fut: Future = Future()
        if not outcomes:
            fut.set_result(Committed())
            return fut
        self._put(_Submission(list(outcomes), fut, replace))
        return fut

    def flush(self, timeout: float | None = None) -> None:
        """Commit everything submitted before this call, now; returns once it is committed (or failed)."""
        marker = _Flush()
        self._put(marker)
        marker.future.result(timeout)

    def close(self, timeout: float | None = 60.0) -> None:
        """Commit what is queued, then stop the thread. Later submissions raise."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._queue.put(_CLOSE)
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.error("the result writer did not finish its last commit within %s s", timeout)

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _put(self, item: object) -> None:
        if self._closed:
            raise RuntimeError("the result writer is closed; outcomes submitted now would never be committed")
        self._queue.put(item)

    # -- the writer thread ------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        pending: list[_Submission] = []
        while True:
            try:
                item = self._queue.get(timeout=self.policy.wait_for(self._clock()))
            except queue.Empty:
                item = None
            if isinstance(item, _Submission):
                pending.append(item)
                self.policy.add(len(item.outcomes), self._clock())
            if (item is not None and not isinstance(item, _Submission)) or self.policy.due(self._clock()):
                self._commit(pending)
                pending = []
                self.policy.reset()
            if isinstance(item, _Flush):
                item.future.set_result(None)
            elif item is _CLOSE:
                return

    def _commit(self, batch: list[_Submission]) -> None:
        if not batch:
            return
        try:
            self._write(batch)
        except Exception as error:  # every failure goes to the futures that wait on this commit
            if isinstance(error, RetryableError) or len(batch) == 1:
                log.warning("a commit of %d outcomes failed: %s", sum(len(s.outcomes) for s in batch), error)
                for sub in batch:
                    sub.future.set_exception(error)
                return
            # not a connection problem: find the submission(s) that cause it, commit the others
            for sub in batch:
                self._commit([sub])

    def _write(self, batch: list[_Submission]) -> None:
        outcomes = [o for sub in batch for o in sub.outcomes]
        committed = self._record(outcomes, [o.sop_instance_uid for sub in batch if sub.replace for o in sub.outcomes])
        self.commits += 1
        self.outcomes_written += len(outcomes)
        rescued = set(committed.rescued)
        for sub in batch:
            mine = tuple(o.sop_instance_uid for o in sub.outcomes if o.sop_instance_uid in rescued)
            sub.future.set_result(Committed(len(sub.outcomes), mine,
                                            committed.stale_heatmaps if sub.replace else frozenset()))
