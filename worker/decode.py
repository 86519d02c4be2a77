"""Read and parse on the CPU; leave every pixel operation to the device.

``decode_instance`` returns the stored values of the selected frames exactly as pydicom's own decode gives them
(``iter_pixels`` with the pinned plugin: YBR is converted to RGB, palette colour is expanded here) together with the
parameters of the modality LUT, the VOI LUT or window and the photometric interpretation. The arithmetic on them runs
batched on the model's device in ``neuron_models.preprocess``, the same code on CPU and GPU.

Three ways to the same values, chosen per file, each proven bit for bit against pydicom in tests/test_decode.py:

- native little-endian pixel data: the header is parsed without the pixels, then only the selected frames are read
  from the file straight into one preallocated array (no full-dataset copy);
- JPEG 2000, JPEG lossless, JPEG-LS, RLE: each selected frame's code stream is cut out with ``pydicom.encaps`` and
  decoded by imagecodecs, whose codecs release the GIL, so decode threads run in parallel (pylibjpeg-openjpeg holds
  the GIL: one JPEG 2000 at a time however many threads);
- everything else (big endian, deflate, 1-bit, float, lossy JPEG colour, YBR in native data): pydicom with the
  pinned plugins, as before. Plugins are pinned (``DECODER_PLUGIN``): pydicom tries plugins in an order that changes
  between releases (pydicom's ``pixels`` decoder plugins) and different plugins give pixels 1-3 grey levels apart.

Syntaxes named in ``defer_syntaxes`` are not decoded here: their frames come back as ``EncodedFrame``s for a device
decoder (``worker.gpu_decode``); ``decode_encoded`` is the CPU decode of one such frame (its fallback).

I/O failures are classified here, at the boundary: a storage error that says nothing about the file (EIO, stale NFS
handle, timeout, out of memory) is a ``TransientReadError`` and retried; a missing or unreadable file and every
decoder failure is a permanent ``DecodeError`` that names the cause and the fix.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from enum import Enum
from functools import cache
from importlib import metadata
from pathlib import Path
from typing import BinaryIO

import cv2
import imagecodecs
import numpy as np
import pydicom
from pydicom import uid as uids
from pydicom.dataelem import DataElement
from pydicom.encaps import encapsulate, get_frame
from pydicom.pixels import apply_color_lut, get_decoder, iter_pixels
from pydicom.pixels.utils import get_j2k_parameters
from pydicom.uid import UID

from neuron.errors import DecodeError, ImageTooLarge, NeuronError, TransientReadError
from neuron.photos import photo_kind
from neuron_models.image import DecodedFrame, EncodedFrame, LutTable, PixelParams, Window

DECODER_PLUGIN = "pylibjpeg"
DECODER_PACKAGES = ("pydicom", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle", "imagecodecs")

MAX_SIDE = 65535
# Display parameters must keep every value a finite float32 (the device computes in float32; its maximum is 3.4e38).
FLOAT_LIMIT = 1e30
PIXEL_DATA = 0x7FE00010
# Elements larger than this are not read by the header parse; only Pixel Data is ever that large (LUTs top out at
# 128 KiB), and the native path reads just the frames it needs from the file.
DEFER_BYTES = 1 << 20

NATIVE_LITTLE_ENDIAN = frozenset({uids.ImplicitVRLittleEndian, uids.ExplicitVRLittleEndian})
J2K_SYNTAXES = frozenset({uids.JPEG2000Lossless, uids.JPEG2000})
# Process 14 with other predictors (1.2.840.10008.1.2.4.57) stays with pydicom: no sample file to prove it on.
JPEG_LOSSLESS_SYNTAXES = frozenset({uids.JPEGLosslessSV1})
JPEG_LS_SYNTAXES = frozenset({uids.JPEGLSLossless, uids.JPEGLSNearLossless})
# What imagecodecs decodes here (for the layouts ``_imagecodecs_codec`` accepts), each proven against pydicom.
# Lossy JPEG is not among them: libjpeg-turbo's IDCT differs from pylibjpeg-libjpeg's by a grey level here and there.
IMAGECODECS_SYNTAXES = J2K_SYNTAXES | JPEG_LOSSLESS_SYNTAXES | JPEG_LS_SYNTAXES | {uids.RLELossless}
# Which pylibjpeg plugin pydicom uses per syntax: the provenance of the fallback path.
_PLUGIN_PACKAGE = {**dict.fromkeys(uids.JPEG2000TransferSyntaxes, "pylibjpeg-openjpeg"),
                   **dict.fromkeys(uids.JPEGLSTransferSyntaxes, "pylibjpeg-libjpeg"),
                   **dict.fromkeys(uids.JPEGTransferSyntaxes, "pylibjpeg-libjpeg"),
                   uids.RLELossless: "pylibjpeg-rle"}

# errno values that say the storage failed, not the file: the same read may work later.
TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.ETIMEDOUT, errno.ESTALE, errno.EAGAIN, errno.ENETDOWN,
                              errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ECONNRESET, errno.EBUSY})
DECODER_FIX = ("truncated or corrupt data must be re-exported; a missing decoder is installed with "
               "pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg pylibjpeg-rle imagecodecs")

Opener = Callable[[Path], BinaryIO]


class Backend(str, Enum):
    """Which decoders ``decode_instance`` may use: the fast paths (``auto``) or only pydicom's own (``pydicom``, the
    reference the fast paths are tested against)."""

    AUTO = "auto"
    PYDICOM = "pydicom"


def open_file(path: Path) -> BinaryIO:
    """The one place files are opened for decoding (tests pass a failing opener to simulate storage errors)."""
    return open(path, "rb")


@cache
def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "missing"


def decoder_versions() -> dict[str, str]:
    return {name: _version(name) for name in DECODER_PACKAGES}


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
        if not 1 <= bits <= 16:  # PS3.3 C.11.1.1: 8 or 16 (some writers say 10-16); 65535 is no table depth
            return None
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
    if not abs(slope) * 2.0 ** min(max(bits_stored, 1), 64) + abs(intercept) < FLOAT_LIMIT:  # NaN fails too
        raise DecodeError(f"RescaleSlope {slope!r} and RescaleIntercept {intercept!r} give values that are not "
                          f"finite 32-bit numbers (|slope| x 2^BitsStored + |intercept| must stay below "
                          f"{FLOAT_LIMIT:.0e}); the header is corrupt: fix it at the source and re-export the file")
    window = voi = None
    center, width = _first_float(ds.get("WindowCenter")), _first_float(ds.get("WindowWidth"))
    if not (center is not None and width is not None and abs(center) < FLOAT_LIMIT and width < FLOAT_LIMIT):
        center = width = None  # NaN, infinite or absurd: no usable window; the VOI LUT or the image's range decides
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
        return [DecodedFrame(sop_instance_uid, 0, arr, PixelParams("RGB", True, bits), f"opencv-{cv2.__version__}")]
    top = float(2 ** bits - 1)  # full range: value / max, as torchxrayvision reads an 8-bit PNG (x / 255)
    return [DecodedFrame(sop_instance_uid, 0, arr, PixelParams("MONOCHROME2", False, bits,
                                                              window=Window(top / 2, top, "LINEAR_EXACT")),
                         f"opencv-{cv2.__version__}")]


def translate_error(exc: BaseException, doing: str, fix: str = DECODER_FIX) -> NeuronError:
    """Turn an exception caught at the decode boundary into ours: retryable when the storage failed (the file may be
    fine), permanent ``DecodeError`` otherwise, always naming the exception's type and message."""
    if isinstance(exc, NeuronError):
        return exc
    if isinstance(exc, MemoryError):
        return TransientReadError(f"{doing}: out of memory (MemoryError); the file may be fine and is retried later; "
                                  f"if it recurs, run fewer decode threads or a smaller --max-pixels")
    if isinstance(exc, OSError):
        code = errno.errorcode.get(exc.errno or 0, str(exc.errno))
        if exc.errno in TRANSIENT_ERRNOS:
            return TransientReadError(f"{doing}: {code} from the storage ({exc}); the file may be fine and is retried "
                                      f"later; if it persists, check the disk or the network mount")
        if isinstance(exc, FileNotFoundError):
            return DecodeError(f"{doing}: the file is gone ({code}: {exc}); it was moved or deleted after it was "
                               f"indexed: restore it, or re-scan the folder so the index matches the disk")
        if isinstance(exc, PermissionError):
            return DecodeError(f"{doing}: permission denied ({code}: {exc}); give the worker's user read access to "
                               f"the file (chmod/chown or the share's ACL), then run again with --retry-failed")
        if isinstance(exc, IsADirectoryError):
            return DecodeError(f"{doing}: the path is a directory, not a file ({code}: {exc}); index the files in "
                               f"it instead")
        return DecodeError(f"{doing}: {type(exc).__name__} ({code}): {exc}; {fix}")
    return DecodeError(f"{doing}: {type(exc).__name__}: {exc}; {fix}")


