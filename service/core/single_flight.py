"""Identical concurrent work, computed once: the first caller owns a key, the rest wait.

Contract:
- `claim(keys)` splits the distinct `keys` into those the caller now owns and those
  another caller already owns (with the future to wait on). Claims are made before the
  caller's next `await`, so two concurrent callers never both own a key.
- An owner settles every key it owns, exactly once: `resolve(key, value)`, or
  `fail(keys, error)`. A key stays claimed until `release(keys)` (after `resolve`, once
  the value can be found elsewhere, e.g. in a cache) or `fail` (which releases).
- `wait(futures)` never lets one waiter's cancellation reach the shared future.
- When an owner fails because of one of its own inputs (`culprit`), waiters on its
  other keys get `Abandoned` and should claim again: their input was fine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Hashable, Iterable, Mapping
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Abandoned(Exception):
    """The owner of this key failed on another input; claim the key again."""


class SingleFlight(Generic[K, V]):
    """The table of keys being computed now, and the futures their waiters share."""

    def __init__(self) -> None:
        self._inflight: dict[K, asyncio.Future[V]] = {}

    def __len__(self) -> int:
        """Keys claimed now."""
        return len(self._inflight)

    def claim(
        self, keys: Iterable[K]
    ) -> tuple[dict[K, asyncio.Future[V]], dict[K, asyncio.Future[V]]]:
        """(owned, waiting): futures this caller must settle, and others' to wait on."""
        loop = asyncio.get_running_loop()
        owned: dict[K, asyncio.Future[V]] = {}
        waiting: dict[K, asyncio.Future[V]] = {}
        for key in dict.fromkeys(keys):
            future = self._inflight.get(key)
            if future is None:
                owned[key] = self._inflight[key] = loop.create_future()
            else:
                waiting[key] = future
        return owned, waiting

    @staticmethod
    def resolve(owned: Mapping[K, asyncio.Future[V]], key: K, value: V) -> None:
        """Give every waiter on `key` its value (the key stays claimed until `release`)."""
        future = owned[key]
        if not future.done():
            future.set_result(value)

    def fail(
        self,
        owned: Mapping[K, asyncio.Future[V]],
        error: BaseException,
        *,
        culprit: K | None = None,
    ) -> None:
        """Settle every unsettled owned key with `error` (or `Abandoned`, for keys other
        than a known `culprit`) and release them all."""
        self.release(owned)
        for key, future in owned.items():
            if future.done():
                continue
            future.set_exception(error if culprit in (None, key) else Abandoned())
            future.exception()  # retrieved: there may be no waiter to read it

    def release(self, owned: Mapping[K, asyncio.Future[V]]) -> None:
        """Unclaim keys (only where the claim is still this owner's)."""
        for key, future in owned.items():
            if self._inflight.get(key) is future:
                del self._inflight[key]

    @staticmethod
    async def wait(futures: Mapping[K, asyncio.Future[V]]) -> dict[K, V | BaseException]:
        """Each future's value or exception; cancelling this caller cancels none of them."""
        # asyncio.wait, not gather(shield(f), ...): it cancels none of the futures when
        # the caller is cancelled either, without a shield future per key (measured: a
        # visible share of the gateway's CPU per image at GPU rates, issue 28).
        if futures:
            await asyncio.wait(futures.values())
        return {
            key: (f.exception() or f.result()) if not f.cancelled() else asyncio.CancelledError()
            for key, f in futures.items()
        }
