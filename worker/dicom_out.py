"""DICOM outputs for a PACS (``--dicom-out DIR``): per screened frame a Secondary Capture with the heatmap burned in,
per study a TID 1500 measurement report (Comprehensive SR) with every finding.

    committed results (the ``findings`` view) + each source file's header (no pixels)
        ──► SC per (instance, frame, model): the rank-1 heatmap overlay, enlarged, under a band of burned-in text
              ("NOT FOR DIAGNOSTIC USE", model, finding p +/- sd, UNTRAINED); SourceImageSequence -> the source
        ──► SR per study: one measurement group per finding row (label, probability, its standard deviation,
              the source image and frame, the algorithm: model, weights sha256 or "untrained", settings hash)
        ──► DIR/<study hash>/sc-<hash>.dcm, DIR/<study hash>/sr.dcm, written atomically (temp file + rename)

Only written for results already in the database, so what a PACS receives is what ``findings`` says. File names are
hashes of UIDs and model identity, never anything from the header; patient and study attributes are copied from the
source into the objects (a PACS files them by those) but never reach a file name or a log line. File names follow
the natural key of the results (instance, frame, model, weights; study): a re-run overwrites the same files. UIDs
follow the content identity (plus the settings hash; for the SR every finding it holds), so the same results give the
same UIDs and changed ones new UIDs, as DICOM requires of changed content.

How: highdicom builds each kind of object (``sc_with_highdicom``, ``sr_with_highdicom``), but only once per model,
weights, settings and character set, from placeholder values: that object, encoded, is the template
(``ScTemplate``, ``SrTemplate``), and a study's objects are the template's bytes with the study's values encoded
into the places the placeholders held. Building an SR with highdicom costs ~0.25 s of CPU per screened image (its
content items check and copy themselves, and pydicom encodes each one); filling its template, tens of microseconds
per finding. A template is checked when it is made: filled with a second set of values it must give what highdicom
builds from those values, attribute for attribute, or no output of that kind is written (the reason is logged).
highdicom still checks what comes from outside per study: each source reference, each new label.

When: ``neuron run`` hands each committed result to ``BackgroundOutputs``, processes that write the SCs while the
run screens and a study's SR once none of its instances waits (the run's last pass writes the rest, PARTIAL where
an instance still waits); ``neuron worker`` hands each task's committed instances to the same kind of processes,
which write their SCs and rewrite the study's SR with every finding the database holds by then (PARTIAL while
instances of the study wait to be screened, COMPLETE after). A study's writes stay in one process, in commit order;
across workers the last SR written wins, and the study's next task rewrites it.

A failure for one image or study (source file gone, heatmap missing, an attribute highdicom refuses) is logged with
the reason and the study's output folder, and never stops the run or touches the results in the database.

Only imported when ``dicom_out`` is set: highdicom and OpenCV load here, not in the screening path.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import logging
import os
import signal
import struct
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import highdicom as hd
import numpy as np
import pydicom
from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom.charset import convert_encodings, encode_string
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.sr.codedict import codes
from pydicom.tag import Tag
from pydicom.uid import generate_uid
from pydicom.valuerep import format_number_as_ds
from sqlalchemy import bindparam, text

import neuron
from db.store import Database
from db.studies import study_of
from neuron.errors import ConfigError
from neuron.settings import Settings

log = logging.getLogger(__name__)

MANUFACTURER = "Neuron"
NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSTIC USE"
SCHEME = "99NEURON"  # private coding scheme for the labels; declared in the SR's CodingSchemeIdentificationSequence
SC_SERIES_NUMBER, SR_SERIES_NUMBER = 9001, 9002
SC_SIZE = 512  # the overlay (the model's input size, e.g. 224) is enlarged to this so the burned-in text is legible
BAND_LINE = 26  # pixels per line of burned-in text
FINDING_LINE = 2  # the band's only line that changes from image to image (``band_lines``)
LOCK_STRIPES = 64
TEMPLATES = 64  # templates kept per writer (a long-lived worker meets few models, settings and character sets)

PROBABILITY = CodedConcept("PROB", SCHEME, "Probability of finding")
SCREENING = CodedConcept("SCREEN", SCHEME, "Automated image screening, not for diagnostic use")
SOURCE_IMAGE_FOR_PROCESSING = CodedConcept("121322", "DCM", "Source image for image processing operation")

# Patient and study attributes copied from the source as they are: highdicom's constructors would check (and log!)
# the patient's name, so the objects are built without them and these are set afterwards.
PATIENT_STUDY_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "TypeOfPatientID",
    "PatientBirthDate", "PatientBirthTime", "PatientSex", "OtherPatientIDsSequence", "PatientComments",
    "PatientSpeciesDescription", "PatientBreedDescription", "ResponsiblePerson", "ResponsibleOrganization",
    "PatientIdentityRemoved", "DeidentificationMethod", "DeidentificationMethodCodeSequence",
    "PatientAge", "PatientSize", "PatientWeight",
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID", "AccessionNumber",
    "IssuerOfAccessionNumberSequence", "StudyDescription", "ProcedureCodeSequence",
)
_HIGHDICOM_READS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                    "StudyDate", "StudyTime")
_FINDINGS_SQL = text(
    "SELECT study_instance_uid, series_instance_uid, sop_instance_uid, frame, file_path, model, weights, label, "
    "probability, uncertainty, rank, heatmap_path, preprocessing, untrained, needs_review "
    "FROM findings WHERE study_instance_uid IN :studies "
    "ORDER BY study_instance_uid, sop_instance_uid, frame, model, rank").bindparams(bindparam("studies",
                                                                                         expanding=True))
_OPEN_SQL = text("SELECT DISTINCT study_instance_uid FROM instances WHERE study_instance_uid IN :studies "
                 "AND status IN ('pending', 'queued')").bindparams(bindparam("studies", expanding=True))


@dataclass(frozen=True)
class Finding:
    """One row of the ``findings`` view."""

    study_uid: str
    series_uid: str
    sop_uid: str
    frame: int
    file_path: str
    model: str
    weights: str
    label: str
    probability: float
    uncertainty: float
    rank: int
    heatmap_path: str | None
    config_hash: str
    untrained: bool
    needs_review: bool

    @property
    def image_key(self) -> tuple[str, int, str, str]:
        return self.sop_uid, self.frame, self.model, self.weights

    @property
    def model_key(self) -> tuple[str, str, str, bool]:
        """What the algorithm's description depends on: one template serves every finding with the same key."""
        return self.model, self.weights, self.config_hash, self.untrained


@dataclass
class DicomReport:
    """What one ``write`` did: paths written and (study folder, reason) for what was not."""

    written: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    reports: list[str] = field(default_factory=list)  # the studies whose SR was written


