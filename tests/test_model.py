"""The chest X-ray model: torchxrayvision's contract, weights handling, TTA, batch invariance and Grad-CAM."""

from __future__ import annotations

import time

import numpy as np
import pydicom
import pytest
import torch
import torchxrayvision as xrv
from pydicom.pixels import apply_voi_lut
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from neuron.errors import WeightsError
from neuron.settings import Settings
from neuron.work import Route
from neuron_models import cam, xray
from neuron_models.factory import create_model, list_models
from neuron_models.preprocess import normalize, prepare_batch
from neuron_models.registry import sha256_file
from neuron_models.tta import ViewKind
from worker.decode import decode_instance

from .conftest import MODEL, monochrome2_twin, small_chest

CPU = torch.device("cpu")


def frames_of(*paths):
    out = []
    for p in paths:
        out += decode_instance(p, str(p), 16, 8192 * 8192)
    return out


def test_registry_lists_the_chest_model_with_its_contract():
    (cfg,) = [c for c in list_models() if c.route is Route.CHEST_XRAY]
    assert cfg.name == MODEL and cfg.channels == 1 and cfg.input_size == 224 and cfg.normalization == "xrv"
    assert cfg.multilabel and len(cfg.class_names) == 18 and "Normal" not in cfg.class_names
    assert all(v.kind is not ViewKind.HFLIP for v in cfg.tta_views)  # chest X-rays: torchxrayvision trained no flips


def test_untrained_model_is_deterministic_and_not_degenerate(job, rg1):
    """Same seed, same weights; on a real radiograph the probabilities spread inside (0, 1)."""
    a = create_model(MODEL, Settings(weights="untrained"))
    b = create_model(MODEL, Settings(weights="untrained"))
    for pa, pb in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)
    (res,) = job.infer(Route.CHEST_XRAY, frames_of(rg1))
    p = res.probabilities
    assert 1e-3 < p.min() and p.max() < 1 - 1e-3, p
    assert p.std() > 0.05
    assert job.models.routes[Route.CHEST_XRAY].model.weights_id == "untrained"


def test_probabilities_are_independent_sigmoids_not_a_softmax(job, rg1):
    (res,) = job.infer(Route.CHEST_XRAY, frames_of(rg1))
    assert abs(res.probabilities.sum() - 1.0) > 0.5  # 18 independent labels
    assert np.all(res.uncertainty >= 0)


def test_parity_with_torchxrayvision_reference_path(job_plain, rg1):
    """With CLAHE and TTA off our path equals torchxrayvision's documented one on the same array:
    pydicom VOI + MONOCHROME1 inversion -> xrv.datasets.normalize -> XRayCenterCrop -> XRayResizer(cv2) -> model."""
    ds = pydicom.dcmread(rg1)
    maxval = float((1 << ds.BitsStored) - 1)
    display = maxval - apply_voi_lut(ds.pixel_array, ds).astype(np.float64)  # MONOCHROME1: invert after VOI
    img = xrv.datasets.normalize(display, maxval)[None, ...]
    img = xrv.datasets.XRayCenterCrop()(img)
    img = xrv.datasets.XRayResizer(224, engine="cv2")(img)
    model = job_plain.models.routes[Route.CHEST_XRAY].model
    with torch.no_grad():
        ref = torch.sigmoid(model.net(torch.from_numpy(img)[None].float()))[0].numpy()
    (ours,) = job_plain.infer(Route.CHEST_XRAY, frames_of(rg1))
    np.testing.assert_allclose(ours.probabilities, ref, atol=2e-4)
    assert np.all(ours.uncertainty == 0)  # one view: no spread


def test_pretrained_path_verifies_sha256_then_loads_through_torchxrayvision(tmp_path, rg1):
    """A weights file placed in the cache loads through xrv's own loader (a pickled module, as the release is),
    only once its sha256 is configured; its outputs go through sigmoid + op_norm exactly like xrv's forward."""
    net = xray.build_untrained(seed=3).net
    path = tmp_path / xray.WEIGHTS_FILENAME
    torch.save(net, path)
    digest = sha256_file(path)
    base = Settings(weights="pretrained", xrv_cache_dir=tmp_path, allow_download=False)
    with pytest.raises(WeightsError, match=f"no expected sha256 is configured.*NEURON_XRV_SHA256={digest}"):
        create_model(MODEL, base)
    with pytest.raises(WeightsError, match="not the configured"):
        create_model(MODEL, base.with_(xrv_sha256="0" * 64))
    model = create_model(MODEL, base.with_(xrv_sha256=digest))
    assert model.weights_id == digest and not model.untrained
    reference = xrv.models.DenseNet(weights="densenet121-res224-all", cache_dir=str(tmp_path)).eval()
    x = normalize(prepare_batch(frames_of(rg1), model_preprocess(), CPU)[0], model_preprocess())
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=0)
    assert reference.op_threshs is not None  # op_norm was part of the reference's forward


