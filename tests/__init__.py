"""The test suite. Run here, before the conftest imports anything that loads torch or ONNX Runtime: `make test` runs
the suite in two pytest processes (pytest-xdist); each of them, and every process its tests start, gets its share of
the cores for the intra-op thread pools (OMP_NUM_THREADS, read once when torch loads). Two processes that each ran
threads for every core left OpenMP threads waiting at a barrier for a sibling the other process had descheduled: the
training tests took 2.8 x their time."""

import os

if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1)
                                                     // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))
