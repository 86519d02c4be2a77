"""What a pipeline counts while it runs: how full the batches were, how long the first one took and where the time
went. Read by the benchmark, the worker's fill report and the Prometheus collector (``worker.metrics``) at scrape time;
updated from several stage threads, hence the lock. Counts only, never anything about a study or a patient."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field


@dataclass
class PipelineStats:
    batch_size: int
    created_at: float = field(default_factory=time.monotonic)
    batches: int = 0
    frames: int = 0
    first_batch_at: float | None = None
    why: Counter[str] = field(default_factory=Counter)  # "full", "waited", "drained"
    files_read: int = 0
    read_seconds: float = 0.0  # readers' read + decode time, summed over threads (and device decodes)
    device_batches: int = 0
    device_seconds: float = 0.0  # preprocessing + model + CAM per batch (on CUDA: between events on its stream)
    queue_wait_seconds: float = 0.0  # per frame: decoded until its batch reached the device, summed
    failures: Counter[str] = field(default_factory=Counter)  # instances not screened, by ``failure_category``
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record(self, frames: int, reason: str, queue_wait_s: float = 0.0) -> None:
        with self.lock:
            if self.first_batch_at is None:
                self.first_batch_at = time.monotonic()
            self.batches += 1
            self.frames += frames
            self.why[reason] += 1
            self.queue_wait_seconds += queue_wait_s

    def read(self, seconds: float, files: int = 1) -> None:
        with self.lock:
            self.files_read += files
            self.read_seconds += seconds

    def ran(self, seconds: float) -> None:
        with self.lock:
            self.device_batches += 1
            self.device_seconds += seconds

    def failed(self, category: str) -> None:
        with self.lock:
            self.failures[category] += 1

    @property
    def fill(self) -> float:
        return self.frames / (self.batches * self.batch_size) if self.batches else 0.0

    @property
    def time_to_first_batch_s(self) -> float | None:
        return None if self.first_batch_at is None else self.first_batch_at - self.created_at
