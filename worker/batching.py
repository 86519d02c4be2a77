"""When to run a batch: the scheduling decision of the engine, as a small torch-free object tested on a fake clock.

Frames are grouped by key (the route: one model per batch). A group runs as soon as it holds ``batch_size`` frames,
or once its oldest frame has waited ``max_wait_s`` and the device has room for it (a trickling queue must not hold a
study back; a busy device gains nothing from a queue of small batches, so while it is busy a batch keeps filling),
or when the input ends. The engine asks ``timeout()`` how long it may block waiting for more decoded frames, so the
wait cap holds even while decodes are still in flight (celery-batches' flush-by-size-or-interval buffer and the
dynamic batching of inference servers such as NVIDIA Triton's).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Batch(Generic[T]):
    key: Hashable
    items: tuple[T, ...]
    reason: str  # "full", "waited" or "drained": why it ran now (batch-fill statistics)


@dataclass
class BatchPolicy(Generic[T]):
    batch_size: int
    max_wait_s: float
    clock: Callable[[], float] = time.monotonic
    _groups: dict[Hashable, list[T]] = field(default_factory=dict, init=False)
    _since: dict[Hashable, float] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch size {self.batch_size} must be at least 1")
        if self.max_wait_s < 0:
            raise ValueError(f"max wait {self.max_wait_s} s must be 0 or more")

    def add(self, key: Hashable, item: T) -> list[Batch[T]]:
        """Queue one item; returns the batch it completed, if any."""
        group = self._groups.setdefault(key, [])
        if not group:
            self._since[key] = self.clock()
        group.append(item)
        if len(group) >= self.batch_size:
            return [self._take(key, "full")]
        return []

    def due(self, room: bool = True) -> list[Batch[T]]:
        """Partial batches whose oldest item has waited ``max_wait_s`` or longer, if the device has ``room``."""
        if not room:
            return []
        now = self.clock()
        return [self._take(k, "waited") for k, t0 in list(self._since.items()) if now - t0 >= self.max_wait_s]

    def timeout(self) -> float | None:
        """Seconds until the next partial batch is due (0 if one is due now); None when nothing waits."""
        if not self._since:
            return None
        return max(0.0, min(self._since.values()) + self.max_wait_s - self.clock())

    def drain(self) -> list[Batch[T]]:
        """Everything still waiting (the input has ended)."""
        return [self._take(k, "drained") for k in list(self._since)]

    def waiting(self) -> int:
        return sum(len(g) for g in self._groups.values())

    def _take(self, key: Hashable, reason: str) -> Batch[T]:
        items = self._groups.pop(key)
        del self._since[key]
        return Batch(key, tuple(items), reason)
