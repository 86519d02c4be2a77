"""One registry: model name -> builder, and ``create_model`` as the only constructor (timm's ``_registry.py``).

Each model's config is a dataclass next to its builder. Every registered model honours one contract
(``ScreeningModel``), so TTA, CAM maps, batching and result rows work the same for every route.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from neuron.routes import Population
from neuron.settings import Settings, WeightsMode
from neuron.work import Route
from neuron_models import dropout
from neuron_models.preprocess import PreprocessConfig
from neuron_models.tta import TTAPolicy, View

UNTRAINED = "untrained"
# what a model's network gives the device job: rectified final features, pooled features, logits
Network = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class ModelConfig:
    name: str
    route: Route
    input_size: int
    channels: int
    normalization: str
    class_names: tuple[str, ...]
    multilabel: bool
    tta_views: tuple[View, ...]
    cam_target: str
    weights_source: str
    weights_sha256: str | None = None
    description: str = ""
    # who the model was trained on: the object in neuron.routes.POPULATIONS that indexing gates this route with
    population: Population | None = None


class ScreeningModel(nn.Module):
    """The contract: rectified final features -> logits -> probabilities, and the head weights for CAM maps."""

    config: ModelConfig
    class_names: tuple[str, ...]
    weights_id: str  # sha256 of the weights file, or "untrained"

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) normalised input -> (B, C', h, w) final feature map (the CAM target)."""
        raise NotImplementedError

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        """Global average pool and linear head -> (B, K) logits."""
        return self.classify(self.pooled(features))

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def cam_weight(self) -> torch.Tensor:
        """(K, C') weights of the linear head."""
        raise NotImplementedError

    @property
    def untrained(self) -> bool:
        return self.weights_id == UNTRAINED

    def dropout_rate(self) -> float:
        """Dropout on the pooled features before the linear head (0: none, so no MC dropout)."""
        return 0.0

    def has_dropout(self) -> bool:
        return self.dropout_rate() > 0

    def pooled(self, features: torch.Tensor) -> torch.Tensor:
        """Final features -> (B, C') globally pooled, before dropout and the linear head."""
        raise NotImplementedError

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """(B, C') pooled features -> (B, K) logits."""
        raise NotImplementedError

    # The network run by another runtime (``neuron_models.runtime``: an ONNX Runtime session exported from this very
    # module), or None: torch runs it. Set once when the model is loaded.
    compiled: Callable[[torch.Tensor], Network] | None = None

    def torch_network(self, x: torch.Tensor) -> Network:
        """The part of the model that costs, in torch: input -> (rectified final features (N, C', h, w), pooled
        features (N, C'), logits (N, K)). The graph another runtime runs is exported from this method."""
        features = self.forward_features(x)
        pooled = self.pooled(features)
        return features, pooled, self.classify(pooled)

    def network(self, x: torch.Tensor) -> Network:
        return self.torch_network(x) if self.compiled is None else self.compiled(x)

    def predict(self, x: torch.Tensor, mc_samples: int = 0, seed: int = 0, keys: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> probabilities (S, N, K) with S = max(1, mc_samples), features for CAM (N, C', h, w), head weights.
        With ``mc_samples`` and dropout in the head, the head runs S times on masked pooled features. The masks come
        from ``keys`` (one per row of ``x``, see ``neuron_models.dropout``): the same for an image alone or in any
        batch, on any device. Without keys, rows are keyed by position (repeatable, not batch-invariant)."""
        features, pooled, logits = self.network(x)
        if mc_samples > 0 and self.has_dropout():
            if keys is None:
                keys = torch.arange(x.shape[0], dtype=torch.int64, device=x.device)
            p = self.dropout_rate()
            probs = torch.stack([
                self.probabilities(self.classify(
                    pooled * dropout.keep_mask(keys, s, pooled.shape[1], p, seed).to(pooled.dtype) / (1 - p)))
                for s in range(mc_samples)])
        else:
            probs = self.probabilities(logits).unsqueeze(0)
        return probs, features, self.cam_weight()

    def leaves(self) -> list[ScreeningModel]:
        """The models that run a network of their own (an ensemble's members; else this model)."""
        return [self]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.probabilities(self.forward_head(self.forward_features(x)))


@dataclass(frozen=True)
class PipelineSpec:
    """Everything that decides a result besides the pixels and the weights; hashed into every result row."""

    model: str
    weights: str
    preprocess: PreprocessConfig
    tta: TTAPolicy
    decoder: dict = field(default_factory=dict)
    mc_dropout: int = 0
    members: tuple[dict, ...] = ()
    precision: str = "fp32"
    reference: dict | None = None  # the out-of-distribution reference scored against (neuron_models.ood)
    runtime: dict | None = None  # what ran the network (neuron_models.runtime.Runtime.identity)

    def as_dict(self) -> dict:
        out = {"model": self.model, "weights": self.weights, "preprocess": self.preprocess.as_dict(),
               "tta": self.tta.as_dict(), "decoder": self.decoder, "mc_dropout": self.mc_dropout,
               "members": list(self.members), "precision": self.precision}
        if self.reference is not None:  # only then: results without a reference keep the hash they had
            out["reference"] = self.reference
        if self.runtime is not None:
            out["runtime"] = self.runtime
        return out

    @functools.cached_property
    def config_hash(self) -> str:
        """Computed once per spec (a frozen value): every result row carries it."""
        blob = json.dumps(self.as_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


Builder = Callable[[Settings], ScreeningModel]
Probe = Callable[[Settings], str | None]
_builders: dict[str, tuple[ModelConfig, Builder]] = {}
_probes: dict[str, Probe] = {}


def register_model(config: ModelConfig, probe: Probe | None = None) -> Callable[[Builder], Builder]:
    """``probe``: a cheap check, without loading weights, that says why the model cannot be built (no checkpoint)
    or None; a run uses it to load a route's model only once that route has work."""
    def decorator(fn: Builder) -> Builder:
        if config.name in _builders:
            raise ValueError(f"model {config.name!r} is registered twice")
        _builders[config.name] = (config, fn)
        if probe is not None:
            _probes[config.name] = probe
        return fn
    return decorator


def registered_configs() -> list[ModelConfig]:
    """Every registered model's config, in registration order."""
    return [cfg for cfg, _ in _builders.values()]


def registered(name: str) -> tuple[ModelConfig, Builder, Probe | None]:
    """A registered model's config, builder and probe; KeyError naming the registered ones."""
    if name not in _builders:
        raise KeyError(f"unknown model {name!r}; registered: {sorted(_builders)}")
    config, builder = _builders[name]
    return config, builder, _probes.get(name)


def preprocess_config(cfg: ModelConfig, settings: Settings) -> PreprocessConfig:
    """One place that decides precedence: the model fixes geometry and normalisation, settings the contrast."""
    return PreprocessConfig(input_size=cfg.input_size, channels=cfg.channels, normalization=cfg.normalization,
                            clahe=settings.clahe, clahe_clip_limit=settings.clahe_clip_limit,
                            clahe_grid=settings.clahe_grid, clahe_size=settings.clahe_size)


def tta_policy(cfg: ModelConfig, settings: Settings) -> TTAPolicy:
    return TTAPolicy(cfg.tta_views) if settings.tta else TTAPolicy.off()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_with_digest(path: Path, data: bytes) -> None:
    """A cache file and its sha256 beside it (``NAME.sha256``), each written under a temporary name and renamed:
    processes writing the same file at once write the same bytes, and a reader never sees half a file (a digest that
    does not match makes the reader build it again)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = f".{os.getpid()}.{threading.get_ident()}.tmp"
    digest = f"{hashlib.sha256(data).hexdigest()}  {path.name}\n".encode()
    for target, content in ((path, data), (path.with_name(path.name + ".sha256"), digest)):
        tmp = target.with_name(target.name + suffix)
        tmp.write_bytes(content)
        tmp.replace(target)


def read_with_digest(path: Path) -> tuple[bytes | None, bool]:
    """-> (the file's bytes if they match the sha256 written beside them, else None; whether the file was there but
    did not match). Hashed and returned from the same bytes."""
    digest_file = path.with_name(path.name + ".sha256")
    if not path.is_file() or not digest_file.is_file():
        return None, False
    data = path.read_bytes()
    expected = digest_file.read_text().split()[0].strip().lower() if digest_file.stat().st_size else ""
    if hashlib.sha256(data).hexdigest() != expected:
        return None, True
    return data, False


__all__ = ["ModelConfig", "Network", "PipelineSpec", "ScreeningModel", "UNTRAINED", "WeightsMode", "preprocess_config",
           "read_with_digest", "register_model", "registered", "registered_configs", "sha256_file", "tta_policy",
           "write_with_digest"]
