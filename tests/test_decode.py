"""Decoding real DICOMs across transfer syntaxes and photometric interpretations, every fast path compared bit for
bit with pydicom's own decode (``iter_pixels`` with the pinned plugin) on every file of pydicom's test files and
pydicom-data in a syntax it claims."""

from __future__ import annotations

import errno
import io
import logging
import os
import pickle
import warnings
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_color_lut, iter_pixels
from pydicom.uid import JPEG2000Lossless, RLELossless

from neuron.errors import DecodeError, ImageTooLarge, RetryableError, TransientReadError
from neuron.sample_data import pydicom_data_dir, pydicom_test_dir
from neuron_models.image import DecodedFrame, EncodedFrame
from worker import gpu_decode
from worker.decode import (
    DECODER_PLUGIN,
    IMAGECODECS_SYNTAXES,
    NATIVE_LITTLE_ENDIAN,
    decode_encoded,
    decode_instance,
    decoder_versions,
    select_frames,
)

LIMIT = 8192 * 8192
FRAMES = 4


def decode(path, max_frames=16, max_pixels=LIMIT, **kw):
    return decode_instance(path, "uid", max_frames, max_pixels, **kw)


def reference(path, indices):
    """pydicom's own decode, as the code before the fast paths did it: the values every path must reproduce."""
    ds = pydicom.dcmread(path, force=True)
    ts = ds.file_meta.TransferSyntaxUID
    arrays = list(iter_pixels(ds, indices=indices, decoding_plugin=DECODER_PLUGIN if ts.is_compressed else ""))
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        arrays = [apply_color_lut(a, ds) for a in arrays]
    return [a[..., 0] if a.ndim == 3 and a.shape[-1] == 1 else a for a in arrays]


def _sample_files() -> dict[str, list[Path]]:
    """Every image file of pydicom's test files and pydicom-data, by transfer syntax, that pydicom itself decodes."""
    out = defaultdict(list)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.CRITICAL)
        try:
            for folder in (pydicom_test_dir(), pydicom_data_dir()):
                for path in sorted(folder.glob("*.dcm")):
                    try:
                        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
                        ts = str(ds.file_meta.TransferSyntaxUID)
                        if "Rows" in ds:
                            reference(path, [0])
                            out[ts].append(path)
                    except Exception:  # noqa: S112 - not decodable by pydicom either: no claim to test
                        continue
        finally:
            logging.disable(logging.NOTSET)
    return out


SAMPLES = _sample_files()
NATIVE_FILES = [p for ts in sorted(NATIVE_LITTLE_ENDIAN) for p in SAMPLES.get(str(ts), [])]
CODEC_FILES = [p for ts in sorted(IMAGECODECS_SYNTAXES) for p in SAMPLES.get(str(ts), [])]
ALL_FILES = [p for files in SAMPLES.values() for p in files]


def _ids(paths):
    return [p.name for p in paths]


def assert_same_values(frames, ref):
    assert len(frames) == len(ref) >= 1
    for f, r in zip(frames, ref, strict=True):
        assert isinstance(f, DecodedFrame)
        assert f.pixels.dtype == r.dtype and f.pixels.shape == r.shape
        np.testing.assert_array_equal(f.pixels, r)


def test_every_claimed_syntax_has_sample_files():
    """The parity tests below cover each syntax a fast path claims, with real files."""
    for ts in NATIVE_LITTLE_ENDIAN | IMAGECODECS_SYNTAXES:
        assert SAMPLES.get(str(ts)), f"no sample file for {ts.name}"


@pytest.mark.parametrize("path", NATIVE_FILES, ids=_ids(NATIVE_FILES))
def test_native_path_equals_pydicom_bit_for_bit(path):
    frames = decode(path, max_frames=FRAMES)
    assert_same_values(frames, reference(path, [f.frame for f in frames]))


