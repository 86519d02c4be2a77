"""The model loader: which routes have a model on this device, loaded now or when their first instance arrives, and
why the others have none.

    Models.from_settings(settings, only=..., lazy=...) ─► routes: {Route: LoadedRoute(model, PipelineSpec)}
                                                         loadable: routes loaded by ``ensure`` on first use
                                                         unavailable: {Route: reason} (their instances are skipped)

The loader owns the models and their settings hash (``PipelineSpec``); the device job (``worker.device``) runs them
and the pipeline (``worker.pipeline``) streams work through both. One ``Models`` serves many pipelines (a benchmark,
the tests), each with its own batch size and output folder.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from neuron.errors import ConfigError, ModelUnavailable
from neuron.settings import Settings
from neuron.work import Route
from neuron_models import ood
from neuron_models.effnet import members_of
from neuron_models.factory import create_model, models_for_route, unavailable_reason
from neuron_models.ood import Reference
from neuron_models.preprocess import PreprocessConfig, normalize
from neuron_models.registry import PipelineSpec, ScreeningModel, preprocess_config, tta_policy
from neuron_models.runtime import Runtime, RuntimeRefused, Threads, attach_onnxruntime
from neuron_models.runtime import identity as runtime_identity
from neuron_models.runtime import resolve as resolve_runtime
from neuron_models.tta import TTAPolicy
from worker.decode import decoder_versions
from worker.gpu_decode import nvimgcodec_version

log = logging.getLogger(__name__)

# The fast precisions: the model runs under autocast in this dtype (``worker.device``); fp32 is exact.
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


def default_readers(device: torch.device) -> int:
    """Reader processes when --readers is not given. With a GPU the cores are free for reading: one reader per core,
    at most 8. On the CPU the model's threads already run on every core (``model_threads``), and readers beside
    them oversubscribe it (2 cores, neuron bench --n 64: 2.26 img/s end to end with one reader, 1.74 with two): one
    per four cores."""
    cores = os.cpu_count() or 1
    return min(8, cores) if device.type == "cuda" else max(1, cores // 4)


def model_threads(device: torch.device) -> Threads:
    """How the model shares the CPU's cores, one rule for both runtimes: torch's intra-op pool (preprocessing, CAM
    maps, overlays; the network too with --runtime torch) and ONNX Runtime's (the network) each get every core
    torch would use, because they take turns on the device stage's one thread and never run at once; ONNX Runtime's
    threads sleep instead of spinning between operators and batches, so the reader processes (``default_readers``)
    and the PNG writer get a core whenever the model does not use it. On CUDA the network runs on the GPU and one
    host thread feeds it."""
    return Threads(intra_op=torch.get_num_threads() if device.type == "cpu" else 1, spin=False)


def probe_batch(preprocess: PreprocessConfig, device: torch.device, n: int = 2) -> torch.Tensor:
    """A fixed batch of the model's normalised input (seeded uniform images): what an exported graph is checked
    against the torch module on."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, preprocess.channels, preprocess.input_size, preprocess.input_size, generator=g)
    return normalize(x, preprocess).to(device)


def attach_runtime(model: ScreeningModel, settings: Settings, device: torch.device,
                   preprocess: PreprocessConfig) -> tuple[dict, dict]:
    """Put the model's networks on the runtime the settings ask for; -> (the runtime's identity for the results'
    provenance, its start-up costs). With ``auto``, a graph that ONNX Runtime cannot match torch on is logged and
    the model stays on torch; asked for by name, it stops the run."""
    runtime = resolve_runtime(settings.runtime, device)
    if runtime is Runtime.TORCH:
        return runtime_identity(runtime, device, settings.precision), {}
    try:
        loaded = attach_onnxruntime(model, probe_batch(preprocess, device), device, settings.precision,
                                    model_threads(device), settings.resolved_cache_dir)
    except RuntimeRefused as exc:
        if Runtime(settings.runtime) is not Runtime.AUTO:
            raise
        log.warning("%s; running the network on torch instead", exc)
        for leaf in model.leaves():
            leaf.compiled = None
        return runtime_identity(Runtime.TORCH, device, settings.precision), {}
    startup = {"exported": any(x.exported for x in loaded), "export_s": round(sum(x.export_s for x in loaded), 3),
               "session_s": round(sum(x.session_s for x in loaded), 3),
               "check_s": round(sum(x.check_s for x in loaded), 3)}
    return runtime_identity(runtime, device, settings.precision, [x.provider for x in loaded]), startup


@dataclass
class LoadedRoute:
    model: ScreeningModel
    spec: PipelineSpec
    reference: Reference | None = None  # out-of-distribution statistics on the model's device (neuron reference)
    startup: dict | None = None  # seconds spent loading: the whole route, and exporting / opening the runtime's graph

    @property
    def preprocess(self) -> PreprocessConfig:
        return self.spec.preprocess

    @property
    def tta(self) -> TTAPolicy:
        return self.spec.tta


