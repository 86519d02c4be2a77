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
    decoder: str = ""  # provenance: which code turned the file's bytes into these values, with its version


@dataclass(frozen=True)
class EncodedFrame:
    """One frame's compressed code stream, not yet decoded: what the worker hands to a device-side decoder (e.g.
    nvImageCodec on CUDA) instead of pixels. It carries what decoding needs and what the frame means once decoded
    (``params``, as for a ``DecodedFrame``), so any decoder on any device can finish the job."""

    sop_instance_uid: str
    frame: int
    data: bytes  # one frame's code stream, as pydicom.encaps extracts it
    transfer_syntax: str  # UID
    rows: int
    columns: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int  # 0 unsigned, 1 two's complement
    photometric: str  # as stored in the file (e.g. YBR_RCT); params.photometric is what the decoded values are
    params: PixelParams
    planar_configuration: int = 0

    def __post_init__(self) -> None:
        if self.rows < 1 or self.columns < 1 or self.samples_per_pixel not in (1, 3):
            raise ValueError(f"EncodedFrame {self.rows}x{self.columns}x{self.samples_per_pixel}: rows and columns "
                             f"must be at least 1 and samples per pixel 1 or 3")
        if self.bits_allocated not in (8, 16, 32) or not 1 <= self.bits_stored <= self.bits_allocated:
            raise ValueError(f"EncodedFrame bits allocated {self.bits_allocated}, stored {self.bits_stored}: "
                             f"allocated must be 8, 16 or 32 and stored between 1 and allocated")
        if self.pixel_representation not in (0, 1):
            raise ValueError(f"EncodedFrame pixel representation {self.pixel_representation}: must be 0 or 1")
