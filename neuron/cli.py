"""The ``neuron`` command. Heavy imports (torch, models) happen inside the commands that need them.

Exit codes: 0 every file was screened or deliberately skipped; 3 the run finished but some files failed (their
reasons are in ``ingest_status``); 4 the run could not start (weights, settings, database); 2 usage errors.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from neuron.errors import NeuronError, RetryableError, SetupError
from neuron.options import screening_options
from neuron.routes import MODEL_ROUTES, Route
from neuron.settings import Settings, WeightsMode

EXIT_OK, EXIT_USAGE, EXIT_SOME_FAILED, EXIT_SETUP = 0, 2, 3, 4
RETRY_FAILED_HELP = "Screen failed instances again, with a fresh attempt count (after fixing the cause)."
PATIENT_KEY_HELP = ("Keep each study's Patient ID as HMAC-SHA256 under the secret in NEURON_PATIENT_KEY, so one "
                    "patient's studies can be grouped without storing who it is. [default: off: no patient identity "
                    "is stored]")


# the database option of every command that reads or writes one (run and worker have their own defaults)
DbOpt = Annotated[str, typer.Option("--db", help="SQLAlchemy URL. [default: env NEURON_DATABASE_URL, else "
                                                 "sqlite:///OUT/neuron.db]")]


def _patient_secret(enabled: bool) -> str | None:
    """The --patient-key secret, from the environment only (a command line is visible to every user of the host)."""
    if not enabled:
        return None
    secret = os.environ.get("NEURON_PATIENT_KEY", "")
    if len(secret) < 16:
        raise _fail("--patient-key needs a secret of at least 16 characters in NEURON_PATIENT_KEY (it is "
                    f"{'unset' if not secret else f'{len(secret)} characters'}); generate one with `python3 -c "
                    "'import secrets; print(secrets.token_hex(32))'`, keep it with the database's credentials and use "
                    "the same one for every scan, or the keys of one patient will not match", EXIT_USAGE)
    return secret

# plain help (rich_markup_mode=None): click wraps long help texts and defaults instead of cutting them at the column
# width, and "[default: ...]" stays literal
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Neuron screens medical-image archives: DICOM in; findings with calibrated probabilities, "
                       "uncertainty and Grad-CAM heatmaps out, in SQL.")
console = Console(stderr=True)


def _keep_caches_inside(folder: Path) -> None:
    """Caches under FOLDER/.cache (``_use_cache_dir``)."""
    _use_cache_dir(Path(folder) / ".cache")


def _use_cache_dir(cache: Path) -> None:
    """Nothing is written outside the output folder: importing timm makes torch create its compiler cache folder in
    the system temp folder, and matplotlib (training curves) keeps a font cache in the home folder. Both go under
    CACHE (the output folder's .cache, or NEURON_CACHE_DIR) unless the user has placed them. Call before the first
    torch-heavy import."""
    cache = Path(cache).resolve()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "torch"))
    os.environ.setdefault("MPLCONFIGDIR", str(cache / "matplotlib"))


def _fail(message: str, code: int) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


class _Rate(TextColumn):
    def __init__(self) -> None:
        super().__init__("")

    def render(self, task):  # type: ignore[override]
        speed = task.finished_speed or task.speed
        return f"{speed:6.1f} img/s" if speed else "   ... img/s"


@app.command()
@screening_options
def run(
    folder: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="Folder to screen (recursively).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: neuron.db, heatmaps/ and .cache/. "
                                                          "[default: ./results; env NEURON_OUT]")] = None,
    db: Annotated[str, typer.Option("--db", help="SQLAlchemy URL. [default: sqlite:///OUT/neuron.db; env "
                                                 "NEURON_DATABASE_URL]")] = None,
    route: Annotated[Route, typer.Option(help="Send every file to this route (e.g. skin for JPEG/PNG photos).")] = None,
    follow_links: Annotated[bool, typer.Option("--follow-links/--no-follow-links", help="Follow symbolic links "
                                               "that leave the folder (loops are still cut, each file indexed "
                                               "once). [default: off; env NEURON_FOLLOW_LINKS]",
                                               show_default=False)] = None,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help=RETRY_FAILED_HELP)] = False,
    patient_key: Annotated[bool, typer.Option("--patient-key", help=PATIENT_KEY_HELP)] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what each stage does (INFO level).")] = False,
    *,
    screening: dict,
) -> None:
    """Screen every DICOM file under FOLDER and write findings to a database (embedded: SQLite, one process)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pydicom").setLevel(logging.WARNING)  # its plugins log tracebacks of files we record anyway
    try:
        settings = Settings.from_env(out_dir=out, database_url=db, route_override=route.value if route else None,
                                     follow_links=follow_links, patient_key=_patient_secret(patient_key),
                                     **screening)
    except NeuronError as exc:
        raise _fail(str(exc), EXIT_USAGE) from None
    _warn_untrained(settings)
    _use_cache_dir(settings.resolved_cache_dir)
    from worker.embedded import ProgressHooks, run_folder

    # with --route only that route's model; otherwise each route's model loads with its first instance
    engine = _load_engine(settings, only=[route] if route else None, lazy=route is None)
    _start_metrics(settings, engine)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), _Rate(),
                        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console)
    from worker.send import sending

    with sending(settings) as sender, progress:
        scan_task = progress.add_task("indexing", total=None)
        img_task = progress.add_task("screening", total=None, visible=False)
        hooks = ProgressHooks(
            on_scan=lambda n: progress.update(scan_task, completed=n),
            on_total=lambda n: progress.update(img_task, total=n, visible=True),
            on_images=lambda n: progress.advance(img_task, n),
            on_scanned=lambda r: progress.update(scan_task, total=r.seen, completed=r.seen))
        try:
            report = run_folder(folder, settings, engine=engine, hooks=hooks, retry_failed=retry_failed)
        except NeuronError as exc:
            raise _fail(str(exc), EXIT_SETUP) from None
    _print_summary(report, settings)
    _print_deliveries(sender, settings)
    failed = report.summary.files.get("failed", 0)
    raise typer.Exit(EXIT_SOME_FAILED if failed else EXIT_OK)


def _print_deliveries(sender, settings: Settings) -> None:
    if sender is not None:
        console.print(f"deliveries to {', '.join(settings.send_to)}: {sender.delivered} delivered, {sender.failed} "
                      "failed (`neuron status` counts them; `neuron send --failed` tries the failed ones again)")


def _warn_untrained(settings: Settings) -> None:
    if settings.weights is WeightsMode.UNTRAINED:
        console.print(Panel("[bold]--weights untrained[/]: the models have random (seeded) weights. Every result is "
                            "marked [bold]untrained[/] and means NOTHING clinically. Use for tests and demos only.",
                            title="WARNING", style="bold yellow"))


