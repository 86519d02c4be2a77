"""Findings as FHIR R4 resources: ``neuron export --format fhir`` (a Bundle of type collection, or NDJSON as FHIR
Bulk Data exports write it) and ``--fhir-out`` (one Bundle per screened study, ``worker.fhir_out``).

    committed results (the ``findings`` view, the study's instances and studies row)
        ──► ImagingStudy per study: identifier urn:oid:<Study Instance UID> (and the accession number), the screened
              series and instances with their SOP classes
        ──► Device per model and weights: the model's name, its weights' sha256 (or "untrained") as version
        ──► Observation per finding at or above ``neuron.work.POSITIVE``: the label's code, the probability as
              valueQuantity, its standard deviation and needs_review as components, the body site, derivedFrom the
              ImagingStudy, the Device that produced it, the image and frame it was read from

The shape is the one the HL7 "DICOM SR to FHIR Resource Mapping" implementation guide
(https://build.fhir.org/ig/HL7/dicom-sr/mapping.html) gives a TID 1500 measurement report such as the one
``worker.dicom_out`` writes: a measurement group becomes an Observation whose identifier is the group's tracking UID
(``neuron.codes.finding_uid``, the same UID as in the SR), whose code is the finding's code (the same ``99NEURON``
code as in the SR), whose value is the measurement, whose ``device`` is the algorithm (TID 4019) as a Device, and
which is derived from the study. That guide is written for R5, where an Observation points at the exact image and
frame through an ImagingSelection; R4 has no ImagingSelection (https://hl7.org/fhir/R4/observation.html:
derivedFrom takes DocumentReference, ImagingStudy, Media, QuestionnaireResponse, Observation, MolecularSequence), so
here ``derivedFrom`` names the ImagingStudy, which lists the instance, and the series, instance and frame ride in
the ``SOURCE_IMAGE`` extension. R4's ``Observation.performer`` takes no Device, so the model is the Observation's
``device``, as the guide maps TID 4019.

Nobody is named. Neuron stores no patient identity, so an Observation has no subject, and the ImagingStudy (whose
subject R4 requires) carries the data-absent-reason "masked"; only where the study was indexed with
``--patient-key`` is the subject a logical reference by that pseudonym (HMAC-SHA256 of the Patient ID).

Untrained weights cannot be missed: their Device and each of their Observations carry the meta tag ``UNTRAINED``
and a note that says the numbers mean nothing, the Device's version is "untrained", and the Observation's status is
``preliminary`` (as it is for a finding that needs review or a study with instances still to screen; ``final``
otherwise).

Resources are plain dicts, not fhir.resources models: a run's output path must not load a validation library that
defines every FHIR resource (pydantic models for all of R5, R4B and STU3; it would be a runtime dependency for what
is a few dicts per study), and the dicts are what is written. The tests parse every resource with fhir.resources'
R4B classes (R4B shares R4's Observation, ImagingStudy, Device and Bundle), which validates them.

Ids are UUIDs derived from what each resource stands for (a study, a model and weights, a finding), so a re-export
or a rewritten Bundle gives the same ids and a FHIR server updates instead of duplicating. Inside a Bundle references
are ``urn:uuid:<id>``, resolved by each entry's fullUrl; in NDJSON, where there is no Bundle, they are
``Type/<id>``.
"""

from __future__ import annotations

import functools
import json
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

import neuron
from db.export import ExportRefused, check_condition, condition_refused, read_only, view_columns
from db.schema import chunks, utcnow
from db.studies import WAITING
from neuron.codes import SYSTEM, finding_uid, label_code, study_key
from neuron.work import POSITIVE

SUFFIXES = {".json": "bundle", ".ndjson": "ndjson"}
STUDY_CHUNK = 200  # studies read per query: their instances, findings and devices stay small in memory

