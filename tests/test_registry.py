"""Every registered model honours the contract: forward, TTA and CAM shapes, probabilities, batch invariance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuron.work import Route
from neuron_models.effnet import DEFAULT_CLASSES, build_untrained
from neuron_models.factory import list_models
from neuron_models.registry import PipelineSpec, preprocess_config, tta_policy
from neuron_models.tta import ViewKind
from worker.decode import decode_instance
from worker.device import DeviceJob
from worker.models import LoadedRoute, Models

SMALL = 96  # EfficientNet input for these shape tests, to keep them quick on two cores


def job_for(cfg, settings, chest_job) -> DeviceJob:
    if cfg.route is Route.CHEST_XRAY:
        return chest_job
    model = build_untrained(cfg, DEFAULT_CLASSES, SMALL, drop_rate=0.3)
    spec = PipelineSpec(cfg.name, model.weights_id, preprocess_config(model.config, settings),
                        tta_policy(model.config, settings))
    return DeviceJob(Models(settings, torch.device("cpu"), {cfg.route: LoadedRoute(model, spec)}))


def frames_for(route: Route, chest_small, data_dir, test_files_dir):
    if route is Route.CHEST_XRAY:
        paths = [chest_small, data_dir / "RG1_J2KR.dcm", data_dir / "RG1_UNCR.dcm"]
    elif route is Route.MRI_US:
        paths = [data_dir / "MR2_UNCR.dcm", data_dir / "US1_UNCR.dcm", data_dir / "JPGLosslessP14SV1_1s_1f_8b.dcm"]
    else:
        paths = [data_dir / "SC_rgb.dcm", test_files_dir / "SC_rgb_jpeg_dcmtk.dcm", data_dir / "US1_J2KR.dcm"]
    return [decode_instance(p, str(p), 1, 1 << 28)[0] for p in paths]


@pytest.mark.parametrize("cfg", list_models(), ids=lambda c: c.name)
def test_every_registered_model_gives_probabilities_tta_and_maps_of_the_right_shape(
        cfg, untrained_settings, job, chest_small, data_dir, test_files_dir):
    eng = job_for(cfg, untrained_settings, job)
    frames = frames_for(cfg.route, chest_small, data_dir, test_files_dir)
    results = eng.infer(cfg.route, frames)
    lr = eng.models.routes[cfg.route]
    size, k = lr.preprocess.input_size, len(lr.model.class_names)
    for res in results:
        assert res.probabilities.shape == (k,) and res.uncertainty.shape == (k,)
        assert res.image.shape == (cfg.channels, size, size) and res.cams.shape == (1, size, size)
        assert np.all((0 <= res.probabilities) & (res.probabilities <= 1))
        assert res.uncertainty.max() > 0  # five views disagree a little
        if not cfg.multilabel:
            assert abs(res.probabilities.sum() - 1) < 1e-5  # softmax over classes
    assert len(lr.tta.views) == 5
    assert any(v.kind is ViewKind.HFLIP for v in lr.tta.views) == (cfg.route is Route.SKIN)


@pytest.mark.parametrize("cfg", list_models(), ids=lambda c: c.name)
def test_every_registered_model_is_batch_invariant(cfg, untrained_settings, job, chest_small, data_dir,
                                                    test_files_dir):
    eng = job_for(cfg, untrained_settings, job)
    frames = frames_for(cfg.route, chest_small, data_dir, test_files_dir)
    alone = eng.infer(cfg.route, frames[1:2])[0]
    mixed = eng.infer(cfg.route, frames)[1]
    np.testing.assert_allclose(mixed.probabilities, alone.probabilities, atol=1e-5, rtol=0)
    np.testing.assert_allclose(mixed.cams, alone.cams, atol=1e-4, rtol=0)
