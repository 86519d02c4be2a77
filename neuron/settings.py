"""One frozen settings object, read from the environment once at process start and passed down.

Precedence: explicit keyword arguments (the CLI's flags) > environment variables > defaults. Every environment
variable Neuron reads is listed in ``ENVIRONMENT`` and documented in the README. This is the only module that reads
the process environment (a test checks it), and the only one that sets variables other libraries read
(``apply_cache_environment``).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from enum import Enum
from pathlib import Path
from typing import Any

from neuron.errors import ConfigError
from neuron.routes import PopulationPolicy
from neuron.work import Route


class WeightsMode(str, Enum):
    PRETRAINED = "pretrained"
    UNTRAINED = "untrained"


ENVIRONMENT = {
    "NEURON_DATABASE_URL": "SQLAlchemy URL of the results database (default: sqlite:///<out>/neuron.db)",
    "NEURON_OUT": "output folder for the database and heatmaps (default: ./results)",
    "NEURON_DEVICE": "auto, cpu, cuda or cuda:N (default: auto)",
    "NEURON_WEIGHTS": "pretrained or untrained (default: pretrained)",
    "NEURON_XRV_CACHE_DIR": "folder holding torchxrayvision weight files (default: ~/.torchxrayvision/models_data)",
    "NEURON_XRV_SHA256": "expected sha256 of the chest X-ray weights file; required before the pickle is loaded",
    "NEURON_ALLOW_DOWNLOAD": "1 to let torchxrayvision download missing weights, 0 to never try (default: 1)",
    "NEURON_BATCH_SIZE": "images per model batch (default: 16 on CPU, 128 on CUDA)",
    "NEURON_BROKER_URL": "Celery broker for the distributed mode (default: redis://127.0.0.1:6379/0)",
    "NEURON_HEATMAP_DIR": "where heatmap PNGs are written (default: <out>/heatmaps); a shared mount for many hosts",
    "NEURON_PATH_MAP": "shared=local path prefixes, ';'-separated, where this host mounts shares elsewhere",
    "NEURON_VISIBILITY_TIMEOUT": "seconds before Redis re-delivers a message whose worker died (default: 3600)",
    "NEURON_MODEL_DIR": "folder of fine-tuned checkpoints (one sub-folder each) for the EfficientNet routes",
    "NEURON_PRECISION": "fp32 (exact: the same answer on CPU and GPU), fp16 or bf16 (fast, CUDA; default: fp32)",
    "NEURON_RUNTIME": "what runs the networks' forward pass: auto (ONNX Runtime on a CPU, torch on CUDA), torch or "
                      "onnxruntime (default: auto)",
    "NEURON_FOLLOW_LINKS": "1 to follow symbolic links that leave the scanned folder (loops are still cut), 0 not to "
                           "(default: 0)",
    # the screening options shared by run, worker, rescreen, listen and pull (neuron_cli/options.py)
    "NEURON_TTA": "1 or 0: test-time augmentation (default: 1)",
    "NEURON_CLAHE": "1 or 0: CLAHE contrast equalisation (default: 1)",
    "NEURON_CLAHE_CLIP": "CLAHE clip limit (default: 2.0)",
    "NEURON_CLAHE_GRID": "CLAHE tiles per side (default: 8)",
    "NEURON_TOP_K": "heatmaps for the top K findings of each image, 0 for none (default: 1)",
    "NEURON_MAX_FRAMES": "frames screened per multi-frame instance (default: 16)",
    "NEURON_READERS": "reader processes that parse and decode files into shared memory (default: the cores, at "
                      "most 8)",
    "NEURON_MAX_PIXELS": "refuse frames with more pixels than this (default: 67108864)",
    "NEURON_MC_DROPOUT": "MC-dropout samples per view for models with dropout (default: 0, off)",
    "NEURON_REVIEW_THRESHOLD": "uncertainty above which a finding is marked needs_review (default: 0.1)",
    "NEURON_CACHE_DIR": "folder for caches (calibrated untrained model, torch, matplotlib; default: <out>/.cache)",
    "NEURON_DICOM_OUT": "folder for DICOM outputs (secondary capture with the heatmap, structured report per study); "
                        "unset: none are written",
    "NEURON_FHIR_OUT": "folder for FHIR outputs: one R4 Bundle per screened study (ImagingStudy, Device, an "
                       "Observation per positive finding); unset: none are written",
    "NEURON_METRICS_PORT": "port of the Prometheus /metrics endpoint of `neuron run` and `neuron worker` (unset: off)",
    "NEURON_METRICS_HOST": "address the /metrics endpoint listens on (default: 127.0.0.1; 0.0.0.0 in a container)",
    "NEURON_PATIENT_KEY": "secret for --patient-key: the Patient ID is stored only as HMAC-SHA256(secret, ID), so "
                          "one patient's studies can be grouped without storing who it is",
    "NEURON_REVIEW_TOKEN": "token that `neuron review` requires for writing verdicts (unset: read-only)",
    # DICOM networking: neuron listen, neuron pull, --send-to (neuron/dicomnet.py)
    "NEURON_AE_TITLE": "Neuron's own AE title: the listener's, and the calling AE of pull and send (default: NEURON)",
    "NEURON_SEND_TO": "AE@HOST:PORT or https://HOST/dicom-web, comma-separated: send each screened study's SR and "
                      "secondary captures there by C-STORE or STOW-RS (unset: not sent)",
    "NEURON_SEND_ATTEMPTS": "tries per DICOM output and destination before its delivery is failed (default: 5)",
    "NEURON_SEND_RETRY_SECONDS": "wait before the first retry of a delivery, doubled each try up to 300 (default: 2)",
    "NEURON_TLS_CERT": "PEM certificate for DICOM TLS (listen, pull, send); unset: no TLS",
    "NEURON_TLS_KEY": "PEM private key of NEURON_TLS_CERT",
    "NEURON_TLS_CA": "PEM certificates of the authorities that sign the peers' certificates (listen: callers "
                     "must present one)",
    # DICOMweb peers (https://... in place of AE@HOST:PORT for pull and --send-to; neuron/webclient.py)
    "NEURON_DICOMWEB_USERNAME": "user name for HTTP basic authentication to DICOMweb peers",
    "NEURON_DICOMWEB_PASSWORD": "password of NEURON_DICOMWEB_USERNAME (never printed; masked in logs)",
    "NEURON_DICOMWEB_TOKEN": "a static bearer token for DICOMweb peers (never printed; masked in logs)",
    "NEURON_DICOMWEB_TOKEN_FILE": "a file holding the bearer token, read again whenever it changes (--token-file)",
    "NEURON_DICOMWEB_OAUTH_URL": "OAuth2 token endpoint: client-credentials tokens for DICOMweb peers, renewed "
                                 "before they expire",
    "NEURON_DICOMWEB_CLIENT_ID": "OAuth2 client id of NEURON_DICOMWEB_OAUTH_URL",
    "NEURON_DICOMWEB_CLIENT_SECRET": "OAuth2 client secret of NEURON_DICOMWEB_OAUTH_URL (never printed)",
    "NEURON_DICOMWEB_SCOPE": "OAuth2 scope asked for with the client credentials (default: none)",
    "NEURON_DICOMWEB_PEERS": "a JSON file of per-peer DICOMweb settings keyed by base URL (authentication, CA, "
                             "timeouts, page size) for sites with several archives; chmod 600 when it holds secrets",
    "NEURON_POPULATION_POLICY": "flag or skip: what indexing does with a film outside its model's trained population "
                                "(a child's film): screen it and flag every finding for review, or skip it "
                                "(default: flag)",
    "NEURON_REFERENCE_DIR": "folder of the routes' out-of-distribution references (`neuron reference`; default: "
                            "<out>/references)",
}

# Variables of other programs that Neuron honours, read here with its own.
FOREIGN_ENVIRONMENT = {
    "XDG_CACHE_HOME": "the user's cache folder (XDG Base Directory Specification); a worker without an output folder "
                      "keeps its caches in $XDG_CACHE_HOME/neuron (default ~/.cache/neuron)",
    "HF_HUB_OFFLINE": "set to 0/false/no/off to let `neuron train` download ImageNet weights through huggingface_hub; "
                      "otherwise only its local cache is used",
}

PRECISIONS = ("fp32", "fp16", "bf16")
RUNTIMES = ("auto", "torch", "onnxruntime")


def _parse_bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ConfigError(f"{name}={value!r} is not a boolean; use 1 or 0")


def _parse_int(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError as exc:
        raise ConfigError(f"{name}={value!r} is not a whole number") from exc


def _parse_float(name: str, value: str) -> float:
    try:
        return float(value)
    except ValueError as exc:
        raise ConfigError(f"{name}={value!r} is not a number") from exc


_SCREENING_ENV = {
    "NEURON_TTA": ("tta", _parse_bool),
    "NEURON_CLAHE": ("clahe", _parse_bool),
    "NEURON_CLAHE_CLIP": ("clahe_clip_limit", _parse_float),
    "NEURON_CLAHE_GRID": ("clahe_grid", _parse_int),
    "NEURON_TOP_K": ("heatmap_top_k", _parse_int),
    "NEURON_MAX_FRAMES": ("max_frames", _parse_int),
    "NEURON_READERS": ("readers", _parse_int),
    "NEURON_MAX_PIXELS": ("max_pixels", _parse_int),
    "NEURON_MC_DROPOUT": ("mc_dropout", _parse_int),
    "NEURON_REVIEW_THRESHOLD": ("review_threshold", _parse_float),
    "NEURON_CACHE_DIR": ("cache_dir", lambda _name, v: Path(v)),
    "NEURON_DICOM_OUT": ("dicom_out", lambda _name, v: Path(v) if v.strip() else None),
    "NEURON_FHIR_OUT": ("fhir_out", lambda _name, v: Path(v) if v.strip() else None),
    "NEURON_METRICS_PORT": ("metrics_port", lambda name, v: _parse_int(name, v) if v.strip() else None),
    "NEURON_SEND_TO": ("send_to", lambda _name, v: tuple(p.strip() for p in v.split(",") if p.strip())),
    "NEURON_TLS_CERT": ("tls_cert", lambda _name, v: Path(v) if v.strip() else None),
    "NEURON_TLS_KEY": ("tls_key", lambda _name, v: Path(v) if v.strip() else None),
    "NEURON_TLS_CA": ("tls_ca", lambda _name, v: Path(v) if v.strip() else None),
    "NEURON_REFERENCE_DIR": ("reference_dir", lambda _name, v: Path(v) if v.strip() else None),
    "NEURON_DICOMWEB_TOKEN_FILE": ("dicomweb_token_file", lambda _name, v: Path(v) if v.strip() else None),
}

# DICOMweb credentials and endpoints: text, taken as given (an empty value is unset)
_DICOMWEB_ENV = {
    "NEURON_DICOMWEB_USERNAME": "dicomweb_username", "NEURON_DICOMWEB_PASSWORD": "dicomweb_password",
    "NEURON_DICOMWEB_TOKEN": "dicomweb_token", "NEURON_DICOMWEB_OAUTH_URL": "dicomweb_oauth_url",
    "NEURON_DICOMWEB_CLIENT_ID": "dicomweb_client_id", "NEURON_DICOMWEB_CLIENT_SECRET": "dicomweb_client_secret",
    "NEURON_DICOMWEB_SCOPE": "dicomweb_scope", "NEURON_DICOMWEB_PEERS": "dicomweb_peers",
}


def parse_path_map(value: str) -> tuple[tuple[str, str], ...]:
    """'/archive=/mnt/archive;/heatmaps=/mnt/heat' -> (('/archive', '/mnt/archive'), ...)."""
    pairs = []
    for part in filter(None, (p.strip() for p in value.split(";"))):
        shared, sep, local = part.partition("=")
        if not sep or not shared or not local:
            raise ConfigError(f"NEURON_PATH_MAP entry {part!r} is not SHARED=LOCAL; "
                              "example: /archive=/mnt/archive;/heatmaps=/mnt/heatmaps")
        pairs.append((shared.rstrip("/"), local.rstrip("/")))
    return tuple(pairs)


def swap_prefix(path: str, pairs) -> str:
    """Replace the first matching folder prefix; '/archive' matches '/archive' and '/archive/x', not '/archive2'."""
    for old, new in pairs:
        if path == old or path.startswith(old + "/"):
            return new + path[len(old):]
    return path


@dataclass(frozen=True)
class Settings:
    out_dir: Path = Path("results")
    database_url: str | None = None
    device: str = "auto"
    batch_size: int | None = None
    weights: WeightsMode = WeightsMode.PRETRAINED
    xrv_cache_dir: Path | None = None
    xrv_sha256: str | None = None
    allow_download: bool = True
    clahe: bool = True
    clahe_clip_limit: float = 2.0
    clahe_grid: int = 8
    clahe_size: int = 512
    tta: bool = True
    heatmap_top_k: int = 1
    max_frames: int = 16
    max_pixels: int = 8192 * 8192
    readers: int | None = None  # reader processes (worker.readers); None: by device (worker.models.default_readers)
    seed: int = 0
    model_dir: Path | None = None
    mc_dropout: int = 0
    review_threshold: float = 0.1
    route_override: Route | None = None
    follow_links: bool = False  # symbolic links in a scanned folder (producer.scan.iter_files)
    precision: str = "fp32"
    runtime: str = "auto"  # what runs the networks (neuron_models.runtime): auto, torch, onnxruntime
    cache_dir: Path | None = None  # None: <out>/.cache (resolved_cache_dir)
    dicom_out: Path | None = None  # DICOM secondary captures and structured reports (worker.dicom_out); None: off
    fhir_out: Path | None = None  # a FHIR Bundle per screened study (worker.fhir_out); None: off
    metrics_port: int | None = None  # Prometheus /metrics; None: off
    population_policy: PopulationPolicy = PopulationPolicy.FLAG  # indexing: films outside a trained population
    reference_dir: Path | None = None  # out-of-distribution references; None: <out>/references
    # the secret of --patient-key when the flag is given (``with_patient_key``); never printed, never stored
    patient_key: str | None = field(default=None, repr=False)
    patient_secret: str | None = field(default=None, repr=False)  # NEURON_PATIENT_KEY, whether or not it is used
    review_token: str | None = field(default=None, repr=False)  # NEURON_REVIEW_TOKEN
    metrics_host: str = "127.0.0.1"  # NEURON_METRICS_HOST
    out_from_env: bool = False  # NEURON_OUT was set: a worker has an output folder
    user_cache_dir: Path = field(default_factory=lambda: Path.home() / ".cache" / "neuron")  # XDG_CACHE_HOME
    hub_downloads: bool = False  # HF_HUB_OFFLINE set to a false value: training may download ImageNet weights
    # DICOM networking (neuron/dicomnet.py): --send-to peers as AE@HOST:PORT; without --dicom-out, sending writes the
    # outputs to OUT/dicom-out
    ae_title: str = "NEURON"
    send_to: tuple[str, ...] = ()
    send_attempts: int = 5
    send_retry_s: float = 2.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    # DICOMweb peers (neuron/webclient.py): secrets never in repr, never on a command line
    dicomweb_username: str | None = None
    dicomweb_password: str | None = field(default=None, repr=False)
    dicomweb_token: str | None = field(default=None, repr=False)
    dicomweb_token_file: Path | None = None
    dicomweb_oauth_url: str | None = None
    dicomweb_client_id: str | None = None
    dicomweb_client_secret: str | None = field(default=None, repr=False)
    dicomweb_scope: str | None = None
    dicomweb_peers: Path | None = None
    broker_given: bool = False  # NEURON_BROKER_URL was set: listen and pull enqueue instead of screening in process
    # distributed mode
    broker_url: str = "redis://127.0.0.1:6379/0"
    heatmap_root: Path | None = None
    path_map: tuple[tuple[str, str], ...] = ()
    max_wait_ms: int = 200
    worker_concurrency: int | None = None  # studies in flight; None: enough to fill batches (worker.service)
    visibility_timeout: int = 3600
    max_attempts: int = 3
    watch_stable_seconds: float = 2.0
    watch_quiet_seconds: float = 5.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "out_dir", Path(self.out_dir))
        if self.route_override is not None:
            object.__setattr__(self, "route_override", Route(self.route_override))
        if self.heatmap_root is not None:
            object.__setattr__(self, "heatmap_root", Path(self.heatmap_root))
        if self.model_dir is not None:
            object.__setattr__(self, "model_dir", Path(self.model_dir).expanduser())
        if self.mc_dropout < 0:
            raise ConfigError(f"--mc-dropout {self.mc_dropout} must be 0 (off) or a number of samples")
        object.__setattr__(self, "weights", WeightsMode(self.weights))
        try:
            object.__setattr__(self, "population_policy", PopulationPolicy(self.population_policy))
        except ValueError:
            raise ConfigError(f"population policy {self.population_policy!r} is not flag or skip: flag screens a film "
                              "outside its model's trained population and marks it for review, skip leaves it "
                              "unscreened (--population-policy, NEURON_POPULATION_POLICY)") from None
        if self.reference_dir is not None:
            object.__setattr__(self, "reference_dir", Path(self.reference_dir).expanduser())
        if self.xrv_cache_dir is not None:
            object.__setattr__(self, "xrv_cache_dir", Path(self.xrv_cache_dir).expanduser())
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch size {self.batch_size} must be at least 1")
        if self.heatmap_top_k < 0:
            raise ConfigError(f"heatmap top-k {self.heatmap_top_k} must be 0 (no heatmaps) or more")
        if self.max_frames < 1:
            raise ConfigError(f"max frames {self.max_frames} must be at least 1")
        if self.readers is not None and self.readers < 1:
            raise ConfigError(f"readers {self.readers} must be at least 1: files are parsed and decoded in reader "
                              f"processes")
        if self.clahe_grid < 1 or self.clahe_size < self.clahe_grid * 2:
            raise ConfigError(f"CLAHE grid {self.clahe_grid} with working size {self.clahe_size} is not usable")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics port {self.metrics_port} is not a TCP port (0-65535; 0 picks a free one)")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision {self.precision!r} is not one of {', '.join(PRECISIONS)}; fp32 is exact, "
                              f"fp16/bf16 trade a documented tolerance for speed on CUDA")
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"runtime {self.runtime!r} is not one of {', '.join(RUNTIMES)}; auto runs the networks "
                              f"on ONNX Runtime on a CPU and on torch on CUDA (--runtime, NEURON_RUNTIME)")
        if not (self.device == "auto" or self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device {self.device!r} is not one of auto, cpu, cuda, cuda:N")
        self._check_network()

    def _check_network(self) -> None:
        from neuron.dicomnet import Peer, check_ae_title
        from neuron.webclient import WebPeer, is_web

        object.__setattr__(self, "ae_title", check_ae_title(self.ae_title, "NEURON_AE_TITLE"))
        object.__setattr__(self, "send_to", tuple(str(WebPeer.parse(p, "--send-to") if is_web(p) else
                                                      Peer.parse(p, "--send-to")) for p in self.send_to))
        if self.send_attempts < 1:
            raise ConfigError(f"NEURON_SEND_ATTEMPTS={self.send_attempts} must be at least 1 (one try, no retry)")
        if self.send_retry_s < 0:
            raise ConfigError(f"NEURON_SEND_RETRY_SECONDS={self.send_retry_s} must be 0 or more seconds")
        if self.send_to and self.dicom_out is None:
            object.__setattr__(self, "dicom_out", self.out_dir / "dicom-out")

    @property
    def resolved_cache_dir(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir is not None else self.out_dir / ".cache"

    @property
    def resolved_reference_dir(self) -> Path:
        return self.reference_dir if self.reference_dir is not None else self.out_dir / "references"

    @property
    def heatmap_dir(self) -> Path:
        return self.heatmap_root if self.heatmap_root is not None else self.out_dir / "heatmaps"

    def to_local(self, path: str) -> str:
        """A path as stored in the database (the shared name) -> where this host reads it."""
        return swap_prefix(path, self.path_map)

    def to_shared(self, path: str) -> str:
        """A path on this host -> the shared name every host and reviewer uses."""
        return swap_prefix(path, ((local, shared) for shared, local in self.path_map))

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.out_dir / 'neuron.db').resolve()}"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from the environment, then apply explicit overrides (None means "not given")."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        if "NEURON_OUT" in env:
            values["out_dir"] = Path(env["NEURON_OUT"])
        if "NEURON_DATABASE_URL" in env:
            values["database_url"] = env["NEURON_DATABASE_URL"]
        if "NEURON_DEVICE" in env:
            values["device"] = env["NEURON_DEVICE"]
        if "NEURON_WEIGHTS" in env:
            values["weights"] = env["NEURON_WEIGHTS"]
        if "NEURON_XRV_CACHE_DIR" in env:
            values["xrv_cache_dir"] = Path(env["NEURON_XRV_CACHE_DIR"])
        if "NEURON_XRV_SHA256" in env:
            values["xrv_sha256"] = env["NEURON_XRV_SHA256"].strip().lower() or None
        if "NEURON_ALLOW_DOWNLOAD" in env:
            values["allow_download"] = _parse_bool("NEURON_ALLOW_DOWNLOAD", env["NEURON_ALLOW_DOWNLOAD"])
        if "NEURON_BATCH_SIZE" in env:
            values["batch_size"] = _parse_int("NEURON_BATCH_SIZE", env["NEURON_BATCH_SIZE"])
        if "NEURON_MODEL_DIR" in env:
            values["model_dir"] = Path(env["NEURON_MODEL_DIR"])
        if "NEURON_BROKER_URL" in env:
            values["broker_url"] = env["NEURON_BROKER_URL"]
        if "NEURON_HEATMAP_DIR" in env:
            values["heatmap_root"] = Path(env["NEURON_HEATMAP_DIR"])
        if "NEURON_PATH_MAP" in env:
            values["path_map"] = parse_path_map(env["NEURON_PATH_MAP"])
        if "NEURON_PRECISION" in env:
            values["precision"] = env["NEURON_PRECISION"].strip().lower()
        if "NEURON_RUNTIME" in env:
            values["runtime"] = env["NEURON_RUNTIME"].strip().lower()
        for name, (key, parse) in _SCREENING_ENV.items():
            if name in env:
                values[key] = parse(name, env[name])
        for name, key in _DICOMWEB_ENV.items():
            if env.get(name, "").strip():
                values[key] = Path(env[name].strip()) if key == "dicomweb_peers" else env[name].strip()
        if env.get("NEURON_POPULATION_POLICY", "").strip():
            values["population_policy"] = env["NEURON_POPULATION_POLICY"].strip().lower()
        if "NEURON_FOLLOW_LINKS" in env:
            values["follow_links"] = _parse_bool("NEURON_FOLLOW_LINKS", env["NEURON_FOLLOW_LINKS"])
        if "NEURON_AE_TITLE" in env:
            values["ae_title"] = env["NEURON_AE_TITLE"]
        if "NEURON_SEND_ATTEMPTS" in env:
            values["send_attempts"] = _parse_int("NEURON_SEND_ATTEMPTS", env["NEURON_SEND_ATTEMPTS"])
        if "NEURON_SEND_RETRY_SECONDS" in env:
            values["send_retry_s"] = _parse_float("NEURON_SEND_RETRY_SECONDS", env["NEURON_SEND_RETRY_SECONDS"])
        values["broker_given"] = bool(env.get("NEURON_BROKER_URL", "").strip())
        if "NEURON_VISIBILITY_TIMEOUT" in env:
            values["visibility_timeout"] = _parse_int("NEURON_VISIBILITY_TIMEOUT", env["NEURON_VISIBILITY_TIMEOUT"])
        if env.get("NEURON_PATIENT_KEY"):
            values["patient_secret"] = env["NEURON_PATIENT_KEY"]
        if env.get("NEURON_REVIEW_TOKEN", "").strip():
            values["review_token"] = env["NEURON_REVIEW_TOKEN"].strip()
        if env.get("NEURON_METRICS_HOST", "").strip():
            values["metrics_host"] = env["NEURON_METRICS_HOST"].strip()
        values["out_from_env"] = "NEURON_OUT" in env
        xdg = env.get("XDG_CACHE_HOME", "")
        if os.path.isabs(xdg):
            values["user_cache_dir"] = Path(xdg) / "neuron"
        values["hub_downloads"] = env.get("HF_HUB_OFFLINE", "").strip().lower() in ("0", "false", "no", "off")
        known = {f.name for f in fields(cls)}
        for key, value in overrides.items():
            if key not in known:
                raise TypeError(f"unknown setting {key!r}")
            if isinstance(value, list):  # a repeatable command-line option: given once or more, or not at all
                value = tuple(value) or None
            if value is not None:
                values[key] = value
        try:
            return cls(**values)
        except ValueError as exc:  # an Enum rejected a string
            raise ConfigError(f"{exc}; weights must be 'pretrained' or 'untrained'") from exc

    def with_(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    def with_patient_key(self) -> Settings:
        """--patient-key: keep each study's Patient ID as HMAC-SHA256 under the secret in NEURON_PATIENT_KEY, taken
        from the environment only (a command line is visible to every user of the host)."""
        secret = self.patient_secret or ""
        if len(secret) < 16:
            raise ConfigError(
                "--patient-key needs a secret of at least 16 characters in NEURON_PATIENT_KEY (it is "
                f"{'unset' if not secret else f'{len(secret)} characters'}); generate one with `python3 -c "
                "'import secrets; print(secrets.token_hex(32))'`, keep it with the database's credentials and use "
                "the same one for every scan, or the keys of one patient will not match")
        return replace(self, patient_key=secret)


def foreign_environment() -> dict[str, str]:
    """This process's environment without Neuron's own variables: for a child process that must get its Neuron
    settings only from its caller (a benchmark's worker), never from a stray NEURON_HEATMAP_DIR or path map."""
    return {k: v for k, v in os.environ.items() if not k.startswith("NEURON_")}


def disable_vendor_telemetry() -> None:
    """ONNX Runtime's Linux packages (since its "Add POSIX telemetry" change, microsoft/onnxruntime pull request
    27379) send usage events to Microsoft when the library initialises, and keep a device id under
    ~/.cache/Microsoft and a session file in the temp folder. ``ORT_DISABLE_TELEMETRY=1`` set before onnxruntime is
    first imported turns all of it off (no uploader, no device id, no offline cache). A screening host sends nothing
    anywhere and writes nothing outside its output folder, so it is set unless the operator set it."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


def apply_cache_environment(cache: Path) -> None:
    """Nothing is written outside the output folder: importing timm makes torch create its compiler cache folder in
    the system temp folder (TORCHINDUCTOR_CACHE_DIR), and matplotlib (training curves) keeps a font cache in the home
    folder (MPLCONFIGDIR). Both go under CACHE unless the user has placed them. Call before the first torch-heavy
    import."""
    cache = Path(cache).resolve()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "torch"))
    os.environ.setdefault("MPLCONFIGDIR", str(cache / "matplotlib"))
    disable_vendor_telemetry()
