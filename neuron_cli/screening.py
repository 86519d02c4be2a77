"""Screening in this process: ``neuron run`` (a folder, embedded) and ``neuron rescreen`` (selected instances again).

Each command reads its settings, loads the models and hands over to a service function in ``worker.embedded``
(``run_folder``, ``rescreen``); what it prints is the service's report.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from neuron.errors import NeuronError
from neuron.routes import PopulationPolicy
from neuron.settings import Settings, apply_cache_environment
from neuron.work import POSITIVE, Route
from neuron_cli.common import (
    AUDIT_TRAIL,
    EXIT_OK,
    EXIT_SETUP,
    EXIT_SOME_FAILED,
    EXIT_USAGE,
    DbOpt,
    Rate,
    cli_actor,
    console,
    fail,
    load_models,
    open_database,
    settings_from_env,
    start_metrics,
    warn_untrained,
)
from neuron_cli.options import screening_options

RETRY_FAILED_HELP = "Screen failed instances again, with a fresh attempt count (after fixing the cause)."
PATIENT_KEY_HELP = ("Keep each study's Patient ID as HMAC-SHA256 under the secret in NEURON_PATIENT_KEY, so one "
                    "patient's studies can be grouped without storing who it is. [default: off: no patient identity "
                    "is stored]")
FollowLinksOpt = Annotated[bool, typer.Option("--follow-links/--no-follow-links", help="Follow symbolic links "
                                              "that leave the folder (loops are still cut, each file indexed "
                                              "once). [default: off; env NEURON_FOLLOW_LINKS]", show_default=False)]
RouteOpt = Annotated[Route, typer.Option(help="Send every file to this route (e.g. skin for JPEG/PNG photos).")]
PopulationPolicyOpt = Annotated[PopulationPolicy, typer.Option(
    "--population-policy", help="A film outside its model's trained population (a child's chest film, a modality "
    "forced onto a route): flag screens it and marks every finding outside_population and needs_review; skip "
    "records it as skipped with the reason. A stated view the model was not trained on (a lateral chest film) is "
    "skipped either way. [default: flag; env NEURON_POPULATION_POLICY]", show_default=False)]


def with_patient_key(settings: Settings, enabled: bool) -> Settings:
    """--patient-key: the secret from NEURON_PATIENT_KEY, or exit 2 saying how to set one."""
    if not enabled:
        return settings
    try:
        return settings.with_patient_key()
    except NeuronError as exc:
        raise fail(str(exc), EXIT_USAGE) from None


@screening_options
def run(
    folder: Annotated[Path, typer.Argument(exists=True, file_okay=False, help="Folder to screen (recursively).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: neuron.db, heatmaps/ and .cache/. "
                                                          "[default: ./results; env NEURON_OUT]")] = None,
    db: Annotated[str, typer.Option("--db", help="SQLAlchemy URL. [default: sqlite:///OUT/neuron.db; env "
                                                 "NEURON_DATABASE_URL]")] = None,
    route: RouteOpt = None,
    follow_links: FollowLinksOpt = None,
    retry_failed: Annotated[bool, typer.Option("--retry-failed", help=RETRY_FAILED_HELP)] = False,
    patient_key: Annotated[bool, typer.Option("--patient-key", help=PATIENT_KEY_HELP)] = False,
    population_policy: PopulationPolicyOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Log what each stage does (INFO level).")] = False,
    *,
    screening: dict,
) -> None:
    """Screen every DICOM file under FOLDER and write findings to a database (embedded: SQLite, one process)."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("pydicom").setLevel(logging.WARNING)  # its plugins log tracebacks of files we record anyway
    settings = settings_from_env(out_dir=out, database_url=db, route_override=route, follow_links=follow_links,
                                 population_policy=population_policy, **screening)
    settings = with_patient_key(settings, patient_key)
    warn_untrained(settings)
    apply_cache_environment(settings.resolved_cache_dir)
    from worker.embedded import ProgressHooks, run_folder
    from worker.pipeline import Pipeline
    from worker.send import sending
    from worker.slots import terminate_cleanly

    # with --route only that route's model; otherwise each route's model loads with its first instance
    pipeline = Pipeline(load_models(settings, only=[route] if route else None, lazy=route is None), settings)
    start_metrics(settings, pipeline)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(),
                        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console)
    # SIGTERM ends the run through Python, so the readers' shared memory is unlinked (worker.slots)
    with terminate_cleanly(), pipeline, sending(settings) as sender, progress:
        scan_task = progress.add_task("indexing", total=None)
        img_task = progress.add_task("screening", total=None, visible=False)
        hooks = ProgressHooks(
            on_scan=lambda n: progress.update(scan_task, completed=n),
            on_total=lambda n: progress.update(img_task, total=n, visible=True),
            on_images=lambda n: progress.advance(img_task, n),
            on_scanned=lambda r: progress.update(scan_task, total=r.seen, completed=r.seen))
        try:
            report = run_folder(folder, settings, pipeline=pipeline, hooks=hooks, retry_failed=retry_failed)
        except NeuronError as exc:
            raise fail(str(exc), EXIT_SETUP) from None
    _print_summary(report, settings)
    _print_deliveries(sender, settings)
    failed = report.summary.files.get("failed", 0)
    raise typer.Exit(EXIT_SOME_FAILED if failed else EXIT_OK)


