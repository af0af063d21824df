"""The tracer provider: its sampling ratio, and a caller's sampled trace always followed."""

from __future__ import annotations

from opentelemetry import propagate
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from service.telemetry import build_tracer_provider


def test_the_ratio_bounds_new_traces_and_callers_decisions_are_followed() -> None:
    exporter = InMemorySpanExporter()
    tracer = build_tracer_provider("", "t", exporter, sample_ratio=0.0).get_tracer("t")
    for _ in range(50):
        with tracer.start_as_current_span("new"):
            pass
    assert exporter.get_finished_spans() == ()
    sampled = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    with tracer.start_as_current_span("continued", context=propagate.extract(sampled)):
        pass
    assert [s.name for s in exporter.get_finished_spans()] == ["continued"]
    everything = InMemorySpanExporter()
    tracer = build_tracer_provider("", "t", everything).get_tracer("t")
    with tracer.start_as_current_span("new"):
        pass
    assert len(everything.get_finished_spans()) == 1
