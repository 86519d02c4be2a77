"""Heatmaps explain the label they are stored for: each top label's map is that label's CAM, and the PNG of each
findings row is the overlay of its own label's map."""

from __future__ import annotations

import sqlite3

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from neuron.work import Route
from neuron_models.preprocess import normalize
from worker.decode import decode_instance
from worker.device import DeviceJob
from worker.embedded import run_folder
from worker.pipeline import Pipeline

from .conftest import small_chest


def independent_cam(model, preprocess, image: np.ndarray, label: int) -> np.ndarray:
    """The CAM of one label for one preprocessed image, from the model's contract alone (not neuron_models.cam):
    ReLU of the head weights of that label over the final features, min-max scaled, bilinearly enlarged."""
    with torch.no_grad():
        features = model.forward_features(normalize(torch.from_numpy(image)[None], preprocess))[0]
        m = torch.relu(torch.einsum("c,chw->hw", model.cam_weight()[label], features))
    m = m - m.min()
    m = m / (1e-7 + m.max())
    size = preprocess.input_size
    return F.interpolate(m[None, None], size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()


def test_the_map_for_each_top_label_is_that_labels_cam(models, chest_small):
    top3 = DeviceJob(models, top_k=3)
    lr = models.routes[Route.CHEST_XRAY]
    (inf,) = top3.infer(Route.CHEST_XRAY, decode_instance(chest_small, "uid", 1, 1 << 30))
    assert inf.cams.shape[0] == 3
    last = int(inf.order[-1])
    for slot in range(3):
        label = int(inf.order[slot])
        ours = independent_cam(lr.model, lr.preprocess, inf.image, label)
        np.testing.assert_allclose(inf.cams[slot], ours, atol=1e-4)
        other = independent_cam(lr.model, lr.preprocess, inf.image, last)
        assert np.abs(inf.cams[slot] - other).max() > 0.1, "maps of different labels must differ for this check"


def test_a_stored_heatmap_belongs_to_the_label_of_its_row(tmp_path, chest_small, untrained_settings, models):
    """End to end: with two heatmaps per image, the PNG in each findings row is the overlay of that row's label's
    CAM, not the other one's."""
    from neuron_models import cam

    folder = tmp_path / "in"
    small_chest(chest_small, folder / "a.dcm", step=1)
    settings = untrained_settings.with_(out_dir=tmp_path / "out", heatmap_top_k=2)
    run = Pipeline(models, settings)
    run_folder(folder, settings, pipeline=run)
    with sqlite3.connect(settings.out_dir / "neuron.db") as conn:
        rows = conn.execute("select label, heatmap_path from findings where heatmap_path is not null").fetchall()
    assert len(rows) == 2
    lr = models.routes[Route.CHEST_XRAY]
    (inf,) = run.job.infer(Route.CHEST_XRAY, decode_instance(folder / "a.dcm", "uid", 1, 1 << 30))
    names = list(lr.model.class_names)
    overlays = {name: cam.overlay(inf.image, independent_cam(lr.model, lr.preprocess, inf.image, names.index(name)))
                for name, _ in rows}
    for name, path in rows:
        png = cv2.imread(path).astype(np.int16)
        (other,) = set(overlays) - {name}
        own_error = np.abs(png - overlays[name]).mean()
        assert own_error < 0.5 and own_error < np.abs(png - overlays[other]).mean() / 4, name