@pytest.mark.parametrize("path", CODEC_FILES, ids=_ids(CODEC_FILES))
def test_imagecodecs_path_equals_pydicom_bit_for_bit(path):
    frames = decode(path, max_frames=FRAMES)
    assert_same_values(frames, reference(path, [f.frame for f in frames]))


@pytest.mark.parametrize("path", ALL_FILES, ids=_ids(ALL_FILES))
def test_encoded_frames_decoded_on_the_cpu_equal_the_direct_decode(path):
    ts = str(pydicom.dcmread(path, stop_before_pixels=True, force=True).file_meta.TransferSyntaxUID)
    direct = decode(path, max_frames=FRAMES)
    deferred = decode(path, max_frames=FRAMES, defer_syntaxes=frozenset({ts}))
    back = [decode_encoded(f) if isinstance(f, EncodedFrame) else f for f in deferred]
    assert_same_values(back, [f.pixels for f in direct])
    for b, d in zip(back, direct, strict=True):
        assert replace(b.params, modality_lut=None, voi_lut=None) == replace(d.params, modality_lut=None, voi_lut=None)
        for lb, ld in ((b.params.modality_lut, d.params.modality_lut), (b.params.voi_lut, d.params.voi_lut)):
            assert (lb is None) == (ld is None)
            if lb is not None:
                np.testing.assert_array_equal(lb.table, ld.table)


@pytest.mark.parametrize("path", ALL_FILES, ids=_ids(ALL_FILES))
def test_pydicom_backend_is_the_reference(path):
    frames = decode(path, max_frames=FRAMES, backend="pydicom")
    assert_same_values(frames, reference(path, [f.frame for f in frames]))


@pytest.mark.parametrize(("name", "decoder"), [
    ("RG1_UNCR.dcm", "native"), ("RG1_J2KR.dcm", "imagecodecs-"), ("emri_small_RLE.dcm", "imagecodecs-"),
    ("JPEG-LL.dcm", "imagecodecs-"), ("emri_small_jpeg_ls_lossless.dcm", "imagecodecs-"),
    ("emri_small_big_endian.dcm", "pydicom-"), ("color3d_jpeg_baseline.dcm", "pylibjpeg-libjpeg-"),
])
def test_each_frame_names_its_decoder(data_dir, name, decoder):
    assert all(f.decoder.startswith(decoder) for f in decode(data_dir / name, max_frames=2))


def test_decoder_versions_include_imagecodecs():
    assert decoder_versions()["imagecodecs"] not in ("", "missing")


def test_deferred_syntaxes_come_back_encoded_and_others_decoded(data_dir):
    defer = gpu_decode.GPU_SYNTAXES
    (enc,) = decode(data_dir / "RG1_J2KR.dcm", defer_syntaxes=defer)
    assert isinstance(enc, EncodedFrame) and enc.transfer_syntax == JPEG2000Lossless
    assert (enc.rows, enc.columns, enc.bits_stored, enc.photometric) == (1955, 1841, 15, "MONOCHROME1")
    assert enc.params.invert and enc.params.window.width == 30000
    (colour,) = decode(data_dir / "US1_J2KR.dcm", defer_syntaxes=defer)  # colour stays on the CPU
    assert isinstance(colour, DecodedFrame)
    assert all(isinstance(f, DecodedFrame) for f in decode(data_dir / "emri_small_RLE.dcm", defer_syntaxes=defer))


def test_native_unused_high_bits_are_masked_and_sign_extended_like_pydicom(tmp_path, test_files_dir):
    """Junk in the bits above BitsStored: pydicom masks them (unsigned) or sign-extends bit BitsStored-1 (signed)."""
    for pr in (0, 1):
        ds = pydicom.dcmread(test_files_dir / "MR_small.dcm")
        raw = np.frombuffer(ds.PixelData, "<u2").copy()
        raw ^= np.uint16(0xF000) * (np.arange(raw.size, dtype=np.uint16) % 2)  # set the top 4 bits on odd pixels
        raw[::7] |= 0x0800  # and bit 11 (the sign bit at 12 bits) on some
        ds.PixelData, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = raw.tobytes(), 12, 11, pr
        ds.save_as(tmp_path / f"junk{pr}.dcm")
        (frame,) = decode(tmp_path / f"junk{pr}.dcm")
        assert frame.decoder == "native"
        assert_same_values([frame], reference(tmp_path / f"junk{pr}.dcm", [0]))
        assert (frame.pixels.min() < 0) == bool(pr)


