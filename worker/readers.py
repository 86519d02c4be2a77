"""Reader processes: files in, frames out in shared-memory slots, so per-image Python runs off the interpreter that
drives the device (the shape of PyTorch's DataLoader: worker processes, shared memory, small records back).

    feeder (driving process) ── (request id, slot, WorkItem) ──► reader process k (its own pipe)
        reader: parse the header once, read the selected frames straight from the file into the slot
        ◄── (request id, [frame records: slot offset, shape, dtype, display parameters, decoder] | error) ── pipe
    receiver thread (driving process): the records become DecodedFrames viewing the slot; the caller's callback

Processes come from the ``forkserver`` start method: the server is started once, clean (no CUDA, no threads), with
this module preloaded, so a pool starts in milliseconds and never forks the driving process (by spawn where TMPDIR is
too deep for the server's Unix socket: ``start_method``). A frame that does not fit in its slot (a slot holds one
file) comes back inline through the pipe.

A reader process that dies (a decoder crash, the OOM killer) fails only the files it held: each is tried once more
on another reader, then failed with the reason; their slots return and a new reader takes the dead one's place.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import math
import multiprocessing
import os
import pickle
import selectors
import signal
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from neuron.errors import DecodeError, TransientReadError
from neuron.routes import PopulationPolicy
from neuron.settings import Settings, swap_prefix
from neuron.work import FileEntry, Route, Status, WorkItem
from neuron_models.image import DecodedFrame, EncodedFrame
from producer.scan import UNREAD_MTIME, Opened, index_and_open
from worker.decode import DEFER_BYTES, decode_dataset, decode_instance
from worker.slots import SlotPool, aligned, attach

log = logging.getLogger(__name__)

# A reader's read: given the item and the default read (a callable taking the allocator), return its frames. Tests
# put a gate or a fault in front of the real read with a picklable hook (it runs in the reader process).
ReadHook = Callable[[WorkItem, Callable[[], list]], list]


@dataclass(frozen=True)
class IndexItem:
    """A file to index and, when it holds an instance to screen, to read in the same pass (the embedded run): the
    reader answers its ``FileEntry`` first, then its frames. ``seq`` is its place in the walk: entries are recorded
    in that order (the first path of a SOP Instance UID owns it)."""

    seq: int
    path: str


@dataclass(frozen=True)
class ReaderConfig:
    """What a reader process needs, picklable: the decode limits and the path map of the settings, and for index
    requests the route override and the --patient-key secret (it stays in memory, like every setting)."""

    max_frames: int
    max_pixels: int
    defer_syntaxes: frozenset[str]
    path_map: tuple[tuple[str, str], ...] = ()
    hook: ReadHook | None = None
    route_override: Route | None = None
    patient_secret: str | None = field(default=None, repr=False)
    population_policy: PopulationPolicy = PopulationPolicy.FLAG  # the gate of index requests (--population-policy)

    @classmethod
    def of(cls, settings: Settings, defer_syntaxes: frozenset[str], hook: ReadHook | None = None) -> ReaderConfig:
        return cls(settings.max_frames, settings.max_pixels, frozenset(defer_syntaxes), settings.path_map, hook,
                   settings.route_override, settings.patient_key, settings.population_policy)

    def to_local(self, path: str) -> str:
        return swap_prefix(path, self.path_map)


@dataclass(frozen=True)
class SlotFrame:
    """A decoded frame whose pixels a reader left in its slot: everything but the pixels."""

    sop_instance_uid: str
    frame: int
    offset: int
    shape: tuple[int, ...]
    dtype: str
    params: object  # neuron_models.image.PixelParams
    decoder: str | None


class _Allocator:
    """Bump allocation of a reader's slot; an array that does not fit gets numpy's own memory (sent inline)."""

    def __init__(self, region: np.ndarray):
        self.region, self.used = region, 0

    def __call__(self, shape: tuple[int, ...], dtype) -> np.ndarray:
        dt = np.dtype(dtype)
        nbytes = math.prod(shape) * dt.itemsize  # math.prod: numpy's reduction costs microseconds per call
        start = aligned(self.used)
        if start + nbytes > self.region.nbytes:
            return np.empty(shape, dt)
        self.used = start + nbytes
        return self.region[start:start + nbytes].view(dt).reshape(shape)

    def offset_of(self, arr: np.ndarray) -> int | None:
        """Where ``arr`` lies in the slot, if it is a contiguous view of it."""
        base = self.region.ctypes.data
        at = arr.ctypes.data - base
        if arr.flags.c_contiguous and 0 <= at and at + arr.nbytes <= self.region.nbytes:
            return at
        return None

    def place(self, arr: np.ndarray) -> np.ndarray:
        """``arr`` in the slot (copied there if it is not there already and fits); else ``arr`` itself (inline)."""
        if self.offset_of(arr) is not None:
            return arr
        dest = self(arr.shape, arr.dtype)
        if self.offset_of(dest) is None:
            return arr
        dest[...] = arr
        return dest


def read_into_slot(cfg: ReaderConfig, item: WorkItem, region: np.ndarray, opened: Opened | None = None) -> list:
    """One request, in a reader process: the frames of ``item`` as records (``SlotFrame``), or inline frames.
    ``opened``: the file, already open and parsed by indexing (read without parsing it again)."""
    alloc = _Allocator(region)

    def read() -> list:
        if opened is not None and opened.dataset is not None:
            return decode_dataset(opened.dataset, opened.fp, item.sop_instance_uid, cfg.max_frames, cfg.max_pixels,
                                  defer_syntaxes=cfg.defer_syntaxes, allocate=alloc)
        return decode_instance(cfg.to_local(item.file_path), item.sop_instance_uid, cfg.max_frames, cfg.max_pixels,
                               defer_syntaxes=cfg.defer_syntaxes, allocate=alloc)

    frames = cfg.hook(item, read) if cfg.hook is not None else read()
    out: list = []
    for f in frames:
        if isinstance(f, EncodedFrame):
            out.append(f)
            continue
        pixels = alloc.place(f.pixels)
        at = alloc.offset_of(pixels)
        if at is None:
            out.append(f)  # inline: larger than what is left of the slot
        else:
            out.append(SlotFrame(f.sop_instance_uid, f.frame, at, tuple(pixels.shape), pixels.dtype.str, f.params,
                                 f.decoder))
    return out


def name_process(name: str) -> None:
    """Give this process a name of its own in ``ps``, ``top`` and /proc (the kernel's ``comm``, 15 bytes at most),
    so an operator, and ``neuron bench``'s CPU by process, tell readers and the ledger from the forkserver
    they share a command line with. Best effort: the name changes nothing else."""
    try:
        with open("/proc/self/comm", "w") as fh:
            fh.write(name[:15])
    except OSError:
        pass


def _reader_main(requests: Connection, results: Connection, shm_name: str, slot_bytes: int,
                 cfg: ReaderConfig) -> None:
    """A reader process: requests until None; each answered with frame records or the exception it raised."""
    # A stop signal sent to the whole process group (Ctrl-C in a terminal, systemd's default KillMode=control-group,
    # `kill -TERM -PGID`) is the parent's to act on: it finishes or hands back what is in flight, then closes the
    # requests, which ends this loop (so does the parent's death: EOF). A reader that died of it left the studies a
    # worker was draining at a warm shutdown unread. A forked reader has ignored both since its fork
    # (worker.reader_signals); this is for a spawned one, which ignores them from here on.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    name_process("neuron-reader")
    shm = attach(shm_name)
    array = np.ndarray((shm.size,), dtype=np.uint8, buffer=shm.buf)
    try:
        while (request := requests.recv()) is not None:
            rid, slot, item = request
            started = time.perf_counter()
            opened = None
            try:
                if isinstance(item, IndexItem):  # index first: the entry goes back before the pixels are read
                    # gated here: a film the gate skips comes back without its file open, so it is never read
                    entry, opened = index_and_open(Path(cfg.to_local(item.path)), cfg.route_override,
                                                   cfg.patient_secret, defer_size=DEFER_BYTES,
                                                   policy=cfg.population_policy)
                    results.send((rid, ENTRY, pack_entry(entry), 0.0))
                    if opened is None:
                        results.send((rid, NOTHING, None, time.perf_counter() - started))
                        continue
                    inst = entry.instance.header
                    item = WorkItem(inst.sop_instance_uid, entry.path, entry.instance.route, inst.frames)
                records = read_into_slot(cfg, item, array[slot * slot_bytes:(slot + 1) * slot_bytes], opened)
                answer = (rid, FRAMES, records, time.perf_counter() - started)
            except BaseException as exc:  # every failure is the request's answer; the caller classifies it
                answer = (rid, ERROR, exc, time.perf_counter() - started)
            finally:
                if opened is not None and opened.fp is not None:
                    opened.fp.close()
            try:
                results.send(answer)
            except Exception as exc:  # an exception that does not pickle: its type and text still travel
                results.send((rid, ERROR, DecodeError(f"{type(exc).__name__} while reading: {answer[2]!r}"),
                              answer[3]))
    except EOFError:
        pass
    finally:
        del array
        shm.close()


# What a reader sends back, as (request id, kind, payload, seconds): an index request's FileEntry first (packed:
# ``pack_entry``), then one final answer per request: its frame records, the exception it raised, or nothing to read.
ENTRY, FRAMES, ERROR, NOTHING = "entry", "frames", "error", "nothing"

# done(item, slot, frames | exception | None (nothing to read), seconds the request took)
Done = Callable[[WorkItem, int, "list | BaseException | None", float], None]
# entry(item, packed FileEntry): an index request's entry, before its frames
OnEntry = Callable[[IndexItem, bytes], None]


def pack_entry(entry: FileEntry) -> bytes:
    """An index entry as a reader sends it: pickled where it was made, so the driving process hands it to whoever
    records it (the embedded run's ledger) without reading it; unpickling each FileEntry there and pickling it
    again for the ledger held that process's GIL for about 0.1 ms per file. ``unpack_entry`` reads it back."""
    return pickle.dumps(entry, protocol=pickle.HIGHEST_PROTOCOL)


def unpack_entry(packed: bytes) -> FileEntry:
    return pickle.loads(packed)


@dataclass
class _Request:
    item: WorkItem | IndexItem
    slot: int
    done: Done
    reader: int
    tries: int = 0
    on_entry: OnEntry | None = None
    entered: bool = False


@dataclass
class _Reader:
    process: multiprocessing.Process
    requests: Connection
    results: Connection
    held: set[int] = field(default_factory=set)


# multiprocessing's forkserver listens on a Unix socket at TMPDIR/pymp-XXXXXXXX/listener-XXXXXXXX; a socket path
# longer than sun_path (108 bytes with its NUL on Linux, unix(7)) cannot be bound
_SOCKET_PATH_MAX = 107 - len("/pymp-12345678/listener-12345678")


def start_method() -> str:
    """How reader processes start: from a forkserver (one clean parent, ``worker.readers`` imported once, no threads
    or CUDA state inherited), or by spawn when the temporary folder is too deep for the forkserver's socket (slower
    to start, the same readers)."""
    tmp = tempfile.gettempdir()
    if len(os.fsencode(tmp)) <= _SOCKET_PATH_MAX:
        return "forkserver"
    log.info("the temporary folder %s is longer than the %d bytes a forkserver socket path leaves it (unix(7)): "
             "reader processes start by spawn; a shorter TMPDIR starts them faster", tmp, _SOCKET_PATH_MAX)
    return "spawn"


def process_context():
    """The multiprocessing context of the reader processes and of the ledger
    (``worker.ledger``): ``start_method``'s, and for a forkserver its preloads, set before anything starts the server
    (it is one per process, and takes its preloads when it starts)."""
    context = multiprocessing.get_context(start_method())
    if context.get_start_method() == "forkserver":
        # worker.reader_signals: the server and every process it forks ignore a stop signal sent to the group;
        # worker.ledger (the database layer) imported once in the server, so a ledger starts answering at once
        context.set_forkserver_preload(["worker.readers", "worker.reader_signals", "worker.ledger"])
    return context


class ReaderPool:
    """``n`` reader processes over one SlotPool. ``submit`` queues a file; each idle reader takes the next one; ``done(
    item, slot, frames | exception, seconds)`` is called on the pool's receiver thread. Frames are views of the slot,
    valid until the caller releases it."""

    def __init__(self, n: int, cfg: ReaderConfig, slots: SlotPool):
        self.cfg, self.slots = cfg, slots
        self.context = process_context()
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._requests: dict[int, _Request] = {}
        self._waiting: deque[_Request] = deque()
        self._answering = 0
        # what the receiver thread waits on: each reader's results pipe and its process's sentinel, registered once
        # (a selector built per wait cost more of the driving process's GIL than the answers' records)
        self._selector = selectors.DefaultSelector()
        self._readers: list[_Reader] = [self._start() for _ in range(max(1, n))]
        self._closed = False
        self.deaths = 0
        self._receiver = threading.Thread(target=self._receive, name="read-receiver", daemon=True)
        self._receiver.start()
        # at exit, before multiprocessing ends its daemonic children (atexit runs last-registered first): the readers
        # stop as readers, not as deaths to recover from
        atexit.register(self.close)

    def _start(self) -> _Reader:
        req_recv, req_send = self.context.Pipe(duplex=False)
        res_recv, res_send = self.context.Pipe(duplex=False)
        process = self.context.Process(target=_reader_main, name="neuron-reader", daemon=True,
                                       args=(req_recv, res_send, self.slots.name, self.slots.slot_bytes, self.cfg))
        process.start()
        req_recv.close()
        res_send.close()
        reader = _Reader(process, req_send, res_recv)
        self._selector.register(res_recv, selectors.EVENT_READ, (reader, False))
        self._selector.register(process.sentinel, selectors.EVENT_READ, (reader, True))
        return reader

    # -- the caller's side ------------------------------------------------------------------------------------------
    def submit(self, item: WorkItem | IndexItem, slot: int, done: Done, on_entry: OnEntry | None = None) -> None:
        with self._lock:
            self._waiting.append(_Request(item, slot, done, -1, on_entry=on_entry))
            self._dispatch()

    def _dispatch(self) -> None:
        """Under the lock: one file at a time to each idle reader, so a reader stalled on a slow file holds back
        nothing else (the others take what is waiting), and a reader that dies held one file."""
        for k, reader in enumerate(self._readers):
            if not self._waiting:
                return
            if not reader.held:
                req = self._waiting.popleft()
                rid = next(self._ids)
                req.reader = k
                self._requests[rid] = req
                reader.held.add(rid)
                reader.requests.send((rid, req.slot, req.item))

    def frames(self, records: Sequence, slot: int) -> list[DecodedFrame | EncodedFrame]:
        """Frame records as frames: slot records become views of the slot."""
        out = []
        for r in records:
            if isinstance(r, SlotFrame):
                out.append(DecodedFrame(r.sop_instance_uid, r.frame, self.slots.frame(slot, r.offset, r.shape,
                                                                                     r.dtype), r.params, r.decoder))
            else:
                out.append(r)
        return out

    @property
    def in_flight(self) -> int:
        """Requests waiting, being read, or whose answer is being handed to the caller."""
        with self._lock:
            return len(self._requests) + len(self._waiting) + self._answering

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight (a stopped run's reads finish before their slots are reused)."""
        deadline = time.monotonic() + timeout
        while self.in_flight:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            readers = list(self._readers)
        atexit.unregister(self.close)
        for r in readers:
            try:
                r.requests.send(None)
            except OSError:
                pass
        for r in readers:
            r.process.join(timeout=5)
            if r.process.is_alive():
                r.process.terminate()
                r.process.join(timeout=5)
        self._receiver.join(timeout=5)
        for r in readers:
            r.requests.close()
            r.results.close()
        self._selector.close()

    # -- the receiver thread ----------------------------------------------------------------------------------------
    def _fail_all(self, error: BaseException) -> None:
        """Under the lock: every request in flight or waiting ends with ``error`` (called on its own thread)."""
        requests = list(self._requests.values()) + list(self._waiting)
        self._requests.clear()
        self._waiting.clear()
        for r in self._readers:
            r.held.clear()
        for req in requests:
            threading.Thread(target=req.done, args=(req.item, req.slot, error, 0.0), daemon=True).start()

    def _receive(self) -> None:
        while True:
            with self._lock:
                if self._closed and not any(r.process.is_alive() for r in self._readers):
                    return
            try:
                ready = self._selector.select(timeout=0.2)
            except (OSError, ValueError):  # closed under the wait: the loop's check above ends it
                time.sleep(0.01)
                continue
            for key, _ in ready:
                reader, ended = key.data
                if not ended:
                    self._answer(reader)
                elif not self._closed:
                    self._died(reader)
                else:  # closed, and this reader ended: nothing more to wait for from it
                    self._forget(reader)

    def _forget(self, reader: _Reader) -> None:
        """Stop waiting on a reader that ended (on the receiver thread, which alone waits on the selector)."""
        for handle in (reader.results, reader.process.sentinel):
            try:
                self._selector.unregister(handle)
            except (KeyError, ValueError, OSError):
                pass

    def _answer(self, reader: _Reader, drain: bool = False) -> None:
        """The reader's next message (its pipe is readable: the selector said so), or with ``drain`` every message
        waiting in its pipe."""
        try:
            self._take(reader, reader.results.recv())
            while drain and reader.results.poll():
                self._take(reader, reader.results.recv())
        except (EOFError, OSError):
            pass  # the process ended: its sentinel says so

    def _take(self, reader: _Reader, message: tuple) -> None:
        rid, kind, payload, seconds = message
        if kind == ENTRY:
            with self._lock:
                req = self._requests.get(rid)
            if req is not None and req.on_entry is not None and not req.entered:
                req.entered = True
                req.on_entry(req.item, payload)
            return
        with self._lock:
            req = self._requests.pop(rid, None)
            reader.held.discard(rid)
            self._dispatch()
            self._answering += req is not None
        if req is not None:
            try:
                result = self.frames(payload, req.slot) if kind == FRAMES else payload
                req.done(req.item, req.slot, result, seconds)
            finally:
                with self._lock:
                    self._answering -= 1

    def _died(self, reader: _Reader) -> None:
        """A reader ended while holding files: each goes to another reader once, then fails with the reason."""
        self._answer(reader, drain=True)  # what it sent before it died still counts
        code = reader.process.exitcode
        with self._lock:
            if reader not in self._readers:
                self._forget(reader)
                return
            self.deaths += 1
            index = self._readers.index(reader)
            try:
                self._readers[index] = self._start()
            except OSError as exc:  # the process is ending (its forkserver gone): nothing more is read
                self._closed = True
                self._fail_all(TransientReadError(f"the reader processes could not be restarted ({exc}); the file "
                                                  "is read again by the next run"))
                return
            orphans = [(rid, self._requests.pop(rid)) for rid in sorted(reader.held) if rid in self._requests]
            retried, failed = [], []
            for _, req in orphans:
                if req.tries == 0:
                    req.tries = 1
                    self._waiting.appendleft(req)
                    retried.append(req)
                else:
                    failed.append(req)
            self._dispatch()
        log.warning("a reader process ended (exit code %s) while reading %d file(s); %d sent to another reader, %d "
                    "failed", code, len(orphans), len(retried), len(failed))
        self._forget(reader)
        reader.requests.close()
        reader.results.close()
        for req in failed:
            if isinstance(req.item, IndexItem) and req.on_entry is not None and not req.entered:
                req.entered = True  # indexing never answered: the file is recorded as failed, read again next run
                req.on_entry(req.item, pack_entry(FileEntry(req.item.path, -1, UNREAD_MTIME, Status.FAILED, (
                    f"the reader process ended (exit code {code}) while reading this file's header, twice: check it "
                    "with dciodvfy or re-export it from the source; the next run reads it again"))))
            req.done(req.item, req.slot, DecodeError(
                f"the reader process ended (exit code {code}) while reading this file, and again on a second try: "
                "the file makes its decoder crash or exhaust memory; check it with dciodvfy, re-export it from the "
                "source, then run again with --retry-failed"), 0.0)
