"""Prometheus metrics: a real pipeline screens real files while the metrics server runs in-process; the
numbers come back over HTTP from /metrics and are parsed with prometheus_client's own parser."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from neuron.errors import ConfigError
from neuron.work import Route, Status, WorkItem

from .conftest import small_chest

pytestmark = pytest.mark.timeout(120)


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics as {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        body = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body) for s in family.samples}


@pytest.fixture(scope="module")
def screened(tmp_path_factory, chest_small, untrained_settings, models):
    """A fresh pipeline (the session's models, its own counters) with a metrics server on a free port, after screening
    two real radiographs and one truncated copy of one."""
    from worker import metrics
    from worker.pipeline import Pipeline

    tmp = tmp_path_factory.mktemp("metrics")
    settings = untrained_settings.with_(out_dir=tmp / "out", batch_size=4, metrics_port=0)
    eng = Pipeline(models, settings)
    server = metrics.start(settings, eng)
    good = [chest_small, small_chest(chest_small, tmp / "b.dcm", step=2)]
    raw = chest_small.read_bytes()
    cut = tmp / "cut.dcm"
    cut.write_bytes(raw[: len(raw) // 2])
    items = [WorkItem(f"1.2.826.0.1.3680043.98.{i}", str(p), Route.CHEST_XRAY, 1)
             for i, p in enumerate([*good, cut])]
    outcomes = []
    eng.run(items, outcomes.append)
    yield server, eng, outcomes
    server.close()


def test_metrics_report_images_fill_times_and_failures_of_a_real_run(screened):
    server, eng, outcomes = screened
    assert server.host == "127.0.0.1" and server.port > 0  # port 0: a free one was picked
    m = scrape(server.url)
    done = [o for o in outcomes if o.status is Status.DONE]
    assert len(done) == 2 and sum(len(o.frames) for o in done) == 2
    assert m[("neuron_images_total", ())] == 2 == eng.stats.frames
    assert 0 < m[("neuron_batch_fill_ratio", ())] <= 1
    assert m[("neuron_batch_size", ())] == 4
    assert sum(v for (name, _), v in m.items() if name == "neuron_batches_total") == eng.stats.batches >= 1
    assert m[("neuron_decode_seconds_count", ())] == 3 and m[("neuron_decode_seconds_sum", ())] > 0
    assert m[("neuron_device_seconds_count", ())] == eng.stats.batches
    assert m[("neuron_device_seconds_sum", ())] > 0
    assert m[("neuron_queue_wait_seconds_count", ())] == 2 and m[("neuron_queue_wait_seconds_sum", ())] >= 0
    # the truncated copy: one failure under its category, never its reason text
    failures = {dict(labels)["reason"]: v for (name, labels), v in m.items() if name == "neuron_failures_total"}
    assert failures["decode"] == 1 and sum(failures.values()) == 1
    assert m[("neuron_time_to_first_batch_seconds", ())] > 0
    assert m[("neuron_engine_info", (("device", "cpu"), ("precision", "fp32"), ("routes", "chest-xray")))] == 1
    assert not any(name.startswith("neuron_gpu_memory") for name, _ in m)  # on the CPU: absent
    assert not any("1.2.826" in str(labels) for _, labels in m)  # no UID in any label


def test_a_taken_metrics_port_is_refused_with_the_fix(screened):
    from worker import metrics

    server, eng, _ = screened
    with pytest.raises(ConfigError, match=rf"metrics port {server.port} on 127.0.0.1 cannot be opened.*or 0 for a "):
        metrics.start(eng.settings.with_(metrics_port=server.port), eng)


def test_no_metrics_port_serves_nothing(screened):
    from worker import metrics

    _, eng, _ = screened
    assert metrics.start(eng.settings.with_(metrics_port=None), eng) is None
