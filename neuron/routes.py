"""Which model route an instance goes to, decided from DICOM attributes alone (torch-free).

Routing never looks at pixels: Modality and BodyPartExamined decide (a colour-saturation test cannot: real echo
ultrasound is colourful, a grayscale photograph is not). The pixel check that an image
sent to a grayscale model really is grayscale happens later, on the device (``neuron_models.preprocess``).
"""

from __future__ import annotations

from dataclasses import dataclass

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
