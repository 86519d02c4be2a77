"""When is a study that arrives over the network complete? A small pure object, decided on the clock it is given.

DICOM has no "end of study" message: a modality or a router sends series after series on one or several associations,
with pauses between them. Every receiver falls back on quiet times (mercure's series and study triggers, Orthanc's
StableAge, MONAI Deploy Informatics Gateway's timeout per AE title). Per listener:

    series quiet   a series is complete once none of its instances arrived for this long
    study quiet    a study is complete once every series it has is complete and then no new series started for this
                   long (time for the modality to open the next one)
    maximum wait   a study is released this long after its first instance whatever still arrives: screened as it is

A released study is forgotten. An instance that arrives later opens the study again with fresh timers, so it is
screened on its own and the study's summary (``studies``) and SR are updated with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from neuron.errors import ConfigError


class Release(str, Enum):
    QUIET = "quiet"  # every series complete and the study quiet
    MAX_WAIT = "max-wait"  # forced: the maximum wait passed


@dataclass(frozen=True)
class CompletenessRules:
    series_quiet_s: float = 10.0
    study_quiet_s: float = 20.0
    max_wait_s: float = 900.0

    def __post_init__(self) -> None:
        for name, value in (("--series-quiet", self.series_quiet_s), ("--study-quiet", self.study_quiet_s),
                            ("--max-wait", self.max_wait_s)):
            if value < 0:
                raise ConfigError(f"{name} {value} must be 0 or more seconds")
        if self.max_wait_s < self.series_quiet_s + self.study_quiet_s:
            raise ConfigError(f"--max-wait {self.max_wait_s:g} s is shorter than --series-quiet + --study-quiet "
                              f"({self.series_quiet_s + self.study_quiet_s:g} s): every study would be forced out "
                              "before it could be complete; make it longer")


@dataclass
class _Study:
    first_at: float
    series: dict[str, float] = field(default_factory=dict)  # series UID -> last arrival

    def complete_at(self, rules: CompletenessRules) -> float:
        """When the quiet rule releases the study, given what has arrived so far."""
        last_series_complete = max(self.series.values()) + rules.series_quiet_s
        return last_series_complete + rules.study_quiet_s


class Arrivals:
    """The studies still arriving. ``arrived`` on each stored instance; ``due`` returns the studies to release now
    and forgets them. Not thread-safe: one owner (the listener's ticker) calls it under its lock."""

    def __init__(self, rules: CompletenessRules):
        self.rules = rules
        self._studies: dict[str, _Study] = {}

    def arrived(self, study: str, series: str, now: float) -> None:
        state = self._studies.get(study)
        if state is None:
            state = self._studies[study] = _Study(first_at=now)
        state.series[series] = now

    def due(self, now: float) -> list[tuple[str, Release]]:
        ready = []
        for study, state in self._studies.items():
            if now >= state.complete_at(self.rules):
                ready.append((study, Release.QUIET))
            elif now >= state.first_at + self.rules.max_wait_s:
                ready.append((study, Release.MAX_WAIT))
        for study, _ in ready:
            del self._studies[study]
        return ready

    def take_all(self) -> list[str]:
        """Every study still arriving, released now and forgotten (a listener that stops hands them on)."""
        studies, self._studies = list(self._studies), {}
        return studies

    def waiting(self) -> int:
        return len(self._studies)

    def next_due(self) -> float | None:
        """The earliest time a study may be released (for a ticker that sleeps until then)."""
        times = [min(s.complete_at(self.rules), s.first_at + self.rules.max_wait_s) for s in self._studies.values()]
        return min(times, default=None)