Allocate = Callable[[tuple[int, ...], np.dtype], np.ndarray]


def decode_instance(path: str | Path, sop_instance_uid: str, max_frames: int, max_pixels: int, *,
                    defer_syntaxes: frozenset[str] = frozenset(), backend: Backend | str = Backend.AUTO,
                    opener: Opener = open_file, allocate: Allocate | None = None) -> list[DecodedFrame | EncodedFrame]:
    """Read one instance's selected frames (``select_frames``). Raises DecodeError/ImageTooLarge with a reason a
    person can act on, or TransientReadError when the storage failed. Frames whose transfer syntax is in
    ``defer_syntaxes`` (and that a device decoder can finish: single-sample, not palette) come back encoded.
    ``allocate(shape, dtype)``: where uncompressed frames are read into, straight from the file (a reader process's
    shared-memory slot; default: numpy's own memory); frames other decoders produce are left where they are."""
    path = Path(path)
    if photo_kind(path) is not None:
        try:
            return list(decode_photo(path, sop_instance_uid, max_pixels))
        except Exception as exc:
            raise translate_error(exc, "image file could not be read") from exc
    try:
        fp = opener(path)
    except Exception as exc:
        raise translate_error(exc, "file can no longer be read") from exc
    with fp:
        try:
            ds = pydicom.dcmread(fp, force=True, defer_size=DEFER_BYTES)
        except Exception as exc:
            raise translate_error(exc, "file can no longer be read",
                                  "it is not DICOM or is damaged: re-export it from the source") from exc
        return decode_dataset(ds, fp, sop_instance_uid, max_frames, max_pixels, defer_syntaxes=defer_syntaxes,
                              backend=backend, allocate=allocate)


