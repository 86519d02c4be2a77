"""DICOM outputs for PACS (``--dicom-out``): a pipeline run's secondary captures and structured reports pass
``dciodvfy`` (Debian dicom3tools), round-trip through pydicom and reference the right source study, series and
instances; file names are stable across re-runs and hold no patient data; a missing source costs only its study."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import io
import logging
import shutil
import sqlite3
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.uid import SecondaryCaptureImageStorage, generate_uid

from db.store import Database
from neuron.errors import ConfigError
from neuron.settings import Settings
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


# -- templates: what the writer builds is what highdicom builds ----------------------------------------------------
STAMPED = {"InstanceCreationDate", "InstanceCreationTime", "ContentDate", "ContentTime", "DateOfSecondaryCapture",
           "TimeOfSecondaryCapture", "ContributionDateTime"}  # the time of building: the only values that differ


def attributes(ds, path: str = "") -> dict[str, tuple]:
    """Every attribute of an object as path -> (VR, value), file meta included; pixel data by its digest, stamped
    times only by their presence."""
    out = {}
    if not path and hasattr(ds, "file_meta"):
        out.update(attributes(ds.file_meta, "meta."))
    for elem in ds:
        key = f"{path}{elem.keyword or elem.tag}"
        if elem.VR == "SQ":
            out[key] = ("SQ", len(elem.value))
            for i, item in enumerate(elem.value):
                out.update(attributes(item, f"{key}[{i}]."))
        elif elem.keyword in STAMPED:
            out[key] = (elem.VR, "stamped")
        elif elem.keyword == "PixelData":
            out[key] = (elem.VR, hashlib.sha256(elem.value).hexdigest())
        else:
            out[key] = (elem.VR, elem.value)
    return out


def read(data) -> pydicom.Dataset:
    return pydicom.dcmread(io.BytesIO(b"".join(data) if isinstance(data, list) else data))


def saved(ds) -> pydicom.Dataset:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return read(buffer.getvalue())


def both_ways(writer, study, rows, headers, overlays, partial=False) -> list[tuple[str, dict, dict, bytes]]:
    """Each object of a study from the writer's templates and from highdicom (with burn_in's pixels), as
    (name, template attributes, highdicom attributes, template bytes)."""
    from worker.dicom_out import burn_in, sc_with_highdicom, sr_with_highdicom

    now = datetime.datetime.now()
    out = []
    images = {}
    for f in rows:
        images.setdefault(f.image_key, []).append(f)
    for key, image_rows in images.items():
        top = min(image_rows, key=lambda f: f.rank)
        src = headers[top.sop_uid]
        template = writer.sc_template(top, src, overlays[key].shape)
        data = b"".join(bytes(c) for c in template.encode(src, top, template.burn_in(overlays[key], top), now))
        plain = saved(sc_with_highdicom(src, top, burn_in(overlays[key], top)))
        out.append((f"sc of frame {top.frame} of {top.sop_uid}", attributes(read(data)), attributes(plain), data))
    template = writer.sr_template(rows, next(iter(headers.values())))
    data = b"".join(template.encode(study, rows, headers, partial, now))
    plain = saved(sr_with_highdicom(study, rows, headers, partial))
    out.append(("sr", attributes(read(data)), attributes(plain), data))
    return out


def test_the_screened_studies_objects_from_templates_equal_what_highdicom_builds(dicom_run, tmp_path):
    """The pipeline run's findings, sources and heatmaps, each study built both ways, COMPLETE and PARTIAL."""
    from worker.dicom_out import DicomWriter

    settings, _ = dicom_run
    db = Database(settings.resolved_database_url)
    try:
        writer = DicomWriter(settings.with_(dicom_out=tmp_path / "dicom"), db)
        studies = writer._findings(sorted({r[0] for r in findings(settings)}))
    finally:
        db.dispose()
    assert len(studies) == 2
    compared = 0
    for study, rows in studies.items():
        headers = {f.sop_uid: writer._header(f) for f in rows}
        overlays = {f.image_key: cv2.cvtColor(cv2.imread(f.heatmap_path), cv2.COLOR_BGR2RGB)
                    for f in rows if f.rank == 1}
        for partial in (False, True):
            for name, fast, plain, _ in both_ways(writer, study, rows, headers, overlays, partial):
                assert fast == plain, name
                compared += 1
    assert compared == 2 * (3 + 2)


