"""MC-dropout masks that depend on what an image is, not on where it sits in a batch or which device runs it.

``torch.nn.functional.dropout`` draws from the device's random generator in batch order, so an image's samples change
with its batch neighbours and differ between CPU and GPU. Here each mask bit is a counter-based hash of (seed, image
key, TTA view, sample, channel), computed with exact integer arithmetic on the model's device: the same bits for the
same image alone or in any batch, on any device. The hash is Chris Wellons' ``lowbias32``; 32-bit products are formed
from 16-bit halves so no int64 operation ever overflows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _mul32(x: torch.Tensor, m: int) -> torch.Tensor:
    """(x * m) mod 2**32 for x in [0, 2**32): each partial product stays below 2**49."""
    return ((x & 0xFFFF) * m + ((((x >> 16) * m) & 0xFFFF) << 16)) & _M32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def image_keys(ids: Sequence[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """One 32-bit key per image from a stable identity (e.g. SOP Instance UID and frame)."""
    keys = [int.from_bytes(hashlib.sha256(i.encode()).digest()[:4], "big") for i in ids]
    return torch.tensor(keys, dtype=torch.int64, device=device)


def view_keys(keys: torch.Tensor, views: int) -> torch.Tensor:
    """Keys of the rows of a view-major TTA batch (view 0 of every image, then view 1, ...)."""
    view = torch.arange(views, dtype=torch.int64, device=keys.device).repeat_interleave(keys.shape[0])
    return mix32((keys.repeat(views) + (view + 1) * _GOLDEN) & _M32)


def keep_mask(keys: torch.Tensor, sample: int, channels: int, p: float, seed: int) -> torch.Tensor:
    """(rows, channels) boolean mask: each bit kept with probability 1 - p, a pure function of its coordinates."""
    row = mix32(mix32(keys & _M32) ^ (seed & _M32))
    row = mix32((row + (sample + 1) * _GOLDEN) & _M32)
    channel = mix32(torch.arange(channels, dtype=torch.int64, device=keys.device) + 0x632BE5AB)
    bits = mix32(row[:, None] ^ channel[None, :])
    return bits >= int(round(p * 2 ** 32))
