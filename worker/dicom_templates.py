"""Templates of the DICOM outputs that ``worker.dicom_out`` writes: each kind of object is built by highdicom once,
from placeholder values, and encoded; a study's objects are those bytes with the study's values encoded into the
places the placeholders held. Building a report with highdicom costs ~0.25 s of CPU per screened image (its content
items check and copy themselves, and pydicom encodes each one); filling its template, tens of microseconds per finding.

    what ``build`` gives for placeholder values (the writer's ``sc_with_highdicom`` / ``sr_with_highdicom``)
        ──► encoded once, Explicit VR Little Endian with sequences and items of undefined length (PS3.5 7.1.2, 7.5),
              with a hole wherever a placeholder value or a creation date or time was (``_Object``, ``_Stencil``)
        ──► checked once: filled with a second set of values and read back by pydicom, it must equal what ``build``
              gives for those values, attribute for attribute (``differences``); else ``TemplateError``, and no
              object of that kind is written
        ──► per object (``ScTemplate.encode``, ``SrTemplate.encode``): the holes filled; the source's attributes
              copied (byte for byte where pydicom has not decoded them and they are Explicit VR Little Endian,
              ``_copied``); the report's evidence sequences and acquisition equipment encoded as highdicom makes them
              (``collect_evidence`` in highdicom/sr/utils.py, ``ContributingEquipment.for_image_acquisition`` in
              highdicom/base_content.py)

What lives here: the values both ways of building share (``Finding`` and the UIDs, texts, codes and burned-in lines
decided by it): a template finds its holes by these values and fills them with them, so the writer's highdicom
builders take them from here too; the byte-level encoding; the templates and their checks. What an object holds is
the writer's: its builders are passed in as ``build``, and this module never imports ``worker.dicom_out`` (which
imports the helpers it shares from here, underscore names included).

In the pipeline only ``worker.dicom_out`` imports it: highdicom and OpenCV load with it, never in the screening
path.
"""

from __future__ import annotations

import datetime
import io
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import cv2
import highdicom as hd
import numpy as np
import pydicom
from highdicom.sr import CodedConcept
from pydicom.charset import convert_encodings, encode_string
from pydicom.datadict import dictionary_VR, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.tag import Tag
from pydicom.valuerep import format_number_as_ds

import neuron
from neuron.codes import SCHEME, digest, finding_uid, label_code, uid

NOT_FOR_DIAGNOSIS = "NOT FOR DIAGNOSTIC USE"
SC_SIZE = 512  # the overlay (the model's input size, e.g. 224) is enlarged to this so the burned-in text is legible
BAND_LINE = 26  # pixels per line of burned-in text
FINDING_LINE = 2  # the band's only line that changes from image to image (``band_lines``)
TEMPLATES = 64  # templates kept per writer (a long-lived worker meets few models, settings and character sets)

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


_digest, _uid = digest, uid  # the names this module and worker.dicom_out have always used


def _multiframe(src: Dataset) -> bool:
    return int(src.get("NumberOfFrames", 1) or 1) > 1


# -- the values both ways of building share ------------------------------------------------------------------------
def _finding_text(f: Finding) -> str:
    return f"{f.label} p={f.probability:.2f} +/- {f.uncertainty:.2f}"


def _algorithm_parameters(f: Finding) -> list[str]:
    weights = "untrained (no trained weights; results are meaningless)" if f.untrained else f"sha256 {f.weights}"
    return [f"weights {weights}", f"pipeline settings {f.config_hash}", f"neuron {neuron.__version__}"]


def _label_code(label: str) -> CodedConcept:
    return CodedConcept(label_code(label), SCHEME, label[:64])


def _tracking(f: Finding) -> tuple[str, str]:
    """The finding's tracking UID and identifier (TID 1501): the same finding keeps them across re-runs."""
    return (finding_uid(f.sop_uid, f.frame, f.model, f.weights, f.label),
            f"{f.label} frame {f.frame + 1} {f.model}"[:64])


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
                            f"not written until worker/dicom_templates.py learns the change")


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
    (single- or multi-frame): the encoded object and the text band's lines that never change. ``build`` is the
    object as highdicom builds it (``worker.dicom_out.sc_with_highdicom``): the template is made from what it gives
    for placeholder values and checked against what it gives for a second set."""

    def __init__(self, model_key: tuple[str, str, str, bool], overlay_shape: tuple[int, int], charset: tuple[str, ...],
                 multiframe: bool, *, build: Callable[[Dataset, Finding, np.ndarray], Dataset]):
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
        self.object = _Object(_roundtrip(build(src, top, pixels)), _Placeholders(holes, _STAMPS),
                              drop=("PixelData", "PatientOrientation", "BodyPartExamined", "Laterality"))
        expected = {"study_uid", "series_uid", "sop_uid", "frame_number", "contribution", "comments", "derivation",
                    "sop_class", "source_uid", "date", "time", "datetime"}
        if self.object.names != expected:
            raise TemplateError(f"the secondary capture template for {self.key} has holes {sorted(self.object.names)}, "
                                f"not {sorted(expected)}: highdicom's object changed")
        src = _prototype("second", charset, multiframe)
        top = _prototype_finding("second", src, model_key)
        _check("secondary capture", self.key, build(src, top, pixels),
               self.encode(src, top, pixels, datetime.datetime.now()))

    def burn_in(self, overlay_rgb: np.ndarray, top: Finding) -> np.ndarray:
        """``worker.dicom_out.burn_in``, pixel for pixel, drawing only the finding's line: the others were drawn
        once."""
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
    encoded group per model and kind of source (single- or multi-frame). ``build`` is the report as highdicom builds
    it (``worker.dicom_out.sr_with_highdicom``: study, rows, headers, partial): the template is made from what it
    gives for placeholder values and checked against what it gives for a second set."""

    def __init__(self, model_keys: tuple[tuple[str, str, str, bool], ...], charset: tuple[str, ...], *,
                 build: Callable[..., hd.SOPClass]):
        self.key = (model_keys, charset)
        self.labels: dict[str, tuple[str, str]] = {}
        self.acquisitions: dict[tuple, bytes] = {}  # by the source's equipment attributes, encoded
        self.patient_study: dict[str, frozenset[int]] = {}  # by SOP class: what highdicom copies from a source
        study, rows, headers = self._prototype("placeholders")
        self.built = build(study, rows, headers, partial=True)
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
        _check("report", self.key, build(study, rows, headers, partial=False),
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
