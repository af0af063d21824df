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
    """One series' value from a `scrape()` or a registry; 0 when it does not exist (yet).

    The labels must be the series' labels exactly, as with `get_sample_value`.
    """
    samples = _flatten(source.collect()) if isinstance(source, CollectorRegistry) else source
    return samples.get(_key(name, labels), 0.0)
