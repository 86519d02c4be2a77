"""``neuron pull https://host/dicom-web``: the DICOMweb transport of ``producer.pull.Puller`` (the bookkeeping, tries,
window and pace are the Puller's; this module only asks).

    QIDO-RS /studies (PS3.18 10.6): StudyDate range, ModalitiesInStudy (one search per modality, per accession number)
        paged with limit/offset while a page comes back full; a search that may have been cut short is split by date
        ──► FoundStudy (UIDs, date, accession, modalities, count: the patient attributes a server sends are dropped)
    QIDO-RS /studies/{study}/series, .../series/{series}/instances ──► (series, SOP Instance, SOP Class) UIDs
    WADO-RS /studies/{study}/series/{series} (a whole study, one request per series) or .../instances/{sop} (what is
        missing of a study held in part), Accept multipart/related; type="application/dicom"; transfer-syntax=*
        (each instance as the archive stores it, PS3.18 8.7.3.5.2; never transcoded) ──► read part by part from the
        stream (neuron.webclient.iter_parts: one instance in memory at a time) ──► producer.receive.Receiver (the
        listener's store and index: content-addressed, durable, acknowledged only once indexed)

Why split: a server may answer fewer studies than ``limit`` without saying so (Orthanc's LimitFindResults, Google
Cloud's caps), and may ignore or mis-apply ``offset`` (Orthanc orders a capped answer differently on each request).
So a search whose answer is as long as the longest short answer seen so far is searched again as two halves of its
date range; the halves answering more studies between them than the whole did proves the server caps, and a one-day
range still at the cap is paged by offset and, if that brings nothing new, reported as possibly incomplete. Paging
stops at the first page that brings no new study, so a server that ignores ``offset`` cannot loop.
"""

from __future__ import annotations

import logging
import struct
from datetime import date, timedelta
from io import BytesIO

import pydicom
from pydicom.errors import InvalidDicomError

from db.network import held_instances
from neuron.errors import ConfigError, PeerUnavailable
from neuron.webclient import WebClient, WebPeer, boundary_of, iter_parts
from neuron.work import FoundStudy
from producer.pullspec import PullConfig, PullQuery, check_listed, date_range_text
from producer.receive import Receiver
from producer.scan import parse_da

log = logging.getLogger(__name__)

# Attribute tags of the DICOM JSON model (PS3.18 F.2) that a search reads
STUDY_UID, SERIES_UID, SOP_UID, SOP_CLASS = "0020000D", "0020000E", "00080018", "00080016"
STUDY_DATE, ACCESSION, MODALITIES, N_INSTANCES = "00080020", "00080050", "00080061", "00201208"
ACCEPT_DICOM = 'multipart/related; type="application/dicom"; transfer-syntax=*'
CHUNK = 64 * 1024  # bytes read from the stream at a time
MAX_INSTANCE_BYTES = 2 * 1024**3  # a part larger than this is refused before it is read in full
EARLIEST = date(1900, 1, 1)  # where an open date range starts when it has to be split


def _value(item: dict, tag: str) -> str | None:
    values = (item.get(tag) or {}).get("Value") or []
    if not values:
        return None
    return "\\".join(str(v) for v in values).strip() or None


