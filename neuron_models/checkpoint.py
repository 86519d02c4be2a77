"""Fine-tuned checkpoints: ``model.safetensors`` (weights; loading never unpickles) plus ``model.json`` (the sidecar:
model name, class names, preprocessing, training config, metrics, sha256 of the weights, code version).

    models/skin-v1/model.safetensors
    models/skin-v1/model.json
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import neuron
from neuron.errors import ModelUnavailable, WeightsError
from neuron_models.registry import sha256_file

WEIGHTS_FILE = "model.safetensors"
SIDECAR_FILE = "model.json"


@dataclass(frozen=True)
class Checkpoint:
    folder: Path
    meta: dict

    @property
    def model(self) -> str:
        return self.meta["model"]

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.meta["class_names"])

    @property
    def input_size(self) -> int:
        return int(self.meta["preprocessing"]["input_size"])

    @property
    def sha256(self) -> str:
        return self.meta["sha256"]

    def state_dict(self) -> dict[str, torch.Tensor]:
        path = self.folder / WEIGHTS_FILE
        digest = sha256_file(path)
        if digest != self.sha256:
            raise WeightsError(f"{path} has sha256 {digest} but its sidecar {SIDECAR_FILE} says {self.sha256}: the "
                               f"weights were changed or corrupted after training; retrain or restore the file")
        return load_file(path)


def save_checkpoint(folder: Path, state: dict[str, torch.Tensor], meta: dict) -> Checkpoint:
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (WEIGHTS_FILE + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
    tmp.replace(folder / WEIGHTS_FILE)
    meta = {**meta, "sha256": sha256_file(folder / WEIGHTS_FILE), "code_version": neuron.__version__,
            "timm_version": metadata.version("timm"), "torch_version": torch.__version__}
    (folder / SIDECAR_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return Checkpoint(folder, meta)


def read_checkpoint(folder: Path) -> Checkpoint:
    sidecar = folder / SIDECAR_FILE
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{sidecar} is missing or not JSON ({exc}); a checkpoint folder holds {WEIGHTS_FILE} "
                           f"and {SIDECAR_FILE} as written by `neuron train`") from exc
    for key in ("model", "class_names", "preprocessing", "sha256"):
        if key not in meta:
            raise WeightsError(f"{sidecar} lacks '{key}'; it was not written by `neuron train`")
    return Checkpoint(folder, meta)


def find_checkpoints(model_dir: Path | None, model: str) -> list[Checkpoint]:
    """Every checkpoint in ``model_dir`` (itself or its sub-folders) trained for registry model ``model``."""
    if model_dir is None or not Path(model_dir).is_dir():
        return []
    folders = [Path(model_dir)] + sorted(p for p in Path(model_dir).iterdir() if p.is_dir())
    found = []
    for folder in folders:
        if (folder / SIDECAR_FILE).is_file() and (folder / WEIGHTS_FILE).is_file():
            ckpt = read_checkpoint(folder)
            if ckpt.model == model:
                found.append(ckpt)
    return found


def require_checkpoints(model_dir: Path | None, model: str, route: str) -> list[Checkpoint]:
    found = find_checkpoints(model_dir, model)
    if not found:
        where = f"in {model_dir}" if model_dir else "(no --model-dir given)"
        raise ModelUnavailable(
            f"no trained checkpoint for {model} {where}: route '{route}' has no model yet, so these instances are "
            f"recorded and not screened; train one with `neuron train {model} --data LABELLED_FOLDER "
            f"--out MODEL_DIR/{model}` and pass --model-dir MODEL_DIR")
    return found
