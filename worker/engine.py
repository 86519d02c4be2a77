"""The batch engine shared by the embedded run and the distributed worker: models on a device, and the device job.

    frames ─► Preprocessor (one upload, batched LUT/window/invert/crop/resize/CLAHE) ─► model_job: TTA views in one
    forward ─► mean/std ─► CAM maps of the top-k labels ─► heatmap overlays as uint8 ─► one copy back

``Engine.run`` (``worker/pipeline.py``) streams work through readers, a batcher, a stager, this device job, a result
stage and a PNG pool; ``Engine.infer`` runs one batch synchronously (tests, evaluation).

Precision: ``fp32`` is exact: TF32 is switched off, so the CPU and a GPU give the same probabilities (1e-4), ranks
and maps (1e-3). ``fp16``/``bf16`` run the model under autocast in channels-last with cuDNN autotuning; preprocessing,
CAM maps and overlays stay in fp32. The precision is part of every result's settings hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from db.store import FrameResult, LabelScore, Outcome, WorkItem
from neuron.errors import (
    ConfigError,
    DecodeError,
    ImageTooLarge,
    InputError,
    ModelUnavailable,
    RejectedImage,
    RetryableError,
    SetupError,
    SkippedInput,
)
from neuron.routes import Route
from neuron.settings import Settings
from neuron_models import cam, dropout
from neuron_models.effnet import members_of
from neuron_models.image import DecodedFrame, EncodedFrame
from neuron_models.preprocess import Prepared, PreprocessConfig, Preprocessor, StagedBatch, normalize
from neuron_models.registry import (
    PipelineSpec,
    ScreeningModel,
    create_model,
    models_for_route,
    preprocess_config,
    tta_policy,
    unavailable_reason,
)
from neuron_models.tta import TTAPolicy
from worker.decode import decode_encoded, decoder_versions
from worker.gpu_decode import GPU_SYNTAXES, GpuDecoder, nvimgcodec_version

log = logging.getLogger(__name__)


IDLE = object()  # yielded by an endless feed when nothing new has arrived
AUTOCAST = {"fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but torch sees no CUDA device; use --device cpu or auto")
    return dev


def default_batch_size(device: torch.device) -> int:
    return 128 if device.type == "cuda" else 16


def _gpu_decoder(device: torch.device) -> GpuDecoder | None:
    if device.type != "cuda":
        return None
    try:
        return GpuDecoder(device)
    except SetupError as exc:
        log.warning("JPEG 2000 and JPEG lossless decode on the CPU: %s", exc)
        return None


@contextlib.contextmanager
def float32_mode(exact: bool):
    """TF32 rounds fp32 convolutions and matrix products to a 10-bit mantissa on Ampere and newer GPUs (cuDNN allows it
    for convolutions by default): exact mode switches it off around the device job, so a GPU computes what the CPU
    computes, whatever another engine in the process asked for."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = not exact
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def failure_category(exc: BaseException | None) -> str:
    """A bounded name for why an instance was not screened (metrics label): never the reason text, which can quote
    a file's contents."""
    for kind, name in ((ImageTooLarge, "too-large"), (RejectedImage, "rejected"), (DecodeError, "decode"),
                       (SkippedInput, "unsupported"), (RetryableError | MemoryError | OSError, "storage")):
        if isinstance(exc, kind):
            return name
    return "other"


