"""Clinical safety: ``neuron reference`` (a route's out-of-distribution reference from a site's own films), ``neuron
monitor`` (drift of each model without ground truth) and ``neuron audit`` (export or prune the audit trail). The work
is in ``worker.reference``, ``db.monitor`` with ``neuron.drift``, and ``db.audit``."""

from __future__ import annotations

import json
import sys
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from neuron.errors import NeuronError
from neuron.settings import apply_cache_environment
from neuron.work import Route
from neuron_cli.common import (
    AUDIT_TRAIL,
    EXIT_OK,
    EXIT_SETUP,
    EXIT_SOME_FAILED,
    EXIT_USAGE,
    DbOpt,
    OutOpt,
    cli_actor,
    console,
    fail,
    load_models,
    open_database,
    settings_from_env,
    warn_untrained,
)
from neuron_cli.options import screening_options


def _day(value: str, option: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise fail(f"{option} {value!r} is not a date; use YYYY-MM-DD, e.g. 2026-11-01", EXIT_USAGE) from None


def _range(value: str | None, option: str):
    """FROM:TO (whole days, TO included) as a drift window, or None."""
    if value is None:
        return None
    from db.monitor import day_window

    first, sep, last = value.partition(":")
    if not sep:
        raise fail(f"{option} {value!r} is not FROM:TO; e.g. {option} 2026-01-01:2026-01-31", EXIT_USAGE)
    try:
        return day_window(_day(first, option), _day(last, option))
    except ValueError as exc:
        raise fail(f"{option} {value!r}: {exc}", EXIT_USAGE) from None


@screening_options
def reference(
    data: Annotated[Path, typer.Option("--data", exists=True, file_okay=False, help="Folder of the site's own films "
                                       "that the route screens (in its trained population; others are left out and "
                                       "counted).")],
    route: Annotated[Route, typer.Option(help="The route whose model the reference is for.")] = Route.CHEST_XRAY,
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder: the reference goes to OUT/references "
                                                          "unless --reference-dir. [default: ./results; env "
                                                          "NEURON_OUT]")] = None,
    min_images: Annotated[int, typer.Option(help="Refuse a reference of fewer films.")] = 20,
    *,
    screening: dict,
) -> None:
    """Build a route's out-of-distribution reference: the model's penultimate features over the site's own films,
    their mean and shrunk covariance, and the 99th percentile of held-out films' Mahalanobis distances as the
    threshold. Stored with the weights' sha256; screening then scores every image against it (ood_score) and
    flags those above the threshold (out_of_distribution, needs_review). Use the same screening options as the runs
    it is for (weights, CLAHE): another preprocessing or other weights are refused."""
    settings = settings_from_env(out_dir=out, **screening)
    warn_untrained(settings)
    apply_cache_environment(settings.resolved_cache_dir)
    from worker.reference import build_reference

    # the identity view is all a reference reads: TTA off saves four forward passes per film, same features
    models = load_models(settings.with_(tta=False), only=[route], references=False)
    if route not in models.routes:
        raise fail(f"route {route.value} has no model here: {models.unavailable.get(route, 'not loaded')}", EXIT_SETUP)
    try:
        report = build_reference(data, route, settings, models, min_images=min_images, say=console.print)
    except ValueError as exc:
        raise fail(str(exc), EXIT_USAGE) from None
    except NeuronError as exc:
        raise fail(str(exc), EXIT_SETUP) from None
    ref = report.reference
    held = ref.summary["held_out"]
    console.print(f"reference for {route.value} ({ref.model}, weights {ref.weights[:16]}): {ref.images} films; "
                  f"held-out ood_score median {held['50']:.2f}, 99th percentile {ref.threshold:.2f} (the threshold)")
    if report.left_out:
        console.print("left out: " + ", ".join(f"{why} x{n}" for why, n in report.left_out.most_common()))
    if ref.images < 200:
        console.print(f"[yellow]{ref.images} films place a 99th percentile roughly; a few hundred make it steadier[/]")
    console.print(f"written to {report.path} (sha256 {ref.sha256[:16]}); runs and workers read it from "
                  f"{settings.resolved_reference_dir} (--reference-dir or NEURON_REFERENCE_DIR)")


def monitor(
    db: DbOpt = None,
    out: OutOpt = None,
    recent_days: Annotated[int, typer.Option(help="The recent window: the last N days of screening.")] = 7,
    reference_days: Annotated[int, typer.Option(help="The reference window: the first N days of screening.")] = 30,
    reference: Annotated[str, typer.Option("--reference", help="The reference window as FROM:TO dates (TO "
                                           "included), instead of the first --reference-days.")] = None,
    recent: Annotated[str, typer.Option("--recent", help="The recent window as FROM:TO dates, instead of the last "
                                        "--recent-days.")] = None,
    alpha: Annotated[float, typer.Option(help="Family-wise false-alarm rate per model; each check gets alpha over "
                                              "the number of checks.")] = 0.01,
    psi_floor: Annotated[float, typer.Option("--psi", help="Smallest population stability index that counts as "
                                             "drift (a significant but smaller shift is shown, not flagged).")] = 0.1,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    textfile: Annotated[Path, typer.Option("--textfile", help="Also write the Prometheus gauges to this file "
                                           "(node_exporter's textfile collector).")] = None,
) -> None:
    """Drift of each model without ground truth: a recent window of screening against a reference window, per model
    and label (probability distributions, positive rates with control limits), the shares needing review, out of
    distribution and gated, and the mix of header facts. Exit 3 when a check is flagged."""
    from db.monitor import monitor as run_monitor
    from neuron.drift import prometheus_text

    settings = settings_from_env(database_url=db, out_dir=out)
    windows = {"reference": _range(reference, "--reference"), "recent": _range(recent, "--recent")}
    database = open_database(settings, needs=(*AUDIT_TRAIL, ("predictions", "ood_score")))
    try:
        report = run_monitor(database, recent_days=recent_days, reference_days=reference_days, alpha=alpha,
                             psi_floor=psi_floor, **windows)
    except ValueError as exc:
        raise fail(str(exc), EXIT_USAGE) from None
    finally:
        database.dispose()
    if textfile is not None:
        tmp = textfile.with_name(f".{textfile.name}.tmp")
        tmp.write_bytes(prometheus_text(report))
        tmp.replace(textfile)  # node_exporter must never read half a file
    if as_json:
        print(json.dumps(report.as_dict(), indent=1))
    else:
        _render(report)
    raise typer.Exit(EXIT_SOME_FAILED if report.flagged else EXIT_OK)