class StudySearch:
    """The studies a query matches, listed in full however the server caps or pages its answers (module
    docstring). ``possibly_incomplete`` names the one-day ranges where the server may still hide studies."""

    def __init__(self, client: WebClient, page_size: int):
        self.client, self.page_size = client, page_size
        self.longest_short = 0  # the longest answer shorter than page_size seen: perhaps the server's cap
        self.capping = False  # proven: halves of a range answered more studies than the whole
        self.searches = 0
        self.possibly_incomplete: list[str] = []

    def run(self, query: PullQuery) -> list[FoundStudy]:
        found: dict[str, FoundStudy] = {}
        for accession in query.accessions or (None,):
            for modality in query.modalities or (None,):
                keys = {k: v for k, v in (("AccessionNumber", accession), ("ModalitiesInStudy", modality)) if v}
                self._range(keys, query.date_from, query.date_to, found)
        return [s for s in found.values() if query.matches(s)]

    def _page(self, keys: dict, low: date | None, high: date | None, offset: int) -> list[dict]:
        params = {**keys, "limit": self.page_size, "includefield": f"{MODALITIES},{N_INSTANCES}"}
        dates = date_range_text(low, high)
        if dates:
            params["StudyDate"] = dates
        if offset:
            params["offset"] = offset
        self.searches += 1
        rsp = self.client.request("GET", "studies", params=params, headers={"Accept": "application/dicom+json"},
                                  accept=(204,))
        if rsp.status_code == 204 or not rsp.content:
            return []
        try:
            answer = rsp.json()
        except ValueError:
            raise PeerUnavailable(f"{self.client.peer}: QIDO-RS answered {rsp.headers.get('Content-Type')!r}, not "
                                  "DICOM JSON (PS3.18 F.2)") from None
        if not isinstance(answer, list):
            raise PeerUnavailable(f"{self.client.peer}: QIDO-RS answered a JSON {type(answer).__name__}, not a list "
                                  "of matches (PS3.18 F.2)")
        return [a for a in answer if isinstance(a, dict) and _value(a, STUDY_UID)]

    def _listed(self, keys: dict, low: date | None, high: date | None) -> tuple[dict[str, FoundStudy], bool]:
        """One search paged by offset while pages come back full; (the studies, whether the answer is surely
        complete)."""
        listed: dict[str, FoundStudy] = {}
        page = self._page(keys, low, high, 0)
        offset = 0
        while True:
            fresh = [p for p in page if _value(p, STUDY_UID) not in listed]
            for item in fresh:
                study = _found(item)
                listed[study.study_instance_uid] = study
            if len(page) < self.page_size:
                break
            if offset and not fresh:  # a full page of studies seen already: the server ignores offset
                return listed, False
            offset += len(page)
            try:
                page = self._page(keys, low, high, offset)
            except PeerUnavailable as exc:  # a server that refuses large offsets (a cap on paging)
                log.warning("paging stopped: %s", exc)
                return listed, False
        if offset:
            return listed, True  # paged to a short page: the server pages properly
        short = len(page)
        suspect = short > 0 and short >= self.longest_short
        self.longest_short = max(self.longest_short, short)
        return listed, not suspect

    def _range(self, keys: dict, low: date | None, high: date | None, found: dict[str, FoundStudy]) -> int:
        listed, complete = self._listed(keys, low, high)
        found.update(listed)
        if complete:
            return len(listed)
        start, end = low or EARLIEST, high or date.today()
        if start >= end:
            if self.capping:
                where = f"{start:%Y%m%d}" + (f" ({', '.join(f'{k}={v}' for k, v in keys.items())})" if keys else "")
                self.possibly_incomplete.append(where)
                log.warning("%s: %d studies on %s, as many as its longest answer: the server may hold more it "
                            "did not list; search that day by --modality or --accessions", self.client.peer,
                            len(listed), where)
            return len(listed)
        middle = start + timedelta(days=(end - start).days // 2)
        total = self._range(keys, start, middle, found) + self._range(keys, middle + timedelta(days=1), end, found)
        if total > len(listed):
            self.capping = True
        return max(total, len(listed))


def _found(item: dict) -> FoundStudy:
    count = _value(item, N_INSTANCES)
    return FoundStudy(_value(item, STUDY_UID), parse_da(_value(item, STUDY_DATE)),
                      (_value(item, ACCESSION) or "")[:16] or None, (_value(item, MODALITIES) or "")[:64] or None,
                      int(count) if count and count.isdigit() else None)


def split_part(body: bytearray) -> tuple[pydicom.dataset.FileMetaDataset, int]:
    """The File Meta Information of a PS3.10 file held in ``body`` and where its data set starts; InvalidDicomError
    when it is not one (PS3.10 7.1: 128-byte preamble, 'DICM', group 0002 led by its length)."""
    if len(body) < 144 or body[128:132] != b"DICM" or body[132:136] != b"\x02\x00\x00\x00":
        raise InvalidDicomError("no DICM prefix and File Meta Information group length")
    end = 144 + struct.unpack("<I", body[140:144])[0]
    if end > len(body):
        raise InvalidDicomError("the File Meta Information runs past the part")
    meta = pydicom.dcmread(BytesIO(bytes(body[:end]))).file_meta
    if "TransferSyntaxUID" not in meta:
        raise InvalidDicomError("no Transfer Syntax UID in the File Meta Information")
    return meta, end


class DicomWebTransport:
    """QIDO-RS and WADO-RS for ``producer.pull.Puller`` (module docstring)."""

    verb = "WADO-RS"

    def __init__(self, config: PullConfig, receiver: Receiver | None, client: WebClient | None = None,
                 need_receiver: bool = True):
        if receiver is None and need_receiver:
            raise ConfigError("a DICOMweb pull needs a receiver for the instances it brings")
        peer = config.source if isinstance(config.source, WebPeer) else WebPeer.parse(str(config.source))
        self.client = client or WebClient(peer, config.web)
        self.receiver, self.page_size = receiver, config.web.page_size
        self.source = str(peer)
        self.unlisted: list[str] = []
        self.refused_parts = 0

    def check(self) -> None:
        """One search for nothing: the URL, the credentials and the TLS are checked before any model loads."""
        self.client.request("GET", "studies", params={"limit": 1, "StudyInstanceUID": "1.2.3.4.5.6.7.8.9"},
                            headers={"Accept": "application/dicom+json"}, accept=(204,)).close()

    def close(self) -> None:
        self.client.close()

    def find_studies(self, query: PullQuery) -> list[FoundStudy]:
        search = StudySearch(self.client, self.page_size)
        studies = search.run(query)
        self.unlisted = search.possibly_incomplete
        log.info("%s: %d QIDO-RS searches listed %d studies%s", self.source, search.searches, len(studies),
                 "; the server caps its answers: the date range was split" if search.capping else "")
        return studies

    def _all(self, path: str, key: str, includefield: str | None = None) -> list[dict]:
        """Every match of a search that cannot be split (series, instances), paged by offset while pages are full,
        stopping at a page that brings nothing new."""
        out: dict[str, dict] = {}
        offset = 0
        while True:
            params = {"limit": self.page_size, **({"offset": offset} if offset else {}),
                      **({"includefield": includefield} if includefield else {})}
            rsp = self.client.request("GET", path, params=params, headers={"Accept": "application/dicom+json"},
                                      accept=(204,))
            page = rsp.json() if rsp.status_code != 204 and rsp.content else []
            fresh = [p for p in page if isinstance(p, dict) and _value(p, key) and _value(p, key) not in out]
            out.update((_value(p, key), p) for p in fresh)
            if len(page) < self.page_size or not fresh:
                return list(out.values())
            offset += len(page)

    def find_instances(self, study_uid: str) -> list[tuple[str, str, str]]:
        """The study's instances; a series listed under an invalid UID is refused before its UID goes into a URL
        (a value such as '../..' would name another resource of the server, asked with Neuron's credentials)."""
        out = []
        for series in self._all(f"studies/{study_uid}/series", SERIES_UID):
            series_uid = _value(series, SERIES_UID)
            check_listed(self.source, study_uid, [(series_uid, "1", "")])
            for item in self._all(f"studies/{study_uid}/series/{series_uid}/instances", SOP_UID, SOP_CLASS):
                out.append((series_uid, _value(item, SOP_UID), _value(item, SOP_CLASS) or ""))
        return out

    def retrieve(self, study_uid: str, missing: list[tuple[str, str, str]], whole: bool) -> int | None:
        paths = sorted({f"studies/{study_uid}/series/{series}" for series, _, _ in missing}) if whole else \
            [f"studies/{study_uid}/series/{series}/instances/{sop}" for series, sop, _ in missing]
        refusals: list[str] = []
        for path in paths:
            refusals += self._fetch(path)
        if refusals:  # a part not kept matters when an instance is missing for it
            got = len(held_instances(self.receiver.db, [sop for _, sop, _ in missing]))
            if got < len(missing):
                raise PeerUnavailable(f"{self.source}: WADO-RS brought {got} of {len(missing)} instances; "
                                      f"{len(refusals)} part(s) not kept: {refusals[0]}")
            log.warning("%s: WADO-RS: %d part(s) beside the study's instances not kept: %s", self.source,
                        len(refusals), refusals[0])
        return None

    def _fetch(self, path: str) -> list[str]:
        """Stream one WADO-RS answer into the receiver, part by part; the reasons of the parts not kept."""
        rsp = self.client.request("GET", path, headers={"Accept": ACCEPT_DICOM}, stream=True)
        refusals = []
        try:
            boundary = boundary_of(rsp.headers.get("Content-Type", ""))
            chunks = rsp.iter_content(chunk_size=CHUNK)  # a cut answer loses at most this much
            for n, (headers, body) in enumerate(iter_parts(chunks, boundary, MAX_INSTANCE_BYTES), 1):
                refusal = self._keep(n, headers, body)
                if refusal:
                    refusals.append(refusal)
        except OSError as exc:  # the connection was cut mid-answer: what arrived whole is kept
            raise PeerUnavailable(f"{self.source}: WADO-RS {path} was cut off ({type(exc).__name__}); the "
                                  "instances that arrived whole are kept, the next try asks for the rest") from None
        finally:
            rsp.close()
        return refusals

    def _keep(self, n: int, headers: dict[str, str], body: bytearray) -> str | None:
        kind = headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
        try:
            if kind != "application/dicom":
                raise InvalidDicomError(f"its Content-Type is {kind!r}")
            meta, start = split_part(body)
        except (InvalidDicomError, ValueError, struct.error) as exc:
            self.refused_parts += 1
            return f"part {n} of an answer is not a DICOM file ({exc}); it was not stored"
        result = self.receiver.receive(meta, memoryview(body)[start:], track=False)
        if result.status not in (0x0000,):
            self.refused_parts += 1
            return f"part {n} was refused by the receiver: {result.comment or hex(result.status)}"
        return None