def _digest(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()


def _uid(*parts: object) -> str:
    """A UID that is the same for the same parts (pydicom's prefix + a hash of them)."""
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def _reason(exc: BaseException) -> str:
    """Why, without the path or values from the file: OSErrors give their strerror, others their message."""
    if isinstance(exc, OSError):
        return f"{type(exc).__name__}: {exc.strerror or 'I/O error'}"
    return f"{type(exc).__name__}: {exc}"


def _multiframe(src: Dataset) -> bool:
    return int(src.get("NumberOfFrames", 1) or 1) > 1


def _charset(src: Dataset) -> tuple[str, ...]:
    """The source's Specific Character Set, which the outputs take over: every text is encoded in it."""
    value = src.get("SpecificCharacterSet")
    return () if value is None else (value,) if isinstance(value, str) else tuple(value)


def _copy_patient_and_study(dst: Dataset, src: Dataset) -> None:
    if "SpecificCharacterSet" in src:
        dst.SpecificCharacterSet = src.SpecificCharacterSet
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword in src:
            dst[keyword] = src[keyword]


def _anonymous_stub(src: Dataset) -> Dataset:
    """The header with its patient and study attributes (but the Study UID) emptied: what highdicom is given, so
    that it neither checks nor logs them. The attributes it reads unconditionally are present, empty."""
    stub = Dataset()
    stub.update(src)
    for keyword in PATIENT_STUDY_KEYWORDS:
        if keyword != "StudyInstanceUID" and keyword in stub:
            del stub[keyword]
    for keyword in _HIGHDICOM_READS:
        setattr(stub, keyword, None)
    return stub


# -- the values both ways of building share ------------------------------------------------------------------------
def _finding_text(f: Finding) -> str:
    return f"{f.label} p={f.probability:.2f} +/- {f.uncertainty:.2f}"


def _algorithm_parameters(f: Finding) -> list[str]:
    weights = "untrained (no trained weights; results are meaningless)" if f.untrained else f"sha256 {f.weights}"
    return [f"weights {weights}", f"pipeline settings {f.config_hash}", f"neuron {neuron.__version__}"]


def _label_code(label: str) -> CodedConcept:
    return CodedConcept(_digest("label", label)[:12].upper(), SCHEME, label[:64])


def _tracking(f: Finding) -> tuple[str, str]:
    """The finding's tracking UID and identifier (TID 1501): the same finding keeps them across re-runs."""
    return (_uid("neuron-finding", f.sop_uid, f.frame, f.model, f.weights, f.label),
            f"{f.label} frame {f.frame + 1} {f.model}"[:64])


def _models(rows: Sequence[Finding]) -> list[tuple[str, str]]:
    return sorted({(f.model, f.weights) for f in rows})


def _sr_uids(study: str, rows: Sequence[Finding]) -> tuple[str, str]:
    identity = sorted((f.sop_uid, f.frame, f.model, f.weights, f.label, f.config_hash, f.probability,
                       f.uncertainty) for f in rows)
    return _uid("neuron-sr-series", study), _uid("neuron-sr", study, _digest(*identity))


def _sc_values(top: Finding) -> dict[str, str]:
    """The secondary capture's UIDs and texts, all decided by its rank-1 finding."""
    params = "; ".join(_algorithm_parameters(top))
    return {
        "series_uid": _uid("neuron-sc-series", top.study_uid, top.model, top.weights, top.config_hash),
        "sop_uid": _uid("neuron-sc", top.sop_uid, top.frame, top.model, top.weights, top.config_hash),
        "contribution": f"class activation map of {top.label}; {params}",
        "comments": (f"{NOT_FOR_DIAGNOSIS}. {_finding_text(top)} by {top.model}"
                     + (" (UNTRAINED weights)" if top.untrained else "")),
        "derivation": (f"{NOT_FOR_DIAGNOSIS}. Class activation map of {top.label} (rank 1) of frame {top.frame + 1}, "
                       f"blended over the preprocessed image, by {top.model}; {params}"),
    }


def _tags(*keywords: str) -> frozenset[int]:
    return frozenset(tag_for_keyword(k) for k in keywords)


_PATIENT_STUDY = _tags("SpecificCharacterSet", *PATIENT_STUDY_KEYWORDS)
_SC_FROM_SOURCE = _PATIENT_STUDY | _tags("PatientOrientation", "BodyPartExamined", "Laterality")
_ORIENTATION, _BODY_PART, _LATERALITY = map(tag_for_keyword, ("PatientOrientation", "BodyPartExamined", "Laterality"))


def _sc_source_tags(src: Dataset) -> tuple[list[int], list[int]]:
    """What the secondary capture takes from its source besides the references: (the attributes copied as they are,
    those set empty because the source lacks them). Patient and study; orientation (the overlay is a centre crop of
    the source, resized: rows and columns keep their orientation); body part and laterality."""
    present = src.keys()
    empty = [] if _ORIENTATION in present else [_ORIENTATION]
    if _LATERALITY not in present and _BODY_PART not in present:  # type 2C: empty only when it cannot be known
        empty.append(_LATERALITY)
    return sorted(_SC_FROM_SOURCE & present), empty


def band_lines(top: Finding) -> list[tuple[str, tuple[int, int, int]]]:
    lines = [(NOT_FOR_DIAGNOSIS, (255, 64, 64)), (top.model, (255, 255, 255)), (_finding_text(top), (255, 255, 0))]
    if top.untrained:
        lines.append(("UNTRAINED weights: results are meaningless", (255, 64, 64)))
    return lines


def _put_line(band: np.ndarray, index: int, line: str, colour: tuple[int, int, int]) -> None:
    """Burn one line of text into its place in the band, shrunk to fit the width."""
    width = band.shape[1]
    scale = 0.65
    while scale > 0.3 and cv2.getTextSize(line, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)[0][0] > width - 12:
        scale -= 0.05
    cv2.putText(band, line, (6, BAND_LINE * (index + 1) - 7), cv2.FONT_HERSHEY_SIMPLEX, scale, colour, 1, cv2.LINE_AA)


def burn_in(overlay_rgb: np.ndarray, top: Finding) -> np.ndarray:
    """The overlay enlarged to ``SC_SIZE`` under a black band of text: the policy line, the model, the finding and,
    for untrained weights, UNTRAINED. The text sits in its own band so it hides none of the heatmap. (What
    ``ScTemplate.burn_in`` draws faster, with the lines that never change drawn once.)"""
    h, w = overlay_rgb.shape[:2]
    scale = SC_SIZE / max(h, w)
    image = cv2.resize(overlay_rgb, (round(w * scale), round(h * scale)), interpolation=cv2.INTER_LINEAR)
    lines = band_lines(top)
    band = np.zeros((BAND_LINE * len(lines) + 6, image.shape[1], 3), np.uint8)
    for i, (line, colour) in enumerate(lines):
        _put_line(band, i, line, colour)
    return np.ascontiguousarray(np.vstack([band, image]))


# -- the objects as highdicom builds them: the reference, and the source of every template -------------------------
def sc_with_highdicom(src: Dataset, top: Finding, pixels: np.ndarray) -> hd.sc.SCImage:
    """The secondary capture of one frame: ``pixels`` (``burn_in``) of its rank-1 finding ``top``."""
    values = _sc_values(top)
    equipment = hd.ContributingEquipment(
        MANUFACTURER, codes.DCM.ProcessingEquipment, manufacturer_model_name=top.model,
        software_versions=[f"neuron {neuron.__version__}"], contribution_description=values["contribution"])
    sc = hd.sc.SCImage(
        pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8, coordinate_system="PATIENT",
        study_instance_uid=src.StudyInstanceUID, series_instance_uid=values["series_uid"],
        series_number=SC_SERIES_NUMBER, sop_instance_uid=values["sop_uid"], instance_number=top.frame + 1,
        manufacturer=MANUFACTURER, patient_orientation=("A", "F"),  # replaced below by the source's
        contributing_equipment=[equipment], manufacturer_model_name=top.model[:64],
        software_versions=f"neuron {neuron.__version__}", series_description=f"Neuron heatmaps {NOT_FOR_DIAGNOSIS}")
    copied, empty = _sc_source_tags(src)
    for tag in copied:
        sc[tag] = src[tag]
    for tag in empty:
        sc.add_new(tag, dictionary_VR(tag), None)
    sc.BurnedInAnnotation = "YES"
    sc.RecognizableVisualFeatures = "NO"
    sc.ImageComments = values["comments"]
    sc.DerivationDescription = values["derivation"]
    reference = Dataset()
    reference.ReferencedSOPClassUID = src.SOPClassUID
    reference.ReferencedSOPInstanceUID = src.SOPInstanceUID
    if _multiframe(src):
        reference.ReferencedFrameNumber = top.frame + 1
    source = Dataset()
    source.update(reference)
    source.PurposeOfReferenceCodeSequence = [SOURCE_IMAGE_FOR_PROCESSING]
    sc.SourceImageSequence = [source]
    sc.ReferencedImageSequence = [reference]
    return sc


def sr_with_highdicom(study: str, rows: Sequence[Finding], headers: Mapping[str, Dataset],
                      partial: bool) -> hd.sr.ComprehensiveSR:
    """The measurement report of a study: one measurement group per finding row, in the rows' order; ``headers``
    holds the source header of each instance the rows name, the first one the report's patient and study."""
    evidence = {sop: _anonymous_stub(ds) for sop, ds in headers.items()}
    groups = [_group(f, headers[f.sop_uid]) for f in rows]
    models = _models(rows)
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=_uid("neuron-device", *models), name="Neuron", manufacturer_name=MANUFACTURER,
        model_name=", ".join(m for m, _ in models)[:64])
    context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    content = hd.sr.MeasurementReport(observation_context=context, procedure_reported=SCREENING,
                                      imaging_measurements=groups)
    scheme = CodingSchemeIdentificationItem(SCHEME, name="Neuron screening labels", responsible_organization="Neuron")
    series_uid, sop_uid = _sr_uids(study, rows)
    sr = hd.sr.ComprehensiveSR(
        evidence=list(evidence.values()), content=content, series_instance_uid=series_uid,
        series_number=SR_SERIES_NUMBER, sop_instance_uid=sop_uid, instance_number=1, manufacturer=MANUFACTURER,
        is_complete=not partial, coding_schemes=[scheme],
        content_qualification=hd.ContentQualificationValues.RESEARCH,
        series_description=f"Neuron findings {NOT_FOR_DIAGNOSIS}",
        manufacturer_model_name=", ".join(m for m, _ in models)[:64],
        software_versions=f"neuron {neuron.__version__}")
    _copy_patient_and_study(sr, next(iter(headers.values())))
    return sr


