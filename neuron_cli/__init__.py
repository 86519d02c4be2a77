"""The ``neuron`` command: one typer app, its commands grouped by what they are for. Each command reads its settings
(``neuron.settings.Settings``, the only reader of the environment), then hands over to a service function of the
package that does the work; heavy imports (torch, models) happen inside the commands that need them.

    screening     run, rescreen                          (worker.embedded)
    distributed   scan, worker                           (producer, worker.service)
    network       listen, pull, send                     (producer.listen, producer.pull, worker.stream, worker.send)
    status        status                                 (db.admin, neuron.queue)
    results       review, export, purge                  (review.app, db.export, db.admin)
    modelling     train, evaluate, models, samples, bench (neuron_models.training, worker.evaluation, worker.bench)
    safety        reference, monitor, audit              (worker.reference, db.monitor, db.audit)
    database      db upgrade                             (db.migrate)

Exit codes (``neuron_cli.common``): 0 every file was screened or deliberately skipped; 3 the run finished but some
files failed; 4 the run could not start (weights, settings, database); 2 usage errors.
"""

from __future__ import annotations

import sys

import typer

from neuron_cli import database, distributed, modelling, network, results, safety, screening, status

# plain help (rich_markup_mode=None): click wraps long help texts and defaults instead of cutting them at the column
# width, and "[default: ...]" stays literal
app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  help="Neuron screens medical-image archives: DICOM in; findings with calibrated probabilities, "
                       "uncertainty and Grad-CAM heatmaps out, in SQL.")

for command in (screening.run, modelling.train, modelling.evaluate, distributed.worker, distributed.scan,
                network.listen, network.pull, network.send, status.status, screening.rescreen, results.purge,
                results.review, results.export, modelling.samples, modelling.models, modelling.bench,
                safety.reference, safety.monitor, safety.audit):
    app.command()(command)

db_app = typer.Typer(help="Database schema (Alembic migrations; SQLite or PostgreSQL).", no_args_is_help=True)
db_app.command("upgrade")(database.upgrade)
app.add_typer(db_app, name="db")


def main() -> None:  # pragma: no cover
    sys.exit(app())
