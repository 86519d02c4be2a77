"""``--send-to AE@HOST:PORT``: the DICOM outputs of each screened study go to PACS destinations by C-STORE, after the
results they show are committed, with every delivery recorded and retried.

    worker.dicom_out writes a study's SR and SCs (after the commit) ──► record_outputs: one ``deliveries`` row per
        file and destination, pending
    Sender (a thread of neuron run / worker / listen / pull, or ``neuron send``): takes the due rows (a
        compare-and-set, so two senders never take one row) ──► one association per destination ──► C-STORE of each
        file as it was written (pynetdicom reads it without decoding) ──► delivered; or pending again after
        retry x 2^(tries - 1) seconds (at most 300), and failed after the last try or a refusal that says the object
        itself is wrong (A9xx, Cxxx: PS3.4 Table B.2-1); ``neuron send --failed`` puts failed ones back in line

Sending never holds back screening: it runs on its own thread, reading the database and the written files only. A
file replaced before it was sent (an SR rewritten as more of its study was screened) is ``superseded`` by its newer
version. Logs name destinations, counts and DIMSE statuses, never a patient attribute.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from db.network import add_deliveries, claim_deliveries, finish_delivery, open_deliveries, retry_failed_deliveries
from db.schema import utcnow
from db.store import Database
from neuron.dicomnet import Peer, TlsFiles, is_stored, is_transient, status_text, why_no_association
from neuron.errors import RetryableError
from neuron.settings import Settings
from neuron.work import DeliveryJob, DeliveryStatus, OutputObject

log = logging.getLogger(__name__)
logging.getLogger("pynetdicom").setLevel(logging.WARNING)

RETRY_MAX_S = 300.0
SR_MODALITY = "SR"


def _output_object(path: Path) -> OutputObject:
    ds = pydicom.dcmread(path, stop_before_pixels=True,
                         specific_tags=["SOPInstanceUID", "SOPClassUID", "StudyInstanceUID", "Modality"])
    return OutputObject(str(ds.SOPInstanceUID), str(ds.SOPClassUID), str(ds.StudyInstanceUID),
                        "sr" if ds.get("Modality") == SR_MODALITY else "sc", str(Path(path).resolve()))


def record_outputs(db: Database, destinations: Sequence[str], paths: Iterable[Path]) -> int:
    """A pending delivery per written output file and destination (called right after the files are written)."""
    objects = [_output_object(Path(p)) for p in paths]
    return add_deliveries(db, destinations, objects)


def retry_delay(settings: Settings, tries: int) -> float:
    """Seconds before the next try after ``tries`` tries: retry, doubled each time, at most RETRY_MAX_S."""
    return min(RETRY_MAX_S, settings.send_retry_s * 2 ** max(0, tries - 1))


class Sender:
    """Delivers due deliveries (module docstring), in rounds: ``run_once`` is one round; ``start`` runs rounds on a
    thread every ``poll_s`` seconds until ``stop``; ``finish`` runs them until nothing is left to try or a deadline."""

    def __init__(self, db: Database, settings: Settings, poll_s: float = 1.0, lease_s: float = 120.0,
                 destinations: Sequence[str] | None = None):
        self.db, self.settings, self.poll_s, self.lease_s = db, settings, poll_s, lease_s
        self.destinations = destinations  # only these (None: every destination in the table)
        self.tls = TlsFiles(settings.tls_cert, settings.tls_key, settings.tls_ca)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._clients: dict = {}  # a DICOMweb destination's WebClient (its session and OAuth2 token kept)
        for destination in destinations or ():  # a DICOMweb setting that cannot be used stops the start, not a round
            self._client(destination)
        self.delivered = self.failed = 0

    # -- the thread -----------------------------------------------------------------------------------------------
    def start(self) -> Sender:
        self._thread = threading.Thread(target=self._loop, name="sender", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.run_once()
            except Exception as exc:  # the database is away: try again next round
                log.warning("sending: %s: %s; trying again in %.0f s", type(exc).__name__, exc, self.poll_s)
                busy = 0
            if not busy:
                self._stop.wait(self.poll_s)

    def finish(self, wait_s: float) -> tuple[int, int]:
        """Go on with rounds (also on this thread's behalf) until no delivery is pending or being sent, or ``wait_s``
        passed; returns (still open, failed for good so far). What is left stays pending for the next sender."""
        self.stop()
        deadline = time.monotonic() + wait_s
        while True:
            self.run_once()
            left, due = open_deliveries(self.db, self.destinations)
            if left == 0 or time.monotonic() >= deadline:
                return left, self.failed
            wait = 0.2 if due is None else max(0.05, (due - utcnow()).total_seconds())
            time.sleep(min(wait, max(0.0, deadline - time.monotonic()), 5.0))

    # -- one round ------------------------------------------------------------------------------------------------
    def run_once(self) -> int:
        """Take the due deliveries and try each once, one association per destination; returns how many were tried."""
        jobs = claim_deliveries(self.db, lease_s=self.lease_s, destinations=self.destinations)
        by_destination: dict[str, list[DeliveryJob]] = {}
        for job in jobs:
            by_destination.setdefault(job.destination, []).append(job)
        for destination, group in by_destination.items():
            self._send(destination, group)
        return len(jobs)

    def _retry_or_fail(self, job: DeliveryJob, error: str, transient: bool = True) -> None:
        tries = job.attempts + 1
        if transient and tries < self.settings.send_attempts:
            delay = retry_delay(self.settings, tries)
            finish_delivery(self.db, job, DeliveryStatus.PENDING, error, utcnow() + timedelta(seconds=delay))
            log.warning("delivery to %s failed (try %d of %d): %s; next try in %.0f s", job.destination, tries,
                        self.settings.send_attempts, error, delay)
            return
        finish_delivery(self.db, job, DeliveryStatus.FAILED, error)
        self.failed += 1
        log.error("delivery to %s failed for good after %d tries: %s; `neuron send --failed` tries again",
                  job.destination, tries, error)

    def _ready(self, jobs: list[DeliveryJob]) -> list[tuple[DeliveryJob, Path, str, str]]:
        """The jobs whose file is there and still the version recorded: (job, path, SOP class, transfer syntax)."""
        ready: list[tuple[DeliveryJob, Path, str, str]] = []
        for job in jobs:
            path = Path(self.settings.to_local(job.path))
            try:
                meta = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            except (OSError, pydicom.errors.InvalidDicomError) as exc:
                self._retry_or_fail(job, f"output file {path.name} cannot be read ({type(exc).__name__}); "
                                         "rescreen its study to write it again", transient=False)
                continue
            if str(meta.SOPInstanceUID) != job.sop_instance_uid:
                finish_delivery(self.db, job, DeliveryStatus.SUPERSEDED,
                                "the file was rewritten with a newer version before it was sent")
                continue
            ready.append((job, path, str(meta.file_meta.MediaStorageSOPClassUID),
                          str(meta.file_meta.TransferSyntaxUID)))
        return ready

    def _send_web(self, destination: str, jobs: list[DeliveryJob]) -> None:
        """STOW-RS, one request per study (worker.stow)."""
        from worker.stow import store_study

        by_study: dict[str, list[tuple[DeliveryJob, Path]]] = {}
        for job, path, _, _ in self._ready(jobs):
            by_study.setdefault(job.study_instance_uid, []).append((job, path))
        for study, ready in by_study.items():
            self.delivered += store_study(self._client(destination), self.db, study, ready, self._retry_or_fail)

    def _client(self, destination: str):
        """The WebClient of a DICOMweb destination (None for AE@HOST:PORT), made once: its session and token kept."""
        from neuron.webclient import WebPeer, client_for, is_web

        if is_web(destination) and destination not in self._clients:
            self._clients[destination] = client_for(self.settings, WebPeer.parse(destination, "destination"))
        return self._clients.get(destination)

    def _send(self, destination: str, jobs: list[DeliveryJob]) -> None:
        from pynetdicom import AE

        from neuron.webclient import is_web

        if is_web(destination):
            self._send_web(destination, jobs)
            return
        peer = Peer.parse(destination, "destination")
        ready = self._ready(jobs)
        if not ready:
            return
        ae = AE(ae_title=self.settings.ae_title)
        for cls, ts in sorted({(c, t) for _, _, c, t in ready}):
            ae.add_requested_context(cls, list(dict.fromkeys([ts, ExplicitVRLittleEndian, ImplicitVRLittleEndian])))
        tls = (self.tls.client_context(), peer.host) if self.tls.enabled else None
        try:
            assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls)
        except OSError:
            assoc = None
        if assoc is None or not assoc.is_established:
            error = why_no_association(peer, assoc, self.settings.ae_title, tls is not None)
            for job, *_ in ready:
                self._retry_or_fail(job, error)
            return
        delivered = 0
        try:
            for job, path, _, _ in ready:
                if not assoc.is_established:
                    self._retry_or_fail(job, f"{peer}: the association ended before this object was sent")
                    continue
                try:
                    rsp = assoc.send_c_store(path)
                except (ValueError, RuntimeError, OSError) as exc:
                    self._retry_or_fail(job, f"{peer}: C-STORE could not be sent ({exc})")
                    continue
                status = int(rsp.Status) if rsp is not None and "Status" in rsp else None
                if status is None:
                    self._retry_or_fail(job, f"{peer}: no C-STORE response (timeout or aborted)")
                elif is_stored(status):
                    finish_delivery(self.db, job, DeliveryStatus.DELIVERED,
                                    None if status == 0 else f"stored with {status_text(status)}")
                    delivered += 1
                else:
                    comment = f"; {rsp.ErrorComment}" if "ErrorComment" in rsp else ""
                    self._retry_or_fail(job, f"{peer}: C-STORE answered {status_text(status)}{comment}",
                                        transient=is_transient(status))
        finally:
            if assoc.is_established:
                assoc.release()
        self.delivered += delivered
        if delivered:
            log.info("delivered %d DICOM output(s) to %s", delivered, peer)


@contextlib.contextmanager
def sending(settings: Settings, wait_s: float | None = None) -> Iterator[Sender | None]:
    """Deliveries while the block runs (a Sender thread when --send-to is set), then rounds until everything recorded
    is delivered or failed, at most ``wait_s`` seconds (default: long enough for every try of the retry schedule).
    Without --send-to: nothing."""
    if not settings.send_to:
        yield None
        return
    if settings.database_url is None:  # the default SQLite file: its folder first, as the run makes it
        settings.out_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.resolved_database_url)
    try:
        db.create()  # the deliveries table before the sender's first round (idempotent, as the run does it too)
    except RetryableError as exc:  # not reachable yet: the sender's rounds wait for it
        log.warning("sending: %s", exc)
    sender = Sender(db, settings, destinations=settings.send_to).start()
    try:
        yield sender
    finally:
        schedule = sum(retry_delay(settings, n) for n in range(1, settings.send_attempts))
        left, failed = sender.finish(schedule + 30.0 if wait_s is None else wait_s)
        log.info("deliveries: %d delivered, %d failed, %d still pending", sender.delivered, failed, left)
        db.dispose()


def send_again(settings: Settings, failed: bool, destinations: Sequence[str] | None, wait_s: float
               ) -> tuple[int, int, int, int]:
    """``neuron send``: pending deliveries, and with ``failed`` the failed ones too (a fresh count of tries), until
    each is delivered or out of tries, or ``wait_s`` passed. Returns (put back in line, delivered, failed, left)."""
    db = Database(settings.resolved_database_url)
    try:
        again = retry_failed_deliveries(db, destinations) if failed else 0
        sender = Sender(db, settings, destinations=destinations)
        left, failed_now = sender.finish(wait_s)
        return again, sender.delivered, failed_now, left
    finally:
        db.dispose()
