"""A strict reader of the Prometheus text format, for the /metrics tests."""

from __future__ import annotations

import re

_SAMPLE = re.compile(
    r"^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)"
    r'(?:\{(?P<labels>(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*)\})?'
    r" (?P<value>[-+]?(?:\d+(?:\.\d*)?(?:[eE][-+]?\d+)?|NaN|Inf|\+Inf|-Inf))$"
)
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\.)*)"')
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse_exposition(text: str) -> tuple[Samples, dict[str, str]]:
    """Every sample and every metric's type; AssertionError on anything out of format."""
    assert text.endswith("\n"), "the exposition ends with a newline"
    samples: Samples = {}
    types: dict[str, str] = {}
    for line in text.splitlines():
        if line.startswith("# HELP ") or not line:
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert name not in types, f"{name} typed twice"
            assert kind in {"counter", "gauge", "histogram", "summary", "untyped"}
            types[name] = kind
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name = match["name"]
        family = re.sub(r"_(bucket|sum|count)$", "", name)
        assert name in types or family in types, f"{name} has no # TYPE line before it"
        labels = frozenset(_LABEL.findall(match["labels"] or ""))
        assert (name, labels) not in samples, f"duplicate sample {line!r}"
        samples[(name, labels)] = float(match["value"])
    return samples, types


def sample(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def check_histograms(samples: Samples, types: dict[str, str]) -> None:
    """Buckets are cumulative and end with +Inf equal to _count."""
    for name, kind in types.items():
        if kind != "histogram":
            continue
        series: dict[frozenset[tuple[str, str]], list[tuple[float, float]]] = {}
        for (sample_name, labels), value in samples.items():
            if sample_name == f"{name}_bucket":
                rest = frozenset(kv for kv in labels if kv[0] != "le")
                le = float(dict(labels)["le"].replace("+Inf", "inf"))
                series.setdefault(rest, []).append((le, value))
        for rest, buckets in series.items():
            counts = [count for _, count in sorted(buckets)]
            assert counts == sorted(counts), f"{name} buckets are not cumulative"
            assert sorted(buckets)[-1][0] == float("inf")
            assert counts[-1] == samples[(f"{name}_count", rest)]
