"""The review worklist on a large database: 1,000,000 findings rows (55,556 studies x 1 image x 18 labels), the first
page, a deep page and each filter, timed through ``db.review.worklist`` with the database's plan for each query.

    .venv/bin/python -m benchmarks.bench_worklist [--studies 55556] [--postgres URL | --start-postgres] [--keep DIR]

SQLite is always measured (a file under a temporary folder, WAL, as ``neuron run`` writes it); PostgreSQL when a URL
is given (its database is emptied first) or with --start-postgres (a throwaway server, as the tests start one). Each
query runs once to warm the cache, then --repeat times; the median is reported. Prints the plans and one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import text  # noqa: E402

from db import review  # noqa: E402
from db.schema import FileRecord, Instance, PipelineConfig, Prediction, Study, Verdict  # noqa: E402
from db.store import Database  # noqa: E402

LABELS = ["Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema", "Fibrosis",
          "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule", "Mass", "Hernia", "Lung Lesion",
          "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum"]
CONFIG_HASH = "c0ffee0123456789"
MODEL = "xrv-densenet121-res224-all"
CHUNK = 20_000


def _study_uid(i: int) -> str:
    return f"1.2.826.0.1.3680043.99.{i}"


def fill(db: Database, n_studies: int, seed: int = 0, reviewed_every: int = 50) -> int:
    """A screened archive of ``n_studies`` one-image CR/DX studies with 18 findings each, its ``studies`` summaries
    consistent with the predictions, and a verdict on the top finding of every ``reviewed_every``-th study. Rows go
    in with multi-row inserts in chunks (no per-row round trips). Returns the number of predictions rows."""
    rng = random.Random(seed)
    db.create()
    now = datetime(2026, 11, 27, 6, 0, tzinfo=UTC)
    with db.engine.begin() as conn:
        conn.execute(PipelineConfig.__table__.insert(), [{"config_hash": CONFIG_HASH, "model": MODEL,
                                                          "settings_json": json.dumps({"tta": {"views": 5}}),
                                                          "created_at": now}])
    n_rows = 0
    per_chunk = CHUNK // len(LABELS)
    for start in range(0, n_studies, per_chunk):
        stop = min(n_studies, start + per_chunk)
        files, instances, preds, studies, verdicts = [], [], [], [], []
        for i in range(start, stop):
            study, sop = _study_uid(i), f"{_study_uid(i)}.1.1"
            modality = "DX" if i % 7 == 0 else "CR"
            processed = now - timedelta(days=rng.randrange(14), seconds=rng.randrange(86_400))
            files.append({"id": i + 1, "path": f"/archive/{i // 1000}/{i}.dcm", "size": 8_000_000,
                          "mtime_ns": 0, "sop_instance_uid": sop, "status": "done", "seen_at": processed})
            instances.append({"sop_instance_uid": sop, "study_instance_uid": study, "series_instance_uid":
                              f"{study}.1", "modality": modality, "frames": 1, "file_id": i + 1,
                              "route": "chest-xray", "status": "done", "attempts": 1, "updated_at": processed})
            scores = sorted(((rng.betavariate(1.2, 3.0), label, rng.uniform(0.0, 0.2)) for label in LABELS),
                            reverse=True)
            for rank, (p, label, u) in enumerate(scores, start=1):
                preds.append({"sop_instance_uid": sop, "frame": 1, "model": MODEL, "weights": "untrained",
                              "label": label, "probability": p, "uncertainty": u, "rank": rank,
                              "heatmap_path": f"/heatmaps/{i % 256:02x}/{i}.png" if rank == 1 else None,
                              "config_hash": CONFIG_HASH, "untrained": True, "worker": None,
                              "needs_review": u > 0.1, "decoder": "native", "processed_at": processed})
            top_p, top_label, _ = scores[0]
            studies.append({"study_instance_uid": study,
                            "study_date": date(2026, 1, 1) + timedelta(days=rng.randrange(330)),
                            "accession_number": f"A{i:08d}", "study_description": "CHEST PA",
                            "patient_key": None, "modalities": modality, "top_probability": top_p,
                            "top_label": top_label, "top_model": MODEL,
                            "positive_findings": sum(p >= 0.5 for p, _, _ in scores),
                            "needs_review": sum(u > 0.1 for _, _, u in scores), "screened_instances": 1,
                            "screened_at": processed, "updated_at": processed})
            if i % reviewed_every == 0:
                verdicts.append({"study_instance_uid": study, "sop_instance_uid": sop, "frame": 1, "model": MODEL,
                                 "weights": "untrained", "label": top_label, "verdict": rng.choice(Verdict.VALUES),
                                 "note": None, "reviewer": "bench", "reviewed_at": now})
        with db.engine.begin() as conn:
            conn.execute(FileRecord.__table__.insert(), files)
            conn.execute(Instance.__table__.insert(), instances)
            conn.execute(Prediction.__table__.insert(), preds)
            conn.execute(Study.__table__.insert(), studies)
            if verdicts:
                conn.execute(Verdict.__table__.insert(), verdicts)
        n_rows += len(preds)
    with db.engine.begin() as conn:
        conn.execute(text("ANALYZE"))
    return n_rows


CASES = {
    "first page": {},
    "page 2": {"page": "2"},
    "deep page (studies 49,951-50,000)": {"page": "1000"},
    "label Effusion >= 0.7": {"label": "Effusion", "min_probability": "0.7"},
    "label Hernia, any probability, page 10": {"label": "Hernia", "page": "10"},
    "top finding >= 0.9": {"min_probability": "0.9"},
    "needs review only": {"needs_review": "1"},
    "modality DX": {"modality": "DX"},
    "study date in March": {"date_from": "2026-03-01", "date_to": "2026-03-31"},
    "reviewed yes": {"reviewed": "yes"},
    "not reviewed, page 20": {"reviewed": "no", "page": "20"},
    "label Mass >= 0.5, DX, not reviewed": {"label": "Mass", "min_probability": "0.5", "modality": "DX",
                                           "reviewed": "no"},
}


def _time(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def measure(db: Database, repeat: int) -> dict:
    results = {}
    for name, params in CASES.items():
        f = review.WorklistFilter.from_query(params)
        seconds = _time(lambda f=f: review.worklist(db, f), repeat)
        plan = review.explain(db, review.worklist_query(f, common_label=review.label_is_common(db, f)))
        rows = len(review.worklist(db, f).rows)
        results[name] = {"ms": round(seconds * 1000, 2), "rows": rows, "plan": plan}
        print(f"\n## {name}: {seconds * 1000:.2f} ms, {rows} rows", flush=True)
        for line in plan:
            print(f"   {line}")
    uid = _study_uid(12_345)
    results["study page (18 findings)"] = {"ms": round(_time(lambda: review.study_detail(db, uid), repeat) * 1000, 2)}
    results["label choices (skip scan)"] = {"ms": round(_time(lambda: review.labels(db), repeat) * 1000, 2)}
    results["summary page aggregates"] = {"ms": round(_time(lambda: review.summary(db), 1) * 1000, 1)}
    for name in ("study page (18 findings)", "label choices (skip scan)", "summary page aggregates"):
        print(f"## {name}: {results[name]['ms']} ms")
    return results


def run(url: str, n_studies: int, repeat: int) -> dict:
    db = Database(url)
    t = time.perf_counter()
    n_rows = fill(db, n_studies)
    fill_s = time.perf_counter() - t
    print(f"# {db.engine.dialect.name}: {n_rows:,} predictions rows, {n_studies:,} studies, filled in "
          f"{fill_s:.0f} s", flush=True)
    out = {"dialect": db.engine.dialect.name, "predictions_rows": n_rows, "studies": n_studies,
           "fill_s": round(fill_s, 1), "queries": measure(db, repeat)}
    db.dispose()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=55_556, help="studies of 18 findings (55,556: 1,000,008 rows)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--postgres", help="a PostgreSQL URL to measure too (its database is emptied first)")
    parser.add_argument("--start-postgres", action="store_true", help="start a throwaway PostgreSQL and measure it")
    parser.add_argument("--no-sqlite", action="store_true")
    parser.add_argument("--keep", type=Path, help="keep the SQLite database in this folder")
    args = parser.parse_args()
    report = {"machine": platform.platform(), "python": platform.python_version(), "runs": []}
    if not args.no_sqlite:
        with tempfile.TemporaryDirectory() as tmp:
            folder = args.keep or Path(tmp)
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / "worklist.db"
            path.unlink(missing_ok=True)
            report["runs"].append(run(f"sqlite:///{path}", args.studies, args.repeat))
    if args.postgres or args.start_postgres:
        from neuron.servers import postgres_server, reset_postgres

        if args.postgres:
            reset_postgres(args.postgres)
            report["runs"].append(run(args.postgres, args.studies, args.repeat))
        else:
            with postgres_server() as pg:
                report["runs"].append(run(pg.url, args.studies, args.repeat))
    for r in report["runs"]:
        for q in r["queries"].values():
            q.pop("plan", None)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
