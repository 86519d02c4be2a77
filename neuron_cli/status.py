"""``neuron status``: what the database, the broker and the live workers say, as tables, JSON or a live view.

``gather`` collects the numbers (``db.admin`` for the database's counts in the one status vocabulary,
``neuron.queue`` for the broker and the workers); ``render`` draws them; the command only chooses how often.
"""

from __future__ import annotations

import shutil
import time
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from neuron.routes import MODEL_ROUTES
from neuron.settings import Settings
from neuron.work import Status
from neuron_cli.common import DbOpt, OutOpt, open_database, settings_from_env


def gather(settings: Settings, database) -> dict:
    """Everything `neuron status` shows, as one JSON-ready dict: the database's counts, the broker's queues and
    unacknowledged messages, the live workers' numbers, and what is held by no live worker."""
    from concurrent.futures import ThreadPoolExecutor

    from db.admin import db_status, throughput
    from db.network import network_status
    from neuron.queue import (
        broker_status,
        held_by_no_live_worker,
        mask_url,
        tasks_held_by_live_workers,
        unacknowledged_tasks,
        worker_records,
    )
    from neuron.webclient import described_peers

    st = db_status(database)
    rate = throughput(database)
    before = unacknowledged_tasks(settings)
    with ThreadPoolExecutor(2) as pool:
        asked = pool.submit(broker_status, settings, sorted(r.value for r in MODEL_ROUTES))
        held = tasks_held_by_live_workers(settings, timeout=1.5) if before else set()
        broker = asked.result()
    if held is not None:  # the lean path's studies in flight are in no Celery request list: each worker names them
        held |= {t for w in broker.workers.values() for t in w.get("held") or ()}
    after = unacknowledged_tasks(settings)
    orphans = held_by_no_live_worker(before, after, held, settings.visibility_timeout)
    hosts = workers_by_host(worker_records(settings), broker.workers, after, settings.visibility_timeout)
    worker_rate = sum(w.get("images_per_s") or 0.0 for w in broker.workers.values())
    per_s = worker_rate or rate.per_second
    eta = st.remaining_instances / per_s if per_s and st.remaining_instances else None
    return {
        "database": mask_url(settings.resolved_database_url),
        "broker": broker.url, "broker_error": broker.error,
        "queues": broker.waiting, "unacknowledged": broker.unacknowledged,
        "oldest_unacknowledged_s": broker.oldest_unacknowledged_s, "visibility_timeout_s": settings.visibility_timeout,
        "workers": broker.workers, "held_by_no_live_worker": orphans, "hosts": hosts,
        "studies": st.studies, "instances": st.instances, "files": st.files,
        "in_flight": {"studies": st.in_flight_studies, "instances": st.in_flight_instances},
        "remaining_instances": st.remaining_instances,
        "images_per_s": rate.per_second, "images_per_s_window": {"frames": rate.frames, "seconds": rate.seconds},
        "eta_s": eta,
        "failures_by_reason": [{"reason": r, "instances": n} for r, n in st.failures_by_reason],
        "network": network_status(database),
        "dicomweb": described_peers(settings),
    }


def workers_by_host(records: dict | None, answering: dict, unacked: dict | None, visibility_timeout: int) -> dict:
    """host -> its workers by their heartbeats: beating or stopped (dead, or cut off from the broker), whether it
    answered this status's question, and the studies it held at its last beat that are still unacknowledged (a
    stopped worker's are delivered again once ``visibility_timeout`` old)."""
    out: dict[str, list[dict]] = {}
    for name, r in (records or {}).items():
        still = [t for t in r.get("held") or () if unacked is not None and t in unacked]
        oldest = max((time.time() - unacked[t][1] for t in still), default=None)
        out.setdefault(r.get("host") or "?", []).append({
            "worker": name, "node": r.get("node"), "device": r.get("device"), "queues": r.get("queues"),
            "state": "heartbeat stopped" if r["stopped"] else "beating", "silent_s": r["silent_s"],
            "answered": r.get("node") in answering, "images": r.get("images"),
            "held_studies": len(still), "held_instances": sum(unacked[t][0] for t in still),
            "held_tasks": still,
            "redelivered_in_s": None if oldest is None or not r["stopped"] else round(
                max(0.0, visibility_timeout - oldest), 1)})
    return dict(sorted(out.items()))