def load_route(route: Route, settings: Settings, device: torch.device, references: bool = True) -> LoadedRoute:
    """Build a route's model on the device with the settings behind its results (raises ModelUnavailable). In a fast
    precision the model is kept channels-last, the layout autocast convolutions run fastest in on CUDA. With
    ``references`` the route's out-of-distribution reference is loaded with it (``neuron reference`` builds one
    without)."""
    started = time.perf_counter()
    model = create_model(models_for_route(route)[0].name, settings).to(device)
    cfg = model.config
    if settings.mc_dropout and not model.has_dropout():
        log.warning("%s has no dropout: --mc-dropout does nothing for it; its uncertainty is the TTA spread", cfg.name)
    if settings.precision in AUTOCAST:
        model.to(memory_format=torch.channels_last)
    gpu = nvimgcodec_version() if device.type == "cuda" else "missing"
    decoder = {"cpu": "native, imagecodecs, pydicom+pylibjpeg fallback",
               "device": None if gpu == "missing" else f"nvimgcodec-{gpu}", "versions": decoder_versions()}
    preprocess = preprocess_config(cfg, settings)
    runtime, startup = attach_runtime(model, settings, device, preprocess)
    # a mismatch or a corrupt file stops the run
    reference = ood.load(settings.resolved_reference_dir, route) if references else None
    if reference is not None:
        reference.check(cfg.name, model.weights_id, preprocess.as_dict())
        reference.to(device)
        log.info("%s: out-of-distribution reference %s (%d films, threshold %.3f)", cfg.name,
                 reference.sha256[:12], reference.images, reference.threshold)
    spec = PipelineSpec(cfg.name, model.weights_id, preprocess, tta_policy(cfg, settings),
                        decoder, mc_dropout=settings.mc_dropout if model.has_dropout() else 0,
                        members=members_of(model), precision=settings.precision,
                        reference=reference.identity() if reference is not None else None, runtime=runtime)
    startup["load_s"] = round(time.perf_counter() - started, 3)
    return LoadedRoute(model, spec, reference, startup)


class Models:
    """The routes' models on one device. A route is loaded (``routes``), loadable when its first instance arrives
    (``loadable``, after ``ensure``), or unavailable with the reason its instances are skipped with."""

    def __init__(self, settings: Settings, device: torch.device, routes: dict[Route, LoadedRoute],
                 unavailable: dict[Route, str] | None = None, loadable: Iterable[Route] = (),
                 created_at: float | None = None, references: bool = True):
        self.settings = settings
        self.device = device
        self.routes = routes
        self.unavailable = unavailable or {}
        self.loadable = set(loadable) - set(routes)
        self.created_at = created_at if created_at is not None else time.monotonic()  # time to first batch counts it
        self.references = references
        self._on_load: list[Callable[[LoadedRoute], None]] = []
        self._loading = threading.Lock()
        if settings.precision in AUTOCAST and device.type != "cuda":
            log.warning("--precision %s on %s: autocast on the CPU is slow; fp32 is the CPU's exact mode",
                        settings.precision, device)

    @classmethod
    def from_settings(cls, settings: Settings, only: Iterable[Route] | None = None, lazy: bool = False,
                      references: bool = True) -> Models:
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
                routes[route] = load_route(route, settings, device, references)
            except ModelUnavailable as exc:
                unavailable[route] = str(exc)
        return cls(settings, device, routes, unavailable, loadable, created, references)

    def on_load(self, callback: Callable[[LoadedRoute], None]) -> None:
        """Call ``callback`` with each route loaded from now on (e.g. record its settings in the database)."""
        self._on_load.append(callback)

    @property
    def available_routes(self) -> list[Route]:
        """Routes whose instances these models screen: loaded, or to be loaded when work arrives."""
        return [r for r in Route if r in self.routes or r in self.loadable]

    def ensure(self, route: Route) -> None:
        """Load a lazily deferred route's model now (its first instance has arrived). A model that cannot be built
        stops the run: WeightsError for missing or unverified weights; a vanished checkpoint makes it unavailable."""
        with self._loading:
            if route in self.routes or route not in self.loadable:
                return
            try:
                lr = load_route(route, self.settings, self.device, self.references)
            except ModelUnavailable as exc:
                self.unavailable[route] = str(exc)
                self.loadable.discard(route)
                return
            for callback in self._on_load:
                callback(lr)
            self.routes[route] = lr
            self.loadable.discard(route)
            log.info("loaded %s for route %s", lr.spec.model, route.value)
