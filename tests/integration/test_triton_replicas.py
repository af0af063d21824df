"""Scale-out over Triton replicas (issues 15 and 25): one gateway, real `tritonserver`s.

The gateway's `--triton-url` takes `ipv4:a:p,b:p` (or a `dns:` name): it keeps a channel
per address, sends inference only to addresses whose served model it has checked
itself, round robin over those that are ready, and a call that finds its replica gone
is answered by another within the caller's deadline. Readiness probes do not shift that
rotation: sequential calls alternate between the replicas, probes or not.

Replicas A and B serve the trained demo export X with a controlled copy of its image
model (`ModelControl`: a test holds A's executions at a gate, so "a call is inside A"
is a state the test sets up, not a race); F serves another export (random weights).
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import open_clip
import pytest
import redis as redis_lib
import torch
from grpc_health.v1 import health, health_pb2_grpc

from service.backends.triton import TritonBackend
from service.client import AsyncClipClient
from service.model import configs as model_configs
from service.model.metadata import IMAGE_MODEL, TEXT_MODEL, ModelMetadata
from service.processes.gateway import gateway_settings, running_gateway
from service.processes.metric_samples import sample
from service.processes.redis_server import RedisServer
from service.processes.triton_server import TritonProcess
from service.settings import BatchingOptions
from tests.support.images import encode, photo_like
from tests.support.models import ExportedModel
from tests.support.triton import (
    ModelControl,
    add_model_variant,
    export_demo_repository,
    inference_statistics,
    require_triton,
    shared_memory_regions,
    start_triton,
    statistics_once,
    wait_for,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

#: The controlled copy of the image model every replica serves (its plain
#: `clip_image` is removed: one python stub less per server on a 2-core machine).
HELD_MODEL = "clip_image_held"
CALLERS = 8
# Generous bounds for a loaded 2-core machine; each phase ends as soon as it is shown.
PHASE_DEADLINE_S = 90.0
# Sequential calls, each followed by a health probe (what the gateway's health loop
# adds about once a second while one slow batch at a time is in flight).
SEQUENTIAL_ROUNDS = 40
# What Kubernetes does on a rollout with a short grace: SIGTERM, SIGKILL this much later.
KILL_AFTER_TERM_S = 1.0
# A restarted replica gets calls again within this (the bound).
REJOIN_S = 60.0


@dataclass
class Replicas:
    a: TritonProcess
    b: TritonProcess
    foreign: TritonProcess
    control_a: ModelControl
    metadata: ModelMetadata


def _replica_repository(source: Path, into: Path, control: ModelControl | None) -> Path:
    """A copy of `source` serving `HELD_MODEL` (steered by `control`) and its text model."""
    repo = into / "repo"
    shutil.copytree(source, repo)
    batching = BatchingOptions(torch_threads=1)
    add_model_variant(repo, source=IMAGE_MODEL, name=HELD_MODEL, batching=batching, control=control)
    shutil.rmtree(repo / IMAGE_MODEL)
    return repo


@pytest.fixture(scope="module")
def replicas(
    demo_model: ExportedModel, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Replicas]:
    require_triton()
    control_a = ModelControl(tmp_path_factory.mktemp("control_a"))
    control_b = ModelControl(tmp_path_factory.mktemp("control_b"))  # never held
    repo_a = _replica_repository(demo_model.repository, tmp_path_factory.mktemp("a"), control_a)
    repo_b = _replica_repository(demo_model.repository, tmp_path_factory.mktemp("b"), control_b)
    other = tmp_path_factory.mktemp("other_export")
    torch.manual_seed(2525)
    export_demo_repository(other)  # random weights: another model id and weights hash
    repo_f = _replica_repository(other, tmp_path_factory.mktemp("f"), None)
    with (
        start_triton(repo_a, workdir=tmp_path_factory.mktemp("ta")) as a,
        start_triton(repo_b, workdir=tmp_path_factory.mktemp("tb")) as b,
        start_triton(repo_f, workdir=tmp_path_factory.mktemp("tf")) as foreign,
    ):
        yield Replicas(a, b, foreign, control_a, ModelMetadata.load(demo_model.repository))


@pytest.fixture
def both_up(replicas: Replicas) -> Iterator[Replicas]:
    """A and B running and A's gate open, before and after the test."""
    replicas.control_a.reset()
    if not replicas.a.running:
        replicas.a.start()
    yield replicas
    replicas.control_a.reset()
    if not replicas.a.running:
        replicas.a.start()


