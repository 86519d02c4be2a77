"""`neuron train` and the EfficientNet routes: learning, checkpoints, flags that do what they say, routing,
ensembles, MC dropout, review flags and `neuron evaluate`.

There are no pretrained weights on these machines, so the learning test trains EfficientNet-B4 from scratch on a small
synthetic set whose classes differ in a visible pattern, at 64x64 and with lr 1e-3 (the defaults are 224 and 1e-4),
without augmentation or CLAHE, for 6 epochs: this is what fits two CPU cores in seconds.
"""

from __future__ import annotations

import math
import shutil
import sqlite3
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from neuron.errors import WeightsError
from neuron.work import Route
from neuron_models.checkpoint import read_checkpoint, save_checkpoint
from neuron_models.effnet import (
    DEFAULT_CLASSES,
    MRI_US_CONFIG,
    SKIN_CONFIG,
    EnsembleModel,
    build_untrained,
    load_checkpoint_model,
)
from neuron_models.training import (
    STATE_FILE,
    LabelledSet,
    TrainConfig,
    Trainer,
    class_weights,
    freeze_early,
    make_loss,
    make_optimizer,
    make_scheduler,
    starting_net,
    stratified_split,
)
from worker.decode import decode_instance
from worker.device import DeviceJob
from worker.embedded import run_folder
from worker.evaluation import evaluate_model
from worker.models import Models

from .conftest import run_together

FAST = dict(epochs=6, batch_size=16, lr=1e-3, input_size=64, from_scratch=True, augment=False, clahe=False)


def load(path: Path):
    return decode_instance(path, str(path), 1, 1 << 26)[0]


