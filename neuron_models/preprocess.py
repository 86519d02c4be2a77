"""Pixel work as batched tensor ops on the model's device: the same code on CPU and GPU.

Order (NOTES 14): modality LUT or rescale -> VOI LUT or window (straight to [0, 1]) -> invert MONOCHROME1 -> centre
crop to a square -> area resize -> CLAHE (batched) -> resize to the model input -> model normalisation.

The resize is exact area averaging, the same as OpenCV's ``INTER_AREA`` when shrinking (torchxrayvision's
``XRayResizer(engine="cv2")``), written as two small matrix products so it runs batched on any device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import kornia
import numpy as np
import torch
import torch.nn.functional as F

from neuron.errors import RejectedImage
from neuron_models.image import DecodedFrame, PixelParams, Window

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


# -- stored values -> [0, 1], a group of same-shaped frames at a time ----------------------------------------------
# How a frame's stored values become display values; frames are grouped so each group takes one path.
MINMAX, LINEAR, LINEAR_EXACT, SIGMOID, VOI_LUT, THRESHOLD = range(6)
_WINDOW_MODES = {"LINEAR": LINEAR, "LINEAR_EXACT": LINEAR_EXACT, "SIGMOID": SIGMOID}
# Per-frame scalars, in this column order, in one float64 block of the packed buffer (inversion is per group).
P_SLOPE, P_INTERCEPT, P_LO, P_WIDTH, P_SCALE, P_LUT_FIRST, P_LUT_LAST, P_LUT_ROW, P_VOI_FIRST, P_VOI_LAST, \
    P_VOI_ROW, P_VOI_DIV = range(12)
N_PARAMS = 12


def _mode(params: PixelParams) -> int:
    if params.window is not None:
        if params.window.function == "LINEAR" and params.window.width <= 1:
            return THRESHOLD  # PS3.3 C.11.2.1.2: a linear window of width 1 is a threshold at c - 0.5
        return _WINDOW_MODES[params.window.function]
    return VOI_LUT if params.voi_lut is not None else MINMAX


def _frame_params(params: PixelParams, lut_rows: dict[int, int], voi_rows: dict[int, int]) -> list[float]:
    """The scalars each path needs, computed in float64 on the host exactly as the reference formulas do."""
    row = [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    if params.color:
        row[P_SCALE] = float(2 ** min(params.bits_stored, 32) - 1)
        return row
    row[P_SLOPE], row[P_INTERCEPT] = params.slope, params.intercept
    if params.modality_lut is not None:
        lut = params.modality_lut
        row[P_LUT_FIRST], row[P_LUT_LAST], row[P_LUT_ROW] = lut.first_mapped, lut.table.size - 1, lut_rows[id(lut)]
    w = params.window
    if w is not None:
        if w.function == "LINEAR":  # PS3.3 C.11.2.1.2: centred on c - 0.5 over w - 1
            row[P_LO], row[P_WIDTH] = w.center - 0.5, w.width - 1
        else:
            row[P_LO], row[P_WIDTH] = w.center, w.width
    elif params.voi_lut is not None:
        voi = params.voi_lut
        row[P_VOI_FIRST], row[P_VOI_LAST], row[P_VOI_ROW] = voi.first_mapped, voi.table.size - 1, voi_rows[id(voi)]
        row[P_VOI_DIV] = float(2 ** voi.bits - 1)
    return row


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
    p = torch.tensor(_frame_params(params, {}, {}), dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    group = FrameGroup((0,), tuple(x.shape), torch.float32, 0, _mode(params), False, False)
    return _unit_gray(x.to(torch.float32, copy=True).reshape(1, 1, -1), p, group, None).view_as(x)


def to_unit_range(pixels: np.ndarray, params: PixelParams, device: torch.device) -> torch.Tensor:
    """Stored values to display values in [0, 1], channels first: (1, H, W) or (3, H, W). One frame through the same
    code the batches take."""
    pre = Preprocessor(PreprocessConfig(), device)
    staged = pre.stage([DecodedFrame("", 0, pixels, params)])
    (_, _, x), = pre.unit_groups(staged, pre.upload(staged))
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
    """CLAHE on a batch in [0, 1]: grayscale directly, RGB on the L channel of LAB (the seed's recipe);
    kornia's implementation matches OpenCV's within 1/255 (NOTES 17; checked in the tests)."""
    if x.shape[1] == 1:
        return kornia.enhance.equalize_clahe(x, clip_limit=clip_limit, grid_size=(grid, grid))
    lab = kornia.color.rgb_to_lab(x)
    lum = kornia.enhance.equalize_clahe((lab[:, :1] / 100.0).clamp(0, 1), clip_limit=clip_limit,
                                        grid_size=(grid, grid))
    return kornia.color.lab_to_rgb(torch.cat([lum * 100.0, lab[:, 1:]], dim=1)).clamp(0.0, 1.0)


# -- channels -----------------------------------------------------------------------------------------------------
def mean_saturation(rgb: torch.Tensor) -> torch.Tensor:
    """Mean HSV saturation on the 0-255 scale (the seed's test), per image of a (n, 3, H, W) batch or of one
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


# -- the whole path, batched --------------------------------------------------------------------------------------
_ALIGN = 64


def _aligned(n: int) -> int:
    return -(-n // _ALIGN) * _ALIGN


@dataclass(frozen=True)
class FrameGroup:
    """Frames of one shape and one display path; their stored values lie together in the packed buffer."""

    indices: tuple[int, ...]  # positions in the batch
    shape: tuple[int, ...]  # one frame: (H, W) or (H, W, 3)
    dtype: torch.dtype
    offset: int  # byte offset in the packed buffer; -1: frames already on the device
    mode: int
    modality_lut: bool
    color: bool
    rescale: bool = False  # some frame's slope or intercept is not the identity
    invert: bool = False  # MONOCHROME1: every frame of the group is inverted

    @property
    def pointwise(self) -> bool:
        """Each output pixel depends on its own stored value alone, so the group may be cropped before its
        display values are computed (min-max scaling looks at the whole frame)."""
        return self.mode != MINMAX


@dataclass
class StagedBatch:
    """Frames packed for ONE host-to-device copy: per-frame scalars, LUT tables and stored values grouped by shape.
    ``buffer`` is pinned when the device is CUDA, so the copy is asynchronous."""

    n: int
    buffer: torch.Tensor  # flat uint8
    groups: list[FrameGroup]
    n_tables: int
    table_len: int
    photometric: tuple[str, ...]
    on_device: dict[int, torch.Tensor] = field(default_factory=dict)  # frames decoded on the device (GPU decode)
    slot: int = -1
    order_offset: int = 0  # where the groups' batch positions lie (int64), so no index list is copied separately

    @property
    def tables_offset(self) -> int:
        return _aligned(self.n * N_PARAMS * 8)


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


def _torch_dtype(arr: np.ndarray) -> torch.dtype:
    return torch.from_numpy(arr[:0].reshape(-1)).dtype


class Preprocessor:
    """Frames -> (N, C, S, S) in [0, 1] at the model's input size, batched on the device: no loop over frames on
    tensors. Frames are grouped by shape and display path; resize operators are built once per shape and kept on the
    device; stored values travel in one host-to-device copy per batch from a ring of pinned buffers."""

    def __init__(self, cfg: PreprocessConfig, device: torch.device, ring: int = 3):
        self.cfg = cfg
        self.device = device
        self._resize: dict[tuple[int, int], torch.Tensor] = {}
        self._pinned = device.type == "cuda"
        self._slots: list[torch.Tensor | None] = [None] * ring
        self._events: list = [None] * ring
        self._next = 0

    # host side (a staging thread) ---------------------------------------------------------------------------------
    def stage(self, frames: Sequence[DecodedFrame]) -> StagedBatch:
        groups: dict[tuple, list[int]] = {}
        tables: list[np.ndarray] = []
        lut_rows: dict[int, int] = {}
        voi_rows: dict[int, int] = {}
        for i, fr in enumerate(frames):
            p = fr.params
            for lut, rows in ((p.modality_lut, lut_rows), (p.voi_lut, voi_rows)):
                if lut is not None and id(lut) not in rows:
                    rows[id(lut)] = len(tables)
                    tables.append(lut.table)
            pixels = fr.pixels
            on_device = isinstance(pixels, torch.Tensor)
            dtype = pixels.dtype if on_device else _torch_dtype(pixels)
            key = (tuple(pixels.shape), dtype, on_device, _mode(p), p.modality_lut is not None and not p.color,
                   p.color, not p.color and (p.slope != 1.0 or p.intercept != 0.0), p.invert and not p.color)
            groups.setdefault(key, []).append(i)
        params = np.array([_frame_params(fr.params, lut_rows, voi_rows) for fr in frames], dtype=np.float64)
        table_len = max((t.size for t in tables), default=0)
        size = _aligned(params.nbytes) + _aligned(len(tables) * table_len * 4)
        layout = []
        order = np.array([i for idx in groups.values() for i in idx], dtype=np.int64)  # batch positions by group
        order_offset = size
        size += _aligned(order.nbytes)
        for (shape, dtype, on_device, mode, mlut, color, rescale, invert), idx in groups.items():
            nbytes = 0 if on_device else len(idx) * int(np.prod(shape)) * dtype.itemsize
            layout.append(FrameGroup(tuple(idx), shape, dtype, -1 if on_device else size, mode, mlut, color,
                                     rescale, invert))
            size += _aligned(nbytes)
        staged = StagedBatch(len(frames), self._buffer(size), layout, len(tables), table_len,
                             tuple(fr.params.photometric for fr in frames), order_offset=order_offset)
        staged.slot = self._next - 1 if self._pinned else -1
        host = staged.buffer.numpy()
        host[:params.nbytes] = params.view(np.uint8).reshape(-1)
        host[order_offset:order_offset + order.nbytes] = order.view(np.uint8)
        if tables:
            block = host[staged.tables_offset:staged.tables_offset + len(tables) * table_len * 4].view(np.float32)
            block = block.reshape(len(tables), table_len)
            block[:] = 0
            for r, t in enumerate(tables):
                block[r, :t.size] = t
        for g in layout:
            if g.offset < 0:
                staged.on_device.update({i: frames[i].pixels for i in g.indices})
                continue
            nbytes = len(g.indices) * int(np.prod(g.shape)) * g.dtype.itemsize
            dest = host[g.offset:g.offset + nbytes].view(frames[g.indices[0]].pixels.dtype).reshape(-1, *g.shape)
            for j, i in enumerate(g.indices):
                dest[j] = frames[i].pixels
        return staged

    def _buffer(self, size: int) -> torch.Tensor:
        if not self._pinned:
            return torch.empty(size, dtype=torch.uint8)
        slot = self._next % len(self._slots)
        self._next += 1
        if self._events[slot] is not None:
            self._events[slot].synchronize()  # the copy out of this slot has finished
        buf = self._slots[slot]
        if buf is None or buf.numel() < size:
            buf = torch.empty(max(size, 64 << 20), dtype=torch.uint8, pin_memory=True)
            self._slots[slot] = buf
        return buf[:size]

    # device side (the device thread) ------------------------------------------------------------------------------
    def upload(self, staged: StagedBatch) -> torch.Tensor:
        """The one host-to-device copy of a batch (asynchronous from pinned memory, on the current stream)."""
        if self.device.type != "cuda":
            return staged.buffer
        flat = staged.buffer.to(self.device, non_blocking=True)
        if staged.slot >= 0:
            event = torch.cuda.Event()
            event.record()
            self._events[staged.slot % len(self._slots)] = event
        return flat

    @staticmethod
    def unit_groups(staged: StagedBatch, flat: torch.Tensor | None = None, crop: bool = False
                    ) -> list[tuple[FrameGroup, torch.Tensor, torch.Tensor]]:
        """Each group's frames in display values [0, 1], (n, C, H, W) float32 on the buffer's device, with the
        group's batch positions as a device tensor. ``crop``: take the centre square first where that gives the
        same pixels (pointwise display paths), so the arithmetic runs on the pixels that are kept."""
        flat = staged.buffer if flat is None else flat
        n = staged.n
        p = flat[:n * N_PARAMS * 8].view(torch.float64).view(n, N_PARAMS).to(torch.float32)
        order = flat[staged.order_offset:staged.order_offset + n * 8].view(torch.int64)
        tables = None
        if staged.n_tables:
            t0 = staged.tables_offset
            tables = flat[t0:t0 + staged.n_tables * staged.table_len * 4].view(torch.float32)
            tables = tables.view(staged.n_tables, staged.table_len)
        out, start = [], 0
        for g in staged.groups:
            count = len(g.indices)
            idx = order[start:start + count]
            start += count
            if g.offset < 0:
                raw = torch.stack([staged.on_device[i] for i in g.indices]).to(flat.device)
            else:
                size = count * int(np.prod(g.shape))
                raw = flat[g.offset:g.offset + size * g.dtype.itemsize].view(g.dtype).view(-1, *g.shape)
            if raw.dtype == torch.bool:
                raw = raw.to(torch.uint8)
            pg = p.index_select(0, idx).view(count, N_PARAMS, 1, 1)
            if g.color:
                x = _unit_color(raw.reshape(count, *g.shape[:2], 3).to(torch.float32), pg)
            else:
                raw = raw.reshape(count, *g.shape[:2])
                if crop and g.pointwise:
                    raw = center_square(raw)
                x = _unit_gray(raw.to(torch.float32, copy=True), pg, g, tables)
            out.append((g, idx, x))
        return out

    def resize(self, x: torch.Tensor, size: int) -> torch.Tensor:
        """Exact area resize of a (..., h, w) batch to (..., size, size) with cached operators."""
        h, w = x.shape[-2:]
        if (h, w) == (size, size):
            return x
        return self._operator(h, size) @ x @ self._operator(w, size).transpose(0, 1)

    def _operator(self, n_in: int, n_out: int) -> torch.Tensor:
        key = (n_in, n_out)
        if key not in self._resize:
            self._resize[key] = resize_matrix(n_in, n_out, self.device)
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
            # A hostile header can still overflow float32 (a LUT, a slope the decoder let through): such a frame is
            # rejected with its reason (saturation NaN marks it), and zeros stand in so the batch's CLAHE runs.
            broken = ~torch.isfinite(unit).flatten(1).all(dim=1)
            rejected[idx] |= broken
            saturation[idx] = torch.where(broken, torch.nan, saturation[idx])
            unit = torch.nan_to_num(unit, nan=0.0, posinf=0.0, neginf=0.0)
            if unit.shape[1] != cfg.channels:
                if cfg.channels == 3:
                    unit = unit.expand(-1, 3, -1, -1)
                else:
                    sat = mean_saturation(unit)
                    saturation[idx] = torch.where(broken, torch.nan, sat)
                    rejected[idx] |= sat > cfg.grayscale_max_saturation
                    unit = _luminance(unit)
            x[idx] = self.resize(center_square(unit), work)
        if cfg.clahe:
            x = self.resize(clahe(x, cfg.clahe_clip_limit, cfg.clahe_grid), cfg.input_size)
        return Prepared(x.clamp(0.0, 1.0), rejected, saturation, staged.photometric)

    def prepare(self, frames: Sequence[DecodedFrame]) -> Prepared:
        staged = self.stage(frames)
        return self.run(staged, self.upload(staged))


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
