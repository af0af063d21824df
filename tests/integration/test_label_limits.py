"""`--max-templates` and `--max-label-chars` at the gRPC edge: the limit itself passes, one
more is INVALID_ARGUMENT naming the field, the index and the rule, before any work."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from service.api.clip.v1 import clip_pb2
from service.processes.gateway import gateway_settings, running_gateway
from service.processes.metric_samples import sample, scrape
from service.server.app import Gateway
from tests.support.gateway import stub_for
from tests.support.http_json import http_json, image_input
from tests.support.images import encode, photo_like
from tests.support.models import ExportedModel

pytestmark = pytest.mark.integration

MAX_TEMPLATES = 3
MAX_LABEL_CHARS = 12
IMAGE = encode(photo_like(64, 48, seed=9), "PNG")


@pytest.fixture(scope="module")
async def gateway(demo_model: ExportedModel) -> AsyncIterator[Gateway]:
    settings = gateway_settings(
        demo_model.repository, max_templates=MAX_TEMPLATES, max_label_chars=MAX_LABEL_CHARS
    )
    async with running_gateway(settings) as gw:
        yield gw


async def _classify(
    gateway: Gateway, labels: list[str], templates: list[str]
) -> tuple[grpc.StatusCode, str, float]:
    """(code, details, items embedded by the call)."""
    before = sample(scrape(gateway.metrics_port), "clip_items_embedded_total", modality="text")
    request = clip_pb2.ClassifyRequest(images=[IMAGE], labels=labels, templates=templates)
    code, details = grpc.StatusCode.OK, ""
    async with stub_for(gateway.port) as stub:
        try:
            await stub.Classify(request, timeout=60)
        except grpc.aio.AioRpcError as err:
            code, details = err.code(), err.details() or ""
    after = sample(scrape(gateway.metrics_port), "clip_items_embedded_total", modality="text")
    return code, details, after - before


async def test_max_templates(gateway: Gateway) -> None:
    templates = [f"{'a' * i}{{}}" for i in range(1, MAX_TEMPLATES + 2)]
    code, details, _ = await _classify(gateway, ["cat", "dog"], templates[:MAX_TEMPLATES])
    assert code == grpc.StatusCode.OK, details
    code, details, embedded = await _classify(gateway, ["cow", "pig"], templates)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == (
        f"templates: {MAX_TEMPLATES + 1} templates in one request, over the limit of "
        f"{MAX_TEMPLATES}; split the request"
    )
    assert embedded == 0, "refused after work was done"


async def test_the_default_ensemble_is_not_the_callers_templates(gateway: Gateway) -> None:
    """A call that sends no templates gets the 8 defaults, whatever --max-templates says."""
    assert MAX_TEMPLATES < 8
    code, details, embedded = await _classify(gateway, ["red circle", "blue star"], [])
    assert code == grpc.StatusCode.OK, details
    assert embedded == 2 * 8


async def test_max_label_chars(gateway: Gateway) -> None:
    at_limit, past = "x" * MAX_LABEL_CHARS, "y" * (MAX_LABEL_CHARS + 1)
    code, details, _ = await _classify(gateway, ["cat", at_limit], ["{}"])
    assert code == grpc.StatusCode.OK, details
    code, details, embedded = await _classify(gateway, ["cat", past], ["{}"])
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == (
        f"labels[1]: label is {MAX_LABEL_CHARS + 1} characters, over the limit of {MAX_LABEL_CHARS}"
    )
    assert embedded == 0
    # Templates obey the same length limit.
    code, details, _ = await _classify(gateway, ["cat"], ["{}", "z" * (MAX_LABEL_CHARS - 2) + "{}"])
    assert code == grpc.StatusCode.OK, details
    code, details, embedded = await _classify(
        gateway, ["cat"], ["{}", "z" * (MAX_LABEL_CHARS - 1) + "{}"]
    )
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == (
        f"templates[1]: template is {MAX_LABEL_CHARS + 1} characters, over the limit of "
        f"{MAX_LABEL_CHARS}"
    )
    assert embedded == 0


async def test_the_same_limits_and_words_over_http(gateway: Gateway) -> None:
    """The HTTP door checks the same limits in the same place: 400 with the gRPC words."""

    async def classify(labels: list[str], templates: list[str]) -> tuple[int, str, float]:
        samples = scrape(gateway.metrics_port)
        before = sample(samples, "clip_items_embedded_total", modality="text")
        body = {"images": [image_input(IMAGE)["image"]], "labels": labels, "templates": templates}
        status, answer = await asyncio.to_thread(http_json, gateway.http_port, "/v1/classify", body)
        after = sample(scrape(gateway.metrics_port), "clip_items_embedded_total", modality="text")
        return status, answer.get("error", {}).get("message", ""), after - before

    templates = [f"{'h' * i}{{}}" for i in range(1, MAX_TEMPLATES + 2)]
    status, message, embedded = await classify(["hen", "owl"], templates)
    assert (status, embedded) == (400, 0)
    assert message == (
        f"templates: {MAX_TEMPLATES + 1} templates in one request, over the limit of "
        f"{MAX_TEMPLATES}; split the request"
    )
    status, message, embedded = await classify(["cat", "y" * (MAX_LABEL_CHARS + 1)], ["{}"])
    assert (status, embedded) == (400, 0)
    assert message == (
        f"labels[1]: label is {MAX_LABEL_CHARS + 1} characters, over the limit of {MAX_LABEL_CHARS}"
    )
    status, message, _ = await classify(["cat", "x" * MAX_LABEL_CHARS], ["{}"])
    assert status == 200, message
