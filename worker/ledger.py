"""The ledger: a process of its own that does the database writes of the process that drives the device (the
embedded run's index and results; a worker's results), so that process spends its interpreter on batches, not on
SQLAlchemy and the driver's quoting.

    indexer thread (driving process) ── a batch of packed FileEntries, in walk order ──► ledger: db.add_files
                                     ◄── for each, its file's pending WorkItem or None ──── db.work_items
    result writer thread             ── a group commit's Outcomes (and which replace) ──► ledger: db.record_outcomes
                                     ◄── db.store.Committed ───────────────────────────────┘
    a worker's claim thread          ── the SOP Instance UIDs of the studies waiting ───► ledger: db.claim
                                     ◄── the WorkItems claimed ────────────────────────────┘

One request at a time, in order, over one pipe: index batches go in walk order, so the first path of a SOP Instance UID
still owns it, and the index and the results never wait on each other's SQLite lock. The driving process never reads
the entries: the readers pack them (``worker.readers.pack_entry``) and only the ledger unpacks them.

The ledger answers an error with its type alone (a database's message can quote the rows' values) and goes on; the
caller does that request itself (``worker.embedded._Walk``, ``committed_by``), where the database says again what is
wrong, as it would have without the ledger: the run stops on a read-only or full database with the fix, a worker's
tasks retry through an outage, and the next request goes to the ledger again. A ledger that died (killed, out of
memory) is not replaced: the caller does the rest itself. A commit the ledger made before it was killed, done again by
the caller, changes nothing: results are upserts and finished instances are skipped (``Database.record_outcomes``).

The ledger comes from the reader processes' forkserver (``worker.readers.process_context``), so it ignores a stop
signal sent to the process group as they do; it ends when its pipe closes (the run or the worker ended, or was
killed)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence

from db.store import Committed, Database
from db.writer import Record
from neuron.work import Outcome, Route, WorkItem
from worker.readers import name_process, unpack_entry

log = logging.getLogger(__name__)

_OK, _FAILED = "ok", "failed"
_INDEX, _COMMIT, _CLAIM = "index", "commit", "claim"


def record_batch(db: Database, packed: Sequence[bytes], routes: Sequence[Route]) -> list[WorkItem | None]:
    """Record a batch of packed index entries (in walk order); for each, the pending WorkItem of its file, or None.
    What the ledger process does, and what the run does itself when the ledger has stopped."""
    entries = [unpack_entry(p) for p in packed]
    db.add_files(entries)
    found = {w.file_path: w for w in db.work_items(routes=routes, paths=[e.path for e in entries])}
    return [found.get(e.path) for e in entries]


class Ledger:
    """The driving process's side. ``admit`` and ``record_outcomes`` return None when the ledger did not do the work
    (the database refused it there, or the process has died): the caller then does it in its own process. Safe to
    call from two threads (the indexer, the result writer): one request at a time."""

    def __init__(self, url: str, routes: Sequence[Route], context):
        parent, child = context.Pipe()
        self._process = context.Process(target=ledger_main, name="neuron-ledger", daemon=True,
                                        args=(child, url, [Route(r).value for r in routes]))
        self._process.start()
        child.close()
        self._conn = parent
        self._lock = threading.Lock()
        self.stopped: str | None = None  # why the ledger stopped answering (its process ended)
        self.refused = 0  # requests its database refused (done again by the caller)

    def admit(self, packed: list[bytes]) -> list[WorkItem | None] | None:
        """Record these packed entries (in walk order); for each, its file's pending WorkItem or None. None when the
        ledger did not record them (a refused batch is one transaction: nothing of it is recorded)."""
        return self._ask((_INDEX, packed), "a batch of the index")

    def record_outcomes(self, outcomes: Sequence[Outcome], replace: Sequence[str] = ()) -> Committed | None:
        """``Database.record_outcomes`` in the ledger; None when the ledger did not commit them (refused: nothing of
        it is committed; the process died: it may or may not have been, and doing it again changes nothing)."""
        return self._ask((_COMMIT, list(outcomes), list(replace)), "a commit of results")

    def claim(self, uids: Sequence[str], max_attempts: int) -> list[WorkItem] | None:
        """``Database.claim`` in the ledger; None when the ledger did not claim them (refused: nothing claimed; the
        process died: an attempt may have been counted, and the caller's claim counts one more)."""
        return self._ask((_CLAIM, list(uids), max_attempts), "a claim")

    def _ask(self, request: tuple, what: str):
        with self._lock:
            if self._conn is None:
                return None
            try:
                self._conn.send(request)
                kind, payload = self._conn.recv()
            except (EOFError, OSError) as exc:  # the process ended (killed, out of memory)
                self._stop(f"its process ended ({type(exc).__name__}, exit code {self._process.exitcode})")
                return None
            if kind != _OK:
                log.info("the ledger's database refused %s (%s); this process does it", what, payload)
                self.refused += 1
                return None
            return payload

    def _stop(self, why: str) -> None:
        """Under the lock."""
        self.stopped = why
        log.warning("the ledger stopped: %s; this process does the rest of the run's database writes", why)
        self._close()

    def close(self) -> None:
        with self._lock:
            self._close()

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.send(None)
            except OSError:
                pass
            conn.close()
        self._process.join(timeout=10)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(timeout=5)


def committed_by(ledger: Ledger, db: Database) -> Record:
    """A ResultWriter's commits: made by the ledger, or by this process where the ledger did not make one."""
    def record(outcomes: Sequence[Outcome], replace: list[str]) -> Committed:
        committed = ledger.record_outcomes(outcomes, replace)
        return db.record_outcomes(outcomes, replace=replace) if committed is None else committed
    return record


def claimed_by(ledger: Ledger, db: Database) -> Callable[[Sequence[str], int], list[WorkItem]]:
    """A worker's claims: made by the ledger, or by this process where the ledger did not make one."""
    def claim(uids: Sequence[str], max_attempts: int) -> list[WorkItem]:
        items = ledger.claim(uids, max_attempts)
        return db.claim(uids, max_attempts) if items is None else items
    return claim


def ledger_main(conn, url: str, routes: list[str]) -> None:
    """The ledger process: requests in, answers out, until the pipe closes."""
    name_process("neuron-ledger")
    db = Database(url)
    wanted = [Route(r) for r in routes]
    try:
        while True:
            try:
                request = conn.recv()
            except (EOFError, OSError):
                return
            if request is None:
                return
            try:
                if request[0] == _INDEX:
                    answer = record_batch(db, request[1], wanted)
                elif request[0] == _CLAIM:
                    answer = db.claim(request[1], request[2])
                else:
                    answer = db.record_outcomes(request[1], replace=request[2])
            except Exception as exc:  # noqa: BLE001 - the caller does the request itself and hears the details
                conn.send((_FAILED, type(exc).__name__))
                continue
            conn.send((_OK, answer))
    finally:
        db.dispose()
