"""Shared-memory slots the reader processes write frames into: a fixed number of fixed-size slots in one POSIX shared
memory segment, owned by the process that drives the device.

    SlotPool(n, slot_bytes)   one segment /dev/shm/neuron-slots-<owner pid>-<token>, created once, reused for the run
        acquire() -> slot      the feeder takes a slot per file before asking a reader for it (bounds memory)
        frame(slot, offset)    a frame's pixels as a numpy view: no copy between reader and stager
        release(slot)          once every frame of the file is staged (or the read failed)
        close()                unlinks the segment

Nothing is left in /dev/shm: ``close`` unlinks on every ending the process sees (the ``with`` block, SIGTERM and
SIGINT through ``terminate_cleanly``); after SIGKILL, Python's resource tracker (``multiprocessing.resource_tracker``)
unlinks what its parent left, and ``reclaim_leftovers`` removes by name any segment whose owner process is gone,
at the start of the next run or worker. On CUDA the segment is page-locked once (``cudaHostRegister``), so frames go
from a slot to the GPU with no second host copy, the shape of PyTorch DataLoader's ``pin_memory`` done once.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import shutil
import signal
import threading
from collections import deque
from multiprocessing import shared_memory
from pathlib import Path

import numpy as np

from neuron.errors import ConfigError

log = logging.getLogger(__name__)

PREFIX = "neuron-slots-"
SHM_DIR = Path("/dev/shm")
ALIGN = 64


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reclaim_leftovers(directory: Path = SHM_DIR) -> list[str]:
    """Unlink the slot segments of processes that no longer exist (a run or worker killed with SIGKILL). Returns
    their names."""
    removed = []
    if not directory.is_dir():
        return removed
    for entry in directory.glob(PREFIX + "*"):
        owner = entry.name[len(PREFIX):].split("-", 1)[0]
        if owner.isdigit() and not _alive(int(owner)):
            try:
                entry.unlink()
                removed.append(entry.name)
            except OSError as exc:
                log.warning("could not remove the leftover shared memory %s: %s", entry, exc)
    if removed:
        log.info("removed %d leftover shared-memory segment(s) of ended runs", len(removed))
    return removed


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class SlotPool:
    """``n`` slots of ``slot_bytes`` in one shared memory segment. ``acquire``/``release`` are thread-safe; a slot
    is owned by one file at a time."""

    def __init__(self, n: int, slot_bytes: int, directory: Path = SHM_DIR):
        if n < 1 or slot_bytes < ALIGN:
            raise ValueError(f"a slot pool needs at least one slot of {ALIGN} bytes or more, not {n} x {slot_bytes}")
        reclaim_leftovers(directory)
        self.slot_bytes = aligned(slot_bytes)
        self.n = n
        size = self.n * self.slot_bytes
        if directory.is_dir():
            free = shutil.disk_usage(directory).free
            if size > free:
                raise ConfigError(
                    f"the readers' shared memory needs {size / 2**20:,.0f} MiB ({n} slots of "
                    f"{self.slot_bytes / 2**20:.0f} MiB) and {directory} has {free / 2**20:,.0f} MiB free: lower "
                    f"--batch-size (the slots follow it), or give the container more shared memory (docker run "
                    f"--shm-size, compose shm_size)")
        self.name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            self.shm = shared_memory.SharedMemory(name=self.name, create=True, size=size)
            self.array = np.ndarray((size,), dtype=np.uint8, buffer=self.shm.buf)
        except BaseException:
            # SIGTERM is a SystemExit here (terminate_cleanly) and can land inside the creation, after the name
            # exists and before anything owns it (the resource tracker's registration starts that process on first
            # use): the name goes now, not when the tracker notices this process is gone
            try:
                (SHM_DIR / self.name).unlink()
            except FileNotFoundError:
                pass
            raise
        self._free = deque(range(n))
        self._cond = threading.Condition()
        self._closed = False
        self.registered = False

    # -- ownership --------------------------------------------------------------------------------------------------
    def acquire(self, timeout: float | None = None) -> int | None:
        """A free slot, waiting up to ``timeout`` seconds (None: forever); None when none came free in time."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._free or self._closed, timeout):
                return None
            if self._closed:
                return None
            return self._free.popleft()

    def release(self, slot: int) -> None:
        with self._cond:
            self._free.append(slot)
            self._cond.notify()

    @property
    def free(self) -> int:
        with self._cond:
            return len(self._free)

    # -- views ------------------------------------------------------------------------------------------------------
    def region(self, slot: int) -> np.ndarray:
        start = slot * self.slot_bytes
        return self.array[start:start + self.slot_bytes]

    def frame(self, slot: int, offset: int, shape: tuple[int, ...], dtype: str) -> np.ndarray:
        """The pixels a reader wrote at ``offset`` of ``slot``: a view, valid until the slot is released."""
        dt = np.dtype(dtype)
        nbytes = math.prod(shape) * dt.itemsize  # math.prod: numpy's reduction costs microseconds per call
        start = slot * self.slot_bytes + offset
        return self.array[start:start + nbytes].view(dt).reshape(shape)

    def holds(self, arr) -> bool:
        """Whether a numpy array lies in this pool's segment (a frame a reader wrote)."""
        if not hasattr(arr, "ctypes") or self._closed:
            return False
        start = self.array.ctypes.data
        at = arr.ctypes.data
        return start <= at and at + arr.nbytes <= start + self.array.nbytes

    def page_lock(self) -> None:
        """Register the segment with CUDA once (``cudaHostRegister``): copies from it to the GPU are then
        asynchronous, from the slots themselves."""
        import torch

        if self.registered or not torch.cuda.is_available():
            return
        ptr = self.array.ctypes.data
        err = torch.cuda.cudart().cudaHostRegister(ptr, self.array.nbytes, 0)
        if int(err) != 0:
            log.warning("cudaHostRegister of %d MiB of reader slots failed (error %s): frames are copied to pinned "
                        "memory first", self.array.nbytes >> 20, int(err))
            return
        self.registered = True

    # -- the end ----------------------------------------------------------------------------------------------------
    def close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        if self.registered:
            import torch

            torch.cuda.cudart().cudaHostUnregister(self.array.ctypes.data)
        del self.array
        try:
            self.shm.close()
        except BufferError:  # a view still exported: the mapping goes with the process; the name goes now
            pass
        try:
            self.shm.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> SlotPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def attach(name: str) -> shared_memory.SharedMemory:
    """A reader process's handle on its owner's segment. The readers share their owner's resource tracker (the
    forkserver passes its descriptor on: multiprocessing/forkserver.py), which keeps one set of names, so an attach
    registers nothing new and the owner alone unlinks the segment."""
    return shared_memory.SharedMemory(name=name)


class terminate_cleanly:  # noqa: N801 - used as a context manager, like contextlib's lower-case helpers
    """SIGTERM ends the process through Python (SystemExit) instead of at once, so ``finally`` blocks and ``with``
    exits run and the slots are unlinked; the previous handler is restored on exit. Only in the main thread (signal
    handlers can only be installed there); elsewhere it does nothing."""

    def __enter__(self) -> terminate_cleanly:
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGTERM)
            if self._previous in (signal.SIG_DFL, None):
                signal.signal(signal.SIGTERM, self._exit)
            else:
                self._previous = None
        return self

    @staticmethod
    def _exit(signum, _frame) -> None:
        raise SystemExit(128 + signum)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
