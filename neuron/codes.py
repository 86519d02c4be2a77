"""The identities Neuron's outputs give its findings, shared by the DICOM structured report
(``worker.dicom_templates``) and the FHIR resources (``db.fhir``), so that one finding carries one code and one
tracking UID in both, and a study's outputs one folder or file name.

A label is coded in Neuron's private coding scheme ``99NEURON`` (DICOM PS3.3 8.2: a designator beginning "99" is a
private scheme; the SR declares it in its Coding Scheme Identification Sequence). Its code is a hash of the label's
name, so it needs no table and never changes for a label. FHIR has no designators, only system URIs
(https://hl7.org/fhir/R4/terminologies-systems.html); ``SYSTEM`` names the same scheme there.
"""

from __future__ import annotations

import hashlib

from pydicom.uid import generate_uid

SCHEME = "99NEURON"  # private coding scheme for the labels (DICOM coding scheme designator)
SYSTEM = "urn:neuron:99NEURON"  # the same scheme as a FHIR code system


def digest(*parts: object) -> str:
    return hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()


def uid(*parts: object) -> str:
    """A UID that is the same for the same parts (pydicom's prefix + a hash of them)."""
    return generate_uid(entropy_srcs=[str(p) for p in parts])


def label_code(label: str) -> str:
    """The label's code in ``SCHEME`` / ``SYSTEM``: 12 hexadecimal digits of a hash of its name."""
    return digest("label", label)[:12].upper()


def finding_uid(sop_uid: str, frame: int, model: str, weights: str, label: str) -> str:
    """A finding's tracking UID (the SR's TID 1501 Tracking Unique Identifier, the FHIR Observation's identifier):
    the same finding of the same image keeps it across re-runs."""
    return uid("neuron-finding", sop_uid, frame, model, weights, label)


def study_key(study_uid: str) -> str:
    """The name of a study's outputs (the DICOM output folder, the FHIR Bundle): a hash, never anything a header
    said."""
    return digest("study", study_uid)[:32]
