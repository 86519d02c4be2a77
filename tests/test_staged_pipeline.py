"""The staged pipeline: the batching policy on a fake clock, and the defects of the old one-thread loop, each with the
real readers, model and PNG writer behind a gate or a fault put in front of the real reader (no mocks)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from neuron.errors import TransientReadError
from neuron.work import Route, Status, WorkItem
from worker.batching import BatchPolicy
from worker.embedded import ProgressHooks, run_folder
from worker.pipeline import Pipeline, read_item

from .conftest import small_chest


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- the policy ---------------------------------------------------------------------------------------------------
def test_a_full_batch_runs_at_once():
    policy = BatchPolicy(3, 0.2, FakeClock())
    assert policy.add("chest", 1) == [] and policy.add("chest", 2) == []
    (batch,) = policy.add("chest", 3)
    assert batch.items == (1, 2, 3) and batch.reason == "full" and policy.waiting() == 0


def test_a_partial_batch_runs_once_its_oldest_item_has_waited_the_cap():
    clock = FakeClock()
    policy = BatchPolicy(8, 0.25, clock)
    policy.add("chest", "a")
    clock.now += 0.125
    policy.add("chest", "b")
    assert policy.due() == [] and policy.timeout() == pytest.approx(0.125)
    clock.now += 0.125
    (batch,) = policy.due()
    assert batch.items == ("a", "b") and batch.reason == "waited" and policy.timeout() is None


def test_a_busy_device_lets_a_partial_batch_keep_filling():
    """The wait cap serves a trickle on an idle device; while the device is busy a batch gains nothing by leaving
    early, so it keeps filling (a queue of small batches would cost throughput)."""
    clock = FakeClock()
    policy = BatchPolicy(4, 0.25, clock)
    policy.add("chest", 1)
    clock.now += 1.0
    assert policy.due(room=False) == []
    policy.add("chest", 2)
    (batch,) = policy.due(room=True)
    assert batch.items == (1, 2) and batch.reason == "waited"


def test_routes_batch_separately_and_drain_at_the_end():
    clock = FakeClock()
    policy = BatchPolicy(2, 10.0, clock)
    policy.add("chest", 1)
    policy.add("skin", 2)
    (full,) = policy.add("chest", 3)
    assert full.key == "chest" and full.items == (1, 3)
    (rest,) = policy.drain()
    assert rest.key == "skin" and rest.items == (2,) and rest.reason == "drained"


def test_the_wait_restarts_with_each_new_batch():
    clock = FakeClock()
    policy = BatchPolicy(2, 1.0, clock)
    policy.add("chest", 1)
    clock.now += 0.9
    policy.add("chest", 2)  # full: the timer of that batch ends with it
    policy.add("chest", 3)
    clock.now += 0.5
    assert policy.due() == [] and policy.timeout() == pytest.approx(0.5)


def test_the_policy_refuses_nonsense():
    with pytest.raises(ValueError, match="batch size 0"):
        BatchPolicy(0, 0.1)
    with pytest.raises(ValueError, match="max wait"):
        BatchPolicy(4, -1)


# -- the pipeline -------------------------------------------------------------------------------------------------
def _pipeline(models, settings, **parts) -> Pipeline:
    """A pipeline with this test's run settings over the session's loaded models."""
    return Pipeline(models, settings, **parts)


def _items(paths) -> list[WorkItem]:
    return [WorkItem(f"1.2.826.0.1.3680043.99.{i}", str(p), Route.CHEST_XRAY, 1) for i, p in enumerate(paths)]


@dataclass(frozen=True)
class Gate:
    """The real read, held back for one item until the test opens the gate (creates a file): a file on a share that
    stalls. Picklable: it runs in the reader processes."""

    slow_uid: str
    gate: Path

    def __call__(self, item, read):
        if item.sop_instance_uid == self.slow_uid:
            deadline = time.monotonic() + 120
            while not self.gate.exists():
                assert time.monotonic() < deadline, "the gate was never opened"
                time.sleep(0.02)
        return read()

    def open(self) -> None:
        self.gate.touch()


@dataclass(frozen=True)
class Faulty:
    """The real read, except for two items: one raises an unexpected exception, one a storage timeout."""

    broken: str
    transient: str

    def __call__(self, item, read):
        if item.sop_instance_uid == self.broken:
            raise KeyError("(0028,0010) lookup blew up inside a decoder")
        if item.sop_instance_uid == self.transient:
            raise TransientReadError("reading the file timed out (errno ETIMEDOUT): the share may be offline")
        return read()


def _run_in_thread(pipeline: Pipeline, items):
    arrived: dict[str, tuple[float, object]] = {}
    done = threading.Event()

    def sink(outcome):
        arrived[outcome.sop_instance_uid] = (time.monotonic(), outcome)

    def body():
        try:
            pipeline.run(items, sink, None)
        finally:
            done.set()

    threading.Thread(target=body, daemon=True).start()
    return arrived, done


def _wait_for(condition, seconds: float = 120.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_the_wait_cap_holds_while_a_decode_is_still_in_flight(tmp_path, chest_small, untrained_settings, models):
    """The old loop waited on the first decode in flight and ignored --max-wait-ms meanwhile: a partial batch of
    decoded files sat behind one stalled read."""
    files = [small_chest(chest_small, tmp_path / f"{i}.dcm", step=2) for i in range(2)]
    items = _items(files)
    settings = untrained_settings.with_(out_dir=tmp_path / "out", batch_size=16, max_wait_ms=100)
    gate = Gate(items[0].sop_instance_uid, tmp_path / "gate")
    arrived, done = _run_in_thread(_pipeline(models, settings, reader=gate), items)
    assert _wait_for(lambda: items[1].sop_instance_uid in arrived), "the decoded file waited for the stalled one"
    assert items[0].sop_instance_uid not in arrived
    gate.open()
    assert _wait_for(done.is_set)
    assert {o.status for _, o in arrived.values()} == {Status.DONE}


def test_a_slow_file_does_not_hold_back_files_decoded_after_it(tmp_path, chest_small, untrained_settings, models):
    """Decodes are consumed in completion order: with no wait cap at all, the files behind a stalled one fill a batch
    and are screened and written while it stalls."""
    files = [small_chest(chest_small, tmp_path / f"{i}.dcm", step=2) for i in range(4)]
    items = _items(files)
    settings = untrained_settings.with_(out_dir=tmp_path / "out", batch_size=3, max_wait_ms=600_000)
    gate = Gate(items[0].sop_instance_uid, tmp_path / "gate")
    arrived, done = _run_in_thread(_pipeline(models, settings, reader=gate), items)
    later = {i.sop_instance_uid for i in items[1:]}
    assert _wait_for(lambda: later <= set(arrived)), "files decoded after a stalled one were held back"
    assert items[0].sop_instance_uid not in arrived
    gate.open()
    assert _wait_for(done.is_set) and len(arrived) == 4


def test_an_unexpected_exception_reading_one_file_fails_that_file_only(tmp_path, chest_small, untrained_settings,
                                                                       models):
    files = [small_chest(chest_small, tmp_path / f"{i}.dcm", step=2) for i in range(3)]
    items = _items(files)

    settings = untrained_settings.with_(out_dir=tmp_path / "out")
    outcomes = {}
    faulty = Faulty(items[1].sop_instance_uid, items[2].sop_instance_uid)
    _pipeline(models, settings, reader=faulty).run(items, lambda o: outcomes.update({o.sop_instance_uid: o}), None)
    assert outcomes[items[0].sop_instance_uid].status is Status.DONE
    broken = outcomes[items[1].sop_instance_uid]
    assert broken.status is Status.FAILED and "KeyError" in broken.reason and "re-export" in broken.reason
    transient = outcomes[items[2].sop_instance_uid]
    assert transient.status is Status.PENDING and "tried again" in transient.reason


def test_pipeline_results_equal_the_synchronous_path(tmp_path, chest_small, rg1, untrained_settings, models):
    """The staged run and ``infer`` are one computation: same probabilities, same ranks, and the PNG written is the
    overlay of the stored label's map."""
    import cv2

    from neuron_models import cam

    files = [chest_small, small_chest(rg1, tmp_path / "b.dcm", step=3)]
    items = _items(files)
    settings = untrained_settings.with_(out_dir=tmp_path / "out", batch_size=4)
    pipe = _pipeline(models, settings)
    outcomes = {}
    pipe.run(items, lambda o: outcomes.update({o.sop_instance_uid: o}))
    frames = [f for item in items for f in read_item(pipe, item)]
    for item, ref in zip(items, pipe.job.infer(Route.CHEST_XRAY, frames), strict=True):  # the same batch as the run's
        (row,) = outcomes[item.sop_instance_uid].frames
        probs = np.array([s.probability for s in row.scores])
        np.testing.assert_allclose(probs, ref.probabilities, atol=1e-6, rtol=0)
        top = next(s for s in row.scores if s.rank == 1)
        names = models.routes[Route.CHEST_XRAY].model.class_names
        assert top.label == names[ref.order[0]] and top.heatmap_path is not None
        png = cv2.imread(top.heatmap_path)
        np.testing.assert_array_equal(png, cam.overlay(ref.image, ref.cams[0]))
        assert row.decoder  # which decoder produced the pixels is recorded


