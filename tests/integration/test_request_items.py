"""Inputs per request as OpenAI takes them: 2,048 by default on `/v1/embeddings` (the
official `openai` client) and gRPC, run in backend batches; one more is a 400 /
INVALID_ARGUMENT whose text names the count and the limit."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import numpy as np
import openai
import pytest

from service.api.clip.v1 import clip_pb2
from service.client import decode_embedding
from service.processes.gateway import gateway_settings, running_gateway
from service.processes.metric_samples import sample
from service.server.app import Gateway
from service.settings import Settings
from tests.support.gateway import stub_for
from tests.support.models import ExportedModel
from tests.support.reference import reference_texts

pytestmark = pytest.mark.integration

DEFAULT_MAX_ITEMS = 2048
BATCH = 32


@pytest.fixture(scope="module")
async def gateway(demo_model: ExportedModel) -> AsyncIterator[Gateway]:
    settings = gateway_settings(demo_model.repository, max_batch_size=BATCH)
    async with running_gateway(settings) as gw:
        yield gw


def test_the_default_is_openais_2048() -> None:
    assert Settings.__dataclass_fields__["max_items"].default == DEFAULT_MAX_ITEMS


async def test_2048_inputs_are_one_http_request_run_in_backend_batches(
    gateway: Gateway, demo_model: ExportedModel
) -> None:
    texts = [f"a red circle number {i}" for i in range(DEFAULT_MAX_ITEMS)]
    batches_before = sample(gateway.metrics.registry, "clip_batch_size_count", modality="text")
    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{gateway.http_port}/v1", api_key="unused", max_retries=0
    )
    async with client:
        answer = await client.embeddings.create(
            model="clip", input=texts, encoding_format="float", timeout=600
        )
        assert [d.index for d in answer.data] == list(range(len(texts)))
        probe = [0, 1, 777, len(texts) - 1]
        np.testing.assert_allclose(
            [answer.data[i].embedding for i in probe],
            reference_texts(demo_model, [texts[i] for i in probe]),
            atol=1e-5,
        )
        # Backend calls of at most --max-batch-size rows: at least 2048 / 32 of them.
        counted = sample(gateway.metrics.registry, "clip_batch_size_count", modality="text")
        items = sample(gateway.metrics.registry, "clip_batch_size_sum", modality="text")
        within = sample(
            gateway.metrics.registry, "clip_batch_size_bucket", modality="text", le="32.0"
        )
        assert counted - batches_before >= DEFAULT_MAX_ITEMS // BATCH
        assert items >= DEFAULT_MAX_ITEMS and within == counted  # none above 32

        with pytest.raises(openai.BadRequestError) as caught:
            await client.embeddings.create(model="clip", input=[*texts, "one more"])
    assert caught.value.status_code == 400
    assert caught.value.body["message"] == (
        "input: 2049 inputs in one request, over the limit of 2048; split the request"
    )


async def test_grpc_takes_2048_texts_and_refuses_one_more_by_count(
    gateway: Gateway, demo_model: ExportedModel
) -> None:
    texts = [f"a blue star seen by grpc {i}" for i in range(DEFAULT_MAX_ITEMS)]
    async with stub_for(gateway.port) as stub:
        answer = await stub.EmbedText(clip_pb2.EmbedTextRequest(texts=texts), timeout=600)
        assert len(answer.embeddings) == DEFAULT_MAX_ITEMS
        np.testing.assert_allclose(
            decode_embedding(answer.embeddings[-1]),
            reference_texts(demo_model, texts[-1:])[0],
            atol=1e-5,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.EmbedText(clip_pb2.EmbedTextRequest(texts=[*texts, "x"]), timeout=60)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == (
        "texts: 2049 texts in one request, over the limit of 2048; split the request"
    )


async def test_a_lower_max_items_is_the_cap_with_the_same_text(demo_model: ExportedModel) -> None:
    settings = gateway_settings(demo_model.repository, max_items=256)
    async with running_gateway(settings) as gw:
        client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{gw.http_port}/v1", api_key="unused", max_retries=0
        )
        async with client:
            with pytest.raises(openai.BadRequestError) as caught:
                await client.embeddings.create(model="clip", input=["a"] * 300)
    assert caught.value.body["message"] == (
        "input: 300 inputs in one request, over the limit of 256; split the request"
    )
