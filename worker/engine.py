"""The batch engine shared by the embedded run and the distributed worker.

    WorkItems ─► decode threads (CPU: read + parse) ─► per-route batches across studies ─► device:
    LUT/window/invert/crop/resize/CLAHE ─► TTA views in one forward ─► mean/std + CAM maps ─► PNG threads ─► Outcomes

Decoding runs ahead of the device on a thread pool and PNG writing behind it on another, so the device is fed while
the CPU reads. Each instance's Outcome is emitted once all its frames are inferred and its heatmaps are on disk.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from db.schema import Status
from db.store import FrameResult, LabelScore, Outcome, WorkItem
from neuron.errors import ConfigError, InputError, ModelUnavailable, RetryableError
from neuron.routes import Route
from neuron.settings import Settings
from neuron_models import cam, dropout
from neuron_models.effnet import members_of
from neuron_models.image import DecodedFrame
from neuron_models.preprocess import PreprocessConfig, normalize, prepare_batch
from neuron_models.registry import (
    PipelineSpec,
    ScreeningModel,
    create_model,
    models_for_route,
    preprocess_config,
    tta_policy,
)
from neuron_models.tta import TTAPolicy
from worker.decode import decode_instance, decoder_versions

log = logging.getLogger(__name__)


IDLE = object()  # yielded by an endless feed when nothing new has arrived


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but torch sees no CUDA device; use --device cpu or auto")
    return dev


def default_batch_size(device: torch.device) -> int:
    return 128 if device.type == "cuda" else 16


@dataclass(frozen=True)
class FrameInference:
    """One frame's numbers from the device, before heatmaps are written."""

    frame: DecodedFrame
    probabilities: np.ndarray  # (K,)
    uncertainty: np.ndarray  # (K,)
    order: np.ndarray  # label indices by descending probability
    image: np.ndarray  # (C, S, S) identity view in [0, 1], the heatmap's background
    cams: np.ndarray  # (k, S, S) in [0, 1] for the top-k labels


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


@dataclass
class _InstanceState:
    item: WorkItem
    expected: int
    results: list[FrameResult] = field(default_factory=list)
    writes: list[Future] = field(default_factory=list)
    error: InputError | None = None

    seen: int = 0

    @property
    def inferred(self) -> bool:
        return self.seen == self.expected


def heatmap_name(sop_uid: str, frame: int, model: str, weights: str, label: str, config_hash: str) -> str:
    """File names never come from UIDs or paths in the file: a hash of them, fanned out over 256 folders."""
    digest = hashlib.sha256("|".join([sop_uid, str(frame), model, weights, label, config_hash]).encode()).hexdigest()
    return f"{digest[:2]}/{digest[:32]}.png"