async def _inferences(triton: TritonProcess, model: str = HELD_MODEL) -> int:
    if not triton.running:
        return 0
    return (await inference_statistics(triton.grpc_url, model))["inference_count"]


def _pixels(size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (1, 3, size, size), dtype=np.uint8)


@asynccontextmanager
async def _backend(url: str, metadata: ModelMetadata) -> AsyncIterator[TritonBackend]:
    backend = TritonBackend(
        url=url,
        default_timeout_s=PHASE_DEADLINE_S,
        max_batch_size=8,
        image_model=HELD_MODEL,
        expected_model_id=metadata.model_id,
        expected_weights_sha256=metadata.weights_sha256,
    )
    await backend.start()
    try:
        yield backend
    finally:
        await backend.aclose()


async def _hold_a_call_on_a(
    backend: TritonBackend, r: Replicas, rows: np.ndarray
) -> asyncio.Task[np.ndarray]:
    """A call of `rows` that is inside A's model now, held at its gate.

    Calls alternate between A and B; one that went to B returns (B is never held), so
    within two calls one is held on A."""
    r.control_a.hold()
    for _ in range(4):
        call = asyncio.create_task(backend.embed_images(rows))
        await wait_for(lambda c=call: c.done() or bool(r.control_a.held()), 120, "a call placed")
        if r.control_a.held():
            return call
        call.result()  # B answered it; the next one goes to A
    raise AssertionError("no call reached A")


async def test_a_call_held_on_a_replica_that_is_killed_returns_the_other_replicas_vector(
    both_up: Replicas,
) -> None:
    r = both_up
    rows = _pixels(r.metadata.image_size, seed=1)
    async with _backend(r.b.grpc_url, r.metadata) as only_b:
        want = await only_b.embed_images(rows)
    async with _backend(f"ipv4:{r.a.grpc_url},{r.b.grpc_url}", r.metadata) as backend:
        call = await _hold_a_call_on_a(backend, r, rows)
        before_b = await inference_statistics(r.b.grpc_url, HELD_MODEL)
        await asyncio.to_thread(r.a.kill)  # A dies with the call inside it
        got = await call  # that very call: answered, not failed
        await statistics_once(r.b.grpc_url, HELD_MODEL, before_b, success_count=1)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)


