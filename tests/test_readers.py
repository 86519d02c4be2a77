"""Reader processes and their shared-memory slots (worker/readers.py, worker/slots.py): real processes reading real
files; a reader killed mid-read, and the driving process ended by SIGTERM or SIGKILL, each leave nothing behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from neuron.work import Route, Status, WorkItem
from worker.pipeline import Pipeline
from worker.slots import PREFIX, SHM_DIR, SlotPool, reclaim_leftovers

from .conftest import seed_untrained_cache, small_chest
from .test_distributed import make_archive

pytestmark = pytest.mark.timeout(300)


def segments(pid: int) -> list[str]:
    return sorted(p.name for p in SHM_DIR.glob(f"{PREFIX}{pid}-*"))


@dataclass(frozen=True)
class DieOn:
    """Kills the reader process that reads ``uid`` (as the OOM killer or a decoder crash would); with ``once`` only
    the first time (a marker file remembers it), so the second reader reads the file."""

    uid: str
    marker: Path
    once: bool = False

    def __call__(self, item, read):
        if item.sop_instance_uid == self.uid and not (self.once and self.marker.exists()):
            self.marker.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        return read()


def _items(paths) -> list[WorkItem]:
    return [WorkItem(f"1.2.826.0.1.3680043.97.{i}", str(p), Route.CHEST_XRAY, 1) for i, p in enumerate(paths)]


@pytest.mark.parametrize("once", [True, False], ids=["dies-once", "dies-twice"])
def test_a_reader_that_dies_costs_only_its_file_and_gives_its_slot_back(tmp_path, chest_small, untrained_settings,
                                                                        models, once):
    files = [small_chest(chest_small, tmp_path / f"{i}.dcm", step=4) for i in range(4)]
    items = _items(files)
    settings = untrained_settings.with_(out_dir=tmp_path / "out", batch_size=2)
    outcomes = {}
    with Pipeline(models, settings, reader=DieOn(items[1].sop_instance_uid, tmp_path / "died", once)) as pipe:
        pipe.run(items, lambda o: outcomes.update({o.sop_instance_uid: o}))
        readers, slots = pipe.readers()
        segment = slots.name
        assert slots.free == slots.n  # every slot came back, the dead reader's too
        assert readers.deaths == (1 if once else 2)
        assert len(readers._readers) == settings.readers and all(  # noqa: SLF001 - replaced, all alive
            r.process.is_alive() for r in readers._readers)  # noqa: SLF001
    victim = outcomes.pop(items[1].sop_instance_uid)
    assert {o.status for o in outcomes.values()} == {Status.DONE} and len(outcomes) == 3
    if once:
        assert victim.status is Status.DONE  # read again by another reader
    else:
        assert victim.status is Status.FAILED and "reader process ended" in victim.reason
        assert "again on a second try" in victim.reason and "re-export" in victim.reason
    assert segment not in segments(os.getpid())  # closed: the segment is unlinked (other tests' pipelines may be open)


def test_reclaiming_removes_the_segments_of_ended_processes_only(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / f"{PREFIX}{dead}-abcd").write_bytes(b"x")
    (tmp_path / f"{PREFIX}{os.getpid()}-live").write_bytes(b"x")
    assert reclaim_leftovers(tmp_path) == [f"{PREFIX}{dead}-abcd"]
    assert [p.name for p in tmp_path.iterdir()] == [f"{PREFIX}{os.getpid()}-live"]


def test_a_stop_signal_during_the_segments_creation_leaves_no_name_behind(monkeypatch):
    """SIGTERM ends a run through SystemExit (``terminate_cleanly``), which can come while the segment is being
    created: its name exists, nothing owns it yet. The pool unlinks it before the exception goes on (the resource
    tracker would only when it notices the process is gone, after a check like this one)."""
    from multiprocessing import resource_tracker

    def stop(*_):
        raise SystemExit(128 + signal.SIGTERM)

    before = set(os.listdir(SHM_DIR))
    monkeypatch.setattr(resource_tracker, "register", stop)  # the last step of SharedMemory's creation
    with pytest.raises(SystemExit):
        SlotPool(2, 1 << 16)
    assert [n for n in set(os.listdir(SHM_DIR)) - before if n.startswith(f"{PREFIX}{os.getpid()}-")] == []


def test_a_pool_larger_than_dev_shm_is_refused_with_the_fix(tmp_path):
    from neuron.errors import ConfigError

    free = os.statvfs(SHM_DIR).f_bavail * os.statvfs(SHM_DIR).f_frsize
    with pytest.raises(ConfigError, match=r"--batch-size.*shm-size"):
        SlotPool(4, free // 2)


def test_readers_start_by_spawn_and_still_read_where_tmpdir_is_too_deep_for_the_forkserver_socket(
        tmp_path, chest_small, untrained_settings, models, monkeypatch):
    """multiprocessing's forkserver binds a Unix socket under TMPDIR (at most 107 bytes of path): a deep TMPDIR, as a
    CI job or the benchmark's scratch gives, used to fail every run with 'AF_UNIX path too long'."""
    import tempfile

    from worker.readers import start_method

    deep = tmp_path / ("d" * 60) / ("e" * 40)
    deep.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(deep))
    assert start_method() == "spawn"
    items = _items([small_chest(chest_small, tmp_path / f"{i}.dcm", step=4) for i in range(2)])
    outcomes = []
    with Pipeline(models, untrained_settings.with_(out_dir=tmp_path / "out", batch_size=2)) as pipe:
        pipe.run(items, outcomes.append)
        assert pipe.readers()[0].context.get_start_method() == "spawn"
    assert [o.status for o in outcomes] == [Status.DONE, Status.DONE]
    monkeypatch.undo()
    assert start_method() == "forkserver"


