"""MRI/ultrasound and skin routes: timm EfficientNet-B4, fine-tuned by ``neuron train``.

There are no public medical weights for these heads, so a route is only as good as the checkpoint its user trained:
without one, its instances are skipped with a reason saying how to train it. 3 channels, ImageNet normalisation,
softmax over classes (single-label), CAM on the final activation (after ``bn2``: timm's
``EfficientNet.forward_features`` ends ``conv_head -> bn2``, and ``blocks[-1]`` comes before that last 1x1 conv).
Several checkpoints for one route make an ensemble: probabilities are averaged, the heatmap is the average of the
members' maps, and every member is recorded.
"""

from __future__ import annotations

import hashlib
from dataclasses import replace

import timm
import torch
from torch import nn

from neuron.errors import ModelUnavailable
from neuron.routes import MRI_US_POPULATION, SKIN_POPULATION
from neuron.settings import Settings
from neuron.work import Route
from neuron_models.checkpoint import Checkpoint, require_checkpoints
from neuron_models.registry import UNTRAINED, ModelConfig, ScreeningModel, register_model
from neuron_models.tta import CHEST_XRAY_VIEWS, SKIN_VIEWS

ARCH = "efficientnet_b4"
DEFAULT_CLASSES = tuple(f"class_{i}" for i in range(9))

MRI_US_CONFIG = ModelConfig(
    name="mri-us-efficientnet-b4", route=Route.MRI_US, input_size=224, channels=3, normalization="imagenet",
    class_names=DEFAULT_CLASSES, multilabel=False,
    # MR and ultrasound keep their orientation (laterality, probe side): no flip, like the chest route.
    tta_views=CHEST_XRAY_VIEWS, cam_target="bn2 (final activation)",
    weights_source="checkpoint from `neuron train mri-us-efficientnet-b4` in --model-dir",
    description="timm EfficientNet-B4 for MR and US, fine-tuned on the user's labelled data",
    population=MRI_US_POPULATION)
SKIN_CONFIG = ModelConfig(
    name="skin-efficientnet-b4", route=Route.SKIN, input_size=224, channels=3, normalization="imagenet",
    class_names=DEFAULT_CLASSES, multilabel=False, tta_views=SKIN_VIEWS, cam_target="bn2 (final activation)",
    weights_source="checkpoint from `neuron train skin-efficientnet-b4` in --model-dir",
    description="timm EfficientNet-B4 for dermatology photographs, fine-tuned on the user's labelled data",
    population=SKIN_POPULATION)


def create_net(num_classes: int, drop_rate: float = 0.0, pretrained: bool = False) -> nn.Module:
    net = timm.create_model(ARCH, pretrained=pretrained, num_classes=num_classes, drop_rate=drop_rate)
    # timm's Google-style init scales the head by 1/sqrt(num_classes): with a handful of classes its first logits
    # reach +-9 and training from it diverges; a new head gets PyTorch's default (fan-in) init instead.
    net.reset_classifier(num_classes)
    return net


class EfficientNetModel(ScreeningModel):
    def __init__(self, net: nn.Module, config: ModelConfig, weights_id: str):
        super().__init__()
        self.net = net
        self.config = config
        self.class_names = config.class_names
        self.weights_id = weights_id

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.forward_features(x)  # conv_stem .. blocks .. conv_head -> bn2 (+ SiLU)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        return self.net.forward_head(features)  # global pool -> dropout (drop_rate) -> classifier

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.softmax(logits, dim=1)

    def cam_weight(self) -> torch.Tensor:
        return self.net.get_classifier().weight

    def dropout_rate(self) -> float:
        return float(getattr(self.net, "drop_rate", 0.0))

    def pooled(self, features: torch.Tensor) -> torch.Tensor:
        return self.net.global_pool(features)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net.get_classifier()(pooled)


