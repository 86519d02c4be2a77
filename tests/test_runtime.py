"""The networks' runtime: ONNX Runtime on a graph exported from the loaded torch module gives torch's answers.

Exact means exact (README "Precision"): in fp32, every probability within 1e-5 of torch's on the same films, the same
rank order of findings, CAM overlays within one grey level, OOD scores within 1e-5 relative, and the same result for
an image alone or in a batch: on real radiographs (pydicom-data's RG1 and RG3 CRs, J2K-compressed copies, a
MONOCHROME1 film and its twin), synthetic chest CRs, real MR and ultrasound files and photographs, for all three
routes. The graph is exported once, cached under its weights' and versions' key, verified by its sha256 when opened,
and refused when it does not compute what torch computes."""

from __future__ import annotations

import json
import logging
import shutil
import sys

import numpy as np
import pytest
import torch
from torch import nn

from neuron.errors import ConfigError, RuntimeRefused
from neuron.settings import Settings
from neuron.synthetic import InstancePlan, make_instance
from neuron.work import Route
from neuron_models import ood, runtime
from neuron_models.registry import ModelConfig, ScreeningModel
from neuron_models.tta import CHEST_XRAY_VIEWS
from worker.device import DeviceJob
from worker.models import Models, model_threads, probe_batch

from .conftest import MODEL, monochrome2_twin, run_together, seed_untrained_cache, small_chest
from .test_model import frames_of

CPU = torch.device("cpu")


def assert_same_answers(a, b, ood_scores: bool = False) -> None:
    """``b`` (ONNX Runtime) against ``a`` (torch), frame by frame, by the exactness contract."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(y.probabilities, x.probabilities, atol=1e-5, rtol=0)
        np.testing.assert_allclose(y.uncertainty, x.uncertainty, atol=1e-5, rtol=0)
        # the same rank order wherever torch's probabilities are told apart by more than the tolerance: at every
        # gap wider than 2e-5 between consecutive ranks, the labels above it are the same set on both runtimes
        p = x.probabilities[x.order]
        for cut in np.flatnonzero(np.diff(p) < -2e-5):
            assert set(x.order[: cut + 1]) == set(y.order[: cut + 1])
        # heatmaps: the map's grey levels (what the JET colour is looked up by) within one level; where a level is
        # the same, the overlay pixel is the same (a level apart, JET's step moves a channel by up to 4, 2 after
        # the 50/50 blend)
        grey_x, grey_y = (np.clip(m * 255.0, 0, 255).astype(np.uint8).astype(int) for m in (x.cams, y.cams))
        assert np.abs(grey_x - grey_y).max() <= 1
        same = grey_x == grey_y
        assert same.mean() > 0.99
        np.testing.assert_array_equal(x.overlays[same], y.overlays[same])
        assert np.abs(x.overlays.astype(int) - y.overlays.astype(int)).max() <= 2
        if ood_scores:
            assert x.ood_score is not None and y.ood_score is not None
            assert abs(y.ood_score - x.ood_score) <= 1e-5 * abs(x.ood_score)


@pytest.fixture(scope="module")
def chest_jobs(untrained_settings, models):
    """The chest route on each runtime, with the session's calibrated untrained weights."""
    torch_job = DeviceJob(Models.from_settings(untrained_settings.with_(runtime="torch"), only=[Route.CHEST_XRAY]))
    ort_job = DeviceJob(Models.from_settings(untrained_settings.with_(runtime="onnxruntime"),
                                             only=[Route.CHEST_XRAY]))
    return torch_job, ort_job


@pytest.fixture(scope="module")
def chest_corpus(tmp_path_factory, data_dir, rg1):
    root = tmp_path_factory.mktemp("corpus")
    chest = small_chest(rg1, root / "chest.dcm", step=4)
    twin = monochrome2_twin(chest, root / "twin.dcm")
    synthetic = []
    for i in range(3):
        inst = make_instance(InstancePlan(i, i, 0), 256, seed=11)
        inst.dataset.save_as(root / f"synthetic{i}.dcm", enforce_file_format=True)
        synthetic.append(root / f"synthetic{i}.dcm")
    return [chest, twin, data_dir / "RG1_UNCR.dcm", data_dir / "RG1_J2KR.dcm", data_dir / "RG3_UNCR.dcm",
            *synthetic]