def _load_engine(settings: Settings, only=None, lazy: bool = False):
    """The engine with ``only`` these routes' models; ``lazy``: each route's model loads when its first instance
    arrives, so no route's weights are needed (or checked) unless the folder holds work for it."""
    from worker.engine import Engine

    try:
        with console.status("loading models..."):
            engine = Engine.from_settings(settings, only=only, lazy=lazy)
    except SetupError as exc:
        raise _fail(str(exc), EXIT_SETUP) from None
    loaded = ", ".join(f"{r.value}={lr.spec.model} ({lr.model.weights_id[:12]})" for r, lr in engine.routes.items())
    later = ", ".join(r.value for r in engine.available_routes if r in engine.loadable)
    console.print(f"device [bold]{engine.device}[/], batch size {engine.batch_size}, models: {loaded or 'none yet'}"
                  + (f"; loaded when their first instance arrives: {later}" if later else ""))
    for r, why in engine.unavailable.items():
        console.print(f"[yellow]route {r.value} unavailable[/]: {why}")
    return engine


def _print_summary(report, settings: Settings) -> None:
    files = report.summary.files
    table = Table(title="files", show_header=True)
    columns = ("done", "failed", "skipped", "duplicate", "pending")
    for col in columns:
        table.add_column(col, justify="right")
    table.add_row(*(str(files.get(c, 0)) for c in columns))
    console.print(table)
    console.print(f"scanned {report.scan.seen} files ({report.scan.unchanged} unchanged since the last run), "
                  f"screened {report.screened} instances")
    if report.summary.top_findings:
        console.print("top findings this run (rank 1, probability >= 0.5): " +
                      ", ".join(f"{label} x{n}" for label, n in report.summary.top_findings))
    for path, reason in report.summary.failures:
        console.print(f"[red]failed[/] {path}: {reason}")
    console.print(f"results: {settings.resolved_database_url}  heatmaps: {settings.heatmap_dir}")
    console.print("query: sqlite3 <db> \"select label, probability, file_path from findings where rank = 1\"")
    from neuron.queue import mask_url

    review = f"--db {mask_url(settings.database_url)}" if settings.database_url else f"--out {settings.out_dir}"
    console.print(f"review in a browser: neuron review {review}   (then open http://127.0.0.1:8080/)")


def _load_for_training(path: Path):
    from worker.decode import decode_instance

    return decode_instance(path, str(path), 1, 8192 * 8192)[0]


@app.command()
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
    """Fine-tune an EfficientNet-B4 route with the seed's methodology; keeps the best checkpoint."""
    _keep_caches_inside(out)
    from neuron_models.registry import model_config
    from neuron_models.training import LabelledSet, TrainConfig, Trainer
    from worker.engine import resolve_device

    try:
        cfg_model = model_config(model)
    except KeyError as exc:
        raise _fail(str(exc), EXIT_USAGE) from None
    if not cfg_model.name.endswith("efficientnet-b4"):
        raise _fail(f"{model} is not trainable here: only the EfficientNet-B4 routes are fine-tuned by Neuron",
                    EXIT_USAGE)
    cfg = TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, backbone_lr=backbone_lr,
                      weight_decay=weight_decay, label_smoothing=label_smoothing, class_weights=class_weights,
                      t0=t0, t_mult=t_mult, accumulate=accumulate, freeze=freeze, drop_rate=drop_rate,
                      input_size=input_size, val_fraction=val_fraction, augment=augment, amp=amp,
                      from_scratch=from_scratch, seed=seed, clahe=clahe)
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
        raise _fail(str(exc), EXIT_SETUP) from None
    table = Table(title=f"{model} on {len(dataset.paths)} images ({', '.join(dataset.class_names)})")
    for col in ("epoch", "train loss", "val loss", "val acc", "val AUC", "val ECE", "lr"):
        table.add_column(col, justify="right")
    for m in history:
        table.add_row(str(m.epoch), f"{m.train_loss:.3f}", f"{m.val_loss:.3f}", f"{m.val_accuracy:.3f}",
                      f"{m.val_mean_auc:.3f}", f"{m.val_ece:.3f}", f"{m.lr_head:.2e}")
    console.print(table)
    console.print(f"best checkpoint: {out}/model.safetensors (+ model.json, metrics.csv, curves.png); use it with "
                  f"neuron run ... --model-dir {out.parent}")


@app.command()
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
        raise _fail(str(exc), EXIT_SETUP) from None
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


db_app = typer.Typer(help="Database schema (Alembic migrations; SQLite or PostgreSQL).", no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
def db_upgrade(db: Annotated[str, typer.Option("--db", help="SQLAlchemy URL (default: NEURON_DATABASE_URL).")] = None
               ) -> None:
    """Bring the database to the newest schema and recreate the public views."""
    from db.migrate import current
    from db.store import Database

    settings = Settings.from_env(database_url=db)
    database = Database(settings.resolved_database_url)
    try:
        database.create()
    except NeuronError as exc:
        raise _fail(str(exc), EXIT_SETUP) from None
    console.print(f"schema at revision {current(database.engine)}")


def _user_cache_dir() -> Path:
    """The user's cache folder for Neuron: $XDG_CACHE_HOME/neuron, else ~/.cache/neuron."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "neuron"


def _worker_places(settings: Settings, out_given: bool) -> Settings:
    """Where a worker writes, decided before it writes anything. A worker is started by a service manager from any
    folder, so without an output folder (--out, NEURON_OUT) nothing may default into the working directory: heatmaps
    need NEURON_HEATMAP_DIR and results NEURON_DATABASE_URL (else exit 4 naming them), and caches go to
    NEURON_CACHE_DIR, else the user's cache folder (logged once)."""
    if out_given:
        return settings
    missing = []
    if settings.heatmap_root is None and settings.heatmap_top_k > 0:
        missing.append("heatmaps: set NEURON_HEATMAP_DIR (a folder every worker host and reviewer can reach)")
    if not settings.database_url:
        missing.append("results: set NEURON_DATABASE_URL (or --db)")
    if settings.send_to and settings.dicom_out == settings.out_dir / "dicom-out":
        missing.append("DICOM outputs for --send-to: set NEURON_DICOM_OUT (or --dicom-out)")
    if missing:
        raise _fail(f"the worker has no output folder (--out or NEURON_OUT) and would write into {Path.cwd()}; "
                    f"{'; '.join(missing)}; or set NEURON_OUT to a folder for both", EXIT_SETUP)
    if settings.cache_dir is None:
        settings = settings.with_(cache_dir=_user_cache_dir())
        console.print(f"caches in {settings.cache_dir} (no --out/NEURON_OUT or --cache-dir/NEURON_CACHE_DIR given)")
    return settings


@app.command()
@screening_options
def worker(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: heatmaps/ (unless NEURON_HEATMAP_DIR) and "
                                                          ".cache/ (unless NEURON_CACHE_DIR). Without it the worker "
                                                          "needs NEURON_HEATMAP_DIR and NEURON_DATABASE_URL, and "
                                                          "caches go to $XDG_CACHE_HOME/neuron (~/.cache/neuron). "
                                                          "[default: env NEURON_OUT]")] = None,
    db: Annotated[str, typer.Option("--db", help="SQLAlchemy URL. [default: env NEURON_DATABASE_URL]")] = None,
    name: Annotated[str, typer.Option(help="This worker's identity: its Celery node name (neuron-NAME@host) and the "
                                           "findings' worker column. [default: host/device/pid]")] = None,
    max_wait_ms: Annotated[int, typer.Option(help="Run a partial batch after this wait (trickling queues).")] = 200,
    concurrency: Annotated[int, typer.Option(help="Studies in flight (Celery threads; they only wait). [default: "
                                                  "max(8, 4 x batch size), so batches fill from 1-image studies]",
                                             show_default=False)] = None,
    queues: Annotated[str, typer.Option(help="Comma-separated route queues to consume; only their models are "
                                             "loaded.")] = "chest-xray,mri-us,skin",
    loglevel: Annotated[str, typer.Option(help="Celery log level (DEBUG, INFO, WARNING).")] = "INFO",
    *,
    screening: dict,
) -> None:
    """Run a Celery GPU worker: takes studies from Redis, batches their images across studies, writes results."""
    try:
        settings = Settings.from_env(out_dir=out, database_url=db, max_wait_ms=max_wait_ms,
                                     worker_concurrency=concurrency, **screening)
    except NeuronError as exc:
        raise _fail(str(exc), EXIT_USAGE) from None
    settings = _worker_places(settings, out_given=out is not None or "NEURON_OUT" in os.environ)
    if settings.weights is WeightsMode.UNTRAINED:
        console.print("[bold yellow]WARNING: --weights untrained: results are marked untrained and mean nothing "
                      "clinically.[/]")
    _use_cache_dir(settings.resolved_cache_dir)
    from worker.send import sending
    from worker.service import run_worker

    try:
        with sending(settings, wait_s=10.0):  # what is left after 10 s goes with the next sender (any worker)
            run_worker(settings, [q.strip() for q in queues.split(",") if q.strip()], settings.worker_concurrency,
                       loglevel, name=name)
    except (SetupError, RetryableError) as exc:
        raise _fail(str(exc), EXIT_SETUP) from None


