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
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

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
    readable_transfer_syntaxes,
    status_text,
    why_no_association,
)
from neuron.errors import ConfigError, FailedInput, PeerUnavailable
from neuron.settings import Settings
from neuron.work import FoundStudy, PullStatus
from producer.pullspec import PullConfig, PullQuery, check_listed  # noqa: F401 - PullConfig: the puller's vocabulary
from producer.receive import Admission, Receiver, store_status
from producer.scan import parse_da

log = logging.getLogger(__name__)
logging.getLogger("pynetdicom").setLevel(logging.WARNING)

MAX_CONTEXTS = 128  # presentation contexts one association may propose (PS3.8 9.3.2.2: odd context IDs 1-255)


@dataclass
class PullReport:
    found: int = 0
    held: int = 0  # studies whose every instance was indexed already: nothing asked for
    retrieved_studies: int = 0
    retrieved_instances: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (study UID, last error)
    unlisted: list[str] = field(default_factory=list)  # searches the source may have answered only in part


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


class Transport(Protocol):
    """How a pull talks to its source: DIMSE (``DimseTransport``) or DICOMweb (``producer.dicomweb``). The Puller
    keeps the bookkeeping (pulls rows, what is held already, tries, the window, the pace); a transport only asks."""

    source: str  # the source as recorded in ``pulls``
    verb: str  # what a retrieval is called in messages: "C-GET", "WADO-RS"
    unlisted: list[str]  # after find_studies: the searches the source may have answered only in part

    def check(self) -> None: ...

    def find_studies(self, query: PullQuery) -> list[FoundStudy]: ...

    def find_instances(self, study_uid: str) -> list[tuple[str, str, str]]: ...

    def retrieve(self, study_uid: str, missing: list[tuple[str, str, str]], whole: bool) -> int | None:
        """Bring the missing instances (into the receiver, or to --move-to); the number the source reports completed
        (C-MOVE), or None when the receiver's index is the count."""
        ...

    def close(self) -> None: ...


class DimseTransport:
    """C-ECHO, C-FIND, and C-GET into the receiver or C-MOVE to --move-to (module docstring)."""

    verb = "C-GET"

    def __init__(self, config: PullConfig, receiver: Receiver | None, need_receiver: bool = True):
        self.unlisted: list[str] = []  # C-FIND answers every match (PS3.4 C.4.1.3): nothing is cut
        if config.move_to is None and receiver is None and need_receiver:
            raise ConfigError("a C-GET pull needs a receiver for the instances it brings")
        self.config, self.receiver = config, receiver
        self.source = str(config.source)
        if config.move_to is not None:
            self.verb = f"C-MOVE to {config.move_to}"

    def check(self) -> None:
        echo(self.config)

    def find_studies(self, query: PullQuery) -> list[FoundStudy]:
        return find_studies(self.config, query)

    def find_instances(self, study_uid: str) -> list[tuple[str, str, str]]:
        return find_instances(self.config, study_uid)

    def close(self) -> None:
        return None

    def retrieve(self, study_uid: str, missing: list[tuple[str, str, str]], whole: bool) -> int | None:
        identifiers = [self._identifier(study_uid)] if whole else \
            [self._identifier(study_uid, series, sop) for series, sop, _ in missing]
        if self.config.move_to is not None:
            return self._move(identifiers)
        self._get(identifiers, sorted({cls for _, _, cls in missing if cls}))
        return None

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




class Puller:
    """Retrieves the studies a query found (module docstring), whatever the transport. ``on_retrieved(study_uid)`` is
    called after each study is retrieved (in process: screen it; distributed: enqueue it); ``receiver`` keeps what a
    C-GET or WADO-RS brings. ``transport``: by default the one the source names (AE@HOST:PORT: DIMSE;
    https://...: DICOMweb)."""

    def __init__(self, config: PullConfig, db: Database, receiver: Receiver | None,
                 on_retrieved: Callable[[str], None], clock: Callable[[], datetime] = datetime.now,
                 transport: Transport | None = None):
        self.transport = transport or transport_for(config, receiver)
        self.config, self.db, self.receiver, self.on_retrieved, self.clock = config, db, receiver, on_retrieved, clock
        self.source = self.transport.source
        self._lock = threading.Lock()
        self._waiting_logged = False
        self._next_start = 0.0  # --max-studies-per-hour: monotonic time the next retrieval may start

    def run(self, query: PullQuery, stop: threading.Event | None = None) -> PullReport:
        stop = stop or threading.Event()
        report = PullReport()
        try:
            studies = self.transport.find_studies(query)
            record_found(self.db, self.source, studies)
            report.found, report.unlisted = len(studies), list(self.transport.unlisted)
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
        finally:
            self.transport.close()
        return report

    def _pace(self, stop: threading.Event) -> bool:
        """--max-studies-per-hour: retrievals start at least 3600 / N seconds apart (across the in-flight threads)."""
        rate = self.config.max_per_hour
        if rate is None:
            return True
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next_start)
            self._next_start = start + 3600.0 / rate
        return not stop.wait(start - now) if start > now else not stop.is_set()

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
            if not self._wait_for_window(stop) or (attempt == 1 and not self._pace(stop)):
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
        """One try: what the study holds, what is missing here, and a retrieval of that."""
        check_listed(self.source, study_uid)
        instances = self.transport.find_instances(study_uid)
        check_listed(self.source, study_uid, instances)
        held = held_instances(self.db, [sop for _, sop, _ in instances])
        missing = [(series, sop, cls) for series, sop, cls in instances if sop not in held]
        if not missing:
            return "held", 0
        done = self.transport.retrieve(study_uid, missing, len(missing) == len(instances))
        if done is None:
            done = len(held_instances(self.db, [sop for _, sop, _ in missing]))
            why = "see the refusals in `neuron status` and the log, or the PACS's log"
        else:
            why = "see the PACS's log"
        if done < len(missing):
            raise PeerUnavailable(f"{self.source}: {self.transport.verb} brought {done} of {len(missing)} "
                                  f"instances ({why})")
        return "retrieved", done


def transport_for(config: PullConfig, receiver: Receiver | None, check: bool = False) -> Transport:
    """The transport the source names; with ``check``, only to check that the source answers (C-ECHO, or a QIDO-RS
    search for nothing), then closed."""
    if isinstance(config.source, Peer):
        transport: Transport = DimseTransport(config, receiver, need_receiver=not check)
    else:
        from producer.dicomweb import DicomWebTransport

        transport = DicomWebTransport(config, receiver, need_receiver=not check)
    if check:
        try:
            transport.check()
        finally:
            transport.close()
    return transport


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