UCUM = "http://unitsofmeasure.org"
DCM = "http://dicom.nema.org/resources/ontology/DCM"
SCT = "http://snomed.info/sct"
DICOM_UID = "urn:dicom:uid"
RFC3986 = "urn:ietf:rfc:3986"
CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
IDENTIFIER_TYPE = "http://terminology.hl7.org/CodeSystem/v2-0203"
YES_NO = "http://terminology.hl7.org/CodeSystem/v2-0136"
DATA_ABSENT = "http://hl7.org/fhir/StructureDefinition/data-absent-reason"
PATIENT_KEY = "urn:neuron:patient-key"  # HMAC-SHA256(NEURON_PATIENT_KEY, Patient ID), only with --patient-key
MODEL_SYSTEM = "urn:neuron:model"
TAGS = "urn:neuron:tag"
SOURCE_IMAGE = "urn:neuron:fhir:source-image"  # the series, instance and frame a finding was read from
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:neuron:fhir")

NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSTIC USE: automated screening; a radiologist reads the images."
UNTRAINED_NOTE = ("UNTRAINED model weights (--weights untrained): this probability means nothing about the patient; "
                  "it is not a screening result.")
UNTRAINED_TAG = {"system": TAGS, "code": "UNTRAINED", "display": "untrained model weights: results mean nothing"}
# Body Part Examined -> SNOMED CT, as DICOM PS3.16 Annex L maps it; only the body parts Neuron's routes read
BODY_SITES = {"CHEST": ("51185008", "Chest")}
CHEST_ROUTE = "chest-xray"
NO_UNIT = {"unit": "1", "system": UCUM, "code": "1"}  # UCUM's unity: a probability, a standard deviation of one
COMPONENTS = {
    "sd": {"coding": [{"system": SCT, "code": "386136009", "display": "Standard Deviation"}],
           "text": "spread over test-time augmentation views and MC-dropout samples"},
    "review": {"coding": [{"system": SYSTEM, "code": "NEEDS-REVIEW", "display": "Needs review"}]},
    "ood": {"coding": [{"system": SYSTEM, "code": "OOD-SCORE", "display": "Out-of-distribution score"}]},
}

_FINDING_COLUMNS = ("study_instance_uid, series_instance_uid, sop_instance_uid, frame, model, weights, label, "
                    "probability, uncertainty, preprocessing, untrained, needs_review, review_reason, ood_score, "
                    "processed_at")


class FhirRefused(ExportRefused):
    """A FHIR export that cannot run as asked (format, view); the message says what to change. Exit code 2."""


@functools.lru_cache(maxsize=4096)  # a study's and a model's ids are asked for once per finding
def resource_id(*parts: object) -> str:
    """The id of the resource that stands for ``parts``: the same parts, the same id."""
    return str(uuid.uuid5(NAMESPACE, "|".join(map(str, parts))))


def bundle_reference(kind: str, rid: str) -> str:
    return f"urn:uuid:{rid}"


def relative_reference(kind: str, rid: str) -> str:
    return f"{kind}/{rid}"


Reference = Callable[[str, str], str]


# -- what is read ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FindingRow:
    """One positive row of the ``findings`` view."""

    study_uid: str
    series_uid: str
    sop_uid: str
    frame: int
    model: str
    weights: str
    label: str
    probability: float
    uncertainty: float
    config_hash: str
    untrained: bool
    needs_review: bool
    review_reason: str | None
    ood_score: float | None
    processed_at: datetime | str

    @classmethod
    def of(cls, r: Sequence) -> FindingRow:
        return cls(r[0], r[1], r[2], int(r[3]), r[4], r[5], r[6], float(r[7]), float(r[8]), r[9], bool(r[10]),
                   bool(r[11]), r[12], None if r[13] is None else float(r[13]), r[14])


@dataclass(frozen=True)
class InstanceRow:
    series_uid: str
    sop_uid: str
    sop_class_uid: str | None
    modality: str | None
    body_part: str | None
    route: str | None


@dataclass
class StudyContext:
    """What the resources of a study say besides its findings: the header values kept in ``studies`` (no patient
    identity but the optional pseudonym), its screened instances, the models that screened it, and whether any of
    its instances is still to be screened."""

    uid: str
    study_date: date | str | None = None
    accession: str | None = None
    patient_key: str | None = None
    instances: list[InstanceRow] = field(default_factory=list)
    devices: set[tuple[str, str, bool]] = field(default_factory=set)
    open: bool = False


