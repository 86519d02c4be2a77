"""`neuron bench`: the synthetic archive it measures on, and one tiny run end to end (speed itself is never asserted).

The tiny run goes through ``worker.bench.run_bench``, the function the `neuron bench` command calls, with the session's
untrained engine, so the test does not pay for loading the models a second time.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections import Counter
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless
from typer.testing import CliRunner

from neuron import synthetic
from neuron.routes import RoutingFacts, route_for
from neuron.servers import postgres_available, redis_available
from neuron.work import Route


@pytest.fixture(scope="module")
def archives(tmp_path_factory) -> dict[str, synthetic.Archive]:
    return synthetic.ensure_archives(tmp_path_factory.mktemp("synthetic"), n=10, size=96, seed=3)


def test_the_same_seed_gives_the_same_bytes_and_another_seed_other_pixels(archives, tmp_path):
    again = synthetic.ensure_archives(tmp_path / "again", n=10, size=96, seed=3)
    for flavour, archive in archives.items():
        assert [p.read_bytes() for p in archive.files] == [p.read_bytes() for p in again[flavour].files]
    other = synthetic.make_instance(synthetic.plan_studies(1, 4)[0], 96, seed=4).pixels
    first = pydicom.dcmread(archives["uncompressed"].files[0]).pixel_array
    assert other.shape != first.shape or not np.array_equal(other, first)


def test_a_generated_archive_is_reused_not_rewritten(archives):
    mtimes = [p.stat().st_mtime_ns for p in archives["uncompressed"].files]
    root = archives["uncompressed"].root.parent.parent
    synthetic.ensure_archives(root, n=10, size=96, seed=3, flavours=["uncompressed"])
    assert [p.stat().st_mtime_ns for p in archives["uncompressed"].files] == mtimes


def test_instances_declare_the_bits_photometrics_and_window_they_store(archives):
    photometrics, per_study = Counter(), Counter()
    for path in archives["uncompressed"].files:
        ds = pydicom.dcmread(path)
        assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        bits = int(ds.BitsStored)
        assert 12 <= bits <= 15 and ds.BitsAllocated == 16 and ds.HighBit == bits - 1
        px = ds.pixel_array
        assert px.dtype == np.uint16 and int(px.max()) < 2**bits
        assert px.std() > 0.05 * 2**bits  # a picture, not a flat field
        center, width = float(ds.WindowCenter), float(ds.WindowWidth)
        assert 0 < center < 2**bits and 1 < width <= 2**bits
        inside = ((px >= center - width / 2) & (px <= center + width / 2)).mean()
        assert inside > 0.9  # the window frames the image's values
        photometrics[ds.PhotometricInterpretation] += 1
        per_study[ds.StudyInstanceUID] += 1
        assert str(ds.PatientName).startswith("SYNTHETIC^") and ds.PatientID.startswith("FAKE")
        assert route_for(RoutingFacts.of(ds.Modality, ds.BodyPartExamined)) is Route.CHEST_XRAY
    assert set(photometrics) == {"MONOCHROME1", "MONOCHROME2"}
    assert all(1 <= k <= 4 for k in per_study.values()) and sum(per_study.values()) == 10
    assert len(per_study) == archives["uncompressed"].studies


@pytest.mark.parametrize("n", [1, 2, 7, 50])
def test_studies_hold_one_to_four_images_and_add_up_to_n(n):
    plans = synthetic.plan_studies(n, seed=0)
    sizes = Counter(p.study for p in plans)
    assert len(plans) == n and all(1 <= k <= 4 for k in sizes.values())
    assert [p.index for p in plans] == list(range(n))


def test_the_jpeg2000_flavour_decodes_losslessly_to_the_uncompressed_pixels(archives):
    from worker.decode import decode_instance

    for raw, j2k in zip(archives["uncompressed"].files, archives["jpeg2000"].files, strict=True):
        a, b = pydicom.dcmread(raw), pydicom.dcmread(j2k)
        assert b.file_meta.TransferSyntaxUID == JPEG2000Lossless and a.SOPInstanceUID == b.SOPInstanceUID
        assert len(j2k.read_bytes()) < len(raw.read_bytes())
        assert np.array_equal(a.pixel_array, b.pixel_array)
        engine_decoded = decode_instance(j2k, "x", 1, 1 << 30)[0].pixels  # the engine's pinned decoder too
        assert np.array_equal(engine_decoded, a.pixel_array)


def test_the_imagecodecs_fallback_encoder_is_lossless_too():
    inst = synthetic.make_instance(synthetic.plan_studies(1, 0)[0], 80, seed=0)
    ds = synthetic.to_jpeg2000(inst, "imagecodecs")
    assert ds.file_meta.TransferSyntaxUID == JPEG2000Lossless
    assert np.array_equal(ds.pixel_array, inst.pixels)


def test_bench_rows_go_under_their_heading_and_after_the_last_row(tmp_path):
    from worker.bench import TABLE_HEADING, append_rows

    row = {"date": "2026-01-01", "device": "cpu", "mode": "embedded", "archive": "uncompressed", "n_images": 4,
           "image_size": 256, "batch_size": 4, "precision": "fp32", "model_only_images_per_s": 2.5,
           "decode_images_per_s": 300.0, "end_to_end_images_per_s": 2.1, "ratio": 0.84, "batch_fill": 1.0,
           "time_to_first_batch_s": 1.5, "peak_rss_mb": 900.0, "peak_gpu_mb": 0.0}
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\n## Older\n\ntext\n")
    append_rows(md, [row])
    append_rows(md, [{**row, "archive": "jpeg2000"}])
    lines = md.read_text().splitlines()
    assert lines.count(TABLE_HEADING) == 1 and lines[2] == "## Older"
    rows = [ln for ln in lines if ln.startswith("| 2026-01-01")]
    assert [("uncompressed" in r, "jpeg2000" in r) for r in rows] == [(True, False), (False, True)]
    md.write_text(md.read_text() + "\n## Later section\n\nmore\n")
    append_rows(md, [{**row, "mode": "celery", "batch_fill": None}])
    lines = md.read_text().splitlines()
    assert "celery" in lines[lines.index("## Later section") - 2] and lines[-1] == "more"


def test_batch_fill_and_first_batch_are_read_from_the_worker_log():
    from worker.bench import parse_worker_log

    text = ("[2026-11-27 07:36:10,000: INFO/MainProcess] worker: batch size 4, 16 studies in flight, batches wait\n"
            "[2026-11-27 07:36:19,220: INFO/MainProcess] first batch ran 55.08 s after the engine was created\n"
            "[2026-11-27 07:37:19,000: INFO/MainProcess] batch fill in the last 60 s: 3 batches, 10 frames, mean fill "
            "83% of 4 (run total 83%; by reason: full 2, waited 1)\n"
            "[2026-11-27 07:37:24,321: INFO/MainProcess] batch fill over the run: 1 batches, 4 frames, mean fill 100% "
            "of 4 (run total 88%; by reason: full 1)\n")
    wlog = parse_worker_log(text)
    assert (wlog.batches, wlog.frames, wlog.batch_size, wlog.concurrency) == (4, 14, 4, 16)
    assert wlog.fill == pytest.approx(14 / 16)
    assert wlog.first_batch_at == datetime(2026, 11, 27, 7, 36, 19, 220000)
    assert parse_worker_log("nothing").fill is None


@pytest.mark.timeout(300)  # the session engine may be loaded here first
def test_a_tiny_bench_run_writes_every_required_key_with_sane_values(models, tmp_path):
    from worker.bench import REQUIRED_KEYS, BenchConfig, run_bench

    md = tmp_path / "BENCHMARKS.md"
    cfg = BenchConfig(n=4, size=256, batch_size=4, modes=("embedded",), out=tmp_path / "results",
                      workdir=tmp_path / "work", append=False, benchmarks_md=md)
    results = run_bench(cfg, models=models, say=lambda _: None)
    files = list((tmp_path / "results").glob("*-cpu.json"))
    assert len(files) == 1 and json.loads(files[0].read_text()) == results
    assert {(r["mode"], r["archive"]) for r in results} == {("embedded", "uncompressed"), ("embedded", "jpeg2000")}
    for r in results:
        assert all(k in r for k in REQUIRED_KEYS), set(REQUIRED_KEYS) - set(r)
        assert r["device"] == "cpu" and r["n_images"] == 4 and r["batch_size"] == 4 and r["precision"] == "fp32"
        assert r["instances_done"] == 4 and r["heatmaps_written"] == 4
        for key in ("model_only_images_per_s", "decode_images_per_s", "end_to_end_images_per_s", "ratio",
                    "time_to_first_batch_s"):
            assert r[key] > 0, key
        assert r["ratio"] == pytest.approx(r["end_to_end_images_per_s"] / r["model_only_images_per_s"], rel=0.01)
        assert 0 < r["batch_fill"] <= 1
        assert r["peak_rss_mb"] > 50 and r["peak_gpu_mb"] == 0
        assert r["machine"]["cpu_count"] >= 1 and r["machine"]["torch"]
        # the run's runtime (auto: ONNX Runtime on a CPU) and the model-only bound on each runtime
        assert r["runtime"]["name"] == "onnxruntime" and r["runtime"]["provider"] == "CPUExecutionProvider"
        assert set(r["model_only_by_runtime"]) == {"torch", "onnxruntime"}
        assert all(v > 0 for v in r["model_only_by_runtime"].values())
        assert r["model_only_by_runtime"]["onnxruntime"] == r["model_only_images_per_s"]
    assert not md.exists()
    assert not list((tmp_path / "work" / "runs").iterdir())  # scratch removed; archives kept for the next run


@pytest.mark.slow
def test_host_only_runs_the_real_pipeline_in_both_modes_and_reports_cpu_and_gil_per_image(
        models, untrained_settings, tmp_path, monkeypatch):
    """`neuron bench --host-only`: the embedded run and a real Celery worker (redis-server, PostgreSQL) screen every
    image with the instant device stage, write every heatmap and report the host's CPU and, through py-spy, the GIL
    held by the process that drives the device, split by stage."""
    from worker import bench
    from worker.bench import BenchConfig, Mode, run_bench

    from .conftest import seed_untrained_cache

    # the worker's environment also names a cache holding the session's calibrated untrained model and its ONNX
    # graph, as the cluster-load benchmark's does: without it the worker computed both again (about 40 s of CPU)
    seed_untrained_cache(untrained_settings, tmp_path / "engine")
    environment = bench.celery_environment
    monkeypatch.setattr(bench, "celery_environment", lambda *args, **kwargs: {
        **environment(*args, **kwargs), "NEURON_CACHE_DIR": str(tmp_path / "engine" / ".cache")})

    cfg = BenchConfig(n=6, size=256, batch_size=4, archives=("uncompressed",), modes=(Mode.EMBEDDED, Mode.CELERY),
                      out=tmp_path / "results", workdir=tmp_path / "work", append=True,
                      benchmarks_md=tmp_path / "BENCHMARKS.md", host_only=True)
    results = run_bench(cfg, models=models, say=lambda _: None)
    assert {r["mode"] for r in results} == {"embedded", "celery"}
    for r in results:
        said = {k: r.get(k) for k in ("mode", "instances_done", "heatmaps_written", "host_probe_note")}
        assert r["host_only"] and r["instances_done"] == 6 and r["heatmaps_written"] == 6, said
        assert r["host_only_images_per_s"] == r["end_to_end_images_per_s"] > 0
        assert r["cpu_ms_per_image"] > 0 and r["peak_shm_mb"] is not None, said
        # the CPU by process: the driver's, and the reader processes' (found by the name they gave themselves; a
        # 6-image run's reads can take less than the kernel's 10 ms tick, so their figure may be 0)
        by_process = r["cpu_ms_per_image_by_process"]
        assert by_process["driver"] > 0 and by_process.get("readers", -1) >= 0, by_process
        assert sum(by_process.values()) == pytest.approx(r["cpu_ms_per_image"], abs=0.01 * len(by_process))
        if r["mode"] == "celery":  # and what the scan and the servers spent beside the worker on the same cores
            beside = r["cpu_ms_per_image_beside_worker"]
            # (the servers' share of a 6-image run can be under the kernel's 10 ms tick; the scan's start-up is not)
            assert beside.keys() == {"scan", "redis", "postgresql"} and beside["scan"] > 0, beside
            assert all(v >= 0 for v in beside.values()), beside
        assert r["host_probe_note"] is None, said  # py-spy attached and sampled
        assert r["gil_ms_per_image"] > 0 and r["gil_ms_per_image_by_stage"], said
        assert sum(r["gil_ms_per_image_by_stage"].values()) == pytest.approx(r["gil_ms_per_image"], abs=0.01 * 8)
    table = (tmp_path / "BENCHMARKS.md").read_text()
    assert "## `neuron bench --host-only` results" in table and table.count("| cpu |") == 2


def test_bench_refuses_an_unknown_archive_flavour(tmp_path, monkeypatch):
    from neuron_cli import app
    from neuron_cli.common import EXIT_USAGE

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "torch"))
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mpl"))
    res = CliRunner().invoke(app, ["bench", "--archives", "jpeg-ls", "--workdir", str(tmp_path), "--no-append"])
    assert res.exit_code == EXIT_USAGE
    assert "jpeg-ls" in res.output


def test_bench_results_are_named_by_date_and_device(tmp_path):
    from worker.bench import device_slug, write_json

    path = write_json(tmp_path, [{"a": 1}], "NVIDIA H100 80GB HBM3")
    assert path.name.endswith("-nvidia-h100-80gb-hbm3.json") and device_slug("cpu") == "cpu"
    write_json(tmp_path, [{"a": 2}], "NVIDIA H100 80GB HBM3")
    assert json.loads(path.read_text()) == [{"a": 1}, {"a": 2}]
    assert Path(path).parent == tmp_path


@pytest.mark.slow
@pytest.mark.skipif(not (redis_available() and postgres_available()),
                    reason="redis-server and PostgreSQL (initdb, pg_ctl) must both be installed")
def test_the_cluster_load_benchmark_counts_what_a_scan_and_a_worker_ask_of_redis_and_postgresql(
        models, untrained_settings, tmp_path):
    """`benchmarks/bench_cluster_load.py` end to end on 16 images: a real `neuron scan` and a real host-only worker
    against its own Redis and PostgreSQL (pg_stat_statements loaded), the counters split by phase, per image and per
    study, the servers' capacity and the projection."""
    from benchmarks.bench_cluster_load import NOT_SERVER_LIMITS, LoadConfig, run

    from .conftest import seed_untrained_cache

    seed_untrained_cache(untrained_settings, tmp_path / "out")  # no worker start recalibrates the untrained model
    cfg = LoadConfig(n=16, size=64, batch_size=4, fixed=False, quiet_s=1, redis_requests=2000, writer_studies=8,
                     fsync_s=0.2, workdir=tmp_path / "work", cache_dir=tmp_path / "out" / ".cache",
                     out=tmp_path / "results")
    r = run(cfg, say=lambda _: None)
    assert json.loads((tmp_path / "results" / f"{r['date']}-cluster-load.json").read_text()) == r
    assert r["instances_done"] == r["n_images"] == 16 and 4 <= r["studies"] <= 16
    producer, worker = r["phases"]["producer"], r["phases"]["worker"]
    assert producer["redis.calls.lpush"] == r["studies"]  # one task per study, nothing else pushed
    assert worker["redis.calls.brpop"] >= 1 and worker["redis.calls.hdel"] >= r["studies"]  # every study acked
    assert worker["pg.tup_inserted"] >= 16 * 18  # a findings row per label of the chest model, per image
    for phase in (producer, worker):
        assert phase["pg.xact_commit"] > 0 and phase["pg.statements"] > 0 and phase["pg.wal_bytes"] > 0
        assert phase["redis.total_commands_processed"] > 0 and phase["redis.total_net_input_bytes"] > 0
    for name, phase in (("producer", producer), ("worker", worker)):
        per_image, per_study = r["per_image"][name], r["per_study"][name]
        assert per_image["pg_commits"] == pytest.approx(phase["pg.xact_commit"] / 16, abs=1e-4)
        assert per_image["redis_commands"] == pytest.approx(phase["redis.total_commands_processed"] / 16, abs=1e-4)
        assert per_study["pg_wal_bytes"] == pytest.approx(phase["pg.wal_bytes"] / r["studies"], abs=1e-3)
        assert r["statements"][name] and r["connections"][f"{name}.pg_backends"] >= 1
    assert r["message_bytes"] > 100
    rooted = os.geteuid() == 0 and shutil.which("nft") is not None
    assert r["network"]["available"] is rooted
    if rooted:
        assert worker["net.pg_in_bytes"] > worker["pg.statements"] and worker["net.redis_in_packets"] > 0
        tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
        assert "neuron_load_" not in tables  # the run's counters table is removed
    cap = r["capacity"]
    assert all(c["requests_per_s"] > 0 for c in cap["redis"]["commands"].values())
    assert cap["postgresql"]["writer"]["images_per_s"] > 0 and cap["postgresql"]["fdatasync_per_s"] > 0
    for rate in r["projection"]["by_worker_rate"].values():
        limits = rate["workers_before_saturation"]
        first = min(v for k, v in limits.items() if v is not None and k not in NOT_SERVER_LIMITS)
        assert limits[rate["saturates_first"]] == first >= 0  # a 16-image run's start costs weigh on every image
        assert rate["workers"] == (first if first < 1 else int(first))
        assert rate["images_per_night"] == round(rate["workers"] * rate["images_per_s_per_worker"] * 36000)
    assert not list((tmp_path / "work" / "runs").iterdir())  # the servers' folders removed
