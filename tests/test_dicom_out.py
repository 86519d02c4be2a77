"""DICOM outputs for PACS (``--dicom-out``): a pipeline run's secondary captures and structured reports pass
``dciodvfy`` (Debian dicom3tools), round-trip through pydicom and reference the right source study, series and
instances; file names are stable across re-runs and hold no patient data; a missing source costs only its study."""

from __future__ import annotations

import logging
import shutil
import sqlite3
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

from db.store import Database
from neuron.errors import ConfigError
from worker.embedded import run_folder

from .conftest import monochrome2_twin, small_chest

N_LABELS = 18
PATIENT_NAME, PATIENT_ID = "Doe^Jane", "PID-7731-SECRET"
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"


@pytest.fixture(scope="module")
def dicom_run(tmp_path_factory, chest_small, untrained_settings, models):
    """One embedded run over two studies: A holds a MONOCHROME1 CR and its MONOCHROME2 twin, B one CR of a named
    patient. Returns (settings, {name: source path})."""
    from worker.pipeline import Pipeline

    root = tmp_path_factory.mktemp("dicom_archive")
    study_a = generate_uid()
    sources = {"a1": small_chest(chest_small, root / "a" / "one.dcm", step=1, StudyInstanceUID=study_a)}
    sources["a2"] = monochrome2_twin(sources["a1"], root / "a" / "two.dcm")
    sources["b"] = small_chest(chest_small, root / "b" / "one.dcm", step=1, PatientName=PATIENT_NAME,
                               PatientID=PATIENT_ID)
    out = tmp_path_factory.mktemp("dicom_results")
    settings = untrained_settings.with_(out_dir=out, dicom_out=out / "dicom")
    run_folder(root, settings, pipeline=Pipeline(models, settings))
    return settings, sources


def outputs(settings) -> list[Path]:
    return sorted(Path(settings.dicom_out).rglob("*.dcm"))


def findings(settings) -> list[tuple]:
    with sqlite3.connect(settings.out_dir / "neuron.db") as conn:
        return conn.execute("select study_instance_uid, series_instance_uid, sop_instance_uid, frame, label, "
                            "probability, uncertainty, weights, untrained from findings").fetchall()


def content_items(seq):
    """Every content item of an SR content tree, depth first."""
    for item in seq:
        yield item
        yield from content_items(item.get("ContentSequence", []))


def code_of(item) -> str:
    return item.ConceptNameCodeSequence[0].CodeValue


def sr_findings(ds) -> list[dict]:
    """One dict per measurement group (TID 1501): label, source image, frame, probability, spread, algorithm."""
    rows = []
    for group in content_items(ds.ContentSequence):
        if group.ValueType != "CONTAINER" or code_of(group) != "125007":
            continue
        row = {}
        for item in content_items(group.ContentSequence):
            code = code_of(item)
            if code == "121071":  # Finding
                row["label"] = item.ConceptCodeSequence[0].CodeMeaning
            elif item.ValueType == "IMAGE":
                ref = item.ReferencedSOPSequence[0]
                row["sop"] = ref.ReferencedSOPInstanceUID
                row["frame"] = int(ref.get("ReferencedFrameNumber", 1)) - 1
            elif code == "PROB":
                row["probability"] = float(item.MeasuredValueSequence[0].FloatingPointValue)
            elif code == "386136009":  # Standard Deviation
                row["uncertainty"] = float(item.MeasuredValueSequence[0].FloatingPointValue)
            elif code == "111003":  # Algorithm Version
                row["version"] = item.TextValue
            elif code == "111001":
                row["algorithm"] = item.TextValue
        rows.append(row)
    return rows


def test_every_output_passes_dciodvfy_without_errors(dicom_run):
    if shutil.which("dciodvfy") is None:
        pytest.fail("dciodvfy is missing: install Debian's dicom3tools (the CI script does)")
    settings, _ = dicom_run
    files = outputs(settings)
    assert len(files) == 3 + 2  # an SC per screened image, an SR per study
    for path in files:
        res = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        said = (res.stdout + res.stderr).splitlines()
        warnings = sorted({line for line in said if line.startswith("Warning")})
        print(path.name, "warnings:", *warnings, sep="\n  ")
        assert not [line for line in said if line.startswith("Error")], (path.name, said)