def render(data: dict):
    """The status as rich tables."""
    from rich.console import Group

    table = Table(title="neuron status", show_header=True)
    table.add_column("what")
    table.add_column("count", justify="right")
    table.add_row("database", data["database"])
    table.add_row("broker", data["broker"])
    if data["broker_error"]:
        table.add_row("broker problem", data["broker_error"])
    for q, n in data["queues"].items():
        table.add_row(f"queue {q} (waiting messages)", str(n))
    unacked = str(data["unacknowledged"])
    if data["oldest_unacknowledged_s"] is not None:
        unacked += (f" (oldest {data['oldest_unacknowledged_s']:.0f} s; a dead worker's are redelivered after "
                    f"{data['visibility_timeout_s']} s)")
    table.add_row("unacknowledged messages (held by workers)", unacked)
    dead = data["held_by_no_live_worker"]
    if dead is None:
        table.add_row("held by no live worker", "unknown (broker or workers could not be asked)")
    elif dead["studies"]:
        table.add_row("held by no live worker (a dead worker's)",
                      f"{dead['studies']} study tasks, {dead['instances']} instances; redelivered once "
                      f"{data['visibility_timeout_s']} s old (NEURON_VISIBILITY_TIMEOUT), in "
                      f"{dead['redelivered_in_s']:.0f} s")
    else:
        table.add_row("held by no live worker", "0")
    table.add_row("in flight (claimed by a worker)",
                  f"{data['in_flight']['studies']} studies, {data['in_flight']['instances']} instances")
    for kind in ("studies", "instances"):
        for st in STATUS_ORDER:
            if st in data[kind]:
                table.add_row(f"{kind} {st}", str(data[kind][st]))
    rate = data["images_per_s"]
    table.add_row("images/s (last 5 min)", "n/a (fewer than two commits)" if rate is None else f"{rate:.2f}")
    eta = data["eta_s"]
    table.add_row("ETA", "n/a" if eta is None else f"{eta / 60:.1f} min for {data['remaining_instances']} instances")
    workers = Table(title=f"workers alive: {len(data['workers'])}", show_header=True)
    for col in ("node", "device", "batch size", "images", "images/s", "up"):
        workers.add_column(col)
    for node, w in data["workers"].items():
        workers.add_row(node, str(w.get("device")), str(w.get("batch_size")), str(w.get("images")),
                        str(w.get("images_per_s")), f"{w.get('up_s', 0):.0f} s")
    hosts = Table(title="workers by host (their heartbeats in the broker)", show_header=True)
    for col in ("host", "worker", "state", "studies held", "instances held", "redelivered in"):
        hosts.add_column(col)
    for host, ws in (data.get("hosts") or {}).items():
        for w in ws:
            state = w["state"] if w["state"] == "beating" else f"{w['state']} {w['silent_s']:.0f} s ago"
            again = "" if w["redelivered_in_s"] is None else f"{w['redelivered_in_s']:.0f} s"
            hosts.add_row(host, w["worker"], state, str(w["held_studies"]), str(w["held_instances"]), again)
    _network_rows(table, data.get("network"))
    for url, how in (data.get("dicomweb") or {}).items():
        table.add_row(f"DICOMweb {url}", how)
    failures = Table(title="latest failures by reason", show_header=True)
    failures.add_column("instances", justify="right")
    failures.add_column("reason")
    for f in data["failures_by_reason"]:
        failures.add_row(str(f["instances"]), f["reason"])
    return Group(table, workers, hosts, failures)


STATUS_ORDER = tuple(s.value for s in Status)


def _network_rows(table, network: dict | None) -> None:
    """neuron listen / pull / --send-to in the status table: receiving in the last hour, pulls, deliveries."""
    if not network:
        return
    receiving = network.get("receiving") or {}
    for caller, r in receiving.get("by_caller", {}).items():
        table.add_row(f"received from {caller} (last hour)",
                      f"{r['instances']} instances, {r['bytes'] / 1e6:.1f} MB in {r['associations']} associations; "
                      f"{r['refused']} refused, {r['rejected']} associations rejected")
    if receiving.get("last_refusal"):
        table.add_row("last refusal", receiving["last_refusal"])
    for source, counts in network.get("pulls", {}).items():
        table.add_row(f"pulled from {source} (studies)", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    for destination, counts in network.get("deliveries", {}).items():
        table.add_row(f"deliveries to {destination}", ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    if network.get("last_delivery_error"):
        table.add_row("last failed delivery", network["last_delivery_error"])


def status(
    db: DbOpt = None,
    out: OutOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the numbers as one JSON object.")] = False,
    watch: Annotated[bool, typer.Option("--watch", help="A live view, refreshed every --interval seconds.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between refreshes of --watch.")] = 2.0,
    count: Annotated[int, typer.Option(help="With --watch: stop after this many refreshes (0: until Ctrl-C). "
                                            "Without a terminal each refresh is printed in full, for a log.",
                                       min=0)] = 0,
) -> None:
    """Queue depth, unacknowledged and in-flight studies, workers alive, studies and instances by status (pending,
    queued, done, failed, skipped, duplicate), images/s, ETA, the latest failures by reason, and the DICOM network:
    what was received in the last hour, pulls and deliveries by status."""
    import json

    settings = settings_from_env(database_url=db, out_dir=out)
    database = open_database(settings)
    if as_json:
        print(json.dumps(gather(settings, database), indent=2, sort_keys=True))
        return
    if not watch:
        Console(width=max(160, shutil.get_terminal_size().columns)).print(render(gather(settings,
                                                                                                      database)))
        return
    from itertools import count as refreshes

    from rich.live import Live

    screen = Console(width=max(160, shutil.get_terminal_size().columns))
    frames = refreshes(1) if count == 0 else range(1, count + 1)
    try:
        if not screen.is_terminal:  # a pipe or a log: every refresh in full, one after the other
            for n in frames:
                if n > 1:
                    time.sleep(interval)
                screen.print(render(gather(settings, database)))
            return
        with Live(render(gather(settings, database)), console=screen, refresh_per_second=1) as live:
            for n in frames:
                if n > 1:
                    time.sleep(interval)
                    live.update(render(gather(settings, database)))
    except KeyboardInterrupt:
        pass


