"""The out-of-distribution score: `neuron reference` (a real process) builds a chest reference from chest radiographs
(RG1 at eight scales and synthetic chest CRs from neuron.synthetic); screening then scores every image against it in
the device job. Images of another body part (RG3, a knee CR whose BodyPartExamined was removed, so routing sends it to
the chest model) or modality (MR, CT forced onto the chest route) score above every reference image and are flagged;
new chest radiographs are not. The score is the same alone or in a batch, on the CPU and (where CUDA is present) on a
GPU; a reference is refused for other weights; the distributed mode scores the same way on PostgreSQL.
Untrained weights (the session's models), so the features are a seeded random DenseNet's: the claims are about the
statistics, which hold for any fixed feature extractor."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sqlalchemy import text

from db.store import Database
from neuron.settings import Settings
from neuron.synthetic import InstancePlan, make_instance
from neuron.work import Route
from neuron_models import ood
from worker.decode import decode_instance

from .conftest import small_chest

REFERENCE_STEPS = (5, 6, 7, 8, 9, 10, 12, 13)  # RG1 decimated; 11 is kept back as a new chest film
SYNTHETIC = 16
pytestmark = pytest.mark.timeout(300)


def neuron(*args, env=None, timeout=240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "neuron", *args], capture_output=True, text=True, timeout=timeout,
                          env=env)


def synthetic_chest(path, index: int, seed: int):
    inst = make_instance(InstancePlan(index, index, 0), 128, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    inst.dataset.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory, rg1, cache):
    """`neuron reference` over 24 chest radiographs, as a process: (reference folder, its sidecar, what it said)."""
    root = tmp_path_factory.mktemp("reference-films")
    for step in REFERENCE_STEPS:
        small_chest(rg1, root / f"rg1_{step}.dcm", step=step)
    for i in range(SYNTHETIC):
        synthetic_chest(root / f"synthetic_{i}.dcm", i, seed=7)
    (root / "notes.txt").write_text("not DICOM: left out and counted")
    out = tmp_path_factory.mktemp("reference-out")
    res = neuron("reference", "--data", str(root), "--route", "chest-xray", "--out", str(out), "--weights",
                 "untrained", "--device", "cpu", "--batch-size", "8", "--cache-dir", str(cache))
    assert res.returncode == 0, res.stderr
    folder = out / "references"
    return folder, json.loads((folder / "chest-xray.json").read_text()), " ".join(res.stderr.split())


@pytest.fixture(scope="module")
def scored(built, untrained_settings):
    """The chest model with the reference loaded, as screening loads it (worker.models)."""
    from worker.models import Models

    settings = untrained_settings.with_(reference_dir=built[0])
    return Models.from_settings(settings, only=[Route.CHEST_XRAY]), settings


@pytest.fixture(scope="module")
def strangers(tmp_path_factory, data_dir, rg1):
    """What the chest model was not built for, and two new chest films it was."""
    root = tmp_path_factory.mktemp("strangers")
    small_chest(data_dir / "RG3_UNCR.dcm", root / "knee_without_body_part.dcm", step=8, BodyPartExamined="")
    for name in ("MR2_UNCR.dcm", "693_UNCR.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm"):
        shutil.copy(data_dir / name, root / name)
    small_chest(rg1, root / "new_chest_rg1.dcm", step=11)
    synthetic_chest(root / "new_chest_synthetic.dcm", 40, seed=8)
    return root


@pytest.fixture(scope="module")
def screened(strangers, scored, tmp_path_factory):
    """The strangers forced through the chest route (`neuron run --route chest-xray`'s engine) with the reference."""
    from worker.embedded import run_folder
    from worker.pipeline import Pipeline

    models, settings = scored
    settings = settings.with_(out_dir=tmp_path_factory.mktemp("ood-run"), route_override=Route.CHEST_XRAY)
    run_folder(strangers, settings, pipeline=Pipeline(models, settings))
    db = Database(settings.resolved_database_url)
    yield db
    db.dispose()


def rows(db: Database, sql: str) -> list[tuple]:
    with db.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(text(sql))]


def test_the_reference_holds_the_site_films_the_weights_and_a_held_out_threshold(built):
    folder, meta, said = built
    assert meta["route"] == "chest-xray" and meta["weights"] == "untrained" and meta["images"] == 24
    assert meta["preprocess"]["clahe"] is True and meta["summary"]["estimator"] == "sklearn.covariance.LedoitWolf"
    held = meta["summary"]["held_out"]
    assert held["50"] < meta["threshold"] <= held["100"] and meta["summary"]["in_sample"]["100"] < held["100"]
    assert meta["summary"]["held_out"]["99"] == pytest.approx(meta["threshold"], rel=1e-3)
    assert "24 films" in said and "not a DICOM file x1" in said and "written to" in said


