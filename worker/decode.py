"""Read and parse on the CPU; leave every pixel operation to the device.

``decode_instance`` returns the stored values of the selected frames exactly as the file holds them (after
decompression; YBR is already converted to RGB by pydicom, palette colour is expanded here) together with the
parameters of the modality LUT, the VOI LUT or window and the photometric interpretation. The arithmetic on them runs
batched on the model's device in ``neuron_models.preprocess``, the same code on CPU and GPU.

Decoder plugins are pinned (``DECODER_PLUGIN``): pydicom tries plugins in an order that changes between releases and
different plugins give pixels 1-3 grey levels apart (NOTES 15).
"""

from __future__ import annotations

from dataclasses import replace
from importlib import metadata
from pathlib import Path

import cv2
import numpy as np
import pydicom
from pydicom.pixels import apply_color_lut, iter_pixels
from pydicom.uid import UID

from neuron.errors import DecodeError, ImageTooLarge
from neuron.photos import photo_kind
from neuron_models.image import DecodedFrame, LutTable, PixelParams, Window

DECODER_PLUGIN = "pylibjpeg"
DECODER_PACKAGES = ("pydicom", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle")

MAX_SIDE = 65535


def decoder_versions() -> dict[str, str]:
    out = {}
    for name in DECODER_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def select_frames(n_frames: int, cap: int) -> list[int]:
    """The frame policy: every frame up to ``cap``; beyond that, ``cap`` frames evenly spaced over the whole clip
    (first and last included), so a long cine loop is sampled end to end rather than cut after its start."""
    if n_frames <= cap:
        return list(range(n_frames))
    if cap == 1:
        return [0]
    return sorted({int(round(i * (n_frames - 1) / (cap - 1))) for i in range(cap)})


def _first_float(value) -> float | None:
    if value is None:
        return None
    try:
        if isinstance(value, pydicom.multival.MultiValue):
            value = value[0]
        return float(value)
    except (TypeError, ValueError, IndexError):
        return None


def _lut_from_item(item, bits_default: int) -> LutTable | None:
    try:
        desc = item.LUTDescriptor
        data = item.LUTData
        first = int(desc[1])
        bits = int(desc[2]) if len(desc) > 2 and int(desc[2]) else bits_default
        if isinstance(data, bytes):
            dtype = np.uint16 if bits > 8 else np.uint8
            data = np.frombuffer(data, dtype=dtype)
        table = np.asarray(data, dtype=np.float32).reshape(-1)
        if table.size == 0:
            return None
        return LutTable(first, table, bits)
    except (AttributeError, IndexError, TypeError, ValueError):
        return None


def pixel_params(ds: pydicom.Dataset, photometric: str) -> PixelParams:
    color = photometric not in {"MONOCHROME1", "MONOCHROME2"}
    bits_stored = int(ds.get("BitsStored", ds.get("BitsAllocated", 8)) or 8)
    if color:
        return PixelParams(photometric=photometric, color=True, bits_stored=bits_stored)
    modality_lut = None
    if "ModalityLUTSequence" in ds and len(ds.ModalityLUTSequence):
        modality_lut = _lut_from_item(ds.ModalityLUTSequence[0], bits_stored)
    slope = _first_float(ds.get("RescaleSlope")) or 1.0
    intercept = _first_float(ds.get("RescaleIntercept")) or 0.0
    window = voi = None
    center, width = _first_float(ds.get("WindowCenter")), _first_float(ds.get("WindowWidth"))
    if center is not None and width is not None and width >= 1:
        fn = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        window = Window(center, width, fn if fn in {"LINEAR", "LINEAR_EXACT", "SIGMOID"} else "LINEAR")
    elif "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        voi = _lut_from_item(ds.VOILUTSequence[0], bits_stored)
    return PixelParams(photometric=photometric, color=False, bits_stored=bits_stored, slope=slope,
                       intercept=intercept, modality_lut=modality_lut, window=window, voi_lut=voi)


def check_size(ds: pydicom.Dataset, max_pixels: int) -> None:
    """Refuse absurd sizes from the header, before any pixel buffer is allocated."""
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows < 1 or cols < 1:
        raise DecodeError(f"Rows={rows}, Columns={cols}: an image needs both at least 1; the header is broken")
    if rows > MAX_SIDE or cols > MAX_SIDE or rows * cols > max_pixels:
        raise ImageTooLarge(
            f"{rows}x{cols} = {rows * cols:,} pixels per frame exceeds the limit of {max_pixels:,} "
            f"(--max-pixels); no real radiograph is that large; if this one is, raise --max-pixels")


def decode_photo(path: str | Path, sop_instance_uid: str, max_pixels: int) -> list[DecodedFrame]:
    """A plain JPEG or PNG (skin photographs, training sets): RGB or grayscale, 8 or 16 bits."""
    data = np.fromfile(str(path), dtype=np.uint8)
    arr = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise DecodeError("image file could not be decoded by OpenCV; it is truncated or not a JPEG/PNG")
    if arr.shape[0] * arr.shape[1] > max_pixels:
        raise ImageTooLarge(f"{arr.shape[0]}x{arr.shape[1]} pixels exceeds the limit of {max_pixels:,} "
                            f"(--max-pixels)")
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    bits = 8 * arr.itemsize
    if arr.ndim == 3:
        arr = np.ascontiguousarray(arr[..., ::-1])  # BGR -> RGB
        return [DecodedFrame(sop_instance_uid, 0, arr, PixelParams("RGB", True, bits))]
    top = float(2 ** bits - 1)  # full range: value / max, as torchxrayvision reads an 8-bit PNG (x / 255)
    return [DecodedFrame(sop_instance_uid, 0, arr, PixelParams("MONOCHROME2", False, bits,
                                                              window=Window(top / 2, top, "LINEAR_EXACT")))]


def decode_instance(path: str | Path, sop_instance_uid: str, max_frames: int, max_pixels: int) -> list[DecodedFrame]:
    """Read one instance's selected frames. Raises DecodeError/ImageTooLarge with a reason a person can act on."""
    if photo_kind(Path(path)) is not None:
        return decode_photo(path, sop_instance_uid, max_pixels)
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as exc:
        raise DecodeError(f"file can no longer be read ({type(exc).__name__}: {exc})") from exc
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        raise DecodeError("no Pixel Data (7FE0,0010): nothing to screen; the instance holds no image")
    check_size(ds, max_pixels)
    photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
    if not photometric:
        raise DecodeError("no PhotometricInterpretation (0028,0004): cannot tell grayscale from colour")
    n_frames = max(1, int(ds.get("NumberOfFrames", 1) or 1))
    indices = select_frames(n_frames, max_frames)
    ts = UID(str(ds.file_meta.get("TransferSyntaxUID", ""))) if hasattr(ds, "file_meta") else None
    plugin = DECODER_PLUGIN if ts is not None and ts.is_compressed else ""
    try:
        arrays = list(iter_pixels(ds, indices=indices, decoding_plugin=plugin))
    except Exception as exc:
        name = ts.name if ts is not None else "unknown"
        raise DecodeError(
            f"pixel data could not be decoded (transfer syntax {name}): {type(exc).__name__}: {exc}. "
            f"Truncated or corrupt data must be re-exported; a missing decoder is installed with "
            f"pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle") from exc
    palette = photometric == "PALETTE COLOR"
    if palette:
        try:
            arrays = [apply_color_lut(a, ds) for a in arrays]
        except Exception as exc:
            raise DecodeError(f"palette colour lookup failed: {exc}; the palette tables are missing or broken") from exc
        photometric = "RGB"
    elif photometric.startswith("YBR"):
        photometric = "RGB"  # pydicom converted the pixels already (as_rgb); do not convert twice (NOTES 14)
    params = pixel_params(ds, photometric)
    if params.color and arrays:
        # Colour values span their container: a palette expands to its table's depth, not BitsStored.
        itemsize_bits = 8 * arrays[0].itemsize
        params = replace(params, bits_stored=itemsize_bits if palette or itemsize_bits == 8 else params.bits_stored)
    if not arrays:
        raise DecodeError("the pixel data holds no frames; re-export the file from the source")
    frames = []
    for idx, arr in zip(indices, arrays, strict=True):
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if not params.color and arr.ndim != 2:
            raise DecodeError(f"{photometric} frame has shape {arr.shape}; expected rows x columns")
        if params.color and (arr.ndim != 3 or arr.shape[-1] != 3):
            raise DecodeError(f"{photometric} frame has shape {arr.shape}; expected rows x columns x 3")
        frames.append(DecodedFrame(sop_instance_uid, idx, np.ascontiguousarray(arr), params))
    return frames
