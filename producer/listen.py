"""``neuron listen``: a Storage SCP (C-ECHO, C-STORE) that keeps what modalities and routers send and releases each
study for screening once it is complete.

    A-ASSOCIATE-RQ ──► called AE title must be ours, the calling AE title (and host) on --allow-ae: else
                       A-ASSOCIATE-RJ, rejected-permanent, "calling AE title not recognised" (PS3.8 9.3.4)
    C-STORE-RQ     ──► producer.receive.Receiver: admission, durable store, index ──► C-STORE-RSP
    every 0.25 s   ──► producer.arrivals: studies whose quiet times passed (or the maximum wait) ──► on_release
                       (in process: worker.stream screens them; distributed: enqueued for the GPU workers)

Every storage SOP class pynetdicom knows is accepted, in every transfer syntax Neuron can read
(``neuron.dicomnet.readable_transfer_syntaxes``), compressed ones included: the bytes are stored as they came. The
handler never decodes the data set (pynetdicom's ``Event.dataset`` would): it writes the raw bytes as received, the
buffer that ``Event.encoded_dataset`` returns a copy of (pynetdicom/events.py), so one association sustains the disk's
write rate (BENCHMARKS.md, "Receiving").

Without TLS the listener binds to loopback unless --host names another address. Logs name AE titles, hosts and
counts, never a patient attribute or a UID.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from db.network import close_association, open_association, record_rejection
from db.store import Database
from neuron.dicomnet import (
    DEFAULT_AE_TITLE,
    DEFAULT_PORT,
    SUCCESS,
    AllowedCaller,
    TlsFiles,
    admitted,
    readable_transfer_syntaxes,
)
from neuron.routes import PopulationPolicy
from neuron.settings import Settings
from neuron.work import AssociationOutcome
from producer.arrivals import Arrivals, CompletenessRules
from producer.receive import Admission, Receiver, open_receiver, store_status

log = logging.getLogger(__name__)

# pynetdicom's own logger describes every PDU at DEBUG and every request at INFO; Neuron logs what an operator needs
logging.getLogger("pynetdicom").setLevel(logging.WARNING)

REJECT_PERMANENT, SOURCE_SERVICE_USER, CALLING_AE_NOT_RECOGNISED = 0x01, 0x01, 0x03  # PS3.8 Table 9-21
MAX_PDU = 4 * 1024 * 1024  # what we accept per PDU: large enough that a P-DATA carries megabytes, bounded in memory


@dataclass(frozen=True)
class ListenConfig:
    ae_title: str = DEFAULT_AE_TITLE
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    allow: tuple[AllowedCaller, ...] = ()
    tls: TlsFiles = field(default_factory=TlsFiles)
    max_associations: int = 16
    tick_s: float = 0.25


@dataclass
class _Association:
    row_id: int | None
    calling_ae: str
    host: str
    instances: int = 0
    size: int = 0
    refused: int = 0
    reason: str | None = None


def storage_ae(ae_title: str, max_associations: int = 16) -> AE:
    """An AE that accepts every storage SOP class in every readable transfer syntax, and C-ECHO."""
    ae = AE(ae_title=ae_title)
    ae.require_called_aet = True  # an association addressed to another AE title is not ours (PS3.8 9.3.4)
    ae.maximum_associations = max_associations
    ae.maximum_pdu_size = MAX_PDU
    syntaxes = list(readable_transfer_syntaxes())
    for cx in AllStoragePresentationContexts:
        ae.add_supported_context(cx.abstract_syntax, syntaxes)
    ae.add_supported_context(Verification)
    return ae


class Listener:
    """The Storage SCP of ``neuron listen`` (module docstring). ``on_release`` gets the Study Instance UIDs the
    completeness rules release; when it raises, those studies are offered again 5 s later."""

    def __init__(self, config: ListenConfig, receiver: Receiver, db: Database,
                 on_release: Callable[[list[str]], None]):
        self.config, self.receiver, self.db, self.on_release = config, receiver, db, on_release
        self.ae = storage_ae(config.ae_title, config.max_associations)
        self.server = None
        self._open: dict[int, _Association] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._retry: list[str] = []

    @property
    def port(self) -> int:
        return self.server.server_address[1] if self.server is not None else self.config.port

    def start(self) -> None:
        context = self.config.tls.server_context() if self.config.tls.enabled else None
        handlers = [(evt.EVT_REQUESTED, self._requested), (evt.EVT_ACCEPTED, self._accepted),
                    (evt.EVT_C_STORE, self._store), (evt.EVT_RELEASED, self._released),
                    (evt.EVT_ABORTED, self._aborted)]
        self.server = self.ae.start_server((self.config.host, self.config.port), block=False,
                                           evt_handlers=handlers, ssl_context=context)
        self._ticker = threading.Thread(target=self._tick, name="arrivals", daemon=True)
        self._ticker.start()
        callers = ", ".join(f"{a.ae_title}@{a.host}" if a.host else a.ae_title for a in self.config.allow)
        log.info("listening as %s on %s:%d (%s; callers: %s)", self.config.ae_title, self.config.host, self.port,
                 "TLS" if context is not None else "no TLS", callers or "any AE title")

    def stop(self) -> None:
        """Stop accepting; associations in progress are aborted (their unacknowledged instances are sent again by
        their senders). Studies still inside their quiet time stay pending: the next start releases them."""
        self._stop.set()
        if self.server is not None:
            self.server.shutdown()
        if self._ticker is not None:
            self._ticker.join(timeout=10)

    def release_now(self) -> list[str]:
        """Every study the tracker holds, and any waiting to be offered again: released now (a listener that stops
        hands on what it received)."""
        with self.receiver.lock:
            studies = self.receiver.arrivals.take_all() if self.receiver.arrivals is not None else []
        studies, self._retry = studies + self._retry, []
        return studies

    # -- association events -------------------------------------------------------------------------------------
    def _requested(self, event) -> None:
        primitive = event.assoc.requestor.primitive
        calling = str(primitive.calling_ae_title).strip()
        host = event.assoc.requestor.address
        if admitted(self.config.allow, calling, host):
            return
        reason = f"calling AE title {calling!r} from {host} is not on --allow-ae"
        log.warning("refused an association: %s (allowed: %s)", reason,
                    ", ".join(a.ae_title + (f"@{a.host}" if a.host else "") for a in self.config.allow))
        try:  # recorded before the peer hears it, so `neuron status` never misses a refusal the peer has seen
            record_rejection(self.db, self.config.ae_title, calling, host, reason)
        except Exception as exc:  # the refusal stands whether or not it is recorded
            log.warning("could not record the refused association: %s", exc)
        event.assoc.acse.send_reject(REJECT_PERMANENT, SOURCE_SERVICE_USER, CALLING_AE_NOT_RECOGNISED)
        event.assoc.kill()  # waits until the DUL has sent the A-ASSOCIATE-RJ, as pynetdicom's own rejections do

    def _accepted(self, event) -> None:
        calling = str(event.assoc.requestor.ae_title).strip()
        host = event.assoc.requestor.address
        try:
            row = open_association(self.db, self.config.ae_title, calling, host)
        except Exception as exc:
            log.warning("could not record the association of %s from %s: %s", calling, host, exc)
            row = None
        with self._lock:
            self._open[id(event.assoc)] = _Association(row, calling, host)
        log.info("association from %s at %s", calling, host)

    def _store(self, event) -> int | Dataset:
        meta = event.file_meta
        with self._lock:
            state = self._open.get(id(event.assoc))
        if state is not None:
            meta.SourceApplicationEntityTitle = state.calling_ae
        result = self.receiver.receive(meta, event.request.DataSet.getbuffer())
        if state is not None:
            with self._lock:
                if result.status == SUCCESS:
                    state.instances += 1
                    state.size += result.size
                else:
                    state.refused += 1
                    state.reason = result.comment
        if result.status != SUCCESS:
            log.warning("C-STORE from %s answered 0x%04X: %s", state.calling_ae if state else "?", result.status,
                        result.comment)
        return store_status(result.status, result.comment)

    def _released(self, event) -> None:
        self._finish(event, AssociationOutcome.RELEASED)

    def _aborted(self, event) -> None:  # an A-ABORT, or the connection dropped (A-P-ABORT)
        self._finish(event, AssociationOutcome.ABORTED)

    def _finish(self, event, outcome: AssociationOutcome) -> None:
        with self._lock:
            state = self._open.pop(id(event.assoc), None)
        if state is None or state.row_id is None:
            return
        log.info("association from %s at %s %s: %d instances acknowledged (%.1f MB), %d refused", state.calling_ae,
                 state.host, outcome.value, state.instances, state.size / 1e6, state.refused)
        try:
            close_association(self.db, state.row_id, outcome, state.instances, state.size, state.refused,
                              state.reason)
        except Exception as exc:
            log.warning("could not record the end of the association of %s: %s", state.calling_ae, exc)

    # -- completeness -----------------------------------------------------------------------------------------------
    def _tick(self) -> None:
        retry_at = 0.0
        while not self._stop.wait(self.config.tick_s):
            studies = self.receiver.due()
            if self._retry and time.monotonic() >= retry_at:
                studies, self._retry = studies + self._retry, []
            if not studies:
                continue
            try:
                self.on_release(studies)
            except Exception as exc:  # the broker or database is away: the instances stay pending, offered again
                log.error("could not hand %d complete studies on (%s: %s); trying again in 5 s", len(studies),
                          type(exc).__name__, exc)
                self._retry.extend(studies)
                retry_at = time.monotonic() + 5.0


def enqueue_released(db: Database, app) -> Callable[[Sequence[str] | None], None]:
    """The distributed mode's ``on_release``: the studies' pending instances (None: every pending instance) go to the
    GPU workers, one task per study and route, exactly as ``neuron scan`` sends them."""
    from producer.enqueue import enqueue_pending

    def release(studies: Sequence[str] | None) -> None:
        sent = enqueue_pending(db, app, study_uids=None if studies is None else set(studies))
        if sent:
            log.info("enqueued %d study tasks", sent)

    return release


def serve(db: Database, out_dir: Path, config: ListenConfig, rules: CompletenessRules, admission: Admission,
          on_release: Callable[[list[str] | None], None], stop: threading.Event, patient_secret: str | None = None,
          release_on_stop: bool = False, ready: Callable[[Listener], None] | None = None,
          policy: PopulationPolicy | str = PopulationPolicy.FLAG) -> None:
    """Run a listener until ``stop`` is set. First ``on_release(None)``: whatever a previous run received and did
    not hand on (a killed process) goes to screening now. ``release_on_stop``: studies still inside their quiet time
    are handed on when it stops (the distributed mode's producer); otherwise they stay pending for the next start."""
    receiver = open_receiver(db, out_dir, admission, Arrivals(rules), patient_secret, policy)
    try:
        on_release(None)
        listener = Listener(config, receiver, db, on_release)
        listener.start()
        if ready is not None:
            ready(listener)
        try:
            stop.wait()
        finally:
            listener.stop()
            if release_on_stop:
                studies = listener.release_now()
                if studies:
                    on_release(studies)
    finally:
        receiver.indexer.close()


def listen_for_workers(settings: Settings, config: ListenConfig, rules: CompletenessRules, admission: Admission,
                       stop: threading.Event, ready: Callable[[Listener], None] | None = None) -> None:
    """``neuron listen`` with NEURON_BROKER_URL set: receive, and enqueue each complete study for the GPU workers
    (``enqueue_released``) until ``stop``; what is still inside its quiet time when it stops is enqueued then."""
    from neuron.queue import make_app

    settings.out_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.resolved_database_url)
    try:
        db.create()
        serve(db, settings.out_dir, config, rules, admission, enqueue_released(db, make_app(settings)), stop,
              settings.patient_key, release_on_stop=True, ready=ready, policy=settings.population_policy)
    finally:
        db.dispose()