def test_other_body_parts_and_modalities_score_above_every_reference_image_and_are_flagged(screened, built):
    _, meta, _ = built
    highest_reference = meta["summary"]["held_out"]["100"]  # the most any reference film scores when held out
    got = {r[0].rsplit("/", 1)[1]: r[1:] for r in rows(
        screened, "SELECT file_path, MIN(ood_score), MAX(ood_score), MIN(out_of_distribution), "
                  "SUM(needs_review), COUNT(*), MIN(review_reason) FROM findings GROUP BY file_path")}
    strangers = ("knee_without_body_part.dcm", "MR2_UNCR.dcm", "693_UNCR.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm")
    assert set(strangers) <= set(got)
    for name in strangers:
        low, high, flagged, review, n, reason = got[name]
        assert low == high, "one score per frame, on every label's row"
        assert low > highest_reference and low > meta["threshold"], (name, low, highest_reference)
        assert flagged == 1 and review == n == 18 and "out of distribution" in reason
    for name in ("new_chest_rg1.dcm", "new_chest_synthetic.dcm"):
        assert got[name][0] < meta["threshold"] and got[name][2] == 0, (name, got[name])
    # the knee passed the header gate (CR, no body part: routed to the chest model); only its pixels tell
    assert rows(screened, "SELECT DISTINCT outside_population FROM findings "
                          "WHERE file_path LIKE '%knee_without_body_part.dcm'") == [(0,)]
    # and the review page shows the flag with the score and the threshold
    from starlette.testclient import TestClient

    from review.app import create_app

    (study,) = rows(screened, "SELECT DISTINCT study_instance_uid FROM findings WHERE file_path LIKE '%knee%'")[0]
    page = TestClient(create_app(screened, Settings(out_dir=Path(screened.url[10:]).parent), None)).get(
        f"/study/{study}").text
    assert "out of distribution</span>" in page and f"{meta['threshold']:.2f} (99th percentile of 24" in page


def test_results_record_the_reference_they_were_scored_against(screened, built, models, untrained_settings,
                                                                strangers, tmp_path):
    _, meta, _ = built
    settings_json = rows(screened, "SELECT DISTINCT c.settings_json FROM pipeline_configs c JOIN predictions p "
                                   "ON p.config_hash = c.config_hash")
    assert len(settings_json) == 1 and json.loads(settings_json[0][0])["reference"]["sha256"] == meta["sha256"]
    # without a reference, the columns are NULL
    from worker.embedded import run_folder
    from worker.pipeline import Pipeline

    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(strangers / "new_chest_rg1.dcm", one / "a.dcm")
    settings = untrained_settings.with_(out_dir=tmp_path / "out")
    run_folder(one, settings, pipeline=Pipeline(models, settings))
    db = Database(settings.resolved_database_url)
    assert rows(db, "SELECT DISTINCT ood_score, out_of_distribution FROM findings") == [(None, None)]
    db.dispose()


def _frames(strangers):
    names = ("new_chest_rg1.dcm", "knee_without_body_part.dcm", "new_chest_synthetic.dcm")
    return [decode_instance(strangers / n, n, 1, 1 << 28)[0] for n in names]


def test_the_score_is_the_same_alone_or_in_a_batch(scored, strangers):
    from worker.device import DeviceJob

    job = DeviceJob(scored[0])
    frames = _frames(strangers)
    together = [r.ood_score for r in job.infer(Route.CHEST_XRAY, frames)]
    alone = [job.infer(Route.CHEST_XRAY, [f])[0].ood_score for f in frames]
    np.testing.assert_allclose(together, alone, rtol=1e-5)
    assert len(set(np.round(together, 3))) == 3  # three different images, three scores