def make_synthetic(root: Path, n: int = 40, size: int = 64, seed: int = 0) -> Path:
    """Three classes that differ in a visible pattern: a central disk, a ring, horizontal stripes; noisy, scaled."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    r = np.sqrt(xx ** 2 + yy ** 2)
    for cls in ("disk", "ring", "stripes"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            s = rng.uniform(0.8, 1.2)
            if cls == "disk":
                img = (r < 0.22 * s).astype(float)
            elif cls == "ring":
                img = ((r > 0.3 * s) & (r < 0.42 * s)).astype(float)
            else:
                img = (np.sin(yy * 40 * s + rng.uniform(0, 6.3)) > 0).astype(float)
            img = 0.2 + 0.6 * img + rng.normal(0, 0.08, img.shape)
            rgb = np.stack([img * rng.uniform(0.85, 1.0), img, img * rng.uniform(0.85, 1.0)], -1)
            cv2.imwrite(str(root / cls / f"{i}.png"), np.clip(rgb * 255, 0, 255).astype(np.uint8))
    return root


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("synthetic"))


@pytest.fixture(scope="module")
def trained(synthetic, tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "skin-efficientnet-b4"
    trainer = Trainer(SKIN_CONFIG, TrainConfig(**FAST), LabelledSet.from_path(synthetic), out, load,
                      torch.device("cpu"))
    history = trainer.run()
    (out / STATE_FILE).unlink()  # 207 MB that only --resume reads (its own test makes one): spare the CI disk
    return trainer, history, out


def test_training_learns_a_visible_pattern_well_above_chance(trained):
    _, history, out = trained
    best = max(m.val_accuracy for m in history)
    assert best >= 0.6, [round(m.val_accuracy, 2) for m in history]  # chance is 1/3
    assert (out / "metrics.csv").read_text().count("\n") == len(history) + 1
    assert (out / "curves.png").stat().st_size > 1000
    ckpt = read_checkpoint(out)
    assert ckpt.class_names == ("disk", "ring", "stripes") and ckpt.input_size == 64
    assert ckpt.meta["metrics"]["val_accuracy"] == best
    for key in ("training", "preprocessing", "sha256", "code_version", "data"):
        assert key in ckpt.meta
    assert ckpt.meta["training"]["label_smoothing"] == 0.1


def test_checkpoint_round_trips_without_unpickling(trained, tmp_path):
    trainer, _, out = trained
    model = load_checkpoint_model(SKIN_CONFIG, read_checkpoint(out))
    x = torch.rand(2, 3, 64, 64)
    best = read_checkpoint(out)
    assert model.weights_id == best.sha256 and model.class_names == best.class_names
    assert model(x).shape == (2, 3)
    copy = tmp_path / "tampered"
    copy.mkdir()
    for name in ("model.safetensors", "model.json"):
        shutil.copy(out / name, copy / name)
    raw = bytearray((copy / "model.safetensors").read_bytes())
    raw[-1] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(raw))
    with pytest.raises(WeightsError, match="sha256"):
        read_checkpoint(copy).state_dict()


def test_run_routes_a_photo_folder_to_the_trained_skin_model(trained, synthetic, tmp_path, untrained_settings):
    _, _, out = trained
    photos = tmp_path / "photos"
    photos.mkdir()
    for cls in ("disk", "ring", "stripes"):  # a folder of JPEGs, as cameras write them, and PNGs
        cv2.imwrite(str(photos / f"{cls}.jpg"), cv2.imread(str(synthetic / cls / "0.png")),
                    [cv2.IMWRITE_JPEG_QUALITY, 95])
        shutil.copy(synthetic / cls / "1.png", photos / f"{cls}_b.png")
    settings = untrained_settings.with_(out_dir=tmp_path / "out", model_dir=out.parent, route_override="skin")
    run_folder(photos, settings)
    with sqlite3.connect(settings.out_dir / "neuron.db") as conn:
        rows = conn.execute("select sop_instance_uid, model, label, probability, rank, modality, heatmap_path "
                            "from findings").fetchall()
        statuses = {s for (s,) in conn.execute("select status from ingest_status")}
    assert statuses == {"done"}
    assert len(rows) == 6 * 3 and {r[1] for r in rows} == {"skin-efficientnet-b4"}
    assert {r[2] for r in rows} == {"disk", "ring", "stripes"} and {r[5] for r in rows} == {"XC"}
    per_image: dict[str, float] = {}
    for r in rows:
        per_image[r[0]] = per_image.get(r[0], 0) + r[3]
    assert all(abs(total - 1) < 1e-4 for total in per_image.values())  # softmax
    assert all(Path(r[6]).is_file() for r in rows if r[4] == 1)


def test_mr_and_us_dicoms_go_to_the_mri_us_route(tmp_path, data_dir, test_files_dir, untrained_settings):
    """First without a model for the route: skipped with the reason. Once a checkpoint exists, the next run screens
    those same instances (the CT stays skipped: no route reads it)."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("MR2_UNCR.dcm", "US1_UNCR.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm", "OBXXXX1A_2frame.dcm"):
        shutil.copy(data_dir / name, folder / name)
    shutil.copy(test_files_dir / "CT_small.dcm", folder / "ct.dcm")
    model_dir = tmp_path / "models"
    settings = untrained_settings.with_(out_dir=tmp_path / "out", model_dir=model_dir, review_threshold=0.0)
    run_folder(folder, settings)
    with sqlite3.connect(settings.out_dir / "neuron.db") as conn:
        waiting = conn.execute("select status, reason from ingest_status where file_path not like '%ct.dcm'").fetchall()
    assert len(waiting) == 4 and all(s == "skipped" and "neuron train mri-us-efficientnet-b4" in r
                                     for s, r in waiting), waiting
    net = build_untrained(MRI_US_CONFIG, DEFAULT_CLASSES, 64, drop_rate=0.3).net
    save_checkpoint(model_dir / "mri-us-v1", net.state_dict(), {
        "model": MRI_US_CONFIG.name, "class_names": list(DEFAULT_CLASSES),
        "preprocessing": {"input_size": 64}, "training": {"drop_rate": 0.3}})
    run_folder(folder, settings)
    with sqlite3.connect(settings.out_dir / "neuron.db") as conn:
        rows = conn.execute("select modality, model, frame, needs_review, uncertainty from findings").fetchall()
        statuses = dict(conn.execute("select file_path like '%ct.dcm', group_concat(distinct status) "
                                     "from ingest_status group by 1").fetchall())
    assert statuses == {0: "done", 1: "skipped"}
    assert {r[0] for r in rows} == {"MR", "US"} and {r[1] for r in rows} == {"mri-us-efficientnet-b4"}
    assert len(rows) == (3 + 2) * 9  # the 2-frame ultrasound gives results per frame
    assert {r[2] for r in rows} == {0, 1}
    assert all(bool(r[3]) == (r[4] > 0.0) for r in rows)  # needs_review follows the threshold


