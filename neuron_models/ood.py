"""Out-of-distribution scores: how far an image's penultimate features lie from a site's own films.

    reference (``neuron reference``): pooled features of N in-population films ─► mean, shrunk covariance ─► whitening
        ─► scores of held-out films (k-fold) ─► threshold = their 99th percentile; saved with the weights' sha256
    screening (inside the device job): pooled features of the identity view ─► Mahalanobis distance ─► ood_score

The score is the Mahalanobis distance of the globally pooled final features (Lee et al. 2018, "A Simple Unified
Framework for Detecting Out-of-Distribution Samples and Adversarial Attacks", NeurIPS; one Gaussian for the site's
films instead of one per class). A site has hundreds of films and the DenseNet has 1,024 features, so the sample
covariance is singular: it is shrunk towards a scaled identity by the Ledoit-Wolf estimate (scikit-learn's
``sklearn.covariance.LedoitWolf``). The threshold comes from films the fit did not see (k-fold cross-fitting), so
about 1 % of new films like the reference pass it, not fewer.

The distance is computed in float64 from float32 features, one row at a time in effect (a matrix product per row), so
an image gets the same score alone or in any batch, on the CPU or a GPU. A reference belongs to one set of weights and
one preprocessing: loading it for others raises ``ReferenceMismatch`` (a setup error: the run stops and says how to
rebuild it), never a silent score against the wrong features.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import safetensors.torch
import torch

from neuron.errors import SetupError
from neuron.work import Route

PERCENTILE = 99.0
MIN_IMAGES = 20  # below this a 99th percentile is the largest score, and the covariance is mostly the shrinkage
FOLDS = 5
FORMAT = 1


class ReferenceMismatch(SetupError):
    """A route's reference was built for other weights or another preprocessing than the model it is loaded for."""


def pooled(features: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) final feature maps -> (N, C) penultimate features: the global average pool every registered
    model's head applies (the ensembles' members concatenated along C)."""
    return features.float().mean(dim=(2, 3))


@dataclass(frozen=True)
class Fit:
    mean: np.ndarray  # (C,)
    whitening: np.ndarray  # (C, C): d(x) = || (x - mean) @ whitening ||


def fit(features: np.ndarray) -> Fit:
    """Mean and Ledoit-Wolf shrunk covariance of (N, C) features, as a whitening matrix (float64)."""
    from sklearn.covariance import LedoitWolf

    x = np.asarray(features, dtype=np.float64)
    lw = LedoitWolf(assume_centered=False).fit(x)
    values, vectors = np.linalg.eigh(lw.covariance_)
    values = np.maximum(values, values.max() * 1e-12)  # shrinkage keeps them positive; guard the last bits
    return Fit(lw.location_, vectors / np.sqrt(values))


def distances(f: Fit, features: np.ndarray) -> np.ndarray:
    z = (np.asarray(features, dtype=np.float64) - f.mean) @ f.whitening
    return np.sqrt((z * z).sum(axis=1))


def held_out_scores(features: np.ndarray, folds: int = FOLDS, seed: int = 0) -> np.ndarray:
    """Each film's distance from a fit on the other folds: what a new film like the reference scores."""
    n = len(features)
    order = np.random.default_rng(seed).permutation(n)
    out = np.empty(n)
    for k in range(min(folds, n)):
        held = order[k::folds]
        kept = np.setdiff1d(order, held)
        out[held] = distances(fit(features[kept]), features[held])
    return out


