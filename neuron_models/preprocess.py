"""Pixel work as batched tensor ops on the model's device: the same code on CPU and GPU.

Order (NOTES 14): modality LUT or rescale -> VOI LUT or window (straight to [0, 1]) -> invert MONOCHROME1 -> centre
crop to a square -> area resize -> CLAHE (batched) -> resize to the model input -> model normalisation.

The resize is exact area averaging, the same as OpenCV's ``INTER_AREA`` when shrinking (torchxrayvision's
``XRayResizer(engine="cv2")``), written as two small matrix products so it runs batched on any device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import kornia
import numpy as np
import torch
import torch.nn.functional as F

from neuron.errors import RejectedImage
from neuron_models.image import DecodedFrame, LutTable, PixelParams

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The seed's colour test, kept only to confirm that an image sent to a grayscale model is grayscale (NOTES 13).
GRAYSCALE_MAX_MEAN_SATURATION = 30.0


@dataclass(frozen=True)
class PreprocessConfig:
    input_size: int = 224
    channels: int = 1
    normalization: str = "xrv"  # "xrv": [0,1] -> [-1024, 1024]; "imagenet": ImageNet mean/std
    clahe: bool = True
    clahe_clip_limit: float = 2.0
    clahe_grid: int = 8
    clahe_size: int = 512
    crop: str = "center-square"
    resize: str = "area"
    grayscale_max_saturation: float = GRAYSCALE_MAX_MEAN_SATURATION

    def as_dict(self) -> dict:
        return asdict(self)


# -- stored values -> [0, 1] --------------------------------------------------------------------------------------
def _as_float_tensor(arr: np.ndarray, device: torch.device) -> torch.Tensor:
    if arr.dtype in (np.uint16, np.uint32, np.int8):
        arr = arr.astype(np.int32 if arr.dtype != np.uint32 else np.int64)
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    return torch.from_numpy(arr).to(device=device, non_blocking=True).to(torch.float32)


def _apply_lut(x: torch.Tensor, lut: LutTable) -> torch.Tensor:
    table = torch.as_tensor(lut.table, device=x.device, dtype=torch.float32)
    idx = (torch.round(x) - lut.first_mapped).clamp(0, table.numel() - 1).long()
    return table[idx]


def window_to_unit(x: torch.Tensor, center: float, width: float, function: str) -> torch.Tensor:
    """DICOM PS3.3 C.11.2.1.2/C.11.2.1.3 windows with output range [0, 1]."""
    if function == "SIGMOID":
        return torch.sigmoid(4.0 * (x - center) / width)
    if function == "LINEAR_EXACT":
        return ((x - center) / width + 0.5).clamp(0.0, 1.0)
    if width <= 1:
        return (x > center - 0.5).to(torch.float32)
    return ((x - (center - 0.5)) / (width - 1) + 0.5).clamp(0.0, 1.0)


def to_unit_range(pixels: np.ndarray, params: PixelParams, device: torch.device) -> torch.Tensor:
    """Stored values to display values in [0, 1], channels first: (1, H, W) or (3, H, W)."""
    x = _as_float_tensor(pixels, device)
    if params.color:
        scale = float(2 ** min(params.bits_stored, 32) - 1)
        return (x / scale).clamp(0.0, 1.0).permute(2, 0, 1).contiguous()
    if params.modality_lut is not None:
        x = _apply_lut(x, params.modality_lut)
    elif params.slope != 1.0 or params.intercept != 0.0:
        x = x * params.slope + params.intercept
    if params.window is not None:
        y = window_to_unit(x, params.window.center, params.window.width, params.window.function)
    elif params.voi_lut is not None:
        y = _apply_lut(x, params.voi_lut) / float(2 ** params.voi_lut.bits - 1)
    else:
        lo, hi = x.min(), x.max()
        y = (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)
    if params.invert:
        y = 1.0 - y
    return y.clamp(0.0, 1.0).unsqueeze(0)


# -- geometry -----------------------------------------------------------------------------------------------------
def resize_matrix(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """(n_out, n_in) weights: exact area averaging when shrinking, linear interpolation (half-pixel centres,
    like ``align_corners=False``) when enlarging."""
    if n_out <= n_in:
        scale = n_in / n_out
        starts = torch.arange(n_out, dtype=torch.float64) * scale
        ends = starts + scale
        i = torch.arange(n_in, dtype=torch.float64)
        overlap = (torch.minimum(ends[:, None], i[None, :] + 1) - torch.maximum(starts[:, None], i[None, :]))
        m = overlap.clamp(min=0.0) / scale
    else:
        src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * n_in / n_out - 0.5).clamp(0, n_in - 1)
        lo = src.floor().long()
        hi = (lo + 1).clamp(max=n_in - 1)
        frac = src - lo
        m = torch.zeros(n_out, n_in, dtype=torch.float64)
        m[torch.arange(n_out), lo] += 1 - frac
        m[torch.arange(n_out), hi] += frac
    return m.to(device=device, dtype=torch.float32)


def center_square(x: torch.Tensor) -> torch.Tensor:
    """torchxrayvision's XRayCenterCrop: crop the long side to the short one, centred the same way."""
    h, w = x.shape[-2:]
    size = min(h, w)
    top, left = h // 2 - size // 2, w // 2 - size // 2
    return x[..., top:top + size, left:left + size]


