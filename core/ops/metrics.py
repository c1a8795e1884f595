"""Prometheus metrics through `prometheus_client`.

One `CollectorRegistry` per bot process: the OpsServer's (`app_registry()`), never the library's
global default registry, so that processes and tests stay apart. What is counted lives in a
`MetricSet` (metrics in no registry of their own, collected together): the dialogue manager's
`TurnObserver` holds one, the OpsServer another, and the OpsServer's registry collects both.
Live figures (model loaded, platform connected, turns in flight, the backend's `stats()`, GPU
memory) are `LiveFigures`, built at scrape time; a failing source is skipped, never the scrape.

The exposition is the text format, version 0.0.4, without the `_created` series, so a scrape
shows the same sample names it always did.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest

if TYPE_CHECKING:
    from core.generation.base import GenerationBackend

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_NAME_CHARS = re.compile(r"[^a-zA-Z0-9_]")
_CREATED = "_created"


def app_registry() -> CollectorRegistry:
    """A registry of the app's own (collectors are registered by hand, names not probed)."""
    return CollectorRegistry(auto_describe=False)


def exposition(registry: CollectorRegistry) -> str:
    return generate_latest(registry).decode("utf-8")


class MetricSet:
    """Counters and histograms outside any registry; a registry collects them as one collector."""

    def __init__(self) -> None:
        self._metrics: list[Counter | Gauge | Histogram] = []

    def counter(self, name: str, help: str, *labels: str) -> Counter:
        metric = Counter(name, help, labels, registry=None)
        self._metrics.append(metric)
        return metric

    def histogram(
        self,
        name: str,
        help: str,
        *labels: str,
        buckets: Iterable[float] = LATENCY_BUCKETS_S,
    ) -> Histogram:
        metric = Histogram(name, help, labels, registry=None, buckets=tuple(buckets))
        self._metrics.append(metric)
        return metric

    def collect(self) -> Iterator[Metric]:
        for metric in self._metrics:
            for family in metric.collect():
                family.samples = [s for s in family.samples if not s.name.endswith(_CREATED)]
                yield family


def total(counter: Counter, **match: str) -> float:
    """A counter's value summed over every label set that includes `match`."""
    return sum(
        sample.value
        for family in counter.collect()
        for sample in family.samples
        if sample.name.endswith("_total") and match.items() <= sample.labels.items()
    )


class LiveFigures:
    """A collector of metrics built at scrape time by `source`; a failing source shows nothing."""

    def __init__(self, source: Callable[[], Iterable[Metric]]) -> None:
        self.source = source

    def collect(self) -> list[Metric]:
        try:
            return list(self.source())
        except Exception:  # a broken probe must not hide the other metrics
            return []


def gauge(name: str, help: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, help, value=value)


def backend_figures(backend: GenerationBackend | None) -> dict[str, float]:
    """The backend's public `stats()` (engine steps, KV-cache use…), none before it exists."""
    if backend is None:
        return {}
    return {str(key): float(value) for key, value in backend.stats().items()}


def backend_metrics(figures: Mapping[str, float]) -> list[Metric]:
    """`kobot_backend_<key>` for each figure: a counter when the key ends in `_total`."""
    metrics: list[Metric] = []
    for key, value in sorted(figures.items()):
        name = f"kobot_backend_{_NAME_CHARS.sub('_', key)}"
        help_text = f"Reported by the generation backend: {key}"
        if key.endswith("_total"):
            metrics.append(CounterMetricFamily(name, help_text, value=max(value, 0.0)))
        else:
            metrics.append(gauge(name, help_text, value))
    return metrics


def gpu_metrics() -> list[Metric]:
    """CUDA memory per device, only when torch already initialised CUDA (a scrape never does)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    allocated = GaugeMetricFamily(
        "kobot_gpu_memory_allocated_bytes", "CUDA memory held by tensors", labels=["device"]
    )
    reserved = GaugeMetricFamily(
        "kobot_gpu_memory_reserved_bytes", "CUDA memory reserved by torch", labels=["device"]
    )
    for index in range(torch.cuda.device_count()):
        allocated.add_metric([f"cuda:{index}"], torch.cuda.memory_allocated(index))
        reserved.add_metric([f"cuda:{index}"], torch.cuda.memory_reserved(index))
    return [allocated, reserved]
