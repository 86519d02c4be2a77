"""Finding files by content, header-only indexing, routing and duplicate handling."""

from __future__ import annotations

import shutil
import sys

import pytest

from db.store import Database
from neuron.errors import SkippedInput
from neuron.routes import Route, RoutingFacts, route_for
from producer.scan import index_entry, index_folder, read_header

from .conftest import clone_with, small_chest


def test_files_are_found_by_content_not_extension(tmp_path, chest_small, test_files_dir):
    shutil.copy(chest_small, tmp_path / "no_extension")
    shutil.copy(chest_small, tmp_path / "looks_like.txt")
    (tmp_path / "notes.dcm").write_text("this is not DICOM")
    # A preamble-less file (no 'DICM' marker) that pydicom can still parse is DICOM too.
    shutil.copy(test_files_dir / "ExplVR_LitEndNoMeta.dcm", tmp_path / "nometa")
    assert read_header(tmp_path / "no_extension").modality == "CR"
    assert read_header(tmp_path / "looks_like.txt").modality == "CR"
    assert read_header(tmp_path / "nometa").sop_instance_uid
    with pytest.raises(SkippedInput, match="not a DICOM file"):
        read_header(tmp_path / "notes.dcm")


def test_header_pass_records_identity(chest_small):
    import pydicom

    entry = index_entry(chest_small)
    ds = pydicom.dcmread(chest_small, stop_before_pixels=True)
    header = entry.instance.header
    assert header.sop_instance_uid == ds.SOPInstanceUID
    assert header.study_instance_uid == ds.StudyInstanceUID
    assert header.series_instance_uid == ds.SeriesInstanceUID
    assert header.modality == "CR" and entry.instance.route == Route.CHEST_XRAY.value


def test_producer_never_imports_torch():
    import subprocess

    code = ("import producer.scan, producer.enqueue, producer.watch, neuron.queue, neuron.cli, db.store, sys; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@pytest.mark.parametrize(("modality", "body_part", "expected"), [
    ("CR", "CHEST", Route.CHEST_XRAY), ("DX", "", Route.CHEST_XRAY), ("DX", " chest ", Route.CHEST_XRAY),
    ("MR", "HEAD", Route.MRI_US), ("US", "", Route.MRI_US), ("XC", "SKIN", Route.SKIN),
])
def test_routing_by_modality_and_body_part(modality, body_part, expected):
    assert route_for(RoutingFacts.of(modality, body_part)) is expected


@pytest.mark.parametrize(("modality", "body_part", "reason"), [
    ("CR", "EXTREMITY", "BodyPartExamined 'EXTREMITY' is not CHEST"), ("CT", "", "Modality 'CT' is not screened"),
    ("SEG", "", "Modality 'SEG'"), ("SR", "", "Modality 'SR'"), ("", "", "Modality '<absent>'"),
])
def test_unscreened_instances_are_skipped_with_reason(modality, body_part, reason):
    with pytest.raises(SkippedInput, match=reason):
        route_for(RoutingFacts.of(modality, body_part))


def test_same_sop_instance_uid_at_two_paths_is_one_instance(tmp_path, chest_small):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(chest_small, folder / "a.dcm")
    shutil.copy(chest_small, folder / "b.dcm")
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    db.create()
    index_folder(folder, db)
    assert len(db.pending()) == 1
    with db.engine.connect() as conn:
        rows = dict(conn.exec_driver_sql("select file_path, status from ingest_status").all())
    assert rows[str((folder / "a.dcm").resolve())] == "pending"
    assert rows[str((folder / "b.dcm").resolve())] == "duplicate"


def test_rescan_of_unchanged_folder_reads_no_headers(tmp_path, chest_small):
    folder = tmp_path / "in"
    small_chest(chest_small, folder / "one.dcm", step=1)
    clone_with(folder / "one.dcm", folder / "two.dcm", SOPInstanceUID="1.2.3.4.5")
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    db.create()
    first = index_folder(folder, db)
    second = index_folder(folder, db)
    assert (first.indexed, second.indexed, second.unchanged) == (2, 0, 2)


def test_an_instance_that_keeps_crashing_workers_is_failed_not_retried_forever(tmp_path, chest_small):
    """A poison message must not block a queue: after max_attempts claims without a result the instance fails."""
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy(chest_small, folder / "a.dcm")
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    db.create()
    index_folder(folder, db)
    (item,) = db.pending()
    for _ in range(3):  # three workers died while screening it
        assert [i.sop_instance_uid for i in db.claim([item.sop_instance_uid], max_attempts=3)] == [
            item.sop_instance_uid]
    assert db.claim([item.sop_instance_uid], max_attempts=3) == []
    with db.engine.connect() as conn:
        status, reason = conn.exec_driver_sql("select status, reason from ingest_status").one()
    assert status == "failed" and "interrupted 3 times" in reason and "--retry-failed" in reason
    assert db.reset_to_pending(queued=True) == 0  # a requeue alone does not revive it, nor reset its count
    assert db.reset_to_pending(failed=True) == 1  # --retry-failed, once the cause is fixed
    (again,) = db.pending()
    assert again.sop_instance_uid == item.sop_instance_uid
    assert len(db.claim([item.sop_instance_uid], max_attempts=3)) == 1  # a fresh attempt count
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("select status, reason from ingest_status").one() == ("pending", None)
        assert conn.exec_driver_sql("select attempts from instances").scalar_one() == 1
