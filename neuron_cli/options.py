"""The screening options, defined once and shared by run, worker, rescreen, listen and pull (and the environment).

Each option maps a command-line flag to a ``Settings`` field and, where there is one, its environment variable; the
help text states the default, taken from ``Settings`` itself, so flags, environment and help cannot drift apart.
``screening_options`` adds them all to a command; the command receives them as one ``screening`` dict of Settings
overrides (None: not given, so the environment or the default applies).
"""

from __future__ import annotations

import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Any

import typer

from neuron.settings import ENVIRONMENT, Settings, WeightsMode

_DEFAULTS = {f.name: f.default for f in fields(Settings)}


@dataclass(frozen=True)
class ScreeningOption:
    param: str  # the Python parameter name (typer derives --flag-name from it)
    field: str  # the Settings field it overrides
    type: Any
    help: str
    env: str | None = None
    flag: str | None = None  # explicit flag declaration, e.g. "--tta/--no-tta"
    default_text: str | None = None  # when the Settings default needs words (None: decided at run time)

    def annotation(self) -> Any:
        default = self.default_text if self.default_text is not None else _DEFAULTS[self.field]
        env = f"; env {self.env}" if self.env else ""
        if isinstance(default, bool):
            default = "on" if default else "off"
        help_text = f"{self.help} [default: {default}{env}]"
        decls = [self.flag] if self.flag else []
        return Annotated[self.type, typer.Option(*decls, help=help_text, show_default=False)]


def _env(name: str) -> str:
    if name not in ENVIRONMENT:
        raise KeyError(f"{name} is not listed in neuron.settings.ENVIRONMENT; add it there (and to the README)")
    return name


