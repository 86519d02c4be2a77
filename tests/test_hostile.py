"""Hostile and broken input : fuzzed DICOMs, symbolic links, hostile names and UIDs, patient data.

The fuzz test reads thousands of seeded mutations of real files (tests/fuzz.py) through the header pass and the
decoders in child processes (a hang is cut at a per-file timeout, a crash is caught, peak RSS is measured), then sends
the first few hundred, under hostile file names, through a real `neuron run` with every route loaded (the MR/US and
skin routes get tiny untrained-but-saved checkpoints) and checks that every file is accounted for. The patient-data
test plants a unique marker in every patient-module attribute and searches everything a run leaves behind.
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from neuron.errors import ConfigError, DecodeError
from neuron.settings import Settings
from producer.scan import iter_files
from worker.decode import decode_instance

from . import fuzz
from .conftest import seed_untrained_cache

pytestmark = pytest.mark.timeout(600)
EXIT_SOME_FAILED = 3  # neuron run's exit status when some instances failed (neuron_cli/common.py)

# Decoders the fuzzed files must have gone through (a prefix of DecodedFrame.decoder), so a seed that silently stops
# decoding is noticed: the native reader, imagecodecs per syntax, pydicom's plugins and pydicom itself.
DECODERS = ("native", "imagecodecs-", "pylibjpeg-libjpeg", "pydicom-")
IMAGECODECS = ("jpeg2k", "jpegls", "ljpeg", "dicomrle")
HOSTILE_NAMES = ["..", "-rf", " lead space", "new\nline", "tab\there", "ü-ñ-日本", "x" * 200, "semi;colon",
                 "quote'\"", "$(touch pwned)", "back\\slash", "%s%n", ".hidden"]


# -- fixtures -------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory, test_files_dir, data_dir):
    n = int(fuzz.MUTATIONS * fuzz.scale())
    started = time.monotonic()
    results = fuzz.run_cases(list(range(n)), tmp_path_factory.mktemp("fuzz"), test_files_dir, data_dir)
    return results, time.monotonic() - started


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """Tiny checkpoints (untrained, 64 px) for the MR/US and skin routes, so their files are decoded and screened."""
    from neuron_models.checkpoint import save_checkpoint
    from neuron_models.effnet import DEFAULT_CLASSES, MRI_US_CONFIG, SKIN_CONFIG, build_untrained

    folder = tmp_path_factory.mktemp("models")
    for config, classes in ((MRI_US_CONFIG, DEFAULT_CLASSES), (SKIN_CONFIG, ("disk", "ring", "stripes"))):
        net = build_untrained(config, tuple(classes), 64).net
        save_checkpoint(folder / f"{config.route.value}-v1", net.state_dict(), {
            "model": config.name, "class_names": list(classes), "preprocessing": {"input_size": 64},
            "training": {"drop_rate": 0.0}})
    return folder


@pytest.fixture
def out_dir(tmp_path, models, untrained_settings) -> Path:
    """An output folder holding the calibrated untrained chest model the session's engine already built, so a
    `neuron run` starts in seconds."""
    out = tmp_path / "out"
    seed_untrained_cache(untrained_settings, out)
    return out


def neuron_run(folder: Path, out: Path, *extra: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEURON_")}
    env.update(COLUMNS="200", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "neuron", "run", str(folder), "--out", str(out), "--weights",
                           "untrained", "--device", "cpu", "--no-tta", "--batch-size", "16", "-v", *extra],
                          capture_output=True, text=True, env=env, timeout=timeout)


def rows(db: Path, query: str) -> list[tuple]:
    with sqlite3.connect(db) as conn:
        return conn.execute(query).fetchall()


def tree(folder: Path) -> dict[str, int]:
    return {str(p): p.lstat().st_size for p in folder.rglob("*")}


# -- fuzz -----------------------------------------------------------------------------------------------------------

def test_fuzzed_files_never_crash_hang_or_grow_the_readers(fuzzed):
    """Every mutation gets a status from the header pass or the decoders, with a reason unless it decoded; nothing
    raises a raw exception, hangs past the per-file timeout, kills the reader or is called transient; RSS stays
    bounded; and the decoded ones went through every decoder (so the seeds really exercise them)."""
    results, seconds = fuzzed
    n = int(fuzz.MUTATIONS * fuzz.scale())
    findings = [f"{r.case}: {r.finding}" for r in results if r.finding]
    counts = Counter((r.stage, r.status) for r in results)
    peak = max(r.peak_rss_mb for r in results)
    slowest = max(results, key=lambda r: r.seconds)
    print(f"\nfuzz: {n} cases (seed {fuzz.SEED}) in {seconds:.1f} s; {dict(counts)}; peak reader RSS {peak:.0f} MB; "
          f"slowest {slowest.seconds:.2f} s ({slowest.case})")
    assert not findings, "\n".join(findings[:20])
    assert len(results) == n and sorted(r.index for r in results) == list(range(n))
    assert {r.status for r in results} <= {"decoded", "failed", "skipped"}
    assert all(r.reason for r in results if r.status != "decoded")
    assert peak < fuzz.RSS_LIMIT_MB, f"reader peak RSS {peak:.0f} MB over {fuzz.RSS_LIMIT_MB} MB"
    assert slowest.seconds < fuzz.PER_FILE_TIMEOUT_S
    used = {d for r in results for d in r.decoders}
    for prefix in DECODERS:
        assert any(d.startswith(prefix) for d in used), (prefix, used)
    for codec in IMAGECODECS:
        assert any(d.startswith("imagecodecs-") and d.endswith(codec) for d in used), (codec, used)
    assert counts[("decode", "decoded")] > n // 20 and counts[("decode", "failed")] > n // 20


def test_a_fuzzed_archive_under_hostile_names_is_screened_with_every_file_recorded(
        tmp_path, out_dir, model_dir, fuzzed, test_files_dir, data_dir, chest_small):
    """A few hundred fuzzed files (small images, every route loaded), named as hostile file names and joined by
    files with hostile UIDs, through a real `neuron run`: it exits 0, every file is in ingest_status with a status
    and (unless done) a reason, nothing the readers refused is screened, every probability is a probability, every
    output stays under the output folder (heatmaps under heatmaps/) and the input folder is left as it was."""
    results = {r.index: r for r in fuzzed[0]}
    seeds = fuzz.build_seeds(test_files_dir, data_dir)
    archive = tmp_path / "archive"
    by_name: dict[str, int] = {}
    for i in range(fuzz.END_TO_END):
        case = fuzz.make_case(seeds, i)
        name = f"{HOSTILE_NAMES[i % len(HOSTILE_NAMES)]}-{i}" if i % 3 == 0 else f"{i:05d}.dcm"
        folder = archive / f"{i % 7}" if i % 2 else archive
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(case.data)
        by_name[str((folder / name).resolve())] = i
    hostile_uids = ["../../../../tmp/neuron_evil", "1.2.3/../../x", "1.2.3\\..\\..\\x", "1." + "9" * 80,
                    "1.2.3.4\nINFO forged log line", "%2e%2e%2f1.2"]
    for k, uid in enumerate(hostile_uids):
        ds = pydicom.dcmread(chest_small)
        ds.SOPInstanceUID = uid
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(archive / f"uid-{k}.dcm")
    before = tree(archive)
    started = time.monotonic()
    res = neuron_run(archive, out_dir, "--model-dir", str(model_dir))
    seconds = time.monotonic() - started
    assert res.returncode == EXIT_SOME_FAILED, res.stderr[-3000:]
    # pydicom logs its plugins' failures with a traceback under -v; none may come from Neuron's own code
    ours = re.compile(r'File "[^"]*/(neuron|neuron_models|producer|worker|db)/[^"]*\.py"')
    assert not ours.search(res.stderr), res.stderr[-3000:]
    db = out_dir / "neuron.db"
    status = rows(db, "select file_path, status, reason from ingest_status")
    print(f"\nneuron run over {len(before)} fuzzed/hostile files in {seconds:.1f} s: "
          f"{dict(Counter(s for _, s, _ in status))}")
    assert len(status) == len(by_name) + len(hostile_uids)
    assert {s for _, s, _ in status} <= {"done", "failed", "skipped", "duplicate"}
    assert all(reason for _, s, reason in status if s != "done"), [r for r in status if r[1] != "done" and not r[2]]
    for path, s, reason in status:
        if path in by_name:
            read = results[by_name[path]]
            if read.status != "decoded":  # refused by the header pass or the decoders in-process: never screened
                assert s in ("failed", "skipped"), (path, s, read)
        else:
            assert s == "failed" and "(0008,0018)" in reason, (path, s, reason)
    done_routes = {r for (r,) in rows(db, "select distinct i.route from instances i where i.status = 'done'")}
    assert done_routes == {"chest-xray", "mri-us", "skin"}, done_routes
    probs = rows(db, "select probability, heatmap_path from findings")
    assert probs and all(0.0 <= p <= 1.0 for p, _ in probs)
    heatmaps = (out_dir / "heatmaps").resolve()
    for _, hp in probs:
        if hp is not None:
            assert Path(hp).resolve().is_relative_to(heatmaps) and Path(hp).is_file(), hp
    for p in out_dir.rglob("*"):
        assert p.resolve().is_relative_to(out_dir.resolve()), p
    assert tree(archive) == before
    assert sorted(os.listdir(tmp_path)) == ["archive", "out"]


def test_a_malformed_pixel_attribute_is_a_decode_error_that_names_it(tmp_path, test_files_dir):
    """Fuzz case 'PixelRepresentation=2 + flip': a VR of two random bytes in group 0028 made pydicom raise
    NotImplementedError out of decode_instance (a raw exception, recorded as "unexpected error"); it is now a
    DecodeError that says what is broken and what to do."""
    data = bytearray((test_files_dir / "MR_small.dcm").read_bytes())
    at = data.find(b"\x28\x00\x03\x01US")  # Pixel Representation, explicit VR
    data[at + 4:at + 6] = b"U\x1b"
    path = tmp_path / "bad-vr.dcm"
    path.write_bytes(bytes(data))
    with pytest.raises(DecodeError, match=r"image pixel attributes \(group 0028\) are malformed.*re-export"):
        decode_instance(path, "1.2.3", 16, 1 << 26)


def test_a_malformed_display_attribute_is_a_decode_error_on_the_pydicom_path(tmp_path, test_files_dir):
    """The big-endian decode goes through pydicom; the display parameters read after it (here a Rescale Slope with a
    VR of two random bytes) used to raise out of decode_instance unconverted."""
    ds = pydicom.dcmread(test_files_dir / "MR_small_bigendian.dcm")
    ds.RescaleSlope = "1"
    buf = io.BytesIO()
    ds.save_as(buf)
    data = bytearray(buf.getvalue())
    at = data.find(b"\x00\x28\x10\x53DS")  # Rescale Slope, explicit VR big endian
    assert at > 0
    data[at + 4:at + 6] = b"D\x07"
    path = tmp_path / "bad-slope.dcm"
    path.write_bytes(bytes(data))
    with pytest.raises(DecodeError, match="could not be decoded"):
        decode_instance(path, "1.2.3", 16, 1 << 26)


# -- paths ----------------------------------------------------------------------------------------------------------

@pytest.fixture
def linked(tmp_path, chest_small) -> tuple[Path, Path]:
    """root/ with a real file, a folder loop, a file loop, links to a file and a folder outside root and a link to a
    file inside it."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    (outside / "deeper").mkdir(parents=True)
    shutil.copy(chest_small, root / "sub" / "a.dcm")
    shutil.copy(chest_small, outside / "x.dcm")
    shutil.copy(chest_small, outside / "deeper" / "y.dcm")
    (root / "sub" / "loop").symlink_to(root)                      # root/sub/loop -> root: a folder loop
    (root / "self").symlink_to(root / "self")                     # a link to itself
    (root / "to-outside-file.dcm").symlink_to(outside / "x.dcm")
    (root / "to-outside-folder").symlink_to(outside)
    (root / "to-a.dcm").symlink_to(root / "sub" / "a.dcm")
    (outside / "back").symlink_to(root)                           # a loop through outside
    return root, outside


