"""One sample map from a `/metrics` page or a registry, and `sample()` reading either."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from service.processes.metric_samples import parse, sample


def test_a_page_and_its_registry_give_the_same_samples() -> None:
    registry = CollectorRegistry()
    hits = Counter("hits", "Hits by level.", ["level"], registry=registry)
    latency = Histogram("call_seconds", "Call time.", ["backend", "modality"], registry=registry)
    hits.labels(level="redis").inc(3)
    latency.labels(backend="triton", modality="text").observe(0.2)
    page = parse(generate_latest(registry).decode())
    assert page['hits_total{level="redis"}'] == 3
    for source in (page, registry):
        assert sample(source, "hits_total", level="redis") == 3
        assert sample(source, "hits_total", level="local") == 0  # not counted yet
        assert sample(source, "call_seconds_count", backend="triton", modality="text") == 1
        # Labels not named are summed over; a label value that matches nothing gives 0.
        assert sample(source, "call_seconds_count", backend="triton") == 1
        assert sample(source, "call_seconds_count", backend="onnx") == 0


def test_labels_not_named_are_summed_over() -> None:
    registry = CollectorRegistry()
    calls = Counter("calls", "Calls.", ["method", "model"], registry=registry)
    calls.labels(method="Embed", model="a,b").inc(2)
    calls.labels(method="Embed", model="c").inc(3)
    calls.labels(method="Other", model="c").inc(5)
    page = parse(generate_latest(registry).decode())
    for source in (page, registry):
        assert sample(source, "calls_total", method="Embed") == 5
        assert sample(source, "calls_total", model="c") == 8
        assert sample(source, "calls_total", model="a,b") == 2
        assert sample(source, "calls_total", method="Embed", model="c") == 3
        assert sample(source, "calls_total") == 10