def test_secondary_captures_reference_their_source_and_show_the_heatmap_with_the_policy(dicom_run):
    settings, sources = dicom_run
    headers = {ds.SOPInstanceUID: ds for ds in (pydicom.dcmread(p, stop_before_pixels=True)
                                                 for p in sources.values())}
    scs = [pydicom.dcmread(p) for p in outputs(settings) if p.name.startswith("sc-")]
    assert len(scs) == 3
    seen = set()
    for sc in scs:
        assert sc.SOPClassUID == SecondaryCaptureImageStorage
        ref = sc.SourceImageSequence[0].ReferencedSOPInstanceUID
        assert ref == sc.ReferencedImageSequence[0].ReferencedSOPInstanceUID
        src = headers[ref]
        seen.add(ref)
        assert sc.StudyInstanceUID == src.StudyInstanceUID
        assert sc.SourceImageSequence[0].ReferencedSOPClassUID == src.SOPClassUID
        assert sc.SOPInstanceUID not in headers and sc.SeriesInstanceUID != src.SeriesInstanceUID
        assert sc.PatientName == src.PatientName and sc.PatientID == src.PatientID  # PACS files it with the study
        assert sc.BurnedInAnnotation == "YES"
        assert "NOT FOR DIAGNOSTIC USE" in sc.ImageComments and "UNTRAINED" in sc.ImageComments
        assert "untrained" in sc.DerivationDescription and "xrv-densenet121" in sc.ManufacturerModelName
        assert "Neuron" in {e.Manufacturer for e in sc.ContributingEquipmentSequence}
        pixels = sc.pixel_array
        assert pixels.ndim == 3 and pixels.shape[2] == 3 and pixels.dtype == np.uint8
        image = pixels[pixels.shape[0] - pixels.shape[1]:]  # below the text band: the heatmap overlay
        assert len(np.unique(image.reshape(-1, 3), axis=0)) > 1000, "the heatmap is not in the pixels"
        band = pixels[: pixels.shape[0] - pixels.shape[1]]
        assert band.any() and (band == 0).mean() > 0.5, "the burned-in text band is missing"
    assert seen == set(headers)
    series = {(sc.StudyInstanceUID, sc.SeriesInstanceUID) for sc in scs}
    assert len(series) == 2  # one SC series per study and model


def test_each_study_report_holds_every_finding_with_its_probability_and_uncertainty(dicom_run):
    settings, sources = dicom_run
    rows = findings(settings)
    srs = [pydicom.dcmread(p) for p in outputs(settings) if p.name == "sr.dcm"]
    assert len(srs) == 2
    assert len(rows) == 3 * N_LABELS
    series_of = {r[2]: r[1] for r in rows}
    for sr in srs:
        assert sr.SOPClassUID == COMPREHENSIVE_SR and sr.CompletionFlag == "COMPLETE"
        assert sr.ContentQualification == "RESEARCH" and "NOT FOR DIAGNOSTIC USE" in sr.SeriesDescription
        expected = {(r[2], r[3], r[4]): (r[5], r[6]) for r in rows if r[0] == sr.StudyInstanceUID}
        got = sr_findings(sr)
        assert len(got) == len(expected) > 0
        for f in got:
            p, u = expected[(f["sop"], f["frame"], f["label"])]
            assert f["probability"] == pytest.approx(p, abs=1e-6) and f["uncertainty"] == pytest.approx(u, abs=1e-6)
            assert f["version"] == "untrained" and f["algorithm"].startswith("xrv-densenet121")
        # the evidence lists every source instance of the study under its own series
        evidence = {(s.SeriesInstanceUID, i.ReferencedSOPInstanceUID)
                    for e in sr.CurrentRequestedProcedureEvidenceSequence if e.StudyInstanceUID == sr.StudyInstanceUID
                    for s in e.ReferencedSeriesSequence for i in s.ReferencedSOPSequence}
        assert evidence == {(series_of[sop], sop) for sop, _, _ in expected}
        assert sr.SOPInstanceUID not in series_of and sr.SeriesInstanceUID not in series_of.values()
    patients = {str(sr.PatientID) for sr in srs}
    assert PATIENT_ID in patients


def test_file_names_hold_no_patient_data_and_writing_again_overwrites_the_same_files(dicom_run, models):
    from worker.dicom_out import DicomWriter
    from worker.pipeline import Pipeline

    settings, sources = dicom_run
    before = {p: pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in outputs(settings)}
    for path in before:
        rel = str(path.relative_to(settings.dicom_out))
        assert "Doe" not in rel and PATIENT_ID not in rel and "Jane" not in rel
    db = Database(settings.resolved_database_url)
    try:
        studies = {r[0] for r in findings(settings)}
        report = DicomWriter(settings, db).write(studies)
    finally:
        db.dispose()
    assert not report.failed and sorted(report.written) == sorted(before)
    after = {p: pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in outputs(settings)}
    assert after == before  # same files, same UIDs: a PACS receives an update of the same objects, not copies
    assert not [p for p in Path(settings.dicom_out).rglob("*") if p.name.endswith(".tmp")]
    # a re-run of the folder screens nothing again and adds no outputs
    run_folder(sources["a1"].parent.parent, settings,
               pipeline=Pipeline(models, settings))
    assert outputs(settings) == sorted(before)