def test_gpu_output_is_conformed_like_the_cpu_decode(data_dir, test_files_dir):
    """nvImageCodec returns unsigned samples; its corrections, run here on CPU tensors standing in for its output
    (imagecodecs' values viewed as unsigned), must give the CPU decode's values."""
    torch = pytest.importorskip("torch")
    import imagecodecs

    for path in (data_dir / "MR2_J2KR.dcm", data_dir / "693_J2KR.dcm", data_dir / "JPEG-LL.dcm",
                 test_files_dir / "J2K_pixelrep_mismatch.dcm", data_dir / "JPGLosslessP14SV1_1s_1f_8b.dcm"):
        (enc,) = decode(path, defer_syntaxes=gpu_decode.GPU_SYNTAXES)
        raw = (imagecodecs.jpeg2k_decode if "J2K" in path.name else imagecodecs.ljpeg_decode)(enc.data)
        tensor = gpu_decode._conform(torch.from_numpy(raw.view(f"u{raw.itemsize}").copy()), enc)
        np.testing.assert_array_equal(tensor.numpy(), decode_encoded(enc).pixels)


def test_gpu_module_imports_without_nvimgcodec_and_says_how_to_install_it():
    try:
        import nvidia.nvimgcodec  # noqa: F401
    except ImportError:
        with pytest.raises(Exception, match="pip install 'neuron-screening\\[gpu\\]'|CUDA device"):
            gpu_decode.GpuDecoder("cuda")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


@pytest.mark.skipif(not _has_cuda(), reason="needs a CUDA device (and nvidia-nvimgcodec-cu13)")
@pytest.mark.parametrize("name", ["RG1_J2KR.dcm", "MR2_J2KR.dcm", "693_J2KR.dcm", "RG1_J2KI.dcm",
                                  "emri_small_jpeg_2k_lossless.dcm", "JPEG-LL.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm"])
def test_nvimgcodec_equals_pydicom_bit_for_bit(data_dir, name):
    pytest.importorskip("nvidia.nvimgcodec")
    frames = decode(data_dir / name, max_frames=FRAMES, defer_syntaxes=gpu_decode.GPU_SYNTAXES)
    tensors = gpu_decode.decode_batch(frames, "cuda")
    ref = reference(data_dir / name, [f.frame for f in frames])
    for t, r in zip(tensors, ref, strict=True):
        assert t is not None and t.device.type == "cuda"
        np.testing.assert_array_equal(t.cpu().numpy(), r)


@pytest.mark.parametrize(("lossless", "uncompressed"), [
    ("RG1_J2KR.dcm", "RG1_UNCR.dcm"),  # CR chest, JPEG 2000 lossless vs explicit little endian
    ("MR2_J2KR.dcm", "MR2_UNCR.dcm"),  # MR, JPEG 2000 lossless
    ("emri_small_jpeg_ls_lossless.dcm", "emri_small.dcm"),  # JPEG-LS, multi-frame
    ("emri_small_RLE.dcm", "emri_small.dcm"),  # RLE, multi-frame
    ("emri_small_big_endian.dcm", "emri_small.dcm"),  # big endian
    ("emri_small_jpeg_2k_lossless.dcm", "emri_small.dcm"),
    ("US1_J2KR.dcm", "US1_UNCR.dcm"),  # YBR_RCT colour: converted to RGB once, not twice
    ("OBXXXX1A_rle.dcm", "OBXXXX1A.dcm"),  # palette colour, RLE
])
def test_lossless_and_uncompressed_decode_to_identical_pixels(data_dir, lossless, uncompressed):
    a, b = decode(data_dir / lossless), decode(data_dir / uncompressed)
    assert len(a) == len(b) >= 1
    for fa, fb in zip(a, b, strict=True):
        assert fa.pixels.shape == fb.pixels.shape
        np.testing.assert_array_equal(fa.pixels, fb.pixels)
        assert fa.params.photometric == fb.params.photometric


