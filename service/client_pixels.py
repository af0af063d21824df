"""Pre-sized pixels made on the client's CPUs, with the gateway's own preprocessing code.

A gateway spends ~6 ms of CPU on a 640×480 JPEG and ~200 ms on a 12 MP photo (decode,
resize, crop; bench/results/gateway-cpu.md); checking pre-sized pixels costs it well
under a millisecond. So a client with cores to spare decodes itself and sends the
model's S×S RGB pixels (`EmbedImageRequest.pixels`): bulk indexing then scales with the
clients' cores. The pixels come from `service.core.image_preprocess.image_pixels`, the
very function the gateway runs, with the size, filter and EXIF rule the server states
in `ModelInfo`, so the vector is the one the encoded image would get, bit for bit.

Decodes run in a process pool (the GIL is released in most of Pillow's work, but not
all of it, and a pool keeps the caller's event loop free). Only file paths or the
encoded bytes go in and ~150 KB of pixels come out.

An image this module cannot make pixels of (corrupt, unsupported, over the local pixel
limit) comes back as None: the caller sends its encoded bytes instead, and the server
answers it exactly as it would have (same error, same index).
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import Executor, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.core.image_preprocess import ImageLimits, ImageSpec, image_pixels
from service.cpus import usable_cpus
from service.errors import InvalidInput

#: Local decodes refuse what a default gateway refuses (`Settings.max_image_bytes`,
#: `max_image_pixels`); such images go to the server as bytes and it answers for them.
_LOCAL_MAX_BYTES = 20 * 1024 * 1024
_LOCAL_MAX_PIXELS = 50_000_000

#: A file path (read in the worker, so the encoded bytes never cross processes) or bytes.
Source = bytes | str


@dataclass(frozen=True)
class PixelRecipe:
    """How a served model wants its pixels made (from its `ModelInfo`)."""

    spec: ImageSpec
    limits: ImageLimits

    @classmethod
    def from_model_info(cls, info: Any, *, fast_jpeg: bool = False) -> PixelRecipe | None:
        """The recipe a `clip.v1.ModelInfo` states; None when the server takes no pixels
        (an older gateway: `accepts_pixels` unset)."""
        if not getattr(info, "accepts_pixels", False) or info.image_size <= 0:
            return None
        spec = ImageSpec(
            int(info.image_size), info.image_interpolation or "bicubic", fast_jpeg=fast_jpeg
        )
        return cls(spec, ImageLimits(_LOCAL_MAX_BYTES, _LOCAL_MAX_PIXELS, info.exif_transpose))


def make_pixels(source: Source, recipe: PixelRecipe) -> bytes | None:
    """The pixels of one image (a path or encoded bytes), or None when it cannot be made
    here (the server then gets the encoded bytes and answers for them)."""
    try:
        data = Path(source).read_bytes() if isinstance(source, str) else source
        return image_pixels(data, recipe.spec, recipe.limits)
    except (InvalidInput, OSError):
        return None


def default_workers() -> int:
    """One worker per CPU this process may use (affinity, cgroup quota)."""
    return usable_cpus()


class PixelPool:
    """A lazily started process pool that makes pixels; `workers=0` makes them in the
    calling thread (no processes: for a few images at a time)."""

    def __init__(self, workers: int | None = None) -> None:
        self.workers = default_workers() if workers is None else workers
        if self.workers < 0:
            raise ValueError(f"workers must be 0 or more, not {self.workers}")
        self._executor: Executor | None = None

    def _pool(self) -> Executor:
        if self._executor is None:
            # spawn, not fork: a forked child of a process with live gRPC channels or
            # threads can deadlock; the workers import only Pillow and numpy.
            self._executor = ProcessPoolExecutor(
                max_workers=self.workers, mp_context=multiprocessing.get_context("spawn")
            )
        return self._executor

    def make(self, sources: Sequence[Source], recipe: PixelRecipe) -> list[bytes | None]:
        """Pixels of each source, in order (None where it could not be made)."""
        if self.workers == 0 or len(sources) == 1:
            return [make_pixels(s, recipe) for s in sources]
        return list(self._pool().map(make_pixels, sources, [recipe] * len(sources)))

    async def amake(self, source: Source, recipe: PixelRecipe) -> bytes | None:
        """One image's pixels without blocking the event loop."""
        loop = asyncio.get_running_loop()
        executor = None if self.workers == 0 else self._pool()
        return await loop.run_in_executor(executor, make_pixels, source, recipe)

    async def amake_many(
        self, sources: Sequence[Source], recipe: PixelRecipe
    ) -> list[bytes | None]:
        """Pixels of each source, in order, without blocking the event loop."""
        return list(await asyncio.gather(*(self.amake(s, recipe) for s in sources)))

    def close(self) -> None:
        """Stop the worker processes (a later call starts them again)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None


def source_of(image: bytes | str | os.PathLike[str]) -> Source:
    """A client `ImageInput` as a pool source: bytes as they are, a path as a string."""
    return image if isinstance(image, bytes) else os.fspath(image)
