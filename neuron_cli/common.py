"""What every command shares: the console, exit codes, the failure message, the database options and opening a
database for reading, loading models, the metrics endpoint.

Exit codes: 0 every file was screened or deliberately skipped; 3 the run finished but some files failed (their
reasons are in ``ingest_status``); 4 the run could not start (weights, settings, database); 2 usage errors.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.panel import Panel
from rich.progress import TextColumn

from neuron.errors import NeuronError, SetupError
from neuron.settings import Settings, WeightsMode
from neuron.webclient import WebPeer, access_for, environment_access, is_web

EXIT_OK, EXIT_USAGE, EXIT_SOME_FAILED, EXIT_SETUP = 0, 2, 3, 4

console = Console(stderr=True)

# the database option of every command that reads or writes one (run and worker have their own defaults)
DbOpt = Annotated[str, typer.Option("--db", help="SQLAlchemy URL. [default: env NEURON_DATABASE_URL, else "
                                                 "sqlite:///OUT/neuron.db]")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder whose neuron.db to read. [default: "
                                                          "./results; env NEURON_OUT]")]


def fail(message: str, code: int) -> typer.Exit:
    console.print(f"[bold red]error:[/] {message}")
    return typer.Exit(code)


def settings_from_env(code: int = EXIT_USAGE, **overrides) -> Settings:
    """Settings from the flags and the environment, or the command's exit with the setting's message. The access to
    each DICOMweb destination (credentials, peers file, certificates) is checked here too, before any model loads."""
    try:
        settings = Settings.from_env(**overrides)
        if any(is_web(d) for d in settings.send_to):
            default, peers = environment_access(settings)
            for destination in settings.send_to:
                if is_web(destination):
                    access_for(WebPeer.parse(destination, "--send-to"), default, peers)
        return settings
    except NeuronError as exc:
        raise fail(str(exc), code) from None


def warn_untrained(settings: Settings) -> None:
    if settings.weights is WeightsMode.UNTRAINED:
        console.print(Panel("[bold]--weights untrained[/]: the models have random (seeded) weights. Every result is "
                            "marked [bold]untrained[/] and means NOTHING clinically. Use for tests and demos only.",
                            title="WARNING", style="bold yellow"))


def cli_actor():
    """Who runs this command, for the audit trail (``db.audit.process_actor``)."""
    from db.audit import process_actor

    return process_actor("cli")


def load_models(settings: Settings, only=None, lazy: bool = False, references: bool = True):
    """The models of ``only`` these routes; ``lazy``: each route's model loads when its first instance arrives, so
    no route's weights are needed (or checked) unless the folder holds work for it. ``references``: load the routes'
    out-of-distribution references (a mismatched one stops the command here)."""
    from worker.models import Models

    try:
        with console.status("loading models..."):
            models = Models.from_settings(settings, only=only, lazy=lazy, references=references)
    except SetupError as exc:
        raise fail(str(exc), EXIT_SETUP) from None
    loaded = ", ".join(f"{r.value}={lr.spec.model} ({lr.model.weights_id[:12]})" for r, lr in models.routes.items())
    later = ", ".join(r.value for r in models.available_routes if r in models.loadable)
    from worker.models import default_batch_size

    batch = settings.batch_size or default_batch_size(models.device)
    console.print(f"device [bold]{models.device}[/], batch size {batch}, models: {loaded or 'none yet'}"
                  + (f"; loaded when their first instance arrives: {later}" if later else ""))
    for r, why in models.unavailable.items():
        console.print(f"[yellow]route {r.value} unavailable[/]: {why}")
    for r, lr in models.routes.items():
        if lr.reference is None and references:
            console.print(f"route {r.value}: no out-of-distribution reference in {settings.resolved_reference_dir} "
                          f"(ood_score stays NULL; build one with `neuron reference --data FOLDER --route {r.value}`)")
    return models


def start_metrics(settings: Settings, pipeline):
    """Serve Prometheus /metrics for this run (--metrics-port), or exit 4 saying why the port cannot be opened."""
    from worker.metrics import start

    try:
        server = start(settings, pipeline)
    except SetupError as exc:
        raise fail(str(exc), EXIT_SETUP) from None
    if server is not None:
        console.print(f"Prometheus metrics at {server.url}")
    return server


# what a command needs of the schema beyond the instances: (table, column or "*"), each added by a migration
AUDIT_TRAIL = (("audit", "*"),)  # a command that records itself in the audit trail (schema 0007)


def open_database(settings: Settings, needs: Sequence[tuple[str, str]] = ()):
    """The results database for reading, or exit 4 saying what could not be opened and how to point at it.
    ``needs``: the tables and columns the command reads or writes that an older schema lacks (``AUDIT_TRAIL``...);
    a database without them is refused before any work, with the upgrade that adds them."""
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
        raise fail(f"no Neuron database at {parsed.database} (from {origin}): "
                   f"screen a folder first (`neuron run FOLDER --out OUT`), or point --db or NEURON_DATABASE_URL at "
                   f"your database", EXIT_SETUP)
    database = Database(url)
    try:
        with database.engine.connect() as conn:
            conn.execute(text("select count(*) from instances")).scalar_one()
    except SQLAlchemyError as exc:
        database.dispose()
        first = str(getattr(exc, "orig", exc)).strip().splitlines()[0]
        raise fail(f"cannot read the Neuron tables in {shown}: {first}; check the URL (--db or NEURON_DATABASE_URL) "
                   f"and that the server is up, then run `neuron db upgrade --db URL`", EXIT_SETUP) from None
    lacking = []
    for table, column in needs:
        try:
            with database.engine.connect() as conn:
                conn.execute(text(f"select count({column}) from {table}")).scalar_one()
        except SQLAlchemyError:
            lacking.append(f"the {table} table" if column == "*" else f"{table}.{column}")
    if lacking:
        database.dispose()
        raise fail(f"{shown} has an older schema without {' or '.join(lacking)}, which this command reads or records "
                   f"in: run `neuron db upgrade` with the same --db/--out once, then run it again", EXIT_SETUP)
    return database


class Rate(TextColumn):
    """Images per second of a rich progress task."""

    def __init__(self) -> None:
        super().__init__("")

    def render(self, task):  # type: ignore[override]
        speed = task.finished_speed or task.speed
        return f"{speed:6.1f} img/s" if speed else "   ... img/s"
