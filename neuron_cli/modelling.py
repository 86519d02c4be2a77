"""Models and measurement: ``neuron train`` (fine-tune an EfficientNet-B4 route), ``neuron evaluate`` (metrics on a
labelled set), ``neuron models`` (the registry), ``neuron samples`` (real sample DICOMs) and ``neuron bench`` (the
throughput benchmark). The work is in ``neuron_models.training``, ``worker.evaluation`` and ``worker.bench``."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from neuron.errors import NeuronError
from neuron.settings import Settings, WeightsMode, apply_cache_environment
from neuron.work import Route
from neuron_cli.common import EXIT_SETUP, EXIT_USAGE, console, fail


def _load_for_training(path: Path):
    from worker.decode import decode_instance

    return decode_instance(path, str(path), 1, 8192 * 8192)[0]


def train(
    model: Annotated[str, typer.Argument(help="Registry name, e.g. skin-efficientnet-b4 (see `neuron models`).")],
    data: Annotated[Path, typer.Option(help="ImageFolder-style folder (class sub-folders) or CSV (path,label).")],
    out: Annotated[Path, typer.Option(help="Checkpoint folder (model.safetensors + model.json + curves).")],
    epochs: Annotated[int, typer.Option()] = 30,
    batch_size: Annotated[int, typer.Option()] = 16,
    lr: Annotated[float, typer.Option(help="Learning rate (head; backbone too unless --backbone-lr).")] = 1e-4,
    backbone_lr: Annotated[float, typer.Option(help="Differential learning rate for the backbone.")] = None,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 1e-5,
    label_smoothing: Annotated[float, typer.Option(help="Cross-entropy label smoothing.")] = 0.1,
    class_weights: Annotated[str, typer.Option(help="'auto' (inverse label frequency) or 'none'.")] = "none",
    t0: Annotated[int, typer.Option("--t0", help="CosineAnnealingWarmRestarts T_0 (epochs).")] = 5,
    t_mult: Annotated[int, typer.Option(help="CosineAnnealingWarmRestarts T_mult.")] = 2,
    accumulate: Annotated[int, typer.Option(help="Gradient accumulation steps.")] = 1,
    freeze: Annotated[int, typer.Option(help="Freeze the stem and the first N of 7 block stages.")] = 0,
    drop_rate: Annotated[float, typer.Option(help="Dropout before the classifier (enables --mc-dropout).")] = 0.3,
    input_size: Annotated[int, typer.Option(help="Training and inference resolution.")] = 224,
    val_fraction: Annotated[float, typer.Option(help="Stratified validation split.")] = 0.2,
    augment: Annotated[bool, typer.Option("--augment/--no-augment")] = True,
    amp: Annotated[bool, typer.Option("--amp/--no-amp", help="Mixed precision (CUDA only).")] = True,
    clahe: Annotated[bool, typer.Option("--clahe/--no-clahe")] = True,
    from_scratch: Annotated[bool, typer.Option(help="Start from random weights (no ImageNet cache).")] = False,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted run in --out.")] = False,
    device: Annotated[str, typer.Option()] = "auto",
    seed: Annotated[int, typer.Option()] = 0,
) -> None:
    """Fine-tune an EfficientNet-B4 route (label smoothing, AdamW, warm restarts); keeps the best checkpoint."""
    apply_cache_environment(Path(out) / ".cache")
    from neuron_models.factory import model_config
    from neuron_models.training import LabelledSet, TrainConfig, Trainer
    from worker.models import resolve_device

    try:
        cfg_model = model_config(model)
    except KeyError as exc:
        raise fail(str(exc), EXIT_USAGE) from None
    if not cfg_model.name.endswith("efficientnet-b4"):
        raise fail(f"{model} is not trainable here: only the EfficientNet-B4 routes are fine-tuned by Neuron",
                    EXIT_USAGE)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, backbone_lr=backbone_lr,
                      weight_decay=weight_decay, label_smoothing=label_smoothing, class_weights=class_weights,
                      t0=t0, t_mult=t_mult, accumulate=accumulate, freeze=freeze, drop_rate=drop_rate,
                      input_size=input_size, val_fraction=val_fraction, augment=augment, amp=amp,
                      from_scratch=from_scratch, seed=seed, clahe=clahe,
                      hub_downloads=Settings.from_env().hub_downloads)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console)
    try:
        dataset = LabelledSet.from_path(data)
        with progress:
            task = progress.add_task("training", total=None)
            trainer = Trainer(cfg_model, cfg, dataset, out, _load_for_training, resolve_device(device),
                              progress=lambda d, n, t: progress.update(task, description=d, completed=n, total=t))
            history = trainer.run(resume=resume)
    except NeuronError as exc:
        raise fail(str(exc), EXIT_SETUP) from None
    table = Table(title=f"{model} on {len(dataset.paths)} images ({', '.join(dataset.class_names)})")
    for col in ("epoch", "train loss", "val loss", "val acc", "val AUC", "val ECE", "lr"):
        table.add_column(col, justify="right")
    for m in history:
        table.add_row(str(m.epoch), f"{m.train_loss:.3f}", f"{m.val_loss:.3f}", f"{m.val_accuracy:.3f}",
                      f"{m.val_mean_auc:.3f}", f"{m.val_ece:.3f}", f"{m.lr_head:.2e}")
    console.print(table)
    console.print(f"best checkpoint: {out}/model.safetensors (+ model.json, metrics.csv, curves.png); use it with "
                  f"neuron run ... --model-dir {out.parent}")


def evaluate(
    model: Annotated[str, typer.Argument(help="Registry name (see `neuron models`).")],
    data: Annotated[Path, typer.Option(help="Labelled set: class folders or CSV (path,label); for the chest "
                                            "model a CSV of path plus one 0/1 column per pathology.")],
    model_dir: Annotated[Path, typer.Option(help="Folder of fine-tuned checkpoints.")] = None,
    weights: Annotated[WeightsMode, typer.Option(help="pretrained or untrained (chest model).")] = None,
    json_out: Annotated[Path, typer.Option("--json", help="Also write the metrics here as JSON.")] = None,
    device: Annotated[str, typer.Option()] = "auto",
) -> None:
    """Metrics of a registered model on a labelled set: accuracy, per-class ROC AUC, calibration (ECE)."""
    import json

    from worker.evaluation import evaluate_model

    try:
        settings = Settings.from_env(model_dir=model_dir, weights=weights, device=device)
        report = evaluate_model(model, data, settings, _load_for_training)
    except (NeuronError, KeyError) as exc:
        raise fail(str(exc), EXIT_SETUP) from None
    table = Table(title=f"{model} on {report['n']} images")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, value in report["summary"].items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    for label, auc in report["auc"].items():
        table.add_row(f"AUC {label}", f"{auc:.4f}")
    Console().print(table)
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2))


def samples(dest: Annotated[Path, typer.Argument(help="Folder to copy the sample DICOMs into.")] = Path("samples")
            ) -> None:
    """Copy real sample DICOMs shipped by pydicom and pydicom-data (CR chest radiographs, MR, US, ...) into DEST."""
    from neuron.sample_data import copy_samples

    n = copy_samples(dest)
    console.print(f"copied {n} sample files into {dest}")


def models(model_dir: Annotated[Path, typer.Option(help="Folder of fine-tuned checkpoints.")] = None) -> None:
    """List the model registry: name, route, classes, TTA views and the status of its weights."""
    from neuron_models.checkpoint import find_checkpoints
    from neuron_models.factory import list_models

    settings = Settings.from_env(model_dir=model_dir)
    table = Table(show_header=True)
    for col in ("name", "route", "input", "classes", "TTA views", "weights"):
        table.add_column(col)
    for cfg in list_models():
        if cfg.route is Route.CHEST_XRAY:
            status = "torchxrayvision densenet121-res224-all (pin NEURON_XRV_SHA256)"
            classes = str(len(cfg.class_names))
        else:
            found = find_checkpoints(settings.model_dir, cfg.name)
            status = (", ".join(f"{c.folder} ({c.sha256[:12]})" for c in found) if found
                      else f"no checkpoint: neuron train {cfg.name} --data ... --out MODEL_DIR/{cfg.name}")
            classes = ", ".join(found[0].class_names) if found else f"{len(cfg.class_names)} (set by training)"
        table.add_row(cfg.name, cfg.route.value, f"{cfg.channels}x{cfg.input_size}", classes,
                      ", ".join(v.name for v in cfg.tta_views), status)
    Console(width=max(200, shutil.get_terminal_size().columns)).print(table)


def bench(
    n: Annotated[int, typer.Option("--n", help="Images per synthetic archive.")] = 256,
    size: Annotated[int, typer.Option(help="Image side in pixels (real CRs are about 2000).")] = 2000,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per model batch (default: 16 CPU, 128 CUDA).")] = None,
    precision: Annotated[str, typer.Option(help="fp32 (exact) or a fast mode (bf16, fp16) where the build has it.")
                         ] = "fp32",
    runtime: Annotated[str, typer.Option(help="What runs the network: auto (ONNX Runtime on a CPU, torch on CUDA), "
                                              "torch or onnxruntime; the model-only bound is measured on the others "
                                              "too.")] = "auto",
    archives: Annotated[str, typer.Option(help="Comma-separated: uncompressed, jpeg2000.")] = "uncompressed,jpeg2000",
    modes: Annotated[str, typer.Option(help="Comma-separated: embedded, celery (celery needs redis-server and "
                                            "PostgreSQL installed; it starts throwaway ones).")] = "embedded,celery",
    out: Annotated[Path, typer.Option(help="Folder for <date>-<device>.json.")] = Path("benchmarks/results"),
    workdir: Annotated[Path, typer.Option(help="Scratch and the cache of generated archives "
                                               "(default: <system temp>/neuron-bench).")] = None,
    no_append: Annotated[bool, typer.Option("--no-append", help="Do not add rows to BENCHMARKS.md.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic archive.")] = 0,
    concurrency: Annotated[int, typer.Option(help="Celery mode: studies in flight in the worker (default: the "
                                                  "worker's own).")] = None,
    keep: Annotated[bool, typer.Option("--keep", help="Keep this run's scratch (databases, PNGs, worker log, "
                                                      "py-spy's GIL samples).")] = False,
    host_only: Annotated[bool, typer.Option("--host-only", help="The host's side alone: the real pipeline with a "
                                                                "device stage that answers at once; adds CPU and GIL "
                                                                "milliseconds per image (py-spy).")] = False,
    dicom_out: Annotated[bool, typer.Option("--dicom-out", help="Also write the DICOM outputs (structured report, "
                                                                "secondary captures) in the end-to-end runs.")
                         ] = False,
) -> None:
    """Measure throughput on a deterministic synthetic CR archive: model-only and decode-only bounds, and end to end
    (embedded; Celery with one worker), in one run. Writes JSON under OUT and a row per result to BENCHMARKS.md."""
    from neuron.errors import ConfigError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from neuron.synthetic import default_workdir

    workdir = workdir or default_workdir()
    apply_cache_environment(Path(workdir) / ".cache")
    from worker.bench import BenchConfig, run_bench

    def split(text: str) -> tuple[str, ...]:
        return tuple(p.strip() for p in text.split(",") if p.strip())

    try:
        cfg = BenchConfig(n=n, size=size, device=device, batch_size=batch_size, precision=precision, runtime=runtime,
                          archives=split(archives), modes=split(modes), out=out, workdir=workdir,
                          append=not no_append, seed=seed, concurrency=concurrency, keep=keep, host_only=host_only,
                          dicom_out=dicom_out)
    except (ConfigError, ValueError) as exc:
        raise fail(str(exc), EXIT_USAGE) from None
    try:
        results = run_bench(cfg, say=console.print)
    except NeuronError as exc:
        raise fail(str(exc), EXIT_SETUP) from None
    table = Table(title=f"neuron bench: {results[0]['device'] if results else cfg.device}")
    for col in ("mode", "archive", "images", "runtime", "model-only img/s", "decode img/s", "end-to-end img/s",
                "ratio", "batch fill", "CPU ms/img", "driver CPU", "GIL ms/img"):
        table.add_column(col, justify="right")
    for r in results:  # "-": not measured (a host-only run has no model bound, nor a ratio to one)
        table.add_row(r["mode"], r["archive"], str(r["n_images"]), r["runtime"]["name"],
                      *("-" if r.get(k) is None else str(r[k]) for k in (
                          "model_only_images_per_s", "decode_images_per_s", "end_to_end_images_per_s", "ratio",
                          "batch_fill", "cpu_ms_per_image")),
                      str((r.get("cpu_ms_per_image_by_process") or {}).get("driver", "-")),
                      "-" if r.get("gil_ms_per_image") is None else str(r["gil_ms_per_image"]))
    Console().print(table)