@dataclass
class StudyResources:
    uid: str
    imaging_study: dict
    devices: list[dict]
    observations: list[dict]
    open: bool  # instances of the study are still to be screened

    def resources(self) -> list[dict]:
        return [self.imaging_study, *self.devices, *self.observations]


def _where_sql(where: str | None) -> str:
    """The findings the user's condition selects, positive or not, as a subquery; the condition on lines of its
    own with its colons escaped (``db.export`` does the same)."""
    if where is None or not where.strip():
        return "findings"
    return "(SELECT * FROM findings WHERE (\n" + where.replace(":", "\\:") + "\n))"


def _positive_rows(conn: Connection, studies: Sequence[str], where: str | None) -> Iterator[FindingRow]:
    q = sa.text(f"SELECT {_FINDING_COLUMNS} FROM {_where_sql(where)} x WHERE x.positive = 1 "
                f"AND x.study_instance_uid IN :studies ORDER BY x.study_instance_uid, x.sop_instance_uid, x.frame, "
                f"x.model, x.rank").bindparams(sa.bindparam("studies", expanding=True))
    for r in conn.execute(q, {"studies": list(studies)}):
        yield FindingRow.of(r)


_INSTANCES = sa.text(
    "SELECT i.study_instance_uid, i.series_instance_uid, i.sop_instance_uid, i.sop_class_uid, i.modality, "
    "i.body_part, i.route, i.status, EXISTS (SELECT 1 FROM predictions p WHERE p.sop_instance_uid = "
    "i.sop_instance_uid) FROM instances i WHERE i.study_instance_uid IN :studies "
    "ORDER BY i.study_instance_uid, i.series_instance_uid, i.sop_instance_uid").bindparams(
    sa.bindparam("studies", expanding=True))
_STUDIES = sa.text("SELECT study_instance_uid, study_date, accession_number, patient_key FROM studies "
                   "WHERE study_instance_uid IN :studies").bindparams(sa.bindparam("studies", expanding=True))
_DEVICES = sa.text("SELECT DISTINCT i.study_instance_uid, p.model, p.weights, p.untrained FROM predictions p "
                   "JOIN instances i ON i.sop_instance_uid = p.sop_instance_uid "
                   "WHERE i.study_instance_uid IN :studies").bindparams(sa.bindparam("studies", expanding=True))


def _contexts(conn: Connection, studies: Sequence[str]) -> dict[str, StudyContext]:
    found = {uid: StudyContext(uid) for uid in studies}
    args = {"studies": list(studies)}
    for uid, series, sop, sop_class, modality, body_part, route, status, screened in conn.execute(_INSTANCES, args):
        ctx = found[uid]
        ctx.open = ctx.open or status in WAITING
        if screened:
            ctx.instances.append(InstanceRow(series, sop, sop_class, modality, body_part, route))
    for uid, study_date, accession, patient_key in conn.execute(_STUDIES, args):
        ctx = found[uid]
        ctx.study_date, ctx.accession, ctx.patient_key = study_date, accession, patient_key
    for uid, model, weights, untrained in conn.execute(_DEVICES, args):
        found[uid].devices.add((model, weights, bool(untrained)))
    return found


def read_studies(conn: Connection, study_uids: Iterable[str], where: str | None = None,
                 ref: Reference = bundle_reference) -> Iterator[StudyResources]:
    """The resources of each of these studies that has screened instances, ``STUDY_CHUNK`` studies per query, in
    the order given: an ImagingStudy, its Devices and an Observation per positive finding that ``where`` (an SQL
    condition over the ``findings`` view, already checked) selects. Instances indexed without a Study Instance UID
    (``producer.scan`` keeps them: the SOP Instance UID identifies them) belong to no study an EHR knows, so they
    have none of these resources (``unplaced`` counts their findings in an export)."""
    for chunk in chunks((uid for uid in study_uids if uid), STUDY_CHUNK):
        contexts = _contexts(conn, chunk)
        rows: dict[str, list[FindingRow]] = {}
        for row in _positive_rows(conn, chunk, where):
            rows.setdefault(row.study_uid, []).append(row)
        for uid in chunk:
            ctx = contexts[uid]
            if not ctx.instances:
                continue
            yield StudyResources(uid, imaging_study(ctx, ref), [device(*d) for d in sorted(ctx.devices)],
                                 [observation(r, ctx, ref) for r in rows.get(uid, [])], ctx.open)