@app.command()
def scan(
    folder: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="Folder to index and enqueue.")],
    db: DbOpt = None,
    watch: Annotated[bool, typer.Option("--watch", help="Keep watching for new files until stopped (SIGTERM or "
                                                        "Ctrl-C enqueues what was indexed, then exits).")] = False,
    poll: Annotated[bool, typer.Option("--poll", help="Polling observer (network shares).")] = False,
    stable_seconds: Annotated[float, typer.Option(help="A file is complete once unchanged this long.")] = 2.0,
    quiet_seconds: Annotated[float, typer.Option(help="Enqueue a study once no file arrived this long.")] = 5.0,
    route: Annotated[Route, typer.Option(help="Send every file to this route (e.g. skin for JPEG/PNG photos).")] = None,
    requeue: Annotated[bool, typer.Option(
        "--requeue", help="Send again instances already queued (after a broker lost its queue) and instances "
        "skipped while their route had no model.")] = False,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help=RETRY_FAILED_HELP)] = False,
    follow_links: Annotated[bool, typer.Option("--follow-links/--no-follow-links", help="Follow symbolic links "
                                               "that leave the folder (loops are still cut, each file indexed "
                                               "once). [default: off; env NEURON_FOLLOW_LINKS]",
                                               show_default=False)] = None,
    patient_key: Annotated[bool, typer.Option("--patient-key", help=PATIENT_KEY_HELP)] = False,
) -> None:
    """Producer: index DICOM headers into the database and enqueue one task per study (IDs only)."""
    import signal

    from db.store import Database
    from neuron.queue import make_app, mask_url
    from producer.enqueue import enqueue_pending
    from producer.scan import index_folder
    from producer.watch import FolderWatcher

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = Settings.from_env(database_url=db, watch_stable_seconds=stable_seconds,
                                     watch_quiet_seconds=quiet_seconds, route_override=route.value if route else None,
                                     follow_links=follow_links, patient_key=_patient_secret(patient_key))
    except NeuronError as exc:
        raise _fail(str(exc), EXIT_USAGE) from None
    database = Database(settings.resolved_database_url)
    try:
        database.create()
    except NeuronError as exc:
        raise _fail(str(exc), EXIT_SETUP) from None
    celery_app = make_app(settings)
    console.print(f"database {mask_url(settings.resolved_database_url)}, broker {mask_url(settings.broker_url)}")
    if watch:
        watcher = FolderWatcher(folder, database, celery_app, settings, poll=poll)
        stopping = []
        signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
        try:
            watcher.run(should_stop=lambda: bool(stopping),
                        on_ready=lambda: console.print(f"watching {folder} (Ctrl-C or SIGTERM to stop)"))
        except KeyboardInterrupt:
            pass
        # what was indexed but is still inside its quiet period goes out now, not at the next start
        sent = _enqueue_logged(database, celery_app, watcher.studies)
        console.print(f"stopped; enqueued {sent} study tasks of files already indexed")
        return
    progress = Progress(TextColumn("indexing"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                        console=console)
    with progress:
        task = progress.add_task("indexing", total=None)
        result = index_folder(folder, database, exclude=[settings.out_dir], route_override=route,
                              on_file=lambda n: progress.update(task, completed=n),
                              follow_links=settings.follow_links, patient_secret=settings.patient_key)
    again = database.reset_to_pending(awaiting_model=[r.value for r in MODEL_ROUTES] if requeue else (),
                                      queued=requeue, failed=retry_failed)
    try:
        sent = enqueue_pending(database, celery_app)
    except NeuronError as exc:  # the broker never came up: what was indexed stays pending for the next scan
        raise _fail(str(exc), EXIT_SETUP) from None
    console.print(f"scanned {result.seen} files ({result.unchanged} unchanged), indexed {result.indexed}, "
                  f"{again} instances back in line, enqueued {sent} study tasks")


# -- DICOM on the network: listen, pull, send (the work is in producer/listen.py, producer/pull.py, worker/stream.py
# and worker/send.py; these are thin wrappers) ------------------------------------------------------------------------
AeTitleOpt = Annotated[str, typer.Option("--ae-title", help="Neuron's AE title: the listener's own, and the calling "
                                                            "AE title of pull and send. [default: NEURON; env "
                                                            "NEURON_AE_TITLE]", show_default=False)]
MinFreeOpt = Annotated[float, typer.Option("--min-free-gb", help="Refuse instances (C-STORE 0xA700, out of "
                                                                 "resources) that would leave less than this many GB "
                                                                 "free on the volume of OUT/received.")]


def _network_settings(out, db, ae_title, patient_key, screening) -> Settings:
    try:
        return Settings.from_env(out_dir=out, database_url=db, ae_title=ae_title,
                                 patient_key=_patient_secret(patient_key), **screening)
    except NeuronError as exc:
        raise _fail(str(exc), EXIT_USAGE) from None


def _stop_on_signals():
    """An Event set by SIGTERM or Ctrl-C: the service finishes what it acknowledged, then returns."""
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("pydicom").setLevel(logging.WARNING)
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def _check_port_free(host: str, port: int) -> None:
    import socket

    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as exc:
        raise _fail(f"cannot listen on {host}:{port} ({exc.strerror or exc}): another program (a system Orthanc, "
                    "storescp, another listener) may hold the port, or the address is not this host's; choose "
                    "another with --port / --host", EXIT_SETUP) from None


@app.command()
@screening_options
def listen(
    port: Annotated[int, typer.Option(help="TCP port to listen on (104 needs root).")] = 11112,
    host: Annotated[str, typer.Option(help="Address to bind. [default: 127.0.0.1; with TLS 0.0.0.0]",
                                      show_default=False)] = None,
    ae_title: AeTitleOpt = None,
    allow_ae: Annotated[list[str], typer.Option("--allow-ae", help="Accept associations only from this calling AE "
                                                                   "title, optionally bound to a host (CT1 or "
                                                                   "CT1@10.0.0.5); repeat for several. [default: any "
                                                                   "caller]", show_default=False)] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: received/ (the instances), neuron.db, "
                                                          "heatmaps/. [default: ./results; env NEURON_OUT]")] = None,
    db: DbOpt = None,
    series_quiet: Annotated[float, typer.Option(help="A series is complete once no instance of it arrived for this "
                                                     "many seconds.")] = 10.0,
    study_quiet: Annotated[float, typer.Option(help="A study is complete this many seconds after its last series "
                                                    "was.")] = 20.0,
    max_wait: Annotated[float, typer.Option(help="Screen a study this many seconds after its first instance "
                                                 "arrived, whatever still arrives (later instances are screened on "
                                                 "their own).")] = 900.0,
    min_free_gb: MinFreeOpt = 5.0,
    max_queue: Annotated[int, typer.Option(help="Refuse instances (C-STORE 0xA701, out of resources) while this many "
                                                "wait to be screened.")] = 100_000,
    max_associations: Annotated[int, typer.Option(help="Associations at once; more are rejected "
                                                       "(local limit exceeded).")] = 16,
    patient_key: Annotated[bool, typer.Option("--patient-key", help=PATIENT_KEY_HELP)] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log associations, studies released and "
                                                                  "deliveries (INFO).")] = False,
    *,
    screening: dict,
) -> None:
    """Receive DICOM (C-STORE, C-ECHO) from modalities and routers and screen each study once it is complete. An
    instance is acknowledged only once it is on disk and indexed. With NEURON_BROKER_URL set, complete studies are
    enqueued for `neuron worker`s instead of screened here."""
    from neuron.dicomnet import AllowedCaller, TlsFiles, is_loopback
    from producer.arrivals import CompletenessRules
    from producer.listen import ListenConfig
    from producer.receive import Admission

    _logging(verbose)
    settings = _network_settings(out, db, ae_title, patient_key, screening)
    try:
        tls = TlsFiles(settings.tls_cert, settings.tls_key, settings.tls_ca)
        if tls.enabled:
            tls.server_context()  # a bad certificate stops here, before anything binds
        config = ListenConfig(ae_title=settings.ae_title, host=host or ("0.0.0.0" if tls.enabled else "127.0.0.1"),
                              port=port, allow=tuple(AllowedCaller.parse(a) for a in allow_ae or ()), tls=tls,
                              max_associations=max_associations)
        rules = CompletenessRules(series_quiet, study_quiet, max_wait)
    except NeuronError as exc:
        raise _fail(str(exc), EXIT_USAGE) from None
    if not is_loopback(config.host) and not tls.enabled:
        console.print(Panel(f"binding {config.host} without TLS: instances cross the network in clear text"
                            + ("" if config.allow else " and any AE title may send") + "; use --tls-cert/--tls-key "
                            "(and --tls-ca for callers' certificates) and --allow-ae", title="WARNING",
                            style="bold yellow"))
    admission = Admission(min_free_bytes=int(min_free_gb * 1e9), max_backlog=max_queue)
    _check_port_free(config.host, port)  # before the models load: a taken port is said at once
    stop = _stop_on_signals()

    def ready(listener) -> None:
        mode = "enqueueing complete studies for the workers" if settings.broker_given else "screening here"
        console.print(f"listening as {config.ae_title} on {config.host}:{listener.port} ({mode}; "
                      f"{'TLS' if tls.enabled else 'no TLS'}; Ctrl-C or SIGTERM stops)")

    if settings.broker_given and settings.send_to:
        console.print("[yellow]--send-to / NEURON_SEND_TO does nothing here with NEURON_BROKER_URL set: the workers "
                      "screen and send; set NEURON_SEND_TO on them[/]")
    try:
        if settings.broker_given:
            from db.store import Database
            from neuron.queue import make_app
            from producer.listen import enqueue_released, serve

            database = Database(settings.resolved_database_url)
            database.create()
            serve(database, settings.out_dir, config, rules, admission,
                  enqueue_released(database, make_app(settings)), stop, settings.patient_key, release_on_stop=True,
                  ready=ready)
            return
        _warn_untrained(settings)
        _use_cache_dir(settings.resolved_cache_dir)
        engine = _load_engine(settings, lazy=True)
        from worker.stream import listen_in_process

        listen_in_process(settings, config, rules, admission, engine, stop, ready=ready)
    except OSError as exc:
        raise _fail(f"cannot listen on {config.host}:{port} ({exc.strerror or exc}): another program (a system "
                    "Orthanc, storescp) may hold the port; choose another with --port", EXIT_SETUP) from None
    except NeuronError as exc:
        raise _fail(str(exc), EXIT_SETUP) from None
    console.print("stopped")