def decode_dataset(ds: pydicom.Dataset, fp: BinaryIO, sop_instance_uid: str, max_frames: int, max_pixels: int, *,
                   defer_syntaxes: frozenset[str] = frozenset(), backend: Backend | str = Backend.AUTO,
                   allocate: Allocate | None = None) -> list[DecodedFrame | EncodedFrame]:
    """``decode_instance`` on a dataset already parsed from ``fp`` (with Pixel Data deferred: ``DEFER_BYTES``), so
    a caller that also needs the header (indexing) parses the file once."""
    backend = Backend(backend)
    try:
        header = _Header.from_dataset(ds, max_pixels)
    except NeuronError:
        raise
    except Exception as exc:  # pydicom converts values lazily: a malformed one (a VR of two random bytes) raises
        raise translate_error(exc, "the image pixel attributes (group 0028) are malformed",
                              "the header is corrupt: re-export the file from the source") from exc
    indices = select_frames(header.n_frames, max_frames)
    ts = header.transfer_syntax
    try:
        if backend is Backend.AUTO and header.native_fast_path_ok():
            arrays, decoder = _read_native(fp, ds, header, indices, allocate or np.empty), "native"
            return _finish(ds, header, sop_instance_uid, indices, arrays, [decoder] * len(indices))
        if backend is Backend.AUTO and ts in IMAGECODECS_SYNTAXES | defer_syntaxes and header.encoded_ok():
            encoded = _encoded_frames(ds, header, sop_instance_uid, indices)
            if header.photometric == "PALETTE COLOR" or header.samples > 1:
                defer_syntaxes = frozenset()  # a device decoder cannot expand a palette or convert colour
            if ts in defer_syntaxes:
                return list(encoded)
            decoded = [_decode_array(f) for f in encoded]
            return _finish(ds, header, sop_instance_uid, indices, [a for a, _ in decoded], [d for _, d in decoded])
        _load_deferred(ds, fp)
        arrays = list(iter_pixels(ds, indices=indices, decoding_plugin=DECODER_PLUGIN if ts.is_compressed else ""))
        label = f"{_PLUGIN_PACKAGE[ts]}-{_version(_PLUGIN_PACKAGE[ts])}" if ts in _PLUGIN_PACKAGE \
            else f"pydicom-{_version('pydicom')}"
        # Inside the try: the display parameters are read here, and a malformed one raises like the pixels do.
        return _finish(ds, header, sop_instance_uid, indices, arrays, [label] * len(indices))
    except NeuronError:
        raise
    except Exception as exc:
        raise translate_error(exc, f"pixel data could not be decoded (transfer syntax {ts.name})") from exc


