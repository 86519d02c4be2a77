"""Findings as FHIR R4 (``--fhir-out``, ``neuron export --format fhir``): a real run with untrained weights over real
chest radiographs writes one Bundle per screened study; every resource parses with fhir.resources (R4B, which
shares R4's Observation, ImagingStudy, Device and Bundle), every reference resolves inside its Bundle, the untrained
weights show on every Device and Observation, nothing names the patient, and the export (Bundle or NDJSON, with
``--where``) holds the same resources as the run's Bundles and the same numbers as the ``findings`` view. Both are
audited; a purge leaves what was already written."""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
from pathlib import Path

import pytest
import typer.main
from click.testing import CliRunner
from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle
from pydicom.uid import generate_uid

from neuron.codes import SYSTEM, finding_uid, label_code, study_key
from neuron.work import POSITIVE

from .conftest import small_chest

pytestmark = pytest.mark.timeout(300)
PATIENT_NAME, PATIENT_ID = "Doe^Jane", "PID-7731-SECRET"
PATIENT_SECRET = "a-test-secret-of-32-characters!!"
UNTRAINED_TAG = "UNTRAINED"


def cli(*args: str):
    """``neuron ARGS`` in this process; ``said`` is its output with the console's line wrapping undone."""
    from neuron_cli import app

    result = CliRunner().invoke(typer.main.get_command(app), list(args))
    result.said = " ".join(result.output.split())
    return result


@pytest.fixture(scope="module")
def fhir_run(tmp_path_factory, chest_small, untrained_settings, models):
    """One embedded run (``neuron run``'s engine, on the session's untrained models) with --fhir-out and
    --patient-key over three studies: A with two radiographs of a named patient, B one with BodyPartExamined left
    out, and a CT that no route screens. Returns (out folder, FHIR folder, {name: Study Instance UID})."""
    from neuron.sample_data import pydicom_data_dir
    from worker.embedded import run_folder
    from worker.pipeline import Pipeline

    root = tmp_path_factory.mktemp("fhir")
    archive, out = root / "archive", root / "out"
    studies = {"a": generate_uid(), "b": generate_uid()}
    for i, step in enumerate((1, 2)):
        small_chest(chest_small, archive / "a" / f"{i}.dcm", step=step, StudyInstanceUID=studies["a"],
                    PatientName=PATIENT_NAME, PatientID=PATIENT_ID)
    small_chest(chest_small, archive / "b" / "0.dcm", step=1, StudyInstanceUID=studies["b"], BodyPartExamined="")
    shutil.copy(pydicom_data_dir() / "693_J2KR.dcm", archive / "ct.dcm")
    settings = untrained_settings.with_(out_dir=out, fhir_out=root / "fhir", patient_key=PATIENT_SECRET)
    run_folder(archive, settings, pipeline=Pipeline(models, settings))
    return out, root / "fhir", studies


def db_rows(out: Path, sql: str, *args) -> list[tuple]:
    with sqlite3.connect(out / "neuron.db") as conn:
        return conn.execute(sql, args).fetchall()


def validated(resource: dict) -> dict:
    """The resource, once fhir.resources' R4B model of its type accepts it."""
    get_fhir_model_class(resource["resourceType"]).model_validate(resource)
    return resource


def bundle_resources(bundle: dict) -> list[dict]:
    Bundle.model_validate(bundle)
    assert bundle["type"] == "collection"
    entries = bundle.get("entry", [])
    for e in entries:
        assert e["fullUrl"] == f"urn:uuid:{e['resource']['id']}"
    return [validated(e["resource"]) for e in entries]


def references(value) -> list[str]:
    """Every Reference.reference inside a resource."""
    if isinstance(value, dict):
        found = [value["reference"]] if isinstance(value.get("reference"), str) else []
        return found + [r for v in value.values() for r in references(v)]
    if isinstance(value, list):
        return [r for v in value for r in references(v)]
    return []


def by_type(resources: list[dict], kind: str) -> list[dict]:
    return [r for r in resources if r["resourceType"] == kind]