@app.command()
@screening_options
def pull(
    source: Annotated[str, typer.Argument(help="The PACS to pull from: AE@HOST:PORT, e.g. PACS@pacs.example:104.")],
    study_date: Annotated[str, typer.Option("--study-date", help="YYYYMMDD, YYYYMMDD-YYYYMMDD, or a range open at "
                                                                 "one end. [default: any date]",
                                            show_default=False)] = None,
    modality: Annotated[str, typer.Option("--modality", help="Modalities in the study, comma-separated: CR,DX. "
                                                             "[default: any]", show_default=False)] = None,
    accessions: Annotated[Path, typer.Option("--accessions", help="A text file of accession numbers, one per line. "
                                                                  "[default: any]", show_default=False)] = None,
    move_to: Annotated[str, typer.Option("--move-to", help="C-MOVE to this AE title (a running `neuron listen` the "
                                                           "PACS knows, sharing this database) instead of C-GET. "
                                                           "[default: C-GET, no PACS configuration needed]",
                                         show_default=False)] = None,
    in_flight: Annotated[int, typer.Option(help="Studies retrieved at once.")] = 2,
    window: Annotated[str, typer.Option(help="Retrieve only between these hours (local time), e.g. 20:00-06:00; "
                                             "paused outside. [default: any time]", show_default=False)] = None,
    attempts: Annotated[int, typer.Option(help="Tries per study before it is recorded as failed.")] = 4,
    retry_seconds: Annotated[float, typer.Option(help="Wait before a study's second try, doubled each try.")] = 10.0,
    ae_title: AeTitleOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: received/, neuron.db, heatmaps/. "
                                                          "[default: ./results; env NEURON_OUT]")] = None,
    db: DbOpt = None,
    min_free_gb: MinFreeOpt = 5.0,
    patient_key: Annotated[bool, typer.Option("--patient-key", help=PATIENT_KEY_HELP)] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log each study's retrieval (INFO).")] = False,
    *,
    screening: dict,
) -> None:
    """Query a PACS (C-FIND) and retrieve the matching studies (C-GET, or C-MOVE to a listener), then screen them (or,
    with NEURON_BROKER_URL, enqueue them for the workers). Resumable: a second pull of the same query asks for
    nothing that is here already. Exit 3 when some studies could not be retrieved (`neuron status`, table pulls)."""
    from neuron.dicomnet import Peer, TimeWindow, TlsFiles
    from producer.pull import PullConfig, PullQuery, echo
    from producer.receive import Admission

    _logging(verbose)
    settings = _network_settings(out, db, ae_title, patient_key, screening)
    try:
        query = PullQuery.parse(study_date, modality, accessions)
        config = PullConfig(Peer.parse(source, "SOURCE"), settings.ae_title,
                            TlsFiles(settings.tls_cert, settings.tls_key, settings.tls_ca), move_to, in_flight,
                            TimeWindow.parse(window) if window else None, attempts, retry_seconds)
    except NeuronError as exc:
        raise _fail(str(exc), EXIT_USAGE) from None
    admission = Admission(min_free_bytes=int(min_free_gb * 1e9))
    if (settings.broker_given or move_to) and settings.send_to:
        console.print("[yellow]--send-to does nothing here: with NEURON_BROKER_URL the workers send (set "
                      "NEURON_SEND_TO on them), with --move-to the listener does[/]")
    stop = _stop_on_signals()
    try:
        echo(config)  # an unreachable source is said before any model loads
        if settings.broker_given or move_to is not None:
            from producer.pull import pull_without_screening

            report = pull_without_screening(settings, config, query, admission, stop)
            left = 0
        else:
            _warn_untrained(settings)
            _use_cache_dir(settings.resolved_cache_dir)
            engine = _load_engine(settings, lazy=True)
            from worker.stream import pull_in_process

            report, left = pull_in_process(settings, config, query, admission, engine, stop)
    except NeuronError as exc:
        raise _fail(str(exc), EXIT_SETUP) from None
    done = ("enqueued for the workers" if settings.broker_given else
            f"sent to {move_to}" if move_to else "screened")
    console.print(f"{report.found} studies found on {source}: {report.retrieved_studies} retrieved "
                  f"({report.retrieved_instances} instances, {done}), {report.held} held already, "
                  f"{len(report.failed)} failed" + (f"; {left} instances still to screen (stopped)" if left else ""))
    for _, error in report.failed[:10]:
        console.print(f"[red]failed[/] {error}")
    raise typer.Exit(EXIT_SOME_FAILED if report.failed else EXIT_OK)