def test_links_out_of_the_root_and_link_loops_are_not_followed_by_default(linked, caplog):
    root, outside = linked
    with caplog.at_level(logging.WARNING, logger="producer.scan"):
        found = list(iter_files(root))
    assert found == [root / "sub" / "a.dcm"]
    warned = "\n".join(r.getMessage() for r in caplog.records)
    for link in ("to-outside-file.dcm", "to-outside-folder", "self"):
        assert f"{root / link} leads out of the scanned folder" in warned and "NEURON_FOLLOW_LINKS=1" in warned
    assert str(root / "to-a.dcm") not in warned  # inside root: its target is scanned anyway


def test_follow_links_follows_them_out_of_the_root_once_each_and_ends_on_loops(linked):
    root, outside = linked
    assert Settings.from_env({"NEURON_FOLLOW_LINKS": "1"}).follow_links
    assert not Settings.from_env({}).follow_links
    with pytest.raises(ConfigError, match=r"NEURON_FOLLOW_LINKS='maybe' is not a boolean; use 1 or 0"):
        Settings.from_env({"NEURON_FOLLOW_LINKS": "maybe"})
    found = list(iter_files(root, follow_links=True))
    resolved = [p.resolve() for p in found]
    assert len(resolved) == len(set(resolved)) == 3
    assert set(resolved) == {root / "sub" / "a.dcm", outside / "x.dcm", outside / "deeper" / "y.dcm"}


