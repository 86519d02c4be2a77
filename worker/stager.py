"""The stager: a batch of decoded frames into one buffer for one host-to-device copy, while the device runs the batch
before.

    frames (some left encoded by the readers) ─► nvImageCodec batch decode on CUDA, CPU fallback per frame
        ─► neuron_models.staging.pack into a buffer of the ring (pinned on CUDA: the copy is asynchronous)
        ─► upload on the caller's stream; the slot is reused once an event says its copy has finished

The byte layout is ``neuron_models.staging``'s; the ring, the events and the device decode are the stager's.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from neuron.errors import InputError, SetupError
from neuron_models.image import DecodedFrame, EncodedFrame
from neuron_models.staging import StagedBatch, pack
from worker.decode import decode_encoded
from worker.gpu_decode import GPU_SYNTAXES, GpuDecoder

log = logging.getLogger(__name__)

MIN_PINNED_BYTES = 64 << 20  # a pinned slot is allocated once at this size or the batch's, whichever is larger


def _gpu_decoder(device: torch.device) -> GpuDecoder | None:
    if device.type != "cuda":
        return None
    try:
        return GpuDecoder(device)
    except SetupError as exc:
        log.warning("JPEG 2000 and JPEG lossless decode on the CPU: %s", exc)
        return None


class Stager:
    """Owns the staging buffers of one pipeline: a ring of ``ring`` pinned buffers on CUDA (page-locked memory is
    expensive to allocate, so each slot is allocated once and reused), plain memory on the CPU, where the buffer
    is the device's input itself."""

    def __init__(self, device: torch.device, ring: int = 3):
        self.device = device
        # host frames the stager references instead of copying (the readers' slots, kept until the batch is done)
        self.refer = None
        self.pinned = device.type == "cuda"
        self._slots: list[torch.Tensor | None] = [None] * ring
        self._events: list = [None] * ring
        self._next = 0
        self.gpu_decoder = _gpu_decoder(device)

    @property
    def defer_syntaxes(self) -> frozenset[str]:
        """Compressed transfer syntaxes the readers leave encoded for the device decoder (JPEG 2000, HTJ2K, JPEG
        lossless); none without one."""
        return GPU_SYNTAXES if self.gpu_decoder is not None else frozenset()

    def finish_decoding(self, frames: Sequence[DecodedFrame | EncodedFrame]) -> list[DecodedFrame | InputError]:
        """Frames the readers left encoded are decoded on the device in one nvImageCodec call; what it returns as
        None is decoded on the CPU. Which decoder produced each frame stays with it (provenance)."""
        encoded = [i for i, f in enumerate(frames) if isinstance(f, EncodedFrame)]
        out: list[DecodedFrame | InputError] = list(frames)  # type: ignore[arg-type]
        if not encoded:
            return out
        tensors = self.gpu_decoder.decode_batch([frames[i] for i in encoded]) if self.gpu_decoder else \
            [None] * len(encoded)
        for i, tensor in zip(encoded, tensors, strict=True):
            f = frames[i]
            if tensor is not None:
                out[i] = DecodedFrame(f.sop_instance_uid, f.frame, tensor, f.params, decoder=self.gpu_decoder.label)
                continue
            try:
                out[i] = decode_encoded(f)
            except InputError as exc:
                out[i] = exc
        return out

    def stage(self, frames: Sequence[DecodedFrame]) -> StagedBatch:
        """Pack decoded frames into the next buffer."""
        staged = pack(frames, self._buffer, self.refer)
        staged.slot = (self._next - 1) % len(self._slots) if self.pinned else -1
        return staged

    def _buffer(self, size: int) -> torch.Tensor:
        if not self.pinned:
            return torch.empty(size, dtype=torch.uint8)
        slot = self._next % len(self._slots)
        self._next += 1
        if self._events[slot] is not None:
            self._events[slot].synchronize()  # the copy out of this slot has finished
        buf = self._slots[slot]
        if buf is None or buf.numel() < size:
            buf = torch.empty(max(size, MIN_PINNED_BYTES), dtype=torch.uint8, pin_memory=True)
            self._slots[slot] = buf
        return buf

    def upload(self, staged: StagedBatch) -> torch.Tensor:
        """The one host-to-device copy of a batch (asynchronous from pinned memory, on the current stream); on the
        CPU the buffer itself."""
        if self.device.type != "cuda":
            return staged.buffer
        for i, t in list(staged.on_device.items()):  # referenced host frames: from page-locked slots, asynchronously
            if t.device.type == "cpu":
                staged.on_device[i] = t.to(self.device, non_blocking=True)
        flat = staged.buffer.to(self.device, non_blocking=True)
        if staged.slot >= 0:
            event = torch.cuda.Event()
            event.record()
            self._events[staged.slot] = event
        return flat
