"""The embedded run's index ledger: a process of its own that records the walk's index entries in the database and
answers which of their files hold an instance to screen, so the process that drives the device spends its
interpreter on batches, not on SQLAlchemy.

    indexer thread (driving process) ── a batch of FileEntries, in walk order ──► ledger process: db.add_files
                                     ◄── {path: WorkItem} of the batch's pending instances ─── db.work_items

One batch at a time, in order, so the first path of a SOP Instance UID still owns it. The ledger answers an error with
its type alone (a database's message can quote the rows' values) and stops; the caller then records that batch and
the rest itself (``worker.embedded._Walk``), where the database says again what is wrong, as it would have without
the ledger: the run stops on a read-only or full database with the fix, and goes on after a passing error. The ledger
comes from the reader processes' forkserver (``worker.readers.process_context``), so it ignores a stop signal sent to
the process group as they do; it ends when its pipe closes (the run ended, or was killed).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from db.store import Database
from neuron.work import FileEntry, Route, WorkItem
from worker.readers import name_process

log = logging.getLogger(__name__)

_OK, _FAILED = "ok", "failed"


def record_batch(db: Database, entries: list[FileEntry], routes: Sequence[Route]) -> dict[str, WorkItem]:
    """Record a batch of index entries (in walk order); the pending WorkItems of their files, by path. What the ledger
    process does, and what the run does itself when the ledger has stopped."""
    db.add_files(entries)
    return {w.file_path: w for w in db.work_items(routes=routes, paths=[e.path for e in entries])}


class IndexLedger:
    """The driving process's side. ``admit`` returns None once the ledger cannot answer; the caller then indexes in
    its own process."""

    def __init__(self, url: str, routes: Sequence[Route], context):
        parent, child = context.Pipe()
        self._process = context.Process(target=ledger_main, name="neuron-ledger", daemon=True,
                                        args=(child, url, [Route(r).value for r in routes]))
        self._process.start()
        child.close()
        self._conn = parent
        self.stopped: str | None = None  # why the ledger stopped answering

    def admit(self, entries: list[FileEntry]) -> dict[str, WorkItem] | None:
        """Record these entries (in walk order); the pending WorkItems of their files by path. None when the ledger
        has stopped, or stops now: the entries are then not recorded (a refused batch is one transaction)."""
        if self._conn is None:
            return None
        try:
            self._conn.send(entries)
            kind, payload = self._conn.recv()
        except (EOFError, OSError) as exc:  # the process ended (killed, out of memory)
            self._stop(f"its process ended ({type(exc).__name__}, exit code {self._process.exitcode})")
            return None
        if kind != _OK:
            self._stop(f"the database refused a batch of the index there ({payload})")
            return None
        return payload

    def _stop(self, why: str) -> None:
        self.stopped = why
        log.warning("the index ledger stopped: %s; this process indexes the rest of the walk", why)
        self.close()

    def close(self) -> None:
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


def ledger_main(conn, url: str, routes: list[str]) -> None:
    """The ledger process: a batch of entries in, the pending WorkItems of their files out, until the pipe closes."""
    name_process("neuron-ledger")
    db = Database(url)
    try:
        while True:
            try:
                entries = conn.recv()
            except (EOFError, OSError):
                return
            if entries is None:
                return
            try:
                found = record_batch(db, entries, [Route(r) for r in routes])
            except Exception as exc:  # noqa: BLE001 - the caller records the batch itself and hears the details
                conn.send((_FAILED, type(exc).__name__))
                return
            conn.send((_OK, found))
    finally:
        db.dispose()