# -- the resources ---------------------------------------------------------------------------------------------------
def _instant(value: datetime | str) -> str:
    """A timestamp as FHIR's instant: UTC with its zone (SQLite gives naive UTC text or datetimes)."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    value = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    return value.isoformat()


def _date(value: date | str | None) -> str | None:
    if value is None:
        return None
    return value.isoformat()[:10] if isinstance(value, date) else str(value)[:10]


def _subject(ctx: StudyContext, required: bool) -> dict | None:
    """A logical reference by the study's pseudonym, or (where R4 requires a subject) why there is none."""
    if ctx.patient_key:
        return {"type": "Patient", "identifier": {"system": PATIENT_KEY, "value": ctx.patient_key}}
    if not required:
        return None
    return {"extension": [{"url": DATA_ABSENT, "valueCode": "masked"}],
            "display": "not identified: Neuron keeps no patient identity"}


def _modality(code: str | None) -> dict:
    return {"system": DCM, "code": (code or "OT").strip() or "OT"}


def _body_site(instance: InstanceRow) -> tuple[dict | None, str | None]:
    """(SNOMED coding, text) of the body part: BodyPartExamined as Annex L maps it, or the chest that the chest
    route implies when the header left it out."""
    part = (instance.body_part or "").strip().upper()
    stated = bool(part)
    if not part and instance.route == CHEST_ROUTE:
        part = "CHEST"
    if not part:
        return None, None
    code = BODY_SITES.get(part)
    text = part if stated else f"{part} (the chest X-ray route's; BodyPartExamined absent)"
    coding = {"system": SCT, "code": code[0], "display": code[1]} if code else None
    return coding, text


def imaging_study(ctx: StudyContext, ref: Reference) -> dict:
    """The study as R4 ImagingStudy: identified by its UID (the way the DICOM SR IG links every resource to it) and
    its accession number, with the instances Neuron screened."""
    series: dict[str, list[InstanceRow]] = {}
    for inst in ctx.instances:  # an instance indexed without a Series Instance UID has no series to be listed in
        if inst.series_uid:
            series.setdefault(inst.series_uid, []).append(inst)
    modalities = sorted({(i.modality or "OT").strip() or "OT" for i in ctx.instances})
    identifiers = [{"system": DICOM_UID, "value": f"urn:oid:{ctx.uid}"}]
    if ctx.accession:
        identifiers.append({"type": {"coding": [{"system": IDENTIFIER_TYPE, "code": "ACSN"}]},
                            "value": ctx.accession})
    study = {"resourceType": "ImagingStudy", "id": resource_id("study", ctx.uid), "identifier": identifiers,
             "status": "available", "modality": [_modality(m) for m in modalities],
             "subject": _subject(ctx, required=True)}
    started = _date(ctx.study_date)
    if started:
        study["started"] = started
    study["numberOfSeries"] = len(series)
    study["numberOfInstances"] = sum(len(i) for i in series.values())
    if series:
        study["series"] = []
    for uid, instances in series.items():
        entry = {"uid": uid, "modality": _modality(instances[0].modality), "numberOfInstances": len(instances)}
        coding, _ = _body_site(instances[0])
        if coding is not None:
            entry["bodySite"] = coding
        entry["instance"] = [{"uid": i.sop_uid, "sopClass": {"system": RFC3986, "code": f"urn:oid:{i.sop_class_uid}"}
                              if i.sop_class_uid else {"extension": [{"url": DATA_ABSENT, "valueCode": "unknown"}]}}
                             for i in instances]
        study["series"].append(entry)
    return study


