"""Alembic environment: run against the connection Neuron hands in (``config.attributes["connection"]``)."""

from __future__ import annotations

from alembic import context

from db.schema import Base

config = context.config
connection = config.attributes.get("connection")
if connection is None:  # pragma: no cover - Neuron always passes a connection
    raise RuntimeError("run migrations through `neuron db upgrade` (db.migrate.upgrade)")
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
