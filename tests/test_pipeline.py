"""End to end on the embedded default: a folder of real and broken DICOMs in, SQLite rows and heatmaps out."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import MPEG2MPML, JPEG2000Lossless, RLELossless, generate_uid

from neuron.settings import Settings
from worker.embedded import run_folder

from .conftest import monochrome2_twin, small_chest

N_LABELS = 18


def build_archive(root: Path, chest: Path, data_dir: Path, test_files_dir: Path) -> dict[str, Path]:
    """A small archive: one chest CR stored five ways, a duplicate, other modalities and every kind of bad input."""
    for sub in ("study1", "study2", "other", "bad"):
        (root / sub).mkdir(parents=True)
    f = {"mono1": Path(shutil.copy(chest, root / "study1" / "mono1.dcm"))}
    f["mono2"] = monochrome2_twin(chest, root / "study1" / "mono2.dcm")
    for uid, name in ((RLELossless, "rle"), (JPEG2000Lossless, "j2k")):
        ds = pydicom.dcmread(chest)
        ds.SOPInstanceUID = generate_uid()
        ds.compress(uid, encoding_plugin="pylibjpeg" if uid == JPEG2000Lossless else "")
        f[name] = root / "study2" / f"{name}.dcm"
        ds.save_as(f[name])
    f["duplicate"] = Path(shutil.copy(chest, root / "study2" / "copy_of_mono1"))
    f["ct"] = Path(shutil.copy(data_dir / "693_J2KR.dcm", root / "other" / "ct.dcm"))
    f["mr"] = Path(shutil.copy(data_dir / "MR2_J2KR.dcm", root / "other" / "mr.dcm"))
    f["extremity"] = Path(shutil.copy(data_dir / "RG3_J2KR.dcm", root / "other" / "hand.dcm"))
    bad = root / "bad"
    f["empty"] = bad / "empty.dcm"
    f["empty"].write_bytes(b"")
    f["text"] = bad / "notes.txt"
    f["text"].write_text("radiology report, not an image")
    ds = pydicom.dcmread(chest)
    ds.SOPInstanceUID = generate_uid()
    f["truncated"] = bad / "truncated.dcm"
    ds.save_as(f["truncated"])
    raw = f["truncated"].read_bytes()
    f["truncated"].write_bytes(raw[: len(raw) - 5000])
    ds = pydicom.dcmread(chest)
    ds.SOPInstanceUID = generate_uid()
    del ds.PixelData
    f["nopixels"] = bad / "nopixels.dcm"
    ds.save_as(f["nopixels"])
    ds = pydicom.dcmread(chest)
    ds.SOPInstanceUID = generate_uid()
    ds.Rows = ds.Columns = 50000
    f["huge"] = bad / "huge.dcm"
    ds.save_as(f["huge"])
    ds = pydicom.dcmread(chest)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = MPEG2MPML  # a video syntax: no decoder is installed for it
    ds.PixelData = encapsulate([b"\x00" * 64])
    f["undecodable"] = bad / "jpegxl.dcm"
    ds.save_as(f["undecodable"], enforce_file_format=True)
    ds = pydicom.dcmread(data_dir / "SC_rgb.dcm")  # colour bars
    ds.Modality, ds.SOPInstanceUID = "DX", generate_uid()
    f["colour_dx"] = bad / "colour_dx.dcm"
    ds.save_as(f["colour_dx"])
    return f


@pytest.fixture(scope="module")
def archive(tmp_path_factory, chest_small, data_dir, test_files_dir):
    root = tmp_path_factory.mktemp("archive")
    files = build_archive(root, chest_small, data_dir, test_files_dir)
    return root, files


@pytest.fixture(scope="module")
def first_run(archive, untrained_settings, models, tmp_path_factory):
    root, files = archive
    settings = untrained_settings.with_(out_dir=tmp_path_factory.mktemp("results"))
    report = run_folder(root, settings, pipeline=_pipeline(models, settings))
    return settings, report


def _pipeline(models, settings):
    """The session's loaded models, writing heatmaps into this run's output folder."""
    from worker.pipeline import Pipeline

    return Pipeline(models, settings)


def query(settings: Settings, sql: str, *args):
    with sqlite3.connect(settings.out_dir / "neuron.db") as conn:
        return conn.execute(sql, args).fetchall()


def status_of(settings, path: Path) -> tuple[str, str | None]:
    (row,) = query(settings, "select status, reason from ingest_status where file_path = ?", str(path.resolve()))
    return row


def probs(settings, path: Path) -> dict[str, float]:
    (uid,) = query(settings, "select sop_instance_uid from ingest_status where file_path = ?", str(path.resolve()))[0]
    return dict(query(settings, "select label, probability from findings where sop_instance_uid = ?", uid))


def test_every_file_gets_one_ingest_status_row(first_run, archive):
    settings, _ = first_run
    root, files = archive
    n_files = sum(1 for p in root.rglob("*") if p.is_file())
    assert query(settings, "select count(*) from ingest_status")[0][0] == n_files
    for status, reason in query(settings, "select status, reason from ingest_status"):
        assert status in {"done", "failed", "skipped", "duplicate"}
        assert (reason is None) == (status == "done")


def test_screened_instances_have_a_full_set_of_findings(first_run, archive):
    settings, _ = first_run
    _, files = archive
    for key in ("mono1", "mono2", "rle", "j2k"):
        assert status_of(settings, files[key]) == ("done", None)
    rows = query(settings, "select sop_instance_uid, frame, model, weights, label, probability, uncertainty, rank, "
                           "heatmap_path, study_instance_uid, series_instance_uid, modality, file_path, processed_at, "
                           "preprocessing, untrained from findings")
    assert len(rows) == 4 * N_LABELS
    by_uid = {}
    for r in rows:
        by_uid.setdefault(r[0], []).append(r)
    for uid_rows in by_uid.values():
        assert sorted(r[7] for r in uid_rows) == list(range(1, N_LABELS + 1))
        top = max(uid_rows, key=lambda r: r[5])
        assert top[7] == 1 and top[8] is not None and Path(top[8]).is_file()
        assert all(r[8] is None for r in uid_rows if r[7] > 1)
        assert all(r[3] == "untrained" and r[15] == 1 and len(r[14]) == 16 for r in uid_rows)
        assert all(0.0 < r[5] < 1.0 and r[6] >= 0 for r in uid_rows)
    (config,) = query(settings, "select settings_json from pipeline_configs")
    assert '"clahe": true' in config[0] and '"brightness"' in config[0] and '"precision": "fp32"' in config[0]
    # which decoder produced each result is part of its provenance: the RLE and JPEG 2000 copies went through
    # imagecodecs, the uncompressed files were read straight from the file
    decoders = dict(query(settings, "select file_path, decoder from findings where rank = 1"))
    assert decoders[str(files["mono1"].resolve())] == "native"
    assert all("imagecodecs" in decoders[str(files[k].resolve())] for k in ("j2k", "rle"))


def test_monochrome1_and_monochrome2_twin_agree_end_to_end(first_run, archive):
    settings, _ = first_run
    _, files = archive
    a, b = probs(settings, files["mono1"]), probs(settings, files["mono2"])
    assert a.keys() == b.keys()
    assert all(abs(a[k] - b[k]) < 1e-5 for k in a)


def test_lossless_compressed_and_uncompressed_copies_give_identical_results(first_run, archive):
    settings, _ = first_run
    _, files = archive
    ref = probs(settings, files["mono1"])
    for key in ("rle", "j2k"):
        got = probs(settings, files[key])
        assert all(abs(got[k] - ref[k]) < 1e-6 for k in ref), key


@pytest.mark.parametrize(("key", "status", "reason"), [
    ("duplicate", "duplicate", "same SOP Instance UID as"),
    ("ct", "skipped", "Modality 'CT' is not screened"),
    ("mr", "skipped", "no trained checkpoint for mri-us-efficientnet-b4"),
    ("extremity", "skipped", "BodyPartExamined 'EXTREMITY' is not CHEST"),
    ("empty", "failed", "empty file"),
    ("text", "skipped", "not a DICOM file"),
    ("truncated", "failed", "could not be decoded"),
    ("nopixels", "failed", "no Pixel Data"),
    ("huge", "failed", "50000x50000 = 2,500,000,000 pixels per frame exceeds the limit"),
    ("undecodable", "failed", "could not be decoded (transfer syntax MPEG2"),
    ("colour_dx", "failed", "mean saturation"),
])
def test_bad_input_gets_a_reason_and_does_not_stop_the_run(first_run, archive, key, status, reason):
    settings, _ = first_run
    _, files = archive
    got_status, got_reason = status_of(settings, files[key])
    assert got_status == status
    assert reason in got_reason


def test_rerun_adds_no_rows_and_changes_no_results(first_run, archive, models):
    settings, _ = first_run
    root, _ = archive
    before = query(settings, "select * from findings order by sop_instance_uid, label")
    status_before = query(settings, "select * from ingest_status order by file_path")
    report = run_folder(root, settings, pipeline=_pipeline(models, settings))
    assert report.screened == 0 and report.scan.unchanged == report.scan.seen
    assert query(settings, "select * from findings order by sop_instance_uid, label") == before
    assert query(settings, "select * from ingest_status order by file_path") == status_before


def _neuron(*args, env=None, timeout=300, unset=()):
    full = {k: v for k, v in os.environ.items() if k not in unset}
    return subprocess.run([sys.executable, "-m", "neuron", *args], capture_output=True, text=True, timeout=timeout,
                          env={**full, "COLUMNS": "250", **(env or {})})


def test_cli_help_reads_well():
    res = _neuron("run", "--help")
    assert res.returncode == 0
    for flag in ("--weights", "--device", "--batch-size", "--no-tta", "--top-k", "--out", "--db"):
        assert flag in res.stdout


def test_cli_missing_weights_exits_4_with_the_fix(tmp_path, chest_small):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(chest_small, folder / "a.dcm")
    res = _neuron("run", str(folder), "--out", str(tmp_path / "out"), "--xrv-cache-dir", str(tmp_path / "w"),
                  env={"NEURON_ALLOW_DOWNLOAD": "0"})
    assert res.returncode == 4, res.stderr
    assert "NEURON_XRV_CACHE_DIR" in res.stderr and "--weights untrained" in res.stderr


def test_cli_run_exit_codes_and_summary(tmp_path, chest_small):
    """Also: nothing is written outside the output folder, not even by a dependency into the temp or home folder."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(chest_small, folder / "a.dcm")
    elsewhere = {"TMPDIR": tmp_path / "tmp", "HOME": tmp_path / "home"}
    for path in elsewhere.values():
        path.mkdir()
    env = {k: str(v) for k, v in elsewhere.items()}
    # torch sets the first in this process when timm loads; loading a model on ONNX Runtime sets the last here
    unset = ("TORCHINDUCTOR_CACHE_DIR", "MPLCONFIGDIR", "ORT_DISABLE_TELEMETRY")
    res = _neuron("run", str(folder), "--out", str(tmp_path / "out"), "--weights", "untrained", "--no-tta", env=env,
                  unset=unset)
    assert res.returncode == 0, res.stderr
    assert "untrained" in res.stderr and "done" in res.stderr
    (folder / "broken.dcm").write_bytes(b"DICM" * 10)
    (folder / "zero.dcm").write_bytes(b"")
    res = _neuron("run", str(folder), "--out", str(tmp_path / "out"), "--weights", "untrained", "--no-tta", env=env,
                  unset=unset)
    assert res.returncode == 3, res.stderr
    assert "empty file" in res.stderr
    assert {name: sorted(p.iterdir()) for name, p in elsewhere.items()} == {name: [] for name in elsewhere}
    assert sorted(p.name for p in folder.iterdir()) == ["a.dcm", "broken.dcm", "zero.dcm"]


