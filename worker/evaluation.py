"""``neuron evaluate``: a registered model's metrics on a labelled set, through the same engine as screening
(preprocessing, TTA, ensembles), so the numbers describe what ``neuron run`` does."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

from neuron.errors import ConfigError, ModelUnavailable
from neuron.settings import Settings
from neuron_models.factory import model_config
from neuron_models.image import DecodedFrame
from neuron_models.metrics import accuracy, expected_calibration_error, mean_defined, multilabel_auc, per_class_auc
from neuron_models.training import LabelledSet
from worker.device import DeviceJob
from worker.models import Models, default_batch_size


def _infer_all(job: DeviceJob, route, paths: list[Path], load: Callable[[Path], DecodedFrame]) -> np.ndarray:
    probs = []
    batch = job.settings.batch_size or default_batch_size(job.device)
    for start in range(0, len(paths), batch):
        frames = [load(p) for p in paths[start:start + batch]]
        for res in job.infer(route, frames):
            if isinstance(res, Exception):
                raise ConfigError(f"an evaluation image was rejected: {res}")
            probs.append(res.probabilities)
    return np.stack(probs)


def read_multilabel_csv(data: Path, labels: tuple[str, ...]) -> tuple[list[Path], np.ndarray]:
    """CSV with a path column and one column per pathology (1, 0, or blank = unknown); ChestX-ray14's
    'Finding Labels' column (labels joined by '|', 'No Finding') is accepted too."""
    paths, rows = [], []
    with open(data, newline="") as fh:
        reader = csv.DictReader(fh)
        cols = reader.fieldnames or []
        path_col = "path" if "path" in cols else ("Image Index" if "Image Index" in cols else None)
        if path_col is None:
            raise ConfigError(f"{data} needs a 'path' (or ChestX-ray14 'Image Index') column; it has {cols}")
        for row in reader:
            p = Path(row[path_col])
            paths.append(p if p.is_absolute() else data.parent / p)
            if "Finding Labels" in row:
                found = set(row["Finding Labels"].split("|"))
                rows.append([1.0 if lab in found else 0.0 for lab in labels])
            else:
                rows.append([float(row[lab]) if row.get(lab, "").strip() not in ("", "nan") else math.nan
                             for lab in labels])
    return paths, np.array(rows, dtype=np.float64)


def evaluate_model(name: str, data: Path, settings: Settings, load: Callable[[Path], DecodedFrame]) -> dict:
    cfg = model_config(name)
    models = Models.from_settings(settings, only=[cfg.route])  # not the other routes' weights
    if cfg.route not in models.routes:
        raise ModelUnavailable(models.unavailable.get(cfg.route, f"{name} could not be loaded"))
    model = models.routes[cfg.route].model
    job = DeviceJob(models)
    labels = model.class_names
    if cfg.multilabel:
        paths, targets = read_multilabel_csv(Path(data), labels)
        probs = _infer_all(job, cfg.route, paths, load)
        aucs = multilabel_auc(probs, targets, labels)
        return {"model": name, "weights": model.weights_id, "n": len(paths), "auc": aucs,
                "summary": {"mean AUC": mean_defined(aucs)}}
    dataset = LabelledSet.from_path(Path(data))
    unknown = set(dataset.class_names) - set(labels)
    if unknown:
        raise ConfigError(f"classes {sorted(unknown)} in {data} are not classes of {name} ({list(labels)})")
    y = np.array([labels.index(dataset.class_names[i]) for i in dataset.labels])
    probs = _infer_all(job, cfg.route, dataset.paths, load)
    nll = float(-np.log(np.clip(probs[np.arange(len(y)), y], 1e-12, 1.0)).mean())
    aucs = per_class_auc(probs, y, labels)
    return {"model": name, "weights": model.weights_id, "n": len(y), "auc": aucs,
            "summary": {"accuracy": accuracy(probs, y), "loss (NLL)": nll,
                        "ECE": expected_calibration_error(probs, y), "mean AUC": mean_defined(aucs)}}