@dataclass
class EngineStats:
    """How full the batches were, how long the first one took and where the time went; read by the benchmark, the
    worker's logs and the Prometheus collector (worker/metrics.py) at scrape time. Updated from several stage
    threads, hence the lock."""

    batch_size: int
    created_at: float = field(default_factory=time.monotonic)
    batches: int = 0
    frames: int = 0
    first_batch_at: float | None = None
    why: Counter[str] = field(default_factory=Counter)  # "full", "waited", "drained"
    files_read: int = 0
    read_seconds: float = 0.0  # readers' read + decode time, summed over threads (and device decodes)
    device_batches: int = 0
    device_seconds: float = 0.0  # preprocessing + model + CAM per batch (on CUDA: between events on its stream)
    queue_wait_seconds: float = 0.0  # per frame: decoded until its batch reached the device, summed
    failures: Counter[str] = field(default_factory=Counter)  # instances not screened, by ``failure_category``
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record(self, frames: int, reason: str, queue_wait_s: float = 0.0) -> None:
        with self.lock:
            if self.first_batch_at is None:
                self.first_batch_at = time.monotonic()
            self.batches += 1
            self.frames += frames
            self.why[reason] += 1
            self.queue_wait_seconds += queue_wait_s

    def read(self, seconds: float, files: int = 1) -> None:
        with self.lock:
            self.files_read += files
            self.read_seconds += seconds

    def ran(self, seconds: float) -> None:
        with self.lock:
            self.device_batches += 1
            self.device_seconds += seconds

    def failed(self, category: str) -> None:
        with self.lock:
            self.failures[category] += 1

    @property
    def fill(self) -> float:
        return self.frames / (self.batches * self.batch_size) if self.batches else 0.0

    @property
    def time_to_first_batch_s(self) -> float | None:
        return None if self.first_batch_at is None else self.first_batch_at - self.created_at


@dataclass(frozen=True)
class FrameInference:
    """One frame's numbers from the device. ``image`` and ``cams`` (floats) are copied back only by ``infer``; the
    pipeline takes the uint8 ``overlays`` alone."""

    frame: DecodedFrame
    probabilities: np.ndarray  # (K,)
    uncertainty: np.ndarray  # (K,)
    order: np.ndarray  # label indices by descending probability
    overlays: np.ndarray  # (k, S, S, 3) BGR uint8: the heatmaps of the top-k labels over the image
    image: np.ndarray | None = None  # (C, S, S) identity view in [0, 1]
    cams: np.ndarray | None = None  # (k, S, S) in [0, 1]


@dataclass
class ModelOutput:
    """The model job's results for a batch, on the device (nothing waited for)."""

    mean: torch.Tensor  # (N, K)
    std: torch.Tensor  # (N, K)
    order: torch.Tensor  # (N, K)
    maps: torch.Tensor  # (N, k, S, S)
    overlays: torch.Tensor  # (N, k, S, S, 3) uint8


@dataclass
class LoadedRoute:
    model: ScreeningModel
    spec: PipelineSpec

    @property
    def preprocess(self) -> PreprocessConfig:
        return self.spec.preprocess

    @property
    def tta(self) -> TTAPolicy:
        return self.spec.tta


def load_route(route: Route, settings: Settings, device: torch.device) -> LoadedRoute:
    """Build a route's model on the device with the settings behind its results (raises ModelUnavailable)."""
    model = create_model(models_for_route(route)[0].name, settings).to(device)
    cfg = model.config
    if settings.mc_dropout and not model.has_dropout():
        log.warning("%s has no dropout: --mc-dropout does nothing for it; its uncertainty is the TTA spread", cfg.name)
    gpu = nvimgcodec_version() if device.type == "cuda" else "missing"
    decoder = {"cpu": "native, imagecodecs, pydicom+pylibjpeg fallback",
               "device": None if gpu == "missing" else f"nvimgcodec-{gpu}", "versions": decoder_versions()}
    spec = PipelineSpec(cfg.name, model.weights_id, preprocess_config(cfg, settings), tta_policy(cfg, settings),
                        decoder, mc_dropout=settings.mc_dropout if model.has_dropout() else 0,
                        members=members_of(model), precision=settings.precision)
    return LoadedRoute(model, spec)


def heatmap_name(sop_uid: str, frame: int, model: str, weights: str, label: str, config_hash: str) -> str:
    """File names never come from UIDs or paths in the file: a hash of them, fanned out over 256 folders."""
    digest = hashlib.sha256("|".join([sop_uid, str(frame), model, weights, label, config_hash]).encode()).hexdigest()
    return f"{digest[:2]}/{digest[:32]}.png"


