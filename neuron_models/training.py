"""``neuron train``: fine-tune an EfficientNet-B4 route, every choice a flag.

Defaults: cross-entropy with label smoothing 0.1, AdamW (lr 1e-4, weight decay 1e-5),
CosineAnnealingWarmRestarts (T_0=5, T_mult=2), mixed precision on CUDA, optional class weights, gradient
accumulation, frozen early stages and a lower backbone learning rate. Images go through the same preprocessing as
inference (``prepare_batch``), then augmentation (affine, perspective, flips where the route allows).
"""

from __future__ import annotations

import csv
import json
import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import kornia.augmentation as K
import numpy as np
import torch
from torch import nn

from neuron.errors import ConfigError, WeightsError
from neuron.settings import Settings
from neuron_models.checkpoint import save_checkpoint
from neuron_models.effnet import ARCH, create_net
from neuron_models.image import DecodedFrame
from neuron_models.metrics import accuracy, expected_calibration_error, mean_defined, per_class_auc
from neuron_models.preprocess import normalize, prepare_batch
from neuron_models.registry import ModelConfig, preprocess_config
from neuron_models.tta import ViewKind

STATE_FILE = "train_state.pt"


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 16
    lr: float = 1e-4
    backbone_lr: float | None = None  # differential learning rates: None = same as lr
    weight_decay: float = 1e-5
    label_smoothing: float = 0.1
    class_weights: str = "none"  # "none" or "auto" (inverse label frequency)
    t0: int = 5
    t_mult: int = 2
    accumulate: int = 1
    freeze: int = 0  # freeze the stem and the first N of the 7 block stages
    drop_rate: float = 0.3  # against overfitting small medical sets; also what makes MC dropout possible
    input_size: int = 224
    val_fraction: float = 0.2
    augment: bool = True
    amp: bool = True  # used on CUDA only
    from_scratch: bool = False
    hub_downloads: bool = False  # let huggingface_hub download ImageNet weights (Settings.hub_downloads)
    seed: int = 0
    clahe: bool = True


@dataclass
class LabelledSet:
    paths: list[Path]
    labels: list[int]
    class_names: tuple[str, ...]

    @classmethod
    def from_path(cls, data: Path) -> LabelledSet:
        """An ImageFolder-style tree (one sub-folder per class) or a CSV with columns path,label."""
        data = Path(data)
        pairs: list[tuple[Path, str]] = []
        if data.is_file():
            with open(data, newline="") as fh:
                for row in csv.DictReader(fh):
                    if "path" not in row or "label" not in row:
                        raise ConfigError(f"{data} needs the columns path,label; it has {list(row)}")
                    p = Path(row["path"])
                    pairs.append((p if p.is_absolute() else data.parent / p, row["label"].strip()))
        elif data.is_dir():
            for class_dir in sorted(d for d in data.iterdir() if d.is_dir()):
                for p in sorted(class_dir.rglob("*")):
                    if p.is_file() and not p.name.startswith("."):
                        pairs.append((p, class_dir.name))
        else:
            raise ConfigError(f"--data {data} is neither a folder of class sub-folders nor a CSV file")
        names = tuple(sorted({label for _, label in pairs}))
        if len(names) < 2:
            raise ConfigError(f"--data {data} has {len(names)} class(es); training needs at least 2")
        index = {n: i for i, n in enumerate(names)}
        return cls([p for p, _ in pairs], [index[label] for _, label in pairs], names)

    def subset(self, idx: Sequence[int]) -> LabelledSet:
        return LabelledSet([self.paths[i] for i in idx], [self.labels[i] for i in idx], self.class_names)