@dataclass
class Reference:
    """A route's reference statistics on the device they score on."""

    route: Route
    model: str
    weights: str  # the weights' sha256 (or "untrained") the features came from
    preprocess: dict  # PreprocessConfig.as_dict() of those features
    mean: torch.Tensor  # (C,) float64
    whitening: torch.Tensor  # (C, C) float64
    threshold: float
    images: int
    sha256: str = ""  # of the statistics file
    created_at: str = ""
    summary: dict = field(default_factory=dict)  # percentiles of the held-out and in-sample scores

    @classmethod
    def build(cls, route: Route, model: str, weights: str, preprocess: dict, features: np.ndarray,
              min_images: int = MIN_IMAGES) -> Reference:
        """Fit the statistics of (N, C) pooled features of in-population films and place the threshold at the
        99th percentile of their held-out scores. Raises ValueError below ``min_images``."""
        n = len(features)
        if n < min_images:
            raise ValueError(f"a reference needs at least {min_images} films of route {route.value}, and {n} "
                             f"could be used; point --data at a folder with more of the site's own films (hundreds "
                             f"make a steadier threshold)")
        held = held_out_scores(features)
        full = fit(features)
        inside = distances(full, features)
        pct = (50, 95, 99, 100)
        summary = {"held_out": dict(zip(map(str, pct), np.percentile(held, pct).round(4).tolist(), strict=True)),
                   "in_sample": dict(zip(map(str, pct), np.percentile(inside, pct).round(4).tolist(), strict=True)),
                   "percentile": PERCENTILE, "folds": FOLDS, "estimator": "sklearn.covariance.LedoitWolf"}
        return cls(Route(route), model, weights, dict(preprocess), torch.from_numpy(full.mean),
                   torch.from_numpy(np.ascontiguousarray(full.whitening)), float(np.percentile(held, PERCENTILE)),
                   n, created_at=datetime.now(UTC).isoformat(timespec="seconds"), summary=summary)

    # -- scoring on the device ------------------------------------------------------------------------------------
    def to(self, device: torch.device) -> Reference:
        self.mean, self.whitening = self.mean.to(device), self.whitening.to(device)
        return self

    def score(self, features: torch.Tensor) -> torch.Tensor:
        """(N, C) pooled features -> (N,) Mahalanobis distances (float64), asynchronously on the features' device."""
        z = (features.to(torch.float64) - self.mean) @ self.whitening
        return z.square().sum(dim=1).sqrt()

    def check(self, model: str, weights: str, preprocess: dict) -> None:
        """Refuse to score features of other weights or another preprocessing than the reference was built from."""
        if weights != self.weights:
            raise ReferenceMismatch(
                f"the {self.route.value} reference ({self.sha256[:12]}, {self.images} films, {self.created_at}) was "
                f"built from weights {self.weights[:16]}, and the model now has weights {weights[:16]}: its scores "
                f"would measure nothing. Build a new one with `neuron reference --data FOLDER --route "
                f"{self.route.value}` (the site's own in-population films), or remove the reference to screen "
                f"without out-of-distribution scores")
        changed = {k for k in set(preprocess) | set(self.preprocess) if preprocess.get(k) != self.preprocess.get(k)}
        if changed:
            was = ", ".join(sorted(f"{k}={self.preprocess.get(k)!r}" for k in changed))
            now = ", ".join(sorted(f"{k}={preprocess.get(k)!r}" for k in changed))
            raise ReferenceMismatch(
                f"the {self.route.value} reference was built with other preprocessing settings ({was}; now "
                f"{now}): screen with the reference's settings, or "
                f"build a new reference with `neuron reference --data FOLDER --route {self.route.value}` and the "
                f"same screening options")

    def identity(self) -> dict:
        """What a result's settings hash records of the reference it was scored against."""
        return {"sha256": self.sha256, "images": self.images, "threshold": round(self.threshold, 6),
                "percentile": PERCENTILE, "created_at": self.created_at}

    # -- files ----------------------------------------------------------------------------------------------------
    def save(self, folder: Path) -> Path:
        """``<route>.safetensors`` (mean, whitening) and ``<route>.json`` (everything else, with the statistics'
        sha256), each written under a temporary name and renamed; returns the statistics file."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        data = safetensors.torch.save({"mean": self.mean.cpu().contiguous(),
                                       "whitening": self.whitening.cpu().contiguous()})
        self.sha256 = hashlib.sha256(data).hexdigest()
        meta = {"format": FORMAT, "route": self.route.value, "model": self.model, "weights": self.weights,
                "preprocess": self.preprocess, "threshold": self.threshold, "images": self.images,
                "sha256": self.sha256, "created_at": self.created_at, "summary": self.summary}
        stats, sidecar = files_of(folder, self.route)
        suffix = f".{os.getpid()}.{threading.get_ident()}.tmp"
        for target, content in ((stats, data), (sidecar, json.dumps(meta, indent=1).encode())):
            tmp = target.with_name(target.name + suffix)
            tmp.write_bytes(content)
            tmp.replace(target)
        return stats


def files_of(folder: Path, route: Route) -> tuple[Path, Path]:
    return Path(folder) / f"{Route(route).value}.safetensors", Path(folder) / f"{Route(route).value}.json"


def load(folder: Path, route: Route) -> Reference | None:
    """The route's reference in ``folder``, checked against its sha256; None when there is none. A file that fails
    its check is a setup error (the run stops): a reference that cannot be trusted is not silently dropped."""
    stats, sidecar = files_of(folder, route)
    if not stats.is_file() and not sidecar.is_file():
        return None
    try:
        meta = json.loads(sidecar.read_text())
        data = stats.read_bytes()
    except (OSError, ValueError) as exc:
        raise SetupError(f"the {Route(route).value} reference in {folder} cannot be read ({exc}); build it again "
                         f"with `neuron reference`, or remove {stats.name} and {sidecar.name}") from exc
    digest = hashlib.sha256(data).hexdigest()
    if digest != meta.get("sha256"):
        raise SetupError(f"{stats} has sha256 {digest}, not the {meta.get('sha256')} its {sidecar.name} records: the "
                         f"file is corrupt or was replaced; build the reference again with `neuron reference`")
    tensors = safetensors.torch.load(data)
    return Reference(Route(meta["route"]), meta["model"], meta["weights"], meta["preprocess"], tensors["mean"],
                     tensors["whitening"], float(meta["threshold"]), int(meta["images"]), meta["sha256"],
                     meta.get("created_at", ""), meta.get("summary", {}))