@app.command()
def send(
    failed: Annotated[bool, typer.Option("--failed", help="Also try the failed deliveries again, with a fresh count "
                                                          "of tries.")] = False,
    to: Annotated[list[str], typer.Option("--to", help="Only deliveries to this AE@HOST:PORT (repeatable). "
                                                       "[default: every destination]", show_default=False)] = None,
    wait: Annotated[float, typer.Option(help="Give up after this many seconds; what is left stays pending.")
                    ] = 300.0,
    ae_title: AeTitleOpt = None,
    tls_cert: Annotated[Path, typer.Option(help="PEM certificate for DICOM TLS. [default: env NEURON_TLS_CERT]",
                                           show_default=False)] = None,
    tls_key: Annotated[Path, typer.Option(help="PEM key of --tls-cert. [default: env NEURON_TLS_KEY]",
                                          show_default=False)] = None,
    tls_ca: Annotated[Path, typer.Option(help="PEM certificates that sign the destinations' certificates. "
                                              "[default: env NEURON_TLS_CA]", show_default=False)] = None,
    db: DbOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder whose neuron.db to read. [default: "
                                                          "./results; env NEURON_OUT]")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log each round (INFO).")] = False,
) -> None:
    """Deliver the DICOM outputs still waiting (pending), and with --failed the failed ones too, by C-STORE; exit 3
    when some could not be delivered."""
    from neuron.dicomnet import Peer
    from worker.send import send_again

    _logging(verbose)
    try:
        settings = Settings.from_env(database_url=db, out_dir=out, ae_title=ae_title, tls_cert=tls_cert,
                                     tls_key=tls_key, tls_ca=tls_ca)
        destinations = [str(Peer.parse(t, "--to")) for t in to] if to else None
    except NeuronError as exc:
        raise _fail(str(exc), EXIT_USAGE) from None
    _open_database(settings).dispose()
    try:
        again, delivered, failed_now, left = send_again(settings, failed, destinations, wait)
    except NeuronError as exc:
        raise _fail(str(exc), EXIT_SETUP) from None
    console.print(f"{again} failed deliveries back in line; {delivered} delivered, {failed_now} failed, {left} "
                  "still pending")
    raise typer.Exit(EXIT_SOME_FAILED if failed_now or left else EXIT_OK)


def _enqueue_logged(database, celery_app, studies: dict[str, float]) -> int:
    """Enqueue every pending instance, logging one line per study (its position, never its UID) as it goes."""
    from producer.enqueue import enqueue_pending

    sent = 0
    for n, study in enumerate(sorted(studies), 1):
        tasks = enqueue_pending(database, celery_app, study_uids={study})
        console.print(f"enqueued study {n} of {len(studies)} ({tasks} tasks)")
        sent += tasks
    studies.clear()
    return sent + enqueue_pending(database, celery_app)


def _open_database(settings: Settings):
    """The results database for reading, or exit 4 saying what could not be opened and how to point at it."""
    from sqlalchemy import text
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import SQLAlchemyError

    from db.store import Database
    from neuron.queue import mask_url

    url = settings.resolved_database_url
    shown = mask_url(url)
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite" and parsed.database and not Path(parsed.database).is_file():
        origin = "--db or NEURON_DATABASE_URL" if settings.database_url else "NEURON_OUT or the default ./results"
        raise _fail(f"no Neuron database at {parsed.database} (from {origin}): "
                    f"screen a folder first (`neuron run FOLDER --out OUT`), or point --db or NEURON_DATABASE_URL at "
                    f"your database", EXIT_SETUP)
    database = Database(url)
    try:
        with database.engine.connect() as conn:
            conn.execute(text("select count(*) from instances")).scalar_one()
    except SQLAlchemyError as exc:
        database.dispose()
        first = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        raise _fail(f"cannot read the Neuron tables in {shown}: {first}; check the URL (--db or NEURON_DATABASE_URL) "
                    f"and that the server is up, then run `neuron db upgrade --db URL`", EXIT_SETUP) from None
    return database