def test_auto_picks_onnxruntime_on_a_cpu_and_torch_on_cuda():
    assert runtime.resolve("auto", CPU) is runtime.Runtime.ONNXRUNTIME
    assert runtime.resolve("auto", torch.device("cuda")) is runtime.Runtime.TORCH
    assert runtime.resolve("torch", CPU) is runtime.Runtime.TORCH


def test_an_unknown_runtime_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match="'tensorflow' is not one of auto, torch, onnxruntime"):
        Settings(runtime="tensorflow")
    assert Settings.from_env({"NEURON_RUNTIME": " OnnxRuntime "}).runtime == "onnxruntime"


def test_onnxruntime_gives_torchs_answers_on_real_and_synthetic_radiographs(chest_jobs, chest_corpus):
    torch_job, ort_job = chest_jobs
    assert ort_job.models.routes[Route.CHEST_XRAY].model.compiled is not None
    assert torch_job.models.routes[Route.CHEST_XRAY].model.compiled is None
    frames = frames_of(*chest_corpus)
    assert len(frames) == 8
    assert_same_answers(torch_job.infer(Route.CHEST_XRAY, frames), ort_job.infer(Route.CHEST_XRAY, frames))


def test_onnxruntime_gives_an_image_the_same_answer_alone_or_in_a_batch(chest_jobs, chest_corpus):
    _, ort_job = chest_jobs
    frames = frames_of(*chest_corpus)
    batch = ort_job.infer(Route.CHEST_XRAY, frames)
    for i in (0, 4, 7):
        (alone,) = ort_job.infer(Route.CHEST_XRAY, [frames[i]])
        np.testing.assert_allclose(batch[i].probabilities, alone.probabilities, atol=1e-5, rtol=0)
        np.testing.assert_allclose(batch[i].cams, alone.cams, atol=1e-4, rtol=0)


def test_the_network_outputs_match_torch_on_the_probe_and_on_inputs_at_the_range_limits(chest_jobs):
    """Beyond the pipeline's inputs: the raw graph on the fixed probe and on saturated inputs (+-1024)."""
    model = chest_jobs[1].models.routes[Route.CHEST_XRAY].model
    lr = chest_jobs[1].models.routes[Route.CHEST_XRAY]
    edge = torch.full((2, 1, 224, 224), 1024.0)
    edge[1, :, :112] = -1024.0
    for x in (probe_batch(lr.preprocess, CPU), edge):
        with torch.no_grad():
            ref, got = model.torch_network(x), model.compiled(x)
        for a, b in zip(ref, got, strict=True):
            assert a.shape == b.shape and b.dtype == torch.float32
            assert float((a - b).abs().max()) <= 1e-4 * float(a.abs().max())


def test_the_runtime_is_in_every_results_provenance_and_settings_hash(chest_jobs):
    torch_spec = chest_jobs[0].models.routes[Route.CHEST_XRAY].spec
    ort_spec = chest_jobs[1].models.routes[Route.CHEST_XRAY].spec
    assert torch_spec.runtime == {"name": "torch", "version": torch.__version__}
    assert ort_spec.runtime["name"] == "onnxruntime"
    assert ort_spec.runtime["version"] == runtime.onnxruntime_version()
    assert ort_spec.runtime["provider"] == "CPUExecutionProvider" and ort_spec.runtime["graph"] == "fp32"
    assert torch_spec.config_hash != ort_spec.config_hash
    assert ort_spec.as_dict()["runtime"] == ort_spec.runtime


def fresh_out(untrained_settings, out):
    """An output folder with the session's calibrated untrained weights and no ONNX graph yet."""
    seed_untrained_cache(untrained_settings, out)
    shutil.rmtree(out / ".cache" / "onnx", ignore_errors=True)  # links to the session's graph: never write into them