def test_a_corrupt_first_copy_does_not_hide_a_good_duplicate(tmp_path, chest_small, untrained_settings, models):
    folder = tmp_path / "in"
    folder.mkdir()
    raw = chest_small.read_bytes()
    (folder / "a_corrupt.dcm").write_bytes(raw[: len(raw) - 5000])  # same SOP Instance UID, found first
    shutil.copy(chest_small, folder / "b_good.dcm")
    settings = untrained_settings.with_(out_dir=tmp_path / "out")
    run_folder(folder, settings, pipeline=_pipeline(models, settings))
    status, reason = status_of(settings, folder / "a_corrupt.dcm")
    assert status == "failed" and "could not be decoded" in reason and "b_good.dcm was screened instead" in reason
    assert status_of(settings, folder / "b_good.dcm") == ("done", None)
    assert len(probs(settings, folder / "b_good.dcm")) == N_LABELS


def test_hostile_uids_are_failed_with_the_reason_and_nothing_is_written_outside(tmp_path, chest_small,
                                                                                untrained_settings, models):
    """Path-like UIDs are not valid DICOM UIDs: each file is failed with the value's problem (never altered into a
    different UID, never screened), and nothing lands outside the output folder."""
    folder, out = tmp_path / "in", tmp_path / "out"
    hostile = ["../../../../etc/neuron_evil", "/tmp/neuron_evil", "..\\..\\x", "a/../../b"]
    for i, uid in enumerate(hostile):
        small_chest(chest_small, folder / f"f{i}.dcm", step=2, SOPInstanceUID=uid, StudyInstanceUID=uid,
                    SeriesInstanceUID=uid)
    before = {p for p in tmp_path.parent.rglob("*")}
    settings = untrained_settings.with_(out_dir=out)
    run_folder(folder, settings, pipeline=_pipeline(models, settings))
    new = {p for p in tmp_path.parent.rglob("*")} - before
    assert new and all(out in p.parents or p == out for p in new), sorted(map(str, new - {out}))
    assert not Path("/etc/neuron_evil").exists() and not Path("/tmp/neuron_evil").exists()
    for i, uid in enumerate(hostile):
        status, reason = status_of(settings, folder / f"f{i}.dcm")
        assert status == "failed" and f"SOP Instance UID (0008,0018) {uid!r} is not a valid DICOM UID" in reason
    assert query(settings, "select count(*) from findings")[0][0] == 0
