"""Memory a piece of code keeps: Python and numpy allocations still alive, from tracemalloc."""

from __future__ import annotations

import asyncio
import linecache
import tracemalloc


def _names_an_attribute_per_call(frame: tracemalloc.Frame) -> bool:
    # `getattr(obj, f"chunk_{cid}")` (PIL's PNG reader, its decoder lookup): CPython's type
    # attribute cache keeps such names, 4096 entries at most: bounded, not a leak.
    line = linecache.getline(frame.filename, frame.lineno)
    return "getattr(" in line and 'f"' in line


# The measuring itself: snapshots, and the source lines read to tell the cases apart.
_MEASURING = [
    tracemalloc.Filter(False, path) for path in (tracemalloc.__file__, linecache.__file__, __file__)
]


def kept_bytes(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot) -> int:
    """Bytes allocated after `before` and still alive at `after` (tracemalloc must be on)."""
    before, after = before.filter_traces(_MEASURING), after.filter_traces(_MEASURING)
    return sum(
        stat.size_diff
        for stat in after.compare_to(before, "lineno")
        if not _names_an_attribute_per_call(stat.traceback[-1])
    )


async def drop_cancelled_timers() -> None:
    """Make the running loop drop its cancelled timers now. asyncio keeps them (each with
    the context it captured) until they are over half of more than 100 scheduled, so
    between two snapshots they come and go by kilobytes: bounded, but noise on a bound
    of bytes per request. Scheduling and cancelling 1,024 more tips it over at the next
    turn of the loop; a timer that is still scheduled (a real leak) stays."""
    loop = asyncio.get_running_loop()
    for handle in [loop.call_later(3600.0, _nothing) for _ in range(1024)]:
        handle.cancel()
    await asyncio.sleep(0)
    await asyncio.sleep(0)


def _nothing() -> None:
    pass
