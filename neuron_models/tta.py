"""Deterministic test-time augmentation: fixed views, averaged; their spread is the uncertainty.

Random flips, rotations and jitter (torchvision's RandomRotation, ColorJitter) give another answer on every run, so
these views are fixed, and the policy is stored with each result. Chest X-rays get no horizontal flip: anatomy is not
mirror-symmetric and the torchxrayvision weights were trained with rotation, translation and scale but no flips
(torchxrayvision ``scripts/train_model.py``); a second brightness factor takes its place. Skin photographs keep the
flip.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from neuron_models.preprocess import rotate


class ViewKind(str, Enum):
    IDENTITY = "identity"
    ROTATE = "rotate"
    HFLIP = "hflip"
    BRIGHTNESS = "brightness"


@dataclass(frozen=True)
class View:
    kind: ViewKind
    value: float = 0.0

    @property
    def name(self) -> str:
        if self.kind in (ViewKind.IDENTITY, ViewKind.HFLIP):
            return self.kind.value
        return f"{self.kind.value}{self.value:+g}"

    def as_dict(self) -> dict:
        return {"kind": self.kind.value, "value": self.value}

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Apply to a batch of [0, 1] images."""
        if self.kind is ViewKind.IDENTITY:
            return x
        if self.kind is ViewKind.ROTATE:
            return rotate(x, self.value)
        if self.kind is ViewKind.HFLIP:
            return torch.flip(x, dims=[-1])
        return (x * self.value).clamp(0.0, 1.0)


IDENTITY = View(ViewKind.IDENTITY)
# Five views (original, flip, rotate +5, rotate -5, brightness 0.1), each a fixed transform.
CHEST_XRAY_VIEWS = (IDENTITY, View(ViewKind.ROTATE, 5.0), View(ViewKind.ROTATE, -5.0),
                    View(ViewKind.BRIGHTNESS, 1.1), View(ViewKind.BRIGHTNESS, 0.9))
SKIN_VIEWS = (IDENTITY, View(ViewKind.HFLIP), View(ViewKind.ROTATE, 5.0), View(ViewKind.ROTATE, -5.0),
              View(ViewKind.BRIGHTNESS, 1.1))


@dataclass(frozen=True)
class TTAPolicy:
    views: tuple[View, ...]

    def __post_init__(self) -> None:
        if not self.views or self.views[0] != IDENTITY:
            raise ValueError("a TTA policy starts with the identity view (heatmaps are drawn from it)")

    @classmethod
    def off(cls) -> TTAPolicy:
        return cls((IDENTITY,))

    def as_dict(self) -> dict:
        return {"views": [v.as_dict() for v in self.views], "reduce": "mean", "uncertainty": "std (population)"}

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (V*B, C, H, W), view-major, so one forward pass covers every view."""
        return torch.cat([v.apply(x) for v in self.views], dim=0)

    def reduce(self, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(S, V*B, K) samples x view-major batch -> mean and population std over samples and views, each (B, K)."""
        per_view = probs.reshape(probs.shape[0] * len(self.views), -1, probs.shape[-1])
        return per_view.mean(dim=0), per_view.std(dim=0, correction=0)