class Engine:
    def __init__(self, settings: Settings, routes: dict[Route, LoadedRoute], device: torch.device,
                 unavailable: dict[Route, str] | None = None):
        self.settings = settings
        self.routes = routes
        self.unavailable = unavailable or {}
        self.device = device
        self.batch_size = settings.batch_size or default_batch_size(device)
        gpu = f" {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""
        self.worker_id = f"{socket.gethostname()}/{device}{gpu}"
        self.heatmap_dir = settings.heatmap_dir.resolve()

    @classmethod
    def from_settings(cls, settings: Settings, only: Iterable[Route] | None = None) -> Engine:
        """Load the model of every route (or of the routes in ``only``: a worker's queues, the model being
        evaluated) that has one; a route without a checkpoint is recorded as unavailable with the reason (its
        instances are skipped); missing chest X-ray weights stop the run (WeightsError) when that route is loaded."""
        device = resolve_device(settings.device)
        decoder = {"plugin": "pylibjpeg", "versions": decoder_versions()}
        routes: dict[Route, LoadedRoute] = {}
        unavailable: dict[Route, str] = {}
        for route in Route if only is None else only:
            configs = models_for_route(route)
            if not configs:
                continue
            try:
                model = create_model(configs[0].name, settings).to(device)
            except ModelUnavailable as exc:
                unavailable[route] = str(exc)
                continue
            cfg = model.config
            if settings.mc_dropout and not model.has_dropout():
                log.warning("%s has no dropout: --mc-dropout does nothing for it; its uncertainty is the TTA spread",
                            cfg.name)
            spec = PipelineSpec(cfg.name, model.weights_id, preprocess_config(cfg, settings),
                                tta_policy(cfg, settings), decoder,
                                mc_dropout=settings.mc_dropout if model.has_dropout() else 0,
                                members=members_of(model))
            routes[route] = LoadedRoute(model, spec)
        return cls(settings, routes, device, unavailable)

    # -- pure compute ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def infer(self, route: Route, frames: Sequence[DecodedFrame]) -> list[FrameInference | InputError]:
        """Run one batch of frames through a route's model. The same for any batch composition: every per-image
        result is independent of the others in the batch."""
        lr = self.routes[route]
        try:
            return self._infer(lr, frames)
        except torch.cuda.OutOfMemoryError as exc:
            if len(frames) == 1:
                raise RetryableError(f"CUDA out of memory on a single image on {self.device}") from exc
            torch.cuda.empty_cache()
            half = len(frames) // 2
            log.warning("CUDA out of memory on a batch of %d; splitting", len(frames))
            return self.infer(route, frames[:half]) + self.infer(route, frames[half:])

    def _infer(self, lr: LoadedRoute, frames: Sequence[DecodedFrame]) -> list[FrameInference | InputError]:
        x, kept, rejected = prepare_batch(frames, lr.preprocess, self.device)
        out: list[FrameInference | InputError] = list(rejected.get(i) for i in range(len(frames)))  # type: ignore
        if not kept:
            return out
        views = lr.tta.expand(x)
        keys = None
        if lr.spec.mc_dropout:  # dropout masks keyed by the image, so they do not depend on the batch or device
            ids = [f"{frames[i].sop_instance_uid}|{frames[i].frame}" for i in kept]
            keys = dropout.view_keys(dropout.image_keys(ids, self.device), views.shape[0] // x.shape[0])
        probs, features, cam_weight = lr.model.predict(normalize(views, lr.preprocess), lr.spec.mc_dropout,
                                                       self.settings.seed, keys)
        mean, std = lr.tta.reduce(probs)
        order = torch.argsort(mean, dim=1, descending=True, stable=True)
        k = min(self.settings.heatmap_top_k, mean.shape[1])
        if k:
            identity_features = features[: x.shape[0]]  # views are view-major; the identity view comes first
            maps = cam.class_activation_maps(identity_features, cam_weight, order[:, :k])
            maps = cam.upsample(cam.normalize_maps(maps), lr.preprocess.input_size).cpu().numpy()
        else:
            maps = np.zeros((x.shape[0], 0, 1, 1), dtype=np.float32)
        mean_np, std_np, order_np, images = mean.cpu().numpy(), std.cpu().numpy(), order.cpu().numpy(), x.cpu().numpy()
        for j, i in enumerate(kept):
            out[i] = FrameInference(frames[i], mean_np[j], std_np[j], order_np[j], images[j], maps[j])
        return out

    # -- results --------------------------------------------------------------------------------------------------
    def _frame_result(self, lr: LoadedRoute, inf: FrameInference, writers: ThreadPoolExecutor
                      ) -> tuple[FrameResult, list[Future]]:
        names = lr.model.class_names
        rank_of = {int(label): r + 1 for r, label in enumerate(inf.order)}
        spec, writes, scores = lr.spec, [], []
        heatmaps: dict[int, str] = {}
        for slot, label_idx in enumerate(inf.order[: inf.cams.shape[0]]):
            rel = heatmap_name(inf.frame.sop_instance_uid, inf.frame.frame, spec.model, spec.weights,
                               names[label_idx], spec.config_hash)
            path = self.heatmap_dir / rel
            heatmaps[int(label_idx)] = self.settings.to_shared(str(path))
            writes.append(writers.submit(_write_png, path, inf.image, inf.cams[slot]))
        for idx, name in enumerate(names):
            unc = float(inf.uncertainty[idx])
            scores.append(LabelScore(name, float(inf.probabilities[idx]), unc, rank_of[idx], heatmaps.get(idx),
                                     unc > self.settings.review_threshold))
        return FrameResult(inf.frame.frame, spec.model, spec.weights, spec.config_hash, lr.model.untrained,
                           tuple(scores)), writes

    # -- the pipeline ---------------------------------------------------------------------------------------------
    def run(self, items: Iterable[WorkItem | object], sink: Callable[[Outcome], None],
            progress: Callable[[int], None] | None = None) -> None:
        """Screen every item; call ``sink`` once per instance with its Outcome, in completion order.

        ``items`` may be endless (the distributed worker's feed): it yields ``IDLE`` when nothing new has arrived,
        and partial batches whose first frame has waited ``max_wait_ms`` are then run rather than held back.
        """
        workers = max(1, self.settings.decode_workers)
        ahead = max(2 * self.batch_size, 4 * workers)
        max_wait = self.settings.max_wait_ms / 1000.0
        batches: dict[Route, list[tuple[_InstanceState, DecodedFrame]]] = {r: [] for r in self.routes}
        started: dict[Route, float] = {}
        completing: deque[_InstanceState] = deque()

        def flush(route: Route, writers: ThreadPoolExecutor) -> None:
            batch, batches[route] = batches[route], []
            started.pop(route, None)
            if not batch:
                return
            results = self.infer(route, [f for _, f in batch])
            lr = self.routes[route]
            for (state, _), res in zip(batch, results, strict=True):
                state.seen += 1
                if isinstance(res, InputError):
                    state.error = state.error or res
                elif state.error is None:
                    fr, writes = self._frame_result(lr, res, writers)
                    state.results.append(fr)
                    state.writes.extend(writes)
                if state.inferred:
                    completing.append(state)
            if progress is not None:
                progress(len(batch))

        def emit(block: bool) -> None:
            while completing and (block or all(w.done() for w in completing[0].writes)):
                sink(self._outcome(completing.popleft()))

        it = iter(items)
        inflight: deque[tuple[WorkItem, Future]] = deque()
        with ThreadPoolExecutor(workers, thread_name_prefix="decode") as decoders, \
                ThreadPoolExecutor(2, thread_name_prefix="png") as writers:
            exhausted = False
            while True:
                idle = False
                while not exhausted and len(inflight) < ahead:
                    item = next(it, None)
                    if item is None:
                        exhausted = True
                    elif item is IDLE:
                        idle = True
                    elif Route(item.route) not in self.routes:  # no model for it on this host
                        reason = self.unavailable.get(Route(item.route), f"no model for route '{item.route}'")
                        sink(Outcome(item.sop_instance_uid, Status.SKIPPED, reason, worker=self.worker_id))
                    else:
                        inflight.append((item, decoders.submit(
                            decode_instance, self.settings.to_local(item.file_path), item.sop_instance_uid,
                            self.settings.max_frames, self.settings.max_pixels)))
                        continue
                    break
                if not inflight:
                    if exhausted:
                        break
                    now = time.monotonic()
                    for route, t0 in list(started.items()):
                        if now - t0 >= max_wait:
                            flush(route, writers)
                    emit(block=False)
                    continue
                if idle and not inflight[0][1].done():
                    emit(block=False)
                    continue
                item, fut = inflight.popleft()
                route = Route(item.route)
                try:
                    frames = fut.result()
                except InputError as exc:
                    sink(Outcome(item.sop_instance_uid, Status(exc.status), exc.reason, worker=self.worker_id))
                    if progress is not None:
                        progress(1)
                    continue
                state = _InstanceState(item, expected=len(frames))
                for f in frames:
                    batches[route].append((state, f))
                    started.setdefault(route, time.monotonic())
                    if len(batches[route]) >= self.batch_size:
                        flush(route, writers)
                emit(block=False)
            for route in batches:
                flush(route, writers)
            emit(block=True)

    def _outcome(self, state: _InstanceState) -> Outcome:
        uid = state.item.sop_instance_uid
        if state.error is not None:
            return Outcome(uid, Status(state.error.status), state.error.reason, worker=self.worker_id)
        for w in state.writes:
            exc = w.exception()
            if exc is not None:
                return Outcome(uid, Status.FAILED, f"heatmap could not be written: {exc}; check free space and "
                                                   f"permissions of {self.heatmap_dir}", worker=self.worker_id)
        frames = tuple(sorted(state.results, key=lambda r: r.frame))
        return Outcome(uid, Status.DONE, None, frames, worker=self.worker_id)


def _write_png(path: Path, image: np.ndarray, cam_map: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    if not cv2.imwrite(str(tmp), cam.overlay(image, cam_map)):
        raise OSError(f"cv2 could not write {tmp}")
    tmp.replace(path)
