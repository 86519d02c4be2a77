"""``--send-to https://host/dicom-web``: a study's DICOM outputs stored back by STOW-RS (PS3.18 10.5), through the
same ``deliveries`` rows, claims, retries and backoff as the C-STORE sender (``worker.send.Sender``).

    the deliveries taken for one DICOMweb destination ──► grouped by study ──► one POST studies/{study} per study,
        multipart/related; type="application/dicom", each file as written (read from disk while the request is sent:
        a request is never built in memory), split into several requests past MAX_REQUEST_BYTES
    ──► the answer, per instance (PS3.18 10.5.3):
        200   every instance stored (the ReferencedSOPSequence names them)
        202   some stored, some not: FailedSOPSequence (failure reason per instance), warnings on stored ones
        409   none stored: FailedSOPSequence says why
        an instance in neither sequence of a 202 or 409 answer is not known to be stored: tried again
    ──► each delivery: delivered (with its warning), pending again after the backoff, or failed (a failure reason
        that says the object itself is wrong, A9xx / Cxxx, PS3.4 Table B.2-1; or the last try)

A partial success is never a success: each object is recorded by what the answer says of it. Posting to the study's
own resource makes the archive refuse an object of another study rather than file it there.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from db.network import finish_delivery
from neuron.dicomnet import is_transient, status_text
from neuron.errors import PeerUnavailable
from neuron.webclient import WebClient
from neuron.work import DeliveryJob, DeliveryStatus

log = logging.getLogger(__name__)

MAX_REQUEST_BYTES = 64 * 1024**2  # a study's outputs past this go in several requests
REFERENCED, FAILED, FAILURE_REASON, WARNING_REASON, SOP_UID = "00081199", "00081198", "00081197", "00081196", \
    "00081155"  # PS3.18 Table 10.5.3-1 (Store Instances Response Module)


class MultipartFiles:
    """A multipart/related body of DICOM files, read from disk as the request is sent; its length known in advance
    (so it goes with a Content-Length, as every server accepts, not chunked)."""

    def __init__(self, paths: list[Path]):
        self.boundary = uuid.uuid4().hex
        self._pieces: list[bytes | Path] = []
        for path in paths:
            self._pieces += [f"--{self.boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode(), path,
                             b"\r\n"]
        self._pieces.append(f"--{self.boundary}--\r\n".encode())
        self._length = sum(len(p) if isinstance(p, bytes) else os.path.getsize(p) for p in self._pieces)
        self._index, self._open, self._pending = 0, None, b""

    @property
    def content_type(self) -> str:
        return f'multipart/related; type="application/dicom"; boundary={self.boundary}'

    def __len__(self) -> int:
        return self._length

    def read(self, size: int = -1) -> bytes:
        size = 1 << 20 if size is None or size < 0 else size
        while self._index < len(self._pieces):
            piece = self._pieces[self._index]
            if isinstance(piece, bytes):
                self._index += 1
                return piece
            if self._open is None:
                self._open = open(piece, "rb")  # noqa: SIM115 - closed when it is read to the end
            data = self._open.read(size)
            if data:
                return data
            self._open.close()
            self._open = None
            self._index += 1
        return b""


def _value(item: dict, tag: str) -> Any:
    values = (item.get(tag) or {}).get("Value") or []
    return values[0] if values else None


def outcomes(answer: Any) -> tuple[dict[str, int | None], dict[str, int]]:
    """(stored SOP Instance UID -> warning reason or None, failed SOP Instance UID -> failure reason) from a STOW-RS
    answer in DICOM JSON."""
    if isinstance(answer, list):  # a server that answers the module as a one-element array
        answer = answer[0] if answer else {}
    if not isinstance(answer, dict):
        return {}, {}
    stored = {str(_value(i, SOP_UID)): _value(i, WARNING_REASON) for i in
              (answer.get(REFERENCED) or {}).get("Value") or [] if _value(i, SOP_UID)}
    failed = {str(_value(i, SOP_UID)): int(_value(i, FAILURE_REASON) or 0x0110) for i in
              (answer.get(FAILED) or {}).get("Value") or [] if _value(i, SOP_UID)}
    return stored, failed


def _batches(ready: list[tuple[DeliveryJob, Path]], limit: int) -> list[list[tuple[DeliveryJob, Path]]]:
    batches: list[list[tuple[DeliveryJob, Path]]] = [[]]
    size = 0
    for job, path in ready:
        n = os.path.getsize(path)
        if batches[-1] and size + n > limit:
            batches.append([])
            size = 0
        batches[-1].append((job, path))
        size += n
    return batches


def store_study(client: WebClient, db, study_uid: str, ready: list[tuple[DeliveryJob, Path]],
                retry_or_fail: Callable[..., None], limit: int = MAX_REQUEST_BYTES) -> int:
    """STOW-RS of one study's outputs (module docstring); returns how many were delivered. Every job ends recorded:
    delivered, or handed to ``retry_or_fail(job, error, transient=...)``."""
    delivered = 0
    for batch in _batches(ready, limit):
        body = MultipartFiles([path for _, path in batch])
        try:
            rsp = client.request("POST", f"studies/{study_uid}", data=body, accept=(400, 409, 413, 415),
                                 headers={"Content-Type": body.content_type, "Accept": "application/dicom+json"})
        except PeerUnavailable as exc:
            for job, _ in batch:
                retry_or_fail(job, str(exc))
            continue
        code = rsp.status_code
        try:
            answer = rsp.json() if rsp.content else None
        except ValueError:
            answer = None
        stored, failed = outcomes(answer)
        for job, _ in batch:
            sop = job.sop_instance_uid
            if sop in failed:
                reason = failed[sop]
                retry_or_fail(job, f"{client.peer}: STOW-RS answered {code}: this instance failed with "
                                   f"{status_text(reason)}", transient=is_transient(reason))
            elif sop in stored or (code == 200 and answer is None):  # 200 with no body: all stored (10.5.3)
                warning = stored.get(sop)
                finish_delivery(db, job, DeliveryStatus.DELIVERED,
                                None if not warning else f"stored with warning {status_text(int(warning))}")
                delivered += 1
            elif code in (400, 413, 415):
                retry_or_fail(job, f"{client.peer}: STOW-RS answered {code} {rsp.reason}: the request was "
                                   "refused as a whole", transient=code == 413)
            else:
                retry_or_fail(job, f"{client.peer}: STOW-RS answered {code} without saying whether this instance "
                                   "was stored; it is sent again")
        rsp.close()
    if delivered:
        log.info("delivered %d DICOM output(s) to %s by STOW-RS", delivered, client.peer)
    return delivered
