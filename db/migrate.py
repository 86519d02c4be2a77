"""Schema migrations (Alembic), run programmatically so there is no alembic.ini to keep in step.

``upgrade(engine)`` brings any database, SQLite or PostgreSQL, to the newest revision and recreates the public views
(an upgrade to an older revision, for the migration tests, leaves them out).
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text
from sqlalchemy.engine import Engine

from db.schema import create_views, drop_views

MIGRATIONS = Path(__file__).parent / "migrations"


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


# Any fixed number: the PostgreSQL advisory lock that makes concurrent upgrades (two workers starting at once on a
# new database) take turns; the second finds the schema at head and only recreates the views.
MIGRATION_LOCK = 0x6E6575726F6E  # "neuron"


def upgrade(engine: Engine, revision: str = "head") -> None:
    cfg = alembic_config()
    with engine.begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})
        cfg.attributes["connection"] = conn
        drop_views(conn)  # tables under a view cannot be rebuilt on SQLite; the views come back below
        command.upgrade(cfg, revision)
        if revision == "head":  # the views read the newest tables (PostgreSQL checks their columns, SQLite does not)
            create_views(conn)


def current(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
