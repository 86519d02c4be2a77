"""The embedded default: index a folder, screen it and write results, in one process on one database.

The same steps the distributed mode splits between producer and workers: ``producer.scan.index_folder`` ->
``Engine.run`` -> ``Database.record_outcomes``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from db.schema import utcnow
from db.store import Database, Outcome, Summary
from neuron.routes import Route
from neuron.settings import Settings
from producer.scan import ScanResult, index_folder
from worker.engine import Engine

log = logging.getLogger(__name__)


@dataclass
class RunReport:
    scan: ScanResult
    screened: int
    started_at: datetime
    summary: Summary


class ProgressHooks:
    """Callbacks a front end (the CLI's progress bar) may set; all optional."""

    def __init__(self, on_scan: Callable[[int], None] | None = None, on_total: Callable[[int], None] | None = None,
                 on_images: Callable[[int], None] | None = None):
        self.on_scan = on_scan
        self.on_total = on_total
        self.on_images = on_images


class OutcomeWriter:
    """Collects outcomes and commits them in batches, so one slow instance never holds back the others' rows."""

    def __init__(self, db: Database, batch: int = 64):
        self.db, self.batch, self.buffer, self.count = db, batch, [], 0

    def __call__(self, outcome: Outcome) -> None:
        self.buffer.append(outcome)
        self.count += 1
        if len(self.buffer) >= self.batch:
            self.flush()

    def flush(self) -> None:
        self.db.record_outcomes(self.buffer)
        self.buffer = []


def run_folder(folder: Path, settings: Settings, engine: Engine | None = None,
               hooks: ProgressHooks | None = None, retry_failed: bool = False) -> RunReport:
    """Index FOLDER, then screen every instance still to do: new ones, ones skipped earlier because their route had
    no model and now has one, and (``retry_failed``) failed ones."""
    hooks = hooks or ProgressHooks()
    started = utcnow()
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.resolved_database_url)
    try:
        db.create()
        engine = engine or Engine.from_settings(settings)
        for lr in engine.routes.values():
            db.ensure_config(lr.spec.config_hash, lr.spec.model, lr.spec.as_dict())
        override = Route(settings.route_override) if settings.route_override else None
        scan = index_folder(folder, db, exclude=[settings.out_dir], on_file=hooks.on_scan, route_override=override)
        routes = [r.value for r in engine.routes]
        db.reset_to_pending(awaiting_model=routes, failed=retry_failed)
        db.skip_routes_without_model(routes, {r.value: why for r, why in engine.unavailable.items()})
        items = db.pending(routes=routes)
        if hooks.on_total is not None:
            hooks.on_total(sum(min(i.frames, settings.max_frames) for i in items))
        writer = OutcomeWriter(db)
        while items:
            try:
                engine.run(items, writer, progress=hooks.on_images)
            finally:
                writer.flush()
            # A corrupt first copy must not hide a good duplicate: those get one more pass, from the other file.
            items = db.pending(routes=routes) if db.retry_failed_from_duplicates() else []
        return RunReport(scan, writer.count, started, db.summary(since=started))
    finally:
        db.dispose()
