"""What a decoded image is, independent of where it was decoded: stored values plus the parameters needed to
display them. Plain data (numpy, no torch) so decoders on CPU threads can build it and the device can consume it."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Window:
    center: float
    width: float
    function: str = "LINEAR"  # LINEAR, LINEAR_EXACT or SIGMOID (PS3.3 C.11.2.1.2)


@dataclass(frozen=True)
class LutTable:
    first_mapped: int
    table: np.ndarray
    bits: int


@dataclass(frozen=True)
class PixelParams:
    """What it takes to turn stored values into display values in [0, 1]."""

    photometric: str
    color: bool
    bits_stored: int
    slope: float = 1.0
    intercept: float = 0.0
    modality_lut: LutTable | None = None
    window: Window | None = None
    voi_lut: LutTable | None = None

    @property
    def invert(self) -> bool:
        return self.photometric == "MONOCHROME1"


@dataclass(frozen=True)
class DecodedFrame:
    sop_instance_uid: str
    frame: int
    pixels: np.ndarray  # (H, W) stored values, or (H, W, 3) RGB
    params: PixelParams