def test_cli_run_with_route_skin_needs_no_chest_weights_and_still_fails_fast_without_its_own(tmp_path, synthetic):
    """`neuron run PHOTOS --route skin --model-dir MODELS` on a machine without the chest X-ray weights: only the
    skin model is loaded, and the photos are screened. A route that has work and no weights still stops the run
    before anything is screened (exit 4)."""
    import os
    import sys

    model_dir = tmp_path / "models"
    net = build_untrained(SKIN_CONFIG, ("disk", "ring", "stripes"), 64).net
    save_checkpoint(model_dir / "skin-v1", net.state_dict(), {
        "model": SKIN_CONFIG.name, "class_names": ["disk", "ring", "stripes"],
        "preprocessing": {"input_size": 64}, "training": {"drop_rate": 0.0}})
    photos = tmp_path / "photos"
    photos.mkdir()
    for cls in ("disk", "ring"):
        shutil.copy(synthetic / cls / "0.png", photos / f"{cls}.png")
    empty = tmp_path / "no-xrv-weights"
    env = {**os.environ, "NEURON_ALLOW_DOWNLOAD": "0", "COLUMNS": "250"}

    def neuron(*args):
        return {"args": [sys.executable, "-m", "neuron", "run", *args, "--weights", "pretrained", "--xrv-cache-dir",
                         str(empty), "--device", "cpu", "--no-tta"],
                "capture_output": True, "text": True, "env": env, "timeout": 300}

    # the two runs at once: neither reads what the other writes
    res, chest = run_together(
        neuron(str(photos), "--route", "skin", "--model-dir", str(model_dir), "--out", str(tmp_path / "out")),
        neuron(str(photos), "--route", "chest-xray", "--out", str(tmp_path / "out2")))
    assert res.returncode == 0, res.stderr
    with sqlite3.connect(tmp_path / "out" / "neuron.db") as conn:
        assert {s for (s,) in conn.execute("select status from ingest_status")} == {"done"}
        assert conn.execute("select count(distinct sop_instance_uid) from findings").fetchone()[0] == 2
    res = chest
    assert res.returncode == 4 and "NEURON_XRV_CACHE_DIR" in res.stderr, res.stderr
    assert not (tmp_path / "out2" / "neuron.db").exists()  # stopped before indexing anything