def _render(report) -> None:
    out = Console(width=160)
    out.print(f"reference window: {report.reference.label() if report.reference else 'none'}")
    out.print(f"recent window:    {report.recent.label() if report.recent else 'none'}")
    if report.note:
        out.print(f"[yellow]{report.note}[/]")
    for m in report.models:
        table = Table(title=f"{m.model}: {'DRIFT' if m.flagged else 'stable'} ({m.frames_reference} frames -> "
                            f"{m.frames_recent}; each check at alpha {m.alpha:.2g}, PSI >= {report.psi_floor})")
        for col in ("label", "mean ref", "mean recent", "KS", "p", "PSI", "positive ref", "positive recent",
                    "limits", "drift"):
            table.add_column(col, justify="left" if col == "label" else "right")
        for lab in m.labels:
            d, r = lab.probabilities, lab.positive_rate

            def f(v, spec=".3f"):
                return "" if v is None else format(v, spec)
            table.add_row(lab.label, f(d.mean_reference), f(d.mean_recent), f(d.ks), f(d.p_value, ".2g"),
                          f(d.psi, ".2f"), f(r.reference_rate), f(r.recent_rate),
                          "" if r.lower is None else f"{r.lower:.3f}-{r.upper:.3f}", "DRIFT" if lab.flagged else "")
        out.print(table)
        for reason in m.reasons():
            out.print(f"  [red]drift[/] {reason}")


def _instant(value: str | None, option: str) -> datetime | None:
    return None if value is None else datetime.combine(_day(value, option), time(), UTC)


def audit(
    since: Annotated[str, typer.Option("--since", help="First day to export (YYYY-MM-DD). [default: all]")] = None,
    until: Annotated[str, typer.Option("--until", help="Day after the last to export. [default: now]")] = None,
    fmt: Annotated[str, typer.Option("--format", help="csv, or json: a FHIR R4 Bundle of AuditEvent resources.")
                   ] = "csv",
    output: Annotated[Path, typer.Option("--output", help="File to write. [default: standard output]")] = None,
    prune_before: Annotated[str, typer.Option("--prune-before", help="Delete the audit rows older than this day "
                                              "(YYYY-MM-DD), keeping a row that says who pruned what: the only "
                                              "way rows leave the audit trail.")] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Prune without asking.")] = False,
    db: DbOpt = None,
    out: OutOpt = None,
) -> None:
    """Export the audit trail (who viewed which study and heatmap, gave which verdict, exported, purged or rescreened
    what, when and from where) as CSV or FHIR AuditEvent JSON; or prune it before a date. Exporting is audited too."""
    from db import audit as trail

    if fmt not in ("csv", "json"):
        raise fail(f"--format {fmt!r} is not csv or json (json: a FHIR R4 Bundle of AuditEvent resources)", EXIT_USAGE)
    settings = settings_from_env(database_url=db, out_dir=out)
    database = open_database(settings, needs=(*AUDIT_TRAIL, ("predictions", "ood_score")))
    try:
        if prune_before is not None:
            cut = _instant(prune_before, "--prune-before")
            if not yes and not typer.confirm(f"delete the audit rows before {cut:%Y-%m-%d} (UTC)?"):
                raise typer.Exit(EXIT_OK)
            n = trail.prune(database, cut, cli_actor())
            console.print(f"deleted {n} audit rows before {cut:%Y-%m-%d}; the prune itself is recorded")
            return
        first, last = _instant(since, "--since"), _instant(until, "--until")
        rows = trail.entries(database, first, last)
        text = (json.dumps(trail.fhir_bundle(rows, source=f"neuron {mask(settings)}"), indent=1) + "\n"
                if fmt == "json" else trail.to_csv(rows))
        if output is None:
            sys.stdout.write(text)
        else:
            output.write_text(text)
        trail.record(database, trail.Event(cli_actor(), trail.Action.AUDIT_EXPORT,
                                           target=f"since={since or 'start'} until={until or 'now'} format={fmt}",
                                           detail=f"{len(rows)} rows"))
        console.print(f"exported {len(rows)} audit rows" + (f" to {output}" if output else ""))
    finally:
        database.dispose()


def mask(settings) -> str:
    from neuron.queue import mask_url

    return mask_url(settings.resolved_database_url)