class Engine:
    def __init__(self, settings: Settings, routes: dict[Route, LoadedRoute], device: torch.device,
                 unavailable: dict[Route, str] | None = None, loadable: Iterable[Route] = ()):
        self.settings = settings
        self.routes = routes
        self.unavailable = unavailable or {}
        self.loadable = set(loadable) - set(routes)  # routes whose model loads when their first instance arrives
        self.on_load: Callable[[LoadedRoute], None] | None = None  # e.g. record the route's settings in the database
        self._loading = threading.Lock()
        self.device = device
        self.batch_size = settings.batch_size or default_batch_size(device)
        gpu = f" {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
        self.worker_id = f"{socket.gethostname()}/{device}{gpu}"
        self.heatmap_dir = settings.heatmap_dir.resolve()
        self.precision = settings.precision
        self.fast = self.precision in AUTOCAST
        if self.fast and device.type != "cuda":
            log.warning("--precision %s on %s: autocast on the CPU is slow; fp32 is the CPU's exact mode",
                        self.precision, device)
        if self.fast:
            torch.backends.cudnn.benchmark = True
            for lr in routes.values():
                lr.model.to(memory_format=torch.channels_last)
        self.preprocessors = {r: Preprocessor(lr.preprocess, device) for r, lr in routes.items()}
        self.gpu_decoder = _gpu_decoder(device)
        # compressed syntaxes the readers leave encoded for the device decoder (JPEG 2000, HTJ2K, JPEG lossless)
        self.defer_syntaxes = GPU_SYNTAXES if self.gpu_decoder is not None else frozenset()
        self.jet = cam.jet_table(device)
        self.stats = EngineStats(self.batch_size)

    @classmethod
    def from_settings(cls, settings: Settings, only: Iterable[Route] | None = None, lazy: bool = False) -> Engine:
        """Load the model of every route (or of the routes in ``only``: a worker's queues, the model being
        evaluated) that has one; a route without a checkpoint is recorded as unavailable with the reason (its
        instances are skipped); missing chest X-ray weights stop the run (WeightsError) when that route is loaded.
        ``lazy``: a route's model is loaded when its first instance arrives (``ensure``), so a run loads only the
        models it has work for, and still stops at once when a route with work has no weights."""
        created = time.monotonic()
        device = resolve_device(settings.device)
        routes: dict[Route, LoadedRoute] = {}
        unavailable: dict[Route, str] = {}
        loadable: set[Route] = set()
        for route in Route if only is None else only:
            configs = models_for_route(route)
            if not configs:
                continue
            if lazy:
                reason = unavailable_reason(configs[0].name, settings)
                if reason is None:
                    loadable.add(route)
                else:
                    unavailable[route] = reason
                continue
            try:
                routes[route] = load_route(route, settings, device)
            except ModelUnavailable as exc:
                unavailable[route] = str(exc)
        engine = cls(settings, routes, device, unavailable, loadable)
        engine.stats.created_at = created  # time to first batch counts the model loading
        return engine

    @property
    def available_routes(self) -> list[Route]:
        """Routes whose instances this engine screens: loaded, or to be loaded when work arrives."""
        return [r for r in Route if r in self.routes or r in self.loadable]

    def ensure(self, route: Route) -> None:
        """Load a lazily deferred route's model now (its first instance has arrived). A model that cannot be built
        stops the run: WeightsError for missing or unverified weights; a vanished checkpoint makes it unavailable."""
        with self._loading:
            if route in self.routes or route not in self.loadable:
                return
            try:
                lr = load_route(route, self.settings, self.device)
            except ModelUnavailable as exc:
                self.unavailable[route] = str(exc)
                self.loadable.discard(route)
                return
            if self.fast:
                lr.model.to(memory_format=torch.channels_last)
            self.preprocessors[route] = Preprocessor(lr.preprocess, self.device)
            if self.on_load is not None:
                self.on_load(lr)
            self.routes[route] = lr
            self.loadable.discard(route)
            log.info("loaded %s for route %s", lr.spec.model, route.value)

    # -- the device job -------------------------------------------------------------------------------------------
    def autocast(self):
        if not self.fast:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST[self.precision])

    @torch.no_grad()
    def model_job(self, route: Route, x: torch.Tensor, ids: Sequence[str] | None = None) -> ModelOutput:
        """The whole model job on a prepared batch already on the device ((N, C, S, S) in [0, 1]): TTA views in one
        forward, mean and spread, CAM maps of the top-k labels and their overlays. Asynchronous on CUDA. ``ids``
        (one per image) key the MC-dropout masks, so they do not depend on the batch or the device."""
        lr = self.routes[route]
        views = lr.tta.expand(x)
        keys = None
        if lr.spec.mc_dropout:
            ids = ids if ids is not None else [str(i) for i in range(x.shape[0])]
            keys = dropout.view_keys(dropout.image_keys(list(ids), self.device), views.shape[0] // x.shape[0])
        inputs = normalize(views, lr.preprocess)
        if self.fast:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            probs, features, cam_weight = lr.model.predict(inputs, lr.spec.mc_dropout, self.settings.seed, keys)
        mean, std = lr.tta.reduce(probs.float())
        order = torch.argsort(mean, dim=1, descending=True, stable=True)
        n, size = x.shape[0], lr.preprocess.input_size
        k = min(self.settings.heatmap_top_k, mean.shape[1])
        if k:
            identity = features[:n].float()  # views are view-major; the identity view comes first
            maps = cam.class_activation_maps(identity, cam_weight.float(), order[:, :k])
            maps = cam.upsample(cam.normalize_maps(maps), size)
        else:
            maps = torch.zeros(n, 0, size, size, device=x.device)
        return ModelOutput(mean, std, order, maps, cam.overlay_batch(x, maps, self.jet))

    def device_job(self, route: Route, frames: Sequence[DecodedFrame], staged: StagedBatch | None = None,
                   uploaded: torch.Tensor | None = None) -> list[tuple[Sequence[DecodedFrame], Prepared, ModelOutput]]:
        """Upload (unless the caller did), preprocess and run the model on one batch; on CUDA out of memory, split it
        in halves (the same results: every image is independent of its batch). Returns (frames, prepared, output)
        chunks."""
        try:
            with float32_mode(exact=not self.fast):
                return self._device_job(route, frames, staged, uploaded)
        except torch.cuda.OutOfMemoryError as exc:
            if len(frames) == 1:
                raise RetryableError(f"CUDA out of memory on a single image on {self.device}") from exc
            torch.cuda.empty_cache()
            half = len(frames) // 2
            log.warning("CUDA out of memory on a batch of %d; splitting", len(frames))
            return self.device_job(route, frames[:half]) + self.device_job(route, frames[half:])

    def _device_job(self, route: Route, frames: Sequence[DecodedFrame], staged: StagedBatch | None,
                    uploaded: torch.Tensor | None) -> list[tuple[Sequence[DecodedFrame], Prepared, ModelOutput]]:
        pre = self.preprocessors[route]
        staged = staged if staged is not None else pre.stage(frames)
        prepared = pre.run(staged, uploaded if uploaded is not None else pre.upload(staged))
        ids = [f"{f.sop_instance_uid}|{f.frame}" for f in frames]
        return [(frames, prepared, self.model_job(route, prepared.x, ids))]

    @torch.no_grad()
    def infer(self, route: Route, frames: Sequence[DecodedFrame]) -> list[FrameInference | InputError]:
        """Run one batch of frames through a route's model and wait for it. The same for any batch composition:
        every per-image result is independent of the others in the batch."""
        out: list[FrameInference | InputError] = []
        for chunk, prepared, result in self.device_job(route, frames):
            out.extend(self.host_results(route, chunk, prepared, result, images=True))
        return out

    def host_results(self, route: Route, frames: Sequence[DecodedFrame], prepared: Prepared, result: ModelOutput,
                     images: bool = False) -> list[FrameInference | InputError]:
        """Copy a batch's results back (blocking) and split them per frame; rejected frames become their reason."""
        host = {name: t.cpu().numpy() for name, t in (("mean", result.mean), ("std", result.std),
                                                        ("order", result.order), ("overlays", result.overlays),
                                                        ("rejected", prepared.rejected),
                                                        ("saturation", prepared.saturation))}
        if images:
            host["image"], host["maps"] = prepared.x.cpu().numpy(), result.maps.cpu().numpy()
        return self.split_results(route, frames, prepared, host)

    def split_results(self, route: Route, frames: Sequence[DecodedFrame], prepared: Prepared,
                      host: dict[str, np.ndarray]) -> list[FrameInference | InputError]:
        limit = self.routes[route].preprocess.grayscale_max_saturation
        rejected = prepared.rejections(host["rejected"], host["saturation"], limit)
        out: list[FrameInference | InputError] = []
        for i, fr in enumerate(frames):
            if i in rejected:
                out.append(rejected[i])
                continue
            out.append(FrameInference(fr, host["mean"][i], host["std"][i], host["order"][i], host["overlays"][i],
                                      host["image"][i] if "image" in host else None,
                                      host["maps"][i] if "maps" in host else None))
        return out

    def finish_decoding(self, frames: Sequence[DecodedFrame | EncodedFrame]) -> list[DecodedFrame | InputError]:
        """Frames the readers left encoded are decoded on the device in one nvImageCodec call; what it returns as
        None is decoded on the CPU. Which decoder produced each frame stays with it (provenance)."""
        encoded = [i for i, f in enumerate(frames) if isinstance(f, EncodedFrame)]
        out: list[DecodedFrame | InputError] = list(frames)  # type: ignore[arg-type]
        if not encoded:
            return out
        tensors = self.gpu_decoder.decode_batch([frames[i] for i in encoded]) if self.gpu_decoder else \
            [None] * len(encoded)
        for i, tensor in zip(encoded, tensors, strict=True):
            f = frames[i]
            if tensor is not None:
                out[i] = DecodedFrame(f.sop_instance_uid, f.frame, tensor, f.params, decoder=self.gpu_decoder.label)
                continue
            try:
                out[i] = decode_encoded(f)
            except InputError as exc:
                out[i] = exc
        return out

    # -- results --------------------------------------------------------------------------------------------------
    def frame_result(self, route: Route, inf: FrameInference) -> tuple[FrameResult, list[tuple[str, np.ndarray]]]:
        """The rows of one frame and the heatmaps to write ((path, BGR uint8 image) pairs)."""
        lr = self.routes[route]
        names, spec = lr.model.class_names, lr.spec
        rank_of = {int(label): r + 1 for r, label in enumerate(inf.order)}
        heatmaps: dict[int, str] = {}
        writes = []
        for slot, label_idx in enumerate(inf.order[: inf.overlays.shape[0]]):
            rel = heatmap_name(inf.frame.sop_instance_uid, inf.frame.frame, spec.model, spec.weights,
                               names[label_idx], spec.config_hash)
            path = self.heatmap_dir / rel
            heatmaps[int(label_idx)] = self.settings.to_shared(str(path))
            writes.append((str(path), inf.overlays[slot]))
        scores = []
        for idx, name in enumerate(names):
            unc = float(inf.uncertainty[idx])
            scores.append(LabelScore(name, float(inf.probabilities[idx]), unc, rank_of[idx], heatmaps.get(idx),
                                     unc > self.settings.review_threshold))
        return FrameResult(inf.frame.frame, spec.model, spec.weights, spec.config_hash, lr.model.untrained,
                           tuple(scores), decoder=getattr(inf.frame, "decoder", None)), writes

    # -- the pipeline ---------------------------------------------------------------------------------------------
    def run(self, items: Iterable[WorkItem | object], sink: Callable[[Outcome], None],
            progress: Callable[[int], None] | None = None) -> None:
        """Screen every item; call ``sink`` once per instance with its Outcome, in completion order, on this thread.

        ``items`` may be endless (the distributed worker's feed) and may yield ``IDLE`` when nothing new has arrived;
        partial batches whose first frame has waited ``max_wait_ms`` are run rather than held back."""
        from worker.pipeline import Pipeline

        Pipeline(self).run(items, sink, progress)

    def decode_only(self, items: Iterable[WorkItem]) -> int:
        """The decode bound: files to raw frames on the device with the engine's readers, no model. Returns the number
        of frames."""
        from worker.pipeline import decode_to_device

        return decode_to_device(self, items)
