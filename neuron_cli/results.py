"""Reading and tidying results: ``neuron review`` (the morning review in a browser), ``neuron export`` (a view to
CSV or Parquet) and ``neuron purge`` (delete results). The work is in ``review.app``, ``db.export`` and
``db.admin``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.panel import Panel

from neuron.errors import NeuronError
from neuron_cli.common import (
    AUDIT_TRAIL,
    EXIT_OK,
    EXIT_SETUP,
    EXIT_USAGE,
    DbOpt,
    cli_actor,
    console,
    fail,
    open_database,
    settings_from_env,
)
from neuron_cli.screening import FolderOpt, ModelOpt, StudyOpt, WeightsOpt, selection


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
    from worker.embedded import remove_heatmaps

    settings = settings_from_env(database_url=db, out_dir=out)
    chosen = selection(settings, study, None, folder, model, weights_id)
    database = open_database(settings, needs=AUDIT_TRAIL)
    uids = select_instances(database, chosen)
    if not uids:
        console.print("nothing matches the selection; nothing deleted")
        return
    if not yes and not typer.confirm(f"delete the selected results of {len(uids)} instances?"):
        raise typer.Exit(EXIT_OK)
    deleted, maps = purge_results(database, chosen, uids, actor=cli_actor())  # audited in the same transaction
    removed = remove_heatmaps(settings, maps)
    console.print(f"deleted {deleted} result rows of {len(uids)} instances and {removed} heatmaps")


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

    from review.app import create_app, is_loopback

    settings = settings_from_env(database_url=db, out_dir=out, heatmap_root=heatmap_dir)
    token = settings.review_token
    private = not is_loopback(host)
    if private and token is None:
        raise fail(f"--host {host} lets other machines reach the findings, so reading needs a token too and "
                    "NEURON_REVIEW_TOKEN is unset: set it to a long random value (python3 -c 'import secrets; "
                    "print(secrets.token_urlsafe(24))') and give it to the reviewers, or bind 127.0.0.1", EXIT_SETUP)
    database = open_database(settings, needs=(("heatmap_folders", "*"), *AUDIT_TRAIL))
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


def export(
    output: Annotated[Path, typer.Option("--output", "-o", help="File to write; the format follows its suffix: .csv, "
                                                                ".parquet, .json (a FHIR Bundle) or .ndjson (FHIR "
                                                                "resources, one a line).")],
    where: Annotated[str, typer.Option("--where", help="SQL condition over the view's columns, e.g. \"label = "
                                                       "'Effusion' and probability > 0.7\". [default: every row]",
                                       show_default=False)] = None,
    view: Annotated[str, typer.Option("--view", help="findings, study_findings, ingest_status or reviews (FHIR: "
                                                     "findings).")] = "findings",
    fmt: Annotated[str, typer.Option("--format", help="csv, parquet or fhir; must agree with the suffix. "
                                                      "[default: from the suffix]", show_default=False)] = None,
    db: DbOpt = None,
    out: Annotated[Path, typer.Option("--out", help="Output folder whose neuron.db to read. [default: ./results; "
                                                    "env NEURON_OUT]")] = None,
) -> None:
    """Export a view's rows that match --where to CSV or Parquet: the same rows as `SELECT * FROM VIEW WHERE (...)`,
    streamed, read-only (the condition cannot write), typed (floats, UTC timestamps, booleans). With --format fhir
    (or a .json / .ndjson file): the positive findings among those rows as FHIR R4 Observations, with an
    ImagingStudy per study and a Device per model (README "Findings as FHIR")."""
    from db.export import ExportRefused, check_condition, export_format
    from db.export import export as export_view

    try:
        chosen = export_format(output, fmt)
        if where is not None:
            check_condition(where)
    except NeuronError as exc:
        raise fail(str(exc), EXIT_USAGE) from None
    from db import audit
    from db import fhir as fhir_export

    settings = settings_from_env(database_url=db, out_dir=out)
    database = open_database(settings, needs=AUDIT_TRAIL)
    try:
        try:
            if chosen == "fhir":
                report = fhir_export.export(settings.resolved_database_url, where, output, view)
                said = (f"{report.resources} FHIR resources ({report.observations} observations of "
                        f"{report.studies} studies, {report.devices} devices)")
                if report.unplaced:
                    console.print(f"[yellow]{report.unplaced} positive findings of instances indexed without a "
                                  f"Study Instance UID left out[/]: FHIR places a finding in its study; fix the "
                                  f"headers at the source and rescan to include them")
            else:
                said = f"{export_view(settings.resolved_database_url, view, where, output)} rows of {view}"
        except ExportRefused as exc:
            raise fail(str(exc), EXIT_USAGE) from None
        audit.record(database, audit.Event(cli_actor(), audit.Action.EXPORT,
                                           target=f"view={view} where={where or ''} format={chosen}",
                                           detail=f"{said} to {output.resolve()}"))
    finally:
        database.dispose()
    console.print(f"wrote {said} to {output}")
