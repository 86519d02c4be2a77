"""One scenario table, both modes: the same archive through `neuron run` (embedded, SQLite) and through `neuron scan` +
one `neuron worker` process (Redis, PostgreSQL) ends in the same `findings` and `ingest_status`, row for row.

Each scenario is a small builder that writes a few files derived from real DICOMs into its own folder of one archive,
with the status (and a phrase of the reason) each file must end in. Both modes run the same passes over the same
folder: a first pass, a re-run that must add nothing, and, after one broken file is repaired in place (same size and
mtime, as a restore from backup leaves it), a `--retry-failed` pass. A behaviour that exists in one mode and not the
other is a defect.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
import pytest
import redis
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import JPEG2000Lossless, RLELossless, generate_uid

from .conftest import monochrome2_twin, seed_untrained_cache
from .test_distributed import neuron, sql, start_worker, stop, wait_until

pytestmark = pytest.mark.timeout(400)

N_LABELS = 18
MAX_FRAMES = 4  # the frame cap, under the multi-frame scenario's 10 frames
# the same settings in both modes; TTA, CLAHE (clip, grid) and heatmap top-k stay at their defaults
SETTINGS = ("--device", "cpu", "--weights", "untrained", "--batch-size", "4", "--max-frames", str(MAX_FRAMES))


@dataclass(frozen=True)
class Sources:
    chest: Path  # chest_small: a real CR chest radiograph, MONOCHROME1, uncompressed
    data_dir: Path
    test_files_dir: Path

    def variant(self, dest: Path, study: str, **changes) -> Path:
        """A copy of the chest radiograph as a new instance of ``study``, with ``changes`` applied."""
        ds = pydicom.dcmread(self.chest)
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = generate_uid()
        for key, value in changes.items():
            setattr(ds, key, value)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID if len(ds.SOPInstanceUID) <= 64 else "1.2.3"
        dest.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(dest, enforce_file_format=False)
        return dest


Expect = dict[str, tuple[str, str | None]]  # file name -> (status, a phrase its reason holds; None: no reason;
# "": any reason)


@dataclass(frozen=True)
class Scenario:
    name: str
    build: Callable[[Path, Sources], None]
    expect: Expect  # after the first pass (and the re-run)
    fix: Callable[[Path], None] | None = None  # repairs a file in place before the --retry-failed pass
    after_retry: Expect = field(default_factory=dict)  # what changes with the retry pass


def duplicates(d: Path, src: Sources) -> None:
    a = src.variant(d / "a.dcm", generate_uid())
    shutil.copy(a, d / "b_copy.dcm")


def corrupt_first_copy(d: Path, src: Sources) -> None:
    good = src.variant(d / "b_good.dcm", generate_uid())
    raw = good.read_bytes()
    (d / "a_corrupt.dcm").write_bytes(raw[: len(raw) - 5000])  # same SOP Instance UID, sorts first
    alone = src.variant(d / "c_truncated_alone.dcm", generate_uid())
    raw = alone.read_bytes()
    alone.write_bytes(raw[: len(raw) - 5000])  # no other copy: stays failed, also after --retry-failed


def monochrome_twins(d: Path, src: Sources) -> None:
    mono1 = src.variant(d / "mono1.dcm", generate_uid())
    monochrome2_twin(mono1, d / "mono2.dcm")


def lossless(d: Path, src: Sources) -> None:
    study = generate_uid()
    for uid, name in ((RLELossless, "rle.dcm"), (JPEG2000Lossless, "j2k.dcm")):
        ds = pydicom.dcmread(src.variant(d / name, study))
        ds.compress(uid, encoding_plugin="pylibjpeg" if uid == JPEG2000Lossless else "")
        ds.save_as(d / name)


def multi_frame(d: Path, src: Sources) -> None:
    """A real 10-frame enhanced MR (RLE) labelled a chest DX, so it reaches a model and the frame cap applies:
    --max-frames 4 screens frames 0, 3, 6 and 9 in both modes."""
    ds = pydicom.dcmread(src.data_dir / "emri_small_RLE.dcm")
    ds.Modality, ds.BodyPartExamined = "DX", "CHEST"
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(d / "frames10.dcm", enforce_file_format=True)


LONG_UID = "1.2.826.0.1.3680043.8.498." + "1" * 38  # 64 characters: the limit
assert len(LONG_UID) == 64


def hostile_uids(d: Path, src: Sources) -> None:
    study = generate_uid()
    src.variant(d / "long_a.dcm", study, SOPInstanceUID=LONG_UID + ".1")  # share their first 64 characters
    src.variant(d / "long_b.dcm", study, SOPInstanceUID=LONG_UID + ".2")
    src.variant(d / "letters.dcm", study, SOPInstanceUID="1.2.abc.4")
    src.variant(d / "traversal.dcm", study, SOPInstanceUID="../../../../etc/neuron_evil")
    ds = pydicom.dcmread(src.variant(d / "bad_study.dcm", study))
    ds.StudyInstanceUID = "1..2"
    ds.save_as(d / "bad_study.dcm")
    src.variant(d / "at_limit.dcm", study, SOPInstanceUID=LONG_UID)  # exactly 64: valid, screened
    src.variant(d / "nul_body_part.dcm", study, BodyPartExamined="CH\x00EST")  # PostgreSQL refuses a NUL in text
    src.variant(d / "huge_frames.dcm", study, NumberOfFrames="9999999999")  # over PostgreSQL's integer
    with_transfer_syntax(src.variant(d / "long_ts.dcm", study), "1.2.840.10008.1.2.1.99" + ".9" * 30)
    with_transfer_syntax(src.variant(d / "nul_ts.dcm", study), "1.2.840.10008.1.2.1.9\x009")  # in the decode error


def with_transfer_syntax(path: Path, uid: str) -> None:
    """Rewrite the file meta with a Transfer Syntax UID pydicom will not write (too long, unknown); the data set
    stays explicit VR little endian."""
    raw, meta = path.read_bytes(), pydicom.dcmread(path).file_meta
    end = 132 + 12 + int(meta.FileMetaInformationGroupLength)
    meta.TransferSyntaxUID = uid
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_file_meta_info(buf, meta, enforce_standard=True)
    path.write_bytes(raw[:132] + buf.getvalue() + raw[end:])


def no_model(d: Path, src: Sources) -> None:
    shutil.copy(src.test_files_dir / "MR_small.dcm", d / "mr.dcm")
    shutil.copy(src.test_files_dir / "ExplVR_BigEnd.dcm", d / "us.dcm")
    ds = pydicom.dcmread(src.data_dir / "SC_rgb.dcm")
    ds.Modality, ds.SOPInstanceUID = "XC", generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(d / "skin.dcm")
    shutil.copy(src.test_files_dir / "CT_small.dcm", d / "ct.dcm")
    src.variant(d / "hand.dcm", generate_uid(), BodyPartExamined="HAND")


def not_dicom(d: Path, src: Sources) -> None:
    (d / "notes.txt").write_text("radiology report, not an image")
    (d / "empty.dcm").write_bytes(b"")


def broken_then_fixed(d: Path, src: Sources) -> None:
    """A JPEG 2000 radiograph whose code stream start is damaged, same size and mtime as the good file it will be
    restored to: a re-scan sees it unchanged, only --retry-failed screens it again."""
    path = d / "restored.dcm"
    ds = pydicom.dcmread(src.variant(path, generate_uid()))
    ds.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg")
    ds.save_as(path)
    good = path.read_bytes()
    at = good.index(b"\xff\x4f\xff\x51")  # SOC + SIZ markers of the code stream
    (d.parent.parent / f"{d.name}.good").write_bytes(good)  # kept outside the archive until the fix
    mtime = path.stat().st_mtime_ns
    path.write_bytes(good[:at] + b"\x00" * 16 + good[at + 16:])
    os.utime(path, ns=(mtime, mtime))


def restore(d: Path) -> None:
    path = d / "restored.dcm"
    st = path.stat()
    good = (d.parent.parent / f"{d.name}.good").read_bytes()
    assert len(good) == st.st_size
    path.write_bytes(good)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


HOSTILE_UID = "not a valid DICOM UID"
TRAIN = "neuron train"

SCENARIOS = [
    Scenario("duplicates", duplicates, {"a.dcm": ("done", None), "b_copy.dcm": ("duplicate", "same SOP Instance UID")}),
    Scenario("corrupt-first-copy", corrupt_first_copy, {
        "a_corrupt.dcm": ("failed", "b_good.dcm was screened instead"), "b_good.dcm": ("done", None),
        "c_truncated_alone.dcm": ("failed", "could not be decoded")}),
    Scenario("monochrome", monochrome_twins, {"mono1.dcm": ("done", None), "mono2.dcm": ("done", None)}),
    Scenario("lossless", lossless, {"rle.dcm": ("done", None), "j2k.dcm": ("done", None)}),
    Scenario("multi-frame", multi_frame, {"frames10.dcm": ("done", None)}),
    Scenario("hostile-uids", hostile_uids, {
        "long_a.dcm": ("failed", "over the limit of 64"), "long_b.dcm": ("failed", "over the limit of 64"),
        "letters.dcm": ("failed", HOSTILE_UID), "traversal.dcm": ("failed", HOSTILE_UID),
        "bad_study.dcm": ("failed", "Study Instance UID"), "at_limit.dcm": ("done", None),
        "nul_body_part.dcm": ("skipped", "BodyPartExamined 'CH\\X00EST' is not CHEST"),
        "huge_frames.dcm": ("failed", "Number of Frames (0028,0008) 9999999999"),
        "long_ts.dcm": ("failed", "UID is not a transfer syntax"),
        "nul_ts.dcm": ("failed", "transfer syntax 1.2.840.10008.1.2.1.9\\x009")}),
    Scenario("no-model", no_model, {
        "mr.dcm": ("skipped", TRAIN), "us.dcm": ("skipped", TRAIN), "skin.dcm": ("skipped", TRAIN),
        "ct.dcm": ("skipped", "Modality 'CT' is not screened"), "hand.dcm": ("skipped", "is not CHEST")}),
    Scenario("not-dicom", not_dicom, {"notes.txt": ("skipped", "not a DICOM file"), "empty.dcm": ("failed", "empty")}),
    Scenario("retry-failed", broken_then_fixed, {"restored.dcm": ("failed", "could not be decoded")},
             fix=restore, after_retry={"restored.dcm": ("done", None)}),
]


# -- running one mode --------------------------------------------------------------------------------------------


def embedded_env() -> dict[str, str]:
    """The plain environment: no database or broker URL, so `neuron run` uses its own SQLite database."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("NEURON_")}, "COLUMNS": "200"}


