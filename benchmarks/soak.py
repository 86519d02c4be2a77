"""Memory over a long embedded run: is the staged engine's resident memory flat however large the archive?

    python benchmarks/soak.py [--n 3000] [--size 256] [--no-tta] [--every 250]

Generates (or reuses) the deterministic synthetic archive of ``neuron bench``, screens it with ``run_folder`` and
samples this process's resident memory (VmRSS) every ``--every`` images. Prints JSON: the samples and the growth of
the RSS after the first 1,000 images (the target: under 10%). Small images and ``--no-tta`` keep a long run
within minutes on a CPU; the queues, buffers and writers under test are the same as at full size.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from neuron import synthetic
from neuron.settings import Settings
from worker.embedded import ProgressHooks, run_folder


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=3000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--tta", action=argparse.BooleanOptionalAction, default=False)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    archive = synthetic.ensure_archives(synthetic.default_workdir() / "archives", args.n, args.size,
                                        flavours=("uncompressed",))["uncompressed"]
    samples: list[tuple[int, float, float]] = []
    done = 0
    start = time.perf_counter()

    def on_images(n: int) -> None:
        nonlocal done
        before, done = done, done + n
        if done // args.every != before // args.every:
            samples.append((done, round(time.perf_counter() - start, 1), round(rss_mb(), 1)))

    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings.from_env(out_dir=Path(tmp) / "out", weights="untrained", device=args.device,
                                     tta=args.tta)
        report = run_folder(archive.root, settings, hooks=ProgressHooks(on_images=on_images))
    at_1000 = next((rss for n, _, rss in samples if n >= 1000), None)
    end = samples[-1][2] if samples else None
    print(json.dumps({"n_images": args.n, "size": args.size, "tta": args.tta, "screened": report.screened,
                      "elapsed_s": round(time.perf_counter() - start, 1),
                      "rss_mb_at_1000": at_1000, "rss_mb_at_end": end,
                      "growth_after_1000": None if not at_1000 else round(end / at_1000 - 1, 3),
                      "samples_images_s_rss_mb": samples}, indent=1))


if __name__ == "__main__":
    main()