def _group(f: Finding, src: Dataset) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """One finding: its label, probability with standard deviation, the source image (and frame) and the
    algorithm."""
    spread = hd.sr.NumContentItem(name=codes.SCT.StandardDeviation, value=f.uncertainty, unit=codes.UCUM.NoUnits,
                                  relationship_type=hd.sr.RelationshipTypeValues.HAS_PROPERTIES)
    statistics = hd.sr.MeasurementStatisticalProperties(
        values=[spread], description="spread over test-time augmentation views and MC-dropout samples")
    properties = hd.sr.MeasurementProperties(measurement_statistical_properties=statistics)
    algorithm = hd.sr.AlgorithmIdentification(name=f.model, version=f.weights, parameters=_algorithm_parameters(f),
                                              manufacturer=MANUFACTURER)
    measurement = hd.sr.Measurement(name=PROBABILITY, value=f.probability, unit=codes.UCUM.NoUnits,
                                    properties=properties)  # the group's algorithm applies to it
    uid, identifier = _tracking(f)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier=identifier), finding_type=_label_code(f.label),
        algorithm_id=algorithm, measurements=[measurement], source_images=[_source_image(f, src)])


def _source_image(f: Finding, src: Dataset) -> hd.sr.SourceImageForMeasurementGroup:
    """highdicom's reference to the source, which also checks it: an image, of a modality that can be a source, the
    frame within it (and a frame only of a multi-frame image)."""
    return hd.sr.SourceImageForMeasurementGroup.from_source_image(
        src, referenced_frame_numbers=[f.frame + 1] if _multiframe(src) else None)


# -- encoding: Explicit VR Little Endian, sequences and items of undefined length (PS3.5 7.1.2, 7.5) ----------------
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})  # PS3.5 7.1.2
_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})  # encoded in the Specific Character Set (PS3.5 6.1)
_ITEM = struct.pack("<HHI", 0xFFFE, 0xE000, 0xFFFFFFFF)
_ITEM_END = struct.pack("<HHI", 0xFFFE, 0xE00D, 0)
_SEQUENCE_END = struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
_PREAMBLE = b"\0" * 128 + b"DICM"  # PS3.10 7.1


def _head(tag: int, vr: str, length: int) -> bytes:
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr.encode(), 0, length)
    if length > 0xFFFF:
        raise ValueError(f"a value of {length} bytes does not fit a {vr} element ({Tag(tag)}): 65,534 at most")
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr.encode(), length)


def _element(tag: int, vr: str, value: bytes) -> bytes:
    """One element; values of odd length padded as PS3.5 6.2 says (UI and binary with NUL, text with a space)."""
    if len(value) % 2:
        value += b"\0" if vr in ("UI", "OB", "UN") else b" "
    return _head(tag, vr, len(value)) + value


def _encoder(tag: int, vr: str, encodings: list[str]) -> Callable[[object], bytes]:
    """How one placeholder's element is encoded with a new value: the same bytes pydicom would write."""
    if vr == "FD":
        head, pack = _head(tag, vr, 8), struct.Struct("<d").pack
        return lambda value: head + pack(value)
    if vr == "DS":  # as highdicom's DS(value, auto_format=True)
        return lambda value: _element(tag, vr, format_number_as_ds(value).encode())
    if vr in _TEXT_VRS:
        return lambda value: _element(tag, vr, value.encode() if value.isascii() else encode_string(value, encodings))
    if vr in ("UI", "CS", "DA", "TM", "DT", "IS", "AS"):
        return lambda value: _element(tag, vr, str(value).encode("ascii"))
    raise ValueError(f"no placeholder encoding for VR {vr} ({Tag(tag)})")


class _Hole:
    """Where a placeholder was: filled with an encoded element, or (``encode`` None) with bytes as they are."""

    __slots__ = ("name", "encode")

    def __init__(self, name: str, encode: Callable[[object], bytes] | None):
        self.name, self.encode = name, encode


class _Stencil:
    """Bytes encoded once with holes between them: ``fill`` encodes only the holes' values."""

    __slots__ = ("parts", "names")

    def __init__(self, parts: Iterable[bytes | _Hole]):
        merged: list[bytes | _Hole] = []
        for part in parts:
            if isinstance(part, bytes) and merged and isinstance(merged[-1], bytes):
                merged[-1] += part
            elif not isinstance(part, bytes) or part:
                merged.append(part)
        self.parts = merged
        self.names = {p.name for p in merged if isinstance(p, _Hole)}

    def fill(self, values: Mapping[str, object]) -> bytes:
        if not self.names:
            return self.parts[0] if self.parts else b""
        return b"".join([p if isinstance(p, bytes) else values[p.name] if p.encode is None else p.encode(values[p.name])
                         for p in self.parts])


@dataclass(frozen=True)
class _Placeholders:
    """How a template finds its holes: by value (the placeholder values it was built from), by keyword (the creation
    dates and times highdicom stamps), and items replaced as a whole (by identity; name None drops the item)."""

    values: Mapping[object, str]
    keywords: Mapping[str, str]
    items: Mapping[int, str | None] = field(default_factory=dict)

    def hole(self, elem: DataElement) -> str | None:
        name = self.keywords.get(elem.keyword)
        if name is None and elem.VM == 1 and isinstance(elem.value, str | int | float):
            name = self.values.get(elem.value)
        return name