def _run(folder: Path, out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "neuron", "run", str(folder), "--out", str(out), "--device", "cpu",
                             "--weights", "untrained", "--batch-size", "2"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _wait_for_segment(proc: subprocess.Popen) -> list[str]:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if found := segments(proc.pid):
            return found
        time.sleep(0.05)
    raise AssertionError(f"`neuron run` made no shared memory (exit {proc.poll()}): {proc.stderr.read()[-2000:]}")


def test_sigterm_and_sigkill_of_neuron_run_leave_nothing_in_dev_shm(tmp_path, chest_small, untrained_settings):
    folder, out = tmp_path / "archive", tmp_path / "out"
    make_archive(folder, chest_small, studies=40)
    seed_untrained_cache(untrained_settings, out)
    # SIGTERM: the run ends through Python and unlinks its slots
    proc = _run(folder, out)
    _wait_for_segment(proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) != 0
    assert segments(proc.pid) == []
    # SIGKILL: nothing of the run's can clean up; its resource tracker (a separate process) or the next run does
    proc = _run(folder, out)
    _wait_for_segment(proc)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and everything it started, its resource tracker included
    proc.wait(timeout=60)
    assert segments(proc.pid), "SIGKILL of the whole group should leave the segment for the next run to reclaim"
    again = _run(folder, out)
    _wait_for_segment(again)
    assert segments(proc.pid) == []  # reclaimed by the next run's start
    again.send_signal(signal.SIGTERM)
    again.wait(timeout=120)
    assert segments(again.pid) == []


def test_frames_read_by_the_reader_processes_equal_pydicom_bit_for_bit_in_every_syntax(tmp_path):
    """The reader processes write each frame into its slot (or send it inline when it does not fit): the values are
    pydicom's own decode's, file by file, over every sample file of every transfer syntax (tests/test_decode.py)."""
    import threading

    import pydicom

    from worker.decode import select_frames
    from worker.readers import ReaderConfig, ReaderPool

    from .test_decode import ALL_FILES, FRAMES, LIMIT, reference

    checked, problems, lock = [], [], threading.Lock()
    with SlotPool(4, 1 << 22) as slots:  # 4 MiB slots: the larger files come back inline, and are checked too
        pool = ReaderPool(2, ReaderConfig(FRAMES, LIMIT, frozenset()), slots)

        def done(item, slot, result, _seconds):
            try:
                if isinstance(result, BaseException):
                    raise result
                n = int(pydicom.dcmread(item.file_path, stop_before_pixels=True, force=True).get("NumberOfFrames", 1)
                        or 1)
                ref = reference(item.file_path, select_frames(n, FRAMES))
                assert [f.pixels.dtype for f in result] == [r.dtype for r in ref], item.file_path
                for f, r in zip(result, ref, strict=True):
                    np.testing.assert_array_equal(f.pixels, r, err_msg=item.file_path)
                with lock:
                    checked.append((item.file_path, any(slots.holds(f.pixels) for f in result)))
            except BaseException as exc:  # noqa: BLE001 - collected, asserted below
                with lock:
                    problems.append(f"{item.file_path}: {exc!r}")
            finally:
                slots.release(slot)

        try:
            for i, path in enumerate(ALL_FILES):
                slot = slots.acquire(timeout=120)
                pool.submit(WorkItem(f"1.2.3.{i}", str(path), Route.CHEST_XRAY, 1), slot, done)
            assert pool.wait_idle(timeout=240)
        finally:
            pool.close()
    assert problems == []
    assert len(checked) == len(ALL_FILES) and any(in_slot for _, in_slot in checked)


def test_reader_processes_outlive_a_stop_signal_sent_to_their_process_group(tmp_path, chest_small):
    """SIGTERM and SIGINT reach every process of the group (Ctrl-C, systemd's KillMode=control-group, `kill -TERM
    -PGID`); acting on them is the parent's business. The readers ignore both from their fork on (their forkserver
    does, worker.reader_signals), even while still starting, and go on answering, so a worker that drains its
    studies at a warm shutdown still has them read; they end when the parent closes the pool."""
    import threading

    from worker.readers import ReaderConfig, ReaderPool

    files = [small_chest(chest_small, tmp_path / f"{i}.dcm", step=4) for i in range(4)]
    answers, lock = [], threading.Lock()
    with SlotPool(4, 1 << 22) as slots:
        pool = ReaderPool(2, ReaderConfig(1, 1 << 26, frozenset()), slots)

        def done(item, slot, result, _seconds):
            with lock:
                answers.append(result)
            slots.release(slot)

        def stop_signals() -> list[int]:
            pids = [r.process.pid for r in pool._readers]  # noqa: SLF001 - the processes under test
            for pid in pids:
                os.kill(pid, signal.SIGTERM)
                os.kill(pid, signal.SIGINT)
            return pids

        try:
            pids = stop_signals()  # at once: the readers are still starting
            pool.submit(_items(files[:1])[0], slots.acquire(timeout=60), done)
            assert pool.wait_idle(timeout=60)
            assert stop_signals() == pids  # and again, idle
            time.sleep(0.5)
            assert all(r.process.is_alive() for r in pool._readers) and pool.deaths == 0  # noqa: SLF001
            for item in _items(files)[1:]:
                pool.submit(item, slots.acquire(timeout=60), done)
            assert pool.wait_idle(timeout=60)
            assert [r.process.pid for r in pool._readers] == pids  # noqa: SLF001 - the same processes answered
        finally:
            pool.close()
        assert not any(r.process.is_alive() for r in pool._readers)  # noqa: SLF001 - closing ends them
    assert len(answers) == 4 and all(isinstance(a, list) and len(a) == 1 for a in answers), answers