def test_fhir_out_writes_one_valid_bundle_per_screened_study_that_no_one_can_mistake_for_a_result(fhir_run):
    out, folder, studies = fhir_run
    files = sorted(folder.iterdir())
    assert [f.name for f in files] == sorted(f"{study_key(uid)}.json" for uid in studies.values())  # not the CT's
    positives = {r[0]: r[1:] for r in db_rows(
        out, "SELECT sop_instance_uid || '/' || frame || '/' || label, study_instance_uid, probability, "
             "uncertainty, weights FROM findings WHERE positive = 1")}
    assert 0 < len(positives) < len(db_rows(out, "SELECT 1 FROM findings"))
    seen = set()
    for name, study in studies.items():
        text = (folder / f"{study_key(study)}.json").read_text()
        for who in (PATIENT_NAME.split("^")[0], PATIENT_ID, "CompressedSamples", "9RG1"):  # A's, and B's (RG1's)
            assert who not in text  # nobody is named
        resources = bundle_resources(json.loads(text))
        urls = {f"urn:uuid:{r['id']}" for r in resources}
        for r in resources:
            assert set(references(r)) <= urls, r["resourceType"]  # every reference resolves in the Bundle
        (imaging,) = by_type(resources, "ImagingStudy")
        assert imaging["identifier"][0] == {"system": "urn:dicom:uid", "value": f"urn:oid:{study}"}
        instances = {i["uid"] for s in imaging["series"] for i in s["instance"]}
        assert instances == {r[0] for r in db_rows(out, "SELECT sop_instance_uid FROM instances "
                                                        "WHERE study_instance_uid = ?", study)}
        assert imaging["numberOfInstances"] == (2 if name == "a" else 1)
        key = db_rows(out, "SELECT patient_key FROM studies WHERE study_instance_uid = ?", study)[0][0]
        assert key and imaging["subject"]["identifier"] == {"system": "urn:neuron:patient-key", "value": key}
        (device,) = by_type(resources, "Device")  # untrained: on the Device, in three ways
        assert device["meta"]["tag"][0]["code"] == UNTRAINED_TAG and device["version"][0]["value"] == "untrained"
        assert device["property"][0]["valueCode"][0]["coding"][0]["code"] == "Y"
        assert any("UNTRAINED" in n["text"] for n in device["note"])
        observations = by_type(resources, "Observation")
        assert len(observations) == sum(1 for v in positives.values() if v[0] == study)
        for o in observations:
            source = {e["url"]: next(v for k, v in e.items() if k.startswith("value"))
                      for e in o["extension"][0]["extension"]}
            label = o["code"]["text"]
            finding = f"{source['sopInstanceUid']}/{source['frameNumber'] - 1}/{label}"
            _, probability, uncertainty, weights = positives[finding]
            seen.add(finding)
            assert o["valueQuantity"]["value"] == probability >= POSITIVE
            assert o["component"][0]["valueQuantity"]["value"] == uncertainty
            assert o["code"]["coding"][0] == {"system": SYSTEM, "code": label_code(label), "display": label}
            assert o["identifier"][0]["value"] == "urn:oid:" + finding_uid(
                source["sopInstanceUid"], source["frameNumber"] - 1, device["deviceName"][0]["name"], weights, label)
            assert o["status"] == "preliminary" and o["meta"]["tag"][0]["code"] == UNTRAINED_TAG  # and on each
            assert o["note"][0]["text"].startswith("UNTRAINED")  # Observation, first thing in its notes
            assert o["device"]["reference"] == f"urn:uuid:{device['id']}"
            assert o["derivedFrom"][0]["reference"] == f"urn:uuid:{imaging['id']}"
            assert o["bodySite"]["coding"][0]["code"] == "51185008"  # chest, stated (A) or implied by the route (B)
            assert ("absent" in o["bodySite"]["text"]) == (name == "b")
            assert o["subject"] == imaging["subject"]
    assert seen == set(positives)
    audited = db_rows(out, "SELECT actor, address, study_instance_uid, target FROM audit WHERE action = 'export'")
    assert sorted(r[2] for r in audited) == sorted(studies.values())
    assert all(r[3] == "fhir-out" and r[1].startswith("run@") for r in audited)


