"""Pixel work as batched tensor ops on the model's device: the same code on CPU and GPU.

Order (DICOM PS3.3 C.11, the grayscale pipeline: modality LUT, VOI LUT, presentation; pydicom's ``apply_voi_lut``
leaves MONOCHROME1 uninverted): modality LUT or rescale -> VOI LUT or window (straight to [0, 1]) -> invert
MONOCHROME1 -> centre crop to a square -> area resize -> CLAHE (batched) -> resize to the model input -> model
normalisation.

The resize is exact area averaging, the same as OpenCV's ``INTER_AREA`` when shrinking (torchxrayvision's
``XRayResizer(engine="cv2")``), written as two small matrix products so it runs batched on any device.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import kornia
import numpy as np
import torch
import torch.nn.functional as F

from neuron.errors import RejectedImage
from neuron_models.image import DecodedFrame, PixelParams, Window
from neuron_models.staging import (
    LINEAR,
    LINEAR_EXACT,
    N_PARAMS,
    P_INTERCEPT,
    P_LO,
    P_LUT_FIRST,
    P_LUT_LAST,
    P_LUT_ROW,
    P_SCALE,
    P_SLOPE,
    P_VOI_DIV,
    P_VOI_FIRST,
    P_VOI_LAST,
    P_VOI_ROW,
    P_WIDTH,
    SIGMOID,
    THRESHOLD,
    VOI_LUT,
    FrameGroup,
    StagedBatch,
    display_mode,
    frame_params,
    pack,
    unpack,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# A mean HSV saturation test, kept only to confirm that an image sent to a grayscale model is grayscale: it cannot
# route (real echo ultrasound scores over 70, any grayscale photograph 0), so DICOM attributes route; this checks.
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


def _lookup(x: torch.Tensor, tables: torch.Tensor, first: torch.Tensor, last: torch.Tensor,
            row: torch.Tensor) -> torch.Tensor:
    """Per-frame LUTs (PS3.3 C.11.1): values below the first mapped one take entry 0, above the last the last."""
    idx = torch.minimum((torch.round(x) - first).clamp(min=0), last).long()
    return tables.reshape(-1)[idx + row.long() * tables.shape[1]]


def _unit_gray(x: torch.Tensor, p: torch.Tensor, g: FrameGroup, tables: torch.Tensor | None) -> torch.Tensor:
    """(n, H, W) stored values of one group, as a float32 tensor this function may overwrite -> display values in
    [0, 1], (n, 1, H, W). ``p``: (n, N_PARAMS, 1, 1) float32. Each step is the reference formula's float operations in
    the same order; a group skips the steps that are the identity for all its frames (slope 1 and intercept 0, no
    inversion), and works in place, which matters for 4-megapixel radiographs on a CPU."""
    if g.modality_lut:
        x = _lookup(x, tables, p[:, P_LUT_FIRST], p[:, P_LUT_LAST], p[:, P_LUT_ROW])
    elif g.rescale:
        x = x * p[:, P_SLOPE] + p[:, P_INTERCEPT]
    lo, width = p[:, P_LO], p[:, P_WIDTH]
    if g.mode == SIGMOID:
        y = torch.sigmoid(4.0 * (x - lo) / width)
    elif g.mode in (LINEAR, LINEAR_EXACT):  # LINEAR's lo and width are c - 0.5 and w - 1 (_frame_params)
        y = x.sub_(lo).div_(width).add_(0.5).clamp_(0.0, 1.0)
    elif g.mode == THRESHOLD:
        y = (x > lo).to(torch.float32)
    elif g.mode == VOI_LUT:
        y = (_lookup(x, tables, p[:, P_VOI_FIRST], p[:, P_VOI_LAST], p[:, P_VOI_ROW]) / p[:, P_VOI_DIV]).clamp_(0, 1)
    else:
        lo, hi = x.amin(dim=(1, 2), keepdim=True), x.amax(dim=(1, 2), keepdim=True)
        span = hi - lo
        y = torch.where(span > 0, (x - lo) / torch.where(span > 0, span, 1.0), 0.0)
    if g.invert:
        y = y.neg_().add_(1.0)  # 1 - y, exactly
    return y.unsqueeze(1)


def _unit_color(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """(n, H, W, 3) RGB stored values -> (n, 3, H, W) in [0, 1]."""
    return (x / p[:, P_SCALE, :, :, None]).clamp(0.0, 1.0).permute(0, 3, 1, 2)


def window_to_unit(x: torch.Tensor, center: float, width: float, function: str) -> torch.Tensor:
    """DICOM PS3.3 C.11.2.1.2/C.11.2.1.3 windows with output range [0, 1] (one image; the batched path's rule)."""
    params = PixelParams("MONOCHROME2", False, 16, window=Window(center, width, function))
    p = torch.tensor(frame_params(params, {}, {}), dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    group = FrameGroup((0,), tuple(x.shape), torch.float32, 0, display_mode(params), False, False)
    return _unit_gray(x.to(torch.float32, copy=True).reshape(1, 1, -1), p, group, None).view_as(x)


def to_unit_range(pixels: np.ndarray, params: PixelParams, device: torch.device) -> torch.Tensor:
    """Stored values to display values in [0, 1], channels first: (1, H, W) or (3, H, W). One frame through the same
    code the batches take."""
    staged = pack([DecodedFrame("", 0, pixels, params)], _plain_buffer)
    (_, _, x), = Preprocessor.unit_groups(staged, staged.buffer.to(device))
    return x[0]


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
    """CLAHE on a batch in [0, 1]: grayscale directly, RGB on the L channel of LAB; kornia's
    ``equalize_clahe`` matches OpenCV's ``createCLAHE`` within 1/255 (checked in tests/test_preprocess.py)."""
    if x.shape[1] == 1:
        return kornia.enhance.equalize_clahe(x, clip_limit=clip_limit, grid_size=(grid, grid))
    lab = kornia.color.rgb_to_lab(x)
    lum = kornia.enhance.equalize_clahe((lab[:, :1] / 100.0).clamp(0, 1), clip_limit=clip_limit,
                                        grid_size=(grid, grid))
    return kornia.color.lab_to_rgb(torch.cat([lum * 100.0, lab[:, 1:]], dim=1)).clamp(0.0, 1.0)


# -- channels -----------------------------------------------------------------------------------------------------
def mean_saturation(rgb: torch.Tensor) -> torch.Tensor:
    """Mean HSV saturation on the 0-255 scale, per image of a (n, 3, H, W) batch or of one
    (3, H, W) image."""
    mx, mn = rgb.amax(dim=-3), rgb.amin(dim=-3)
    sat = torch.where(mx > 0, (mx - mn) / mx.clamp(min=1e-12), torch.zeros_like(mx))
    return sat.mean(dim=(-2, -1)) * 255.0


def _rejection(photometric: str, sat: float, limit: float) -> RejectedImage:
    return RejectedImage(
        f"PhotometricInterpretation {photometric} image has mean saturation {sat:.0f} > {limit:.0f} "
        f"(0-255): it is a colour image, not a grayscale radiograph; the chest X-ray model only reads "
        f"grayscale images; check the file's Modality")


def _not_finite(photometric: str) -> RejectedImage:
    return RejectedImage(
        f"PhotometricInterpretation {photometric} frame has display values that are not finite numbers (NaN or "
        f"infinite): its Rescale Slope/Intercept, window or lookup table overflow 32-bit floats; the header is "
        f"corrupt: fix it at the source and re-export the file")


def _luminance(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def match_channels(x: torch.Tensor, channels: int, max_saturation: float, photometric: str) -> torch.Tensor:
    """One (C, H, W) image to the model's channels; a colour image sent to a grayscale model is rejected."""
    if x.shape[0] == channels:
        return x
    if channels == 3:
        return x.expand(3, -1, -1)
    sat = float(mean_saturation(x))
    if sat > max_saturation:
        raise _rejection(photometric, sat, max_saturation)
    return _luminance(x.unsqueeze(0))[0]


@dataclass
class Prepared:
    """A batch at the model's input, still on the device: nothing here has been copied back or waited for."""

    x: torch.Tensor  # (N, C, S, S) in [0, 1]
    rejected: torch.Tensor  # (N,) bool: a colour image sent to a grayscale model
    saturation: torch.Tensor  # (N,) mean saturation (0-255) of colour frames, 0 for grayscale ones
    photometric: tuple[str, ...]

    def rejections(self, rejected: np.ndarray, saturation: np.ndarray, limit: float) -> dict[int, RejectedImage]:
        """Host copies of ``rejected``/``saturation`` -> the reasons, by batch position."""
        return {int(i): _not_finite(self.photometric[i]) if np.isnan(saturation[i])
                else _rejection(self.photometric[i], float(saturation[i]), limit) for i in np.flatnonzero(rejected)}


def _plain_buffer(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)


class Preprocessor:
    """Frames -> (N, C, S, S) in [0, 1] at the model's input size, batched on the device: no loop over frames on
    tensors. Frames are grouped by shape and display path (``neuron_models.staging``); resize operators are built
    once per shape and kept on the device."""

    def __init__(self, cfg: PreprocessConfig, device: torch.device):
        self.cfg = cfg
        self.device = device
        self._resize: dict[tuple[int, int], torch.Tensor] = {}

    @staticmethod
    def unit_groups(staged: StagedBatch, flat: torch.Tensor | None = None, crop: bool = False
                    ) -> list[tuple[FrameGroup, torch.Tensor, torch.Tensor]]:
        """Each group's frames in display values [0, 1], (n, C, H, W) float32 on the buffer's device, with the
        group's batch positions as a device tensor. ``crop``: take the centre square first where that gives the
        same pixels (pointwise display paths), so the arithmetic runs on the pixels that are kept."""
        unpacked = unpack(staged, flat)
        out = []
        for g, idx, raw in unpacked.groups:
            count = len(g.indices)
            pg = unpacked.params.index_select(0, idx).view(count, N_PARAMS, 1, 1)
            if g.color:
                x = _unit_color(raw.reshape(count, *g.shape[:2], 3).to(torch.float32), pg)
            elif isinstance(raw, list):  # frames referenced where they lie: each converted to float32 in one copy
                frames = [r.reshape(g.shape[:2]) for r in raw]
                if crop and g.pointwise:
                    frames = [center_square(r) for r in frames]
                stored = torch.empty(count, *frames[0].shape, dtype=torch.float32)
                for j, r in enumerate(frames):
                    stored[j].copy_(r)
                x = _unit_gray(stored, pg, g, unpacked.tables)
            else:
                raw = raw.reshape(count, *g.shape[:2])
                if crop and g.pointwise:
                    raw = center_square(raw)
                x = _unit_gray(raw.to(torch.float32, copy=True), pg, g, unpacked.tables)
            out.append((g, idx, x))
        return out

    def resize(self, x: torch.Tensor, size: int) -> torch.Tensor:
        """Exact area resize of a (..., h, w) batch to (..., size, size) with cached operators. On CUDA two dense
        matrix products. On a CPU the operators are sparse: each output pixel averages a handful of input pixels, so
        a dense product spends almost all its multiplications on zeros (a 2k radiograph to 512: 54 ms of 2 cores
        dense, 18 ms sparse). Both sum the same weights; they differ only by float rounding (2e-7 on [0, 1])."""
        h, w = x.shape[-2:]
        if (h, w) == (size, size):
            return x
        if self.device.type != "cpu":
            return self._operator(h, size) @ x @ self._operator(w, size).transpose(0, 1)
        lead, flat = x.shape[:-2], x.reshape(-1, h, w)
        n = flat.shape[0]
        rows = torch.sparse.mm(self._operator(h, size), flat.permute(1, 0, 2).reshape(h, n * w))  # (size, n*w)
        cols = torch.sparse.mm(self._operator(w, size), rows.view(size, n, w).permute(2, 1, 0).reshape(w, -1))
        return cols.view(size, n, size).permute(1, 2, 0).reshape(*lead, size, size)

    def _operator(self, n_in: int, n_out: int) -> torch.Tensor:
        key = (n_in, n_out)
        if key not in self._resize:
            m = resize_matrix(n_in, n_out, self.device)
            if self.device.type == "cpu":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "sparse CSR support is in beta": used only for sparse.mm
                    m = m.to_sparse_csr()
            self._resize[key] = m
        return self._resize[key]

    def run(self, staged: StagedBatch, flat: torch.Tensor) -> Prepared:
        """Uploaded frames -> the model's input; asynchronous on CUDA (no value is read back here)."""
        cfg = self.cfg
        work = cfg.clahe_size if cfg.clahe else cfg.input_size
        n = staged.n
        x = torch.empty(n, cfg.channels, work, work, device=self.device)
        rejected = torch.zeros(n, dtype=torch.bool, device=self.device)
        saturation = torch.zeros(n, device=self.device)
        for _, idx, unit in self.unit_groups(staged, flat, crop=True):
            if unit.shape[1] != cfg.channels:
                if cfg.channels == 3:
                    unit = unit.expand(-1, 3, -1, -1)
                else:
                    sat = mean_saturation(unit)
                    saturation[idx] = sat
                    rejected[idx] |= sat > cfg.grayscale_max_saturation
                    unit = _luminance(unit)
            small = self.resize(center_square(unit), work)
            # A hostile header can still overflow float32 (a LUT, a slope the decoder let through): such a frame is
            # rejected with its reason (saturation NaN marks it), and zeros stand in so the batch's CLAHE runs. It is
            # found after the resize, where every display value has reached an output pixel with a positive weight
            # (a non-finite value stays non-finite through the weighted sums) at a sixteenth of the full size's cost.
            broken = ~torch.isfinite(small).flatten(1).all(dim=1)
            rejected[idx] |= broken
            saturation[idx] = torch.where(broken, torch.nan, saturation[idx])
            x[idx] = torch.nan_to_num(small, nan=0.0, posinf=0.0, neginf=0.0)
        if cfg.clahe:
            x = self.resize(clahe(x, cfg.clahe_clip_limit, cfg.clahe_grid), cfg.input_size)
        return Prepared(x.clamp(0.0, 1.0), rejected, saturation, staged.photometric)

    def prepare(self, frames: Sequence[DecodedFrame]) -> Prepared:
        """Pack, copy to the device and run, synchronously (training, evaluation and tests; screening stages its
        batches in the worker's stager)."""
        staged = pack(frames, _plain_buffer)
        return self.run(staged, staged.buffer.to(self.device))


def prepare_batch(frames: Sequence[DecodedFrame], cfg: PreprocessConfig, device: torch.device
                  ) -> tuple[torch.Tensor, list[int], dict[int, RejectedImage]]:
    """Frames -> (N, C, S, S) in [0, 1] at the model's input size, plus the indices kept and those rejected
    (synchronous: for training and tests; the engine keeps the batch on the device)."""
    if not frames:
        return torch.empty(0, cfg.channels, cfg.input_size, cfg.input_size, device=device), [], {}
    prep = Preprocessor(cfg, device).prepare(frames)
    rejected = prep.rejections(prep.rejected.cpu().numpy(), prep.saturation.cpu().numpy(),
                               cfg.grayscale_max_saturation)
    kept = [i for i in range(len(frames)) if i not in rejected]
    return prep.x[kept], kept, rejected


def normalize(x: torch.Tensor, cfg: PreprocessConfig) -> torch.Tensor:
    """[0, 1] images to what the model was trained on."""
    if cfg.normalization == "xrv":
        # == xrv.datasets.normalize(img, maxval) = (2 * img / maxval - 1) * 1024 with img / maxval = x
        # (torchxrayvision/datasets.py; the range the models were trained on, README "Getting started")
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