def test_stats_count_batches_and_their_fill(tmp_path, chest_small, untrained_settings, models):
    files = [small_chest(chest_small, tmp_path / f"{i}.dcm", step=2) for i in range(5)]
    settings = untrained_settings.with_(out_dir=tmp_path / "out", batch_size=2)
    pipe = _pipeline(models, settings)
    pipe.run(_items(files), lambda o: None)
    assert pipe.stats.batches == 3 and pipe.stats.frames == 5 and pipe.stats.fill == pytest.approx(5 / 6)
    assert pipe.stats.why["full"] == 2 and pipe.stats.time_to_first_batch_s is not None
    assert pipe.decode_only(_items(files)) == 5


def test_indexing_streams_into_screening(tmp_path, chest_small, untrained_settings, models):
    """The first batch reaches the model while the walk is still going: here the walk is held at its 66th file until
    an image has been screened (it would wait forever if screening began only after the walk)."""
    folder = tmp_path / "in"
    small_chest(chest_small, folder / "a000.dcm", step=2)
    for i in range(1, 70):
        (folder / f"a{i:03d}.txt").write_text("not a radiograph")
    screened = threading.Event()
    held = []

    def on_scan(n: int) -> None:
        if n == 66:
            held.append(screened.wait(120))

    settings = untrained_settings.with_(out_dir=tmp_path / "out")
    hooks = ProgressHooks(on_scan=on_scan, on_images=lambda n: screened.set())
    report = run_folder(folder, settings, pipeline=_pipeline(models, settings), hooks=hooks)
    assert held == [True] and report.screened == 1 and report.scan.seen == 70


def test_precision_is_part_of_the_settings_hash(untrained_settings):
    from neuron_models.factory import model_config
    from neuron_models.registry import PipelineSpec, preprocess_config, tta_policy

    cfg = model_config("xrv-densenet121-res224-all")
    specs = [PipelineSpec(cfg.name, "untrained", preprocess_config(cfg, untrained_settings),
                          tta_policy(cfg, untrained_settings), precision=p) for p in ("fp32", "fp16", "bf16")]
    assert len({s.config_hash for s in specs}) == 3


def test_an_unknown_precision_is_refused_with_the_choices():
    from neuron.errors import ConfigError
    from neuron.settings import Settings

    with pytest.raises(ConfigError, match="fp32, fp16, bf16"):
        Settings(precision="int8")