def test_a_deleted_source_is_logged_and_the_other_study_still_gets_its_outputs(dicom_run, tmp_path, caplog):
    """The sources are read where the path map says (a copy), and one study's file is gone from it."""
    from worker.dicom_out import DicomWriter

    settings, sources = dicom_run
    archive = sources["a1"].parent.parent
    copy = Path(shutil.copytree(archive, tmp_path / "mounted"))
    (copy / "b" / "one.dcm").unlink()
    moved = settings.with_(dicom_out=tmp_path / "dicom", path_map=((str(archive.resolve()), str(copy)),))
    db = Database(moved.resolved_database_url)
    try:
        writer = DicomWriter(moved, db)
        with caplog.at_level(logging.INFO, logger="worker.dicom_out"):
            report = writer.write({r[0] for r in findings(settings)})
    finally:
        db.dispose()
    study_a = pydicom.dcmread(sources["a1"], stop_before_pixels=True).StudyInstanceUID
    written = outputs(moved)
    assert len(written) == 3 and {p.parent for p in written} == {writer.study_dir(study_a)}  # 2 SCs and the SR
    assert len(report.failed) == 2  # study B: its SC and its SR, each with the reason
    assert all("No such file or directory" in why for _, why in report.failed)
    logged = caplog.text
    assert "not written" in logged and "FileNotFoundError" in logged
    assert "Doe" not in logged and PATIENT_ID not in logged and str(copy) not in logged


def test_an_unwritable_dicom_folder_stops_before_screening_with_the_fix(tmp_path, untrained_settings):
    from worker.dicom_out import DicomWriter

    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ConfigError, match="--dicom-out .* NEURON_DICOM_OUT"):
        DicomWriter(untrained_settings.with_(dicom_out=blocker / "dicom"), None)


def test_a_study_with_an_instance_of_a_route_without_a_model_still_gets_its_report(tmp_path, chest_small,
                                                                                  test_files_dir, untrained_settings,
                                                                                  models):
    """The outputs are written by background processes as results commit, and a study's report only once none of its
    instances waits; an MR of the same study (its route has no model here) waits until the run skips it at the end,
    and the run's last pass still writes the study's report, from the CR's findings."""
    from worker.pipeline import Pipeline

    study = generate_uid()
    root = tmp_path / "archive"
    small_chest(chest_small, root / "cr.dcm", step=1, StudyInstanceUID=study)
    mr = pydicom.dcmread(test_files_dir / "MR_small.dcm")
    mr.StudyInstanceUID, mr.SOPInstanceUID = study, generate_uid()
    mr.file_meta.MediaStorageSOPInstanceUID = mr.SOPInstanceUID
    mr.save_as(root / "mr.dcm", enforce_file_format=True)
    settings = untrained_settings.with_(out_dir=tmp_path / "out", dicom_out=tmp_path / "out" / "dicom")
    run_folder(root, settings, pipeline=Pipeline(models, settings))
    with sqlite3.connect(settings.out_dir / "neuron.db") as conn:
        statuses = dict(conn.execute("select modality, status from instances"))
    assert statuses == {"CR": "done", "MR": "skipped"}
    reports = [pydicom.dcmread(p) for p in outputs(settings) if p.name == "sr.dcm"]
    assert len(reports) == 1 and reports[0].StudyInstanceUID == study
    assert reports[0].CompletionFlag == "COMPLETE" and len(sr_findings(reports[0])) == N_LABELS
    assert sum(p.name.startswith("sc-") for p in outputs(settings)) == 1


def test_the_last_pass_writes_a_partial_report_for_a_study_that_still_waits(tmp_path, dicom_run):
    """A study whose instance is still pending when the run ends (a storage error, say) gets no report from the
    commit-time tasks (they wait for the study to be complete); closing the background outputs writes it as it
    stands, marked PARTIAL."""
    from worker.dicom_out import BackgroundOutputs

    settings, sources = dicom_run
    db_file = tmp_path / "neuron.db"
    shutil.copy(settings.out_dir / "neuron.db", db_file)
    a1 = pydicom.dcmread(sources["a1"], stop_before_pixels=True)
    a2 = pydicom.dcmread(sources["a2"], stop_before_pixels=True)
    with sqlite3.connect(db_file) as conn:
        conn.execute("update instances set status = 'pending' where sop_instance_uid = ?", (a2.SOPInstanceUID,))
    moved = settings.with_(database_url=f"sqlite:///{db_file}", dicom_out=tmp_path / "dicom")
    background = BackgroundOutputs(moved, processes=1)
    background.add([a1.SOPInstanceUID])
    report = background.close()
    assert report.reports == [a1.StudyInstanceUID] and not report.failed
    (sr,) = [pydicom.dcmread(p) for p in outputs(moved) if p.name == "sr.dcm"]
    assert sr.CompletionFlag == "PARTIAL" and len(sr_findings(sr)) == 2 * N_LABELS
    assert sum(p.name.startswith("sc-") for p in outputs(moved)) == 1  # the SC of the instance it was told of