SCREENING_OPTIONS: tuple[ScreeningOption, ...] = (
    ScreeningOption("device", "device", str, "auto, cpu, cuda or cuda:N; one worker per GPU", _env("NEURON_DEVICE")),
    ScreeningOption("weights", "weights", WeightsMode, "pretrained (needs the weights file) or untrained (tests, "
                    "demos: results mean nothing)", _env("NEURON_WEIGHTS"), default_text="pretrained"),
    ScreeningOption("batch_size", "batch_size", int, "Images per model batch, across studies",
                    _env("NEURON_BATCH_SIZE"), default_text="16 on CPU, 128 on CUDA"),
    ScreeningOption("precision", "precision", str, "fp32 (exact: CPU and GPU agree) or fp16/bf16 (fast, CUDA; "
                    "probabilities within 0.01 of fp32)", _env("NEURON_PRECISION")),
    ScreeningOption("runtime", "runtime", str, "What runs the networks' forward pass: auto (ONNX Runtime on a CPU, "
                    "torch on CUDA), torch or onnxruntime; exact to fp32 either way", _env("NEURON_RUNTIME")),
    ScreeningOption("tta", "tta", bool, "Test-time augmentation: 5 fixed views, their mean and spread",
                    _env("NEURON_TTA"), flag="--tta/--no-tta"),
    ScreeningOption("clahe", "clahe", bool, "CLAHE contrast equalisation before the model", _env("NEURON_CLAHE"),
                    flag="--clahe/--no-clahe"),
    ScreeningOption("clahe_clip", "clahe_clip_limit", float, "CLAHE clip limit", _env("NEURON_CLAHE_CLIP")),
    ScreeningOption("clahe_grid", "clahe_grid", int, "CLAHE tiles per side", _env("NEURON_CLAHE_GRID")),
    ScreeningOption("top_k", "heatmap_top_k", int, "Heatmaps for the top K findings of each image (0: none)",
                    _env("NEURON_TOP_K")),
    ScreeningOption("max_frames", "max_frames", int, "Frames screened per multi-frame instance (evenly spaced)",
                    _env("NEURON_MAX_FRAMES")),
    ScreeningOption("readers", "readers", int, "Reader processes: files parsed and decoded into shared memory",
                    _env("NEURON_READERS"), default_text="with a GPU the cores, at most 8; on the CPU one per 4 cores"),
    ScreeningOption("max_pixels", "max_pixels", int, "Refuse frames with more pixels than this",
                    _env("NEURON_MAX_PIXELS")),
    ScreeningOption("mc_dropout", "mc_dropout", int, "MC-dropout samples per view for models with dropout (0: off)",
                    _env("NEURON_MC_DROPOUT")),
    ScreeningOption("review_threshold", "review_threshold", float, "Mark findings whose uncertainty is above this "
                    "as needs_review", _env("NEURON_REVIEW_THRESHOLD")),
    ScreeningOption("xrv_cache_dir", "xrv_cache_dir", Path, "Folder of torchxrayvision weight files",
                    _env("NEURON_XRV_CACHE_DIR"), default_text="~/.torchxrayvision/models_data"),
    ScreeningOption("xrv_sha256", "xrv_sha256", str, "Expected sha256 of the chest X-ray weights file; required "
                    "before the pickle is loaded", _env("NEURON_XRV_SHA256"), default_text="none"),
    ScreeningOption("model_dir", "model_dir", Path, "Folder of fine-tuned checkpoints (EfficientNet routes)",
                    _env("NEURON_MODEL_DIR"), default_text="none: those routes are skipped"),
    ScreeningOption("cache_dir", "cache_dir", Path, "Folder for caches (calibrated untrained model, torch and "
                    "matplotlib caches)", _env("NEURON_CACHE_DIR"), default_text="OUT/.cache"),
    ScreeningOption("dicom_out", "dicom_out", Path, "Also write DICOM objects for PACS here: per image a secondary "
                    "capture with the heatmap burned in, per study a structured report", _env("NEURON_DICOM_OUT"),
                    default_text="none"),
    ScreeningOption("fhir_out", "fhir_out", Path, "Also write FHIR R4 here: per screened study a Bundle of its "
                    "ImagingStudy, the models as Devices and an Observation per positive finding",
                    _env("NEURON_FHIR_OUT"), default_text="none"),
    ScreeningOption("metrics_port", "metrics_port", int, "Serve Prometheus metrics at http://HOST:PORT/metrics",
                    _env("NEURON_METRICS_PORT"), default_text="off"),
    ScreeningOption("send_to", "send_to", list[str], "Send each screened study's structured report and secondary "
                    "captures once its results are committed: by C-STORE to AE@HOST:PORT, or by STOW-RS to a "
                    "DICOMweb base URL https://HOST/PATH (repeat for several destinations; without --dicom-out they "
                    "are written to OUT/dicom-out)", _env("NEURON_SEND_TO"), default_text="none"),
    ScreeningOption("token_file", "dicomweb_token_file", Path, "File holding a bearer token for DICOMweb peers "
                    "(pull, --send-to https://...), read again whenever it changes; never put a token on the command "
                    "line", _env("NEURON_DICOMWEB_TOKEN_FILE"), default_text="none"),
    ScreeningOption("tls_cert", "tls_cert", Path, "PEM certificate for DICOM TLS (--send-to, listen, pull), and the "
                    "client certificate for https DICOMweb peers",
                    _env("NEURON_TLS_CERT"), default_text="no TLS"),
    ScreeningOption("tls_key", "tls_key", Path, "PEM private key of --tls-cert", _env("NEURON_TLS_KEY"),
                    default_text="none"),
    ScreeningOption("tls_ca", "tls_ca", Path, "PEM certificates of the authorities that sign the peers' "
                    "certificates (DIMSE TLS and https DICOMweb peers)", _env("NEURON_TLS_CA"),
                    default_text="the system's"),
    ScreeningOption("reference_dir", "reference_dir", Path, "Folder of the routes' out-of-distribution references "
                    "(neuron reference); a route with one gets an ood_score per image", _env("NEURON_REFERENCE_DIR"),
                    default_text="OUT/references"),
)


def screening_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Give a typer command every screening option; it receives them as ``screening``: {Settings field: value}."""
    sig = inspect.signature(func)
    hints = typing.get_type_hints(func, include_extras=True)  # the command module may use string annotations
    own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in sig.parameters.values()
           if p.name != "screening"]
    clash = {p.name for p in own} & {o.param for o in SCREENING_OPTIONS}
    if clash:
        raise TypeError(f"{func.__name__} declares the shared screening options {sorted(clash)} itself; remove them "
                        f"from the command, neuron_cli.options defines them")
    extra = [inspect.Parameter(o.param, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=o.annotation())
             for o in SCREENING_OPTIONS]
    positional = [p for p in own if p.kind is not inspect.Parameter.KEYWORD_ONLY]
    keyword = [p for p in own if p.kind is inspect.Parameter.KEYWORD_ONLY]

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        screening = {o.field: kwargs.pop(o.param, None) for o in SCREENING_OPTIONS}
        return func(*args, screening=screening, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=positional + keyword + extra)  # type: ignore[attr-defined]
    wrapper.__annotations__ = {p.name: p.annotation for p in (*positional, *keyword, *extra)}
    return wrapper