def test_a_second_start_opens_the_cached_graph_without_exporting(untrained_settings, models, tmp_path):
    fresh_out(untrained_settings, tmp_path)
    settings = untrained_settings.with_(out_dir=tmp_path, runtime="onnxruntime")
    first = Models.from_settings(settings, only=[Route.CHEST_XRAY]).routes[Route.CHEST_XRAY]
    second = Models.from_settings(settings, only=[Route.CHEST_XRAY]).routes[Route.CHEST_XRAY]
    assert first.startup["exported"] and not second.startup["exported"]
    assert second.startup["check_s"] == 0
    assert {"export_s", "session_s", "load_s"} <= set(second.startup)
    (graph,) = (tmp_path / ".cache" / "onnx").glob("*.onnx")
    digest = runtime.weights_digest(first.model)
    spec = runtime.GraphSpec(MODEL, digest, 1, 224)
    assert graph == spec.path(tmp_path / ".cache" / "onnx")
    assert graph.name.startswith(f"{MODEL}-fp32-")
    # the name changes with the weights and with the versions that produced it
    assert runtime.GraphSpec(MODEL, "0" * 64, 1, 224).key != spec.key
    other = runtime.GraphSpec(MODEL, digest, 1, 224, versions={**spec.versions, "onnxruntime": "0.0.1"})
    assert other.key != spec.key


def test_a_cached_graph_that_fails_its_sha256_is_exported_again(untrained_settings, models, tmp_path, caplog):
    fresh_out(untrained_settings, tmp_path)
    settings = untrained_settings.with_(out_dir=tmp_path, runtime="onnxruntime")
    Models.from_settings(settings, only=[Route.CHEST_XRAY])
    (graph,) = (tmp_path / ".cache" / "onnx").glob("*.onnx")
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the weights
    graph.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        again = Models.from_settings(settings, only=[Route.CHEST_XRAY]).routes[Route.CHEST_XRAY]
    assert again.startup["exported"]
    assert "does not match its sha256" in caplog.text
    assert runtime.read_verified(graph) is not None  # rewritten whole


class _Branchy(ScreeningModel):
    """A network whose torch code takes a data-dependent branch: the exporter's tracer records the branch the
    export's dummy input took, so the graph computes something else for other inputs."""

    def __init__(self):
        super().__init__()
        self.config = ModelConfig("branchy-test", Route.CHEST_XRAY, 16, 1, "xrv", ("a", "b"), True,
                                  CHEST_XRAY_VIEWS, "conv", "test")
        self.class_names = ("a", "b")
        self.weights_id = "untrained"
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.conv = nn.Conv2d(1, 4, 3, padding=1)
            self.head = nn.Linear(4, 2)

    def forward_features(self, x):
        f = self.conv(x)
        return torch.relu(f if bool(x.mean() == 0) else -f)  # the export's dummy input is all zeros

    def pooled(self, features):
        return features.mean(dim=(2, 3))

    def classify(self, pooled):
        return self.head(pooled)

    def probabilities(self, logits):
        return torch.sigmoid(logits)

    def cam_weight(self):
        return self.head.weight


def test_a_graph_that_does_not_compute_what_torch_computes_is_refused_with_the_numbers(tmp_path):
    model = _Branchy().eval()
    probe = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 100
    with pytest.raises(RuntimeRefused, match=r"branchy-test: .*features differs by .* --runtime torch"):
        runtime.attach_onnxruntime(model, probe, CPU, "fp32", model_threads(CPU), tmp_path)
    assert model.compiled is None
    assert not list((tmp_path / "onnx").glob("*.onnx"))  # nothing refused is cached