@pytest.mark.parametrize("name", ["JPGLosslessP14SV1_1s_1f_8b.dcm", "JPEG-LL.dcm"])
def test_jpeg_lossless_decodes(data_dir, name):
    (frame,) = decode(data_dir / name)
    assert frame.pixels.ndim == 2 and frame.pixels.max() > frame.pixels.min()
    assert_same_values([frame], reference(data_dir / name, [0]))


@pytest.mark.parametrize("name", ["SC_rgb_jpeg_dcmtk.dcm", "JPGExtended.dcm", "SC_rgb_rle.dcm", "MR_small_RLE.dcm",
                                  "image_dfl.dcm", "SC_rgb_gdcm_KY.dcm", "JPEG2000.dcm"])
def test_pydicom_test_files_decode(test_files_dir, name):
    frames = decode(test_files_dir / name)
    assert frames and all(f.pixels.size for f in frames)
    assert_same_values(frames, reference(test_files_dir / name, [f.frame for f in frames]))


def test_monochrome1_is_marked_for_inversion_and_window_is_read(data_dir):
    (frame,) = decode(data_dir / "RG1_UNCR.dcm")
    assert frame.params.photometric == "MONOCHROME1" and frame.params.invert
    assert frame.params.window.center == 15000 and frame.params.window.width == 30000


def test_ybr_header_is_not_converted_twice(data_dir):
    """US1_J2KR says YBR_RCT; pydicom returns RGB, which must match the RGB original exactly."""
    (ybr,) = decode(data_dir / "US1_J2KR.dcm")
    assert ybr.params.photometric == "RGB" and ybr.params.color


def test_frame_policy_samples_evenly_up_to_the_cap():
    assert select_frames(3, 16) == [0, 1, 2]
    assert select_frames(120, 4) == [0, 40, 79, 119]
    assert select_frames(10, 1) == [0]


def test_multiframe_respects_the_cap(data_dir):
    frames = decode(data_dir / "emri_small.dcm", max_frames=4)
    assert [f.frame for f in frames] == [0, 3, 6, 9]


def test_absurd_size_is_refused_before_decoding(tmp_path, rg1):
    ds = pydicom.dcmread(rg1)
    ds.Rows, ds.Columns = 60000, 60000
    ds.save_as(tmp_path / "huge.dcm")
    with pytest.raises(ImageTooLarge, match="60000x60000 = 3,600,000,000 pixels per frame exceeds the limit"):
        decode(tmp_path / "huge.dcm")


def test_truncated_pixel_data_is_a_decode_error(tmp_path, rg1):
    raw = rg1.read_bytes()
    (tmp_path / "cut.dcm").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DecodeError, match="could not be decoded|can no longer be read"):
        decode(tmp_path / "cut.dcm")


def test_no_pixel_data_is_a_decode_error(tmp_path, rg1):
    ds = pydicom.dcmread(rg1)
    del ds.PixelData
    ds.save_as(tmp_path / "nopix.dcm")
    with pytest.raises(DecodeError, match="no Pixel Data"):
        decode(tmp_path / "nopix.dcm")