def test_the_export_holds_the_run_bundles_resources_as_a_bundle_or_ndjson_and_honours_where(fhir_run, tmp_path):
    out, folder, studies = fhir_run
    run = {r["id"]: r for f in folder.iterdir() for r in bundle_resources(json.loads(f.read_text()))}
    result = cli("export", "--out", str(out), "-o", str(tmp_path / "all.json"), "--format", "fhir")
    assert result.exit_code == 0, result.output
    exported = bundle_resources(json.loads((tmp_path / "all.json").read_text()))
    assert {r["id"]: r for r in exported} == run  # every study here has a positive finding
    assert len(exported) == len(run)  # the one Device once
    assert f"wrote {len(run)} FHIR resources" in result.said

    result = cli("export", "--out", str(out), "-o", str(tmp_path / "all.ndjson"))
    assert result.exit_code == 0, result.output
    lines = (tmp_path / "all.ndjson").read_text().splitlines()
    ndjson = [validated(json.loads(line)) for line in lines]  # one resource a line
    assert len(ndjson) == len(run)
    ids = {f"{r['resourceType']}/{r['id']}" for r in ndjson}
    for r in ndjson:  # relative references (no Bundle to resolve urn:uuid) to resources in the file
        assert set(references(r)) <= ids
        as_bundle = re.sub(r'"(ImagingStudy|Device)/([0-9a-f-]{36})"', r'"urn:uuid:\2"', json.dumps(r))
        assert json.loads(as_bundle) == run[r["id"]]

    where = "label = 'Effusion' or (study_date < '2000-01-01' and label like 'Pneumo%')"
    result = cli("export", "--out", str(out), "-o", str(tmp_path / "some.json"), "--where", where)
    assert result.exit_code == 0, result.output
    some = bundle_resources(json.loads((tmp_path / "some.json").read_text()))
    expected = db_rows(out, f"SELECT study_instance_uid, probability FROM findings WHERE positive = 1 AND ({where})")
    observations = by_type(some, "Observation")
    assert sorted(o["valueQuantity"]["value"] for o in observations) == sorted(r[1] for r in expected)
    assert {o["code"]["text"] for o in observations} <= {"Effusion"}
    assert len(by_type(some, "ImagingStudy")) == len({r[0] for r in expected})
    assert all(run[r["id"]] == r for r in some)

    result = cli("export", "--out", str(out), "-o", str(tmp_path / "none.json"), "--where", "probability > 2")
    assert result.exit_code == 0 and "wrote 0 FHIR resources" in result.said
    assert json.loads((tmp_path / "none.json").read_text()).get("entry") is None
    audited = db_rows(out, "SELECT target, detail FROM audit WHERE action = 'export' AND target LIKE 'view=%'")
    assert [r[0] for r in audited[-4:]] == [f"view=findings where={w} format=fhir"
                                            for w in ("", "", where, "probability > 2")]
    assert audited[-2][1].startswith(f"{len(some)} FHIR resources ({len(observations)} observations")


def test_a_fhir_export_it_cannot_write_is_refused_with_the_fix(fhir_run, tmp_path):
    out, _, _ = fhir_run
    for args, said in (
            (("-o", str(tmp_path / "x.csv"), "--format", "fhir"), "e.g. findings.json or findings.ndjson"),
            (("-o", str(tmp_path / "x.json"), "--format", "csv"), "--format csv and the file"),
            (("-o", str(tmp_path / "x.json"), "--view", "study_findings"), "a FHIR export is made of findings"),
            (("-o", str(tmp_path / "x.json"), "--where", "nope = 1"), "may use these columns: study_instance_uid"),
            (("-o", str(tmp_path / "x.ndjson"), "--where", "1 = 1; DELETE FROM predictions"), "second statement")):
        result = cli("export", "--out", str(out), *args)
        assert result.exit_code == 2 and said in result.said, result.output
    assert not list(tmp_path.iterdir())  # nothing half written


def test_a_purge_leaves_the_bundles_already_written_and_their_audit(fhir_run, tmp_path):
    out, folder, studies = fhir_run
    copy, bundles = tmp_path / "out", tmp_path / "fhir"
    shutil.copy(out / "neuron.db", tmp_path / "neuron.db")
    copy.mkdir()
    shutil.move(tmp_path / "neuron.db", copy / "neuron.db")
    shutil.copytree(folder, bundles)
    before = {p.name: p.read_bytes() for p in bundles.iterdir()}
    result = cli("purge", "--out", str(copy), "--study", studies["a"], "--yes")
    assert result.exit_code == 0, result.output
    assert db_rows(copy, "SELECT COUNT(*) FROM findings WHERE study_instance_uid = ?", studies["a"]) == [(0,)]
    assert {p.name: p.read_bytes() for p in bundles.iterdir()} == before  # what was sent stays as it was sent
    assert db_rows(copy, "SELECT COUNT(*) FROM audit WHERE target = 'fhir-out' AND study_instance_uid = ?",
                   studies["a"]) == [(1,)]
    result = cli("export", "--out", str(copy), "-o", str(tmp_path / "after.json"))
    assert result.exit_code == 0, result.output
    after = bundle_resources(json.loads((tmp_path / "after.json").read_text()))
    assert [r["identifier"][0]["value"] for r in by_type(after, "ImagingStudy")] == [f"urn:oid:{studies['b']}"]


