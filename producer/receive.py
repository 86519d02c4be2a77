"""What happens to one DICOM instance received over the network, before its sender hears "success".

    C-STORE (the listener, or a C-GET sub-operation of ``neuron pull``)
      ──► admission: the store's volume keeps its free-space watermark, the backlog stays under its limit;
          otherwise "Refused: Out of Resources" (0xA7xx, PS3.4 B.2.3) and nothing is written
      ──► store: the raw bytes as received (never decoded, never transcoded), under the hash of their content:
          written to OUT/received/.partial/, fsync'ed, renamed to OUT/received/ab/<sha256>.dcm, the folder fsync'ed
      ──► index: the header pass of a folder scan (``producer.scan.index_entry``) committed by one indexer thread in
          group commits (instances ``pending``, duplicates ``duplicate``, unscreenable ones ``skipped``)
      ──► success, and the arrivals tracker (``producer.arrivals``) learns of the instance

So a success means the instance is on disk and in the database: a process killed the next moment screens it when it
starts again (``InstanceStore.recover`` removes what an interrupted write left in ``.partial``; nothing else is ever
half-written, since an aborted association never reaches the handler). File names are hashes of the content, never
UIDs: the same instance sent twice is stored once (the second is acknowledged without a write), and a changed instance
with a known SOP Instance UID is a second file that the index records as a ``duplicate``, as a folder scan would.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import write_file_meta_info

from db.network import backlog, is_indexed, last_indexed_under
from db.store import Database
from neuron.dicomnet import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, OUT_OF_RESOURCES_QUEUE, SUCCESS
from neuron.routes import PopulationPolicy
from neuron.work import FileEntry, Status
from producer.arrivals import Arrivals
from producer.scan import index_entry

log = logging.getLogger(__name__)

STORE_FOLDER = "received"
PARTIAL_FOLDER = ".partial"
INDEX_FAILED = 0xA702  # "Refused: Out of Resources" (A7xx): the database did not take the index; the sender retries
INDEX_WAIT_S = 120.0
RECOVERY_MARGIN_S = 2 * INDEX_WAIT_S  # a file written this long before the last commit was indexed or refused


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class InstanceStore:
    """Received instances, durable and named by content, in one folder under the output folder."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.partial = self.root / PARTIAL_FOLDER
        self.partial.mkdir(parents=True, exist_ok=True)

    @classmethod
    def under(cls, out_dir: Path) -> InstanceStore:
        return cls(Path(out_dir) / STORE_FOLDER)

    def recover(self) -> int:
        """Remove what a killed process left half-written; returns how many. Such a file was never acknowledged:
        its sender was told nothing, and sends it again."""
        removed = 0
        for leftover in self.partial.iterdir():
            leftover.unlink(missing_ok=True)
            removed += 1
        if removed:
            log.warning("removed %d partly written instance(s) from %s: their transfers were interrupted before "
                        "they were acknowledged, so their senders send them again", removed, self.partial)
        return removed

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def path_for(self, digest: str) -> Path:
        return self.root / digest[:2] / f"{digest}.dcm"

    def put(self, meta: bytes, data: memoryview, digest: str) -> tuple[Path, bool]:
        """Write meta + data durably under the digest; (path, False) when that content is stored already."""
        final = self.path_for(digest)
        if final.exists():
            return final, False
        folder = final.parent
        new_folder = not folder.is_dir()
        folder.mkdir(exist_ok=True)
        tmp = self.partial / f"{digest}.{os.getpid()}.{threading.get_ident()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
        try:
            for chunk in (memoryview(meta), data):
                written = 0
                while written < len(chunk):
                    written += os.write(fd, chunk[written:])
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.replace(tmp, final)
        _fsync_folder(folder)
        if new_folder:
            _fsync_folder(self.root)
        return final, True