def model_preprocess():
    from neuron_models.factory import model_config
    from neuron_models.registry import preprocess_config

    return preprocess_config(model_config(MODEL), Settings(clahe=False))


def test_missing_weights_fail_fast_with_the_file_folder_and_setting(tmp_path):
    settings = Settings(weights="pretrained", xrv_cache_dir=tmp_path / "empty")
    start = time.monotonic()
    with pytest.raises(WeightsError) as info:
        create_model(MODEL, settings)
    assert time.monotonic() - start < 15
    message = str(info.value)
    assert xray.WEIGHTS_FILENAME in message and str(tmp_path / "empty") in message
    assert "NEURON_XRV_CACHE_DIR" in message and "--weights untrained" in message


def test_tta_is_deterministic(job, chest_small):
    a = job.infer(Route.CHEST_XRAY, frames_of(chest_small))[0]
    b = job.infer(Route.CHEST_XRAY, frames_of(chest_small))[0]
    np.testing.assert_array_equal(a.probabilities, b.probabilities)
    np.testing.assert_array_equal(a.uncertainty, b.uncertainty)
    assert a.uncertainty.max() > 0  # five different views do disagree a little


def test_an_image_gives_the_same_result_alone_or_in_a_mixed_batch(tmp_path, job, chest_small, rg1, data_dir):
    other = small_chest(rg1, tmp_path / "other.dcm", step=3)
    alone = job.infer(Route.CHEST_XRAY, frames_of(chest_small))[0]
    batch = job.infer(Route.CHEST_XRAY, frames_of(other, data_dir / "RG1_J2KI.dcm", chest_small, rg1))
    mixed = batch[2]
    np.testing.assert_allclose(mixed.probabilities, alone.probabilities, atol=1e-5, rtol=0)
    np.testing.assert_allclose(mixed.uncertainty, alone.uncertainty, atol=1e-5, rtol=0)
    np.testing.assert_allclose(mixed.cams, alone.cams, atol=1e-4, rtol=0)


def test_monochrome1_and_its_monochrome2_twin_give_the_same_probabilities(tmp_path, job, chest_small):
    twin = monochrome2_twin(chest_small, tmp_path / "twin.dcm")
    a, b = job.infer(Route.CHEST_XRAY, frames_of(chest_small, twin))
    np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-5, rtol=0)