def test_cli_run_loads_only_the_models_of_routes_with_work(tmp_path, data_dir, chest_small):
    """Without --route, `neuron run` loads a route's model when its first instance arrives: a folder of MR images
    screens without the chest X-ray weights on the machine; a folder that holds a radiograph stops with exit 4 and
    the fix, while what other routes finished stays committed."""
    import os
    import sys

    model_dir = tmp_path / "models"
    net = build_untrained(MRI_US_CONFIG, DEFAULT_CLASSES, 64).net
    save_checkpoint(model_dir / "mri-us-v1", net.state_dict(), {
        "model": MRI_US_CONFIG.name, "class_names": list(DEFAULT_CLASSES),
        "preprocessing": {"input_size": 64}, "training": {"drop_rate": 0.0}})
    mr, mixed = tmp_path / "mr", tmp_path / "mixed"
    for folder in (mr, mixed):
        folder.mkdir()
        shutil.copy(data_dir / "MR2_UNCR.dcm", folder / "mr.dcm")
    shutil.copy(chest_small, mixed / "chest.dcm")  # the same MR image, and a radiograph
    env = {**os.environ, "NEURON_ALLOW_DOWNLOAD": "0", "COLUMNS": "250"}

    def neuron(folder, out):
        return {"args": [sys.executable, "-m", "neuron", "run", str(folder), "--out", str(out), "--weights",
                         "pretrained", "--xrv-cache-dir", str(tmp_path / "no-xrv-weights"), "--model-dir",
                         str(model_dir), "--device", "cpu", "--no-tta"],
                "capture_output": True, "text": True, "env": env, "timeout": 300}

    # the two runs at once: neither reads what the other writes
    res, chest = run_together(neuron(mr, tmp_path / "out"), neuron(mixed, tmp_path / "out2"))
    assert res.returncode == 0, res.stderr
    with sqlite3.connect(tmp_path / "out" / "neuron.db") as conn:
        assert conn.execute("select status from ingest_status").fetchall() == [("done",)]
    res = chest
    assert res.returncode == 4 and "NEURON_XRV_CACHE_DIR" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_several_checkpoints_for_a_route_make_an_ensemble(trained, tmp_path, untrained_settings):
    _, _, out = trained
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    (model_dir / "a").symlink_to(out, target_is_directory=True)
    other = build_untrained(SKIN_CONFIG, ("disk", "ring", "stripes"), 64, drop_rate=0.3).net
    meta = read_checkpoint(out).meta
    save_checkpoint(model_dir / "b", other.state_dict(), {k: meta[k] for k in
                                                          ("model", "class_names", "preprocessing", "training")})
    models = Models.from_settings(untrained_settings.with_(model_dir=model_dir))
    lr = models.routes[Route.SKIN]
    assert isinstance(lr.model, EnsembleModel) and len(lr.spec.members) == 2
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        probs = lr.model.predict(x)[0][0]
        members = [m(x) for m in lr.model.members]
    torch.testing.assert_close(probs, (members[0] + members[1]) / 2)


def test_an_ensembles_heatmap_is_the_mean_of_its_members_maps(tmp_path, untrained_settings, synthetic):
    """The stored probability is the members' mean, so the map that explains it is the mean of the members' maps
    (before rectification and normalisation), not the first member's; and the engine draws that map. Two seeded
    members (no training needed: the claim is about how maps combine, whatever the weights)."""
    from neuron_models import cam

    model_dir = tmp_path / "models"
    for name, seed in (("a", 0), ("b", 1)):
        net = build_untrained(SKIN_CONFIG, ("disk", "ring", "stripes"), 64, seed=seed).net
        with torch.no_grad():  # an untrained net's maps are ~1e-6: scale the head so they stand far above float noise
            net.get_classifier().weight.mul_(1e4)
        save_checkpoint(model_dir / name, net.state_dict(), {
            "model": SKIN_CONFIG.name, "class_names": ["disk", "ring", "stripes"],
            "preprocessing": {"input_size": 64}, "training": {"drop_rate": 0.0}})
    job = DeviceJob(Models.from_settings(untrained_settings.with_(model_dir=model_dir, tta=False, heatmap_top_k=3)))
    ensemble = job.models.routes[Route.SKIN].model
    assert isinstance(ensemble, EnsembleModel)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        _, features, weight = ensemble.predict(x)
        member_maps = []
        for m in ensemble.members:
            _, f, w = m.predict(x)
            member_maps.append(torch.einsum("kc,bchw->bkhw", w, f))  # every label's map, before the ReLU
        ensemble_maps = torch.einsum("kc,bchw->bkhw", weight, features)
    mean = torch.stack(member_maps).mean(dim=0)
    torch.testing.assert_close(ensemble_maps, mean, atol=1e-5, rtol=1e-5)
    assert mean.abs().max() > 1e-2 and (member_maps[0] - mean).abs().max() > 0.1 * mean.abs().max()  # member 0
    # alone draws a different map
    labels = torch.tensor([[0, 1, 2], [2, 1, 0]])
    torch.testing.assert_close(cam.class_activation_maps(features, weight, labels),
                               torch.relu(torch.stack([mean[0, [0, 1, 2]], mean[1, [2, 1, 0]]])), atol=1e-5, rtol=0)

    # through the engine: each top-k slot holds the normalised mean map of the label ranked there
    frame = load(synthetic / "ring" / "4.png")
    (inf,) = job.infer(Route.SKIN, [frame])
    from neuron_models.preprocess import normalize

    lr = job.models.routes[Route.SKIN]
    with torch.no_grad():
        image = normalize(torch.from_numpy(inf.image)[None], lr.preprocess)
        per_member = [torch.einsum("kc,bchw->bkhw", m.cam_weight(), m.forward_features(image)) for m in
                      ensemble.members]
    expected = torch.relu(torch.stack(per_member).mean(dim=0))[0]  # (K, h, w)
    for slot, label in enumerate(inf.order[:3]):
        ref = cam.upsample(cam.normalize_maps(expected[int(label)][None, None]), lr.preprocess.input_size)[0, 0]
        np.testing.assert_allclose(inf.cams[slot], ref.numpy(), atol=1e-4)


