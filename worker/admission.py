"""Admission: the embedded run indexes and reads each new file in one pass of a reader process; this stage records
the entries in walk order and joins each file's frames to what indexing decided about it.

    reader: FileEntry (after the header, packed: ``worker.readers.pack_entry``; this stage never unpacks it)
            ──► entries, put back in walk order ──► admit(batch) (db.add_files; which instances are now to screen)
    reader: frames (after the pixels)    ──► held until their file is admitted ──► forward(decision, frames)

Entries are recorded in walk order so the first path of a SOP Instance UID owns it, as a scan records them; a batch
goes once ``batch`` entries are waiting in order, or ``max_wait`` seconds after the first of them arrived, so the
first batch reaches the device while the walk goes on. Frames never wait for other files' frames: only for their own
file's decision.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from neuron.work import WorkItem
from worker.readers import IndexItem

# admit(entries in walk order, each packed) -> for each: the WorkItem to screen from the frames read, or None
Admit = Callable[[list[tuple[IndexItem, bytes]]], list[WorkItem | None]]
# forward(decision, item, slot, frames | exception | None)
Forward = Callable[[WorkItem | None, IndexItem, int, object], None]


@dataclass
class Admission:
    admit: Admit
    forward: Forward
    batch: int = 64
    max_wait: float = 0.1
    _entries: dict[int, tuple[IndexItem, bytes, float]] = field(default_factory=dict)
    _frames: dict[int, tuple[int, object]] = field(default_factory=dict)
    _decided: dict[int, WorkItem | None] = field(default_factory=dict)
    _next: int = 0
    _total: int | None = None
    failure: BaseException | None = None

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="indexer", daemon=True)
        self._thread.start()

    # -- what the readers deliver (the reader pool's receiver thread) ------------------------------------------------
    def entry(self, item: IndexItem, entry: bytes) -> None:
        with self._cond:
            self._entries[item.seq] = (item, entry, time.monotonic())
            # the stage's thread looks again every max_wait / 2 anyway: woken for the first entry waiting (its wait
            # starts) and once a batch may be full, not for every file (a wake-up per file was 0.03 ms of GIL each)
            if len(self._entries) == 1 or len(self._entries) >= self.batch:
                self._cond.notify()

    def frames(self, item: IndexItem, slot: int, result: object) -> None:
        with self._cond:
            if item.seq not in self._decided:
                self._frames[item.seq] = (slot, result)
                return
            decision = self._decided.pop(item.seq)
        self.forward(decision, item, slot, result)

    def finish(self, total: int) -> None:
        """Every index request has been sent: ``total`` entries will come."""
        with self._cond:
            self._total = total
            self._cond.notify()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=30)

    # -- the stage's thread ------------------------------------------------------------------------------------------
    def _ready(self) -> list[tuple[IndexItem, bytes]] | None:
        """Under the lock: the in-order entries to record now, or None to keep waiting."""
        run, seq = [], self._next
        while seq in self._entries and len(run) < self.batch:
            run.append(seq)
            seq += 1
        if not run:
            return None
        complete = self._total is not None and seq >= self._total
        oldest = min(self._entries[s][2] for s in run)
        if len(run) < self.batch and not complete and time.monotonic() - oldest < self.max_wait:
            return None
        self._next = seq
        return [self._entries.pop(s)[:2] for s in run]

    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    while (batch := self._ready()) is None:
                        if self._stopped or (self._total is not None and self._next >= self._total):
                            return
                        self._cond.wait(timeout=self.max_wait / 2)
                decisions = self.admit(batch)
                ready = []
                with self._cond:
                    for (item, _), decision in zip(batch, decisions, strict=True):
                        if item.seq in self._frames:
                            ready.append((decision, item, *self._frames.pop(item.seq)))
                        else:
                            self._decided[item.seq] = decision
                for decision, item, slot, result in ready:
                    self.forward(decision, item, slot, result)
        except BaseException as exc:  # the database refused the entries: the run stops and says why
            self.failure = exc
