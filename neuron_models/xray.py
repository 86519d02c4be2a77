"""Chest X-ray route: torchxrayvision DenseNet121 ``densenet121-res224-all``.

Input contract (torchxrayvision README "Getting started", ``datasets.normalize``, ``models.py``): one channel, 224x224,
values in [-1024, 1024]; outputs are sigmoid probabilities rescaled by ``op_norm`` so that 0.5 is each label's
calibrated operating point (torchxrayvision issues #8, #96, #151). Never a softmax across labels.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F
import torchxrayvision as xrv

from neuron.errors import WeightsError
from neuron.routes import CHEST_POPULATION
from neuron.settings import Settings, WeightsMode
from neuron.work import Route
from neuron_models.registry import (
    UNTRAINED,
    ModelConfig,
    ScreeningModel,
    read_with_digest,
    register_model,
    sha256_file,
    write_with_digest,
)
from neuron_models.tta import CHEST_XRAY_VIEWS

log = logging.getLogger(__name__)

XRV_WEIGHTS = "densenet121-res224-all"
_XRV_ENTRY = xrv.models.model_urls[XRV_WEIGHTS]
WEIGHTS_URL = _XRV_ENTRY["weights_url"]
WEIGHTS_FILENAME = WEIGHTS_URL.rsplit("/", 1)[-1]

CONFIG = ModelConfig(
    name="xrv-densenet121-res224-all",
    route=Route.CHEST_XRAY,
    input_size=224,
    channels=1,
    normalization="xrv",
    class_names=tuple(_XRV_ENTRY["labels"]),
    multilabel=True,
    tta_views=CHEST_XRAY_VIEWS,
    cam_target="relu(features.norm5), taken out of place",
    weights_source=WEIGHTS_URL,
    weights_sha256=None,  # set NEURON_XRV_SHA256 after checking the file against the published release
    description="torchxrayvision DenseNet121 trained on NIH, PadChest, CheXpert, MIMIC-CXR, Google, OpenI, RSNA",
    population=CHEST_POPULATION,
)


class XRVDenseNet(ScreeningModel):
    """Wraps a torchxrayvision DenseNet; computes exactly what its ``forward`` does, in the contract's steps."""

    def __init__(self, net: xrv.models.DenseNet, weights_id: str, op_threshs: torch.Tensor | None):
        super().__init__()
        self.net = net
        self.config = CONFIG
        self.weights_id = weights_id
        labels = [str(x) for x in getattr(net, "pathologies", CONFIG.class_names)]
        # Some weights mark untrained outputs with '' in ``model.pathologies``: keep only the named ones.
        keep = [i for i, name in enumerate(labels) if name]
        self.class_names = tuple(labels[i] for i in keep)
        self.register_buffer("keep", torch.tensor(keep, dtype=torch.long), persistent=False)
        self.register_buffer("op_threshs", op_threshs, persistent=False)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        # xrv applies relu(inplace=True) to features.norm5's output; doing it out of place here keeps the tensor
        # every consumer sees the same on CPU and GPU (an in-place op aliases the stored activation on the CPU only).
        return F.relu(self.net.features(x))

    def pooled(self, features: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(features, (1, 1)).flatten(1)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net.classifier(pooled)[:, self.keep]

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        probs = torch.sigmoid(logits)
        if self.op_threshs is not None:
            probs = xrv.models.op_norm(probs, self.op_threshs[self.keep])
        return probs

    def cam_weight(self) -> torch.Tensor:
        return self.net.classifier.weight[self.keep]


def resolve_weights_file(settings: Settings) -> Path:
    """The weights file, downloaded by torchxrayvision's own loader if missing and allowed; else a clear error."""
    cache = settings.xrv_cache_dir or Path(xrv.utils.get_cache_dir())
    path = Path(cache).expanduser() / WEIGHTS_FILENAME
    if path.is_file():
        return path
    hint = (f"The chest X-ray weights file {WEIGHTS_FILENAME} is not in {path.parent}. Download it from "
            f"{WEIGHTS_URL} on a machine with internet access and copy it into that folder, or point "
            f"NEURON_XRV_CACHE_DIR (--xrv-cache-dir) at the folder that holds it. "
            f"To run without pretrained weights, pass --weights untrained (results are marked untrained).")
    if not settings.allow_download:
        raise WeightsError(hint + " (Download was not attempted: NEURON_ALLOW_DOWNLOAD=0.)")
    try:
        return Path(xrv.models.get_weights(XRV_WEIGHTS, cache_dir=str(path.parent)))
    except Exception as exc:  # requests raises many types; all mean "not downloaded"
        raise WeightsError(hint + f" (Download failed: {type(exc).__name__}.)") from exc


def load_pretrained(settings: Settings) -> XRVDenseNet:
    path = resolve_weights_file(settings)
    digest = sha256_file(path)
    expected = settings.xrv_sha256 or CONFIG.weights_sha256
    if expected is None:
        raise WeightsError(
            f"{path} has sha256 {digest}, but no expected sha256 is configured. The file is a pickle that runs code "
            f"when loaded, so Neuron loads it only after its hash is pinned: check the file against the published "
            f"release, then set NEURON_XRV_SHA256={digest} (or --xrv-sha256).")
    if digest != expected.lower():
        raise WeightsError(
            f"{path} has sha256 {digest}, not the configured {expected}: the file is corrupt or not the expected "
            f"release; replace it with the file from {WEIGHTS_URL}, or correct NEURON_XRV_SHA256.")
    try:
        net = xrv.models.DenseNet(weights=XRV_WEIGHTS, cache_dir=str(path.parent))
    except Exception as exc:
        raise WeightsError(f"{path} matched its sha256 but torchxrayvision could not load it: {exc}") from exc
    return XRVDenseNet(net.eval(), digest, net.op_threshs.clone().float())


def calibration_batch(n: int = 32, size: int = 224, seed: int = 0) -> torch.Tensor:
    """Radiograph-like phantoms in the model's input range, fixed by ``seed``: overlapping ellipses of random
    density with sharp edges over a smooth background, mild texture, full contrast. Random smooth noise alone
    excites the network ten times less than real radiographs do, and a head scaled on it saturates on real images."""
    g = torch.Generator().manual_seed(seed)
    coords = torch.linspace(-1, 1, size)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    images = []
    for _ in range(n):
        img = 0.3 * F.interpolate(torch.rand(1, 1, 4, 4, generator=g), size=size, mode="bicubic",
                                  align_corners=False)[0, 0]
        for _ in range(int(torch.randint(4, 12, (1,), generator=g))):
            cy, cx, ry, rx, theta, dens = torch.rand(6, generator=g).tolist()
            cy, cx, ry, rx = 1.6 * cy - 0.8, 1.6 * cx - 0.8, 0.05 + 0.6 * ry, 0.05 + 0.6 * rx
            c, s_ = torch.cos(torch.tensor(theta * 3.1416)), torch.sin(torch.tensor(theta * 3.1416))
            u, v = (xx - cx) * c + (yy - cy) * s_, -(xx - cx) * s_ + (yy - cy) * c
            img = img + (2 * dens - 0.6) * ((u / rx) ** 2 + (v / ry) ** 2 <= 1).float()
        img = img + 0.05 * torch.randn(size, size, generator=g)
        img = (img - img.min()) / (img.max() - img.min())
        images.append(img)
    x = torch.stack(images).unsqueeze(1)
    return (2.0 * x - 1.0) * 1024.0


# What the untrained calibration depends on besides the code itself (hashed into the cache key with it).
UNTRAINED_CALIBRATION = {"phantoms": 32, "size": 224, "head_units_per_spread": 0.5}


@torch.no_grad()
def build_untrained(seed: int = 0, cache_dir: Path | None = None) -> XRVDenseNet:
    """The same architecture with seeded random weights, scaled so its probabilities spread across (0, 1).

    A freshly initialised DenseNet's logits reach +-1000 on a radiograph, so every sigmoid would be exactly 0 or 1
    and tests comparing probabilities would prove nothing. BatchNorm statistics are set from a fixed synthetic
    batch; then each label's logit becomes the projection of the pooled features, centred on the batch mean, onto
    that label's random direction, scaled so a typical image lands within a few units of 0.
    Built on the CPU so every device gets bit-identical weights. The calibration takes seconds on the start-up path,
    so with ``cache_dir`` its result is kept there (safetensors + sha256) and loaded bit for bit on the next start.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = xrv.models.DenseNet(weights=None, num_classes=len(CONFIG.class_names))
    cached = _load_calibrated(net, cache_dir, seed) if cache_dir is not None else False
    if not cached:
        _calibrate(net, seed)
        if cache_dir is not None:
            _save_calibrated(net, cache_dir, seed)
    net.eval()
    net.pathologies = list(CONFIG.class_names)
    return XRVDenseNet(net, UNTRAINED, None)


def _calibrate(net: xrv.models.DenseNet, seed: int) -> None:
    batch = calibration_batch(n=UNTRAINED_CALIBRATION["phantoms"], size=UNTRAINED_CALIBRATION["size"], seed=seed)
    momenta = {}
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            momenta[m] = m.momentum
            m.momentum = None  # cumulative average: running stats become this batch's stats
            m.reset_running_stats()
    net.train()
    net.features(batch)
    for m, mom in momenta.items():
        m.momentum = mom
    net.eval()
    pooled = F.adaptive_avg_pool2d(F.relu(net.features(batch)), (1, 1)).flatten(1)
    center = pooled.mean(dim=0)
    spread = (pooled - center).norm(dim=1).mean().clamp(min=1e-6)
    direction = net.classifier.weight / net.classifier.weight.norm(dim=1, keepdim=True)
    # A random unit direction takes ~1/sqrt(C) of a vector's norm; real radiographs sit a few phantom spreads away
    # from the phantoms' centre, so half a unit per spread keeps their logits within a few units of 0.
    scale = UNTRAINED_CALIBRATION["head_units_per_spread"] * pooled.shape[1] ** 0.5 / spread
    net.classifier.weight.copy_(direction * scale)
    net.classifier.bias.copy_(-(direction @ center) * scale)


def untrained_cache_file(cache_dir: Path, seed: int) -> Path:
    """The cache file for ``seed``, named by a hash of everything the calibrated weights depend on: the seed, the
    torch and torchxrayvision versions, the calibration parameters and the calibration code."""
    code = "".join(inspect.getsource(f) for f in (calibration_batch, _calibrate, build_untrained))
    key = json.dumps({"seed": seed, "torch": torch.__version__, "torchxrayvision": xrv.__version__,
                      "calibration": UNTRAINED_CALIBRATION, "code": hashlib.sha256(code.encode()).hexdigest()},
                     sort_keys=True)
    return Path(cache_dir) / f"xrv-untrained-{hashlib.sha256(key.encode()).hexdigest()[:20]}.safetensors"


def _load_calibrated(net: xrv.models.DenseNet, cache_dir: Path, seed: int) -> bool:
    """Load the cached calibration into ``net``; False (rebuild) when there is none or it fails its sha256."""
    path = untrained_cache_file(cache_dir, seed)
    data, mismatched = read_with_digest(path)
    if mismatched:
        log.warning("%s does not match its sha256; calibrating the untrained weights again", path)
    if data is None:
        return False
    try:
        net.load_state_dict(safetensors.torch.load(data), strict=True)
    except (RuntimeError, ValueError) as exc:  # a file of another layout under the same key
        log.warning("%s could not be loaded (%s); calibrating the untrained weights again", path, exc)
        return False
    return True


def _save_calibrated(net: xrv.models.DenseNet, cache_dir: Path, seed: int) -> None:
    """Write file and digest each under a temporary name and rename: concurrent workers on one output folder write
    the same bytes, and a reader never sees half a file."""
    path = untrained_cache_file(cache_dir, seed)
    try:
        write_with_digest(path, safetensors.torch.save({k: v.contiguous() for k, v in net.state_dict().items()}))
    except OSError as exc:  # a read-only output folder costs start-up time, not the run
        log.warning("could not cache the untrained weights in %s: %s", path.parent, exc)


@register_model(CONFIG)
def xrv_densenet121_res224_all(settings: Settings) -> ScreeningModel:
    if settings.weights is WeightsMode.UNTRAINED:
        return build_untrained(settings.seed, cache_dir=settings.resolved_cache_dir / "untrained")
    return load_pretrained(settings)