async def test_a_draining_replica_gets_no_new_calls_and_its_call_is_answered_elsewhere(
    both_up: Replicas, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM, then SIGKILL one second later (a rollout with a short grace): Triton's
    readiness turns false at SIGTERM, the next probe takes A out and new calls all go
    to B; the call A holds is answered by B (Triton fails it while it unloads, or it
    dies with A). A restarted A gets calls again within a minute."""
    r = both_up
    rows = _pixels(r.metadata.image_size, seed=3)
    placed: list[str] = []  # the replica of every Triton request the backend sends
    send = TritonBackend._infer

    async def spy(self: TritonBackend, replica: Any, *args: Any) -> np.ndarray:
        placed.append(replica.address)
        return await send(self, replica, *args)

    monkeypatch.setattr(TritonBackend, "_infer", spy)
    async with _backend(f"ipv4:{r.a.grpc_url},{r.b.grpc_url}", r.metadata) as backend:
        call = await _hold_a_call_on_a(backend, r, rows)
        assert r.a.pid is not None
        r.a.send_signal(signal.SIGTERM, group=False)  # what the kubelet sends PID 1
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PHASE_DEADLINE_S
        while backend.replica_states()[r.a.grpc_url] != "out":
            assert loop.time() < deadline, backend.replica_states()
            assert await backend.ready()  # B serves all along
            await asyncio.sleep(0.05)
        term_seen = loop.time()
        already = len(placed)
        fresh = [_pixels(r.metadata.image_size, seed=100 + i) for i in range(6)]
        answers = [await backend.embed_images(p) for p in fresh]
        assert [a.shape for a in answers] == [(1, r.metadata.embedding_dim)] * 6
        assert set(placed[already:]) == {r.b.grpc_url}, placed[already:]  # none to A
        await asyncio.sleep(max(0.0, term_seen + KILL_AFTER_TERM_S - loop.time()))
        await asyncio.to_thread(r.a.kill)
        got = await call
        async with _backend(r.b.grpc_url, r.metadata) as only_b:
            np.testing.assert_allclose(got, await only_b.embed_images(rows), atol=1e-6, rtol=0)

        r.control_a.release()
        await asyncio.to_thread(r.a.start)  # the same ports as before
        back = loop.time()
        seed = 1000
        while await _inferences(r.a) == 0:
            assert loop.time() - back < REJOIN_S, "the restarted replica got no calls"
            seed += 1
            await backend.embed_images(_pixels(r.metadata.image_size, seed))
            await asyncio.sleep(0.05)


# Also with the batches handed over through /dev/shm: each replica maps the region.
@pytest.mark.parametrize("shared_memory", [False, True], ids=["grpc-bytes", "shared-memory"])
async def test_two_replicas_share_load_and_a_death_under_load_costs_no_caller_an_error(
    demo_model: ExportedModel, both_up: Replicas, shared_memory: bool
) -> None:
    r = both_up
    target = f"ipv4:{r.a.grpc_url},{r.b.grpc_url}"
    settings = gateway_settings(
        demo_model.repository,
        backend="triton",
        triton_url=target,
        triton_image_model=HELD_MODEL,
        local_cache_items=0,
        triton_shared_memory=shared_memory,
    )
    errors: list[BaseException] = []
    calls = 0
    stop = asyncio.Event()
    async with running_gateway(settings) as gw:
        async with AsyncClipClient(f"127.0.0.1:{gw.port}") as client:

            async def caller(index: int) -> None:
                nonlocal calls
                seed = index * 1_000_000
                while not stop.is_set():
                    seed += 1  # every image new: no cache hit, every call reaches Triton
                    image = encode(photo_like(48, 40, seed=seed), "PNG")
                    try:
                        await client.embed_image([image])
                    except Exception as exc:  # any error a caller sees fails the test
                        errors.append(exc)
                    calls += 1

            loop = asyncio.get_running_loop()
            workers = [asyncio.create_task(caller(i)) for i in range(CALLERS)]
            try:
                # 1. Both replicas get a fair share (round robin, not pick-first).
                base_a, base_b = await _inferences(r.a), await _inferences(r.b)
                deadline = loop.time() + PHASE_DEADLINE_S
                while True:
                    got_a = await _inferences(r.a) - base_a
                    got_b = await _inferences(r.b) - base_b
                    if got_a + got_b >= 200:
                        break
                    assert loop.time() < deadline, (got_a, got_b)
                    await asyncio.sleep(0.2)
                share_a = got_a / (got_a + got_b)
                assert 0.25 <= share_a <= 0.75, (got_a, got_b)
                if shared_memory:
                    for replica in (r.a, r.b):
                        assert await shared_memory_regions(replica.grpc_url), replica.grpc_url
                    shared, as_bytes = (
                        sample(gw.metrics.registry, "clip_triton_image_batches_total", transport=t)
                        for t in ("shared_memory", "grpc")
                    )
                    # Bytes only while each replica's registration was under way.
                    assert shared > 4 * as_bytes, (shared, as_bytes)

                # 2. One replica dies under load: no caller sees an error.
                await asyncio.to_thread(r.a.kill)
                calls_at_kill = calls
                served_b = await _inferences(r.b)
                deadline = loop.time() + PHASE_DEADLINE_S
                while calls - calls_at_kill < 100 or await _inferences(r.b) - served_b < 50:
                    assert loop.time() < deadline, calls - calls_at_kill
                    await asyncio.sleep(0.2)
                assert not errors, errors[:3]
            finally:
                stop.set()
                await asyncio.gather(*workers)
    assert not errors, errors[:3]


async def test_health_probes_between_sequential_calls_do_not_pin_them_to_one_replica(
    both_up: Replicas,
) -> None:
    """`ready()` makes five calls per replica (server ready, two models ready, two
    configs). With gRPC's round robin on the inference channel they moved the rotation
    on by an odd count between two sequential calls, so every call went to one replica."""
    r = both_up
    pixels = np.zeros((1, 3, r.metadata.image_size, r.metadata.image_size), dtype=np.uint8)
    base_a, base_b = await _inferences(r.a), await _inferences(r.b)
    async with _backend(f"ipv4:{r.a.grpc_url},{r.b.grpc_url}", r.metadata) as backend:
        for _ in range(SEQUENTIAL_ROUNDS):
            await backend.embed_images(pixels)
            assert await backend.ready()
    # Triton counts a request just after it answers: wait until every call is counted.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + PHASE_DEADLINE_S
    while True:
        got_a = await _inferences(r.a) - base_a
        got_b = await _inferences(r.b) - base_b
        if got_a + got_b >= SEQUENTIAL_ROUNDS:
            break
        assert loop.time() < deadline, (got_a, got_b)
        await asyncio.sleep(0.2)
    assert got_a + got_b == SEQUENTIAL_ROUNDS, (got_a, got_b)
    assert got_a == got_b == SEQUENTIAL_ROUNDS // 2, (got_a, got_b)  # strict alternation


def _want_texts(model: ExportedModel, texts: list[str]) -> np.ndarray:
    """open_clip's own text embeddings of export X's weights."""
    model_configs.register()
    tokenizer = open_clip.get_tokenizer(model.name)
    with torch.no_grad():
        return model.clip.encode_text(tokenizer(texts), normalize=True).numpy()


async def test_three_replicas_one_foreign_answer_and_cache_no_foreign_vector(
    demo_model: ExportedModel, both_up: Replicas
) -> None:
    """A and B serve X, F serves another export: F gets no inference at all (its
    configs are read, its vectors never asked for), every answer is X's, and Redis
    holds only X's vectors."""
    r = both_up
    target = f"ipv4:{r.a.grpc_url},{r.foreign.grpc_url},{r.b.grpc_url}"
    before_f = {m: await _inferences(r.foreign, m) for m in (HELD_MODEL, TEXT_MODEL)}
    answered: dict[str, np.ndarray] = {}
    image_vectors: list[np.ndarray] = []
    errors: list[BaseException] = []
    with RedisServer() as redis:
        settings = gateway_settings(
            demo_model.repository,
            backend="triton",
            triton_url=target,
            triton_image_model=HELD_MODEL,
            redis_url=redis.url,
            local_cache_items=0,
        )
        async with running_gateway(settings) as gw:
            async with AsyncClipClient(f"127.0.0.1:{gw.port}") as client:

                async def caller(index: int) -> None:
                    for i in range(12):
                        text = f"caller {index} asks for text {i}"
                        image = encode(photo_like(40, 36, seed=index * 100 + i), "PNG")
                        try:
                            texts = await client.embed_text([text])
                            images = await client.embed_image([image])
                        except Exception as exc:  # any error a caller sees fails the test
                            errors.append(exc)
                            continue
                        answered[text] = texts.vectors[0]
                        image_vectors.append(images.vectors[0])

                await asyncio.gather(*(caller(i) for i in range(CALLERS)))
        raw = redis_lib.Redis.from_url(redis.url)
        stored = [raw.get(key) for key in raw.scan_iter("clip:*:emb:*")]
    assert not errors, errors[:3]
    assert len(answered) == CALLERS * 12
    texts = sorted(answered)
    np.testing.assert_allclose(
        np.stack([answered[t] for t in texts]), _want_texts(demo_model, texts), atol=1e-5, rtol=0
    )
    # F was never asked for a vector.
    for model, count in before_f.items():
        assert await _inferences(r.foreign, model) == count, model
    # Every vector in Redis is one that was answered (and so X's).
    known = np.stack([*answered.values(), *image_vectors])
    assert len(stored) == len(known)
    for value in stored:
        assert value is not None
        vector = np.frombuffer(value[1:], dtype="<f4")
        assert np.abs(known - vector).max(axis=1).min() < 1e-6


async def test_a_fresh_channel_to_a_replica_that_came_back_connects_at_once() -> None:
    """The backend replaces a failed replica's channel; with gRPC's shared subchannel
    pool the new channel inherited the old one's reconnect back-off (up to 2 s), so a
    replica restarted just then was refused to every probe and call meanwhile (CI saw
    all 40 sequential calls go to one replica after a restart).

    A plain listener on the port accepts and drops the old channel's attempts until its
    back-off has grown to the maximum; right after one such attempt a gRPC server
    takes the port, and a channel with the backend's own arguments must be ready at
    once, not when the old back-off ends."""
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.setblocking(False)
    address = f"127.0.0.1:{listener.getsockname()[1]}"
    args = TritonBackend(url=address, default_timeout_s=5.0, max_batch_size=8)._channel_args()
    loop = asyncio.get_running_loop()
    old = grpc.aio.insecure_channel(address, options=args)
    server = grpc.aio.server()
    try:
        # 0.25, 0.4, 0.64, 1.0, 1.6 s: after the sixth failed attempt the back-off is
        # 2 s ± 20%, so the old subchannel tries again no sooner than 1.6 s later.
        for _ in range(6):
            old.get_state(try_to_connect=True)
            attempt, _ = await asyncio.wait_for(loop.sock_accept(listener), 30)
            attempt.close()
        listener.close()
        health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
        server.add_insecure_port(address)
        await server.start()
        async with grpc.aio.insecure_channel(address, options=args) as fresh:
            await asyncio.wait_for(fresh.channel_ready(), 1.0)
    finally:
        listener.close()
        await old.close()
        await server.stop(None)