def _gather_status(settings: Settings, database) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    from db.admin import db_status, throughput
    from neuron.queue import (
        broker_status,
        held_by_no_live_worker,
        mask_url,
        tasks_held_by_live_workers,
        unacknowledged_tasks,
    )

    st = db_status(database)
    rate = throughput(database)
    before = unacknowledged_tasks(settings)
    with ThreadPoolExecutor(2) as pool:
        asked = pool.submit(broker_status, settings, sorted(r.value for r in MODEL_ROUTES))
        held = tasks_held_by_live_workers(settings, timeout=1.5) if before else set()
        broker = asked.result()
    orphans = held_by_no_live_worker(before, unacknowledged_tasks(settings), held, settings.visibility_timeout)
    worker_rate = sum(w.get("images_per_s") or 0.0 for w in broker.workers.values())
    per_s = worker_rate or rate.per_second
    eta = st.remaining_instances / per_s if per_s and st.remaining_instances else None
    return {
        "database": mask_url(settings.resolved_database_url),
        "broker": broker.url, "broker_error": broker.error,
        "queues": broker.waiting, "unacknowledged": broker.unacknowledged,
        "oldest_unacknowledged_s": broker.oldest_unacknowledged_s, "visibility_timeout_s": settings.visibility_timeout,
        "workers": broker.workers, "held_by_no_live_worker": orphans,
        "studies": st.studies, "instances": st.instances, "files": st.files,
        "in_flight": {"studies": st.in_flight_studies, "instances": st.in_flight_instances},
        "remaining_instances": st.remaining_instances,
        "images_per_s": rate.per_second, "images_per_s_window": {"frames": rate.frames, "seconds": rate.seconds},
        "eta_s": eta,
        "failures_by_reason": [{"reason": r, "instances": n} for r, n in st.failures_by_reason],
        "network": _network_status(database),
    }


def _network_status(database) -> dict | None:
    from sqlalchemy.exc import SQLAlchemyError

    from db.network import network_status

    try:
        return network_status(database)
    except SQLAlchemyError:  # a database from before the network tables: `neuron db upgrade` adds them
        return None


def _status_view(data: dict):
    from rich.console import Group

    table = Table(title="neuron status", show_header=True)
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("database", data["database"])
    table.add_row("broker", data["broker"])
    if data["broker_error"]:
        table.add_row("broker problem", data["broker_error"])
    for q, n in data["queues"].items():
        table.add_row(f"queue {q} (waiting messages)", str(n))
    unacked = str(data["unacknowledged"])
    if data["oldest_unacknowledged_s"] is not None:
        unacked += (f" (oldest {data['oldest_unacknowledged_s']:.0f} s; a dead worker's are redelivered after "
                    f"{data['visibility_timeout_s']} s)")
    table.add_row("unacknowledged messages (held by workers)", unacked)
    dead = data["held_by_no_live_worker"]
    if dead is None:
        table.add_row("held by no live worker", "unknown (broker or workers could not be asked)")
    elif dead["studies"]:
        table.add_row("held by no live worker (a dead worker's)",
                      f"{dead['studies']} study tasks, {dead['instances']} instances; redelivered once "
                      f"{data['visibility_timeout_s']} s old (NEURON_VISIBILITY_TIMEOUT), in "
                      f"{dead['redelivered_in_s']:.0f} s")
    else:
        table.add_row("held by no live worker", "0")
    table.add_row("in flight (claimed by a worker)",
                  f"{data['in_flight']['studies']} studies, {data['in_flight']['instances']} instances")
    for kind in ("studies", "instances"):
        for st in STATUS_ORDER:
            if st in data[kind]:
                table.add_row(f"{kind} {st}", str(data[kind][st]))
    rate = data["images_per_s"]
    table.add_row("images/s (last 5 min)", "n/a (fewer than two commits)" if rate is None else f"{rate:.2f}")
    eta = data["eta_s"]
    table.add_row("ETA", "n/a" if eta is None else f"{eta / 60:.1f} min for {data['remaining_instances']} instances")
    workers = Table(title=f"workers alive: {len(data['workers'])}", show_header=True)
    for col in ("node", "device", "batch size", "images", "images/s", "up"):
        workers.add_column(col)
    for node, w in data["workers"].items():
        workers.add_row(node, str(w.get("device")), str(w.get("batch_size")), str(w.get("images")),
                        str(w.get("images_per_s")), f"{w.get('up_s', 0):.0f} s")
    _network_rows(table, data.get("network"))
    failures = Table(title="latest failures by reason", show_header=True)
    failures.add_column("instances", justify="right")
    failures.add_column("reason")
    for f in data["failures_by_reason"]:
        failures.add_row(str(f["instances"]), f["reason"])
    return Group(table, workers, failures)


STATUS_ORDER = ("pending", "queued", "done", "failed", "skipped", "duplicate")