def test_mc_dropout_samples_the_head_repeatably_and_is_refused_for_the_xrv_densenet(
        trained, untrained_settings, synthetic):
    _, _, out = trained
    plain = DeviceJob(Models.from_settings(untrained_settings.with_(model_dir=out.parent, tta=False)))
    mc = DeviceJob(Models.from_settings(untrained_settings.with_(model_dir=out.parent, tta=False, mc_dropout=8)))
    assert mc.models.routes[Route.SKIN].spec.mc_dropout == 8 and mc.models.routes[Route.CHEST_XRAY].spec.mc_dropout == 0
    assert not mc.models.routes[Route.CHEST_XRAY].model.has_dropout()
    frames = [load(synthetic / "disk" / "3.png")]
    a = plain.infer(Route.SKIN, frames)[0]
    b, c = mc.infer(Route.SKIN, frames)[0], mc.infer(Route.SKIN, frames)[0]
    assert a.uncertainty.max() == 0 and b.uncertainty.max() > 0  # one view: only dropout makes a spread
    np.testing.assert_array_equal(b.probabilities, c.probabilities)


def test_mc_dropout_gives_an_image_the_same_result_alone_or_in_a_mixed_batch(trained, untrained_settings, synthetic):
    """Dropout masks are keyed by the image (neuron_models.dropout), not drawn in batch order."""
    _, _, out = trained
    mc = DeviceJob(Models.from_settings(untrained_settings.with_(model_dir=out.parent, mc_dropout=8)))  # TTA: 5 views
    disk = load(synthetic / "disk" / "3.png")
    alone = mc.infer(Route.SKIN, [disk])[0]
    mixed = mc.infer(Route.SKIN, [load(synthetic / "ring" / "2.png"), disk, load(synthetic / "stripes" / "5.png")])
    np.testing.assert_allclose(mixed[1].probabilities, alone.probabilities, atol=1e-5, rtol=0)
    np.testing.assert_allclose(mixed[1].uncertainty, alone.uncertainty, atol=1e-5, rtol=0)
    plain = DeviceJob(Models.from_settings(untrained_settings.with_(model_dir=out.parent))).infer(Route.SKIN, [disk])[0]
    assert not np.array_equal(alone.uncertainty, plain.uncertainty)  # dropout was applied (a confident model: the
    # change can be small; the one-view test above shows the spread itself)


def test_dropout_masks_are_exact_integer_hashes_kept_at_one_minus_p():
    from neuron_models import dropout

    def mix32(x: int) -> int:  # lowbias32 in Python's exact integers: the reference for the tensor version
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)

    values = [0, 1, 0xFFFF, 0x10000, 0x7FFFFFFF, 0xFFFFFFFF, 0xDEADBEEF, 123456789]
    assert dropout.mix32(torch.tensor(values)).tolist() == [mix32(v) for v in values]
    keys = dropout.image_keys([f"1.2.3.{i}|0" for i in range(2000)])
    mask = dropout.keep_mask(keys, 0, 448, 0.3, seed=0)
    assert abs(mask.float().mean().item() - 0.7) < 0.005
    # a row's mask is a function of its key alone, wherever the row sits; samples and seeds differ
    perm = torch.randperm(len(keys), generator=torch.Generator().manual_seed(0))
    assert torch.equal(dropout.keep_mask(keys[perm], 0, 448, 0.3, seed=0), mask[perm])
    assert (dropout.keep_mask(keys, 1, 448, 0.3, seed=0) != mask).float().mean() > 0.3
    assert (dropout.keep_mask(keys, 0, 448, 0.3, seed=1) != mask).float().mean() > 0.3
    rows = dropout.view_keys(keys[:3], 5)
    assert rows.shape == (15,) and len(set(rows.tolist())) == 15