def _effnet_models(tmp_path, untrained_settings, runtime_name):
    from neuron_models.checkpoint import save_checkpoint
    from neuron_models.effnet import DEFAULT_CLASSES, MRI_US_CONFIG, SKIN_CONFIG, build_untrained

    model_dir = tmp_path / "models"
    if not model_dir.exists():
        for config, classes in ((MRI_US_CONFIG, DEFAULT_CLASSES), (SKIN_CONFIG, ("disk", "ring", "stripes"))):
            net = build_untrained(config, tuple(classes), 64, seed=5).net
            with torch.no_grad():  # spread the untrained logits so the probabilities differ visibly
                net.get_classifier().weight.mul_(50)
            save_checkpoint(model_dir / f"{config.route.value}-v1", net.state_dict(), {
                "model": config.name, "class_names": list(classes), "preprocessing": {"input_size": 64},
                "training": {"drop_rate": 0.0}})
    settings = untrained_settings.with_(model_dir=model_dir, runtime=runtime_name)
    return DeviceJob(Models.from_settings(settings, only=[Route.MRI_US, Route.SKIN]))


def test_onnxruntime_gives_torchs_answers_on_the_efficientnet_routes(tmp_path, untrained_settings, data_dir,
                                                                    test_files_dir):
    """MR (pydicom-data's MR2, pydicom's MR_small), ultrasound (pydicom-data's US1, RGB) and photographs (synthetic)
    through the MRI/US and skin routes' EfficientNet-B4."""
    import cv2

    torch_job = _effnet_models(tmp_path, untrained_settings, "torch")
    ort_job = _effnet_models(tmp_path, untrained_settings, "onnxruntime")
    for job in (torch_job, ort_job):
        assert set(job.models.routes) == {Route.MRI_US, Route.SKIN}
    mr_us = frames_of(data_dir / "MR2_UNCR.dcm", test_files_dir / "MR_small.dcm", data_dir / "US1_UNCR.dcm")
    assert_same_answers(torch_job.infer(Route.MRI_US, mr_us), ort_job.infer(Route.MRI_US, mr_us))
    photos = []
    rng = np.random.default_rng(3)
    for i in range(3):
        img = (rng.random((80 + 8 * i, 96, 3)) * 255).astype(np.uint8)
        cv2.circle(img, (48, 40), 10 + 5 * i, (40, 60, 200), -1)
        cv2.imwrite(str(tmp_path / f"photo{i}.png"), img)
        photos += frames_of(tmp_path / f"photo{i}.png")
    assert_same_answers(torch_job.infer(Route.SKIN, photos), ort_job.infer(Route.SKIN, photos))


def test_ood_scores_are_the_same_on_either_runtime(untrained_settings, models, chest_corpus):
    """One reference (fitted on torch's pooled features of the films) loaded into each runtime's device job: every
    film's score within 1e-5 relative."""
    from neuron_models.preprocess import normalize, prepare_batch

    jobs = [DeviceJob(Models.from_settings(untrained_settings.with_(runtime=name), only=[Route.CHEST_XRAY]))
            for name in ("torch", "onnxruntime")]
    frames = frames_of(*chest_corpus)
    lr = jobs[0].models.routes[Route.CHEST_XRAY]
    x, _, _ = prepare_batch(frames, lr.preprocess, CPU)
    with torch.no_grad():
        pooled = ood.pooled(lr.model.torch_network(normalize(x, lr.preprocess))[0]).double().numpy()
    noisy = np.concatenate([pooled + np.random.default_rng(i).normal(0, 0.05, pooled.shape) for i in range(3)])
    reference = ood.Reference.build(Route.CHEST_XRAY, MODEL, lr.spec.weights, lr.preprocess.as_dict(), noisy,
                                    min_images=8)
    for job in jobs:
        job.models.routes[Route.CHEST_XRAY].reference = reference
    a, b = (job.infer(Route.CHEST_XRAY, frames) for job in jobs)
    assert_same_answers(a, b, ood_scores=True)


