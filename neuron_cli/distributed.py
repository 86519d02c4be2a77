"""The distributed mode's commands: ``neuron scan`` (index and enqueue, or watch a folder) and ``neuron worker``
(a Celery GPU worker). The work is done by ``producer`` (scan, enqueue, watch) and ``worker.service``."""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from neuron.errors import NeuronError, RetryableError, SetupError
from neuron.routes import MODEL_ROUTES
from neuron.settings import Settings, WeightsMode, apply_cache_environment
from neuron.work import Requeue
from neuron_cli.common import EXIT_SETUP, DbOpt, console, fail, settings_from_env
from neuron_cli.options import screening_options
from neuron_cli.screening import (
    PATIENT_KEY_HELP,
    RETRY_FAILED_HELP,
    FollowLinksOpt,
    PopulationPolicyOpt,
    RouteOpt,
    with_patient_key,
)


def worker_places(settings: Settings, out_given: bool) -> Settings:
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
        raise fail(f"the worker has no output folder (--out or NEURON_OUT) and would write into {Path.cwd()}; "
                   f"{'; '.join(missing)}; or set NEURON_OUT to a folder for both", EXIT_SETUP)
    if settings.cache_dir is None:
        settings = settings.with_(cache_dir=settings.user_cache_dir)
        console.print(f"caches in {settings.cache_dir} (no --out/NEURON_OUT or --cache-dir/NEURON_CACHE_DIR given)")
    return settings


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
    settings = settings_from_env(out_dir=out, database_url=db, max_wait_ms=max_wait_ms,
                                 worker_concurrency=concurrency, **screening)
    settings = worker_places(settings, out_given=out is not None or settings.out_from_env)
    if settings.weights is WeightsMode.UNTRAINED:
        console.print("[bold yellow]WARNING: --weights untrained: results are marked untrained and mean nothing "
                      "clinically.[/]")
    apply_cache_environment(settings.resolved_cache_dir)
    from worker.send import sending
    from worker.service import run_worker

    try:
        with sending(settings, wait_s=10.0):  # --send-to; what is left after 10 s goes with the next sender
            run_worker(settings, [q.strip() for q in queues.split(",") if q.strip()], settings.worker_concurrency,
                       loglevel, name=name)
    except (SetupError, RetryableError) as exc:
        raise fail(str(exc), EXIT_SETUP) from None


def scan(
    folder: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="Folder to index and enqueue.")],
    db: DbOpt = None,
    watch: Annotated[bool, typer.Option("--watch", help="Keep watching for new files until stopped (SIGTERM or "
                                                        "Ctrl-C enqueues what was indexed, then exits).")] = False,
    poll: Annotated[bool, typer.Option("--poll", help="Polling observer (network shares).")] = False,
    stable_seconds: Annotated[float, typer.Option(help="A file is complete once unchanged this long.")] = 2.0,
    quiet_seconds: Annotated[float, typer.Option(help="Enqueue a study once no file arrived this long.")] = 5.0,
    route: RouteOpt = None,
    requeue: Annotated[bool, typer.Option(
        "--requeue", help="Send again instances already queued (after a broker lost its queue) and instances "
        "skipped while their route had no model.")] = False,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help=RETRY_FAILED_HELP)] = False,
    follow_links: FollowLinksOpt = None,
    patient_key: Annotated[bool, typer.Option("--patient-key", help=PATIENT_KEY_HELP)] = False,
    population_policy: PopulationPolicyOpt = None,
) -> None:
    """Producer: index DICOM headers into the database and enqueue one task per study (IDs only)."""
    from db.store import Database
    from neuron.queue import make_app, mask_url
    from producer.enqueue import EnqueueAsIndexed, enqueue_pending
    from producer.scan import index_folder
    from producer.watch import FolderWatcher

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = settings_from_env(database_url=db, watch_stable_seconds=stable_seconds,
                                 watch_quiet_seconds=quiet_seconds, route_override=route, follow_links=follow_links,
                                 population_policy=population_policy)
    settings = with_patient_key(settings, patient_key)
    database = Database(settings.resolved_database_url)
    try:
        database.create()
    except NeuronError as exc:
        raise fail(str(exc), EXIT_SETUP) from None
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
        as_indexed = EnqueueAsIndexed(database, celery_app)
        result = index_folder(folder, database, exclude=[settings.out_dir], route_override=route,
                              on_file=lambda n: progress.update(task, completed=n), on_indexed=as_indexed,
                              follow_links=settings.follow_links, patient_secret=settings.patient_key,
                              policy=settings.population_policy, to_shared=settings.to_shared)
    again = 0
    if requeue:
        again += len(database.requeue(Requeue.AWAITING_MODEL, routes=MODEL_ROUTES))
        again += len(database.requeue(Requeue.LOST_MESSAGE, routes=MODEL_ROUTES))
    if retry_failed:
        again += len(database.requeue(Requeue.RETRY_FAILED, routes=MODEL_ROUTES))
    try:
        sent = as_indexed.sent + enqueue_pending(database, celery_app)
    except NeuronError as exc:  # the broker never came up: what was indexed stays pending for the next scan
        raise fail(str(exc), EXIT_SETUP) from None
    console.print(f"scanned {result.seen} files ({result.unchanged} unchanged), indexed {result.indexed}, "
                  f"{again} instances back in line, enqueued {sent} study tasks")


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
