"""The metrics module over `prometheus_client`: one registry per app, the exposition kobot always
served (text format 0.0.4, no `_created` series), live figures that never break a scrape."""

from __future__ import annotations

import prometheus_client

from core.ops.metrics import (
    CONTENT_TYPE,
    LiveFigures,
    MetricSet,
    app_registry,
    backend_metrics,
    exposition,
    gauge,
    total,
)
from core.ops.turns import TurnObserver
from tests.support.dialogue import message
from tests.support.prometheus import check_histograms, parse_exposition, sample


def test_a_metric_set_renders_in_the_text_format_without_created_series() -> None:
    metrics = MetricSet()
    hits = metrics.counter("kobot_hits_total", "Hits", "platform")
    metrics.counter("kobot_plain_total", "Never touched")
    latency = metrics.histogram("kobot_latency_seconds", "Latency", "kind", buckets=(0.1, 1.0))
    hits.labels(platform="telegram").inc()
    hits.labels(platform='we"ird\\name\n').inc(2)
    for seconds in (0.05, 0.5, 5.0):
        latency.labels(kind="chat").observe(seconds)
    registry = app_registry()
    registry.register(metrics)
    samples, types = parse_exposition(exposition(registry))
    assert types["kobot_hits_total"] == "counter" and types["kobot_latency_seconds"] == "histogram"
    assert sample(samples, "kobot_hits_total", platform="telegram") == 1
    assert sample(samples, "kobot_hits_total", platform='we\\"ird\\\\name\\n') == 2
    assert sample(samples, "kobot_plain_total") == 0  # a label-less counter starts at 0
    assert sample(samples, "kobot_latency_seconds_bucket", kind="chat", le="1.0") == 2
    assert sample(samples, "kobot_latency_seconds_count", kind="chat") == 3
    assert not [name for name, _ in samples if name.endswith("_created")]
    check_histograms(samples, types)
    assert CONTENT_TYPE.startswith("text/plain; version=0.0.4")


def test_total_sums_the_label_sets_that_match() -> None:
    errors = MetricSet().counter("kobot_errors_total", "Errors", "type", "platform")
    errors.labels(type="storage", platform="a").inc()
    errors.labels(type="storage", platform="b").inc(2)
    errors.labels(type="unhandled", platform="a").inc()
    assert total(errors) == 4
    assert total(errors, type="storage") == 3
    assert total(errors, type="storage", platform="a") == 1
    assert total(errors, type="none") == 0


def test_a_failing_source_of_live_figures_never_breaks_the_scrape() -> None:
    def broken() -> list[object]:
        raise RuntimeError("probe failed")

    registry = app_registry()
    registry.register(LiveFigures(lambda: [gauge("kobot_ok", "Fine", 1.0)]))
    registry.register(LiveFigures(broken))  # type: ignore[arg-type]
    samples, _ = parse_exposition(exposition(registry))
    assert sample(samples, "kobot_ok") == 1


def test_backend_figures_ending_in_total_are_counters() -> None:
    registry = app_registry()
    registry.register(LiveFigures(lambda: backend_metrics({"steps_total": 7, "kv.used": 3})))
    samples, types = parse_exposition(exposition(registry))
    assert types == {"kobot_backend_kv_used": "gauge", "kobot_backend_steps_total": "counter"}
    assert sample(samples, "kobot_backend_steps_total") == 7


async def test_each_observer_counts_in_its_own_registry_never_the_global_one() -> None:
    first, second = TurnObserver(), TurnObserver()
    with first.turn(message("안녕")):
        pass
    assert (first.totals().messages, second.totals().messages) == (1, 0)
    default = exposition(prometheus_client.REGISTRY)
    assert "kobot_" not in default
