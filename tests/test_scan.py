"""Finding files by content, header-only indexing, routing and duplicate handling."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pydicom
import pytest

from db.store import Database
from neuron.errors import SkippedInput
from neuron.routes import RoutingFacts, route_for
from neuron.work import Requeue, Route, Status
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

    code = ("import producer.scan, producer.enqueue, producer.watch, neuron.queue, neuron_cli, db.store, sys; "
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
    assert db.requeue(Requeue.LOST_MESSAGE) == []  # a requeue alone does not revive it, nor reset its count
    assert len(db.requeue(Requeue.RETRY_FAILED)) == 1  # --retry-failed, once the cause is fixed
    (again,) = db.pending()
    assert again.sop_instance_uid == item.sop_instance_uid
    assert len(db.claim([item.sop_instance_uid], max_attempts=3)) == 1  # a fresh attempt count
    with db.engine.connect() as conn:
        assert conn.exec_driver_sql("select status, reason from ingest_status").one() == ("pending", None)
        assert conn.exec_driver_sql("select attempts from instances").scalar_one() == 1


def malformed_group_length(path):
    """A file with the 'DICM' marker whose File Meta Information Group Length (0002,0000), VR UL, holds 2 bytes
    instead of 4: pydicom raises its own BytesLengthException (not a ValueError) for it."""
    syntax = b"1.2.840.10008.1.2.1\x00"
    meta = (b"\x02\x00\x00\x00UL\x02\x00" + b"\x10\x00"
            + b"\x02\x00\x10\x00UI" + len(syntax).to_bytes(2, "little") + syntax)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x00" * 128 + b"DICM" + meta)
    return path


def ingest(db) -> dict[str, tuple[str, str | None]]:
    with db.engine.connect() as conn:
        return {p: (s, r) for p, s, r in conn.exec_driver_sql("select file_path, status, reason from ingest_status")}


def test_a_malformed_file_meta_group_length_is_recorded_and_the_walk_goes_on(tmp_path, chest_small):
    """One malformed header among good files: it is failed with the reason, every file around it is indexed, and a
    re-run does not stop at it either."""
    folder = tmp_path / "in"
    small_chest(chest_small, folder / "a_good.dcm", step=1)
    bad = malformed_group_length(folder / "b_malformed.dcm")
    small_chest(chest_small, folder / "c_good.dcm", step=1)
    (folder / "d_notes.txt").write_text("not DICOM")
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    db.create()
    result = index_folder(folder, db)
    assert (result.seen, result.indexed) == (4, 4)
    rows = ingest(db)
    status, reason = rows[str(bad.resolve())]
    assert status == "failed" and "DICOM header is unreadable (BytesLengthException" in reason, reason
    assert "re-export it from the source" in reason
    assert rows[str((folder / "a_good.dcm").resolve())][0] == "pending"
    assert rows[str((folder / "c_good.dcm").resolve())][0] == "pending"
    assert rows[str((folder / "d_notes.txt").resolve())][0] == "skipped"
    bad.touch()  # changed: read again, recorded again, and the walk still goes on
    assert index_folder(folder, db).indexed == 1


def test_a_sequence_cut_off_at_the_end_of_the_file_is_a_corrupt_file_not_a_storage_error(tmp_path, chest_small):
    """pydicom raises a bare OSError ("No tag to read at file position ...") for a sequence whose items run past the
    end of the file. That is the file's fault: failed with the reason, not recorded as unreadable storage that every
    scan reads again (found by the fuzzer)."""
    import io

    ds = pydicom.dcmread(chest_small)
    del ds.PixelData
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    # (0040,A730) ContentSequence, explicit VR 'SQ', undefined length, and then the file ends
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(buf.getvalue() + b"\x40\x00\x30\xa7SQ\x00\x00\xff\xff\xff\xff")
    entry = index_entry(cut)
    assert entry.status is Status.FAILED and "DICOM header is unreadable (OSError" in entry.reason, entry.reason
    assert entry.mtime_ns == cut.stat().st_mtime_ns  # a real mtime: an unchanged corrupt file is not read again


def test_a_file_that_cannot_be_read_is_failed_with_the_reason_and_read_again_next_scan(tmp_path, chest_small,
                                                                                       monkeypatch):
    """Open errors (permissions, a share that went away) never stop the walk; an I/O error is often transient, so
    the file is not remembered as unchanged. (Tests run as root here, so the error is raised for the one path.)"""
    import pydicom

    from producer import scan

    folder = tmp_path / "in"
    locked = small_chest(chest_small, folder / "a_locked.dcm", step=2)
    small_chest(chest_small, folder / "b_good.dcm", step=2)
    real_dcmread = pydicom.dcmread

    def dcmread(source, *args, **kwargs):  # a path, or the open file (its name is the path)
        if Path(getattr(source, "name", source)) == locked:
            raise PermissionError(13, "Permission denied", str(locked))
        return real_dcmread(source, *args, **kwargs)

    monkeypatch.setattr(scan.pydicom, "dcmread", dcmread)
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    db.create()
    index_folder(folder, db)
    status, reason = ingest(db)[str(locked.resolve())]
    assert status == "failed" and "could not be read (PermissionError: Permission denied)" in reason, reason
    assert ingest(db)[str((folder / "b_good.dcm").resolve())][0] == "pending"
    assert index_folder(folder, db).indexed == 1  # the unreadable file is tried again
    monkeypatch.setattr(scan.pydicom, "dcmread", real_dcmread)  # readable again
    index_folder(folder, db)
    assert ingest(db)[str(locked.resolve())] == ("pending", None)


def test_a_photo_that_cannot_be_read_is_recorded_not_raised(tmp_path, monkeypatch):
    """photo_header reads the whole file; an error there is one file's failure, not the run's."""
    from producer import scan

    photo = tmp_path / "p.png"
    photo.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)

    def vanished(path):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(scan, "photo_uids", vanished)
    entry = index_entry(photo, Route.SKIN)
    assert entry.status == "failed" and "Input/output error" in entry.reason and entry.instance is None


UID64 = "1.2.826.0.1.3680043.8.498." + "1" * 38  # exactly 64 characters


@pytest.mark.parametrize(("keyword", "value", "problem"), [
    ("SOPInstanceUID", UID64 + "1", "is 65 characters long, over the limit of 64"),
    ("SOPInstanceUID", "1.2.3.abc", "has characters other than digits and dots"),
    ("SOPInstanceUID", "1.2..3", "has an empty component"),
    ("SOPInstanceUID", "1.2.3.", "has an empty component"),
    ("StudyInstanceUID", UID64 + "9", "is 65 characters long"),
    ("StudyInstanceUID", "1.2.3/../4", "has characters other than digits and dots"),
    ("SeriesInstanceUID", ".1.2", "has an empty component"),
    ("SeriesInstanceUID", "1.2.3 4", "has characters other than digits and dots"),
])
def test_an_invalid_uid_fails_the_instance_with_the_reason_and_is_never_altered(tmp_path, chest_small, keyword,
                                                                                value, problem):
    path = clone_with(chest_small, tmp_path / "f.dcm", **{keyword: value})
    entry = index_entry(path)
    assert entry.status == "failed" and entry.instance is None and entry.sop_instance_uid is None
    assert problem in entry.reason and "is not a valid DICOM UID" in entry.reason, entry.reason
    assert repr(value) in entry.reason  # the value as it is, not a shortened one


def test_two_instances_whose_uids_share_the_first_64_characters_stay_two(tmp_path, chest_small):
    """Neither is cut to the other: a valid 64-character UID is screened, the 65-character one is failed."""
    folder = tmp_path / "in"
    folder.mkdir()
    exact = clone_with(chest_small, folder / "a.dcm", SOPInstanceUID=UID64)
    longer = clone_with(chest_small, folder / "b.dcm", SOPInstanceUID=UID64 + "7")
    db = Database(f"sqlite:///{tmp_path / 'db.sqlite'}")
    db.create()
    index_folder(folder, db)
    assert [i.sop_instance_uid for i in db.pending()] == [UID64]
    rows = ingest(db)
    assert rows[str(exact.resolve())] == ("pending", None)
    status, reason = rows[str(longer.resolve())]
    assert status == "failed" and "65 characters" in reason  # not 'duplicate' of the first


def test_valid_uids_with_padding_are_kept_whole(tmp_path, chest_small):
    path = clone_with(chest_small, tmp_path / "f.dcm", SOPInstanceUID=UID64, StudyInstanceUID="1.2.3.0.45")
    header = index_entry(path).instance.header
    assert header.sop_instance_uid == UID64 and header.study_instance_uid == "1.2.3.0.45"


def test_a_scan_records_the_shared_name_of_a_path_the_host_mounts_elsewhere(tmp_path, chest_small):
    """A producer that mounts the archive under its own path (NEURON_PATH_MAP) records the shared name, which every
    worker translates to its own mount, and a re-scan recognises the files by it (it stored its local path, so a
    worker on another host could not find the file)."""
    from neuron.settings import Settings

    local = tmp_path / "mnt" / "archive"
    small_chest(chest_small, local / "s1" / "a.dcm")
    settings = Settings.from_env({"NEURON_PATH_MAP": f"/archive={local}"})
    db = Database(f"sqlite:///{tmp_path / 'n.db'}")
    db.create()
    first = index_folder(local, db, to_shared=settings.to_shared)
    assert first.indexed == 1
    assert list(db.file_index()) == ["/archive/s1/a.dcm"]
    again = index_folder(local, db, to_shared=settings.to_shared)
    assert (again.indexed, again.unchanged) == (0, 1)
    db.dispose()