def test_evaluate_reports_accuracy_auc_and_calibration(trained, synthetic, untrained_settings, tmp_path):
    """On a machine without the chest X-ray weights too: evaluating the skin model loads only the skin route."""
    _, _, out = trained
    no_chest_weights = untrained_settings.with_(model_dir=out.parent, tta=False, weights="pretrained",
                                                xrv_cache_dir=tmp_path / "empty", allow_download=False)
    report = evaluate_model("skin-efficientnet-b4", synthetic, no_chest_weights, load)
    assert report["n"] == 120 and set(report["auc"]) == {"disk", "ring", "stripes"}
    assert report["summary"]["accuracy"] > 0.5 and 0 <= report["summary"]["ECE"] <= 1


def test_evaluate_gives_per_pathology_auc_for_the_chest_model(tmp_path, rg1, chest_small, untrained_settings):
    from .conftest import small_chest

    paths = [small_chest(rg1, tmp_path / f"c{i}.dcm", step=3 + i) for i in range(4)]
    lines = ["path,Effusion,Cardiomegaly"] + [f"{p.name},{i % 2},{int(i < 2)}" for i, p in enumerate(paths)]
    (tmp_path / "labels.csv").write_text("\n".join(lines) + "\n")
    report = evaluate_model("xrv-densenet121-res224-all", tmp_path / "labels.csv", untrained_settings, load)
    assert report["n"] == 4 and len(report["auc"]) == 18
    assert not math.isnan(report["auc"]["Effusion"]) and math.isnan(report["auc"]["Mass"])  # Mass: no labels


def test_resume_continues_an_interrupted_run(synthetic, tmp_path):
    data = LabelledSet.from_path(synthetic)
    out = tmp_path / "run"
    Trainer(SKIN_CONFIG, TrainConfig(**{**FAST, "epochs": 1}), data, out, load, torch.device("cpu")).run()
    resumed = Trainer(SKIN_CONFIG, TrainConfig(**{**FAST, "epochs": 2}), data, out, load, torch.device("cpu"))
    history = resumed.run(resume=True)
    assert [m.epoch for m in history] == [1, 2]


def test_class_weights_auto_are_inverse_frequencies():
    w = class_weights([0, 0, 0, 1], 2)
    torch.testing.assert_close(w, torch.tensor([4 / (2 * 3), 4 / (2 * 1)]))
    assert make_loss(TrainConfig(class_weights="auto"), [0, 0, 0, 1], 2).weight is not None
    assert make_loss(TrainConfig(), [0, 0, 0, 1], 2).weight is None


def test_label_smoothing_is_the_seed_formula():
    logits, target = torch.tensor([[2.0, 0.5, -1.0]]), torch.tensor([0])
    loss = make_loss(TrainConfig(label_smoothing=0.1), [0, 1, 2], 3)(logits, target)
    logp = torch.log_softmax(logits, 1)[0]
    expected = -(0.9 * logp[0] + 0.1 * logp.mean())  # y_smooth = (1 - a) y + a / K
    torch.testing.assert_close(loss, expected)


def test_scheduler_is_cosine_annealing_with_warm_restarts_t0_5_tmult_2():
    net = build_untrained(SKIN_CONFIG, DEFAULT_CLASSES, 64).net
    opt = make_optimizer(net, TrainConfig(lr=1e-4))
    sched = make_scheduler(opt, TrainConfig())
    lrs = []
    for _ in range(16):
        lrs.append(opt.param_groups[1]["lr"])
        sched.step()
    assert lrs[0] == lrs[5] == lrs[15] == 1e-4  # restarts after 5 epochs, then after 10 more
    assert all(lrs[i] > lrs[i + 1] for i in range(0, 4)) and all(lrs[i] > lrs[i + 1] for i in range(5, 14))
    assert lrs[3] == pytest.approx(1e-4 * (1 + math.cos(math.pi * 3 / 5)) / 2)