def source(path: Path, **changes) -> pydicom.Dataset:
    """A real header as the writer reads it (no pixels), with changes; its elements not decoded yet."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    for keyword, value in changes.items():
        if value is None:
            del ds[keyword]
        else:
            setattr(ds, keyword, value)
    return pydicom.dcmread(io.BytesIO(saved_header(ds)), stop_before_pixels=True) if changes else ds


def saved_header(ds) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def rows_for(sources, study, labels, model=("xrv-densenet121-res224-all", "untrained", "c" * 64, True),
             frames=(0,)) -> list:
    from worker.dicom_templates import Finding

    name, weights, config, untrained = model
    rows = []
    for i, src in enumerate(sources):
        for frame in frames if int(src.get("NumberOfFrames", 1) or 1) > 1 else (0,):
            for rank, label in enumerate(labels, 1):
                p = (0.9 - 0.1 * rank + 0.013 * i + 0.001 * frame) % 1
                rows.append(Finding(study, src.SeriesInstanceUID, src.SOPInstanceUID, frame, "", name, weights, label,
                                    p, p / 7, rank, "", config, untrained, p > 0.5))
    return sorted(rows, key=lambda f: (f.sop_uid, f.frame, f.model, f.rank))


def overlay_of(seed: int) -> np.ndarray:
    yy, xx = np.mgrid[0:224, 0:224]
    cam = np.exp(-((yy - 40 - seed) ** 2 + (xx - 150) ** 2) / 2000.0)
    heat = cv2.applyColorMap((cam * 255).astype(np.uint8), cv2.COLORMAP_JET)
    return cv2.addWeighted(heat, 0.5, np.full_like(heat, 90 + seed), 0.5, 0)


TRAINED = ("densenet-trained", "ab" * 32, "d" * 64, False)
VARIANTS = ["multi-frame source, two models", "implicit VR source", "big endian source",
            "UTF-8 names and labels, extra patient attributes, acquisition time", "sources of two series and studies"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_objects_from_templates_equal_what_highdicom_builds_for_sources_of_other_kinds(variant, data_dir,
                                                                                       test_files_dir, rg1, tmp_path):
    """Sources the chest pipeline does not make: multi-frame references, transfer syntaxes whose elements pydicom
    must decode, another character set with non-ASCII text in the holes and in the copied attributes, the Patient
    and Study attributes highdicom copies beyond the writer's own list, evidence from another study. Every object
    also passes dciodvfy."""
    from worker.dicom_out import DicomWriter

    study = generate_uid()
    labels = ["Effusion", "Lung Opacity", "Cardiomegaly"]
    if variant.startswith("multi-frame"):
        sources = [source(data_dir / "emri_small.dcm", StudyInstanceUID=study)]
        rows = sorted(rows_for(sources, study, labels, frames=(0, 3))
                      + rows_for(sources, study, labels[:2], model=TRAINED, frames=(3,)),
                      key=lambda f: (f.sop_uid, f.frame, f.model, f.rank))
    elif variant.startswith("implicit"):
        sources = [source(test_files_dir / "MR_small_implicit.dcm")]
        study = sources[0].StudyInstanceUID
        rows = rows_for(sources, study, labels, model=TRAINED)
    elif variant.startswith("big endian"):
        sources = [source(data_dir / "emri_small_big_endian.dcm")]
        study = sources[0].StudyInstanceUID
        rows = rows_for(sources, study, labels, frames=(9,))
    elif variant.startswith("UTF-8"):
        sources = [source(rg1, SpecificCharacterSet="ISO_IR 192", StudyInstanceUID=study, PatientName="Gómez^José",
                          StudyDescription="Thorax a.p. – Übersicht", AdditionalPatientHistory="Zustand nach OP",
                          PatientState="stabil", AcquisitionDateTime="20240102030405.123456", Laterality="L",
                          BodyPartExamined=None, PatientOrientation=None)]
        rows = rows_for(sources, study, ["Épanchement pleural", "Opacité", "Cardiomégalie"])
    else:
        base = source(rg1, StudyInstanceUID=study)
        sources = [base, source(rg1, StudyInstanceUID=study, SeriesInstanceUID=generate_uid(),
                                SOPInstanceUID=generate_uid()),
                   source(rg1, SOPInstanceUID=generate_uid())]  # a header whose study is not the report's
        rows = rows_for(sources, study, ["Épaississement pleural", *labels], model=TRAINED)  # in RG1's ISO_IR 100
    headers = {s.SOPInstanceUID: s for s in sorted(sources, key=lambda s: s.SOPInstanceUID)}
    overlays = {f.image_key: overlay_of(i) for i, f in enumerate(f for f in rows if f.rank == 1)}
    writer = DicomWriter(Settings(out_dir=tmp_path, dicom_out=tmp_path / "dicom"), None)
    objects = both_ways(writer, study, rows, headers, overlays)
    assert len(objects) == len(overlays) + 1
    for i, (name, fast, plain, data) in enumerate(objects):
        assert fast == plain, name
        (tmp_path / f"{i}.dcm").write_bytes(data)
        said = subprocess.run(["dciodvfy", str(tmp_path / f"{i}.dcm")], capture_output=True, text=True,
                              timeout=60)
        assert not [line for line in (said.stdout + said.stderr).splitlines() if line.startswith("Error")], name
    sr = read(objects[-1][3])
    got = sr_findings(sr)
    assert {(g["sop"], g["frame"], g["label"]) for g in got} == {(f.sop_uid, f.frame, f.label) for f in rows}
    by_key = {(f.sop_uid, f.frame, f.label, f.model): f for f in rows}
    for g, f in zip(got, rows, strict=True):  # the groups keep the rows' order
        assert (g["sop"], g["frame"], g["label"]) == (f.sop_uid, f.frame, f.label)
        assert g["probability"] == pytest.approx(by_key[(f.sop_uid, f.frame, f.label, f.model)].probability, abs=1e-6)
        assert g["uncertainty"] == pytest.approx(f.uncertainty, abs=1e-6)


def test_a_frame_reference_highdicom_refuses_fails_the_report_the_template_way_too(data_dir, tmp_path):
    """OBXXXX1A_2frame is an Ultrasound Image (an IOD without frames) that says it has two: highdicom will not
    reference its frame 2 from a measurement group, and neither will the template."""
    from worker.dicom_out import DicomWriter, sr_with_highdicom

    src = source(data_dir / "OBXXXX1A_2frame.dcm")
    rows = rows_for([src], src.StudyInstanceUID, ["Mass"], frames=(1,))
    headers = {src.SOPInstanceUID: src}
    writer = DicomWriter(Settings(out_dir=tmp_path, dicom_out=tmp_path / "dicom"), None)
    with pytest.raises(TypeError, match="multi-frame"):
        sr_with_highdicom(src.StudyInstanceUID, rows, headers, False)
    template = writer.sr_template(rows, src)
    with pytest.raises(TypeError, match="multi-frame"):
        template.encode(src.StudyInstanceUID, rows, headers, False, datetime.datetime.now())


def test_changed_findings_give_the_report_new_uids_under_the_same_file_name(dicom_run, tmp_path):
    """Same findings, same SR UID (the existing test); a probability that changes makes it another SR for DICOM (a
    new SOP Instance UID), written over the same file; the series and the SCs' UIDs follow the images, not the
    values."""
    from worker.dicom_out import DicomWriter

    settings, sources = dicom_run
    db_file = tmp_path / "neuron.db"
    shutil.copy(settings.out_dir / "neuron.db", db_file)
    moved = settings.with_(database_url=f"sqlite:///{db_file}", dicom_out=tmp_path / "dicom")
    header = pydicom.dcmread(sources["b"], stop_before_pixels=True)
    study = header.StudyInstanceUID

    def write() -> dict[str, pydicom.Dataset]:
        db = Database(moved.resolved_database_url)
        try:
            report = DicomWriter(moved, db).write([study])
        finally:
            db.dispose()
        assert not report.failed
        return {p.name: pydicom.dcmread(p) for p in report.written}

    before = write()
    with sqlite3.connect(db_file) as conn:
        changed = conn.execute("update predictions set probability = probability / 2 where sop_instance_uid = ? "
                               "and label = (select min(label) from predictions)", (header.SOPInstanceUID,)).rowcount
    assert changed == 1
    after = write()
    assert before.keys() == after.keys() and "sr.dcm" in after
    assert after["sr.dcm"].SOPInstanceUID != before["sr.dcm"].SOPInstanceUID
    assert after["sr.dcm"].SeriesInstanceUID == before["sr.dcm"].SeriesInstanceUID
    for name in after.keys() - {"sr.dcm"}:
        assert after[name].SOPInstanceUID == before[name].SOPInstanceUID
    halved = {(g["label"], round(g["probability"], 9)) for g in sr_findings(after["sr.dcm"])}
    assert halved != {(g["label"], round(g["probability"], 9)) for g in sr_findings(before["sr.dcm"])}


def test_a_model_name_highdicom_refuses_costs_only_the_secondary_captures_each_logged(rg1, tmp_path, caplog):
    """highdicom refuses a Manufacturer's Model Name of more than 64 characters in the SC's contributing
    equipment, so no SC template can be made for that model: each SC fails with the reason, the report is
    written."""
    from worker.dicom_out import DicomReport, DicomWriter

    study = generate_uid()
    sources = []
    for i in range(2):
        path = tmp_path / "archive" / f"{i}.dcm"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(saved_header(source(rg1, StudyInstanceUID=study, SOPInstanceUID=generate_uid())))
        sources.append(source(path))
    model = ("m" * 70, "untrained", "e" * 64, True)
    rows = rows_for(sources, study, ["Effusion", "Mass"], model=model)
    heatmap = tmp_path / "heatmap.png"
    cv2.imwrite(str(heatmap), overlay_of(0))
    paths = {s.SOPInstanceUID: str(tmp_path / "archive" / f"{i}.dcm") for i, s in enumerate(sources)}
    rows = [dataclasses.replace(f, file_path=paths[f.sop_uid], heatmap_path=str(heatmap)) for f in rows]
    writer = DicomWriter(Settings(out_dir=tmp_path, dicom_out=tmp_path / "dicom"), None)
    report = DicomReport()
    with caplog.at_level(logging.WARNING, logger="worker.dicom_out"):
        writer._write_study(study, rows, None, False, report)
    assert [p.name for p in report.written] == ["sr.dcm"] and report.reports == [study]
    assert len(report.failed) == 2
    assert all("secondary capture not written: TemplateError: no sc template: ValueError" in why
               for _, why in report.failed)
    assert caplog.text.count("secondary capture not written") == 2
