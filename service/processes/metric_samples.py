"""Prometheus samples as one flat map, `{'name{k="v",...}': value}`, from a server or a registry.

Tests and benchmarks read counters before and after some work: from a server's
`/metrics` page (`scrape`) or from a `CollectorRegistry` in this process. One key
format for both lets one `sample()` read either.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterable, Mapping

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

Samples = Mapping[str, float]


def _key(name: str, labels: Mapping[str, str]) -> str:
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def _flatten(families: Iterable[Metric]) -> dict[str, float]:
    return {
        _key(sample.name, sample.labels): sample.value
        for family in families
        for sample in family.samples
    }


def parse(text: str) -> dict[str, float]:
    """A `/metrics` page, read with prometheus-client's own parser."""
    return _flatten(text_string_to_metric_families(text))


def scrape(port: int, host: str = "127.0.0.1", timeout_s: float = 5.0) -> dict[str, float]:
    """`http://host:port/metrics`, parsed."""
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout_s) as response:
        return parse(response.read().decode())


def sample(source: Samples | CollectorRegistry, name: str, **labels: str) -> float:
    """The sum of the series of `name` that carry these labels (others may differ), from a
    `scrape()` or a registry; 0 when none exists (yet).

    Summing over the labels not given lets a reader ignore a label it does not care
    about (`model`, when one model is served). Histogram buckets differ by `le`: name it.
    """
    samples = _flatten(source.collect()) if isinstance(source, CollectorRegistry) else source
    exact = samples.get(_key(name, labels))
    if exact is not None:
        return exact
    wanted = {f'{k}="{v}"' for k, v in labels.items()}
    total = 0.0
    for key, value in samples.items():
        series, _, inner = key.partition("{")
        if series == name and wanted <= set(_split_labels(inner[:-1])):
            total += value
    return total


def _split_labels(inner: str) -> list[str]:
    """`a="1",b="x,y"` → ['a="1"', 'b="x,y"'] (commas inside quotes kept)."""
    parts, current, quoted, escaped = [], "", False, False
    for char in inner:
        if char == "," and not quoted:
            parts.append(current)
            current = ""
            continue
        current += char
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
    if current:
        parts.append(current)
    return parts