def device(model: str, weights: str, untrained: bool) -> dict:
    """The model with these weights as R4 Device: its name, the weights' sha256 (or "untrained") as its version."""
    resource = {"resourceType": "Device", "id": resource_id("device", model, weights)}
    if untrained:
        resource["meta"] = {"tag": [UNTRAINED_TAG]}
    resource.update({
        "identifier": [{"system": MODEL_SYSTEM, "value": f"{model}@{weights}"}],
        "status": "active", "manufacturer": "Neuron",
        "deviceName": [{"name": model, "type": "model-name"}],
        "type": {"text": "automated image screening model"},
        "version": [{"type": {"text": "weights sha256"}, "value": weights},
                    {"type": {"text": "neuron"}, "value": neuron.__version__}],
        "property": [{"type": {"coding": [{"system": SYSTEM, "code": "UNTRAINED", "display": "Untrained weights"}]},
                      "valueCode": [{"coding": [{"system": YES_NO, "code": "Y" if untrained else "N"}],
                                     "text": "untrained" if untrained else "trained"}]}],
    })
    notes = [NOT_FOR_DIAGNOSIS] + ([UNTRAINED_NOTE] if untrained else [])
    resource["note"] = [{"text": t} for t in notes]
    return resource


def observation(row: FindingRow, ctx: StudyContext, ref: Reference) -> dict:
    """One positive finding as R4 Observation (module docstring)."""
    tracking = finding_uid(row.sop_uid, row.frame, row.model, row.weights, row.label)
    final = not (row.untrained or row.needs_review or ctx.open)
    resource = {"resourceType": "Observation", "id": resource_id("finding", tracking)}
    if row.untrained:
        resource["meta"] = {"tag": [UNTRAINED_TAG]}
    source = [{"url": "seriesUid", "valueId": row.series_uid}] if row.series_uid else []
    resource["extension"] = [{"url": SOURCE_IMAGE, "extension": [
        *source, {"url": "sopInstanceUid", "valueId": row.sop_uid}, {"url": "frameNumber",
                                                                     "valuePositiveInt": row.frame + 1}]}]
    resource.update({
        "identifier": [{"system": DICOM_UID, "value": f"urn:oid:{tracking}"}],
        "status": "final" if final else "preliminary",
        "category": [{"coding": [{"system": CATEGORY, "code": "imaging", "display": "Imaging"}]}],
        "code": {"coding": [{"system": SYSTEM, "code": label_code(row.label), "display": row.label}],
                 "text": row.label},
    })
    subject = _subject(ctx, required=False)
    if subject is not None:
        resource["subject"] = subject
    started = _date(ctx.study_date)
    if started:
        resource["effectiveDateTime"] = started
    resource["issued"] = _instant(row.processed_at)
    resource["valueQuantity"] = {"value": row.probability, **NO_UNIT}
    resource["interpretation"] = [{"coding": [{"system": INTERPRETATION, "code": "POS", "display": "Positive"}],
                                   "text": f"probability at or above the positive threshold {POSITIVE}"}]
    notes = ([UNTRAINED_NOTE] if row.untrained else []) + [NOT_FOR_DIAGNOSIS]
    if row.needs_review:
        notes.append(f"Needs review: {row.review_reason or 'uncertainty above the review threshold'}.")
    resource["note"] = [{"text": t} for t in notes]
    instance = next((i for i in ctx.instances if i.sop_uid == row.sop_uid), None)
    coding, text = _body_site(instance) if instance is not None else (None, None)
    if text is not None:
        resource["bodySite"] = {"coding": [coding], "text": text} if coding else {"text": text}
    resource["method"] = {"text": f"{row.model}, pipeline settings {row.config_hash}"}
    resource["device"] = {"reference": ref("Device", resource_id("device", row.model, row.weights)),
                          "display": row.model}
    resource["derivedFrom"] = [{"reference": ref("ImagingStudy", resource_id("study", row.study_uid)),
                                "display": f"frame {row.frame + 1} of instance {row.sop_uid}"}]
    components = [{"code": COMPONENTS["sd"], "valueQuantity": {"value": row.uncertainty, **NO_UNIT}},
                  {"code": COMPONENTS["review"], "valueBoolean": row.needs_review}]
    if row.ood_score is not None:
        components.append({"code": COMPONENTS["ood"], "valueQuantity": {"value": row.ood_score, **NO_UNIT}})
    resource["component"] = components
    return resource