class Indexer:
    """One thread that indexes stored files in group commits: what is waiting when the thread comes round is
    committed in one transaction, so parallel associations share commits. ``submit`` returns a future of the file's
    ``FileEntry``, set once it is committed, or the commit's exception."""

    def __init__(self, db: Database, patient_secret: str | None = None, max_batch: int = 64,
                 policy: PopulationPolicy | str = PopulationPolicy.FLAG):
        self.db, self.secret, self.max_batch = db, patient_secret, max_batch
        self.policy = PopulationPolicy(policy)  # the gate of each received instance (--population-policy)
        self._queue: queue.Queue[tuple[Path, Future] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="indexer", daemon=True)
        self._thread.start()

    def submit(self, path: Path) -> Future:
        fut: Future = Future()
        self._queue.put((path, fut))
        return fut

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=60)

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[tuple[Path, Future]]) -> None:
        try:
            entries = [index_entry(path, None, self.secret, self.policy) for path, _ in batch]
            self.db.add_files(entries)
        except Exception as exc:  # the database refused or is away: every instance of this commit is refused
            for _, fut in batch:
                fut.set_exception(exc)
            return
        for (_, fut), entry in zip(batch, entries, strict=True):
            fut.set_result(entry)


@dataclass(frozen=True)
class Admission:
    """What the receiver refuses to take: a write that would leave less than ``min_free_bytes`` on the store's volume,
    and any instance while ``max_backlog`` instances wait to be screened (None: no limit)."""

    min_free_bytes: int = 0
    max_backlog: int | None = None
    backlog_cache_s: float = 1.0


@dataclass(frozen=True)
class Received:
    status: int
    comment: str | None = None
    entry: FileEntry | None = None
    size: int = 0


def store_status(status: int, comment: str | None) -> int | Dataset:
    """A C-STORE response for pynetdicom: the status, with an Error Comment when there is something to say."""
    if comment is None:
        return status
    rsp = Dataset()
    rsp.Status = status
    rsp.ErrorComment = comment[:64]  # (0000,0902), LO: 64 characters (PS3.7 E.1)
    return rsp


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


