"""Priority lanes: interactive calls go before bulk work, and bulk cannot crowd them out.

A call's lane is set once at the transport's edge (`using`), from the request's
`priority` (gRPC field, HTTP body field or `X-Clip-Priority` header) or the call's
default: interactive for unary calls, bulk for EmbedStream items. It travels with the
call as a context variable, the way asyncio carries a request's context into the tasks
it starts, so the pipeline in between (cache, single flight, decode) needs no parameter
for it. Three places read it:

- admission (`Admission`): each lane has its own bound, so a bulk job cannot take the
  places interactive calls need;
- the batching queue (`BatchQueue`): batches are formed from interactive work first;
  a bulk entry that has waited `bulk_max_wait_s` goes next anyway (never starved);
- the backend: Triton gets the lane as the request's priority level
  (`TRITON_PRIORITY`; the exported config declares the levels).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Literal

from service.errors import InvalidInput

Lane = Literal["interactive", "bulk"]
INTERACTIVE: Lane = "interactive"
BULK: Lane = "bulk"
LANES: tuple[Lane, ...] = (INTERACTIVE, BULK)
#: Triton priority level of each lane (1 is served first; `priority_levels: 2` in the config).
TRITON_PRIORITY: dict[str, int] = {INTERACTIVE: 1, BULK: 2}

_CURRENT: ContextVar[Lane] = ContextVar("clip_lane", default=INTERACTIVE)


def current() -> Lane:
    """The lane of the call running in this context (interactive unless set)."""
    return _CURRENT.get()


@contextlib.contextmanager
def using(lane: Lane) -> Iterator[None]:
    """Run the `with` block (and the tasks it starts) in `lane`."""
    token = _CURRENT.set(lane)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def parse(value: object, field: str = "priority", default: Lane = INTERACTIVE) -> Lane:
    """An HTTP `priority` value ("interactive", "bulk", or empty for `default`) → its lane."""
    if value is None or value == "":
        return default
    if isinstance(value, str) and value.strip().lower() in LANES:
        return value.strip().lower()  # type: ignore[return-value]
    raise InvalidInput(f"must be one of {', '.join(LANES)}, not {str(value)[:32]!r}", field=field)
