"""Receive rate of ``neuron listen`` from DCMTK's ``storescu``: synthetic 2000x2000 CR instances (``neuron.synthetic``,
about 7.7 MB each, uncompressed), sent over 1 and over 4 parallel associations, in instances/s and MB/s. DCMTK's own
``storescp`` (``--fork``, bit-preserving) on the same files is the comparison: the receiver mercure runs.

    .venv/bin/python -m benchmarks.bench_receive [--n 256] [--associations 1,4] [--receivers neuron,storescp]

What is timed: from the start of the first storescu to the exit of the last, every instance acknowledged. For Neuron
an acknowledgement means the instance is written, fsync'ed, renamed into OUT/received and indexed in SQLite (the
listener runs with quiet times of an hour, so no study is screened during the measurement: this is the receive path
alone). storescp acknowledges once it has written the file, without fsync and without indexing, so its figure is an
upper bound for a storescp-and-watch design, which would still index every file after. The archive is generated
once into ``<tmp>/neuron-bench`` (shared with ``neuron bench``) and read into the page cache before each run; the
receivers write to ``--out-dir`` (default ``<tmp>/neuron-bench/receive``, on the disk of the system temp folder),
emptied after each run. Prints one JSON object and a Markdown row per run for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from neuron.servers import free_port, wait_for_port  # noqa: E402
from neuron.synthetic import default_workdir, ensure_archives  # noqa: E402


def _warm(files: list[Path]) -> int:
    size = 0
    for f in files:
        size += len(f.read_bytes())
    return size


def _send(port: int, files: list[Path], associations: int) -> float:
    """storescu processes, one association each, the files dealt out in turn; seconds until the last exits."""
    parts = [files[i::associations] for i in range(associations)]
    started = time.perf_counter()
    procs = [subprocess.Popen(["storescu", "-aet", "STORESCU", "-aec", "NEURON", "127.0.0.1", str(port),
                               *map(str, part)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for part in parts]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"storescu failed ({p.returncode}): {err[-2000:]}")
    return time.perf_counter() - started


def run_neuron(files: list[Path], out: Path, associations: int) -> tuple[float, int]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEURON_")}
    env.update(NEURON_CACHE_DIR=str(out / ".cache"), PYTHONUNBUFFERED="1")
    log = open(out.parent / f"{out.name}.log", "w")  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-m", "neuron", "listen", "--port", str(port), "--out", str(out),
                             "--weights", "untrained", "--device", "cpu", "--series-quiet", "3600", "--study-quiet",
                             "3600", "--max-wait", "7200", "--min-free-gb", "1", "--max-associations", "8"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_for_port(port, timeout=120)
        seconds = _send(port, files, associations)
        with sqlite3.connect(out / "neuron.db", timeout=30) as conn:
            indexed = conn.execute("select count(*) from instances").fetchone()[0]
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()
    return seconds, indexed


def run_storescp(files: list[Path], out: Path, associations: int) -> tuple[float, int]:
    port = free_port()
    store = out / "storescp"
    store.mkdir(parents=True)
    proc = subprocess.Popen(["storescp", "--fork", "+B", "-aet", "NEURON", "-od", str(store), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, timeout=30)
        seconds = _send(port, files, associations)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return seconds, sum(1 for _ in store.iterdir())


RECEIVERS = {"neuron": run_neuron, "storescp": run_storescp}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=256, help="instances per run")
    parser.add_argument("--size", type=int, default=2000, help="image side in pixels")
    parser.add_argument("--associations", default="1,4", help="comma-separated parallel associations per run")
    parser.add_argument("--receivers", default="neuron,storescp", help="comma-separated: neuron, storescp")
    parser.add_argument("--out-dir", type=Path, default=default_workdir() / "receive")
    parser.add_argument("--workdir", type=Path, default=default_workdir(), help="where the archive is cached")
    args = parser.parse_args()
    archive = ensure_archives(args.workdir, args.n, args.size, flavours=["uncompressed"], workers=2)["uncompressed"]
    files = list(archive.files)
    results = []
    for receiver in args.receivers.split(","):
        for associations in (int(a) for a in args.associations.split(",")):
            out = args.out_dir / f"{receiver}-{associations}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            size = _warm(files)
            load = os.getloadavg()[0]
            seconds, received = RECEIVERS[receiver](files, out, associations)
            results.append({"receiver": receiver, "associations": associations, "instances": len(files),
                            "received": received, "bytes": size, "seconds": round(seconds, 2),
                            "instances_per_s": round(len(files) / seconds, 1),
                            "mb_per_s": round(size / 1e6 / seconds, 1), "load_before": round(load, 2),
                            "load_after": round(os.getloadavg()[0], 2)})
            print(json.dumps(results[-1]), file=sys.stderr)
            shutil.rmtree(out, ignore_errors=True)
    machine = {"cpus": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
               "out_dir": str(args.out_dir), "date": time.strftime("%Y-%m-%d")}
    print(json.dumps({"machine": machine, "results": results}, indent=1))
    for r in results:
        print(f"| {machine['date']} | {r['receiver']} | {r['associations']} | {r['instances']} | "
              f"{r['bytes'] / r['instances'] / 1e6:.1f} | {r['seconds']} | {r['instances_per_s']} | {r['mb_per_s']} | "
              f"{r['load_before']} -> {r['load_after']} |")


if __name__ == "__main__":
    main()