def neuron_run(folder: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    res = subprocess.run([sys.executable, "-m", "neuron", "run", str(folder), "--out", str(out), *SETTINGS, *extra],
                         env=embedded_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode in (0, 3), res.stderr[-3000:]
    return res


def drained(env) -> bool:
    """Nothing left to do: no instance pending or queued, no message waiting or unacknowledged (a task that
    moves a failed instance to its good copy holds its message until that copy is committed)."""
    if sql(env, "select count(*) from instances where status in ('pending', 'queued')")[0][0]:
        return False
    broker = redis.Redis.from_url(env["NEURON_BROKER_URL"])
    return not broker.hlen("unacked") and not any(broker.llen(q) for q in ("chest-xray", "mri-us", "skin"))


def neuron_scan(env, folder: Path, *extra: str, worker: subprocess.Popen) -> str:
    res = neuron(env, "scan", str(folder), *extra)
    assert res.returncode == 0, res.stderr[-3000:]
    wait_until(lambda: drained(env), 240, "the worker to finish the scan's tasks", [worker])
    return res.stderr


# -- reading and comparing results ------------------------------------------------------------------------------

FINDINGS = ("select study_instance_uid, series_instance_uid, sop_instance_uid, frame, modality, file_path, model, "
            "weights, label, probability, uncertainty, rank, heatmap_path, preprocessing, untrained, positive, "
            "needs_review, decoder, processed_at from findings")
INGEST = "select file_path, sop_instance_uid, status, reason from ingest_status"


@dataclass
class Snapshot:
    findings: dict[tuple, dict]
    ingest: dict[str, tuple]


def snapshot(rows_findings, rows_ingest, heatmaps: Path) -> Snapshot:
    cols = FINDINGS.removeprefix("select ").split(" from ")[0].split(", ")
    findings = {}
    for row in rows_findings:
        r = dict(zip(cols, row, strict=True))
        if r["heatmap_path"] is not None:  # same file name under each mode's own heatmap folder
            r["heatmap_path"] = str(Path(r["heatmap_path"]).relative_to(heatmaps))
        r["untrained"], r["positive"], r["needs_review"] = bool(r["untrained"]), bool(r["positive"]), \
            bool(r["needs_review"])
        key = (r["sop_instance_uid"], r["frame"], r["label"])
        assert key not in findings, f"two findings rows for {key}"
        findings[key] = r
    ingest = {r[0]: tuple(r[1:]) for r in rows_ingest}
    assert len(ingest) == len(rows_ingest)
    return Snapshot(findings, ingest)


def embedded_snapshot(out: Path) -> Snapshot:
    with sqlite3.connect(out / "neuron.db") as conn:
        return snapshot(conn.execute(FINDINGS).fetchall(), conn.execute(INGEST).fetchall(), out / "heatmaps")


def distributed_snapshot(env) -> Snapshot:
    return snapshot(sql(env, FINDINGS), sql(env, INGEST), Path(env["NEURON_OUT"]) / "heatmaps")


def assert_same(embedded: Snapshot, distributed: Snapshot, when: str) -> None:
    """Row for row; probabilities and uncertainties within 1e-5, everything else exact, timestamps and worker names
    left out (the findings view's ``worker`` column is not read)."""
    assert embedded.ingest == distributed.ingest, f"{when}: ingest_status differs: " + "; ".join(
        f"{p}: embedded {embedded.ingest.get(p)} distributed {distributed.ingest.get(p)}"
        for p in sorted(set(embedded.ingest) | set(distributed.ingest))
        if embedded.ingest.get(p) != distributed.ingest.get(p))
    assert embedded.findings.keys() == distributed.findings.keys(), (
        f"{when}: findings for different (instance, frame, label): only embedded "
        f"{sorted(embedded.findings.keys() - distributed.findings.keys())[:5]}, only distributed "
        f"{sorted(distributed.findings.keys() - embedded.findings.keys())[:5]}")
    for key, e in embedded.findings.items():
        d = distributed.findings[key]
        for col in ("probability", "uncertainty"):
            assert abs(e[col] - d[col]) <= 1e-5, f"{when}: {col} of {key}: embedded {e[col]} distributed {d[col]}"
        exact = {c for c in e if c not in ("probability", "uncertainty", "processed_at")}
        diff = {c: (e[c], d[c]) for c in exact if e[c] != d[c]}
        assert not diff, f"{when}: {key} differs (embedded, distributed): {diff}"


def scenario_of(root: Path, path: str) -> str:
    return Path(path).relative_to(root).parts[0]


def counts_table(root: Path, snaps: dict[str, Snapshot]) -> str:
    """Files per scenario and status, one column per mode and pass."""
    counts = {k: Counter((scenario_of(root, p), row[1]) for p, row in s.ingest.items()) for k, s in snaps.items()}
    statuses = ("done", "failed", "skipped", "duplicate", "pending", "queued")
    lines = [f"{'scenario':<20} {'pass':<28} " + " ".join(f"{s:>9}" for s in statuses) + f" {'findings':>9}"]
    for sc in SCENARIOS:
        for k, snap in snaps.items():
            n_findings = sum(1 for r in snap.findings.values() if scenario_of(root, r["file_path"]) == sc.name)
            lines.append(f"{sc.name:<20} {k:<28} " + " ".join(f"{counts[k][(sc.name, s)]:>9}" for s in statuses)
                         + f" {n_findings:>9}")
    return "\n".join(lines)


def check_expectations(root: Path, snap: Snapshot, retried: bool) -> None:
    for sc in SCENARIOS:
        expect = {**sc.expect, **(sc.after_retry if retried else {})}
        got = {Path(p).name: row for p, row in snap.ingest.items() if scenario_of(root, p) == sc.name}
        assert got.keys() == expect.keys(), f"{sc.name}: files {sorted(got)} != {sorted(expect)}"
        for name, (status, phrase) in expect.items():
            _, got_status, reason = got[name]
            assert got_status == status, f"{sc.name}/{name}: {got_status} ({reason}), expected {status}"
            assert (reason is None) if phrase is None else (reason is not None and phrase in reason), \
                f"{sc.name}/{name}: reason {reason!r} should hold {phrase!r}"
    frames = {r["frame"] for r in snap.findings.values() if Path(r["file_path"]).name == "frames10.dcm"}
    assert frames == {0, 3, 6, 9}, sorted(frames)  # evenly spaced, first and last
    screened = {r["sop_instance_uid"] for r in snap.findings.values()}
    for key in snap.findings:
        assert sum(1 for k in snap.findings if k[:2] == key[:2]) == N_LABELS
    heat = Counter((r["sop_instance_uid"], r["frame"]) for r in snap.findings.values() if r["heatmap_path"])
    assert set(heat.values()) == {1} and len(heat) == len({k[:2] for k in snap.findings}), "one heatmap per frame"
    assert screened == {row[0] for row in snap.ingest.values() if row[1] == "done"}


# -- the test ----------------------------------------------------------------------------------------------------


@pytest.fixture
def archive(tmp_path, chest_small, data_dir, test_files_dir) -> Path:
    root = tmp_path / "archive"
    src = Sources(chest_small, data_dir, test_files_dir)
    for sc in SCENARIOS:
        (root / sc.name).mkdir(parents=True)
        sc.build(root / sc.name, src)
    return root


def test_every_scenario_ends_the_same_in_the_embedded_and_the_distributed_mode(
        env, tmp_path, archive, untrained_settings, models):
    root = archive
    emb_out, dist_out = tmp_path / "embedded", Path(env["NEURON_OUT"])
    seed_untrained_cache(untrained_settings, emb_out, dist_out)
    snaps: dict[str, Snapshot] = {}
    timings: dict[str, float] = {}

    # the worker loads its models while the embedded passes run (it has nothing to do until the scan)
    worker = start_worker(env, tmp_path, "worker", *SETTINGS)  # later flags win over start_worker's own
    try:
        t0 = time.monotonic()
        neuron_run(root, emb_out)
        timings["embedded first pass"] = time.monotonic() - t0
        snaps["embedded first"] = first = embedded_snapshot(emb_out)
        t0 = time.monotonic()
        res = neuron_run(root, emb_out)
        timings["embedded re-run"] = time.monotonic() - t0
        assert "screened 0 instances" in res.stderr, res.stderr[-2000:]
        snaps["embedded re-run"] = embedded_snapshot(emb_out)
        assert snaps["embedded re-run"].findings == first.findings  # not even processed_at moved
        assert snaps["embedded re-run"].ingest == first.ingest

        t0 = time.monotonic()
        neuron_scan(env, root, worker=worker)
        timings["distributed first pass"] = time.monotonic() - t0
        snaps["distributed first"] = first_d = distributed_snapshot(env)
        t0 = time.monotonic()
        log = neuron_scan(env, root, worker=worker)
        timings["distributed re-run"] = time.monotonic() - t0
        assert "enqueued 0 study tasks" in log, log[-2000:]
        snaps["distributed re-run"] = distributed_snapshot(env)
        assert snaps["distributed re-run"].findings == first_d.findings
        assert snaps["distributed re-run"].ingest == first_d.ingest

        for sc in SCENARIOS:
            if sc.fix is not None:
                sc.fix(root / sc.name)
        t0 = time.monotonic()
        neuron_run(root, emb_out, "--retry-failed")
        timings["embedded --retry-failed"] = time.monotonic() - t0
        snaps["embedded retry"] = embedded_snapshot(emb_out)
        t0 = time.monotonic()
        neuron_scan(env, root, "--retry-failed", worker=worker)
        timings["distributed --retry-failed"] = time.monotonic() - t0
        snaps["distributed retry"] = distributed_snapshot(env)
    finally:
        stop(worker)
    print("\n" + counts_table(root, snaps))
    print("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))

    check_expectations(root, snaps["embedded first"], retried=False)
    assert_same(snaps["embedded first"], snaps["distributed first"], "first pass")
    check_expectations(root, snaps["embedded retry"], retried=True)
    assert_same(snaps["embedded retry"], snaps["distributed retry"], "after --retry-failed")