def test_differential_learning_rates_and_freezing():
    net = build_untrained(SKIN_CONFIG, DEFAULT_CLASSES, 64).net
    freeze_early(net, 3)
    opt = make_optimizer(net, TrainConfig(lr=1e-3, backbone_lr=1e-5))
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"backbone": 1e-5, "head": 1e-3}
    assert not any(p.requires_grad for p in net.conv_stem.parameters())
    assert not any(p.requires_grad for p in net.blocks[2].parameters())
    assert all(p.requires_grad for p in net.blocks[3].parameters())


def test_split_is_stratified():
    labels = [0] * 10 + [1] * 5 + [2] * 20
    train, val = stratified_split(labels, 0.2, seed=0)
    assert sorted(train + val) == list(range(35))
    assert [sum(labels[i] == k for i in val) for k in range(3)] == [2, 1, 4]


def test_offline_without_cached_imagenet_weights_training_says_so():
    """At once: the hub is not asked (huggingface_hub would retry a closed network for most of a minute)."""
    import time

    start = time.monotonic()
    with pytest.raises(WeightsError, match="--from-scratch"):
        starting_net(3, TrainConfig(from_scratch=False))
    assert time.monotonic() - start < 15


def test_imagenet_weights_come_from_the_local_hugging_face_cache(tmp_path):
    """`neuron train` without --from-scratch, through the real path: timm -> huggingface_hub -> the local cache,
    offline. The real weights cannot be downloaded here, so the cache holds known weights made by the test, in the
    layout huggingface_hub writes (refs/main -> snapshots/<commit>/model.safetensors)."""
    import os
    import subprocess
    import sys

    import timm
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        imagenet = timm.create_model("efficientnet_b4", num_classes=1000)
    repo = tmp_path / "hf" / "hub" / "models--timm--efficientnet_b4.ra2_in1k"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in imagenet.state_dict().items()},
              str(repo / "snapshots" / commit / "model.safetensors"))
    code = ("from neuron_models.training import TrainConfig, starting_net\n"
            "net = starting_net(3, TrainConfig())\n"
            "print(repr(float(net.conv_stem.weight.double().sum())), net.get_classifier().out_features)")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}  # offline is Neuron's doing, not the environment's
    env.pop("HF_HUB_OFFLINE", None)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    stem_sum, classes = res.stdout.split()
    assert float(stem_sum) == float(imagenet.conv_stem.weight.detach().double().sum()) and classes == "3"


def test_the_cli_trains_lists_and_evaluates(tmp_path):
    import os
    import subprocess
    import sys

    data = make_synthetic(tmp_path / "data", n=6)
    out = tmp_path / "models" / "skin-v1"
    env = {**os.environ, "COLUMNS": "400"}

    def neuron(*args):
        return {"args": [sys.executable, "-m", "neuron", *args], "capture_output": True, "text": True, "env": env,
                "timeout": 300}

    res = subprocess.run(**neuron("train", "skin-efficientnet-b4", "--data", str(data), "--out", str(out), "--epochs",
                                  "1", "--from-scratch", "--input-size", "64", "--no-augment", "--no-clahe", "--device",
                                  "cpu"))
    assert res.returncode == 0, res.stderr
    assert "best checkpoint" in res.stderr and (out / "model.safetensors").is_file()
    # listing and evaluating only read the checkpoint: the two at once
    res, evaluated = run_together(
        neuron("models", "--model-dir", str(out.parent)),
        neuron("evaluate", "skin-efficientnet-b4", "--data", str(data), "--model-dir", str(out.parent), "--weights",
               "untrained", "--device", "cpu", "--json", str(tmp_path / "m.json")))
    assert res.returncode == 0, res.stderr
    assert evaluated.returncode == 0, evaluated.stderr
    assert "skin-v1" in res.stdout and "disk, ring, stripes" in res.stdout
    import json

    report = json.loads((tmp_path / "m.json").read_text())
    assert report["n"] == 18 and "accuracy" in report["summary"]