def _network_rows(table, network: dict | None) -> None:
    """neuron listen / pull / --send-to in the status table: receiving in the last hour, pulls, deliveries."""
    if not network:
        return
    receiving = network.get("receiving") or {}
    for caller, r in receiving.get("by_caller", {}).items():
        table.add_row(f"received from {caller} (last hour)",
                      f"{r['instances']} instances, {r['bytes'] / 1e6:.1f} MB in {r['associations']} associations; "
                      f"{r['refused']} refused, {r['rejected']} associations rejected")
    if receiving.get("last_refusal"):
        table.add_row("last refusal", receiving["last_refusal"])
    for source, counts in network.get("pulls", {}).items():
        table.add_row(f"pulled from {source} (studies)", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for destination, counts in network.get("deliveries", {}).items():
        table.add_row(f"deliveries to {destination}", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if network.get("last_delivery_error"):
        table.add_row("last failed delivery", network["last_delivery_error"])


@app.command()
def status(
    db: DbOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder whose neuron.db to read. [default: "
                                                          "./results; env NEURON_OUT]")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the numbers as one JSON object.")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="A live view, refreshed every --interval seconds.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes of --watch.")] = 2.0,
    count: Annotated[int, typer.Option(help="With --watch: stop after this many refreshes (0: until Ctrl-C). "
                                            "Without a terminal each refresh is printed in full, for a log.",
                                       min=0)] = 0,
) -> None:
    """Queue depth, unacknowledged and in-flight studies, workers alive, studies and instances by status (pending,
    queued, done, failed, skipped, duplicate), images/s, ETA and the latest failures by reason."""
    import json
    import time

    try:
        settings = Settings.from_env(database_url=db, out_dir=out)
    except NeuronError as exc:
        raise _fail(str(exc), EXIT_USAGE) from None
    database = _open_database(settings)
    if as_json:
        print(json.dumps(_gather_status(settings, database), indent=2, sort_keys=True))
        return
    if not watch:
        Console(width=max(160, shutil.get_terminal_size().columns)).print(_status_view(_gather_status(settings,
                                                                                                      database)))
        return
    from itertools import count as refreshes

    from rich.live import Live

    screen = Console(width=max(160, shutil.get_terminal_size().columns))
    frames = refreshes(1) if count == 0 else range(1, count + 1)
    try:
        if not screen.is_terminal:  # a pipe or a log: every refresh in full, one after the other
            for n in frames:
                if n > 1:
                    time.sleep(interval)
                screen.print(_status_view(_gather_status(settings, database)))
            return
        with Live(_status_view(_gather_status(settings, database)), console=screen, refresh_per_second=1) as live:
            for n in frames:
                if n > 1:
                    time.sleep(interval)
                    live.update(_status_view(_gather_status(settings, database)))
    except KeyboardInterrupt:
        pass


StudyOpt = Annotated[str, typer.Option("--study", help="A Study Instance UID.")]
SeriesOpt = Annotated[str, typer.Option("--series", help="A Series Instance UID.")]
FolderOpt = Annotated[Path, typer.Option("--folder", help="Every file under this folder (as indexed).")]
ModelOpt = Annotated[str, typer.Option("--model", help="Results of this model (registry name, see `neuron models`).")]
WeightsOpt = Annotated[str, typer.Option("--weights-id", help="With --model: only results of these weights (sha256 "
                                                              "or its first characters, or 'untrained').")]


def _selection(settings: Settings, study, series, folder, model, weights_id, reason=None):
    from db.admin import Selection

    shared = settings.to_shared(str(folder.resolve())) if folder is not None else None
    try:
        return Selection(study=study, series=series, folder=shared, model=model, weights=weights_id, reason=reason)
    except ValueError as exc:
        raise _fail(str(exc), EXIT_USAGE) from None


def _remove_heatmaps(settings: Settings, paths: set[str]) -> int:
    removed = 0
    for p in paths:
        try:
            Path(settings.to_local(p)).unlink()
            removed += 1
        except FileNotFoundError:
            pass
    return removed


@app.command()
@screening_options
def rescreen(
    study: StudyOpt = None,
    series: SeriesOpt = None,
    folder: FolderOpt = None,
    model: ModelOpt = None,
    weights_id: WeightsOpt = None,
    reason: Annotated[str, typer.Option("--reason", help="Failed instances whose reason contains this text.")] = None,
    db: DbOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (heatmaps/, .cache/). [default: ./results; "
                                                          "env NEURON_OUT]")] = None,
    enqueue: Annotated[bool, typer.Option("--enqueue", help="Distributed mode: send the instances to the workers "
                                                            "instead of screening them here; their results are "
                                                            "replaced as each one finishes.")] = False,
    *,
    screening: dict,
) -> None:
    """Screen selected instances again (a study, a series, a folder, a model's results or a failure reason): each
    instance's results are replaced in one transaction and the heatmaps of its old results are removed."""
    from db.admin import queue_again, replace_results, select_instances, work_items

    try:
        settings = Settings.from_env(database_url=db, out_dir=out, **screening)
    except NeuronError as exc:
        raise _fail(str(exc), EXIT_USAGE) from None
    selection = _selection(settings, study, series, folder, model, weights_id, reason)
    database = _open_database(settings)
    uids = select_instances(database, selection)
    if not uids:
        console.print("nothing matches the selection; nothing changed")
        return
    if enqueue:
        from neuron.queue import make_app
        from producer.enqueue import enqueue_pending

        queue_again(database, uids)
        sent = enqueue_pending(database, make_app(settings))
        console.print(f"{len(uids)} instances back in line, {sent} study tasks enqueued")
        return
    _warn_untrained(settings)
    _use_cache_dir(settings.resolved_cache_dir)
    engine = _load_engine(settings)
    _start_metrics(settings, engine)
    dicom = None
    if settings.dicom_out is not None:  # checked before screening: an unwritable folder stops here
        from worker.dicom_out import DicomWriter

        try:
            dicom = DicomWriter(settings, database)
        except NeuronError as exc:
            raise _fail(str(exc), EXIT_SETUP) from None
    for lr in engine.routes.values():
        database.ensure_config(lr.spec.config_hash, lr.spec.model, lr.spec.as_dict())
    items = work_items(database, uids)
    outcomes = []
    engine.run(iter(items), outcomes.append)
    final = [o for o in outcomes if o.status.value != "pending"]
    stale = replace_results(database, final)
    removed = _remove_heatmaps(settings, stale)
    console.print(f"rescreened {len(final)} of {len(uids)} selected instances "
                  f"({len(uids) - len(items)} without a route, {len(outcomes) - len(final)} unreadable for now and "
                  f"left as they were); {removed} old heatmaps removed")
    if dicom is not None:  # the new results' DICOM outputs replace the old ones (same files, new UIDs)
        from worker.send import sending

        with sending(settings):
            written = dicom.write_for_instances([o.sop_instance_uid for o in final if o.status.value == "done"])
        console.print(f"DICOM outputs: {len(written.written)} written to {settings.dicom_out}, "
                      f"{len(written.failed)} not written (reasons logged)")
    failed = sum(1 for o in final if o.status.value == "failed")
    raise typer.Exit(EXIT_SOME_FAILED if failed else EXIT_OK)


@app.command()
def purge(
    study: StudyOpt = None,
    folder: FolderOpt = None,
    model: ModelOpt = None,
    weights_id: WeightsOpt = None,
    db: DbOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder. [default: ./results; env NEURON_OUT]")
                   ] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Delete without asking.")] = False,
) -> None:
    """Delete results (and their heatmaps) of a study, a folder or an old model version (--model with --weights-id).
    The instances stay indexed; `neuron rescreen` screens them again."""
    from db.admin import purge_results, select_instances

    try:
        settings = Settings.from_env(database_url=db, out_dir=out)
    except NeuronError as exc:
        raise _fail(str(exc), EXIT_USAGE) from None
    selection = _selection(settings, study, None, folder, model, weights_id)
    database = _open_database(settings)
    uids = select_instances(database, selection)
    if not uids:
        console.print("nothing matches the selection; nothing deleted")
        return
    if not yes and not typer.confirm(f"delete the selected results of {len(uids)} instances?"):
        raise typer.Exit(EXIT_OK)
    deleted, maps = purge_results(database, selection, uids)
    removed = _remove_heatmaps(settings, maps)
    console.print(f"deleted {deleted} result rows of {len(uids)} instances and {removed} heatmaps")


