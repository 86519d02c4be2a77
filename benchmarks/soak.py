"""Memory over a long embedded run: is the staged engine's resident memory flat however large the archive?

    python benchmarks/soak.py [--n 3000] [--size 256] [--no-tta] [--every 250] [--host-only]

Generates (or reuses) the deterministic synthetic archive of ``neuron bench``, screens it with ``run_folder`` and
samples, every ``--every`` images, the resident memory (VmRSS) of this process and of its reader processes together,
and the use of ``/dev/shm``. Prints JSON: the samples and the growth of each after the first 1,000 images (the
target: under 10%). Small images and ``--no-tta`` keep a long run within minutes on a CPU; the queues, buffers,
slots and writers under test are the same as at full size. ``--host-only`` puts the benchmark's instant device stage
(``worker.bench_host``) in place of the model, so the host's side runs at its own pace.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from neuron import synthetic
from neuron.settings import Settings
from neuron.work import Route
from worker.bench_host import primed_job, tree_pids
from worker.embedded import ProgressHooks, run_folder
from worker.models import Models, default_batch_size
from worker.pipeline import Pipeline


def rss_mb(pid: int | str = "self") -> float:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:  # ended between the listing and the read
        return 0.0
    return next((int(line.split()[1]) / 1024 for line in lines if line.startswith("VmRSS:")), 0.0)


def tree_rss_mb() -> float:
    """This process and every process below it (the forkserver and the reader processes it starts) together."""
    return sum(rss_mb(pid) for pid in tree_pids(os.getpid()))


def shm_mb() -> float:
    return shutil.disk_usage("/dev/shm").used / 2**20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--tta", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--host-only", action="store_true")
    args = ap.parse_args()

    archive = synthetic.ensure_archives(synthetic.default_workdir() / "archives", args.n, args.size,
                                        flavours=("uncompressed",))["uncompressed"]
    samples: list[tuple[int, float, float, float]] = []
    done = 0
    start = time.perf_counter()

    def on_images(n: int) -> None:
        nonlocal done
        before, done = done, done + n
        if done // args.every != before // args.every:
            samples.append((done, round(time.perf_counter() - start, 1), round(tree_rss_mb(), 1),
                            round(shm_mb(), 1)))

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings.from_env(out_dir=Path(tmp) / "out", weights="untrained", device=args.device,
                                     tta=args.tta)
        # the archive is chest CR: host-only primes that route, a real run loads it with its first file
        models = Models.from_settings(settings, only=[Route.CHEST_XRAY]) if args.host_only else \
            Models.from_settings(settings, lazy=True)
        batch = settings.batch_size or default_batch_size(models.device)
        job = primed_job(models, batch, archive.files[0]) if args.host_only else None
        with Pipeline(models, settings, job=job) as pipeline:
            report = run_folder(archive.root, settings, pipeline=pipeline, hooks=ProgressHooks(on_images=on_images))
    first = next((s for s in samples if s[0] >= 1000), None)
    end = samples[-1] if samples else None

    def growth(k: int) -> float | None:
        return None if first is None or end is None or not first[k] else round(end[k] / first[k] - 1, 3)

    print(json.dumps({"n_images": args.n, "size": args.size, "tta": args.tta, "host_only": args.host_only,
                      "screened": report.screened, "elapsed_s": round(time.perf_counter() - start, 1),
                      "rss_mb_at_1000": first and first[2], "rss_mb_at_end": end and end[2],
                      "rss_growth_after_1000": growth(2),
                      "shm_mb_at_1000": first and first[3], "shm_mb_at_end": end and end[3],
                      "shm_growth_after_1000": growth(3),
                      "samples_images_s_rss_mb_shm_mb": samples}, indent=1))


if __name__ == "__main__":
    main()