# -- patient data ---------------------------------------------------------------------------------------------------

MARKERS = {  # attribute -> a value found nowhere else; dates are searched in both spellings
    "PatientName": "Zqxname^Patient", "PatientID": "ZQXPID4711", "PatientBirthDate": "18670907",
    "PatientBirthTime": "235959.123456", "OtherPatientIDs": "ZQXOTHERID", "OtherPatientNames": "Zqxother^Name",
    "PatientAddress": "ZQX 1 Marker Street", "PatientTelephoneNumbers": "ZQX+4400000",
    "PatientMotherBirthName": "Zqxmother^Name", "PatientComments": "ZQX patient comment", "EthnicGroup": "ZQXETHNIC",
    "IssuerOfPatientID": "ZQXISSUER", "MilitaryRank": "ZQXRANK",
    "InstitutionName": "ZQX Institution", "InstitutionAddress": "ZQX Institution Road",
    "ReferringPhysicianName": "Zqxreferrer^Doctor", "PerformingPhysicianName": "Zqxperformer^Doctor",
    "OperatorsName": "Zqxoperator^Name", "AccessionNumber": "ZQXACC0001", "StudyID": "ZQXSTUDY",
    "StudyDescription": "ZQX study description", "RequestingPhysician": "Zqxrequester^Doctor",
}


