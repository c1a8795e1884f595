"""Prometheus metrics without a client library: counters, gauges and histograms with labels,
and the text exposition format (version 0.0.4) that every Prometheus scrapes.

One `Registry` per bot process (held by the dialogue manager's observer, never a module global).
Metrics are only touched from the event loop thread, so no locking is needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
LabelValues = tuple[str, ...]


def format_value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def sample_line(name: str, labels: Mapping[str, str], value: float) -> str:
    if not labels:
        return f"{name} {format_value(value)}"
    inner = ",".join(f'{key}="{escape_label(str(val))}"' for key, val in labels.items())
    return f"{name}{{{inner}}} {format_value(value)}"


@dataclass
class Metric:
    """What every metric shares: a name, a help text, label names and a type."""

    name: str
    help: str
    labelnames: tuple[str, ...] = ()
    kind: str = "untyped"

    def _key(self, labels: Mapping[str, object]) -> LabelValues:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}, got {tuple(labels)}")
        return tuple(str(labels[name]) for name in self.labelnames)

    def _labels(self, key: LabelValues) -> dict[str, str]:
        return dict(zip(self.labelnames, key, strict=True))

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {escape_help(self.help)}", f"# TYPE {self.name} {self.kind}"]

    def samples(self) -> Iterator[str]:
        return iter(())

    def exposition(self) -> list[str]:
        return [*self.header(), *self.samples()]


@dataclass
class Counter(Metric):
    kind: str = "counter"
    values: dict[LabelValues, float] = field(default_factory=dict)

    def inc(self, amount: float = 1.0, **labels: object) -> None:
        if amount < 0:
            raise ValueError("a counter only goes up")
        key = self._key(labels)
        self.values[key] = self.values.get(key, 0.0) + amount

    def get(self, **labels: object) -> float:
        return self.values.get(self._key(labels), 0.0)

    def samples(self) -> Iterator[str]:
        if not self.values and not self.labelnames:
            yield sample_line(self.name, {}, 0.0)
        for key, value in sorted(self.values.items()):
            yield sample_line(self.name, self._labels(key), value)


@dataclass
class Gauge(Metric):
    kind: str = "gauge"
    values: dict[LabelValues, float] = field(default_factory=dict)

    def set(self, value: float, **labels: object) -> None:
        self.values[self._key(labels)] = float(value)

    def get(self, **labels: object) -> float:
        return self.values.get(self._key(labels), 0.0)

    def samples(self) -> Iterator[str]:
        for key, value in sorted(self.values.items()):
            yield sample_line(self.name, self._labels(key), value)


@dataclass
class _Series:
    counts: list[int]
    total: float = 0.0
    count: int = 0


@dataclass
class Histogram(Metric):
    kind: str = "histogram"
    buckets: Sequence[float] = LATENCY_BUCKETS_S
    series: dict[LabelValues, _Series] = field(default_factory=dict)

    def observe(self, value: float, **labels: object) -> None:
        key = self._key(labels)
        series = self.series.setdefault(key, _Series([0] * len(self.buckets)))
        for index, bound in enumerate(self.buckets):
            if value <= bound:
                series.counts[index] += 1
        series.total += value
        series.count += 1

    def count(self, **labels: object) -> int:
        series = self.series.get(self._key(labels))
        return series.count if series else 0

    def samples(self) -> Iterator[str]:
        for key, series in sorted(self.series.items()):
            labels = self._labels(key)
            for bound, count in zip(self.buckets, series.counts, strict=True):
                yield sample_line(
                    f"{self.name}_bucket", {**labels, "le": format_value(bound)}, count
                )
            yield sample_line(f"{self.name}_bucket", {**labels, "le": "+Inf"}, series.count)
            yield sample_line(f"{self.name}_sum", labels, series.total)
            yield sample_line(f"{self.name}_count", labels, series.count)


Collector = Callable[[], Iterable[Metric]]
M = TypeVar("M", bound=Metric)


class Registry:
    """Named metrics plus collectors that build metrics at scrape time (live gauges)."""

    def __init__(self) -> None:
        self._metrics: dict[str, Metric] = {}
        self._collectors: list[Collector] = []

    def add(self, metric: M) -> M:
        if metric.name in self._metrics:
            raise ValueError(f"metric {metric.name} is registered twice")
        self._metrics[metric.name] = metric
        return metric

    def counter(self, name: str, help: str, *labels: str) -> Counter:
        return self.add(Counter(name, help, tuple(labels)))

    def gauge(self, name: str, help: str, *labels: str) -> Gauge:
        return self.add(Gauge(name, help, tuple(labels)))

    def histogram(
        self, name: str, help: str, *labels: str, buckets: Sequence[float] = LATENCY_BUCKETS_S
    ) -> Histogram:
        return self.add(Histogram(name, help, tuple(labels), buckets=tuple(buckets)))

    def collect_with(self, collector: Collector) -> None:
        self._collectors.append(collector)

    def expose(self) -> str:
        """Every metric in the text format; a failing collector is skipped, never the scrape."""
        metrics = list(self._metrics.values())
        for collector in self._collectors:
            try:
                metrics.extend(collector())
            except Exception:  # a broken probe must not hide the other metrics
                continue
        lines = [line for metric in metrics for line in metric.exposition()]
        return "\n".join(lines) + "\n"