def test_neuron_run_on_either_runtime_records_the_same_findings(tmp_path, untrained_settings, models, chest_corpus):
    """Two real `neuron run` processes on the same films, SQLite: the same rows within 1e-5, each run's settings
    naming its runtime. (The distributed mode on PostgreSQL runs the default, ONNX Runtime on a CPU, and equals
    `neuron run` row for row in test_distributed.) The two run at once: neither reads what the other writes."""
    from sqlalchemy import create_engine, text

    films = tmp_path / "films"
    films.mkdir()
    for p in chest_corpus:
        shutil.copy(p, films / p.name)
    rows = {}
    names = ("torch", "onnxruntime")
    for name in names:
        seed_untrained_cache(untrained_settings, tmp_path / name)
    done = run_together(*({"args": [sys.executable, "-m", "neuron", "run", str(films), "--out", str(tmp_path / name),
                                    "--weights", "untrained", "--device", "cpu", "--runtime", name],
                           "capture_output": True, "text": True, "timeout": 300} for name in names))
    for name, res in zip(names, done, strict=True):
        out = tmp_path / name
        assert res.returncode == 0, res.stderr
        engine = create_engine(f"sqlite:///{out / 'neuron.db'}")
        with engine.connect() as conn:
            rows[name] = {(r.sop_instance_uid, r.frame, r.label): (r.probability, r.uncertainty, r.rank)
                          for r in conn.execute(text("SELECT * FROM findings"))}
            (settings_json,) = conn.execute(text("SELECT settings_json FROM pipeline_configs")).scalars()
        assert json.loads(settings_json)["runtime"]["name"] == name
        engine.dispose()
    import pydicom

    # RG1 is there twice (two transfer syntaxes, one instance); RG3 is a knee, recorded as skipped
    instances = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in chest_corpus
                 if not p.name.startswith("RG3")}
    assert rows["torch"].keys() == rows["onnxruntime"].keys() and len(rows["torch"]) == 18 * len(instances)
    for key, (p, u, _) in rows["torch"].items():
        q, v, _ = rows["onnxruntime"][key]
        assert abs(p - q) <= 1e-5 and abs(u - v) <= 1e-5
    top = {k[:2]: k[2] for k, (_, _, r) in rows["torch"].items() if r == 1}
    top_ort = {k[:2]: k[2] for k, (_, _, r) in rows["onnxruntime"].items() if r == 1}
    assert top == top_ort


def cuda_jobs(untrained_settings, precision: str) -> tuple[DeviceJob, DeviceJob]:
    """The chest route on CUDA with torch (fp32, the reference) and with ONNX Runtime at ``precision``; skips where
    CUDA or onnxruntime-gpu's CUDA provider is missing."""
    import onnxruntime

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("onnxruntime-gpu is not installed (pip install 'neuron-screening[gpu]')")
    on_cuda = untrained_settings.with_(device="cuda")
    return (DeviceJob(Models.from_settings(on_cuda.with_(runtime="torch"), only=[Route.CHEST_XRAY])),
            DeviceJob(Models.from_settings(on_cuda.with_(runtime="onnxruntime", precision=precision),
                                           only=[Route.CHEST_XRAY])))


def test_onnxruntime_on_cuda_gives_torchs_answers_in_fp32(untrained_settings, chest_corpus):
    ref, ort_job = cuda_jobs(untrained_settings, "fp32")
    frames = frames_of(*chest_corpus)
    assert_same_answers(ref.infer(Route.CHEST_XRAY, frames), ort_job.infer(Route.CHEST_XRAY, frames))


def test_onnxruntime_on_cuda_in_fp16_stays_within_the_fast_tolerance(untrained_settings, chest_corpus):
    ref, fast = cuda_jobs(untrained_settings, "fp16")
    frames = frames_of(*chest_corpus)
    assert fast.models.routes[Route.CHEST_XRAY].spec.runtime["graph"] == "fp16"
    for a, b in zip(ref.infer(Route.CHEST_XRAY, frames), fast.infer(Route.CHEST_XRAY, frames), strict=True):
        np.testing.assert_allclose(b.probabilities, a.probabilities, atol=0.01, rtol=0)
        assert a.order[0] == b.order[0]