def planted(src: Path, dest: Path, k: int, **changes) -> Path:
    """A copy of src with a marker (numbered k, so every file's markers differ) in every patient attribute."""
    ds = pydicom.dcmread(src)
    for keyword, value in MARKERS.items():
        if value is not None:
            setattr(ds, keyword, value if keyword.endswith(("Date", "Time")) else f"{value}{k}")
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    for key, value in changes.items():
        setattr(ds, key, value)
    ds.save_as(dest, enforce_file_format=True)
    return dest


def test_no_patient_data_reaches_logs_file_names_or_the_database(tmp_path, out_dir, model_dir, chest_small,
                                                                 test_files_dir):
    """Good files and broken ones (truncated pixels, absurd sizes, an invalid UID, a skipped body part, a duplicate,
    an undecodable transfer syntax), each with markers in every patient-module attribute (and institution and
    physician names): after `neuron run -v`, no marker is in stdout or stderr, in any file name under the output
    folder, in any text value of any table, or anywhere in the database's bytes."""
    archive = tmp_path / "archive"
    archive.mkdir()
    planted(chest_small, archive / "good.dcm", 0)
    planted(test_files_dir / "MR_small.dcm", archive / "mr.dcm", 1)
    shutil.copy(archive / "good.dcm", archive / "copy-of-good.dcm")
    planted(chest_small, archive / "absurd.dcm", 2, Rows=65535, Columns=65535)
    planted(chest_small, archive / "hand.dcm", 3, BodyPartExamined="HAND")
    bad_uid = planted(chest_small, archive / "bad-uid.dcm", 4)
    ds = pydicom.dcmread(bad_uid)
    ds.SOPInstanceUID = "1.2.3.abc"  # echoed in its reason: a UID is no patient data
    ds.save_as(bad_uid)
    truncated = planted(chest_small, archive / "truncated.dcm", 5)
    truncated.write_bytes(truncated.read_bytes()[:-5000])
    mpeg = planted(test_files_dir / "MR_small.dcm", archive / "mpeg.dcm", 6)
    mpeg.write_bytes(fuzz.with_transfer_syntax(mpeg.read_bytes(), pydicom.uid.MPEG2MPML))
    cut = planted(chest_small, archive / "cut-header.dcm", 7)
    data = cut.read_bytes()
    cut.write_bytes(data[:data.find(b"Zqxname") + 3])  # the file ends inside the patient's name

    res = neuron_run(archive, out_dir, "--model-dir", str(model_dir))
    assert res.returncode == EXIT_SOME_FAILED, res.stderr[-3000:]
    db = out_dir / "neuron.db"
    statuses = Counter(s for (s,) in rows(db, "select status from ingest_status"))
    assert statuses["done"] == 2 and statuses["failed"] >= 4 and statuses["skipped"] == 1, statuses
    assert "INFO" in res.stderr  # -v did log

    needles = {v for v in MARKERS.values() if v} | {"1867-09-07", "ZQX", "Zqx"}
    texts = {"stdout": res.stdout, "stderr": res.stderr,
             "file names": "\n".join(str(p.relative_to(out_dir)) for p in out_dir.rglob("*"))}
    with sqlite3.connect(db) as conn:
        tables = [t for (t,) in conn.execute("select name from sqlite_master where type in ('table', 'view')")]
        texts["database values"] = "\n".join(str(v) for t in tables for row in conn.execute(f'select * from "{t}"')
                                             for v in row if isinstance(v, str))
    texts["database bytes"] = b"".join(p.read_bytes() for p in out_dir.glob("neuron.db*")).decode("latin-1")
    # The worklist keeps the accession number and study description, in the database only: they are taken
    # out of the database texts before the search, and must still appear nowhere else.
    kept = sorted((f"{MARKERS[k]}{i}" for k in ("AccessionNumber", "StudyDescription") for i in range(8)),
                  key=len, reverse=True)
    with sqlite3.connect(db) as conn:
        stored = {v for row in conn.execute("select accession_number, study_description from studies") for v in row}
    assert {"ZQXACC00010", "ZQX study description0"} <= stored
    for where in ("database values", "database bytes"):
        for value in kept:
            texts[where] = texts[where].replace(value, "")
    leaks = {(where, n) for where, text in texts.items() for n in needles if n in text}
    assert not leaks, sorted(leaks)
    assert len(texts["database values"]) > 1000  # the search looked at real content


