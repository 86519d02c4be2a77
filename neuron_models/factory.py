"""The one constructor of screening models, and what the registry holds: the built-in models register themselves
when this module imports them (the shape of timm's ``timm/models/__init__.py`` over ``_registry.py`` and
``_factory.py``), so the registry itself never imports a model module."""

from __future__ import annotations

from neuron.settings import Settings
from neuron.work import Route
from neuron_models import effnet, xray  # noqa: F401  (each registers its models on import)
from neuron_models.registry import ModelConfig, ScreeningModel, registered, registered_configs


def unavailable_reason(name: str, settings: Settings) -> str | None:
    """Why a registered model cannot be built with these settings, found without loading it; None if it may be
    (weights that turn out missing or corrupt still fail when it is built)."""
    probe = registered(name)[2]
    return probe(settings) if probe is not None else None


def list_models() -> list[ModelConfig]:
    return registered_configs()


def model_config(name: str) -> ModelConfig:
    return registered(name)[0]


def models_for_route(route: Route) -> list[ModelConfig]:
    return [cfg for cfg in list_models() if cfg.route is route]


def create_model(name: str, settings: Settings) -> ScreeningModel:
    """Build a registered model with the weights ``settings`` ask for; the only constructor."""
    return registered(name)[1](settings).eval()
