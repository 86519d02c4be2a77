"""What ``neuron pull`` asks for and how, whatever the transport (DIMSE in ``producer.pull``, DICOMweb in
``producer.dicomweb``): the query (study dates, modalities, accession numbers) and the pull's settings (source,
retries, in-flight limit, window, pace, and a DICOMweb source's access)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

from pydicom.dataset import Dataset

from neuron.dicomnet import Peer, TimeWindow, TlsFiles, check_ae_title
from neuron.errors import ConfigError, FailedInput
from neuron.webclient import WebAccess, WebPeer
from neuron.work import FoundStudy
from producer.scan import checked_uid, parse_da


def date_range_text(low: date | None, high: date | None) -> str:
    """A DA range for matching (PS3.4 C.2.2.2.5): 'YYYYMMDD', 'A-B', 'A-' or '-B'; '' when both ends are open."""
    if low is None and high is None:
        return ""
    if low == high:
        return f"{low:%Y%m%d}"
    return ("" if low is None else f"{low:%Y%m%d}") + "-" + ("" if high is None else f"{high:%Y%m%d}")


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
        return date_range_text(self.date_from, self.date_to)

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
    source: Peer | WebPeer  # AE@HOST:PORT (DIMSE) or a DICOMweb base URL
    ae_title: str = "NEURON"
    tls: TlsFiles = field(default_factory=TlsFiles)
    move_to: str | None = None
    in_flight: int = 2
    window: TimeWindow | None = None
    attempts: int = 4
    retry_s: float = 10.0
    max_per_hour: float | None = None  # studies whose retrieval may start per hour (None: no limit)
    web: WebAccess = field(default_factory=WebAccess)  # a DICOMweb source's authentication, TLS, timeouts

    def __post_init__(self) -> None:
        if self.max_per_hour is not None and self.max_per_hour <= 0:
            raise ConfigError(f"--max-studies-per-hour {self.max_per_hour} must be positive (or left out: no "
                              "limit)")
        if self.move_to is not None and isinstance(self.source, WebPeer):
            raise ConfigError("--move-to asks a DIMSE PACS to C-MOVE; a DICOMweb source is retrieved by WADO-RS "
                              "into this process: leave --move-to out")
        if self.move_to is not None:
            object.__setattr__(self, "move_to", check_ae_title(self.move_to, "--move-to"))
        if self.in_flight < 1:
            raise ConfigError(f"--in-flight {self.in_flight} must be at least 1 (studies retrieved at once)")
        if self.attempts < 1:
            raise ConfigError(f"--attempts {self.attempts} must be at least 1")


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