def _print_deliveries(sender, settings: Settings) -> None:
    """What --send-to delivered (``worker.send.Sender``'s counts), when it was set."""
    if sender is not None:
        console.print(f"deliveries to {', '.join(settings.send_to)}: {sender.delivered} delivered, {sender.failed} "
                      "failed (`neuron status` counts them; `neuron send --failed` tries the failed ones again)")


def review_hint(settings: Settings) -> str:
    """The `neuron review` command that opens these results from any working folder: the database by its URL (the
    password masked) or the output folder by its absolute path. The review finds the heatmaps through the folders
    the run recorded in the database."""
    from neuron.queue import mask_url

    where = f"--db {mask_url(settings.database_url)}" if settings.database_url else \
        f"--out {settings.out_dir.resolve()}"
    return f"neuron review {where}"


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
        console.print(f"top findings this run (rank 1, probability >= {POSITIVE}): " +
                      ", ".join(f"{label} x{n}" for label, n in report.summary.top_findings))
    for path, reason in report.summary.failures:
        console.print(f"[red]failed[/] {path}: {reason}")
    console.print(f"results: {settings.resolved_database_url}  heatmaps: {settings.heatmap_dir}")
    console.print("query: sqlite3 <db> \"select label, probability, file_path from findings where rank = 1\"")
    console.print(f"review in a browser: {review_hint(settings)}   (then open http://127.0.0.1:8080/)")


StudyOpt = Annotated[str, typer.Option("--study", help="A Study Instance UID.")]
SeriesOpt = Annotated[str, typer.Option("--series", help="A Series Instance UID.")]
FolderOpt = Annotated[Path, typer.Option("--folder", help="Every file under this folder (as indexed).")]
ModelOpt = Annotated[str, typer.Option("--model", help="Results of this model (registry name, see `neuron models`).")]
WeightsOpt = Annotated[str, typer.Option("--weights-id", help="With --model: only results of these weights (sha256 "
                                                              "or its first characters, or 'untrained').")]


def selection(settings: Settings, study, series, folder, model, weights_id, reason=None):
    """The instances an operator names (``db.admin.Selection``), or exit 2 saying what to name."""
    from db.admin import Selection

    shared = settings.to_shared(str(folder.resolve())) if folder is not None else None
    try:
        return Selection(study=study, series=series, folder=shared, model=model, weights=weights_id, reason=reason)
    except ValueError as exc:
        raise fail(str(exc), EXIT_USAGE) from None


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
    from db.admin import select_instances, select_studies

    settings = settings_from_env(database_url=db, out_dir=out, **screening)
    chosen = selection(settings, study, series, folder, model, weights_id, reason)
    database = open_database(settings, needs=AUDIT_TRAIL)
    uids = select_instances(database, chosen)
    if not uids:
        console.print("nothing matches the selection; nothing changed")
        return
    from db import audit

    audit.record(database, *(audit.Event(cli_actor(), audit.Action.RESCREEN, study, target=chosen.describe(),
                                         detail=f"{n} instances {'enqueued' if enqueue else 'screened here'}")
                             for study, n in select_studies(database, uids).items()))
    if enqueue:
        from neuron.queue import make_app
        from neuron.work import Requeue
        from producer.enqueue import enqueue_pending

        again = database.requeue(Requeue.RESCREEN, sop_uids=uids)
        sent = enqueue_pending(database, make_app(settings))
        console.print(f"{len(again)} instances back in line, {sent} study tasks enqueued")
        return
    database.dispose()
    warn_untrained(settings)
    apply_cache_environment(settings.resolved_cache_dir)
    from worker.embedded import rescreen as rescreen_instances
    from worker.pipeline import Pipeline
    from worker.send import sending
    from worker.slots import terminate_cleanly

    pipeline = Pipeline(load_models(settings), settings)
    start_metrics(settings, pipeline)
    try:
        with terminate_cleanly(), pipeline, sending(settings):  # --send-to: the rewritten outputs are delivered
            report = rescreen_instances(uids, settings, pipeline)
    except NeuronError as exc:
        raise fail(str(exc), EXIT_SETUP) from None
    console.print(f"rescreened {report.screened} of {report.selected} selected instances "
                  f"({report.without_route} without a route, {report.left_pending} unreadable for now and "
                  f"left as they were); {report.heatmaps_removed} old heatmaps removed")
    if settings.dicom_out is not None:
        console.print(f"DICOM outputs: {report.dicom_written} written to {settings.dicom_out}, "
                      f"{report.dicom_failed} not written (reasons logged)")
    if settings.fhir_out is not None:
        console.print(f"FHIR outputs: {report.fhir_written} Bundles written to {settings.fhir_out}, "
                      f"{report.fhir_failed} not written (reasons logged)")
    raise typer.Exit(EXIT_SOME_FAILED if report.failed else EXIT_OK)