class EnsembleModel(ScreeningModel):
    """Members share classes and input size; probabilities are averaged, and so are the members' CAM maps, so a
    heatmap explains the probability stored next to it, not one member's.

    The maps come out of the one contract the engine uses, ``relu(einsum(cam_weight[classes], features))``: the
    features are the members' concatenated along channels and the head weights concatenated the same way divided by
    the number of members, so the einsum is the mean of the members' (pre-ReLU) maps."""

    def __init__(self, members: list[EfficientNetModel]):
        super().__init__()
        first = members[0]
        for m in members[1:]:
            if m.class_names != first.class_names or m.config.input_size != first.config.input_size:
                raise ValueError(f"ensemble members of {first.config.name} disagree on classes or input size: "
                                 f"{first.class_names}@{first.config.input_size} vs "
                                 f"{m.class_names}@{m.config.input_size}; keep one of them in --model-dir")
        self.members = nn.ModuleList(members)
        self.config = first.config
        self.class_names = first.class_names
        joined = "|".join(m.weights_id for m in members)
        self.weights_id = hashlib.sha256(joined.encode()).hexdigest()

    def has_dropout(self) -> bool:
        return any(m.has_dropout() for m in self.members)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.forward_features(x) for m in self.members], dim=1)

    def cam_weight(self) -> torch.Tensor:
        return torch.cat([m.cam_weight() for m in self.members], dim=1) / len(self.members)

    def predict(self, x, mc_samples: int = 0, seed: int = 0, keys=None):
        outs = [m.predict(x, mc_samples, seed, keys) for m in self.members]
        samples = min(o[0].shape[0] for o in outs)
        probs = torch.stack([o[0][:samples] for o in outs]).mean(dim=0)
        features = torch.cat([o[1] for o in outs], dim=1)
        weight = torch.cat([o[2] for o in outs], dim=1) / len(outs)
        return probs, features, weight

    def forward(self, x):
        return torch.stack([m(x) for m in self.members]).mean(dim=0)

    def leaves(self) -> list[ScreeningModel]:
        return list(self.members)


def load_checkpoint_model(config: ModelConfig, ckpt: Checkpoint) -> EfficientNetModel:
    net = create_net(len(ckpt.class_names), float(ckpt.meta.get("training", {}).get("drop_rate", 0.0)))
    net.load_state_dict(ckpt.state_dict())
    cfg = replace(config, input_size=ckpt.input_size, class_names=ckpt.class_names)
    model = EfficientNetModel(net.eval(), cfg, ckpt.sha256)
    model.checkpoint = str(ckpt.folder)
    return model


def build_untrained(config: ModelConfig, class_names: tuple[str, ...], input_size: int, drop_rate: float = 0.0,
                    seed: int = 0) -> EfficientNetModel:
    """Seeded random weights with the route's architecture: the start of ``--from-scratch`` training and tests."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = create_net(len(class_names), drop_rate)
    cfg = replace(config, input_size=input_size, class_names=tuple(class_names))
    return EfficientNetModel(net.eval(), cfg, UNTRAINED)


def _from_checkpoints(config: ModelConfig, settings: Settings) -> ScreeningModel:
    members = [load_checkpoint_model(config, c) for c in require_checkpoints(settings.model_dir, config.name,
                                                                             config.route.value)]
    return members[0] if len(members) == 1 else EnsembleModel(members)


def _checkpoint_probe(config: ModelConfig):
    def probe(settings: Settings) -> str | None:
        try:
            require_checkpoints(settings.model_dir, config.name, config.route.value)
        except ModelUnavailable as exc:
            return str(exc)
        return None
    return probe


@register_model(MRI_US_CONFIG, probe=_checkpoint_probe(MRI_US_CONFIG))
def mri_us_efficientnet_b4(settings: Settings) -> ScreeningModel:
    return _from_checkpoints(MRI_US_CONFIG, settings)


@register_model(SKIN_CONFIG, probe=_checkpoint_probe(SKIN_CONFIG))
def skin_efficientnet_b4(settings: Settings) -> ScreeningModel:
    return _from_checkpoints(SKIN_CONFIG, settings)


def members_of(model: ScreeningModel) -> tuple[dict, ...]:
    """What the result rows' provenance records for each member of a route's model."""
    members = list(model.members) if isinstance(model, EnsembleModel) else [model]
    return tuple({"weights": m.weights_id, "checkpoint": getattr(m, "checkpoint", None)} for m in members)