def test_reencoded_copies_decode_identically(tmp_path, chest_small):
    """Our own RLE and JPEG 2000 lossless encodings of a real CR give back the same stored values."""
    ref = decode(chest_small)[0].pixels
    for uid, name in ((RLELossless, "rle.dcm"), (JPEG2000Lossless, "j2k.dcm")):
        ds = pydicom.dcmread(chest_small)
        ds.compress(uid, encoding_plugin="pylibjpeg" if uid == JPEG2000Lossless else "")
        ds.save_as(tmp_path / name)
        np.testing.assert_array_equal(decode(tmp_path / name)[0].pixels, ref)


class FailingFile(io.RawIOBase):
    """The in-repo fake behind the ``opener`` seam: a file whose reads fail the way a storage device can."""

    def __init__(self, exc: BaseException, data: bytes = b"", fail_after: int = 0):
        self.exc, self.data, self.fail_after, self.pos = exc, data, fail_after, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def seek(self, pos, whence=0):
        self.pos = pos if whence == 0 else self.pos + pos if whence == 1 else len(self.data) + pos
        return self.pos

    def tell(self):
        return self.pos

    def readinto(self, b):
        if self.pos >= self.fail_after:
            raise self.exc
        n = min(len(b), self.fail_after - self.pos, len(self.data) - self.pos)
        b[:n] = self.data[self.pos:self.pos + n]
        self.pos += n
        return n


def opener_failing_with(exc, data=b"", fail_after=0):
    return lambda path: io.BufferedReader(FailingFile(exc, data, fail_after))


@pytest.mark.parametrize("code", [errno.EIO, errno.ETIMEDOUT, errno.ESTALE, errno.EAGAIN, errno.ENETDOWN,
                                  errno.ENETUNREACH, errno.EHOSTUNREACH, errno.ECONNRESET, errno.EBUSY])
def test_storage_errors_are_transient_and_retried(rg1, code):
    with pytest.raises(TransientReadError, match=errno.errorcode[code]) as info:
        decode(rg1, opener=opener_failing_with(OSError(code, os.strerror(code))))
    assert isinstance(info.value, RetryableError)
    assert pickle.loads(pickle.dumps(info.value)).args == info.value.args


def test_an_io_error_while_reading_the_pixels_is_transient(rg1):
    """The header reads fine, then the device fails in the middle of the Pixel Data (the native path's read)."""
    data = rg1.read_bytes()
    with pytest.raises(TransientReadError, match="EIO"):
        decode(rg1, opener=opener_failing_with(OSError(errno.EIO, "I/O error"), data, fail_after=len(data) // 2))


def test_out_of_memory_is_transient(rg1):
    with pytest.raises(TransientReadError, match="MemoryError"):
        decode(rg1, opener=opener_failing_with(MemoryError()))


def test_a_vanished_file_is_permanent_and_says_how_to_fix_it(tmp_path):
    with pytest.raises(DecodeError, match="the file is gone .*ENOENT.*re-scan"):
        decode(tmp_path / "gone.dcm")


def test_permission_denied_is_permanent_and_says_how_to_fix_it(rg1):
    with pytest.raises(DecodeError, match="permission denied .*read access"):
        decode(rg1, opener=opener_failing_with(PermissionError(errno.EACCES, "Permission denied")))


def test_a_directory_passed_as_a_file_is_permanent(tmp_path):
    with pytest.raises(DecodeError, match="directory, not a file"):
        decode(tmp_path)


def test_an_unexpected_decoder_exception_becomes_a_decode_error(data_dir, tmp_path):
    """A corrupt JPEG 2000 code stream: imagecodecs raises its own exception type, which must not escape."""
    ds = pydicom.dcmread(data_dir / "MR2_J2KR.dcm")
    frame = pydicom.encaps.get_frame(ds.PixelData, 0, number_of_frames=1)
    ds.PixelData = pydicom.encaps.encapsulate([frame[:200] + bytes(len(frame) - 200)])
    ds.save_as(tmp_path / "corrupt.dcm")
    with pytest.raises(DecodeError, match=r"could not be decoded \(transfer syntax JPEG 2000.*\): \w+Error"):
        decode(tmp_path / "corrupt.dcm")