def test_fuzz_cases_are_a_pure_function_of_seed_and_index(test_files_dir, data_dir):
    seeds = fuzz.build_seeds(test_files_dir, data_dir)
    a, b = fuzz.make_case(seeds, 41), fuzz.make_case(seeds, 41)
    assert a.data == b.data and str(a) == str(b)
    assert fuzz.make_case(seeds, 42).data != a.data
    assert len({fuzz.make_case(seeds, i).sop_instance_uid for i in range(50)}) == 50
    assert np.mean([len(fuzz.make_case(seeds, i).data) for i in range(50)]) < 40_000  # small images only


def test_non_finite_display_values_are_refused_with_a_reason_and_never_stop_a_batch(tmp_path, chest_small):
    """The end-to-end fuzz found it: a frame whose display values were NaN (a 'NaN' window, an infinite slope) made
    CLAHE's range assertion stop the whole `neuron run` (exit 1). Now the decoder refuses an unusable rescale, drops an
    unusable window (the image's range decides, as with no window), and the device rejects any frame that still
    overflows float32 with a reason, while the other frames of the batch are screened."""
    import torch

    from neuron_models.image import DecodedFrame, PixelParams, Window
    from neuron_models.preprocess import PreprocessConfig, Preprocessor

    slope = tmp_path / "slope.dcm"
    ds = pydicom.dcmread(chest_small)
    ds.RescaleSlope, ds.RescaleIntercept = "inf", "0"
    ds.save_as(slope)
    with pytest.raises(DecodeError, match=r"RescaleSlope inf .* not finite 32-bit numbers.*re-export"):
        decode_instance(slope, "1.2.3", 16, 1 << 26)
    window = tmp_path / "window.dcm"
    ds = pydicom.dcmread(chest_small)
    ds.WindowCenter, ds.WindowWidth = "NaN", "400"
    ds.save_as(window)
    assert decode_instance(window, "1.2.3", 16, 1 << 26)[0].params.window is None

    pixels = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    good = DecodedFrame("1", 0, pixels, PixelParams("MONOCHROME2", False, 12, window=Window(2048, 4096)), "native")
    bad = DecodedFrame("2", 0, pixels, PixelParams("MONOCHROME2", False, 12, slope=3e38, intercept=-3e38), "native")
    cfg = PreprocessConfig(input_size=32, channels=1, clahe=True, clahe_size=64)
    prepared = Preprocessor(cfg, torch.device("cpu")).prepare([good, bad])
    assert prepared.rejected.tolist() == [False, True] and torch.isfinite(prepared.x).all()
    reasons = prepared.rejections(prepared.rejected.numpy(), prepared.saturation.numpy(), 30.0)
    assert list(reasons) == [1] and "not finite numbers" in reasons[1].reason and "re-export" in reasons[1].reason
