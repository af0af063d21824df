"""Shared work (single-flight) outlives any one caller: unit level, a fake backend, no model."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from service.core.admission import Admission
from service.core.cache import EmbeddingCache
from service.core.embedder import Embedder, EmbedderOptions
from service.core.single_flight import Abandoned, SingleFlight
from service.errors import DeadlineExceeded
from service.metrics import Metrics
from service.settings import Settings
from service.wiring import build_limits
from tests.support.fakes import model_metadata

META = model_metadata(
    model_name="fake",
    embedding_dim=4,
    image_size=8,
    logit_scale=10.0,
    mean=(0.5,) * 3,
    std=(0.5,) * 3,
)


class GatedBackend:
    """Answers only when `gate` is set; honours the timeout it is given, like Triton."""

    name = "fake"
    max_batch_size = 32

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.called = asyncio.Event()
        self.calls = 0
        self.timeouts: list[float | None] = []

    async def start(self) -> None: ...

    async def ready(self) -> bool:
        return True

    async def _answer(self, rows: np.ndarray, timeout_s: float | None) -> np.ndarray:
        self.calls += 1
        self.called.set()
        self.timeouts.append(timeout_s)
        try:
            await asyncio.wait_for(self.gate.wait(), timeout_s)
        except TimeoutError:
            raise DeadlineExceeded("fake backend: the deadline passed") from None
        return np.tile(np.array([[1.0, 0, 0, 0]], dtype=np.float32), (len(rows), 1))

    async def embed_images(self, pixels_uint8: np.ndarray, *, timeout_s=None) -> np.ndarray:
        return await self._answer(pixels_uint8, timeout_s)

    async def embed_texts(self, token_ids: np.ndarray, *, timeout_s=None) -> np.ndarray:
        return await self._answer(token_ids, timeout_s)

    async def aclose(self) -> None: ...


def _embedder(backend: GatedBackend) -> Embedder:
    metrics = Metrics()
    return Embedder(
        backend=backend,
        cache=EmbeddingCache(metrics=metrics, local_items=100),
        label_cache=EmbeddingCache(metrics=metrics, local_items=100),
        metadata=META,
        limits=build_limits(Settings()),
        metrics=metrics,
        admission=Admission(100, metrics),
        options=EmbedderOptions(
            decode_threads=1,
            exif_transpose=True,
            decode_budget_pixels=None,
            text_length_buckets=(8,),
        ),
    )


async def test_the_owners_deadline_does_not_fail_a_patient_waiter() -> None:
    backend = GatedBackend()
    embedder = _embedder(backend)
    # 3 s: time enough to tokenize one short text on a loaded machine and reach the backend.
    owner = asyncio.create_task(embedder.embed_texts(["same text"], timeout_s=3.0))
    await backend.called.wait()  # the owner holds the key and waits at the backend
    waiter = asyncio.create_task(embedder.embed_texts(["same text"], timeout_s=60))
    with pytest.raises(DeadlineExceeded):
        await owner
    backend.gate.set()  # the backend answers only after the owner gave up
    (result,) = await waiter
    assert result.vector.tolist() == [1.0, 0, 0, 0]
    # The waiter claimed the key again and ran it on its own, longer budget.
    assert backend.calls == 2 and backend.timeouts[-1] is not None and backend.timeouts[-1] > 1
    assert embedder.admitted == 0 and not len(embedder._flights)


async def test_a_cancelled_owner_never_hands_its_cancellation_to_a_waiter() -> None:
    backend = GatedBackend()
    backend.gate.set()
    embedder = _embedder(backend)
    # Images: the owner is cancelled while its input is being prepared (decoded).
    buffer = io.BytesIO()
    Image.new("RGB", (640, 480), (200, 30, 30)).save(buffer, "PNG")
    image = buffer.getvalue()
    owner = asyncio.create_task(embedder.embed_images([image], timeout_s=60))
    await asyncio.sleep(0)
    waiter = asyncio.create_task(embedder.embed_images([image], timeout_s=60))
    await asyncio.sleep(0)
    owner.cancel()
    (result,) = await waiter  # a status of its own: a vector, not CancelledError
    assert result.vector.shape == (4,)
    assert owner.cancelled()


async def test_a_waiter_keeps_its_own_deadline_while_waiting() -> None:
    backend = GatedBackend()
    embedder = _embedder(backend)
    owner = asyncio.create_task(embedder.embed_texts(["slow"], timeout_s=60))
    await asyncio.sleep(0)
    with pytest.raises(DeadlineExceeded):
        await embedder.embed_texts(["slow"], timeout_s=0.1)
    backend.gate.set()
    assert len(await owner) == 1


async def test_single_flight_contract() -> None:
    flights: SingleFlight[str, int] = SingleFlight()
    owned, waiting = flights.claim(["a", "b", "a"])
    assert list(owned) == ["a", "b"] and not waiting
    owned2, waiting2 = flights.claim(["b", "c"])
    assert list(owned2) == ["c"] and list(waiting2) == ["b"]
    flights.fail(owned, ValueError("bad a"), culprit="a")
    outcomes = await SingleFlight.wait(waiting2)
    assert isinstance(outcomes["b"], Abandoned)  # b was fine: claim it again
    assert isinstance(owned["a"].exception(), ValueError)
    SingleFlight.resolve(owned2, "c", 3)
    flights.release(owned2)
    assert len(flights) == 0
    # A waiter's cancellation never reaches the shared future.
    owned3, _ = flights.claim(["d"])
    waiter = asyncio.create_task(SingleFlight.wait(owned3))
    await asyncio.sleep(0)
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert not owned3["d"].cancelled()
