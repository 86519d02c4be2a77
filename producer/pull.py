"""``neuron pull``: query a PACS (C-FIND) and retrieve what matches (C-GET, or C-MOVE to a running listener), study by
study, resumable and retried.

    C-FIND, study level (Study Root, PS3.4 C.6.2): StudyDate range, ModalitiesInStudy, AccessionNumber (one query per
        accession) ──► the matches recorded in ``pulls`` (found), filtered again here (a PACS may ignore a key)
    per study, at most --in-flight at once, only inside --window:
        C-FIND series then image level ──► the study's SOP Instance UIDs; those indexed already are not asked for
        C-GET (PS3.4 C.4.3: the PACS sends the instances back on the same association; Neuron takes the SCP role for
            each storage class found, one presentation context per readable transfer syntax, so nothing is
            transcoded) ──► producer.receive.Receiver (the listener's store and index) ──► on_retrieved(study)
        or C-MOVE to --move-to (PS3.4 C.4.2: the PACS sends them to that AE, a ``neuron listen`` it knows)
        ──► pulls: retrieved, or the error; retried with backoff, failed after the last try

A second pull of the same query finds the same studies and asks for nothing that is indexed already. Nothing here
logs or stores a patient attribute: the queries ask for none, and the answers keep UIDs, the study date, the
accession number, modalities and counts.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)

from db.network import held_instances, mark_pull, record_found
from db.store import Database
from neuron.dicomnet import (
    PENDING_STATUSES,
    SUCCESS,
    UNCOMPRESSED_SYNTAXES,
    Peer,
    TimeWindow,
    TlsFiles,
    check_ae_title,
    readable_transfer_syntaxes,
    status_text,
    why_no_association,
)
from neuron.errors import ConfigError, FailedInput, PeerUnavailable
from neuron.settings import Settings
from neuron.work import FoundStudy, PullStatus
from producer.receive import Admission, Receiver, store_status
from producer.scan import checked_uid, parse_da

log = logging.getLogger(__name__)
logging.getLogger("pynetdicom").setLevel(logging.WARNING)

MAX_CONTEXTS = 128  # presentation contexts one association may propose (PS3.8 9.3.2.2: odd context IDs 1-255)


@dataclass(frozen=True)
class PullQuery:
    """What to pull: a study date range (either end open), modalities, accession numbers; empty means any."""

    date_from: date | None = None
    date_to: date | None = None
    modalities: tuple[str, ...] = ()
    accessions: tuple[str, ...] = ()

    @classmethod
    def parse(cls, study_date: str | None, modality: str | None, accession_file: Path | None) -> PullQuery:
        start = end = None
        if study_date:
            first, sep, last = study_date.strip().partition("-")
            start = parse_da(first) if first else None
            end = (parse_da(last) if last else None) if sep else start
            if (first and start is None) or (last and end is None) or not (first or last):
                raise ConfigError(f"--study-date {study_date!r} is not a date or range of dates: write YYYYMMDD, "
                                  "YYYYMMDD-YYYYMMDD, YYYYMMDD- or -YYYYMMDD (DICOM range matching, PS3.4 C.2.2.2.5)")
            if start and end and start > end:
                raise ConfigError(f"--study-date {study_date!r} ends before it starts; write the earlier date first")
        modalities = tuple(m.strip().upper() for m in (modality or "").split(",") if m.strip())
        for m in modalities:
            if len(m) > 16 or not m.replace("_", "").isalnum():
                raise ConfigError(f"--modality {m!r} is not a modality code (CS, e.g. CR, DX, MR); separate several "
                                  "with commas: CR,DX")
        accessions: tuple[str, ...] = ()
        if accession_file is not None:
            try:
                lines = Path(accession_file).read_text().splitlines()
            except OSError as exc:
                raise ConfigError(f"--accessions {accession_file}: cannot be read ({exc.strerror}); give a text "
                                  "file with one accession number per line") from exc
            accessions = tuple(dict.fromkeys(a.strip() for a in lines if a.strip() and not a.startswith("#")))
            long = [a for a in accessions if len(a) > 16 or "\\" in a]
            if long:
                raise ConfigError(f"--accessions {accession_file}: {long[0]!r} is not an accession number (SH: at "
                                  "most 16 characters, no backslash)")
            if not accessions:
                raise ConfigError(f"--accessions {accession_file} holds no accession number; one per line")
        return cls(start, end, modalities, accessions)

    def _date_range(self) -> str:
        if self.date_from is None and self.date_to is None:
            return ""
        if self.date_from == self.date_to:
            return f"{self.date_from:%Y%m%d}"
        low = f"{self.date_from:%Y%m%d}" if self.date_from else ""
        high = f"{self.date_to:%Y%m%d}" if self.date_to else ""
        return f"{low}-{high}"

    def identifiers(self) -> list[Dataset]:
        """The study-level C-FIND identifiers: one per accession number, or one. Return keys are those retrieval and
        the worklist need; no patient attribute is asked for."""
        out = []
        for accession in self.accessions or ("",):
            ds = Dataset()
            ds.QueryRetrieveLevel = "STUDY"
            ds.StudyInstanceUID = ""
            ds.StudyDate = self._date_range()
            ds.AccessionNumber = accession
            ds.ModalitiesInStudy = "\\".join(self.modalities)
            ds.NumberOfStudyRelatedInstances = ""
            out.append(ds)
        return out

    def matches(self, found: FoundStudy) -> bool:
        """The answer checked against the query again: a PACS may ignore a key it does not support."""
        if self.date_from and (found.study_date is None or found.study_date < self.date_from):
            return False
        if self.date_to and (found.study_date is None or found.study_date > self.date_to):
            return False
        if self.modalities and found.modalities is not None and found.modalities.strip() and not (
                set(found.modalities.split("\\")) & set(self.modalities)):
            return False
        return not (self.accessions and found.accession_number not in self.accessions)

    def __str__(self) -> str:
        parts = []
        if self.date_from or self.date_to:
            parts.append(f"study date {self.date_from or '...'} to {self.date_to or '...'}")
        if self.modalities:
            parts.append(f"modality {','.join(self.modalities)}")
        if self.accessions:
            parts.append(f"{len(self.accessions)} accession numbers")
        return ", ".join(parts) or "every study"


@dataclass(frozen=True)
class PullConfig:
    source: Peer
    ae_title: str = "NEURON"
    tls: TlsFiles = field(default_factory=TlsFiles)
    move_to: str | None = None
    in_flight: int = 2
    window: TimeWindow | None = None
    attempts: int = 4
    retry_s: float = 10.0

    def __post_init__(self) -> None:
        if self.move_to is not None:
            object.__setattr__(self, "move_to", check_ae_title(self.move_to, "--move-to"))
        if self.in_flight < 1:
            raise ConfigError(f"--in-flight {self.in_flight} must be at least 1 (studies retrieved at once)")
        if self.attempts < 1:
            raise ConfigError(f"--attempts {self.attempts} must be at least 1")


@dataclass
class PullReport:
    found: int = 0
    held: int = 0  # studies whose every instance was indexed already: nothing asked for
    retrieved_studies: int = 0
    retrieved_instances: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (study UID, last error)


def _associate(config: PullConfig, contexts: Sequence[tuple[str, Sequence[str]]], roles: Sequence[str] = (),
               handlers=None):
    ae = AE(ae_title=config.ae_title)
    ae.maximum_pdu_size = 4 * 1024 * 1024
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    for abstract, syntaxes in contexts:
        ae.add_requested_context(abstract, list(syntaxes))
    peer = config.source
    tls = (config.tls.client_context(), peer.host) if config.tls.enabled else None
    try:
        assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls,
                             ext_neg=[build_role(c, scp_role=True) for c in roles] or None,
                             evt_handlers=handlers or None)
    except OSError:
        assoc = None
    if assoc is None or not assoc.is_established:
        raise PeerUnavailable(why_no_association(peer, assoc, config.ae_title, tls is not None))
    return assoc


def _final(responses, what: str, peer: Peer) -> tuple[list[Dataset], Dataset]:
    """Collect the pending identifiers of a C-FIND/C-GET/C-MOVE and check the final status."""
    pending, final = [], None
    for status, identifier in responses:
        if status is None or "Status" not in status:
            raise PeerUnavailable(f"{peer}: {what} got no response (timeout or the association ended)")
        if int(status.Status) in PENDING_STATUSES:
            if identifier is not None:
                pending.append(identifier)
            continue
        final = status
    if final is None:
        raise PeerUnavailable(f"{peer}: {what} ended without a final response")
    return pending, final


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    text = "\\".join(str(v) for v in value) if not isinstance(value, str) and hasattr(value, "__iter__") \
        else str(value)
    return text.strip() or None


def echo(config: PullConfig) -> None:
    """C-ECHO the source (PS3.4 A.4): a pull that cannot reach it says so before any model is loaded."""
    assoc = _associate(config, [(Verification, UNCOMPRESSED_SYNTAXES)])
    try:
        status = assoc.send_c_echo()
        if status is None or int(status.get("Status", -1)) != SUCCESS:
            raise PeerUnavailable(f"{config.source} did not answer C-ECHO with success; check its logs")
    finally:
        if assoc.is_established:
            assoc.release()


def find_studies(config: PullConfig, query: PullQuery) -> list[FoundStudy]:
    """The studies the source holds that match the query (study-level C-FIND)."""
    assoc = _associate(config, [(StudyRootQueryRetrieveInformationModelFind, UNCOMPRESSED_SYNTAXES)])
    found: dict[str, FoundStudy] = {}
    try:
        for identifier in query.identifiers():
            answers, final = _final(assoc.send_c_find(identifier, StudyRootQueryRetrieveInformationModelFind),
                                    "C-FIND", config.source)
            if int(final.Status) != SUCCESS:
                raise PeerUnavailable(f"{config.source}: C-FIND answered {status_text(int(final.Status))}")
            for ds in answers:
                uid = _text(ds, "StudyInstanceUID")
                if not uid:
                    continue
                count = _text(ds, "NumberOfStudyRelatedInstances")
                study = FoundStudy(uid, parse_da(_text(ds, "StudyDate")), (_text(ds, "AccessionNumber") or "")[:16]
                                   or None, (_text(ds, "ModalitiesInStudy") or "")[:64] or None,
                                   int(count) if count and count.isdigit() else None)
                if query.matches(study):
                    found[uid] = study
    finally:
        assoc.release()
    return list(found.values())


def find_instances(config: PullConfig, study_uid: str) -> list[tuple[str, str, str]]:
    """(series UID, SOP Instance UID, SOP Class UID) of every instance of a study, by hierarchical C-FIND: series
    level, then image level per series (PS3.4 C.4.1.2.1)."""
    assoc = _associate(config, [(StudyRootQueryRetrieveInformationModelFind, UNCOMPRESSED_SYNTAXES)])
    out = []
    try:
        q = Dataset()
        q.QueryRetrieveLevel = "SERIES"
        q.StudyInstanceUID = study_uid
        q.SeriesInstanceUID = ""
        series, final = _final(assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind), "C-FIND",
                               config.source)
        if int(final.Status) != SUCCESS:
            raise PeerUnavailable(f"{config.source}: C-FIND (series) answered {status_text(int(final.Status))}")
        for s in series:
            series_uid = _text(s, "SeriesInstanceUID")
            if not series_uid:
                continue
            q = Dataset()
            q.QueryRetrieveLevel = "IMAGE"
            q.StudyInstanceUID = study_uid
            q.SeriesInstanceUID = series_uid
            q.SOPInstanceUID = ""
            q.SOPClassUID = ""
            images, final = _final(assoc.send_c_find(q, StudyRootQueryRetrieveInformationModelFind), "C-FIND",
                                   config.source)
            if int(final.Status) != SUCCESS:
                raise PeerUnavailable(f"{config.source}: C-FIND (image) answered {status_text(int(final.Status))}")
            out += [(series_uid, _text(i, "SOPInstanceUID"), _text(i, "SOPClassUID") or "") for i in images
                    if _text(i, "SOPInstanceUID")]
    finally:
        assoc.release()
    return out


def storage_contexts(sop_classes: Sequence[str], room: int) -> list[tuple[str, tuple[str, ...]]]:
    """For C-GET: per storage class, one context offering the uncompressed syntaxes and one per compressed readable
    syntax, so the PACS sends each instance as it stores it; classes past what fits in ``room`` contexts get the
    uncompressed one only (the PACS then decompresses, or fails that sub-operation with a reason)."""
    compressed = [ts for ts in readable_transfer_syntaxes() if ts not in UNCOMPRESSED_SYNTAXES]
    contexts: list[tuple[str, tuple[str, ...]]] = [(c, UNCOMPRESSED_SYNTAXES) for c in sop_classes]
    for c in sop_classes:
        for ts in compressed:
            if len(contexts) >= room:
                return contexts
            contexts.append((c, (ts,)))
    return contexts


def check_listed(source: str, study_uid: str, instances: Sequence[tuple[str, str, str]] = ()) -> None:
    """FailedInput when the PACS lists the study or one of its instances under an invalid UID (a Study
    Instance UID such as '../../x' that an archive's REST upload accepted): the receiver would refuse every instance
    it brought, so nothing is asked for and the pull says why."""
    try:
        checked_uid(study_uid, "Study Instance UID", "(0020,000D)", required=True)
        for series, sop, _ in instances:
            checked_uid(series, "Series Instance UID", "(0020,000E)", required=False)
            checked_uid(sop, "SOP Instance UID", "(0008,0018)", required=True)
    except FailedInput as exc:
        raise FailedInput(f"{source}: the study was refused, nothing retrieved: the PACS lists it under an "
                          f"invalid UID: {exc}") from None


class Puller:
    """Retrieves the studies a query found (module docstring). ``on_retrieved(study_uid)`` is called after each
    study is retrieved (in process: screen it; distributed: enqueue it); ``receiver`` keeps what a C-GET brings."""

    def __init__(self, config: PullConfig, db: Database, receiver: Receiver | None,
                 on_retrieved: Callable[[str], None], clock: Callable[[], datetime] = datetime.now):
        if config.move_to is None and receiver is None:
            raise ConfigError("a C-GET pull needs a receiver for the instances it brings")
        self.config, self.db, self.receiver, self.on_retrieved, self.clock = config, db, receiver, on_retrieved, clock
        self.source = str(config.source)
        self._lock = threading.Lock()
        self._waiting_logged = False

    def run(self, query: PullQuery, stop: threading.Event | None = None) -> PullReport:
        stop = stop or threading.Event()
        report = PullReport()
        studies = find_studies(self.config, query)
        record_found(self.db, self.source, studies)
        report.found = len(studies)
        log.info("%s: %d studies match (%s)", self.source, len(studies), query)
        with ThreadPoolExecutor(self.config.in_flight, thread_name_prefix="pull") as pool:
            for study, outcome in zip(studies, pool.map(lambda s: self._study(s, stop), studies), strict=True):
                kind, value = outcome
                if kind == "held":
                    report.held += 1
                elif kind == "retrieved":
                    report.retrieved_studies += 1
                    report.retrieved_instances += value
                elif kind == "failed":
                    report.failed.append((study.study_instance_uid, value))
        return report

    def _wait_for_window(self, stop: threading.Event) -> bool:
        window = self.config.window
        while window is not None and not stop.is_set():
            wait = window.seconds_until_open(self.clock())
            if wait <= 0:
                with self._lock:
                    self._waiting_logged = False
                return True
            with self._lock:
                if not self._waiting_logged:
                    log.info("outside --window %s: retrieval paused for %.0f min (studies in flight finish)",
                             window, wait / 60)
                    self._waiting_logged = True
            stop.wait(min(wait, 60.0))
        return not stop.is_set()

    def _study(self, study: FoundStudy, stop: threading.Event) -> tuple[str, object]:
        uid = study.study_instance_uid
        error = "stopped before it was retrieved"
        for attempt in range(1, self.config.attempts + 1):
            if not self._wait_for_window(stop):
                return "stopped", error
            mark_pull(self.db, self.source, uid, PullStatus.RETRIEVING, attempt=True)
            try:
                kind, n = self._retrieve(uid)
            except FailedInput as exc:  # no later try can change it: failed at once, with the reason
                mark_pull(self.db, self.source, uid, PullStatus.FAILED, error=str(exc))
                log.error("a study was refused (its row in `pulls` names it): %s", exc)
                return "failed", str(exc)
            except PeerUnavailable as exc:
                error = str(exc)
                last = attempt == self.config.attempts
                mark_pull(self.db, self.source, uid, PullStatus.FAILED if last else PullStatus.RETRIEVING,
                          error=error)
                if last:
                    log.error("a study failed after %d tries (its row in `pulls` names it): %s", attempt, error)
                    return "failed", error
                delay = self.config.retry_s * 2 ** (attempt - 1)
                log.warning("retrieval failed (try %d of %d): %s; next try in %.0f s", attempt, self.config.attempts,
                            error, delay)
                if stop.wait(delay):
                    return "stopped", error
                continue
            mark_pull(self.db, self.source, uid, PullStatus.RETRIEVED, retrieved=n)
            if kind == "retrieved":
                self.on_retrieved(uid)
            return kind, n
        return "failed", error

    def _retrieve(self, study_uid: str) -> tuple[str, int]:
        """One try: what the study holds, what is missing here, and a C-GET or C-MOVE of that."""
        check_listed(self.source, study_uid)
        instances = find_instances(self.config, study_uid)
        check_listed(self.source, study_uid, instances)
        held = held_instances(self.db, [sop for _, sop, _ in instances])
        missing = [(series, sop, cls) for series, sop, cls in instances if sop not in held]
        if not missing:
            return "held", 0
        whole = len(missing) == len(instances)
        identifiers = [self._identifier(study_uid)] if whole else \
            [self._identifier(study_uid, series, sop) for series, sop, _ in missing]
        if self.config.move_to is not None:
            done = self._move(identifiers)
            if done < len(missing):
                raise PeerUnavailable(f"{self.config.source}: C-MOVE to {self.config.move_to} completed {done} of "
                                      f"{len(missing)} instances")
            return "retrieved", done
        self._get(identifiers, sorted({cls for _, _, cls in missing if cls}))
        got = len(held_instances(self.db, [sop for _, sop, _ in missing]))
        if got < len(missing):
            raise PeerUnavailable(f"{self.config.source}: C-GET brought {got} of {len(missing)} instances (see the "
                                  "listener's refusals in `neuron status`, or the PACS's log)")
        return "retrieved", got

    @staticmethod
    def _identifier(study: str, series: str | None = None, sop: str | None = None) -> Dataset:
        ds = Dataset()
        ds.QueryRetrieveLevel = "IMAGE" if sop else "STUDY"
        ds.StudyInstanceUID = study
        if sop:
            ds.SeriesInstanceUID = series
            ds.SOPInstanceUID = sop
        return ds

    def _get(self, identifiers: list[Dataset], classes: list[str]) -> None:
        model = StudyRootQueryRetrieveInformationModelGet
        contexts = [(model, UNCOMPRESSED_SYNTAXES), *storage_contexts(classes, MAX_CONTEXTS - 1)]
        source_ae = self.config.source.ae_title

        def store(event):
            meta = event.file_meta
            meta.SourceApplicationEntityTitle = source_ae
            result = self.receiver.receive(meta, event.request.DataSet.getbuffer(), track=False)
            return store_status(result.status, result.comment)

        assoc = _associate(self.config, contexts, roles=classes, handlers=[(evt.EVT_C_STORE, store)])
        try:
            for identifier in identifiers:
                _, final = _final(assoc.send_c_get(identifier, model), "C-GET", self.config.source)
                status = int(final.Status)
                if status != SUCCESS:
                    failed = final.get("NumberOfFailedSuboperations", "?")
                    raise PeerUnavailable(f"{self.config.source}: C-GET answered {status_text(status)} "
                                          f"({failed} sub-operations failed)")
        finally:
            if assoc.is_established:
                assoc.release()

    def _move(self, identifiers: list[Dataset]) -> int:
        model = StudyRootQueryRetrieveInformationModelMove
        assoc = _associate(self.config, [(model, UNCOMPRESSED_SYNTAXES)])
        completed = 0
        try:
            for identifier in identifiers:
                _, final = _final(assoc.send_c_move(identifier, self.config.move_to, model), "C-MOVE",
                                  self.config.source)
                status = int(final.Status)
                if status != SUCCESS:
                    hint = " (does the PACS know that AE title, its host and port?)" if status == 0xA801 else ""
                    raise PeerUnavailable(f"{self.config.source}: C-MOVE to {self.config.move_to} answered "
                                          f"{status_text(status)}{hint}")
                completed += int(final.get("NumberOfCompletedSuboperations", 0) or 0)
        finally:
            if assoc.is_established:
                assoc.release()
        return completed


def pull_without_screening(settings: Settings, config: PullConfig, query: PullQuery, admission: Admission,
                           stop: threading.Event) -> PullReport:
    """``neuron pull`` when this process screens nothing: with --move-to the listener receives the instances (and
    screens or enqueues them by its own rules); with NEURON_BROKER_URL a C-GET keeps them in the store and each
    retrieved study is enqueued for the GPU workers, as ``neuron scan`` would."""
    from producer.listen import enqueue_released
    from producer.receive import open_receiver

    settings.out_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.resolved_database_url)
    db.create()
    receiver = None
    if config.move_to is None:
        receiver = open_receiver(db, settings.out_dir, admission, patient_secret=settings.patient_key,
                                 policy=settings.population_policy)

    def nothing(_study: str) -> None:
        return None

    on_retrieved = nothing
    if settings.broker_given and config.move_to is None:
        from neuron.queue import make_app

        release = enqueue_released(db, make_app(settings))
        release(None)  # what an interrupted pull retrieved and did not enqueue

        def on_retrieved(study: str) -> None:
            release([study])
    try:
        return Puller(config, db, receiver, on_retrieved).run(query, stop)
    finally:
        if receiver is not None:
            receiver.indexer.close()
        db.dispose()
