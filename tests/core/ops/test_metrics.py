"""The hand-written Prometheus exposition: counters, gauges, histograms, labels, escaping."""

from __future__ import annotations

import pytest

from core.ops.metrics import Registry, format_value
from tests.core.ops.helpers import check_histograms, parse_exposition, sample


def test_counters_gauges_and_histograms_render_in_the_text_format() -> None:
    registry = Registry()
    hits = registry.counter("kobot_hits_total", "Hits", "platform")
    registry.counter("kobot_plain_total", "Never touched")
    depth = registry.gauge("kobot_depth", "Depth")
    latency = registry.histogram("kobot_latency_seconds", "Latency", "kind", buckets=(0.1, 1.0))
    hits.inc(platform="telegram")
    hits.inc(2, platform='we"ird\\name\n')
    depth.set(3)
    for value in (0.05, 0.5, 5.0):
        latency.observe(value, kind="chat")
    samples, types = parse_exposition(registry.expose())
    assert types["kobot_hits_total"] == "counter" and types["kobot_latency_seconds"] == "histogram"
    assert sample(samples, "kobot_hits_total", platform="telegram") == 1
    assert sample(samples, "kobot_hits_total", platform='we\\"ird\\\\name\\n') == 2
    assert sample(samples, "kobot_plain_total") == 0  # a label-less counter starts at 0
    assert sample(samples, "kobot_depth") == 3
    assert sample(samples, "kobot_latency_seconds_bucket", kind="chat", le="0.1") == 1
    assert sample(samples, "kobot_latency_seconds_bucket", kind="chat", le="1") == 2
    assert sample(samples, "kobot_latency_seconds_count", kind="chat") == 3
    assert sample(samples, "kobot_latency_seconds_sum", kind="chat") == pytest.approx(5.55)
    check_histograms(samples, types)


def test_labels_must_match_and_counters_only_go_up() -> None:
    registry = Registry()
    counter = registry.counter("kobot_x_total", "X", "platform")
    with pytest.raises(ValueError, match="takes labels"):
        counter.inc(kind="chat")
    with pytest.raises(ValueError, match="only goes up"):
        counter.inc(-1, platform="a")
    with pytest.raises(ValueError, match="twice"):
        registry.counter("kobot_x_total", "again")


def test_a_failing_collector_never_breaks_the_scrape() -> None:
    registry = Registry()
    registry.gauge("kobot_ok", "Fine").set(1)

    def broken() -> list[object]:
        raise RuntimeError("probe failed")

    registry.collect_with(broken)  # type: ignore[arg-type]
    samples, _ = parse_exposition(registry.expose())
    assert sample(samples, "kobot_ok") == 1


@pytest.mark.parametrize(
    ("value", "text"), [(3.0, "3"), (0.25, "0.25"), (float("inf"), "+Inf"), (float("nan"), "NaN")]
)
def test_values_are_written_as_prometheus_reads_them(value: float, text: str) -> None:
    assert format_value(value) == text
