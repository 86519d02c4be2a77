"""Prometheus metrics of `neuron run` and `neuron worker` (``--metrics-port`` / NEURON_METRICS_PORT).

Nothing is counted on the hot path for Prometheus: a custom collector reads the pipeline's own counters
(``worker.stats.PipelineStats``, which the stages already keep) when Prometheus scrapes, and the numbers are served
from a registry of our own, never the process-global one (two pipelines in one process, as in the tests, do not
collide). Labels are bounded sets (batch reasons, failure categories, the device): no UID, path or reason text.

The endpoint listens on 127.0.0.1 unless NEURON_METRICS_HOST names another address (``0.0.0.0`` inside a container
that Prometheus scrapes from outside; ``Settings.metrics_host``); port 0 picks a free port, which is logged and
returned.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, ProcessCollector, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from neuron.errors import ConfigError
from neuron.settings import Settings

log = logging.getLogger(__name__)

BATCH_REASONS = ("full", "waited", "drained")
FAILURE_CATEGORIES = ("decode", "too-large", "rejected", "unsupported", "no-model", "storage", "device", "other")


class PipelineCollector(Collector):
    """A pipeline's counters as Prometheus metrics, read at scrape time."""

    def __init__(self, pipeline) -> None:
        self.pipeline = pipeline

    def collect(self) -> Iterator[Metric]:
        pipeline = self.pipeline
        st = pipeline.stats
        with st.lock:  # one consistent reading; the stages wait microseconds at most
            frames, batches, why = st.frames, st.batches, dict(st.why)
            files, read_s = st.files_read, st.read_seconds
            device_batches, device_s = st.device_batches, st.device_seconds
            queue_wait_s, failures = st.queue_wait_seconds, dict(st.failures)
            first, created = st.first_batch_at, st.created_at
        info = InfoMetricFamily("neuron_engine", "The engine behind these numbers.")
        info.add_metric([], {"device": str(pipeline.device), "precision": pipeline.job.precision,
                             "routes": ",".join(sorted(r.value for r in pipeline.models.routes))})
        yield info
        yield CounterMetricFamily("neuron_images", "Frames sent to the device (screened or rejected there).",
                                  value=frames)
        busy = time.monotonic() - first if first is not None else 0.0
        yield GaugeMetricFamily("neuron_images_per_second", "Frames per second since the first batch (averaged over "
                                "the whole run; rate(neuron_images_total[1m]) for the current rate).",
                                value=frames / busy if busy > 0 else 0.0)
        per_reason = CounterMetricFamily("neuron_batches", "Batches run, by why they ran: full, waited "
                                         "(--max-wait-ms) or drained (end of input).", labels=["reason"])
        for reason in sorted(set(BATCH_REASONS) | set(why)):
            per_reason.add_metric([reason], why.get(reason, 0))
        yield per_reason
        yield GaugeMetricFamily("neuron_batch_size", "The batch size the engine fills (--batch-size).",
                                value=st.batch_size)
        yield GaugeMetricFamily("neuron_batch_fill_ratio", "Frames per batch over the batch size, over the run "
                                "(0 to 1).", value=frames / (batches * st.batch_size) if batches else 0.0)
        if first is not None:
            yield GaugeMetricFamily("neuron_time_to_first_batch_seconds", "From the engine's creation (model "
                                    "loading included) to its first batch.", value=first - created)
        yield SummaryMetricFamily("neuron_decode_seconds", "Reading and decoding files on the CPU readers (summed "
                                  "over threads; count: files) plus device decodes.", count_value=files,
                                  sum_value=read_s)
        yield SummaryMetricFamily("neuron_device_seconds", "Device job per batch: preprocessing, model, CAM and "
                                  "overlays (count: batches).", count_value=device_batches, sum_value=device_s)
        yield SummaryMetricFamily("neuron_queue_wait_seconds", "Per frame: from decoded to its batch reaching the "
                                  "device (count: frames).", count_value=frames, sum_value=queue_wait_s)
        failed = CounterMetricFamily("neuron_failures", "Instances not screened, by reason category (failed, "
                                     "skipped, or left pending for another try).", labels=["reason"])
        for category in sorted(set(FAILURE_CATEGORIES) | set(failures)):
            failed.add_metric([category], failures.get(category, 0))
        yield failed
        yield from _gpu_memory(pipeline.device)


def _gpu_memory(device) -> Iterator[Metric]:
    """On CUDA, the memory torch's allocator holds for tensors now and at its peak; nothing on the CPU."""
    if device.type != "cuda":
        return
    import torch

    yield GaugeMetricFamily("neuron_gpu_memory_allocated_bytes", "GPU memory held by tensors now.",
                            value=torch.cuda.memory_allocated(device))
    yield GaugeMetricFamily("neuron_gpu_memory_max_allocated_bytes", "Peak GPU memory held by tensors since start.",
                            value=torch.cuda.max_memory_allocated(device))


@dataclass
class MetricsServer:
    server: WSGIServer
    host: str
    port: int
    registry: CollectorRegistry

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start(settings: Settings, pipeline, host: str | None = None) -> MetricsServer | None:
    """Serve the pipeline's metrics at http://HOST:PORT/metrics on a daemon thread, or nothing when no metrics port is
    set. ``host``: default NEURON_METRICS_HOST, else 127.0.0.1. Raises ConfigError when the port cannot be bound."""
    if settings.metrics_port is None:
        return None
    host = host or settings.metrics_host
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PipelineCollector(pipeline))
    ProcessCollector(registry=registry)  # CPU seconds, resident memory, open files of this process
    try:
        server, _thread = start_http_server(settings.metrics_port, addr=host, registry=registry)
    except OSError as exc:
        raise ConfigError(f"metrics port {settings.metrics_port} on {host} cannot be opened ({exc.strerror or exc}); "
                          f"choose another --metrics-port (NEURON_METRICS_PORT), or 0 for a free one") from exc
    metrics = MetricsServer(server, host, server.server_port, registry)
    log.info("Prometheus metrics at %s", metrics.url)
    return metrics
