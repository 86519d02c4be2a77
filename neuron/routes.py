"""Which model route an instance goes to, decided from DICOM attributes alone (torch-free).

Routing never looks at pixels: Modality and BodyPartExamined decide (a colour-saturation test cannot: real echo
ultrasound is colourful, a grayscale photograph is not). The pixel check that an image
sent to a grayscale model really is grayscale happens later, on the device (``neuron_models.preprocess``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from neuron.errors import SkippedInput
from neuron.work import Route

CHEST_MODALITIES = frozenset({"CR", "DX"})
MRI_US_MODALITIES = frozenset({"MR", "US"})
# Visible-light photographs: general (XC), endoscopy/microscopy/slide photographs are VL and not skin.
SKIN_MODALITIES = frozenset({"XC"})
CHEST_BODY_PARTS = frozenset({"", "CHEST"})


@dataclass(frozen=True)
class RoutingFacts:
    """The header attributes routing depends on."""

    modality: str
    body_part: str = ""

    @classmethod
    def of(cls, modality: str | None, body_part: str | None) -> RoutingFacts:
        return cls((modality or "").strip().upper(), (body_part or "").strip().upper())


def route_for(facts: RoutingFacts) -> Route:
    """Return the route for an instance, or raise SkippedInput with a reason a person can act on."""
    if facts.modality in CHEST_MODALITIES:
        if facts.body_part in CHEST_BODY_PARTS:
            return Route.CHEST_XRAY
        raise SkippedInput(
            f"BodyPartExamined '{facts.body_part}' is not CHEST: the chest X-ray model only reads chest radiographs "
            f"({facts.modality} with BodyPartExamined CHEST or absent); other body parts are recorded and left alone"
        )
    if facts.modality in MRI_US_MODALITIES:
        return Route.MRI_US
    if facts.modality in SKIN_MODALITIES:
        return Route.SKIN
    shown = facts.modality or "<absent>"
    raise SkippedInput(
        f"Modality '{shown}' is not screened: Neuron reads CR/DX chest radiographs, MR and US images and "
        f"XC photographs; this instance is recorded and left alone"
    )


# Routes that have a model in the registry (whether or not a checkpoint is trained for it). The producer never imports
# torch, so it reads this instead of the registry; a test checks it against neuron_models.factory.list_models.
MODEL_ROUTES = frozenset(Route)


# -- the populations the routes' models were trained on ------------------------------------------------------------
class PopulationPolicy(str, Enum):
    """What indexing does with a film outside its route's trained population (age, a forced modality or body part):
    ``flag`` screens it and marks every finding ``outside_population`` and ``needs_review``; ``skip`` records it as
    skipped with the reason. A stated view the model was not trained on is skipped under either policy."""

    FLAG = "flag"
    SKIP = "skip"


@dataclass(frozen=True)
class Population:
    """Who a route's model was trained on, as far as a DICOM header can tell: the model config of each route refers
    to one of these objects (a test checks that they are the same), and indexing gates each instance against it
    before it is screened. ``None``: the header is not checked for that fact."""

    modalities: frozenset[str]
    body_parts: frozenset[str] | None = None  # "" stands for an absent BodyPartExamined
    views: frozenset[str] | None = None  # canonical views (``VIEWS``)
    min_age_years: float | None = None
    description: str = ""

    def __post_init__(self) -> None:
        if self.views is not None and not self.views <= set(VIEWS.values()):
            raise ValueError(f"population views {sorted(self.views)} must be among {sorted(set(VIEWS.values()))}")
        if self.min_age_years is not None and self.min_age_years < 0:
            raise ValueError(f"minimum age {self.min_age_years} must be 0 or more years")


# ViewPosition (0018,5101) defined terms (DICOM PS3.3 C.8.11.5, DX Positioning Module) and the words series and
# protocol descriptions use for them, each mapped to one canonical view.
VIEWS = {
    "PA": "PA", "AP": "AP", "FRONTAL": "FRONTAL",
    "LL": "LATERAL", "RL": "LATERAL", "LAT": "LATERAL", "LATERAL": "LATERAL", "LLAT": "LATERAL", "RLAT": "LATERAL",
    "LLD": "DECUBITUS", "RLD": "DECUBITUS", "DECUB": "DECUBITUS", "DECUBITUS": "DECUBITUS",
    "LLO": "OBLIQUE", "RLO": "OBLIQUE", "OBL": "OBLIQUE", "OBLIQUE": "OBLIQUE", "LAO": "OBLIQUE", "RAO": "OBLIQUE",
}
_WORD = re.compile(r"[A-Z0-9]+")

CHEST_POPULATION = Population(
    modalities=CHEST_MODALITIES, body_parts=CHEST_BODY_PARTS, views=frozenset({"PA", "AP", "FRONTAL"}),
    min_age_years=18.0,
    description="frontal (PA/AP) chest radiographs of adults: torchxrayvision's densenet121-res224-all was trained "
                "on NIH ChestX-ray14, PadChest, CheXpert, MIMIC-CXR, Google, OpenI and RSNA frontal films")
MRI_US_POPULATION = Population(modalities=MRI_US_MODALITIES,
                               description="MR and US images like those the site's checkpoint was trained on")
SKIN_POPULATION = Population(modalities=SKIN_MODALITIES,
                             description="dermatology photographs like those the site's checkpoint was trained on")
POPULATIONS: dict[Route, Population] = {Route.CHEST_XRAY: CHEST_POPULATION, Route.MRI_US: MRI_US_POPULATION,
                                        Route.SKIN: SKIN_POPULATION}


@dataclass(frozen=True)
class ViewFact:
    """The view a header states: ``view`` canonical (None when it states none), where it was read, and why the
    header could not tell when it could not."""

    view: str | None
    source: str | None = None  # "ViewPosition", "SeriesDescription" or "ProtocolName"
    stated: str | None = None  # the value as the header holds it
    unclear: str | None = None

    @classmethod
    def of(cls, view_position: str | None, series_description: str | None = None,
           protocol_name: str | None = None) -> ViewFact:
        """ViewPosition when it holds a known term, else the one view that SeriesDescription, then ProtocolName
        names; a description naming two views (``PA AND LAT``) tells nothing."""
        position = (view_position or "").strip().upper()
        if position in VIEWS:
            return cls(VIEWS[position], "ViewPosition", position)
        unclear = [f"ViewPosition {position!r} is not a known view term"] if position else []
        for source, text in (("SeriesDescription", series_description), ("ProtocolName", protocol_name)):
            found = {VIEWS[w] for w in _WORD.findall((text or "").upper()) if w in VIEWS}
            if len(found) == 1:
                return cls(found.pop(), source, text)
            if len(found) > 1:
                unclear.append(f"{source} {text!r} names several views ({', '.join(sorted(found))})")
        if not unclear:
            unclear.append("no ViewPosition, and neither SeriesDescription nor ProtocolName names a view")
        return cls(None, unclear="; ".join(unclear))


@dataclass(frozen=True)
class PopulationFacts:
    """The header facts gating reads (built by producer.scan; the birth date never leaves it, only the age)."""

    modality: str = ""
    body_part: str = ""
    view: ViewFact = ViewFact(None, unclear="no view attributes read")
    age_years: float | None = None
    age_source: str | None = None  # "PatientAge '045Y'" or "birth date and StudyDate"


@dataclass(frozen=True)
class GateDecision:
    """What indexing decided about one instance against its route's trained population: ``outside`` says why it is
    outside (None: inside as far as the header tells), ``skip`` whether it is left unscreened, ``notes`` what the
    header could not tell."""

    route: Route
    outside: str | None = None
    skip: bool = False
    notes: str | None = None


def gate(route: Route, facts: PopulationFacts, policy: PopulationPolicy | str = PopulationPolicy.FLAG) -> GateDecision:
    """Check one instance's header against the population its route's model was trained on (``POPULATIONS``).

    A stated view outside the population is skipped whatever the policy: a lateral film gets confident but
    meaningless frontal findings. A patient younger than the minimum age, or a modality or body part forced onto the
    route (``--route``), is outside the population: flagged and screened, or skipped under ``--population-policy
    skip``. What the header could not tell (no view, no age) is noted and the film screened."""
    policy = PopulationPolicy(policy)
    pop = POPULATIONS[route]
    name = route.value
    outside: list[str] = []
    notes: list[str] = []
    skip = False
    if facts.modality not in pop.modalities:
        outside.append(f"Modality '{facts.modality or '<absent>'}' is not one the {name} model was trained on "
                       f"({', '.join(sorted(pop.modalities))}); it was sent to this route by --route")
    if pop.body_parts is not None and facts.body_part not in pop.body_parts:
        outside.append(f"BodyPartExamined '{facts.body_part}' is not one the {name} model was trained on "
                       f"({', '.join(sorted(p or '<absent>' for p in pop.body_parts))})")
    if pop.views is not None:
        v = facts.view
        if v.view is None:
            notes.append(f"view unknown: {v.unclear} (the {name} model was trained on {_views(pop)} films)")
        elif v.view not in pop.views:
            skip = True
            outside.append(f"{v.source} {v.stated!r} is a {v.view.lower()} view; the {name} model was trained on "
                           f"{_views(pop)} films only, so this film is recorded and not screened (if the header is "
                           f"wrong, correct {v.source} at the source and re-export the file)")
    if pop.min_age_years is not None:
        if facts.age_years is None:
            notes.append(f"age unknown: no PatientAge, and no birth date with a study date (the {name} model was "
                         f"trained on patients {pop.min_age_years:g} and older)")
        elif facts.age_years < pop.min_age_years:
            outside.append(f"patient age {_age(facts.age_years)} ({facts.age_source}) is below the {name} model's "
                           f"trained population ({pop.min_age_years:g} years and older)")
    if outside and not skip:
        skip = policy is PopulationPolicy.SKIP
        outside.append("not screened: --population-policy skip" if skip else
                       "screened and flagged for review (--population-policy flag; skip leaves such films unscreened)")
    return GateDecision(route, "; ".join(outside) or None, skip, "; ".join(notes) or None)


def _views(pop: Population) -> str:
    return "/".join(v for v in ("PA", "AP", "FRONTAL", "LATERAL", "DECUBITUS", "OBLIQUE") if v in (pop.views or ()))


def _age(years: float) -> str:
    return f"{years:.0f} years" if years >= 2 else f"{years * 12:.0f} months"