def _encode_element(elem: DataElement, encodings: list[str], holes: _Placeholders) -> list[bytes | _Hole]:
    if elem.VR == "SQ":
        parts: list[bytes | _Hole] = [_head(elem.tag, "SQ", 0xFFFFFFFF)]
        for item in elem.value:
            if id(item) in holes.items:
                name = holes.items[id(item)]
                parts += [] if name is None else [_Hole(name, None)]
            else:
                parts.append(_ITEM)
                for inner in item:
                    parts += _encode_element(inner, encodings, holes)
                parts.append(_ITEM_END)
        return parts + [_SEQUENCE_END]
    name = holes.hole(elem)
    if name is not None:
        return [_Hole(name, _encoder(elem.tag, elem.VR, encodings))]
    return [_encode_plain(elem, encodings)]


def _encode_plain(elem: DataElement, encodings: list[str]) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_data_element(fp, elem, encodings)
    return fp.getvalue()


def _copied(src: Dataset, tags: Iterable[int], encodings: list[str]) -> dict[int, bytes]:
    """The source's elements, encoded as pydicom would write them. Most sources are Explicit VR Little Endian (the
    compressed transfer syntaxes too, PS3.5 A.4), and an element pydicom has not decoded yet is copied byte for
    byte when its VR is the dictionary's; any other is decoded and encoded by pydicom."""
    out = {}
    for tag in tags:
        elem = src.get_item(tag)
        if (isinstance(elem, RawDataElement) and not elem.is_implicit_VR and elem.is_little_endian
                and elem.length != 0xFFFFFFFF and elem.VR != "SQ" and elem.VR == dictionary_VR(tag)):
            out[tag] = _head(tag, elem.VR, elem.length) + (elem.value or b"")
        else:
            out[tag] = _encode_plain(src[tag], encodings)
    return out


def _encode_item(ds: Dataset, encodings: list[str]) -> bytes:
    no_holes = _Placeholders({}, {})
    return _ITEM + b"".join(b"".join(_encode_element(e, encodings, no_holes)) for e in ds) + _ITEM_END


def _sequence(tag: int, items: Iterable[bytes]) -> bytes:
    return _head(tag, "SQ", 0xFFFFFFFF) + b"".join(items) + _SEQUENCE_END


def _uid_element(tag: int, uid: str) -> bytes:
    return _element(tag, "UI", uid.encode("ascii"))