@app.command()
def review(
    port: Annotated[int, typer.Option(help="TCP port to serve on.")] = 8080,
    host: Annotated[str, typer.Option(help="Address to bind. Anything but loopback lets other machines reach the "
                                           "page: reading then needs the token too, and a TLS proxy belongs in "
                                           "front.")] = "127.0.0.1",
    db: DbOpt = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder whose neuron.db and heatmaps/ to show. "
                                                          "[default: ./results; env NEURON_OUT]")] = None,
    heatmap_dir: Annotated[Path, typer.Option("--heatmap-dir", help="The heatmap folder; only files inside it are "
                                                                    "served. [default: OUT/heatmaps; env "
                                                                    "NEURON_HEATMAP_DIR]")] = None,
) -> None:
    """Serve the morning review in a browser: a worklist of screened studies (highest finding first, filters, paging),
    a study page with heatmaps, provenance and a verdict per finding, and a summary page. Reading needs no login on
    loopback; recording verdicts needs the token in NEURON_REVIEW_TOKEN (unset: read-only), and so does reading on
    any other address."""
    import uvicorn
    from sqlalchemy import text
    from sqlalchemy.exc import SQLAlchemyError

    from review.app import create_app, is_loopback

    try:
        settings = Settings.from_env(database_url=db, out_dir=out, heatmap_root=heatmap_dir)
    except NeuronError as exc:
        raise _fail(str(exc), EXIT_USAGE) from None
    token = os.environ.get("NEURON_REVIEW_TOKEN", "").strip() or None
    private = not is_loopback(host)
    if private and token is None:
        raise _fail(f"--host {host} lets other machines reach the findings, so reading needs a token too and "
                    "NEURON_REVIEW_TOKEN is unset: set it to a long random value (python3 -c 'import secrets; "
                    "print(secrets.token_urlsafe(24))') and give it to the reviewers, or bind 127.0.0.1", EXIT_SETUP)
    database = _open_database(settings)
    try:
        with database.engine.connect() as conn:
            conn.execute(text("select count(*) from studies")).scalar_one()
    except SQLAlchemyError:
        database.dispose()
        raise _fail("this database has no studies table yet (an older schema): run `neuron db upgrade` with the same "
                    "--db/--out once, then start the review again", EXIT_SETUP) from None
    if private:
        console.print(Panel(f"binding {host}: other machines reach this page; every page needs the review token "
                            "(sign-in), and the token crosses the network in clear text without TLS: put a reverse "
                            "proxy with TLS in front, or bind 127.0.0.1.", title="WARNING", style="bold yellow"))
    if token is None:
        console.print("read-only: set NEURON_REVIEW_TOKEN to record verdicts")
    elif len(token) < 16:
        console.print("[yellow]NEURON_REVIEW_TOKEN is shorter than 16 characters; use a long random one[/]")
    if not settings.heatmap_dir.is_dir():
        console.print(f"[yellow]no heatmap folder at {settings.heatmap_dir}[/]: pages show no heatmaps; point "
                      f"--heatmap-dir or NEURON_HEATMAP_DIR at it")
    console.print(f"Neuron review of {database.engine.url.render_as_string(hide_password=True)} at "
                  f"http://{host}:{port}/  (Ctrl+C stops it)")
    uvicorn.run(create_app(database, settings, token, private=private), host=host, port=port, log_level="warning",
                server_header=False)


@app.command()
def export(
    output: Annotated[Path, typer.Option("--output", "-o", help="File to write; the format follows its suffix: .csv "
                                                                "or .parquet.")],
    where: Annotated[str, typer.Option("--where", help="SQL condition over the view's columns, e.g. \"label = "
                                                       "'Effusion' and probability > 0.7\". [default: every row]",
                                       show_default=False)] = None,
    view: Annotated[str, typer.Option("--view", help="findings, study_findings, ingest_status or reviews.")
                    ] = "findings",
    db: DbOpt = None,
    out: Annotated[Path, typer.Option("--out", help="Output folder whose neuron.db to read. [default: ./results; "
                                                    "env NEURON_OUT]")] = None,
) -> None:
    """Export a view's rows that match --where to CSV or Parquet: the same rows as `SELECT * FROM VIEW WHERE (...)`,
    streamed, read-only (the condition cannot write), typed (floats, UTC timestamps, booleans)."""
    from db.export import ExportRefused, check_condition, output_format
    from db.export import export as export_view

    try:
        output_format(output)
        if where is not None:
            check_condition(where)
        settings = Settings.from_env(database_url=db, out_dir=out)
    except NeuronError as exc:
        raise _fail(str(exc), EXIT_USAGE) from None
    database = _open_database(settings)
    database.dispose()
    try:
        rows = export_view(settings.resolved_database_url, view, where, output)
    except ExportRefused as exc:
        raise _fail(str(exc), EXIT_USAGE) from None
    console.print(f"wrote {rows} rows of {view} to {output}")


def _start_metrics(settings: Settings, engine):
    """Serve Prometheus /metrics for this run (--metrics-port), or exit 4 saying why the port cannot be opened."""
    from worker.metrics import start

    try:
        server = start(settings, engine)
    except SetupError as exc:
        raise _fail(str(exc), EXIT_SETUP) from None
    if server is not None:
        console.print(f"Prometheus metrics at {server.url}")
    return server


@app.command()
def samples(dest: Annotated[Path, typer.Argument(help="Folder to copy the sample DICOMs into.")] = Path("samples")
            ) -> None:
    """Copy real sample DICOMs shipped by pydicom and pydicom-data (CR chest radiographs, MR, US, ...) into DEST."""
    from neuron.sample_data import copy_samples

    n = copy_samples(dest)
    console.print(f"copied {n} sample files into {dest}")


@app.command()
def models(model_dir: Annotated[Path, typer.Option(help="Folder of fine-tuned checkpoints.")] = None) -> None:
    """List the model registry: name, route, classes, TTA views and the status of its weights."""
    from neuron_models.checkpoint import find_checkpoints
    from neuron_models.registry import list_models

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


def main() -> None:  # pragma: no cover
    sys.exit(app())


@app.command()
def bench(
    n: Annotated[int, typer.Option("--n", help="Images per synthetic archive.")] = 256,
    size: Annotated[int, typer.Option(help="Image side in pixels (real CRs are about 2000).")] = 2000,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per model batch (default: 16 CPU, 128 CUDA).")] = None,
    precision: Annotated[str, typer.Option(help="fp32 (exact) or a fast mode (bf16, fp16) where the build has it.")
                         ] = "fp32",
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
    keep: Annotated[bool, typer.Option("--keep", help="Keep this run's scratch (databases, PNGs, worker log).")
                    ] = False,
) -> None:
    """Measure throughput on a deterministic synthetic CR archive: model-only and decode-only bounds, and end to end
    (embedded; Celery with one worker), in one run. Writes JSON under OUT and a row per result to BENCHMARKS.md."""
    from neuron.errors import ConfigError

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from neuron.synthetic import default_workdir

    workdir = workdir or default_workdir()
    _keep_caches_inside(workdir)
    from worker.bench import BenchConfig, run_bench

    def split(text: str) -> tuple[str, ...]:
        return tuple(p.strip() for p in text.split(",") if p.strip())

    try:
        cfg = BenchConfig(n=n, size=size, device=device, batch_size=batch_size, precision=precision,
                          archives=split(archives), modes=split(modes), out=out, workdir=workdir,
                          append=not no_append, seed=seed, concurrency=concurrency, keep=keep)
    except (ConfigError, ValueError) as exc:
        raise _fail(str(exc), EXIT_USAGE) from None
    try:
        results = run_bench(cfg, say=console.print)
    except NeuronError as exc:
        raise _fail(str(exc), EXIT_SETUP) from None
    table = Table(title=f"neuron bench: {results[0]['device'] if results else cfg.device}")
    for col in ("mode", "archive", "images", "model-only img/s", "decode img/s", "end-to-end img/s", "ratio",
                "batch fill"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(r["mode"], r["archive"], str(r["n_images"]), str(r["model_only_images_per_s"]),
                      str(r["decode_images_per_s"]), str(r["end_to_end_images_per_s"]), str(r["ratio"]),
                      str(r["batch_fill"]))
    Console().print(table)
