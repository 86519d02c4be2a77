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

How: highdicom builds each kind of object (``sc_with_highdicom``, ``sr_with_highdicom``, here), but only once per
model, weights, settings and character set, from placeholder values: that object, encoded, is the template
(``ScTemplate``, ``SrTemplate`` in ``worker.dicom_templates``, which also holds ``Finding``, the values both ways of
building share and the byte-level encoding), and a study's objects are the template's bytes with the study's values
encoded into the places the placeholders held. Building an SR with highdicom costs ~0.25 s of CPU per screened image
(its content items check and copy themselves, and pydicom encodes each one); filling its template, tens of
microseconds per finding. A template is checked when it is made: filled with a second set of values it must give
what highdicom builds from those values, attribute for attribute, or no output of that kind is written (the reason is
logged). highdicom still checks what comes from outside per study: each source reference, each new label. This
module decides what is written, when and where; ``worker.dicom_templates`` makes the bytes and never imports it.

When: ``neuron run`` hands each committed result to ``BackgroundOutputs``, processes that write the SCs while the
run screens and a study's SR once none of its instances waits (the run's last pass writes the rest, PARTIAL where
an instance still waits); ``neuron worker`` hands each task's committed instances to the same kind of processes,
which write their SCs and rewrite the study's SR with every finding the database holds by then (PARTIAL while
instances of the study wait to be screened, COMPLETE after). A study's writes stay in one process, in commit order;
across workers the last SR written wins, and the study's next task rewrites it.

A failure for one image or study (source file gone, heatmap missing, an attribute highdicom refuses) is logged with
the reason and the study's output folder, and never stops the run or touches the results in the database.

Only imported when ``dicom_out`` is set: highdicom and OpenCV load here (and in ``worker.dicom_templates``, which
only this module imports), not in the screening path.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
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
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from sqlalchemy import bindparam, text

import neuron
from db.schema import chunks
from db.store import Database
from db.studies import open_studies, study_of
from neuron.codes import study_key
from neuron.errors import ConfigError
from neuron.settings import Settings
from worker.dicom_templates import (
    BAND_LINE,
    NOT_FOR_DIAGNOSIS,
    PATIENT_STUDY_KEYWORDS,
    SC_SIZE,
    SCHEME,
    TEMPLATES,
    Finding,
    ScTemplate,
    SrTemplate,
    TemplateError,
    _algorithm_parameters,
    _digest,
    _label_code,
    _multiframe,
    _put_line,
    _sc_source_tags,
    _sc_values,
    _source_image,
    _sr_uids,
    _tracking,
    _uid,
    band_lines,
)

log = logging.getLogger(__name__)

MANUFACTURER = "Neuron"
SC_SERIES_NUMBER, SR_SERIES_NUMBER = 9001, 9002
LOCK_STRIPES = 64

PROBABILITY = CodedConcept("PROB", SCHEME, "Probability of finding")
SCREENING = CodedConcept("SCREEN", SCHEME, "Automated image screening, not for diagnostic use")
SOURCE_IMAGE_FOR_PROCESSING = CodedConcept("121322", "DCM", "Source image for image processing operation")

_HIGHDICOM_READS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                    "StudyDate", "StudyTime")
_FINDINGS_SQL = text(
    "SELECT study_instance_uid, series_instance_uid, sop_instance_uid, frame, file_path, model, weights, label, "
    "probability, uncertainty, rank, heatmap_path, preprocessing, untrained, needs_review "
    "FROM findings WHERE study_instance_uid IN :studies "
    "ORDER BY study_instance_uid, sop_instance_uid, frame, model, rank").bindparams(bindparam("studies",
                                                                                         expanding=True))


@dataclass
class DicomReport:
    """What one ``write`` did: paths written and (study folder, reason) for what was not."""

    written: list[Path] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    reports: list[str] = field(default_factory=list)  # the studies whose SR was written


def _reason(exc: BaseException) -> str:
    """Why, without the path or values from the file: OSErrors give their strerror, others their message."""
    if isinstance(exc, OSError):
        return f"{type(exc).__name__}: {exc.strerror or 'I/O error'}"
    return f"{type(exc).__name__}: {exc}"


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


def _models(rows: Sequence[Finding]) -> list[tuple[str, str]]:
    return sorted({(f.model, f.weights) for f in rows})


# -- the reference: the pixels and the objects as highdicom builds them, the source of every template (``build``) -
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
        return self.root / study_key(study_uid)

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
        return self._template(("sc", *args), lambda: ScTemplate(*args, build=sc_with_highdicom))

    def sr_template(self, rows: Sequence[Finding], first: Dataset) -> SrTemplate:
        args = (tuple(sorted({f.model_key for f in rows})), _charset(first))
        return self._template(("sr", *args), lambda: SrTemplate(*args, build=sr_with_highdicom))

    # -- reading ----------------------------------------------------------------------------------------------
    def _findings(self, study_uids: Sequence[str]) -> dict[str, list[Finding]]:
        by_study: dict[str, list[Finding]] = {}
        with self.db.engine.connect() as conn:
            for chunk in chunks(study_uids):
                rows = conn.execute(_FINDINGS_SQL, {"studies": chunk})
                for r in rows:
                    f = Finding(r[0], r[1], r[2], int(r[3]), r[4], r[5], r[6], r[7], float(r[8]), float(r[9]),
                                int(r[10]), r[11], r[12], bool(r[13]), bool(r[14]))
                    by_study.setdefault(f.study_uid, []).append(f)
        return by_study

    def _open_studies(self, study_uids: Sequence[str]) -> set[str]:
        """Studies with instances still to screen: their SR is marked PARTIAL."""
        with self.db.engine.connect() as conn:
            return open_studies(conn, study_uids)

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
                    before = len(report.written)
                    self._write_study(study, rows, only, partial, report, sr=not (partial and complete_only))
                    self._queue_for_sending(study, report.written[before:])
        if report.failed:
            log.warning("DICOM outputs: %d written to %s, %d not written (reasons logged above)",
                        len(report.written), self.root, len(report.failed))
        elif report.written:
            log.info("DICOM outputs: %d written to %s", len(report.written), self.root)
        return report

    def _queue_for_sending(self, study: str, written: list[Path]) -> None:
        """With --send-to, a pending delivery per file just written and destination (worker/send.py sends them)."""
        if not self.settings.send_to or not written:
            return
        from worker.send import record_outputs

        try:
            record_outputs(self.db, self.settings.send_to, written)
        except Exception as exc:  # the files are written; a rescreen of the study records them again
            self._failed(DicomReport(), self.study_dir(study).name, f"deliveries not recorded: {_reason(exc)}")

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