class _LogitsWithRectifiedTarget(nn.Module):
    """Logits of the model with an out-of-place module at the rectified final features for grad-cam's hooks."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.target = nn.Identity()

    def forward(self, x):
        return self.model.forward_head(self.target(self.model.forward_features(x)))


def test_cam_maps_equal_the_grad_cam_package(job, chest_small, rg1, tmp_path):
    """Our forward-pass CAM for each image's top label equals pytorch-grad-cam's GradCAM of that label's logit,
    at a layer whose output nothing modifies in place, with one target per image (grad-cam issues #264, #328:
    one target for a batch explains image 0 only)."""
    lr = job.models.routes[Route.CHEST_XRAY]
    other = small_chest(rg1, tmp_path / "o.dcm", step=5)
    frames = frames_of(chest_small, other)
    x, _, _ = prepare_batch(frames, lr.preprocess, CPU)
    inp = normalize(x, lr.preprocess)
    with torch.no_grad():
        feats = lr.model.forward_features(inp)
        logits = lr.model.forward_head(feats)
        top = logits.argmax(dim=1)
        maps = cam.class_activation_maps(feats, lr.model.cam_weight(), top[:, None])
        ours = cam.upsample(cam.normalize_maps(maps), 224)[:, 0].numpy()
    wrapper = _LogitsWithRectifiedTarget(lr.model).eval()
    with GradCAM(model=wrapper, target_layers=[wrapper.target]) as gc:
        ref = gc(input_tensor=inp.clone().requires_grad_(True), targets=[ClassifierOutputTarget(int(t)) for t in top])
    assert ref.shape == ours.shape
    # Both min-max normalise with a 1e-7 guard; the package's raw map is ours / (h*w), so the guard weighs 49x more
    # there. Compare the shapes of the maps, each scaled to a maximum of 1.
    peak = lambda m: m / m.max(axis=(1, 2), keepdims=True)  # noqa: E731
    np.testing.assert_allclose(peak(ours), peak(ref), atol=1e-4)
    assert ours.max() > 0.9  # maps are not empty


def test_the_device_jobs_cams_are_the_top_labels_maps(job, chest_small):
    (res,) = job.infer(Route.CHEST_XRAY, frames_of(chest_small))
    assert res.cams.shape == (1, 224, 224) and res.image.shape == (1, 224, 224)
    assert 0.0 <= res.cams.min() and res.cams.max() <= 1.0


def _corpus(data_dir, chest_small, tmp_path):
    """Real radiographs of several sizes and both photometric interpretations, and lossless copies."""
    twin = monochrome2_twin(chest_small, tmp_path / "twin.dcm")
    return frames_of(chest_small, twin, data_dir / "RG1_UNCR.dcm", data_dir / "RG1_J2KR.dcm",
                     data_dir / "RG3_UNCR.dcm", data_dir / "RG3_J2KR.dcm")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_results_and_heatmaps_are_the_same_on_cpu_and_gpu(untrained_settings, chest_small, data_dir, tmp_path):
    """--precision fp32 is exact: TF32 off, so a GPU gives the CPU's probabilities (1e-4), ranks and maps (1e-3)."""
    from worker.device import DeviceJob
    from worker.models import Models

    cpu = DeviceJob(Models.from_settings(untrained_settings.with_(device="cpu", precision="fp32")))
    gpu = DeviceJob(Models.from_settings(untrained_settings.with_(device="cuda", precision="fp32")))
    frames = _corpus(data_dir, chest_small, tmp_path)
    for a, b in zip(cpu.infer(Route.CHEST_XRAY, frames), gpu.infer(Route.CHEST_XRAY, frames), strict=True):
        np.testing.assert_allclose(a.probabilities, b.probabilities, atol=1e-4, rtol=0)
        np.testing.assert_array_equal(a.order[:5], b.order[:5])
        np.testing.assert_allclose(a.cams, b.cams, atol=1e-3, rtol=0)
        assert np.abs(a.overlays.astype(int) - b.overlays.astype(int)).max() <= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_fast_precision_stays_within_its_documented_tolerance(untrained_settings, chest_small, data_dir, tmp_path,
                                                              precision):
    """The fast modes' contract (README): every probability within 0.01 of fp32 and the same top finding."""
    from worker.device import DeviceJob
    from worker.models import Models

    exact = DeviceJob(Models.from_settings(untrained_settings.with_(device="cuda", precision="fp32")))
    frames = _corpus(data_dir, chest_small, tmp_path)
    ref = exact.infer(Route.CHEST_XRAY, frames)
    fast = DeviceJob(Models.from_settings(untrained_settings.with_(device="cuda", precision=precision)))
    for a, b in zip(ref, fast.infer(Route.CHEST_XRAY, frames), strict=True):
        np.testing.assert_allclose(b.probabilities, a.probabilities, atol=0.01, rtol=0)
        assert a.order[0] == b.order[0]


class _OutOfMemoryAbove:
    """Fault injection: the real model, but a batch of more than ``limit`` images raises CUDA's out-of-memory error,
    as a GPU that is too small for the batch does."""

    def __init__(self, model, limit: int):
        self.model, self.limit, self.batches = model, limit, []

    def predict(self, views, *args):
        images = views.shape[0] // 5  # the chest route's five TTA views, view-major
        self.batches.append(images)
        if images > self.limit:
            raise torch.cuda.OutOfMemoryError(f"injected: {images} images > {self.limit}")
        return self.model.predict(views, *args)

    def __getattr__(self, name):
        return getattr(self.model, name)


def test_cuda_out_of_memory_splits_the_batch_and_gives_the_same_results(job, chest_small, rg1, tmp_path):
    from neuron.errors import RetryableError
    from worker.device import DeviceJob
    from worker.models import LoadedRoute, Models

    files = [chest_small] + [small_chest(rg1, tmp_path / f"c{i}.dcm", step=3 + i) for i in range(4)]
    whole = job.infer(Route.CHEST_XRAY, frames_of(*files))
    lr = job.models.routes[Route.CHEST_XRAY]
    faulty = _OutOfMemoryAbove(lr.model, limit=2)
    small_gpu = DeviceJob(Models(job.settings, job.device, {Route.CHEST_XRAY: LoadedRoute(faulty, lr.spec)}))
    split = small_gpu.infer(Route.CHEST_XRAY, frames_of(*files))
    assert faulty.batches == [5, 2, 3, 1, 2]  # 5 -> 2 + 3 -> 2 + (1 + 2)
    for a, b in zip(whole, split, strict=True):
        np.testing.assert_allclose(b.probabilities, a.probabilities, atol=1e-5, rtol=0)
        np.testing.assert_allclose(b.cams, a.cams, atol=1e-4, rtol=0)
    no_gpu_at_all = DeviceJob(Models(job.settings, job.device,
                                     {Route.CHEST_XRAY: LoadedRoute(_OutOfMemoryAbove(lr.model, 0), lr.spec)}))
    with pytest.raises(RetryableError, match="single image"):
        no_gpu_at_all.infer(Route.CHEST_XRAY, frames_of(chest_small))
