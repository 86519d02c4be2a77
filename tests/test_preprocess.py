"""Device-side pixel work: windows, MONOCHROME1 inversion, area resize, CLAHE, saturation check."""

from __future__ import annotations

import cv2
import numpy as np
import pydicom
import pytest
import torch
from pydicom.pixels import apply_voi_lut

from neuron.errors import RejectedImage
from neuron_models.preprocess import (
    PreprocessConfig,
    center_square,
    clahe,
    match_channels,
    prepare_batch,
    resize_square,
    to_unit_range,
    window_to_unit,
)
from worker.decode import decode_instance

from .conftest import monochrome2_twin

CPU = torch.device("cpu")


def unit(path) -> torch.Tensor:
    (frame,) = decode_instance(path, "uid", 1, 8192 * 8192)
    return to_unit_range(frame.pixels, frame.params, CPU)


def test_linear_window_matches_pydicom(rg1):
    """Our window is pydicom's apply_voi_lut rescaled to [0, 1] (pydicom leaves it in the stored-value range)."""
    ds = pydicom.dcmread(rg1)
    arr = ds.pixel_array
    ref = apply_voi_lut(arr, ds).astype(np.float64)
    ref = (ref - 0) / ((1 << ds.BitsStored) - 1)
    ours = window_to_unit(torch.from_numpy(arr.astype(np.float32)), 15000.0, 30000.0, "LINEAR").numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_window_functions_follow_the_standard():
    x = torch.tensor([0.0, 50.0, 100.0])
    # PS3.3 C.11.2.1.2.1: y = ((x - (c - 0.5)) / (w - 1) + 0.5), clipped; x = 0 is inside the window here
    np.testing.assert_allclose(window_to_unit(x, 50, 101, "LINEAR").numpy(), [0.005, 0.505, 1.0], atol=1e-6)
    np.testing.assert_allclose(window_to_unit(x, 50, 99, "LINEAR").numpy(), [0.0, 0.505102, 1.0], atol=1e-6)
    np.testing.assert_allclose(window_to_unit(x, 50, 100, "LINEAR_EXACT").numpy(), [0.0, 0.5, 1.0], atol=1e-6)
    np.testing.assert_allclose(window_to_unit(x, 50, 100, "SIGMOID").numpy(),
                               1 / (1 + np.exp(-4 * (x.numpy() - 50) / 100)), atol=1e-6)


def test_monochrome1_is_inverted_before_the_model(tmp_path, rg1):
    """A MONOCHROME1 radiograph and its MONOCHROME2 twin (inverted stored values, mirrored window) give the same
    display image, and that image has bright bone: the lung fields (centre) are darker than the spine/mediastinum."""
    twin = monochrome2_twin(rg1, tmp_path / "mono2.dcm")
    a, b = unit(rg1), unit(twin)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    h, w = a.shape[-2:]
    lung = a[0, h // 3: h // 2, w // 5: w // 3].mean()
    mediastinum = a[0, h // 3: h // 2, int(w * 0.47): int(w * 0.53)].mean()
    assert mediastinum > lung


@pytest.mark.parametrize(("h", "w"), [(1955, 1841), (489, 461), (300, 484), (224, 300)])
def test_area_resize_equals_opencv_inter_area(h, w):
    """Shrinking (or keeping the size): every case is compared, none returns early."""
    rng = np.random.default_rng(0)
    img = rng.random((h, w), dtype=np.float32)
    crop = center_square(torch.from_numpy(img)[None])
    assert min(crop.shape[-2:]) >= 224
    ours = resize_square(crop, 224)[0].numpy()
    ref = cv2.resize(crop[0].numpy(), (224, 224), interpolation=cv2.INTER_AREA)
    np.testing.assert_allclose(ours, ref, atol=2e-5)


@pytest.mark.parametrize(("h", "w"), [(100, 100), (150, 120)])
def test_enlarging_is_bilinear(h, w):
    """Smaller than the input size: the centre square is enlarged bilinearly (cv2's half-pixel centres)."""
    rng = np.random.default_rng(1)
    img = torch.from_numpy(rng.random((h, w), dtype=np.float32))[None]
    crop = center_square(img)
    assert crop.shape[-2:] == (min(h, w), min(h, w))
    ours = resize_square(crop, 224)[0].numpy()
    ref = torch.nn.functional.interpolate(crop[None], size=(224, 224), mode="bilinear", align_corners=False)[0, 0]
    np.testing.assert_allclose(ours, ref.numpy(), atol=1e-5)
    ref_cv2 = cv2.resize(crop[0].numpy(), (224, 224), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_allclose(ours, ref_cv2, atol=1e-3)


def test_clahe_matches_opencv_within_two_grey_levels(rg1):
    x = resize_square(center_square(unit(rg1)), 512)
    img8 = np.round(x[0].numpy() * 255).astype(np.uint8)
    ref = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(img8)
    ours = clahe(torch.from_numpy(img8).float()[None, None] / 255.0, 2.0, 8)[0, 0].numpy() * 255
    diff = np.abs(ours - ref)
    # kornia interpolates between tiles in float; OpenCV rounds each tile's LUT to integers first.
    assert np.percentile(diff, 99) <= 1.01 and diff.max() < 2.0 and diff.mean() < 0.5


def test_rgb_clahe_works_on_lightness_only():
    x = torch.rand(2, 3, 64, 64)
    y = clahe(x, 2.0, 8)
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1


def test_colour_image_is_rejected_by_a_grayscale_model(data_dir):
    """Real files: colour bars (SC_rgb) fail the saturation check; the ultrasound US1, stored as RGB but grey to the
    eye, passes and becomes one channel: a weighted mean of its three (luminance), so between their min and max."""
    bars = unit(data_dir / "SC_rgb.dcm")
    with pytest.raises(RejectedImage, match="mean saturation .* > 30"):
        match_channels(bars, 1, 30.0, "RGB")
    us = unit(data_dir / "US1_UNCR.dcm")
    assert us.shape[0] == 3
    grey = match_channels(us, 1, 30.0, "RGB")
    assert grey.shape == (1, *us.shape[1:])
    lo, hi = us.min(dim=0, keepdim=True).values, us.max(dim=0, keepdim=True).values
    assert bool(((grey >= lo - 1e-5) & (grey <= hi + 1e-5)).all()) and (hi - lo).max() > 0.1  # colour overlays


def test_prepare_batch_reports_rejections_per_frame(data_dir, rg1):
    frames = decode_instance(rg1, "a", 1, 1 << 30) + decode_instance(data_dir / "SC_rgb.dcm", "b", 1, 1 << 30)
    x, kept, rejected = prepare_batch(frames, PreprocessConfig(clahe=False), CPU)
    assert kept == [0] and list(rejected) == [1] and x.shape == (1, 1, 224, 224)