# -- writing ---------------------------------------------------------------------------------------------------------
def entry(resource: dict) -> dict:
    return {"fullUrl": bundle_reference(resource["resourceType"], resource["id"]), "resource": resource}


def bundle(resources: Iterable[dict]) -> dict:
    """A FHIR Bundle of type collection; FHIR's JSON has no empty arrays, so an empty one has no ``entry``."""
    out = {"resourceType": "Bundle", "type": "collection", "timestamp": utcnow().isoformat()}
    entries = [entry(r) for r in resources]
    if entries:
        out["entry"] = entries
    return out


def atomic_write(path: Path, chunks_of_text: Iterable[str]) -> None:
    """The file appears under its name only once complete (a temporary name beside it, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.partial")  # hosts share DIR
    try:
        with open(partial, "w", encoding="utf-8") as fh:
            for text in chunks_of_text:
                fh.write(text)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def study_bundle_path(folder: Path, study_uid: str) -> Path:
    """Where ``--fhir-out`` writes a study's Bundle: named by the same hash as its DICOM output folder."""
    return Path(folder) / f"{study_key(study_uid)}.json"


@dataclass
class ExportReport:
    studies: int = 0
    observations: int = 0
    devices: int = 0
    resources: int = 0
    unplaced: int = 0  # positive findings of instances indexed without a Study Instance UID: left out


def output_kind(path: Path) -> str:
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise FhirRefused(f"output {str(path)!r}: a FHIR export is a Bundle (.json) or NDJSON (.ndjson), not "
                          f"{path.suffix or 'a file without a suffix'}; name it e.g. findings.json or "
                          f"findings.ndjson")
    return kind


def export(url: str, where: str | None, output: Path, view: str = "findings") -> ExportReport:
    """Write the positive findings that ``where`` selects, with their studies and models, to ``output``: a Bundle
    of type collection (.json) or one resource per line (.ndjson). Read-only and on a connection of its own, as
    ``db.export.export``."""
    kind = output_kind(output)
    if view != "findings":
        raise FhirRefused(f"--view {view!r}: a FHIR export is made of findings; leave --view out (or give "
                          f"--view findings) and select with --where")
    if where is not None:
        check_condition(where)
    engine = sa.create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            read_only(conn)
            columns = view_columns(conn, "findings")
            try:
                return _export(conn, where, output, kind)
            except DBAPIError as exc:
                raise condition_refused(where, "findings", columns, exc) from None
            finally:
                conn.rollback()
    finally:
        engine.dispose()


def _export(conn: Connection, where: str | None, output: Path, kind: str) -> ExportReport:
    studies = [r[0] for r in conn.execute(sa.text(
        f"SELECT DISTINCT x.study_instance_uid FROM {_where_sql(where)} x WHERE x.positive = 1 ORDER BY 1"))]
    report = ExportReport()
    if "" in studies:
        report.unplaced = conn.execute(sa.text(f"SELECT COUNT(*) FROM {_where_sql(where)} x WHERE x.positive = 1 "
                                               f"AND x.study_instance_uid = ''")).scalar_one()
    ref = bundle_reference if kind == "bundle" else relative_reference
    seen_devices: set[str] = set()

    def resources() -> Iterator[dict]:
        for study in read_studies(conn, studies, where, ref):
            report.studies += 1
            report.observations += len(study.observations)
            yield study.imaging_study
            for d in study.devices:
                if d["id"] not in seen_devices:
                    seen_devices.add(d["id"])
                    report.devices += 1
                    yield d
            yield from study.observations

    def text() -> Iterator[str]:
        if kind == "ndjson":
            for resource in resources():
                report.resources += 1
                yield json.dumps(resource, separators=(",", ":")) + "\n"
            return
        head = bundle(())
        yield json.dumps(head)[:-1]  # the Bundle without its closing brace; the entries follow
        for resource in resources():
            yield (',\n"entry":[\n' if report.resources == 0 else ",\n") + json.dumps(entry(resource))
            report.resources += 1
        yield "\n]}\n" if report.resources else "}\n"

    atomic_write(output, text())
    return report
