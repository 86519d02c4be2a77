"""The device job: a staged batch in, probabilities, their spread, ranks and heatmap overlays out, on the device.

    staged batch ─► Preprocessor (batched LUT/window/invert/crop/resize/CLAHE) ─► model: TTA views in one forward
        ─► mean/std ─► CAM maps of the top-k labels ─► heatmap overlays as uint8      (nothing waited for on CUDA)

Precision: ``fp32`` is exact: TF32 is switched off, so the CPU and a GPU give the same probabilities (1e-4), ranks
and maps (1e-3). ``fp16``/``bf16`` run the model under autocast in channels-last with cuDNN autotuning; preprocessing,
CAM maps and overlays stay in fp32. The precision is part of every result's settings hash. On CUDA out of memory a
batch is split in halves: every image is independent of its batch, so the results are the same.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from neuron.errors import InputError, RetryableError
from neuron.settings import Settings
from neuron.work import Route
from neuron_models import cam, dropout, ood
from neuron_models.image import DecodedFrame
from neuron_models.preprocess import Prepared, Preprocessor, normalize
from neuron_models.runtime import float32_mode
from neuron_models.staging import StagedBatch
from worker.models import AUTOCAST, Models

log = logging.getLogger(__name__)


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
    ood_score: float | None = None  # distance from the route's reference (None: no reference)


@dataclass
class ModelOutput:
    """The model job's results for a batch, on the device (nothing waited for)."""

    mean: torch.Tensor  # (N, K)
    std: torch.Tensor  # (N, K)
    order: torch.Tensor  # (N, K)
    maps: torch.Tensor  # (N, k, S, S)
    overlays: torch.Tensor  # (N, k, S, S, 3) uint8
    pooled: torch.Tensor | None = None  # (N, C') penultimate features of the identity view (neuron reference)
    ood: torch.Tensor | None = None  # (N,) float64 distances from the route's reference, when it has one

    def host_tensors(self, prepared: Prepared) -> dict[str, torch.Tensor]:
        """What the results stage needs back on the host, by name."""
        out = {"mean": self.mean, "std": self.std, "order": self.order, "overlays": self.overlays,
               "rejected": prepared.rejected, "saturation": prepared.saturation}
        if self.ood is not None:
            out["ood"] = self.ood
        return out


Chunk = tuple[Sequence[DecodedFrame], Prepared, ModelOutput]


class DeviceJob:
    """Runs the loaded routes' models on their device: preprocessing, TTA, CAM and overlays, at one precision."""

    def __init__(self, models: Models, top_k: int | None = None):
        self.models = models
        self.device = models.device
        self.settings: Settings = models.settings
        self.top_k = self.settings.heatmap_top_k if top_k is None else top_k
        self.precision = self.settings.precision
        self.fast = self.precision in AUTOCAST
        if self.fast:
            torch.backends.cudnn.benchmark = True
        self._preprocessors: dict[Route, Preprocessor] = {}
        self.jet = cam.jet_table(self.device)

    def preprocessor(self, route: Route) -> Preprocessor:
        pre = self._preprocessors.get(route)
        if pre is None:
            pre = self._preprocessors[route] = Preprocessor(self.models.routes[route].preprocess, self.device)
        return pre

    def autocast(self):
        if not self.fast:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=AUTOCAST[self.precision])

    @torch.no_grad()
    def model_job(self, route: Route, x: torch.Tensor, ids: Sequence[str] | None = None) -> ModelOutput:
        """The whole model job on a prepared batch already on the device ((N, C, S, S) in [0, 1]): TTA views in one
        forward, mean and spread, CAM maps of the top-k labels and their overlays. Asynchronous on CUDA. ``ids``
        (one per image) key the MC-dropout masks, so they do not depend on the batch or the device."""
        lr = self.models.routes[route]
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
        k = min(self.top_k, mean.shape[1])
        identity = features[:n].float()  # views are view-major; the identity view comes first
        if k:
            maps = cam.class_activation_maps(identity, cam_weight.float(), order[:, :k])
            maps = cam.upsample(cam.normalize_maps(maps), size)
        else:
            maps = torch.zeros(n, 0, size, size, device=x.device)
        pooled = ood.pooled(identity)
        scores = lr.reference.score(pooled) if lr.reference is not None else None
        return ModelOutput(mean, std, order, maps, cam.overlay_batch(x, maps, self.jet), pooled, scores)

    def run(self, route: Route, frames: Sequence[DecodedFrame], staged: StagedBatch | None = None,
            uploaded: torch.Tensor | None = None) -> list[Chunk]:
        """Preprocess and run the model on one batch (packed and uploaded by the caller, or here); on CUDA out of
        memory, split it in halves. Returns (frames, prepared, output) chunks."""
        try:
            with float32_mode(exact=not self.fast):
                pre = self.preprocessor(route)
                if staged is None:
                    prepared = pre.prepare(frames)
                else:
                    prepared = pre.run(staged, staged.buffer if uploaded is None else uploaded)
                ids = [f"{f.sop_instance_uid}|{f.frame}" for f in frames]
                return [(frames, prepared, self.model_job(route, prepared.x, ids))]
        except torch.cuda.OutOfMemoryError as exc:
            if len(frames) == 1:
                raise RetryableError(f"CUDA out of memory on a single image on {self.device}") from exc
            torch.cuda.empty_cache()
            half = len(frames) // 2
            log.warning("CUDA out of memory on a batch of %d; splitting", len(frames))
            return self.run(route, frames[:half]) + self.run(route, frames[half:])

    @torch.no_grad()
    def infer(self, route: Route, frames: Sequence[DecodedFrame]) -> list[FrameInference | InputError]:
        """Run one batch of frames through a route's model and wait for it. The same for any batch composition:
        every per-image result is independent of the others in the batch."""
        out: list[FrameInference | InputError] = []
        for chunk, prepared, result in self.run(route, frames):
            host = {name: t.cpu().numpy() for name, t in result.host_tensors(prepared).items()}
            host["image"], host["maps"] = prepared.x.cpu().numpy(), result.maps.cpu().numpy()
            out.extend(self.split_results(route, chunk, prepared, host))
        return out

    def split_results(self, route: Route, frames: Sequence[DecodedFrame], prepared: Prepared,
                      host: dict[str, np.ndarray]) -> list[FrameInference | InputError]:
        """Host copies of a batch's results, per frame; rejected frames become their reason."""
        limit = self.models.routes[route].preprocess.grayscale_max_saturation
        rejected = prepared.rejections(host["rejected"], host["saturation"], limit)
        out: list[FrameInference | InputError] = []
        for i, fr in enumerate(frames):
            if i in rejected:
                out.append(rejected[i])
                continue
            out.append(FrameInference(fr, host["mean"][i], host["std"][i], host["order"][i], host["overlays"][i],
                                      host["image"][i] if "image" in host else None,
                                      host["maps"][i] if "maps" in host else None,
                                      float(host["ood"][i]) if "ood" in host else None))
        return out