def test_the_host_only_benchmarks_instant_device_job_answers_with_the_primed_batchs_scores(scored, strangers):
    """`neuron bench --host-only` replaces the device stage by ready-made outputs of one primed batch: with a
    reference they carry that batch's ood scores, so the results stage shapes the same rows it shapes in a run."""
    from worker.bench_host import InstantDeviceJob
    from worker.device import DeviceJob

    models = scored[0]
    frames = _frames(strangers)
    real = [r.ood_score for r in DeviceJob(models).infer(Route.CHEST_XRAY, frames)]
    job = InstantDeviceJob(models, batch_size=4)
    job.prime(Route.CHEST_XRAY, frames)  # frames cycled: the batch starts with the three frames
    [(_, prepared, output)] = job.run(Route.CHEST_XRAY, frames)
    host = {name: t.cpu().numpy() for name, t in output.host_tensors(prepared).items()}
    shaped = job.split_results(Route.CHEST_XRAY, frames, prepared, host)
    np.testing.assert_allclose([r.ood_score for r in shaped], real, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_score_is_the_same_on_cpu_and_gpu(scored, strangers):
    from worker.device import DeviceJob
    from worker.models import Models

    models, settings = scored
    gpu = Models.from_settings(settings.with_(device="cuda"), only=[Route.CHEST_XRAY])
    frames = _frames(strangers)
    cpu_scores = [r.ood_score for r in DeviceJob(models).infer(Route.CHEST_XRAY, frames)]
    gpu_scores = [r.ood_score for r in DeviceJob(gpu).infer(Route.CHEST_XRAY, frames)]
    np.testing.assert_allclose(gpu_scores, cpu_scores, rtol=1e-4)


def test_a_reference_built_for_other_weights_or_tampered_with_is_refused(built, untrained_settings, tmp_path,
                                                                        strangers):
    from worker.models import Models

    folder, meta, _ = built
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    (other / "chest-xray.json").write_text(json.dumps({**meta, "weights": "0" * 64}))
    with pytest.raises(ood.ReferenceMismatch, match="built from weights 0000000000000000, and the model now has "
                                                    "weights untrained"):
        Models.from_settings(untrained_settings.with_(reference_dir=other), only=[Route.CHEST_XRAY])
    res = neuron("run", str(strangers), "--out", str(tmp_path / "run"), "--weights", "untrained", "--device", "cpu",
                 "--cache-dir", str(untrained_settings.resolved_cache_dir), "--reference-dir", str(other))
    said = " ".join(res.stderr.split())
    assert res.returncode == 4 and "neuron reference --data FOLDER --route chest-xray" in said, said
    tampered = tmp_path / "tampered"
    shutil.copytree(folder, tampered)
    data = bytearray((tampered / "chest-xray.safetensors").read_bytes())
    data[-1] ^= 1
    (tampered / "chest-xray.safetensors").write_bytes(bytes(data))
    with pytest.raises(Exception, match="the file is corrupt or was replaced"):
        ood.load(tampered, Route.CHEST_XRAY)


def test_a_reference_of_too_few_films_is_refused_with_the_count(scored, strangers, tmp_path):
    from worker.reference import build_reference

    models, settings = scored
    few = tmp_path / "few"
    few.mkdir()
    shutil.copy(strangers / "new_chest_rg1.dcm", few / "a.dcm")
    with pytest.raises(ValueError, match="at least 20 films of route chest-xray, and 1 could be used"):
        build_reference(few, Route.CHEST_XRAY, settings.with_(reference_dir=tmp_path / "refs"), models)
    assert not (tmp_path / "refs").exists()


def test_a_worker_scores_against_the_reference_on_postgresql(env, built, strangers, untrained_settings, tmp_path):
    """The distributed mode: `neuron scan` indexes (a child's film flagged by the gate), a `neuron worker` process
    loads the reference from NEURON_REFERENCE_DIR and scores every frame; the flags land in PostgreSQL's views."""
    from .conftest import small_chest as derive
    from .test_distributed import start_worker, stop, wait_until

    folder = tmp_path / "archive"
    folder.mkdir()
    for name in ("knee_without_body_part.dcm", "new_chest_rg1.dcm"):
        shutil.copy(strangers / name, folder / name)
    derive(strangers / "new_chest_rg1.dcm", folder / "child.dcm", step=1, PatientAge="007Y")
    env = {**env, "NEURON_REFERENCE_DIR": str(built[0])}
    db = Database(env["NEURON_DATABASE_URL"])
    worker = start_worker(env, tmp_path, "ood", "--cache-dir", str(untrained_settings.resolved_cache_dir))
    try:
        res = neuron("scan", str(folder), env=env)  # while the worker loads its models
        assert res.returncode == 0, res.stderr
        wait_until(lambda: rows(db, "SELECT COUNT(*) FROM instances WHERE status = 'done'")[0][0] == 3, 180,
                   "three instances screened", [worker])
    finally:
        stop(worker)
    got = {r[0].rsplit("/", 1)[1]: r[1:] for r in rows(
        db, "SELECT file_path, MIN(ood_score), BOOL_AND(out_of_distribution), MIN(outside_population) = 1, "
            "BOOL_AND(needs_review) FROM findings GROUP BY file_path")}
    db.dispose()
    assert got["knee_without_body_part.dcm"][1:] == (True, False, True)
    assert got["new_chest_rg1.dcm"][1] is False and got["new_chest_rg1.dcm"][2] is False
    assert got["child.dcm"][2] is True and got["child.dcm"][3] is True
    assert got["knee_without_body_part.dcm"][0] > built[1]["threshold"]