class Receiver:
    """Admission, store and index of received instances (module docstring); shared by the listener and ``neuron
    pull``'s C-GET. Thread-safe: each association calls ``receive`` from its own thread."""

    def __init__(self, db: Database, store: InstanceStore, indexer: Indexer, admission: Admission = Admission(),
                 arrivals: Arrivals | None = None, clock: Callable[[], float] = time.monotonic):
        self.db, self.store, self.indexer, self.admission = db, store, indexer, admission
        self.arrivals, self.clock = arrivals, clock
        self.lock = threading.Lock()  # guards the arrivals tracker and the backlog cache
        self._backlog: tuple[float, int] | None = None
        self.stored = self.resent = self.refused = 0

    def _backlog_now(self) -> int:
        now = self.clock()
        with self.lock:
            cached = self._backlog
        if cached is not None and now - cached[0] < self.admission.backlog_cache_s:
            return cached[1]
        n = backlog(self.db)
        with self.lock:
            self._backlog = (now, n)
        return n

    def refusal(self, size: int) -> Received | None:
        """Out of resources, or None when the instance can be kept."""
        free = self.store.free_bytes()
        if free - size < self.admission.min_free_bytes:
            return Received(OUT_OF_RESOURCES, f"disk below watermark: {_gb(free)} free", size=size)
        limit = self.admission.max_backlog
        if limit is not None and self._backlog_now() >= limit:
            return Received(OUT_OF_RESOURCES_QUEUE, f"queue full: {limit} instances wait", size=size)
        return None

    def receive(self, file_meta: FileMetaDataset, data: memoryview, track: bool = True) -> Received:
        """Keep one instance (the dataset's raw bytes as received, and the file meta of the association). Never raises:
        every outcome is a DIMSE status for the sender."""
        size = len(data)
        refused = self.refusal(size)
        if refused is not None:
            with self.lock:
                self.refused += 1
            return refused
        try:
            meta = BytesIO()
            meta.write(b"\x00" * 128 + b"DICM")
            write_file_meta_info(meta, file_meta, enforce_standard=True)
            ts = str(file_meta.TransferSyntaxUID)
            hasher = hashlib.sha256(ts.encode() + b"\x00")
            hasher.update(data)  # hashlib releases the GIL on large buffers: associations hash in parallel
            digest = hasher.hexdigest()
            path, created = self.store.put(meta.getbuffer(), data, digest)
        except OSError as exc:  # a full or failing disk between the check and the write
            log.error("could not store a received instance in %s: %s", self.store.root, exc.strerror or exc)
            with self.lock:
                self.refused += 1
            return Received(OUT_OF_RESOURCES, f"store failed: {exc.strerror or type(exc).__name__}"[:64], size=size)
        if not created and self._indexed(path):
            with self.lock:
                self.resent += 1
            return Received(SUCCESS, size=size)  # the same bytes again: stored and indexed already
        try:
            entry = self.indexer.submit(path).result(timeout=INDEX_WAIT_S)
        except Exception as exc:  # the file is durable; the index is not: refuse, the sender sends it again
            log.error("a received instance was stored but the database did not take its index (%s: %s); it was "
                      "refused, so its sender sends it again", type(exc).__name__, exc)
            return Received(INDEX_FAILED, "database unavailable", size=size)
        with self.lock:
            self.stored += 1
            if track and self.arrivals is not None and entry.instance is not None \
                    and entry.instance.status is Status.PENDING:
                header = entry.instance.header
                self.arrivals.arrived(header.study_instance_uid, header.series_instance_uid, self.clock())
        if entry.instance is None and entry.status is Status.FAILED:
            # kept and recorded with its reason (ingest_status), but the sender must know it was not usable
            return Received(CANNOT_UNDERSTAND, (entry.reason or "unreadable header")[:64], entry, size)
        return Received(SUCCESS, None, entry, size)

    def _indexed(self, path: Path) -> bool:
        return is_indexed(self.db, str(path.resolve()))

    def due(self) -> list[str]:
        """Studies the completeness rules release now (and forget)."""
        if self.arrivals is None:
            return []
        with self.lock:
            ready = self.arrivals.due(self.clock())
        for _study, why in ready:  # the UID is not logged
            log.info("study complete (%s): released for screening", why.value)
        return [study for study, _ in ready]

    def recover(self) -> int:
        """After a restart: remove half-written files, then index what was stored but not indexed when the process
        stopped (a crash between the rename and the commit, or a commit the database refused: its sender was not told
        success, but the file is kept). Only files written since shortly before the last indexed one are looked at
        (a store of millions of files is not listed in full at every start)."""
        self.store.recover()
        last = last_indexed_under(self.db, str(self.store.root.resolve()) + os.sep)
        since = None if last is None else last.timestamp() - RECOVERY_MARGIN_S
        missing = []
        for folder in sorted(self.store.root.glob("??")):
            if since is not None and folder.stat().st_mtime < since:
                continue  # nothing was added to this folder since then
            for path in sorted(folder.glob("*.dcm")):
                if (since is None or path.stat().st_mtime >= since) and not self._indexed(path):
                    missing.append(path)
        for start in range(0, len(missing), 64):
            for fut in [self.indexer.submit(p) for p in missing[start:start + 64]]:
                fut.result(timeout=INDEX_WAIT_S)
        if missing:
            log.warning("indexed %d stored instance(s) that were not indexed when the last process stopped",
                        len(missing))
        return len(missing)


def open_receiver(db: Database, out_dir: Path, admission: Admission = Admission(), arrivals: Arrivals | None = None,
                  patient_secret: str | None = None, policy: PopulationPolicy | str = PopulationPolicy.FLAG
                  ) -> Receiver:
    """The store under OUT/received, its indexer (gating each instance by ``policy``) and the receiver, recovered from
    whatever a killed process left."""
    receiver = Receiver(db, InstanceStore.under(out_dir), Indexer(db, patient_secret, policy=policy), admission,
                        arrivals)
    receiver.recover()
    return receiver
