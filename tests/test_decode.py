"""Decoding real DICOMs across transfer syntaxes and photometric interpretations."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000Lossless, RLELossless

from neuron.errors import DecodeError, ImageTooLarge
from worker.decode import decode_instance, select_frames

LIMIT = 8192 * 8192


def decode(path, max_frames=16, max_pixels=LIMIT):
    return decode_instance(path, "uid", max_frames, max_pixels)


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


@pytest.mark.parametrize("name", ["SC_rgb_jpeg_dcmtk.dcm", "JPGExtended.dcm", "SC_rgb_rle.dcm", "MR_small_RLE.dcm",
                                  "image_dfl.dcm", "SC_rgb_gdcm_KY.dcm", "JPEG2000.dcm"])
def test_pydicom_test_files_decode(test_files_dir, name):
    frames = decode(test_files_dir / name)
    assert frames and all(f.pixels.size for f in frames)


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
