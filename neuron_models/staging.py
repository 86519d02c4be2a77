"""The byte layout of a staged batch: frames packed on the host for ONE host-to-device copy, and unpacked on the device.

    buffer = [per-frame scalars (float64, N_PARAMS each)] [LUT tables (float32)] [batch positions by group (int64)]
             [group 0's stored values] [group 1's ...] ...       every block aligned to 64 bytes

Frames are grouped by shape, dtype and display path (``display_mode``), so the device runs each group's arithmetic
as one batched op. ``pack`` writes the layout into a buffer the caller allocates (the worker's stager: a ring of
pinned buffers on CUDA; ``Preprocessor.prepare``: a plain one); ``unpack`` reads the same layout back as tensors
on whatever device the buffer was copied to. Both live here so the layout is written down once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from neuron_models.image import DecodedFrame, PixelParams

# How a frame's stored values become display values; frames are grouped so each group takes one path.
MINMAX, LINEAR, LINEAR_EXACT, SIGMOID, VOI_LUT, THRESHOLD = range(6)
_WINDOW_MODES = {"LINEAR": LINEAR, "LINEAR_EXACT": LINEAR_EXACT, "SIGMOID": SIGMOID}
# Per-frame scalars, in this column order, in one float64 block of the packed buffer (inversion is per group).
P_SLOPE, P_INTERCEPT, P_LO, P_WIDTH, P_SCALE, P_LUT_FIRST, P_LUT_LAST, P_LUT_ROW, P_VOI_FIRST, P_VOI_LAST, \
    P_VOI_ROW, P_VOI_DIV = range(12)
N_PARAMS = 12


def display_mode(params: PixelParams) -> int:
    """Which display path a frame's stored values take."""
    if params.window is not None:
        if params.window.function == "LINEAR" and params.window.width <= 1:
            return THRESHOLD  # PS3.3 C.11.2.1.2: a linear window of width 1 is a threshold at c - 0.5
        return _WINDOW_MODES[params.window.function]
    return VOI_LUT if params.voi_lut is not None else MINMAX


def frame_params(params: PixelParams, lut_rows: dict[int, int], voi_rows: dict[int, int]) -> list[float]:
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
    # frames referenced, not copied into the buffer: decoded on the device (GPU decode), or lying in host memory the
    # caller keeps for the batch (the readers' shared-memory slots), by batch position
    on_device: dict[int, torch.Tensor] = field(default_factory=dict)
    slot: int = -1  # which buffer of the stager's pinned ring holds it (-1: a plain buffer)
    order_offset: int = 0  # where the groups' batch positions lie (int64), so no index list is copied separately

    @property
    def tables_offset(self) -> int:
        return _aligned(self.n * N_PARAMS * 8)




def _torch_dtype(arr: np.ndarray) -> torch.dtype:
    return torch.from_numpy(arr[:0].reshape(-1)).dtype


def pack(frames: Sequence[DecodedFrame], allocate: Callable[[int], torch.Tensor],
         refer: Callable[[np.ndarray], bool] | None = None) -> StagedBatch:
    """Group the frames and write their scalars, tables, positions and stored values into ``allocate(nbytes)``, a
    flat uint8 tensor of at least that size. Frames whose pixels are already device tensors (decoded on the GPU), or
    host arrays ``refer`` accepts (memory the caller keeps until the batch is done), are referenced, not copied."""
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
        on_device = isinstance(pixels, torch.Tensor) or (refer is not None and refer(pixels))
        dtype = pixels.dtype if isinstance(pixels, torch.Tensor) else _torch_dtype(pixels)
        key = (tuple(pixels.shape), dtype, on_device, display_mode(p), p.modality_lut is not None and not p.color,
               p.color, not p.color and (p.slope != 1.0 or p.intercept != 0.0), p.invert and not p.color)
        groups.setdefault(key, []).append(i)
    params = np.array([frame_params(fr.params, lut_rows, voi_rows) for fr in frames], dtype=np.float64)
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
    staged = StagedBatch(len(frames), allocate(size)[:size], layout, len(tables), table_len,
                         tuple(fr.params.photometric for fr in frames), order_offset=order_offset)
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
            staged.on_device.update({i: frames[i].pixels if isinstance(frames[i].pixels, torch.Tensor)
                                     else torch.from_numpy(frames[i].pixels) for i in g.indices})
            continue
        nbytes = len(g.indices) * int(np.prod(g.shape)) * g.dtype.itemsize
        dest = host[g.offset:g.offset + nbytes].view(frames[g.indices[0]].pixels.dtype).reshape(-1, *g.shape)
        for j, i in enumerate(g.indices):
            dest[j] = frames[i].pixels
    return staged


@dataclass
class Unpacked:
    """A staged batch read back from its buffer (on the buffer's device)."""

    params: torch.Tensor  # (N, N_PARAMS) float32
    tables: torch.Tensor | None  # (n_tables, table_len) float32
    # (group, batch positions, stored values: one (n, ...) tensor, or on the CPU the referenced frames as a list)
    groups: list[tuple[FrameGroup, torch.Tensor, torch.Tensor | list[torch.Tensor]]]


def unpack(staged: StagedBatch, flat: torch.Tensor | None = None) -> Unpacked:
    """``pack``'s inverse, on ``flat`` (the buffer copied to the device; default the host buffer itself)."""
    flat = staged.buffer if flat is None else flat
    n = staged.n
    params = flat[:n * N_PARAMS * 8].view(torch.float64).view(n, N_PARAMS).to(torch.float32)
    order = flat[staged.order_offset:staged.order_offset + n * 8].view(torch.int64)
    tables = None
    if staged.n_tables:
        t0 = staged.tables_offset
        tables = flat[t0:t0 + staged.n_tables * staged.table_len * 4].view(torch.float32)
        tables = tables.view(staged.n_tables, staged.table_len)
    groups, start = [], 0
    for g in staged.groups:
        count = len(g.indices)
        idx = order[start:start + count]
        start += count
        if g.offset < 0:
            refs = [staged.on_device[i] for i in g.indices]
            if all(r.device == flat.device for r in refs) and flat.device.type == "cpu" and not g.color:
                raw = refs  # host frames referenced in place: the caller converts each, one copy (no stacking)
            else:
                raw = torch.stack([r.to(flat.device) for r in refs])
        else:
            size = count * int(np.prod(g.shape))
            raw = flat[g.offset:g.offset + size * g.dtype.itemsize].view(g.dtype).view(-1, *g.shape)
        if isinstance(raw, list):
            raw = [r.to(torch.uint8) if r.dtype == torch.bool else r for r in raw]
        elif raw.dtype == torch.bool:
            raw = raw.to(torch.uint8)
        groups.append((g, idx, raw))
    return Unpacked(params, tables, groups)