def stratified_split(labels: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Per class, the same fraction to validation (at least one where the class has two or more examples)."""
    rng = random.Random(seed)
    train, val = [], []
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    for _, idx in sorted(by_class.items()):
        rng.shuffle(idx)
        n_val = max(1, round(len(idx) * val_fraction)) if len(idx) > 1 else 0
        val += idx[:n_val]
        train += idx[n_val:]
    return sorted(train), sorted(val)


def class_weights(labels: Sequence[int], n_classes: int) -> torch.Tensor:
    """'auto': N / (K * n_c), so every class carries the same total weight (scikit-learn's 'balanced')."""
    counts = Counter(labels)
    return torch.tensor([len(labels) / (n_classes * max(1, counts.get(k, 0))) for k in range(n_classes)],
                        dtype=torch.float32)


def make_loss(cfg: TrainConfig, train_labels: Sequence[int], n_classes: int) -> nn.CrossEntropyLoss:
    weight = class_weights(train_labels, n_classes) if cfg.class_weights == "auto" else None
    if cfg.class_weights not in ("auto", "none"):
        raise ConfigError(f"--class-weights {cfg.class_weights!r}: use 'auto' or 'none'")
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=cfg.label_smoothing)


@contextmanager
def _hub_offline(allow_downloads: bool):
    """The local Hugging Face cache only, never a download at run time, unless HF_HUB_OFFLINE is set to a false value
    (0, false, no, off: ``Settings.hub_downloads``) by someone whose machine may download. huggingface_hub reads the
    variable once, at import (timm imports it), so setting it later does nothing: its module constant is set for the
    duration instead."""
    from huggingface_hub import constants

    if allow_downloads:
        yield
        return
    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved


def starting_net(n_classes: int, cfg: TrainConfig) -> nn.Module:
    """ImageNet weights from the local hub cache when present; from scratch only when asked."""
    if cfg.from_scratch:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            return create_net(n_classes, cfg.drop_rate)
    try:
        with _hub_offline(cfg.hub_downloads):
            return create_net(n_classes, cfg.drop_rate, pretrained=True)
    except Exception as exc:
        raise WeightsError(
            f"no ImageNet weights for timm '{ARCH}' in the local Hugging Face cache ({type(exc).__name__}); this "
            f"machine cannot download them. Copy the cache from a connected machine (HF_HOME), or pass "
            f"--from-scratch to train from random weights (needs much more data)") from exc


def freeze_early(net: nn.Module, stages: int) -> None:
    if stages <= 0:
        return
    for module in (net.conv_stem, net.bn1, *list(net.blocks)[:stages]):
        for p in module.parameters():
            p.requires_grad = False


def make_optimizer(net: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    head = [p for p in net.get_classifier().parameters() if p.requires_grad]
    head_ids = {id(p) for p in head}
    backbone = [p for p in net.parameters() if p.requires_grad and id(p) not in head_ids]
    return torch.optim.AdamW([
        {"params": backbone, "lr": cfg.backbone_lr if cfg.backbone_lr is not None else cfg.lr, "name": "backbone"},
        {"params": head, "lr": cfg.lr, "name": "head"},
    ], weight_decay=cfg.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig):
    return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=cfg.t0, T_mult=cfg.t_mult)


def augmentation(model_cfg: ModelConfig, enabled: bool) -> nn.Module:
    if not enabled:
        return nn.Identity()
    ops = [K.RandomAffine(degrees=15.0, translate=(0.1, 0.1), scale=(0.9, 1.1), p=0.8),
           K.RandomPerspective(distortion_scale=0.2, p=0.3)]
    if any(v.kind is ViewKind.HFLIP for v in model_cfg.tta_views):  # the route allows flips (skin)
        ops.append(K.RandomHorizontalFlip())
    return nn.Sequential(*ops)


@dataclass
class EpochMetrics:
    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    val_ece: float
    val_mean_auc: float
    lr_head: float
    lr_backbone: float
    val_auc: dict[str, float] = field(default_factory=dict)


Loader = Callable[[Path], DecodedFrame]


class Trainer:
    def __init__(self, model_cfg: ModelConfig, cfg: TrainConfig, data: LabelledSet, out: Path, load: Loader,
                 device: torch.device, progress: Callable[[str, int, int], None] | None = None):
        self.model_cfg, self.cfg, self.data, self.out, self.load = model_cfg, cfg, data, Path(out), load
        self.device = device
        self.progress = progress or (lambda *_: None)
        # exactly what inference will do with this checkpoint (preprocess_config with default settings)
        self.pre = preprocess_config(replace(model_cfg, input_size=cfg.input_size), Settings(clahe=cfg.clahe))
        train_idx, val_idx = stratified_split(data.labels, cfg.val_fraction, cfg.seed)
        self.train_set, self.val_set = data.subset(train_idx), data.subset(val_idx)
        k = len(data.class_names)
        self.net = starting_net(k, cfg).to(device)
        freeze_early(self.net, cfg.freeze)
        self.loss = make_loss(cfg, self.train_set.labels, k).to(device)
        self.opt = make_optimizer(self.net, cfg)
        self.sched = make_scheduler(self.opt, cfg)
        self.use_amp = cfg.amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.augment = augmentation(model_cfg, cfg.augment).to(device)
        self.history: list[EpochMetrics] = []
        self.start_epoch, self.best = 0, (-math.inf, math.inf)

    # -- data -----------------------------------------------------------------------------------------------------
    def _batches(self, subset: LabelledSet, shuffle: bool, epoch: int):
        order = list(range(len(subset.paths)))
        if shuffle:
            random.Random(self.cfg.seed * 1000 + epoch).shuffle(order)
        for start in range(0, len(order), self.cfg.batch_size):
            idx = order[start:start + self.cfg.batch_size]
            frames = [self.load(subset.paths[i]) for i in idx]
            x, kept, rejected = prepare_batch(frames, self.pre, self.device)
            if rejected:
                bad = subset.paths[idx[next(iter(rejected))]]
                raise ConfigError(f"training image {bad} was rejected: {next(iter(rejected.values()))}")
            y = torch.tensor([subset.labels[i] for i in idx], device=self.device)
            yield x, y

    # -- loop -----------------------------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> list[EpochMetrics]:
        self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            self._load_state()
        torch.manual_seed(self.cfg.seed)
        for epoch in range(self.start_epoch, self.cfg.epochs):
            train_loss = self._train_epoch(epoch)
            metrics = self._validate(epoch, train_loss)
            self.sched.step()
            self.history.append(metrics)
            score = (metrics.val_accuracy, -metrics.val_loss)
            if score > (self.best[0], -self.best[1]):
                self.best = (metrics.val_accuracy, metrics.val_loss)
                self._save_best(metrics)
            self._save_state(epoch + 1)
            self._write_curves()
        return self.history

    def _train_epoch(self, epoch: int) -> float:
        self.net.train()
        total, n, step = 0.0, 0, 0
        n_batches = math.ceil(len(self.train_set.paths) / self.cfg.batch_size)
        self.opt.zero_grad(set_to_none=True)
        for x, y in self._batches(self.train_set, shuffle=True, epoch=epoch):
            with torch.no_grad():
                x = normalize(self.augment(x).clamp(0, 1), self.pre)
            with torch.autocast(self.device.type, enabled=self.use_amp):
                loss = self.loss(self.net(x), y)
            self.scaler.scale(loss / self.cfg.accumulate).backward()
            step += 1
            if step % self.cfg.accumulate == 0 or step == n_batches:
                self.scaler.step(self.opt)
                self.scaler.update()
                self.opt.zero_grad(set_to_none=True)
            total += float(loss.detach()) * len(y)
            n += len(y)
            self.progress(f"epoch {epoch + 1}/{self.cfg.epochs}", step, n_batches)
        return total / max(1, n)

    @torch.no_grad()
    def predict(self, subset: LabelledSet) -> tuple[np.ndarray, np.ndarray, float]:
        self.net.eval()
        probs, labels, total = [], [], 0.0
        for x, y in self._batches(subset, shuffle=False, epoch=0):
            logits = self.net(normalize(x, self.pre)).float()
            total += float(self.loss(logits, y)) * len(y)
            probs.append(torch.softmax(logits, 1).cpu().numpy())
            labels.append(y.cpu().numpy())
        if not probs:
            return np.zeros((0, len(subset.class_names))), np.zeros(0, dtype=int), math.nan
        return np.concatenate(probs), np.concatenate(labels), total / len(subset.paths)

    @torch.no_grad()
    def recalibrate_batchnorm(self) -> None:
        """Precise BatchNorm: running statistics recomputed over the whole training set with the final weights of
        the epoch. With small batches and fast-moving weights the running averages lag behind, and a network that
        fits its training data then predicts one class in eval mode."""
        bns = [m for m in self.net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over all batches
        self.net.train()
        for x, _ in self._batches(self.train_set, shuffle=False, epoch=0):
            self.net(normalize(x, self.pre))
        for m, mom in zip(bns, saved, strict=True):
            m.momentum = mom
        self.net.eval()

    def _validate(self, epoch: int, train_loss: float) -> EpochMetrics:
        self.recalibrate_batchnorm()
        probs, labels, val_loss = self.predict(self.val_set)
        aucs = per_class_auc(probs, labels, self.data.class_names) if len(labels) else {}
        lrs = {g["name"]: g["lr"] for g in self.opt.param_groups}
        return EpochMetrics(epoch + 1, train_loss, val_loss, accuracy(probs, labels),
                            expected_calibration_error(probs, labels), mean_defined(aucs) if aucs else math.nan,
                            lrs["head"], lrs["backbone"], aucs)

    # -- files ----------------------------------------------------------------------------------------------------
    def _save_best(self, metrics: EpochMetrics) -> None:
        save_checkpoint(self.out, self.net.state_dict(), {
            "model": self.model_cfg.name, "architecture": ARCH, "class_names": list(self.data.class_names),
            "preprocessing": self.pre.as_dict(), "training": asdict(self.cfg),
            "metrics": asdict(metrics), "data": {"train": len(self.train_set.paths), "val": len(self.val_set.paths),
                                                 "class_counts": dict(Counter(self.data.labels))}})

    def _save_state(self, next_epoch: int) -> None:
        torch.save({"epoch": next_epoch, "net": self.net.state_dict(), "opt": self.opt.state_dict(),
                    "sched": self.sched.state_dict(), "scaler": self.scaler.state_dict(),
                    "best": list(self.best), "history": [asdict(m) for m in self.history]},
                   self.out / (STATE_FILE + ".tmp"))
        (self.out / (STATE_FILE + ".tmp")).replace(self.out / STATE_FILE)

    def _load_state(self) -> None:
        path = self.out / STATE_FILE
        if not path.is_file():
            raise ConfigError(f"--resume: no {STATE_FILE} in {self.out}; start without --resume")
        state = torch.load(path, map_location=self.device, weights_only=True)  # tensors and numbers only
        self.net.load_state_dict(state["net"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.scaler.load_state_dict(state["scaler"])
        self.start_epoch, self.best = int(state["epoch"]), tuple(state["best"])
        self.history = [EpochMetrics(**m) for m in state["history"]]

    def _write_curves(self) -> None:
        rows = [asdict(m) for m in self.history]
        with open(self.out / "metrics.csv", "w", newline="") as fh:
            fields = [k for k in rows[0] if k != "val_auc"] + [f"auc_{n}" for n in self.data.class_names]
            writer = csv.DictWriter(fh, fieldnames=fields)
            writer.writeheader()
            for r in rows:
                aucs = r.pop("val_auc")
                writer.writerow({**r, **{f"auc_{n}": aucs.get(n) for n in self.data.class_names}})
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        epochs = [m.epoch for m in self.history]
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        a.plot(epochs, [m.train_loss for m in self.history], label="train loss")
        a.plot(epochs, [m.val_loss for m in self.history], label="val loss")
        a.set_xlabel("epoch")
        a.legend()
        b.plot(epochs, [m.val_accuracy for m in self.history], label="val accuracy")
        b.plot(epochs, [m.val_mean_auc for m in self.history], label="val mean AUC")
        b.plot(epochs, [m.val_ece for m in self.history], label="val ECE")
        b.set_xlabel("epoch")
        b.legend()
        fig.tight_layout()
        fig.savefig(self.out / "curves.png", dpi=80)
        plt.close(fig)
        (self.out / "metrics.json").write_text(json.dumps([asdict(m) for m in self.history], indent=2))


