"""Replaced by ``neuron bench`` (worker/bench.py): one run on one machine measures the model-only and decode-only
bounds and the end-to-end rate (embedded, and Celery when Redis and PostgreSQL are installed) on a deterministic
synthetic CR archive, writes benchmarks/results/<date>-<device>.json and appends a row per result to BENCHMARKS.md.

    neuron bench --n 32 --size 1024          # this 2-core CPU, a few minutes (``make bench``)
    neuron bench --device cuda --n 2048      # a GPU machine

This file only forwards its arguments, for old habits: ``python benchmarks/bench_engine.py --n 32 --size 1024``.
"""

from __future__ import annotations

import sys

from neuron.cli import app

if __name__ == "__main__":
    sys.exit(app(["bench", *sys.argv[1:]]))