def resize_square(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    if (h, w) == (size, size):
        return x
    rh, rw = resize_matrix(h, size, x.device), resize_matrix(w, size, x.device)
    return rh @ x @ rw.transpose(0, 1)


# -- contrast -----------------------------------------------------------------------------------------------------
def clahe(x: torch.Tensor, clip_limit: float, grid: int) -> torch.Tensor:
    """CLAHE on a batch in [0, 1]: grayscale directly, RGB on the L channel of LAB (the seed's recipe);
    kornia's implementation matches OpenCV's within 1/255 (NOTES 17; checked in the tests)."""
    if x.shape[1] == 1:
        return kornia.enhance.equalize_clahe(x, clip_limit=clip_limit, grid_size=(grid, grid))
    lab = kornia.color.rgb_to_lab(x)
    lum = kornia.enhance.equalize_clahe((lab[:, :1] / 100.0).clamp(0, 1), clip_limit=clip_limit,
                                        grid_size=(grid, grid))
    return kornia.color.lab_to_rgb(torch.cat([lum * 100.0, lab[:, 1:]], dim=1)).clamp(0.0, 1.0)


# -- channels -----------------------------------------------------------------------------------------------------
def mean_saturation(rgb: torch.Tensor) -> float:
    """Mean HSV saturation on the 0-255 scale (the seed's test)."""
    mx, mn = rgb.max(dim=0).values, rgb.min(dim=0).values
    sat = torch.where(mx > 0, (mx - mn) / mx.clamp(min=1e-12), torch.zeros_like(mx))
    return float(sat.mean() * 255.0)


def match_channels(x: torch.Tensor, channels: int, max_saturation: float, photometric: str) -> torch.Tensor:
    if x.shape[0] == channels:
        return x
    if channels == 3:
        return x.expand(3, -1, -1)
    sat = mean_saturation(x)
    if sat > max_saturation:
        raise RejectedImage(
            f"PhotometricInterpretation {photometric} image has mean saturation {sat:.0f} > {max_saturation:.0f} "
            f"(0-255): it is a colour image, not a grayscale radiograph; the chest X-ray model only reads "
            f"grayscale images; check the file's Modality")
    r, g, b = x[0], x[1], x[2]
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(0)


# -- the whole path -----------------------------------------------------------------------------------------------
def prepare_batch(frames: Sequence[DecodedFrame], cfg: PreprocessConfig, device: torch.device
                  ) -> tuple[torch.Tensor, list[int], dict[int, RejectedImage]]:
    """Frames -> (N, C, S, S) in [0, 1] at the model's input size, plus the indices kept and those rejected."""
    work = cfg.clahe_size if cfg.clahe else cfg.input_size
    kept, rejected, tensors = [], {}, []
    for i, fr in enumerate(frames):
        x = to_unit_range(fr.pixels, fr.params, device)
        try:
            x = match_channels(x, cfg.channels, cfg.grayscale_max_saturation, fr.params.photometric)
        except RejectedImage as exc:
            rejected[i] = exc
            continue
        tensors.append(resize_square(center_square(x), work))
        kept.append(i)
    if not tensors:
        return torch.empty(0, cfg.channels, cfg.input_size, cfg.input_size, device=device), kept, rejected
    batch = torch.stack(tensors)
    if cfg.clahe:
        batch = clahe(batch, cfg.clahe_clip_limit, cfg.clahe_grid)
        batch = resize_square(batch, cfg.input_size)
    return batch.clamp(0.0, 1.0), kept, rejected


def normalize(x: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """[0, 1] images to what the model was trained on."""
    if cfg.normalization == "xrv":
        # == xrv.utils.normalize(img, maxval) = (2 * img / maxval - 1) * 1024 with img / maxval = x (NOTES 1)
        return (2.0 * x - 1.0) * 1024.0
    if cfg.normalization == "imagenet":
        mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std
    raise ValueError(f"unknown normalization {cfg.normalization!r}; expected 'xrv' or 'imagenet'")


def rotation_grid_theta(angle_deg: float, n: int, device: torch.device) -> torch.Tensor:
    a = math.radians(angle_deg)
    theta = torch.tensor([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0]],
                         dtype=torch.float32, device=device)
    return theta.unsqueeze(0).expand(n, 2, 3)


def rotate(x: torch.Tensor, angle_deg: float) -> torch.Tensor:
    """Rotate a batch about its centre (positive = counter-clockwise), filling with black like torchvision."""
    grid = F.affine_grid(rotation_grid_theta(angle_deg, x.shape[0], x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