def _roundtrip(ds: Dataset) -> Dataset:
    """What a reader sees of the object: written by pydicom (file meta completed) and read back."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    buffer.seek(0)
    return pydicom.dcmread(buffer)


class TemplateError(RuntimeError):
    """A template does not give what highdicom builds: highdicom's objects changed in a way the template does not
    know. Nothing of that kind is written until it is fixed (each study's failure is logged)."""


def differences(a: Dataset, b: Dataset, ignore: frozenset[str] = frozenset(), path: str = "") -> list[str]:
    """Where two objects differ, attribute by attribute (file meta included); keywords in ``ignore`` not compared."""
    out = []
    if path == "" and hasattr(a, "file_meta") and hasattr(b, "file_meta"):
        out += differences(a.file_meta, b.file_meta, ignore, "meta.")
    for tag in sorted(set(a.keys()) | set(b.keys())):
        ea, eb = a.get(tag), b.get(tag)
        name = f"{path}{(ea if ea is not None else eb).keyword or Tag(tag)}"
        if name.rsplit(".", 1)[-1] in ignore:
            continue
        if ea is None or eb is None or ea.VR != eb.VR:
            out.append(f"{name}: {'absent' if ea is None else ea.VR} vs {'absent' if eb is None else eb.VR}")
        elif ea.VR == "SQ":
            if len(ea.value) != len(eb.value):
                out.append(f"{name}: {len(ea.value)} vs {len(eb.value)} items")
            for i, (ia, ib) in enumerate(zip(ea.value, eb.value, strict=False)):
                out += differences(ia, ib, ignore, f"{name}[{i}].")
        elif ea.value != eb.value:
            out.append(f"{name}: {ea.value!r:.80} vs {eb.value!r:.80}")
    return out


# The attributes highdicom stamps with the time of building: in a template, holes filled with the time of filling.
_STAMPS = {"InstanceCreationDate": "date", "ContentDate": "date", "DateOfSecondaryCapture": "date",
           "InstanceCreationTime": "time", "ContentTime": "time", "TimeOfSecondaryCapture": "time",
           "ContributionDateTime": "datetime"}
STAMPED = frozenset(_STAMPS)


def _stamps(now: datetime.datetime) -> dict[str, str]:
    return {"date": now.strftime("%Y%m%d"), "time": now.strftime("%H%M%S.%f"),
            "datetime": now.strftime("%Y%m%d%H%M%S.%f")}


class _Object:
    """One highdicom object, encoded: its file meta and each top-level element, with holes where ``holes`` says."""

    def __init__(self, ds: Dataset, holes: _Placeholders, drop: Iterable[str] = (),
                 slots: Mapping[str, str] | None = None):
        self.encodings = convert_encodings(ds.get("SpecificCharacterSet"))
        meta = [e for e in ds.file_meta if e.tag != 0x00020000]
        self.meta = _Stencil(p for e in meta for p in _encode_element(e, self.encodings, holes))
        dropped = {Tag(k) for k in drop}
        self.constant: dict[int, bytes] = {}  # the elements without holes, encoded
        self.stencils: dict[int, _Stencil] = {}
        for elem in ds:
            if elem.tag in dropped:
                continue
            parts = _encode_element(elem, self.encodings, holes)
            if elem.keyword in (slots or {}):  # a hole for items that lead the sequence
                parts.insert(1, _Hole(slots[elem.keyword], None))
            stencil = _Stencil(parts)
            if stencil.names:  # plain int keys: BaseTag compares in Python, and the body is sorted for each object
                self.stencils[int(elem.tag)] = stencil
            else:
                self.constant[int(elem.tag)] = stencil.fill({})
        self.names = self.meta.names.union(*(s.names for s in self.stencils.values()))

    def encode(self, values: Mapping[str, object], extra: Mapping[int, bytes]) -> bytes:
        """The file up to what ``extra`` adds: elements of ``extra`` replace the template's of the same tag."""
        meta = self.meta.fill(values)
        body = self.constant | {tag: stencil.fill(values) for tag, stencil in self.stencils.items()} | extra
        return b"".join([_PREAMBLE, _element(0x00020000, "UL", struct.pack("<I", len(meta))), meta,
                         *(body[tag] for tag in sorted(body))])


def _check(kind: str, key: object, built: Dataset, filled: Sequence[bytes]) -> None:
    """The template's own test, once when it is made: what it gives for a second set of values is what highdicom
    built from them."""
    found = differences(_roundtrip(built), pydicom.dcmread(io.BytesIO(b"".join(filled))), STAMPED)
    if found:
        raise TemplateError(f"the {kind} template for {key} differs from what highdicom builds in "
                            f"{len(found)} attribute(s), e.g. {'; '.join(found[:3])}; the outputs of this kind are "
                            f"not written until worker/dicom_out.py learns the change")


# What highdicom's ContributingEquipment.for_image_acquisition reads of a source (highdicom/base_content.py). It
# combines AcquisitionDate and AcquisitionTime only when pydicom gives them as date and time objects, which pydicom
# does only with its datetime_conversion setting on.
_EQUIPMENT = _tags("SOPClassUID", "Manufacturer", "ManufacturerModelName", "SoftwareVersions", "DeviceSerialNumber",
                   "InstitutionName", "InstitutionalDepartmentName", "InstitutionAddress", "StationName",
                   "AcquisitionDateTime")
_ACQUISITION_DATE_TIME = _tags("AcquisitionDate", "AcquisitionTime")

# Placeholder values: each appears once in what highdicom builds from it, where the study's value goes. The
# probabilities are exact in both FD and DS, so the DS read back still equals them.
_P_CLASS = "1.2.840.10008.5.1.4.1.1.12.1"  # X-Ray Angiographic Image Storage: an image IOD that may be multi-frame
_P_FRAME = 7776


def _prototype(variant: str, charset: tuple[str, ...], multiframe: bool) -> Dataset:
    """A source header with placeholder UIDs and nothing of a patient or study but the Study UID; the second one
    names its acquisition equipment too."""
    src = Dataset()
    if charset:
        src.SpecificCharacterSet = list(charset) if len(charset) > 1 else charset[0]
    src.SOPClassUID = _P_CLASS
    src.SOPInstanceUID = _uid("neuron-template", variant, "instance", multiframe)
    src.StudyInstanceUID = _uid("neuron-template", variant, "study")
    src.SeriesInstanceUID = _uid("neuron-template", variant, "series")
    src.Modality, src.Rows, src.Columns = "XA", 1, 1
    if multiframe:
        src.NumberOfFrames = _P_FRAME + 2
    if variant != "placeholders":  # the acquisition equipment highdicom adds to a report: none in the template
        src.Manufacturer, src.StationName, src.SoftwareVersions = "Template Maker", "", ["1.0", "2"]
        src.AcquisitionDateTime = "20240102030405.123456"
    return src


def _prototype_finding(variant: str, src: Dataset, model_key: tuple[str, str, str, bool]) -> Finding:
    model, weights, config_hash, untrained = model_key
    second = variant != "placeholders"
    return Finding(src.StudyInstanceUID, src.SeriesInstanceUID, src.SOPInstanceUID, 1 if second else _P_FRAME, "",
                   model, weights, f"neuron template label {variant}", 0.7234567891234567 if second else 0.3125,
                   0.0123456789 if second else 0.1875, 1, None, config_hash, untrained, False)


def _finding_holes(f: Finding, src: Dataset) -> dict[object, str]:
    uid, identifier = _tracking(f)
    label = _label_code(f.label)
    return {uid: "tracking_uid", identifier: "tracking_text", label.value: "label_value",
            label.meaning: "label_meaning", f.probability: "probability", f.uncertainty: "uncertainty",
            src.SOPClassUID: "sop_class", src.SOPInstanceUID: "source_uid", f.frame + 1: "frame_number"}


class ScTemplate:
    """The secondary captures of one model, weights, settings, overlay size, character set and kind of source
    (single- or multi-frame): the encoded object and the text band's lines that never change."""

    def __init__(self, model_key: tuple[str, str, str, bool], overlay_shape: tuple[int, int], charset: tuple[str, ...],
                 multiframe: bool):
        self.key = (model_key, overlay_shape, charset, multiframe)
        src = _prototype("placeholders", charset, multiframe)
        top = _prototype_finding("placeholders", src, model_key)
        h, w = overlay_shape
        scale = SC_SIZE / max(h, w)
        self.image_shape = (round(h * scale), round(w * scale))
        lines = band_lines(top)
        self.band = np.zeros((BAND_LINE * len(lines) + 6, self.image_shape[1], 3), np.uint8)
        for i, (line, colour) in enumerate(lines):
            if i != FINDING_LINE:
                _put_line(self.band, i, line, colour)
        pixels = np.zeros((self.band.shape[0] + self.image_shape[0], self.image_shape[1], 3), np.uint8)
        holes = {v: k for k, v in _sc_values(top).items()} | {v: n for v, n in _finding_holes(top, src).items()
                                                               if n in ("sop_class", "source_uid", "frame_number")}
        holes[src.StudyInstanceUID] = "study_uid"
        self.object = _Object(_roundtrip(sc_with_highdicom(src, top, pixels)), _Placeholders(holes, _STAMPS),
                              drop=("PixelData", "PatientOrientation", "BodyPartExamined", "Laterality"))
        expected = {"study_uid", "series_uid", "sop_uid", "frame_number", "contribution", "comments", "derivation",
                    "sop_class", "source_uid", "date", "time", "datetime"}
        if self.object.names != expected:
            raise TemplateError(f"the secondary capture template for {self.key} has holes {sorted(self.object.names)}, "
                                f"not {sorted(expected)}: highdicom's object changed")
        src = _prototype("second", charset, multiframe)
        top = _prototype_finding("second", src, model_key)
        _check("secondary capture", self.key, sc_with_highdicom(src, top, pixels),
               self.encode(src, top, pixels, datetime.datetime.now()))

    def burn_in(self, overlay_rgb: np.ndarray, top: Finding) -> np.ndarray:
        """``burn_in``, pixel for pixel, drawing only the finding's line: the others were drawn once."""
        band = self.band.shape[0]
        out = np.empty((band + self.image_shape[0], self.image_shape[1], 3), np.uint8)
        out[:band] = self.band
        _put_line(out[:band], FINDING_LINE, *band_lines(top)[FINDING_LINE])
        resized = cv2.resize(overlay_rgb, self.image_shape[::-1], dst=out[band:], interpolation=cv2.INTER_LINEAR)
        if not np.shares_memory(resized, out):  # OpenCV wrote elsewhere (it may, for a dst it cannot use)
            out[band:] = resized
        return out

    def encode(self, src: Dataset, top: Finding, pixels: np.ndarray, now: datetime.datetime) -> list[bytes]:
        """The file's bytes, in pieces (the pixels as they are, not copied)."""
        if pixels.shape != (self.band.shape[0] + self.image_shape[0], self.image_shape[1], 3):
            raise ValueError(f"pixels of shape {pixels.shape} do not fit the template of {self.key}")
        values = _sc_values(top) | _stamps(now) | {
            "study_uid": src.StudyInstanceUID, "sop_class": src.SOPClassUID, "source_uid": src.SOPInstanceUID,
            "frame_number": top.frame + 1}
        copied, empty = _sc_source_tags(src)
        extra = _copied(src, copied, self.object.encodings) | {tag: _head(tag, dictionary_VR(tag), 0) for tag in empty}
        data = np.ascontiguousarray(pixels).reshape(-1)
        extra[0x7FE00010] = _head(0x7FE00010, "OB", data.size + data.size % 2)
        return [self.object.encode(values, extra), data, b"\0" * (data.size % 2)]


class SrTemplate:
    """The measurement reports of studies whose findings come from one set of models (weights, settings) and whose
    first source has one character set: the encoded report around a hole for the measurement groups, and one
    encoded group per model and kind of source (single- or multi-frame)."""

    def __init__(self, model_keys: tuple[tuple[str, str, str, bool], ...], charset: tuple[str, ...]):
        self.key = (model_keys, charset)
        self.labels: dict[str, tuple[str, str]] = {}
        self.acquisitions: dict[tuple, bytes] = {}  # by the source's equipment attributes, encoded
        self.patient_study: dict[str, frozenset[int]] = {}  # by SOP class: what highdicom copies from a source
        study, rows, headers = self._prototype("placeholders")
        self.built = sr_with_highdicom(study, rows, headers, partial=True)
        sr = _roundtrip(self.built)
        encodings = convert_encodings(sr.get("SpecificCharacterSet"))
        holes: dict[object, str] = {}
        for f in rows:
            holes |= _finding_holes(f, headers[f.sop_uid])
        series_uid, sop_uid = _sr_uids(study, rows)
        holes |= {study: "study_uid", series_uid: "series_uid", sop_uid: "sop_uid"}
        measurements = next(i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "126010")
        items = {id(g): None for g in measurements.ContentSequence} | {id(measurements.ContentSequence[0]): "groups"}
        placeholders = _Placeholders(holes, _STAMPS | {"CompletionFlag": "completion"}, items)
        self.groups: dict[tuple, _Stencil] = {}
        for f, group in zip(rows, measurements.ContentSequence, strict=True):
            stencil = _Stencil([_ITEM, *(p for e in group for p in _encode_element(e, encodings, placeholders)),
                                _ITEM_END])
            self.groups[(f.model_key, _multiframe(headers[f.sop_uid]))] = stencil
            expected = {"tracking_uid", "tracking_text", "label_value", "label_meaning", "probability", "uncertainty",
                        "sop_class", "source_uid"} | ({"frame_number"} if _multiframe(headers[f.sop_uid]) else set())
            if stencil.names != expected:
                raise TemplateError(f"the report template for {self.key} has group holes {sorted(stencil.names)}, "
                                    f"not {sorted(expected)}: highdicom's measurement group changed")
        self.object = _Object(sr, placeholders, slots={"ContributingEquipmentSequence": "acquisition"},
                              drop=("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"))
        expected = {"study_uid", "series_uid", "sop_uid", "completion", "groups", "acquisition", "date", "time",
                    "datetime"}
        if self.object.names != expected:
            raise TemplateError(f"the report template for {self.key} has holes {sorted(self.object.names)}, not "
                                f"{sorted(expected)}: highdicom's report changed")
        study, rows, headers = self._prototype("second")
        _check("report", self.key, sr_with_highdicom(study, rows, headers, partial=False),
               self.encode(study, rows, headers, False, datetime.datetime.now()))

    def _prototype(self, variant: str) -> tuple[str, list[Finding], dict[str, Dataset]]:
        headers = {}
        rows = []
        for multiframe in (False, True):
            src = _prototype(variant, self.key[1], multiframe)
            headers[src.SOPInstanceUID] = src
            rows += [_prototype_finding(variant, src, key) for key in self.key[0]]
        return rows[0].study_uid, rows, headers

    def _label(self, label: str) -> tuple[str, str]:
        """The label's code value and meaning, checked by highdicom once per label."""
        code = self.labels.get(label)
        if code is None:
            concept = _label_code(label)
            code = self.labels[label] = (concept.value, concept.meaning)
        return code

    def _patient_study(self, src: Dataset) -> frozenset[int]:
        """The Patient and Study module attributes highdicom copies from a source of this SOP class
        (``copy_patient_and_study_information``, public in highdicom/base.py), asked of highdicom once per class."""
        tags = self.patient_study.get(src.SOPClassUID)
        if tags is None:
            probe = _AskedFor(src.SOPClassUID)
            self.built.copy_patient_and_study_information(probe)
            tags = self.patient_study[src.SOPClassUID] = _tags(*probe.asked)
        return tags

    def encode(self, study: str, rows: Sequence[Finding], headers: Mapping[str, Dataset], partial: bool,
               now: datetime.datetime) -> list[bytes]:
        first = next(iter(headers.values()))
        sources = {sop: (src.SOPClassUID, src.SOPInstanceUID, _multiframe(src)) for sop, src in headers.items()}
        checked = set()
        groups = []
        for f in rows:
            sop_class, sop_uid, multiframe = sources[f.sop_uid]
            if (f.sop_uid, f.frame) not in checked:  # highdicom's checks of the reference, once per frame
                _source_image(f, headers[f.sop_uid])
                checked.add((f.sop_uid, f.frame))
            uid, identifier = _tracking(f)
            value, meaning = self._label(f.label)
            groups.append(self.groups[(f.model_key, multiframe)].fill({
                "tracking_uid": uid, "tracking_text": identifier, "label_value": value, "label_meaning": meaning,
                "probability": f.probability, "uncertainty": f.uncertainty, "sop_class": sop_class,
                "source_uid": sop_uid, "frame_number": f.frame + 1}))
        series_uid, sop_uid = _sr_uids(study, rows)
        acquisition = self._acquisition(first)
        values = _stamps(now) | {
            "study_uid": first.StudyInstanceUID, "series_uid": series_uid, "sop_uid": sop_uid,
            "completion": "PARTIAL" if partial else "COMPLETE", "groups": b"".join(groups), "acquisition": acquisition}
        copied = (self._patient_study(first) | _PATIENT_STUDY) & first.keys()
        extra = _copied(first, copied, self.object.encodings) | self._evidence(first.StudyInstanceUID,
                                                                                headers.values())
        return [self.object.encode(values, extra)]

    def _acquisition(self, src: Dataset) -> bytes:
        """The acquisition equipment of the report's first source, as highdicom's SOPClass adds it (its
        ``ContributingEquipment.for_image_acquisition``; no item where that raises). Made by highdicom once per
        equipment (2 ms each time), from the attributes it reads."""
        tags = _EQUIPMENT | _ACQUISITION_DATE_TIME if pydicom.config.datetime_conversion else _EQUIPMENT
        copied = _copied(src, tags & src.keys(), self.object.encodings)
        key = tuple(sorted(copied.items()))
        item = self.acquisitions.get(key)
        if item is None:
            equipment = Dataset()
            for tag in copied:
                equipment[tag] = src[tag]
            try:
                item = _encode_item(hd.ContributingEquipment.for_image_acquisition(equipment), self.object.encodings)
            except Exception:  # as highdicom's SOPClass: the source names no acquisition equipment
                item = b""
            if len(self.acquisitions) >= TEMPLATES * 4:
                self.acquisitions.pop(next(iter(self.acquisitions)), None)
            self.acquisitions[key] = item
        return item

    def _evidence(self, study_uid: str, sources: Iterable[Dataset]) -> dict[int, bytes]:
        """The Current Requested Procedure Evidence (the report's study) and Pertinent Other Evidence (any other)
        sequences: each source under its study and series, in the order given, as highdicom's collect_evidence."""
        by_study: tuple[dict, dict] = ({}, {})
        seen = set()
        for src in sources:
            if src.SOPInstanceUID in seen:
                continue
            seen.add(src.SOPInstanceUID)
            series = by_study[src.StudyInstanceUID != study_uid].setdefault(src.StudyInstanceUID, {})
            series.setdefault(src.SeriesInstanceUID, []).append(
                _ITEM + _uid_element(0x00081150, src.SOPClassUID) + _uid_element(0x00081155, src.SOPInstanceUID)
                + _ITEM_END)
        out = {}
        for tag, studies in zip((0x0040A375, 0x0040A385), by_study, strict=True):
            if studies:
                out[tag] = _sequence(tag, (
                    _ITEM + _sequence(0x00081115, (_ITEM + _sequence(0x00081199, sops)
                                                   + _uid_element(0x0020000E, series) + _ITEM_END
                                                   for series, sops in of_series.items()))
                    + _uid_element(0x0020000D, study) + _ITEM_END for study, of_series in studies.items()))
        return out


class _AskedFor(Dataset):
    """A source with a SOP Class and Instance UID and nothing else, which notes every attribute asked of it: shows
    what highdicom would copy from a source of that class."""

    def __init__(self, sop_class: str):
        super().__init__()
        self.SOPClassUID = sop_class
        self.SOPInstanceUID = _uid("neuron-template", "probe")
        self.asked: list[str] = []

    def __getitem__(self, key):
        if not isinstance(key, slice) and key not in self:
            self.asked.append(keyword_for_tag(Tag(key)))
            raise KeyError(key)
        return super().__getitem__(key)


def _atomic_write(chunks: Iterable[bytes], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class DicomWriter:
    """Writes the DICOM outputs of studies whose results are committed (module docstring). Thread-safe: one
    study's outputs are written under that study's lock, so of two tasks finishing the same study the one that
    writes last also read the database last; templates are shared."""

    def __init__(self, settings: Settings, db: Database):
        if settings.dicom_out is None:
            raise ConfigError("DicomWriter needs --dicom-out DIR (NEURON_DICOM_OUT); it is unset")
        self.settings, self.db = settings, db
        self.root = Path(settings.dicom_out)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".probe.{os.getpid()}.{threading.get_ident()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(f"--dicom-out {self.root} is not a writable folder ({exc.strerror}); create it with "
                              f"write permission for this user, or point --dicom-out / NEURON_DICOM_OUT at one "
                              f"that is") from exc
        if settings.heatmap_top_k == 0:
            log.warning("--top-k 0 writes no heatmaps, so no secondary captures are written to %s; the structured "
                        "reports are", self.root)
        self._locks = [threading.Lock() for _ in range(LOCK_STRIPES)]
        self._templates: dict[tuple, ScTemplate | SrTemplate | TemplateError] = {}
        self._templates_lock = threading.Lock()

    def study_dir(self, study_uid: str) -> Path:
        return self.root / _digest("study", study_uid)[:32]

    def _lock(self, study_uid: str) -> threading.Lock:
        """One of a fixed set of locks (striped by the study's hash): bounded memory in a long-lived worker."""
        return self._locks[int(_digest("study", study_uid)[:8], 16) % LOCK_STRIPES]

    def _template(self, key: tuple, make: Callable[[], ScTemplate | SrTemplate]) -> ScTemplate | SrTemplate:
        """The template of ``key``, made (and checked) on first use. Making one depends on nothing but the key, so one
        that could not be made (highdicom refused a model name, say, or the check failed) is not tried again: each
        output that needs it fails with the same reason."""
        with self._templates_lock:
            template = self._templates.get(key)
        if template is None:
            try:
                template = make()
            except Exception as exc:  # logged with each output that needs it
                template = TemplateError(f"no {key[0]} template: {_reason(exc)}")
            with self._templates_lock:
                if len(self._templates) >= TEMPLATES:
                    del self._templates[next(iter(self._templates))]
                self._templates[key] = template
        if isinstance(template, TemplateError):
            raise TemplateError(*template.args)  # a new one each time: a raised exception keeps its traceback
        return template

    def sc_template(self, top: Finding, src: Dataset, overlay_shape: tuple[int, int]) -> ScTemplate:
        args = (top.model_key, tuple(overlay_shape[:2]), _charset(src), _multiframe(src))
        return self._template(("sc", *args), lambda: ScTemplate(*args))

    def sr_template(self, rows: Sequence[Finding], first: Dataset) -> SrTemplate:
        args = (tuple(sorted({f.model_key for f in rows})), _charset(first))
        return self._template(("sr", *args), lambda: SrTemplate(*args))

    # -- reading ----------------------------------------------------------------------------------------------
    def _findings(self, study_uids: Sequence[str]) -> dict[str, list[Finding]]:
        by_study: dict[str, list[Finding]] = {}
        with self.db.engine.connect() as conn:
            for start in range(0, len(study_uids), 500):
                rows = conn.execute(_FINDINGS_SQL, {"studies": list(study_uids[start:start + 500])})
                for r in rows:
                    f = Finding(r[0], r[1], r[2], int(r[3]), r[4], r[5], r[6], r[7], float(r[8]), float(r[9]),
                                int(r[10]), r[11], r[12], bool(r[13]), bool(r[14]))
                    by_study.setdefault(f.study_uid, []).append(f)
        return by_study

    def _open_studies(self, study_uids: Sequence[str]) -> set[str]:
        """Studies with instances still to screen: their SR is marked PARTIAL."""
        with self.db.engine.connect() as conn:
            return {r[0] for r in conn.execute(_OPEN_SQL, {"studies": list(study_uids)})}

    def _header(self, f: Finding) -> Dataset:
        return pydicom.dcmread(self.settings.to_local(f.file_path), stop_before_pixels=True)

    # -- writing ----------------------------------------------------------------------------------------------
    def write_for_instances(self, sop_uids: Iterable[str], complete_only: bool = False,
                            studies: Iterable[str] | None = None) -> DicomReport:
        """After a commit: SCs for these (just screened) instances, and the SR of each of their studies (looked up
        unless the caller knows them), which holds every finding of the study in the database now
        (``complete_only``: only of studies with no instance left to screen; the task that commits a study's last
        instance writes it). Never raises: the results are committed whatever happens here, so a failure (even the
        database's) is logged with its reason and the run goes on."""
        sops = sorted(set(sop_uids))
        if not sops:
            return DicomReport()
        try:
            if studies is None:
                with self.db.engine.connect() as conn:
                    studies = study_of(conn, sops).values()
            return self.write(studies, sops, complete_only=complete_only)
        except Exception as exc:  # the results are safe in the database; only these files are missing
            log.warning("DICOM outputs for %d instance(s) not written: %s; their results are committed, and "
                        "rescreening them writes the outputs again", len(sops), _reason(exc))
            return DicomReport(failed=[("", _reason(exc))])

    def write(self, study_uids: Iterable[str], sop_uids: Iterable[str] | None = None,
              complete_only: bool = False) -> DicomReport:
        """Write the SCs (of ``sop_uids`` only, when given) and the SR of each study. Never raises for one study's
        problem: it is logged and listed in the report. Each study's findings are read under its lock, one study at
        a time, so memory stays flat however many studies a run had."""
        report = DicomReport()
        only = set(sop_uids) if sop_uids is not None else None
        for study in sorted(set(study_uids)):
            with self._lock(study):
                rows = self._findings([study]).get(study, [])
                if rows:
                    partial = bool(self._open_studies([study]))
                    self._write_study(study, rows, only, partial, report, sr=not (partial and complete_only))
        if report.failed:
            log.warning("DICOM outputs: %d written to %s, %d not written (reasons logged above)",
                        len(report.written), self.root, len(report.failed))
        elif report.written:
            log.info("DICOM outputs: %d written to %s", len(report.written), self.root)
        return report

    def _write_study(self, study: str, rows: list[Finding], only: set[str] | None, partial: bool,
                     report: DicomReport, sr: bool = True) -> None:
        where = self.study_dir(study).name
        headers: dict[str, Dataset] = {}
        unreadable: dict[str, str] = {}
        for f in rows:
            if f.sop_uid in headers or f.sop_uid in unreadable:
                continue
            try:
                headers[f.sop_uid] = self._header(f)
            except Exception as exc:  # any unreadable source: logged, this image's outputs skipped
                unreadable[f.sop_uid] = _reason(exc)
        images: dict[tuple, list[Finding]] = {}
        for f in rows:
            images.setdefault(f.image_key, []).append(f)
        for key, image_rows in images.items():
            sop = key[0]
            if (only is not None and sop not in only) or self.settings.heatmap_top_k == 0:
                continue
            if sop in unreadable:
                self._failed(report, where, f"secondary capture not written: source unreadable ({unreadable[sop]})")
                continue
            try:
                report.written.append(self._write_sc(headers[sop], image_rows))
            except Exception as exc:  # one image's failure never stops the study's other outputs
                self._failed(report, where, f"secondary capture not written: {_reason(exc)}")
        if not sr:
            return
        if unreadable:
            self._failed(report, where, f"structured report not written: {len(unreadable)} source instance(s) "
                                        f"unreadable ({next(iter(unreadable.values()))})")
            return
        try:
            report.written.append(self._write_sr(study, rows, headers, partial))
            report.reports.append(study)
        except Exception as exc:
            self._failed(report, where, f"structured report not written: {_reason(exc)}")

    @staticmethod
    def _failed(report: DicomReport, where: str, why: str) -> None:
        log.warning("DICOM output for study folder %s: %s", where, why)
        report.failed.append((where, why))

    # -- secondary capture ------------------------------------------------------------------------------------
    def _write_sc(self, src: Dataset, rows: list[Finding]) -> Path:
        top = min(rows, key=lambda f: f.rank)
        if top.heatmap_path is None:
            raise FileNotFoundError(2, f"no heatmap for the top finding (heatmaps are off: --top-k 0) of frame "
                                       f"{top.frame}")
        bgr = cv2.imread(self.settings.to_local(top.heatmap_path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise FileNotFoundError(2, f"heatmap PNG of frame {top.frame} is missing or unreadable")
        overlay = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
        template = self.sc_template(top, src, overlay.shape)
        chunks = template.encode(src, top, template.burn_in(overlay, top), datetime.datetime.now())
        path = self.study_dir(top.study_uid) / f"sc-{_digest('sc', *top.image_key)[:32]}.dcm"
        _atomic_write(chunks, path)
        return path

    # -- structured report ------------------------------------------------------------------------------------
    def _write_sr(self, study: str, rows: list[Finding], headers: dict[str, Dataset], partial: bool) -> Path:
        template = self.sr_template(rows, next(iter(headers.values())))
        chunks = template.encode(study, rows, headers, partial, datetime.datetime.now())
        path = self.study_dir(study) / "sr.dcm"
        _atomic_write(chunks, path)
        return path


# -- outputs written by other processes while screening goes on --------------------------------------------------
_WRITER: DicomWriter | None = None  # one per pool process


_PARENT_STOPS = {signal.SIGINT, signal.SIGTERM}


def _start_process(settings: Settings) -> None:
    """A pool process: only its parent stops it. Ctrl-C and a SIGTERM to the process group (a terminal, a service
    manager) would kill it in the middle of the outputs of committed results; the parent finishes those, then shuts
    the pool down. The process starts with both signals blocked (``BackgroundOutputs``), so none is lost in between:
    a signal pending now is dropped by SIG_IGN."""
    global _WRITER
    for sig in _PARENT_STOPS:
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _PARENT_STOPS)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    _WRITER = DicomWriter(settings, Database(settings.resolved_database_url))


def _started() -> DicomReport:
    return DicomReport()


def _write_in_process(sop_uids: list[str], studies: list[str], complete_only: bool) -> DicomReport:
    """SCs of these instances and the SRs of their studies (``complete_only``: of those with nothing left to screen);
    with no instances, the SRs of the studies whatever their state (the run's last word on them)."""
    if not sop_uids:
        return _WRITER.write(studies, sop_uids=[])
    return _WRITER.write_for_instances(sop_uids, complete_only=complete_only, studies=studies)


class BackgroundOutputs:
    """DICOM outputs of committed results, written by a pool of processes while screening goes on (from templates a
    study's outputs cost a few milliseconds of CPU, most of it PNG decoding, file writing and Python: in the
    screening threads they would still take the GIL from the pipeline and hold up a worker's acknowledgements).
    Each study goes to one process (by its hash), so its writes keep commit order. ``add`` is called after a
    commit and never blocks on the writing.

    ``neuron run`` (``complete_only``): a study's SR is written once none of its instances waits, and ``close``
    writes the SRs still missing (PARTIAL where something still waits). ``neuron worker``: each task's SCs and its
    study's SR as it stands (PARTIAL until the study's last task), sent within ``flush_after_s``."""

    BATCH = 16

    def __init__(self, settings: Settings, processes: int | None = None, complete_only: bool = True,
                 flush_after_s: float | None = None):
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context

        probe = Database(settings.resolved_database_url)
        try:
            DicomWriter(settings, probe)  # fail fast, before screening: an unwritable folder
        finally:
            probe.dispose()
        self.settings, self.complete_only = settings, complete_only
        self.processes = processes or max(1, min(4, (os.cpu_count() or 2) // 4))
        context = get_context("spawn")  # never fork a process that holds CUDA or threads
        self.pools = [ProcessPoolExecutor(1, mp_context=context, initializer=_start_process, initargs=(settings,))
                      for _ in range(self.processes)]
        self.db = Database(settings.resolved_database_url)
        self.lock = threading.Lock()
        self.waiting: list[str] = []
        self.futures: list = []
        # start the processes now, with SIGINT/SIGTERM blocked (a child inherits the mask; _start_process ignores
        # them, then unblocks): a stop signal during their start-up must not kill them
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _PARENT_STOPS)
        try:
            self.futures += [pool.submit(_started) for pool in self.pools]
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        self.report = DicomReport()  # of the tasks collected so far (paths and reports only with complete_only)
        self.studies: set[str] = set()  # with complete_only: every study with an instance sent
        self.stopped = threading.Event()
        if flush_after_s is not None:
            threading.Thread(target=self._flush_every, args=(flush_after_s,), name="dicom-outputs",
                             daemon=True).start()

    def add(self, sop_uids: Sequence[str]) -> None:
        with self.lock:
            self.waiting.extend(sop_uids)
            if len(self.waiting) >= self.BATCH:
                self._flush()

    def _flush_every(self, seconds: float) -> None:
        while not self.stopped.wait(seconds):
            try:
                with self.lock:
                    self._flush()
            except Exception as exc:  # the database is away for a moment: the instances wait for the next try
                log.warning("DICOM outputs: could not send %d instance(s) yet: %s", len(self.waiting), _reason(exc))

    def _flush(self) -> None:
        self._collect(self.report, wait=False)
        if not self.waiting:
            return
        with self.db.engine.connect() as conn:
            studies = study_of(conn, self.waiting)
        self.waiting = []
        by_pool: dict[int, tuple[list[str], set[str]]] = {}
        for sop, study in studies.items():
            sops, of = by_pool.setdefault(self._pool_of(study), ([], set()))
            sops.append(sop)
            of.add(study)
        if self.complete_only:
            self.studies.update(studies.values())
        for index, (sops, of) in by_pool.items():  # the studies go along: the process need not look them up again
            self.futures.append(self.pools[index].submit(_write_in_process, sops, sorted(of), self.complete_only))

    def _pool_of(self, study: str) -> int:
        return int(_digest("study", study)[:8], 16) % self.processes

    def _collect(self, report: DicomReport, wait: bool = True) -> None:
        """Take in the finished tasks (all of them, waiting, with ``wait``); a long-lived worker keeps only counts."""
        keep = []
        for future in self.futures:
            if not wait and not future.done():
                keep.append(future)
                continue
            try:
                done = future.result()
            except Exception as exc:  # a process died: its studies' outputs are missing, the results are not
                log.warning("a DICOM output process failed (%s); rescreening those studies writes them again",
                            _reason(exc))
                report.failed.append(("", _reason(exc)))
                continue
            report.failed += done.failed
            if self.complete_only:
                report.written += done.written
                report.reports += done.reports
            else:
                report.written += [Path()] * len(done.written)
        self.futures = keep
        if not self.complete_only:  # bounded in a worker that runs for weeks
            del report.written[:-1000], report.failed[:-1000]

    def close(self) -> DicomReport:
        """Send what waits and wait for every task; with ``complete_only``, then write the SR of each study that has
        none yet (an instance of it is still pending: a storage error, a route without a model) as it stands, marked
        PARTIAL. Stops the processes; returns what was written and what failed (the processes logged the reasons)."""
        self.stopped.set()
        report = self.report
        try:
            with self.lock:
                self._flush()
            self._collect(report)
            if self.complete_only:
                missing: dict[int, list[str]] = {}
                for study in sorted(self.studies - set(report.reports)):
                    missing.setdefault(self._pool_of(study), []).append(study)
                for index, studies in missing.items():
                    self.futures.append(self.pools[index].submit(_write_in_process, [], studies, True))
                self._collect(report)
        finally:
            for pool in self.pools:
                pool.shutdown(wait=True, cancel_futures=True)
            self.db.dispose()
        return report