def test_a_rescreen_rewrites_the_study_bundle_with_the_new_results(fhir_run, tmp_path, untrained_settings, models):
    from worker.embedded import rescreen
    from worker.pipeline import Pipeline

    out, folder, studies = fhir_run
    copy = tmp_path / "out"
    copy.mkdir()
    shutil.copy(out / "neuron.db", copy / "neuron.db")
    settings = untrained_settings.with_(out_dir=copy, fhir_out=tmp_path / "fhir")
    (b,) = db_rows(copy, "SELECT sop_instance_uid FROM instances WHERE study_instance_uid = ?", studies["b"])
    report = rescreen([b[0]], settings, Pipeline(models, settings))
    assert report.screened == 1 and report.fhir_written == 1 and report.fhir_failed == 0
    (written,) = (tmp_path / "fhir").iterdir()
    assert written.name == f"{study_key(studies['b'])}.json"
    new = {r["id"]: r for r in bundle_resources(json.loads(written.read_text()))}
    old = {r["id"]: r for r in bundle_resources(json.loads((folder / written.name).read_text()))}
    assert new.keys() == old.keys()  # the same findings of the same study: the same resources, screened anew
    for rid, resource in new.items():
        if resource["resourceType"] == "Observation":
            assert resource["issued"] > old[rid]["issued"]
            assert abs(resource["valueQuantity"]["value"] - old[rid]["valueQuantity"]["value"]) < 1e-5
    assert db_rows(copy, "SELECT address, target FROM audit WHERE action = 'export' AND study_instance_uid = ? "
                         "ORDER BY id DESC LIMIT 1", studies["b"])[0][0].startswith("rescreen@")


def test_instances_indexed_without_a_study_or_series_uid_are_left_out_or_unlisted_and_the_export_says_so(
        fhir_run, tmp_path):
    out, _, studies = fhir_run
    copy = tmp_path / "out"
    copy.mkdir()
    shutil.copy(out / "neuron.db", copy / "neuron.db")
    with sqlite3.connect(copy / "neuron.db") as conn:  # as producer.scan indexes a header without them
        conn.execute("UPDATE instances SET study_instance_uid = '' WHERE study_instance_uid = ?", (studies["b"],))
        (a1,) = conn.execute("SELECT sop_instance_uid FROM instances WHERE study_instance_uid = ? "
                             "ORDER BY sop_instance_uid LIMIT 1", (studies["a"],)).fetchone()
        conn.execute("UPDATE instances SET series_instance_uid = '' WHERE sop_instance_uid = ?", (a1,))
    (unplaced,) = db_rows(copy, "SELECT COUNT(*) FROM findings WHERE positive = 1 AND study_instance_uid = ''")[0]
    result = cli("export", "--out", str(copy), "-o", str(tmp_path / "x.json"))
    assert result.exit_code == 0, result.output
    assert unplaced > 0 and f"{unplaced} positive findings of instances indexed without a Study Instance UID left " \
                              f"out" in result.said
    resources = bundle_resources(json.loads((tmp_path / "x.json").read_text()))
    (imaging,) = by_type(resources, "ImagingStudy")
    assert imaging["identifier"][0]["value"] == f"urn:oid:{studies['a']}" and imaging["numberOfInstances"] == 1
    assert a1 not in {i["uid"] for s in imaging["series"] for i in s["instance"]}
    from_a1 = [o for o in by_type(resources, "Observation") if a1 in o["derivedFrom"][0]["display"]]
    assert from_a1 and all([e["url"] for e in o["extension"][0]["extension"]] == ["sopInstanceUid", "frameNumber"]
                           for o in from_a1)


def test_a_study_with_an_instance_still_to_screen_waits_for_it_unless_asked_as_it_stands(fhir_run, tmp_path,
                                                                                        untrained_settings):
    from db.store import Database
    from worker.fhir_out import FhirWriter

    out, _, studies = fhir_run
    copy = tmp_path / "out"
    copy.mkdir()
    shutil.copy(out / "neuron.db", copy / "neuron.db")
    with sqlite3.connect(copy / "neuron.db") as conn:  # as a run finds it while the study's second image waits
        conn.execute("UPDATE instances SET status = 'pending' WHERE sop_instance_uid = (SELECT MIN(sop_instance_uid) "
                     "FROM instances WHERE study_instance_uid = ?)", (studies["a"],))
    settings = untrained_settings.with_(out_dir=copy, fhir_out=tmp_path / "fhir")
    db = Database(settings.resolved_database_url)
    try:
        writer = FhirWriter(settings, db, "run")
        report, left = writer.write(studies.values(), complete_only=True)  # neuron run, listen, pull
        assert left == {studies["a"]} and [p.name for p in report.written] == [f"{study_key(studies['b'])}.json"]
        report, left = writer.write([studies["a"]])  # neuron worker; and the run's close for what is left
        assert not left and [p.name for p in report.written] == [f"{study_key(studies['a'])}.json"]
    finally:
        db.dispose()
