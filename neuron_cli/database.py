"""``neuron db``: the database schema (Alembic migrations; SQLite or PostgreSQL)."""

from __future__ import annotations

from typing import Annotated

import typer

from neuron.errors import NeuronError
from neuron_cli.common import EXIT_SETUP, console, fail, settings_from_env


def upgrade(db: Annotated[str, typer.Option("--db", help="SQLAlchemy URL (default: NEURON_DATABASE_URL).")] = None
               ) -> None:
    """Bring the database to the newest schema and recreate the public views."""
    from db.migrate import current
    from db.store import Database

    settings = settings_from_env(database_url=db)
    database = Database(settings.resolved_database_url)
    try:
        database.create()
    except NeuronError as exc:
        raise fail(str(exc), EXIT_SETUP) from None
    console.print(f"schema at revision {current(database.engine)}")


