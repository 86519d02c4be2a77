"""Decode JPEG 2000, HTJ2K and JPEG lossless frames in batches on a CUDA device with nvImageCodec.

``worker.decode.decode_instance(..., defer_syntaxes=GPU_SYNTAXES)`` hands back ``EncodedFrame``s for these syntaxes
(single-sample frames only: a device decoder cannot expand a palette); ``GpuDecoder.decode_batch`` turns a list of
them into tensors on the device with the values pydicom's own decode gives (same dtype, same sign and unused-bit
corrections). A frame nvImageCodec cannot decode comes back as ``None``: the caller decodes it with
``worker.decode.decode_encoded`` on the CPU.

nvImageCodec (``pip install neuron-screening[gpu]``) and torch are imported only when a decoder is built, so this
module imports on a machine with neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import metadata
from typing import TYPE_CHECKING, Any

from pydicom import uid as uids
from pydicom.pixels.utils import get_j2k_parameters

from neuron.errors import ConfigError
from neuron_models.image import EncodedFrame

if TYPE_CHECKING:
    import torch

J2K_FAMILY = frozenset({uids.JPEG2000Lossless, uids.JPEG2000, uids.HTJ2KLossless, uids.HTJ2KLosslessRPCL,
                        uids.HTJ2K})
JPEG_LOSSLESS = frozenset({uids.JPEGLossless, uids.JPEGLosslessSV1})
GPU_SYNTAXES: frozenset[str] = frozenset(str(u) for u in J2K_FAMILY | JPEG_LOSSLESS)


def _load_nvimgcodec() -> Any:
    try:
        from nvidia import nvimgcodec
    except ImportError as exc:
        raise ConfigError("GPU decoding needs nvImageCodec, which is not installed: "
                          "pip install 'neuron-screening[gpu]' (nvidia-nvimgcodec-cu13), or decode on the CPU") from exc
    return nvimgcodec


def nvimgcodec_version() -> str:
    try:
        return metadata.version("nvidia-nvimgcodec-cu13")
    except metadata.PackageNotFoundError:
        return "missing"


class GpuDecoder:
    """One nvImageCodec decoder bound to one CUDA device; build it once per engine, reuse it for every batch."""

    def __init__(self, device: torch.device | str) -> None:
        import torch

        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ConfigError(f"GPU decoding runs on a CUDA device, not '{self.device}'; decode on the CPU instead")
        self._nvimgcodec = _load_nvimgcodec()
        self._decoder = self._nvimgcodec.Decoder(device_id=self.device.index or 0)
        self._params = self._nvimgcodec.DecodeParams(color_spec=self._nvimgcodec.ColorSpec.UNCHANGED,
                                                     allow_any_depth=True)
        self.label = f"nvimgcodec-{nvimgcodec_version()}"

    def decode_batch(self, frames: Sequence[EncodedFrame]) -> list[torch.Tensor | None]:
        """Each frame's stored values as an (H, W) tensor on the device, or None where the frame is not for this
        decoder (syntax, colour) or nvImageCodec could not decode it."""
        import torch

        wanted = [i for i, f in enumerate(frames) if f.transfer_syntax in GPU_SYNTAXES and f.samples_per_pixel == 1]
        out: list[torch.Tensor | None] = [None] * len(frames)
        if not wanted:
            return out
        with torch.cuda.device(self.device):
            images = self._decoder.decode([frames[i].data for i in wanted], params=self._params)
            for i, image in zip(wanted, images, strict=True):
                if image is not None:
                    out[i] = _conform(torch.as_tensor(image, device=self.device), frames[i])
        return out


def decode_batch(frames: Sequence[EncodedFrame], device: torch.device | str,
                 decoder: GpuDecoder | None = None) -> list[torch.Tensor | None]:
    """``GpuDecoder(device).decode_batch(frames)``; pass ``decoder`` to reuse one across batches."""
    return (decoder or GpuDecoder(device)).decode_batch(frames)


def _conform(t: torch.Tensor, f: EncodedFrame) -> torch.Tensor | None:
    """nvImageCodec's output with pydicom's corrections (``worker.decode._imagecodecs_decode``): the dtype pydicom
    returns (size from the J2K precision or Bits Allocated, sign from Pixel Representation), then the sign or
    unused-bit shift. None if the output is not a single-channel frame of the header's size."""
    import torch

    bits, dtypes = _dtype_tables()
    if t.ndim == 3 and t.shape[-1] == 1:
        t = t[..., 0]
    if tuple(t.shape) != (f.rows, f.columns) or t.dtype not in bits:
        return None
    if f.transfer_syntax in J2K_FAMILY:
        info = get_j2k_parameters(f.data)
        precision = int(info.get("precision", f.bits_stored))
        itemsize = 1 if precision <= 8 else 2 if precision <= 16 else 4
        shift = 8 * itemsize - precision
        if bool(info.get("is_signed", f.pixel_representation)) == bool(f.pixel_representation):
            shift = 0
    else:
        itemsize, shift = f.bits_allocated // 8, f.bits_allocated - f.bits_stored
    if bits[t.dtype] != 8 * itemsize:
        return None
    target = dtypes[(itemsize, f.pixel_representation)]
    t = t.view(target) if t.dtype != target else t
    if shift:
        wide = t.to(torch.int64)
        top = 8 * itemsize
        wide = (wide << (64 - top + shift)) >> (64 - top + shift)  # sign-extends from the stored top bit
        if f.pixel_representation == 0:
            wide = wide & ((1 << (top - shift)) - 1)
        t = wide.to(target)
    return t


def _dtype_tables() -> tuple[dict[torch.dtype, int], dict[tuple[int, int], torch.dtype]]:
    import torch

    bits = {torch.uint8: 8, torch.int8: 8, torch.uint16: 16, torch.int16: 16, torch.uint32: 32, torch.int32: 32}
    dtypes = {(1, 0): torch.uint8, (1, 1): torch.int8, (2, 0): torch.uint16, (2, 1): torch.int16,
              (4, 0): torch.uint32, (4, 1): torch.int32}
    return bits, dtypes

