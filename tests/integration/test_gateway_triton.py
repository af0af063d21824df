"""The production shape on one machine: gateway → real tritonserver (+ real redis-server).

The same vectors as open_clip itself, for real photos in several colour modes; the
gateway's queue and Triton's dynamic batcher merge concurrent calls; a Triton crash
answers UNAVAILABLE and heals by itself while `liveness` stays SERVING; a hung Triton
leaves the gateway responsive; the caller's deadline reaches Triton, a full Triton
queue is RESOURCE_EXHAUSTED and a model that raises is INTERNAL, end to end.

Beside the exported models the module's Triton serves controlled copies of them
(`ModelControl`): a test holds their executions at a gate, so that "requests wait
in Triton" is a state it sets up and checks with Triton's own counts, not a race.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from service.api.clip.v1 import clip_pb2, clip_pb2_grpc
from service.client import AsyncClipClient, Embeddings
from service.model.metadata import IMAGE_MODEL
from service.processes.gateway import gateway_settings, running_gateway
from service.processes.metric_samples import sample, scrape
from service.processes.redis_server import RedisServer
from service.processes.triton_server import TritonProcess
from service.server.app import Gateway
from service.server.health import LIVENESS_SERVICE
from tests.support.gateway import stub_for
from tests.support.images import encode, photo_like
from tests.support.models import ExportedModel
from tests.support.polling import eventually
from tests.support.reference import reference_images, reference_texts
from tests.support.triton import (
    GATED_IMAGE_MODEL,
    GATED_MODULE_MARKS,
    GATED_TEXT_MODEL,
    TINY_QUEUE_MODEL,
    ModelControl,
    add_controlled_models,
    inference_statistics,
    pending_requests,
    require_triton,
    start_triton,
    statistics_once,
    wait_for,
    wait_pending,
)

pytestmark = GATED_MODULE_MARKS

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
TEXTS = ["a red circle", "", "a photo of a purple hexagon on a gradient", "star " * 90]
# Texts in several scripts, for parity with open_clip's own tokenizer and text tower.
SCRIPT_TEXTS = [
    "a photo of a golden retriever playing in the snow",
    "一只在雪地里玩耍的金毛猎犬",
    "кошка сидит на подоконнике",
    "قطة تجلس على النافذة",
    "🐱🐶🚀 emoji only 🎉",
    "word " * 120,
]
# Bounds that only end a broken test (what they bound takes well under a second, and
# a loaded 2-core machine is slower by far less than these factors).
PATIENT_S = 120.0
TOLERANCE = 1e-5


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def repository(
    demo_model: ExportedModel, tmp_path_factory: pytest.TempPathFactory, control: ModelControl
) -> Path:
    """The trained demo export (copied: the session's stays as it is) plus controlled
    copies of its models, stamped with the same identity."""
    require_triton()
    repo = tmp_path_factory.mktemp("gateway_triton_repo") / "repo"
    shutil.copytree(demo_model.repository, repo)
    add_controlled_models(repo, control)
    return repo


@pytest.fixture(scope="module")
def triton(repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonProcess]:
    with start_triton(repository, workdir=tmp_path_factory.mktemp("tr")) as server:
        yield server


@pytest.fixture(scope="module")
async def triton_gateway(
    repository: Path, triton: TritonProcess, redis_server: RedisServer
) -> AsyncIterator[Gateway]:
    settings = gateway_settings(
        repository,
        backend="triton",
        triton_url=triton.grpc_url,
        redis_url=redis_server.url,
        local_cache_items=0,
    )
    async with running_gateway(settings) as gw:
        yield gw


@pytest.fixture(scope="module")
async def embedded_gateway(demo_model: ExportedModel) -> AsyncIterator[Gateway]:
    async with running_gateway(gateway_settings(demo_model.repository)) as gw:
        yield gw


@contextlib.asynccontextmanager
async def controlled_gateway(
    repository: Path,
    triton: TritonProcess,
    *,
    image_model: str = GATED_IMAGE_MODEL,
    text_model: str = GATED_TEXT_MODEL,
    **settings: Any,
) -> AsyncIterator[Gateway]:
    """A gateway on controlled copies, with no cache: every call reaches Triton."""
    options = gateway_settings(
        repository,
        backend="triton",
        triton_url=triton.grpc_url,
        triton_image_model=image_model,
        triton_text_model=text_model,
        local_cache_items=0,
        **settings,
    )
    async with running_gateway(options) as gw:
        yield gw


def _images() -> list[bytes]:
    return [encode(photo_like(90 + 10 * i, 70, seed=500 + i), "PNG") for i in range(5)]


async def _health(port: int, service: str = "") -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10
        )
    return reply.status


async def _wait_health(port: int, status: int) -> None:
    deadline = time.monotonic() + PATIENT_S
    while await _health(port) != status:
        assert time.monotonic() < deadline, f"health never became {status}"
        await asyncio.sleep(0.1)


def _gateway_count(gateway: Gateway, name: str, **labels: str) -> float:
    return sample(scrape(gateway.metrics_port or 0), name, **labels)


async def _wait_gateway_count(gateway: Gateway, name: str, value: float, **labels: str) -> None:
    """Until the gateway's counter `name` has reached `value` (polled)."""
    await wait_for(
        lambda: _gateway_count(gateway, name, **labels) >= value, PATIENT_S, f"{name} {labels}"
    )


async def _one_held_then_queued(
    gateway: Gateway,
    control: ModelControl,
    embed: Callable[[list[Any]], Awaitable[Embeddings]],
    items: list[Any],
    stage: str,
) -> list[Embeddings]:
    """One `embed` call per item, the first held in Triton at the gate: the gate opens
    only once every item has passed `stage` (all the rest queued in the gateway behind
    the held batch). The answers, in the items' order."""
    metric = "clip_preprocess_duration_seconds_count"
    passed = _gateway_count(gateway, metric, stage=stage)
    control.hold()
    first = asyncio.create_task(embed(items[:1]))
    await control.wait_held(1)
    rest = [asyncio.create_task(embed([item])) for item in items[1:]]
    await _wait_gateway_count(gateway, metric, passed + len(items), stage=stage)
    control.release()
    return await asyncio.gather(first, *rest)


# The image faults again with batches handed to Triton through /dev/shm
# (`--triton-shared-memory`): the refused, failed or expired call's slot comes back.
TRANSPORTS = pytest.mark.parametrize("shared_memory", [False, True], ids=["grpc-bytes", "shm"])
SHM_BATCHES = "clip_triton_image_batches_total"


def _shm_state(gateway: Gateway) -> tuple[float, float]:
    """(image batches sent as bytes, free slots): unchanged by a fault when its calls
    went through the region and gave their slots back."""
    return (
        _gateway_count(gateway, SHM_BATCHES, transport="grpc"),
        _gateway_count(gateway, "clip_triton_shared_memory_slots_free"),
    )


async def _until_shared(
    gateway: Gateway, stub: clip_pb2_grpc.ClipServiceStub
) -> tuple[float, float]:
    """Image calls until one went through shared memory (they go as bytes while the
    region is being registered); `_shm_state` then, at idle."""
    before = _gateway_count(gateway, SHM_BATCHES, transport="shared_memory")
    seeds = itertools.count(901)

    async def shared() -> bool:
        await _embed_image(stub, next(seeds), PATIENT_S)
        return _gateway_count(gateway, SHM_BATCHES, transport="shared_memory") > before

    await eventually(shared, what="an image batch through shared memory", timeout_s=PATIENT_S)
    return _shm_state(gateway)


def _image_request(seed: int) -> clip_pb2.EmbedImageRequest:
    return clip_pb2.EmbedImageRequest(images=[encode(photo_like(80, 60, seed=seed), "PNG")])


async def _embed_image(
    stub: clip_pb2_grpc.ClipServiceStub, seed: int, timeout_s: float
) -> clip_pb2.EmbedResponse:
    """One EmbedImage call (a coroutine, so that it can be a task)."""
    return await stub.EmbedImage(_image_request(seed), timeout=timeout_s)


def _code(outcome: object) -> grpc.StatusCode | None:
    return outcome.code() if isinstance(outcome, grpc.aio.AioRpcError) else None


# ---------------------------------------------------------------------- parity
def _colour_mode_images(photos: dict[str, Image.Image]) -> dict[str, bytes]:
    """Real photos, encoded as a caller sends them, in the colour modes PIL reads."""
    astronaut = photos["astronaut"]
    rgba = astronaut.copy()
    # A varying alpha: compositing onto a background (instead of dropping alpha, as
    # open_clip's convert("RGB") does) would show.
    rgba.putalpha(Image.linear_gradient("L").resize(astronaut.size))
    sixteen_bit = Image.fromarray(np.asarray(photos["camera"], dtype=np.uint16) * 257)
    return {
        "RGB": encode(astronaut, "PNG"),
        "L": encode(photos["camera"], "PNG"),
        "RGBA": encode(rgba, "PNG"),
        "P": encode(photos["chelsea"].convert("P"), "PNG"),
        "CMYK": encode(photos["coffee"].convert("CMYK"), "JPEG", quality=92),
        "I;16": encode(sixteen_bit, "PNG"),
        "RGB-jpeg-china": encode(photos["china"], "JPEG", quality=90),
        "RGB-webp-flower": encode(photos["flower"], "WEBP", quality=90),
        "RGB-rocket-small": encode(photos["rocket"].resize((37, 23)), "PNG"),
    }


async def test_real_photos_and_texts_through_triton_equal_open_clip(
    triton_gateway: Gateway,
    triton: TritonProcess,
    demo_model: ExportedModel,
    photos: dict[str, Image.Image],
) -> None:
    """Not transitively (TorchScript in-process): open_clip itself against what a real
    tritonserver computed, for every colour mode a caller's image may have."""
    images = _colour_mode_images(photos)
    modes = {name: Image.open(io.BytesIO(data)).mode for name, data in images.items()}
    assert {"RGB", "L", "RGBA", "P", "CMYK", "I;16"} <= set(modes.values()), modes
    before = await inference_statistics(triton.grpc_url, IMAGE_MODEL)
    async with AsyncClipClient(f"127.0.0.1:{triton_gateway.port}") as client:
        got_images = await client.embed_image(list(images.values()))
        got_texts = await client.embed_text(SCRIPT_TEXTS)
    assert got_images.cached == [False] * len(images)  # computed now, by Triton
    counts = await statistics_once(
        triton.grpc_url, IMAGE_MODEL, before, inference_count=len(images)
    )
    assert counts["inference_count"] == len(images)
    want_images = reference_images(demo_model, list(images.values()))
    worst = {
        name: float(np.abs(got - want).max())
        for name, got, want in zip(images, got_images.vectors, want_images, strict=True)
    }
    assert max(worst.values()) <= TOLERANCE, worst
    want_texts = reference_texts(demo_model, SCRIPT_TEXTS)
    assert np.abs(got_texts.vectors - want_texts).max() <= TOLERANCE
    assert got_texts.truncated == [False] * 5 + [True]
    # The photos are different enough that a mix-up of rows could not pass.
    assert np.abs(want_images[0] - want_images[1]).max() > 100 * TOLERANCE


async def test_triton_vectors_equal_embedded(
    triton_gateway: Gateway, embedded_gateway: Gateway
) -> None:
    images = _images()
    async with (
        AsyncClipClient(f"127.0.0.1:{triton_gateway.port}") as via_triton,
        AsyncClipClient(f"127.0.0.1:{embedded_gateway.port}") as in_process,
    ):
        info = await via_triton.model_info()
        t_text, e_text = await via_triton.embed_text(TEXTS), await in_process.embed_text(TEXTS)
        t_img, e_img = await via_triton.embed_image(images), await in_process.embed_image(images)
    assert info.backend == "triton"
    assert np.abs(t_text.vectors - e_text.vectors).max() <= TOLERANCE
    assert np.abs(t_img.vectors - e_img.vectors).max() <= TOLERANCE
    assert t_text.truncated == e_text.truncated == [False, False, False, True]


# ---------------------------------------------------------------------- batching
async def test_concurrent_calls_reach_triton_as_fewer_executions(
    repository: Path, triton: TritonProcess, control: ModelControl
) -> None:
    """64 single-image calls while the first is held: 64 items in at most 3 executions."""
    images = [encode(photo_like(64, 64, seed=900 + i), "PNG") for i in range(64)]
    async with (
        controlled_gateway(repository, triton) as gateway,
        AsyncClipClient(f"127.0.0.1:{gateway.port}", timeout_s=PATIENT_S) as client,
    ):
        before = await inference_statistics(triton.grpc_url, GATED_IMAGE_MODEL)  # past warm-up
        await _one_held_then_queued(gateway, control, client.embed_image, images, "image_decode")
    counts = await statistics_once(triton.grpc_url, GATED_IMAGE_MODEL, before, inference_count=64)
    assert counts["inference_count"] == 64
    # The held one, then the 63 queued ones in batches of at most 32 (one call each
    # would be 63 more executions).
    assert counts["execution_count"] <= 3, counts


async def test_mixed_caption_lengths_batch_together_in_triton(
    repository: Path,
    triton: TritonProcess,
    control: ModelControl,
    embedded_gateway: Gateway,
) -> None:
    """The gateway batches by length bucket, then Triton: vectors equal, few executions."""
    texts = [("word " * (1 + (i * 7) % 40)) + f"mixed {i}" for i in range(48)]
    async with (
        controlled_gateway(repository, triton) as gateway,
        AsyncClipClient(f"127.0.0.1:{gateway.port}", timeout_s=PATIENT_S) as via_triton,
        AsyncClipClient(f"127.0.0.1:{embedded_gateway.port}") as in_process,
    ):
        before = await inference_statistics(triton.grpc_url, GATED_TEXT_MODEL)  # past warm-up
        got = await _one_held_then_queued(
            gateway, control, via_triton.embed_text, texts, "tokenize"
        )
        want = await in_process.embed_text(texts)
    assert np.abs(np.concatenate([g.vectors for g in got]) - want.vectors).max() <= TOLERANCE
    counts = await statistics_once(triton.grpc_url, GATED_TEXT_MODEL, before, inference_count=48)
    assert counts["inference_count"] == 48
    # The held one, then one batch per length bucket (8, 16, 24, 32, 48): sent one by
    # one these would be 47 more executions.
    assert counts["execution_count"] <= 6, counts


# ---------------------------------------------------------------------- faults
async def test_triton_crash_fails_fast_then_heals_and_liveness_stays_serving(
    triton_gateway: Gateway, triton: TritonProcess
) -> None:
    port = triton_gateway.port
    deadline_s = 60.0
    async with AsyncClipClient(f"127.0.0.1:{port}", timeout_s=deadline_s) as client:
        await client.embed_text(["before the crash"])
        triton.kill()
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.embed_text(["during the crash"])
        # UNAVAILABLE, not DEADLINE_EXCEEDED: it did not wait for the deadline; half of
        # it is a generous bound on the rest.
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert time.monotonic() - started < deadline_s / 2
        await _wait_health(port, NOT_SERVING)
        assert await _health(port, "clip.v1.ClipService") == NOT_SERVING
        # Liveness probes must not restart a gateway because Triton is down.
        assert await _health(port, LIVENESS_SERVICE) == SERVING
        await asyncio.to_thread(triton.start)
        await _wait_health(port, SERVING)
        assert await _health(port, LIVENESS_SERVICE) == SERVING
        healed = await client.embed_text(["after the restart"])
    assert healed.vectors.shape == (1, 64)


async def test_hung_triton_gives_deadline_exceeded_and_gateway_stays_responsive(
    triton_gateway: Gateway, triton: TritonProcess
) -> None:
    in_flight = "clip_requests_in_flight"
    async with stub_for(triton_gateway.port) as stub:
        assert triton.pid is not None
        os.killpg(triton.pid, signal.SIGSTOP)  # Triton hangs: accepts nothing, answers nothing
        try:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.EmbedText(clip_pb2.EmbedTextRequest(texts=["slow"]), timeout=1.0)
            assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            # The gateway answers what needs no Triton while Triton hangs.
            info = await stub.GetModelInfo(clip_pb2.GetModelInfoRequest(), timeout=PATIENT_S)
            assert info.backend == "triton"
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.EmbedText(
                    clip_pb2.EmbedTextRequest(texts=["bad"] * 10_000), timeout=PATIENT_S
                )
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # And the call that gave up holds nothing: no handler is left waiting.
            await wait_for(
                lambda: _gateway_count(triton_gateway, in_flight, method="EmbedText") == 0,
                PATIENT_S,
                "EmbedText handlers ended",
            )
        finally:
            os.killpg(triton.pid, signal.SIGCONT)
        await _wait_health(triton_gateway.port, SERVING)
        reply = await stub.EmbedText(
            clip_pb2.EmbedTextRequest(texts=["recovered"]), timeout=PATIENT_S
        )
    assert len(reply.embeddings) == 1


async def test_hung_triton_with_shared_memory_expires_image_calls_and_frees_their_slots(
    repository: Path, triton: TritonProcess
) -> None:
    """Image calls that expire in a hung Triton give their slots back: once it answers
    again, batches go through the region, not as bytes for want of a slot."""
    async with (
        controlled_gateway(
            repository, triton, max_inflight_batches=1, triton_shared_memory=True
        ) as gateway,
        stub_for(gateway.port) as stub,
    ):
        _, slots = await _until_shared(gateway, stub)
        assert slots == 2  # two per batch in flight
        assert triton.pid is not None
        os.killpg(triton.pid, signal.SIGSTOP)
        try:
            # More expired batches than slots, one after another.
            for seed in range(61, 64):
                outcome = (
                    await asyncio.gather(_embed_image(stub, seed, 1.0), return_exceptions=True)
                )[0]
                # The first one waits out its deadline; then the replica may be marked
                # gone (no keepalive answer) and the next fail at once.
                assert _code(outcome) in (
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                    grpc.StatusCode.UNAVAILABLE,
                ), outcome
            # The caller's deadline and the gateway's end together: the last handler
            # may still be unwinding when its caller has its answer.
            await wait_for(
                lambda: (
                    _gateway_count(gateway, "clip_requests_in_flight", method="EmbedImage") == 0
                ),
                PATIENT_S,
                "EmbedImage handlers ended",
            )
        finally:
            os.killpg(triton.pid, signal.SIGCONT)
        assert _shm_state(gateway)[1] == slots
        await _wait_health(gateway.port, SERVING)
        await _until_shared(gateway, stub)
        assert _shm_state(gateway)[1] == slots


@TRANSPORTS
async def test_the_callers_deadline_reaches_triton(
    repository: Path, triton: TritonProcess, control: ModelControl, shared_memory: bool
) -> None:
    """A call that gives up is dropped from Triton's queue, where it waited behind a
    held execution: the gateway derived the Triton request's timeout from the caller's
    deadline, not from --backend-timeout-s (30 s) or Triton's config (600 s)."""
    # Several batches at Triton at once, so the late call is not held in the gateway.
    async with (
        controlled_gateway(
            repository, triton, max_inflight_batches=4, triton_shared_memory=shared_memory
        ) as gateway,
        stub_for(gateway.port) as stub,
    ):
        idle = await _until_shared(gateway, stub) if shared_memory else None
        before = await inference_statistics(triton.grpc_url, GATED_IMAGE_MODEL)  # past warm-up
        control.hold()
        blocker = asyncio.create_task(_embed_image(stub, 31, PATIENT_S))
        await control.wait_held(1)
        # Long enough to outlast decode and the gateway's queue on a slow loaded machine
        # before it reaches Triton's queue; the held execution ahead of it is what makes it
        # miss the deadline, so a longer one costs time, not coverage.
        deadline_s = 10.0
        late = asyncio.create_task(_embed_image(stub, 32, deadline_s))
        await wait_pending(triton, GATED_IMAGE_MODEL, 1, call=late)
        queued_by = time.monotonic()  # Triton started the late request's clock before this
        outcome = (await asyncio.gather(late, return_exceptions=True))[0]
        assert _code(outcome) == grpc.StatusCode.DEADLINE_EXCEEDED, outcome
        assert control.held() == [1]  # answered while its work could not have run
        # Triton's deadline for it ends by `queued_by + deadline_s`: wait past that (a
        # slow machine is only further past it); a timeout the gateway did not derive
        # from the caller (30 s, 600 s) would still keep it queued.
        await asyncio.sleep(max(0.0, queued_by + deadline_s - time.monotonic()) + 0.5)
        # Triton 2.43 takes an expired request out of its queue at its timeout (0 left);
        # older servers leave it queued until the next batch is formed, then drop it (1).
        left = await pending_requests(triton, GATED_IMAGE_MODEL)
        assert left in (0, 1), left
        marker = asyncio.create_task(_embed_image(stub, 33, PATIENT_S))
        await wait_pending(triton, GATED_IMAGE_MODEL, left + 1)  # the marker is queued too...
        control.release()
        answers = await asyncio.gather(blocker, marker)
        if shared_memory:  # none of the three went as bytes
            assert _shm_state(gateway) == idle
    assert [len(a.embeddings) for a in answers] == [1, 1]
    counts = await statistics_once(triton.grpc_url, GATED_IMAGE_MODEL, before, success_count=2)
    # ...and dropped, not run: had it run, it would share the marker's execution.
    assert counts["inference_count"] == 2, counts


@TRANSPORTS
async def test_a_full_triton_queue_is_resource_exhausted(
    repository: Path, triton: TritonProcess, control: ModelControl, shared_memory: bool
) -> None:
    async with (
        controlled_gateway(
            repository,
            triton,
            image_model=TINY_QUEUE_MODEL,
            max_inflight_batches=4,
            triton_shared_memory=shared_memory,
        ) as gateway,
        stub_for(gateway.port) as stub,
    ):
        idle = await _until_shared(gateway, stub) if shared_memory else None
        refused_before = _gateway_count(
            gateway, "clip_requests_total", method="EmbedImage", code="RESOURCE_EXHAUSTED"
        )
        control.hold()
        running = asyncio.create_task(_embed_image(stub, 41, PATIENT_S))
        await control.wait_held(1)
        queued = asyncio.create_task(_embed_image(stub, 42, PATIENT_S))
        await wait_pending(triton, TINY_QUEUE_MODEL, 1)
        # One running, one queued: Triton's queue of one is full and refuses at once.
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.EmbedImage(_image_request(43), timeout=PATIENT_S)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue" in (err.value.details() or "")
        assert control.held() == [1]
        control.release()
        answers = await asyncio.gather(running, queued)
        if shared_memory:
            assert _shm_state(gateway) == idle
        refused = _gateway_count(
            gateway, "clip_requests_total", method="EmbedImage", code="RESOURCE_EXHAUSTED"
        )
    assert [len(a.embeddings) for a in answers] == [1, 1]
    assert refused == refused_before + 1


@TRANSPORTS
async def test_a_model_that_raises_is_internal_and_the_gateway_goes_on(
    repository: Path, triton: TritonProcess, control: ModelControl, shared_memory: bool
) -> None:
    async with (
        controlled_gateway(repository, triton, triton_shared_memory=shared_memory) as gateway,
        stub_for(gateway.port) as stub,
    ):
        idle = await _until_shared(gateway, stub) if shared_memory else None
        errors_before = _gateway_count(
            gateway, "clip_backend_errors_total", backend="triton", modality="image"
        )
        control.fail(True)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.EmbedImage(_image_request(51), timeout=PATIENT_S)
        assert err.value.code() == grpc.StatusCode.INTERNAL
        # The caller learns which model failed, not the model's traceback and file paths
        # (Triton's message for a raising python model carries both): those are logged.
        details = err.value.details() or ""
        assert GATED_IMAGE_MODEL in details
        assert "injected failure" not in details and ".py" not in details, details
        assert (
            _gateway_count(gateway, "clip_backend_errors_total", backend="triton", modality="image")
            == errors_before + 1
        )
        control.fail(False)
        # Nothing was cached or poisoned: the same image is computed now.
        reply = await stub.EmbedImage(_image_request(51), timeout=PATIENT_S)
        assert not reply.embeddings[0].cached
        assert await _health(gateway.port) == SERVING
        if shared_memory:  # the failure did not cost the region
            assert _shm_state(gateway) == idle
