"""The staged engine: stages joined by bounded queues, each one job on its own thread (the shape of PyTorch's
DataLoader prefetching and NVIDIA DALI's pipelines: stages overlap, queues bound the memory).

    feeder ─► reader processes (worker.readers: header parsed once, frames read into shared-memory slots)
        ─► decoded queue, in completion order
        ─► batcher (BatchPolicy: by route, by size, by max_wait_ms) ─► stager (packs a batch into a pinned buffer)
        ─► device (one upload on a copy stream; preprocessing, model job and overlays on a compute stream; results
           copied back asynchronously) ─► results (waits for the copy, shapes rows) ─► PNG pool
        ─► outcomes queue ─► the caller's thread: sink (the database writer)

Every queue is bounded and the slots (``worker.slots``) hold the files read ahead, so memory stays flat however long
the feed: a file takes a slot before it is read and gives it back once its frames have left the device stage.
While batch N runs on the device, batch N+1 is staged and uploaded, and batch N-1's PNGs are written.

A file that cannot be read becomes its instance's Outcome with the reason, whatever the exception: it never stops
the run. Transient read errors (a network share timing out) leave the instance ``pending`` for the next attempt.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from neuron.errors import InputError, RetryableError, SetupError
from neuron.settings import Settings
from neuron.work import FrameResult, Outcome, Route, Status, WorkItem
from neuron_models.image import DecodedFrame, EncodedFrame
from worker.admission import Admission, Admit
from worker.batching import Batch, BatchPolicy
from worker.decode import decode_instance
from worker.device import DeviceJob
from worker.models import Models, default_batch_size, default_readers
from worker.readers import IndexItem, ReaderConfig, ReaderPool, ReadHook
from worker.results import ResultShaper, Transient, failure_category, failure_outcome, write_png
from worker.slots import SlotPool
from worker.stager import Stager
from worker.stats import PipelineStats

log = logging.getLogger(__name__)

IDLE = object()  # yielded by an endless feed when nothing new has arrived
_EOF = object()
_POLL = 0.1  # seconds between checks of the stop flag while a stage blocks
SLOT_BYTES = 16 << 20  # one file's frames per slot: a 4096 x 2048 16-bit radiograph; larger ones travel inline


class _Stopped(Exception):
    pass


@dataclass(eq=False)  # identity: instances are collected in sets
class _Instance:
    item: WorkItem
    expected: int
    results: list[FrameResult] = field(default_factory=list)
    error: InputError | None = None
    write_error: BaseException | None = None
    seen: int = 0
    writes: int = 0  # PNG writes not yet finished
    emitted: bool = False
    ready_at: float = field(default_factory=time.monotonic)  # decoded: its frames start waiting for a batch
    slot: int | None = None  # the shared-memory slot its frames are in, until every frame left the device stage
    released: int = 0  # frames the device stage is done with


@dataclass
class _Launched:
    """A batch launched on the device: host buffers being filled, and the event that says they are."""

    route: Route
    frames: list[tuple[_Instance, DecodedFrame]]
    prepared: object
    host: dict[str, torch.Tensor]
    event: object  # torch.cuda.Event, or None on the CPU
    last_chunk: int = 1  # 1 on the last chunk of a batch (a batch split after CUDA OOM comes in several)
    started: object = None  # torch.cuda.Event recorded before the device job (device time), or None on the CPU


def read_item(pipeline: Pipeline, item: WorkItem) -> list[DecodedFrame | EncodedFrame]:
    """One file's frames in this process, decoded or left encoded for the device decoder, as a reader process reads
    them (the decode bound, tests)."""
    s = pipeline.settings
    return decode_instance(s.to_local(item.file_path), item.sop_instance_uid, s.max_frames, s.max_pixels,
                           defer_syntaxes=pipeline.stager.defer_syntaxes)


def worker_identity(device: torch.device) -> str:
    """host/device (and the GPU's name): the ``worker`` column of results produced here."""
    gpu = f" {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
    return f"{socket.gethostname()}/{device}{gpu}"


class Pipeline:
    """The staged engine, built from its parts: the models (``worker.models``), the device job (``worker.device``),
    the stager (``worker.stager``) and the result shaper (``worker.results``), for one run's settings (batch size,
    heatmap folder, review threshold). ``run`` streams a feed through it; it may be called again (a second pass, a
    worker's engine restarted after a device error), and the counters in ``stats`` add up over the runs."""

    def __init__(self, models: Models, settings: Settings | None = None, *, worker_id: str | None = None,
                 reader: ReadHook | None = None,
                 png_writer: Callable[[str, np.ndarray], None] = write_png, clock_from: float | None = None,
                 job: DeviceJob | None = None):
        self.models = models
        self.settings = settings if settings is not None else models.settings
        self.device = models.device
        self.batch_size = self.settings.batch_size or default_batch_size(self.device)
        self.worker_id = worker_id or worker_identity(self.device)
        # the device stage's job; the benchmark's host-only mode passes one that answers at once (worker.bench)
        self.job = job if job is not None else DeviceJob(models, top_k=self.settings.heatmap_top_k)
        self.stager = Stager(self.device)
        self.shaper = ResultShaper(models, self.settings, self.worker_id)
        # a picklable hook around the reader processes' read; tests put a gate or a fault in front of the real one
        self.reader = reader
        self.png_writer = png_writer  # likewise for the heatmap writes (a full disk where no tmpfs can be mounted)
        # the time to the first batch counts from ``clock_from`` (default: the models' creation, loading included)
        self.stats = PipelineStats(self.batch_size, created_at=models.created_at if clock_from is None else clock_from)
        self.readers_n = self.settings.readers or default_readers(self.device)
        self.ahead = max(2 * self.batch_size, 4 * self.readers_n)  # files read ahead of the batcher
        self._readers: ReaderPool | None = None
        self._slots: SlotPool | None = None
        self._finalizer = weakref.finalize(self, _close, self.__dict__)

    def readers(self) -> tuple[ReaderPool, SlotPool]:
        """The reader processes and their slots, started with the first run and kept for the next ones."""
        if self._readers is None:
            n_slots = self.ahead + 2 * self.batch_size  # read ahead, and the batches between batcher and device
            self._slots = SlotPool(n_slots, SLOT_BYTES)
            if self.device.type == "cuda":
                self._slots.page_lock()
            cfg = ReaderConfig.of(self.settings, self.stager.defer_syntaxes, self.reader)
            self._readers = ReaderPool(self.readers_n, cfg, self._slots)
            self.stager.refer = self._slots.holds  # frames in slots are staged by reference: no host copy
        return self._readers, self._slots

    def close(self) -> None:
        """Stop the reader processes and unlink the slots (also done when the pipeline is collected or the process
        exits)."""
        _close(self.__dict__)

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def heatmap_dir(self):
        return self.shaper.heatmap_dir

    def run(self, items: Iterable[WorkItem | IndexItem | object], sink: Callable[[Outcome], None] | None = None,
            progress: Callable[[int], None] | None = None, admit: Admit | None = None,
            batch_sink: Callable[[list[Outcome]], None] | None = None) -> None:
        """Screen every item; call ``sink`` once per instance with its Outcome (or ``batch_sink`` once per list of the
        outcomes that finished together: a batch's), in completion order, on this thread.

        ``items`` may be endless (the distributed worker's feed) and may yield ``IDLE`` when nothing new has arrived;
        partial batches whose first frame has waited ``max_wait_ms`` are run rather than held back. ``IndexItem``s
        (files to index and read in one pass) need ``admit``, which records their entries and says which of them to
        screen (``worker.admission``)."""
        if (sink is None) == (batch_sink is None):
            raise TypeError("give the run one of sink (an outcome at a time) or batch_sink (lists of outcomes)")
        _Run(self, admit).run(items, batch_sink or (lambda outcomes: [sink(o) for o in outcomes]), progress)

    def decode_only(self, items: Iterable[WorkItem]) -> int:
        """The decode bound: files to raw frames on the device through the same readers, stager and upload as a
        run, no model. Returns the number of frames."""
        frames_total = 0
        items = [i for i in items if i.route in self.models.routes]
        with ThreadPoolExecutor(self.readers_n, thread_name_prefix="read") as readers:
            batch: dict[Route, list[DecodedFrame]] = {}
            for item, future in zip(items, [readers.submit(read_item, self, i) for i in items], strict=True):
                try:
                    frames = future.result()
                except Exception:  # counted as not decoded; a run records the reason
                    continue
                group = batch.setdefault(item.route, [])
                group.extend(frames)
                if len(group) >= self.batch_size:
                    frames_total += self._upload(item.route, group)
                    batch[item.route] = []
            for route, group in batch.items():
                if group:
                    frames_total += self._upload(route, group)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return frames_total

    def _upload(self, route: Route, frames: list[DecodedFrame]) -> int:
        frames = [f for f in self.stager.finish_decoding(frames) if not isinstance(f, InputError)]
        staged = self.stager.stage(frames)
        self.job.preprocessor(route).unit_groups(staged, self.stager.upload(staged))
        return len(frames)


def _write_all(writer: Callable[[str, np.ndarray], None], writes: list[tuple[str, np.ndarray]]
               ) -> list[BaseException | None]:
    """A batch's heatmaps, in a PNG pool thread (OpenCV's encoder releases the GIL); each write's error, or None."""
    errors: list[BaseException | None] = []
    for path, image in writes:
        try:
            writer(path, image)
            errors.append(None)
        except Exception as exc:  # the folder's fault (full, read-only): that instance stays pending, the rest go on
            errors.append(exc)
    return errors


def _close(parts: dict) -> None:
    readers, slots = parts.get("_readers"), parts.get("_slots")
    parts["_readers"] = parts["_slots"] = None
    if readers is not None:
        readers.close()
    if slots is not None:
        slots.close()


class _Run:
    """One run of the pipeline over a feed: its queues, stage threads and the instances in flight."""

    def __init__(self, pipeline: Pipeline, admit: Admit | None = None):
        self.p = pipeline
        self.admission = Admission(admit, self._admitted) if admit is not None else None
        s, batch_size = pipeline.settings, pipeline.batch_size
        self.policy: BatchPolicy[tuple[_Instance, DecodedFrame]] = BatchPolicy(batch_size, s.max_wait_ms / 1000.0)
        self.stop = threading.Event()
        self.sent = self.finished = 0  # batches handed on by the batcher / whose results are back
        self.depth = 2 if pipeline.device.type == "cuda" else 1
        self.failure: BaseException | None = None
        self.decoded: queue.Queue = queue.Queue()  # bounded by the slots: a file is read only into a free slot
        self.readers, self.slots = pipeline.readers()
        self.held: set[int] = set()  # slots this run took and has not given back
        self.to_stage: queue.Queue = queue.Queue(maxsize=2)
        self.to_device: queue.Queue = queue.Queue(maxsize=1)
        self.to_results: queue.Queue = queue.Queue(maxsize=2)
        self.outcomes: queue.Queue = queue.Queue(maxsize=4 * batch_size)
        self.png_slots = threading.Semaphore(4)  # batches whose PNGs are being written
        self.lock = threading.Lock()
        cuda = pipeline.device.type == "cuda"
        self.copy_stream = torch.cuda.Stream(pipeline.device) if cuda else None
        self.compute_stream = torch.cuda.Stream(pipeline.device) if cuda else None

    # -- plumbing -------------------------------------------------------------------------------------------------
    def _put(self, q: queue.Queue, item) -> None:
        while True:
            if self.stop.is_set():
                raise _Stopped
            try:
                q.put(item, timeout=_POLL)
                return
            except queue.Full:
                continue

    def _get(self, q: queue.Queue, timeout: float | None = None):
        """Wait for the next item; raises queue.Empty after ``timeout`` seconds (None: forever)."""
        waited = 0.0
        while True:
            if self.stop.is_set():
                raise _Stopped
            step = _POLL if timeout is None else min(_POLL, max(0.0, timeout - waited))
            try:
                return q.get(timeout=step) if step > 0 else q.get_nowait()
            except queue.Empty:
                waited += step
                if timeout is not None and waited >= timeout:
                    raise

    def _stage_thread(self, name: str, fn: Callable[[], None]) -> threading.Thread:
        def body() -> None:
            try:
                fn()
            except _Stopped:
                pass
            except BaseException as exc:  # a stage died: stop everything and tell the caller
                if not isinstance(exc, SetupError):  # a setup error (weights) is the caller's message, not a bug
                    log.exception("engine stage %s failed", name)
                self.failure = self.failure or exc
                self.stop.set()
        t = threading.Thread(target=body, name=f"engine-{name}", daemon=True)
        t.start()
        return t

    # -- stages ---------------------------------------------------------------------------------------------------
    def _feed(self, items: Iterable) -> None:
        submitted = indexed = 0
        for item in items:
            if self.stop.is_set():
                raise _Stopped
            if item is IDLE:
                continue
            if isinstance(item, IndexItem):
                if self.admission is None:
                    raise TypeError("index items need an admit function (Pipeline.run(..., admit=...))")
                indexed += 1
            elif (skipped := self._without_model(item)) is not None:
                self._put(self.outcomes, skipped)
                continue
            while (slot := self.slots.acquire(timeout=_POLL)) is None:
                if self.stop.is_set():
                    raise _Stopped
            with self.lock:
                self.held.add(slot)
            self.readers.submit(item, slot, self._read, self.admission.entry if self.admission else None)
            submitted += 1
        if self.admission is not None:
            self.admission.finish(indexed)
        self.decoded.put((_EOF, None, submitted))

    def _without_model(self, item: WorkItem) -> Outcome | None:
        """The route's first instance loads its model (or stops the run); an instance whose route has no model on this
        host is skipped with the reason."""
        models, route = self.p.models, item.route
        if route not in models.routes and route in models.loadable:
            models.ensure(route)
        if route in models.routes:
            return None
        self.p.stats.failed("no-model")
        reason = models.unavailable.get(route, f"no model for route '{route.value}'")
        return Outcome(item.sop_instance_uid, Status.SKIPPED, reason, worker=self.p.worker_id)

    def _read(self, item: WorkItem | IndexItem, slot: int, result: list | BaseException | None,
              seconds: float) -> None:
        """A reader's answer (on the reader pool's receiver thread)."""
        self.p.stats.read(seconds)
        if self.stop.is_set():  # the run is over: nobody takes these frames
            self._give_back(slot)
            return
        if isinstance(item, IndexItem):
            self.admission.frames(item, slot, result)
            return
        self.decoded.put((item, slot, result))

    def _admitted(self, decision: WorkItem | None, item: IndexItem, slot: int, result: object) -> None:
        """What indexing decided about a file read in the same pass: screen its frames, or give its slot back."""
        if self.stop.is_set() or decision is None or result is None:
            self._give_back(slot)
            self.decoded.put((None, None, None))  # counted, nothing to screen
            return
        try:
            skipped = self._without_model(decision)
        except BaseException as exc:  # a model that cannot be loaded stops the run (its message)
            self._give_back(slot)
            self.failure = self.failure or exc
            self.stop.set()
            return
        if skipped is not None:
            self._give_back(slot)
            self._put(self.outcomes, skipped)
            self.decoded.put((None, None, None))
            return
        self.decoded.put((decision, slot, result))

    def _give_back(self, slot: int | None) -> None:
        if slot is None:
            return
        with self.lock:
            if slot not in self.held:
                return
            self.held.discard(slot)
        self.slots.release(slot)

    def _done_with(self, frames: list[tuple[_Instance, DecodedFrame]]) -> None:
        """The device stage is done with these frames' pixels: a file whose frames all are gives its slot back."""
        free = []
        with self.lock:
            for inst, _ in frames:
                inst.released += 1
                if inst.released == inst.expected and inst.slot is not None:
                    free.append(inst.slot)
                    inst.slot = None
        for slot in free:
            self._give_back(slot)

    def _batch(self) -> None:
        """Decoded files -> batches, by size or by the wait cap, which holds while decodes are still in flight."""
        stats, received, total = self.p.stats, 0, None
        while total is None or received < total:
            timeout = self.policy.timeout()
            if timeout is not None and not self._room():
                timeout = max(timeout, _POLL)  # the device is busy: look again soon, the batch keeps filling
            try:
                item, slot, payload = self._get(self.decoded, timeout)
            except queue.Empty:
                self._flush_due()
                continue
            if item is _EOF:
                total = payload
                continue
            received += 1
            if item is None:  # a file indexed in the run with nothing to screen
                continue
            if isinstance(payload, BaseException):
                self._give_back(slot)
                stats.failed(failure_category(payload))
                self._put(self.outcomes, failure_outcome(item, payload, self.p.worker_id))
                self._put(self.outcomes, ("progress", 1))
                continue
            frames = payload
            if not frames:
                self._give_back(slot)
                stats.failed("decode")
                self._put(self.outcomes, Outcome(item.sop_instance_uid, Status.FAILED,
                                                 "no frames could be read", worker=self.p.worker_id))
                continue
            inst = _Instance(item, expected=len(frames), slot=slot)
            for fr in frames:
                for batch in self.policy.add(item.route, (inst, fr)):
                    self._send(batch)
            self._flush_due()
        for batch in self.policy.drain():
            self._send(batch)
        self._put(self.to_stage, _EOF)

    def _room(self) -> bool:
        """Whether the device can take a partial batch now: nothing waits ahead of it (on CUDA, one batch may run
        while the next is uploaded)."""
        return self.sent - self.finished < self.depth

    def _send(self, batch: Batch) -> None:
        with self.lock:
            self.sent += 1
        self._put(self.to_stage, batch)

    def _flush_due(self) -> None:
        for batch in self.policy.due(room=self._room()):
            self._send(batch)

    def _stage(self) -> None:
        """Pack each batch's stored values into a pinned buffer, while the device runs the batch before."""
        while (batch := self._get(self.to_stage)) is not _EOF:
            if any(isinstance(fr, EncodedFrame) for _, fr in batch.items):
                batch = self._decode_on_device(batch)
                if not batch.items:  # every frame failed to decode: nothing goes to the device
                    with self.lock:
                        self.finished += 1
                    continue
            staged = self.p.stager.stage([fr for _, fr in batch.items])
            self._put(self.to_device, (batch, staged))
        self._put(self.to_device, _EOF)

    def _decode_on_device(self, batch: Batch) -> Batch:
        started = time.perf_counter()
        decoded = self.p.stager.finish_decoding([fr for _, fr in batch.items])
        self.p.stats.read(time.perf_counter() - started, files=0)
        kept = []
        for (inst, frame), fr in zip(batch.items, decoded, strict=True):
            if isinstance(fr, InputError):
                inst.error = inst.error or fr
                self._done_with([(inst, frame)])
                self._frames_done([(inst, None)], [], None)
            else:
                kept.append((inst, fr))
        return Batch(batch.key, tuple(kept), batch.reason)

    def _device(self) -> None:
        stats = self.p.stats
        while (got := self._get(self.to_device)) is not _EOF:
            batch, staged = got
            now = time.monotonic()
            stats.record(len(batch.items), batch.reason, sum(now - inst.ready_at for inst, _ in batch.items))
            try:
                started = time.perf_counter()
                chunks = self._launch(batch, staged)
                if self.compute_stream is None:  # the CPU ran the job synchronously; CUDA is timed with events
                    stats.ran(time.perf_counter() - started)
                for launched in chunks:
                    self._put(self.to_results, launched)
            except RetryableError as exc:  # a single image that does not fit on the device
                if self.copy_stream is not None:
                    self.copy_stream.synchronize()  # no copy out of the slots is still under way
                self._done_with(list(batch.items))
                for inst, _ in batch.items:
                    inst.error = inst.error or Transient(str(exc))
                self._put(self.to_results, _Launched(batch.key, list(batch.items), None, {}, None))
        self._put(self.to_results, _EOF)

    def _launch(self, batch: Batch, staged) -> list[_Launched]:
        job, route = self.p.job, batch.key
        frames = [fr for _, fr in batch.items]
        if self.copy_stream is None:
            chunks = job.run(route, frames, staged)
        else:
            started = torch.cuda.Event(enable_timing=True)
            with torch.cuda.stream(self.copy_stream):
                flat = self.p.stager.upload(staged)
                uploaded = torch.cuda.Event()
                uploaded.record(self.copy_stream)
            self.compute_stream.wait_event(uploaded)
            with torch.cuda.stream(self.compute_stream):
                started.record(self.compute_stream)
                flat.record_stream(self.compute_stream)
                chunks = job.run(route, frames, staged, flat)
        out, start = [], 0
        for n, (chunk_frames, prepared, result) in enumerate(chunks):
            last = int(n == len(chunks) - 1)
            members = list(batch.items[start:start + len(chunk_frames)])
            start += len(chunk_frames)
            tensors = result.host_tensors(prepared)
            if self.compute_stream is None:
                out.append(_Launched(route, members, prepared, tensors, None, last))
                continue
            with torch.cuda.stream(self.compute_stream):
                host = {}
                for name, t in tensors.items():
                    host[name] = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
                    host[name].copy_(t, non_blocking=True)
                event = torch.cuda.Event(enable_timing=True)
                event.record(self.compute_stream)
            out.append(_Launched(route, members, prepared, host, event, last, started))
        return out

    def _results(self, pngs: ThreadPoolExecutor) -> None:
        """Each batch's rows, and one PNG task for all of its heatmaps: the outcomes of the batch's finished
        instances go out together once its PNGs are written (per batch, not per image, the queue hand-offs)."""
        job, shaper = self.p.job, self.p.shaper
        while (launched := self._get(self.to_results)) is not _EOF:
            if launched.event is not None:
                launched.event.synchronize()
                if launched.last_chunk:
                    self.p.stats.ran(launched.started.elapsed_time(launched.event) / 1000.0)
            with self.lock:
                self.finished += launched.last_chunk
            if launched.prepared is not None:  # the device is done with the frames' pixels (uploaded, computed)
                self._done_with(launched.frames)
            done: list[tuple[_Instance, FrameResult | None]] = []
            writes: list[tuple[_Instance, str, np.ndarray]] = []
            if launched.prepared is None:  # the device refused the batch: every instance retries
                done = [(inst, None) for inst, _ in launched.frames]
            else:
                host = {name: t.numpy() for name, t in launched.host.items()}
                frames = [fr for _, fr in launched.frames]
                for (inst, _), res in zip(launched.frames, job.split_results(launched.route, frames,
                                                                            launched.prepared, host), strict=True):
                    if isinstance(res, InputError):
                        inst.error = inst.error or res
                        done.append((inst, None))
                        continue
                    row, pictures = shaper.frame_result(launched.route, res)
                    done.append((inst, row))
                    writes += [(inst, path, image) for path, image in pictures]
            self._frames_done(done, writes, pngs)
            self._put(self.outcomes, ("progress", len(launched.frames)))
        pngs.shutdown(wait=True)
        self._put(self.outcomes, _EOF)

    def _frames_done(self, done: list[tuple[_Instance, FrameResult | None]],
                     writes: list[tuple[_Instance, str, np.ndarray]], pngs: ThreadPoolExecutor | None) -> None:
        """Record a batch's frames; the heatmaps of instances without an error go to the PNG pool as one task."""
        with self.lock:
            for inst, row in done:
                inst.seen += 1
                if row is not None and inst.error is None:
                    inst.results.append(row)
            writes = [w for w in writes if w[0].error is None]
            for inst, _, _ in writes:
                inst.writes += 1
        if writes and pngs is not None:
            while not self.png_slots.acquire(timeout=_POLL):
                if self.stop.is_set():
                    raise _Stopped
            task = pngs.submit(_write_all, self.p.png_writer, [(path, image) for _, path, image in writes])
            task.add_done_callback(lambda f: self._written([inst for inst, _, _ in writes], f))
        self._emit({inst for inst, _ in done})

    def _written(self, owners: list[_Instance], future: Future) -> None:
        """A batch's PNG task ended: each write's error, if any, is its instance's."""
        self.png_slots.release()
        errors = future.result() if future.exception() is None else [future.exception()] * len(owners)
        with self.lock:
            for inst, error in zip(owners, errors, strict=True):
                inst.writes -= 1
                if error is not None and inst.write_error is None:
                    inst.write_error = error
        self._emit(set(owners))

    def _emit(self, instances: set[_Instance]) -> None:
        """The outcomes of those of ``instances`` that are complete (every frame back, every heatmap written), in one
        hand-off."""
        ready = []
        with self.lock:
            for inst in instances:
                if inst.seen == inst.expected and inst.writes == 0 and not inst.emitted:
                    inst.emitted = True
                    ready.append(inst)
        if ready:
            self._put(self.outcomes, [self._outcome(inst) for inst in ready])

    def _outcome(self, inst: _Instance) -> Outcome:
        if inst.error is not None or inst.write_error is not None:
            self.p.stats.failed("device" if isinstance(inst.error, Transient) else
                                failure_category(inst.error or inst.write_error))
        return self.p.shaper.outcome(inst.item, inst.results, inst.error, inst.write_error)

    # -- the run --------------------------------------------------------------------------------------------------
    def run(self, items: Iterable, sink: Callable[[list[Outcome]], None],
            progress: Callable[[int], None] | None) -> None:
        pngs = ThreadPoolExecutor(2, thread_name_prefix="png")
        threads = [self._stage_thread("feed", lambda: self._feed(items)),
                   self._stage_thread("batch", self._batch),
                   self._stage_thread("stage", self._stage),
                   self._stage_thread("device", self._device),
                   self._stage_thread("results", lambda: self._results(pngs))]
        try:
            while True:
                try:
                    got = self.outcomes.get(timeout=_POLL)
                except queue.Empty:
                    got = None
                if got is None:
                    if self.failure is None and self.admission is not None and self.admission.failure is not None:
                        self.failure = self.admission.failure
                        self.stop.set()
                    if self.failure is not None:
                        # raised outside the except block: its chain stays its own (a database error's cause is what
                        # the caller reads to name the database and the fix), not the queue's Empty
                        raise self.failure
                    continue
                if got is _EOF:
                    break
                if isinstance(got, Outcome):
                    sink([got])
                elif isinstance(got, list):  # the instances that finished together (a batch's)
                    sink(got)
                elif progress is not None:
                    progress(got[1])
        finally:
            self.stop.set()
            for t in threads:
                t.join(timeout=30)
            pngs.shutdown(wait=True)
            if self.admission is not None:
                self.admission.stop()
                self.admission = None  # it forwards to this run: the cycle ends here, so the pipeline is freed (and
                # closed) with its last reference rather than at the next garbage collection
            if not self.readers.wait_idle(timeout=60):  # a read still in flight would write into a reused slot
                log.warning("a reader did not finish within 60 s after the run ended; restarting the readers")
                self.p.close()
            for slot in list(self.held):  # what a stopped run still held (frames that never reached the device)
                self._give_back(slot)
