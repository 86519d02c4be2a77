"""Findings rows per second written by ``Database.record_outcomes`` and by the ``ResultWriter``, on SQLite and on a
PostgreSQL started the way the tests start it (tests/services.py: a throw-away cluster with fsync off).

    .venv/bin/python -m benchmarks.bench_db [--outcomes 64] [--calls 20] [--no-postgres]

Each call writes ``--outcomes`` finished instances with one frame and 18 labels each (the chest X-ray route), so a
call of 64 outcomes is 1,152 findings rows plus 64 instance and 64 file status updates. The first call of each run
is a warm-up (statement compilation, connection) and is not timed. The writer runs submit studies of 1-4 instances,
as the distributed worker's tasks do, and wait for the last future. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from db.store import Database  # noqa: E402
from neuron.work import (  # noqa: E402
    FileEntry,
    FrameResult,
    InstanceEntry,
    InstanceHeader,
    LabelScore,
    Outcome,
    Status,
)

LABELS = [f"label{i:02d}" for i in range(18)]
CONFIG_HASH = "b" * 64


def index_instances(db: Database, n: int, prefix: str) -> list[str]:
    uids = [f"1.2.826.0.1.{prefix}.{i}" for i in range(n)]
    entries = []
    for i, uid in enumerate(uids):
        header = InstanceHeader(uid, f"1.2.826.0.2.{prefix}.{i // 3}", f"1.2.826.0.3.{prefix}.{i // 3}", None,
                                "CR", "CHEST", "MONOCHROME1", None, 512, 512, 1)
        entries.append(FileEntry(f"/archive/{prefix}/{i}.dcm", 1000, 1, Status.QUEUED, None, uid,
                                 InstanceEntry(header, "chest-xray", Status.QUEUED)))
    for start in range(0, n, 1000):
        db.add_files(entries[start:start + 1000])
    db.ensure_config(CONFIG_HASH, "xrv-densenet121-res224-all", {"bench": True})
    return uids


def outcome(uid: str, rng: random.Random) -> Outcome:
    probs = [rng.random() for _ in LABELS]
    order = sorted(range(len(LABELS)), key=lambda i: -probs[i])
    rank = {label: r + 1 for r, label in enumerate(order)}
    scores = tuple(LabelScore(label, probs[i], rng.random() * 0.2, rank[i],
                              f"/heatmaps/ab/{uid}.png" if rank[i] == 1 else None, False)
                   for i, label in enumerate(LABELS))
    frame = FrameResult(0, "xrv-densenet121-res224-all", "untrained", CONFIG_HASH, True, scores)
    return Outcome(uid, Status.DONE, None, (frame,), worker="bench/cpu")


def legacy_record_outcomes(db: Database, outcomes) -> None:
    """The implementation before the writer (one multi-VALUES upsert built per call, statuses one by one), kept to
    measure the change under the same load."""
    from sqlalchemy import update

    from db.schema import FileRecord, Instance, Prediction, utcnow
    from db.store import _owner_files

    now = utcnow()
    with db.session() as s, s.begin():
        rows = [{"sop_instance_uid": o.sop_instance_uid, "frame": fr.frame, "model": fr.model, "weights": fr.weights,
                 "label": sc.label, "probability": sc.probability, "uncertainty": sc.uncertainty, "rank": sc.rank,
                 "heatmap_path": sc.heatmap_path, "config_hash": fr.config_hash, "untrained": fr.untrained,
                 "worker": o.worker, "needs_review": sc.needs_review, "processed_at": now}
                for o in outcomes for fr in o.frames for sc in fr.scores]
        for start in range(0, len(rows), 500):
            stmt = db._insert(Prediction).values(rows[start:start + 500])
            stmt = stmt.on_conflict_do_update(
                index_elements=["sop_instance_uid", "frame", "model", "weights", "label"],
                set_={c: stmt.excluded[c] for c in ("probability", "uncertainty", "rank", "heatmap_path",
                                                    "config_hash", "untrained", "worker", "needs_review",
                                                    "processed_at")})
            s.execute(stmt)
        for o in outcomes:
            s.execute(update(Instance).where(Instance.sop_instance_uid == o.sop_instance_uid)
                      .values(status=o.status.value, reason=o.reason, updated_at=now))
            s.execute(update(FileRecord).where(FileRecord.id.in_(_owner_files([o.sop_instance_uid])))
                      .values(status=o.status.value, reason=o.reason))


def bench_record(db: Database, outcomes_per_call: int, calls: int, write=None, prefix: str = "record") -> dict:
    write = write or db.record_outcomes
    rng = random.Random(0)
    uids = index_instances(db, outcomes_per_call * (calls + 1), prefix)
    chunks = [[outcome(u, rng) for u in uids[i:i + outcomes_per_call]]
              for i in range(0, len(uids), outcomes_per_call)]
    write(chunks[0])  # warm-up
    times = []
    for chunk in chunks[1:]:
        t0 = time.perf_counter()
        write(chunk)
        times.append(time.perf_counter() - t0)
    rows = outcomes_per_call * len(LABELS)
    times.sort()
    return {"outcomes_per_call": outcomes_per_call, "rows_per_call": rows, "calls": calls,
            "ms_per_call_median": round(1000 * times[len(times) // 2], 1),
            "rows_per_s": round(rows * len(times) / sum(times))}


def bench_writer(db: Database, studies: int) -> dict:
    from db.writer import ResultWriter

    rng = random.Random(1)
    sizes = [rng.randint(1, 4) for _ in range(studies)]
    uids = index_instances(db, sum(sizes), "writer")
    batches, start = [], 0
    for size in sizes:
        batches.append([outcome(u, rng) for u in uids[start:start + size]])
        start += size
    writer = ResultWriter(db)
    try:
        writer.submit(batches[0]).result()  # warm-up
        t0 = time.perf_counter()
        futures = [writer.submit(b) for b in batches[1:]]
        for f in futures:
            f.result()
        elapsed = time.perf_counter() - t0
    finally:
        writer.close()
    rows = sum(len(b) for b in batches[1:]) * len(LABELS)
    return {"studies": studies - 1, "rows": rows, "seconds": round(elapsed, 3), "rows_per_s": round(rows / elapsed)}


def run(url: str, outcomes: int, calls: int, writer_studies: int) -> dict:
    db = Database(url)
    db.create()
    try:
        out = {"record_outcomes": bench_record(db, outcomes, calls),
               "before (multi-VALUES per call)": bench_record(db, outcomes, max(3, calls // 4),
                                                              lambda o: legacy_record_outcomes(db, o), "legacy")}
        try:
            out["writer"] = bench_writer(db, writer_studies)
        except ImportError:  # the writer is newer than record_outcomes; measure what exists
            out["writer"] = None
        return out
    finally:
        db.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--outcomes", type=int, default=64, help="outcomes per record_outcomes call")
    ap.add_argument("--calls", type=int, default=20, help="timed calls")
    ap.add_argument("--writer-studies", type=int, default=600, help="studies of 1-4 instances through the writer")
    ap.add_argument("--no-postgres", action="store_true", help="SQLite only")
    args = ap.parse_args()
    result: dict = {"machine": platform.processor() or platform.machine(), "python": platform.python_version()}
    with tempfile.TemporaryDirectory(prefix="neuron-bench-db-") as tmp:
        result["sqlite"] = run(f"sqlite:///{tmp}/bench.db", args.outcomes, args.calls, args.writer_studies)
    if not args.no_postgres:
        from tests.services import postgres_server

        with postgres_server() as pg:
            result["postgresql"] = run(pg.url, args.outcomes, args.calls, args.writer_studies)
            result["postgresql"]["note"] = "throw-away cluster, fsync=off (tests/services.py)"
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