@dataclass(frozen=True)
class _Header:
    """The image pixel attributes the decoders rely on, checked (size before any allocation) as they are lifted
    from the header."""

    transfer_syntax: UID
    photometric: str
    rows: int
    columns: int
    samples: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    planar_configuration: int
    n_frames: int
    keyword: str

    @classmethod
    def from_dataset(cls, ds: pydicom.Dataset, max_pixels: int) -> _Header:
        keywords = [k for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData") if k in ds]
        if not keywords:
            raise DecodeError("no Pixel Data (7FE0,0010): nothing to screen; the instance holds no image")
        check_size(ds, max_pixels)
        photometric = str(ds.get("PhotometricInterpretation", "") or "").strip().upper()
        if not photometric:
            raise DecodeError("no PhotometricInterpretation (0028,0004): cannot tell grayscale from colour")
        meta = getattr(ds, "file_meta", None)
        ts = UID(str(meta.get("TransferSyntaxUID", "") if meta is not None else ""))

        def number(keyword: str, default: int) -> int:
            try:
                return int(ds.get(keyword, default) or default)
            except (TypeError, ValueError):
                return -1  # unusable: leaves the file to pydicom, whose message names the value

        bits_allocated = number("BitsAllocated", 8)
        return cls(ts, photometric, number("Rows", 0), number("Columns", 0), number("SamplesPerPixel", 1),
                   bits_allocated, number("BitsStored", bits_allocated), number("PixelRepresentation", 0),
                   number("PlanarConfiguration", 0), max(1, number("NumberOfFrames", 1)), keywords[0])

    def _layout_ok(self) -> bool:
        mono = self.photometric in {"MONOCHROME1", "MONOCHROME2", "PALETTE COLOR"}
        return (self.keyword == "PixelData" and self.bits_allocated in (8, 16, 32)
                and 1 <= self.bits_stored <= self.bits_allocated and self.pixel_representation in (0, 1)
                and self.planar_configuration in (0, 1)
                and ((self.samples == 1 and mono) or (self.samples == 3 and not mono)))

    def native_fast_path_ok(self) -> bool:
        """Little-endian, byte-aligned, no YBR resampling or conversion: read straight from the file."""
        return (self.transfer_syntax in NATIVE_LITTLE_ENDIAN and self._layout_ok()
                and (self.samples == 1 or self.photometric == "RGB"))

    def encoded_ok(self) -> bool:
        return self.transfer_syntax.is_encapsulated and self._layout_ok()

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(f"<{'i' if self.pixel_representation else 'u'}{self.bits_allocated // 8}")


def _read_native(fp: BinaryIO, ds: pydicom.Dataset, h: _Header, indices: Sequence[int],
                 allocate: Allocate = np.empty) -> list[np.ndarray]:
    """The selected frames, read from the file into one array from ``allocate``, then given pydicom's treatment of
    the unused high bits (masked if unsigned, sign-extended if signed: shift left, then arithmetically right)."""
    elem = ds.get_item(PIXEL_DATA, keep_deferred=True)
    frame_bytes = h.rows * h.columns * h.samples * h.bits_allocated // 8
    planar = h.samples > 1 and h.planar_configuration == 1
    shape = (h.samples, h.rows, h.columns) if planar else (h.rows, h.columns, h.samples) if h.samples > 1 \
        else (h.rows, h.columns)
    out = allocate((len(indices), *shape), h.dtype)
    value = elem.value
    available = len(value) if value is not None else int(getattr(elem, "length", 0))
    if available == 0xFFFFFFFF or available < frame_bytes * h.n_frames:
        raise DecodeError(f"pixel data could not be decoded: {h.n_frames} frame(s) of {h.rows}x{h.columns}x"
                          f"{h.samples} at {h.bits_allocated} bits need {frame_bytes * h.n_frames:,} bytes, the "
                          f"Pixel Data element holds {available:,}; the file is truncated: re-export it")
    for k, idx in enumerate(indices):
        target = memoryview(out[k]).cast("B")
        if value is not None:
            target[:] = memoryview(value)[idx * frame_bytes:(idx + 1) * frame_bytes]
            continue
        fp.seek(elem.value_tell + idx * frame_bytes)
        got = 0
        while got < frame_bytes:
            n = fp.readinto(target[got:])
            if not n:
                raise DecodeError(f"pixel data could not be decoded: frame {idx} needs {frame_bytes:,} bytes, the "
                                  f"file ends after {got:,}; the file is truncated: re-export or copy it again")
            got += n
    shift = h.bits_allocated - h.bits_stored
    if shift and out.dtype.kind == "u":  # one pass over the frame: clear the unused high bits
        np.bitwise_and(out, (1 << h.bits_stored) - 1, out=out)
    elif shift:  # signed: sign-extend from the stored high bit
        np.left_shift(out, shift, out=out)
        np.right_shift(out, shift, out=out)
    if planar:  # planar RGB is rare: its frames are interleaved in numpy's own memory
        return [np.ascontiguousarray(f.transpose(1, 2, 0)) for f in out]
    return list(out)


def _load_deferred(ds: pydicom.Dataset, fp: BinaryIO) -> None:
    """Read a deferred Pixel Data value through our own file handle (keeping its VR) before pydicom decodes it."""
    elem = ds.get_item(PIXEL_DATA, keep_deferred=True)
    if elem is None or elem.value is not None:
        return
    fp.seek(elem.value_tell)
    ds[PIXEL_DATA] = DataElement(PIXEL_DATA, elem.VR, fp.read(elem.length), is_undefined_length=False)


def _encoded_frames(ds: pydicom.Dataset, h: _Header, sop_instance_uid: str,
                    indices: Sequence[int]) -> list[EncodedFrame]:
    photometric = h.photometric
    if photometric in {"YBR_ICT", "YBR_RCT"} or photometric.startswith("YBR"):
        photometric = "RGB"  # what the values are once decoded (see _decode_array)
    params = pixel_params(ds, "RGB" if h.photometric == "PALETTE COLOR" else photometric)
    extended = None
    if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
        extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
    return [EncodedFrame(sop_instance_uid, idx,
                         get_frame(ds.PixelData, idx, number_of_frames=h.n_frames, extended_offsets=extended),
                         str(h.transfer_syntax), h.rows, h.columns, h.samples, h.bits_allocated, h.bits_stored,
                         h.pixel_representation, h.photometric, params, h.planar_configuration)
            for idx in indices]


def _jpeg_header(src: bytes) -> tuple[int, list[int], bool]:
    """(precision, component ids, has a JFIF APP0) from a JPEG / JPEG-LS code stream's markers."""
    i, jfif = 2, False
    while i + 4 <= len(src) and src[i] == 0xFF:
        marker, length = src[i + 1], int.from_bytes(src[i + 2:i + 4], "big")
        if marker == 0xE0 and src[i + 4:i + 8] == b"JFIF":
            jfif = True
        if marker in (0xC0, 0xC1, 0xC2, 0xC3, 0xF7):
            n = src[i + 9]
            return src[i + 4], [src[i + 10 + 3 * c] for c in range(n)], jfif
        i += 2 + length
    raise ValueError("no start-of-frame marker in the JPEG code stream")


def _imagecodecs_codec(f: EncodedFrame) -> str | None:
    """The imagecodecs codec that gives pydicom's values for this frame, or None (pydicom decodes it). Lossy JPEG
    only in grayscale (colour needs libjpeg's own YCbCr handling); JPEG-family colour only as plain RGB."""
    ts = UID(f.transfer_syntax)
    if ts in J2K_SYNTAXES:
        return "jpeg2k" if f.samples_per_pixel == 1 or f.photometric in {"RGB", "YBR_ICT", "YBR_RCT"} else None
    if f.samples_per_pixel > 1 and f.photometric != "RGB":
        return None
    if ts == uids.RLELossless:
        return "dicomrle"
    if ts in JPEG_LS_SYNTAXES:
        return "jpegls"
    if ts in JPEG_LOSSLESS_SYNTAXES:
        return "ljpeg"
    return None


def _shift(arr: np.ndarray, bits: int) -> np.ndarray:
    """pydicom's bit correction: drop ``bits`` high bits, sign-extending if the dtype is signed."""
    if bits > 0:
        arr = arr if arr.flags.writeable else arr.copy()
        np.left_shift(arr, bits, out=arr)
        np.right_shift(arr, bits, out=arr)
    return arr


def _itemsize(precision: int) -> int:
    return 1 if precision <= 8 else 2 if precision <= 16 else 4


def _imagecodecs_decode(f: EncodedFrame, codec: str) -> np.ndarray:
    """Decode with imagecodecs, then apply exactly the corrections pydicom applies after its plugin
    (``pydicom.pixels.decoders.base``: dtype from precision and Pixel Representation, sign or unused-bit shift)."""
    src = f.data
    signed = "i" if f.pixel_representation else "u"
    mono = f.samples_per_pixel == 1
    if codec == "dicomrle":
        raw = imagecodecs.dicomrle_decode(src, f"<u{f.bits_allocated // 8}")
        planes = np.frombuffer(raw, f"<{signed}{f.bits_allocated // 8}")
        planes = planes.reshape(f.samples_per_pixel, f.rows, f.columns)
        arr = np.ascontiguousarray(planes[0] if mono else planes.transpose(1, 2, 0))
        return _shift(arr, f.bits_allocated - f.bits_stored)
    if codec == "jpeg2k":
        info = get_j2k_parameters(src)
        precision = int(info.get("precision", f.bits_stored))
        arr = _same_size_view(imagecodecs.jpeg2k_decode(src), _itemsize(precision), signed)
        if mono and bool(info.get("is_signed", f.pixel_representation)) != bool(f.pixel_representation):
            _shift(arr, 8 * arr.itemsize - precision)
        return arr
    precision, ids, jfif = _jpeg_header(src)
    if not mono and (jfif or ids not in ([1, 2, 3], [0, 1, 2], [82, 71, 66], [114, 103, 98])):
        raise _NotForImagecodecs("colour JPEG with a colour-space marker")
    if codec == "jpegls":
        arr = _same_size_view(imagecodecs.jpegls_decode(src), _itemsize(precision), signed)
        return _shift(arr, 8 * arr.itemsize - precision) if f.pixel_representation else arr
    arr = _same_size_view(imagecodecs.ljpeg_decode(src), f.bits_allocated // 8, signed)
    return _shift(arr, f.bits_allocated - f.bits_stored)


class _NotForImagecodecs(Exception):
    """This frame's layout is one imagecodecs' output is not proven to match pydicom on: pydicom decodes it."""


def _same_size_view(arr: np.ndarray, itemsize: int, signed: str) -> np.ndarray:
    if arr.dtype.itemsize != itemsize or arr.dtype.kind not in "ui":
        raise _NotForImagecodecs(f"decoded {arr.dtype}, pydicom gives {itemsize}-byte integers")
    return arr.view(f"{signed}{itemsize}")


def _pydicom_frame(f: EncodedFrame) -> np.ndarray:
    """One encoded frame through pydicom and the pinned plugin: the reference, and the fallback."""
    arr, _ = get_decoder(UID(f.transfer_syntax)).as_array(
        encapsulate([f.data]), rows=f.rows, columns=f.columns, samples_per_pixel=f.samples_per_pixel,
        bits_allocated=f.bits_allocated, bits_stored=f.bits_stored, pixel_representation=f.pixel_representation,
        photometric_interpretation=f.photometric, planar_configuration=f.planar_configuration, number_of_frames=1,
        decoding_plugin=DECODER_PLUGIN)
    return arr


def _decode_array(f: EncodedFrame) -> tuple[np.ndarray, str]:
    codec = _imagecodecs_codec(f)
    if codec is not None:
        try:
            return _imagecodecs_decode(f, codec), f"imagecodecs-{_version('imagecodecs')} {codec}"
        except (_NotForImagecodecs, imagecodecs.DelayedImportError):
            pass
    package = _PLUGIN_PACKAGE.get(UID(f.transfer_syntax), "pydicom")
    return _pydicom_frame(f), f"{package}-{_version(package)}"


def decode_encoded(frame: EncodedFrame) -> DecodedFrame:
    """The CPU decode of one frame that ``decode_instance`` deferred (the fallback of a device decoder): the same
    values the direct decode gives. Raises DecodeError naming the decoder's failure."""
    ts = UID(frame.transfer_syntax)
    try:
        arr, decoder = _decode_array(frame)
    except NeuronError:
        raise
    except Exception as exc:
        raise translate_error(exc, f"pixel data could not be decoded (transfer syntax {ts.name})") from exc
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    params = _colour_depth(frame.params, arr, palette=False)
    _check_shape(arr, params)
    return DecodedFrame(frame.sop_instance_uid, frame.frame, np.ascontiguousarray(arr), params, decoder)


def _check_shape(arr: np.ndarray, params: PixelParams) -> None:
    if not params.color and arr.ndim != 2:
        raise DecodeError(f"{params.photometric} frame has shape {arr.shape}; expected rows x columns")
    if params.color and (arr.ndim != 3 or arr.shape[-1] != 3):
        raise DecodeError(f"{params.photometric} frame has shape {arr.shape}; expected rows x columns x 3")


def _colour_depth(params: PixelParams, arr: np.ndarray, palette: bool) -> PixelParams:
    """Colour values span their container: a palette expands to its table's depth, not BitsStored."""
    if not params.color:
        return params
    itemsize_bits = 8 * arr.itemsize
    return replace(params, bits_stored=itemsize_bits if palette or itemsize_bits == 8 else params.bits_stored)


def _finish(ds: pydicom.Dataset, h: _Header, sop_instance_uid: str, indices: Sequence[int],
            arrays: Sequence[np.ndarray], decoders: Sequence[str]) -> list[DecodedFrame | EncodedFrame]:
    """Palette expansion, the display parameters and the shape checks, the same for every decoder."""
    if not arrays:
        raise DecodeError("the pixel data holds no frames; re-export the file from the source")
    photometric = h.photometric
    palette = photometric == "PALETTE COLOR"
    if palette:
        try:
            arrays = [apply_color_lut(a, ds) for a in arrays]
        except Exception as exc:
            raise DecodeError(f"palette colour lookup failed: {exc}; the palette tables are missing or broken") from exc
        photometric = "RGB"
    elif photometric.startswith("YBR"):
        photometric = "RGB"  # the decoders converted the pixels already (as pydicom's as_rgb); not twice
    params = _colour_depth(pixel_params(ds, photometric), arrays[0], palette)
    frames: list[DecodedFrame | EncodedFrame] = []
    for idx, arr, decoder in zip(indices, arrays, decoders, strict=True):
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        _check_shape(arr, params)
        frames.append(DecodedFrame(sop_instance_uid, idx, np.ascontiguousarray(arr), params, decoder))
    return frames
