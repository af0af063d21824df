"""Memory of large, short-lived buffers goes back to the operating system when freed.

glibc serves an allocation from the mmap threshold up (128 KiB at first) with its own
mapping, unmapped on free; but each time such a block is freed it raises the threshold
to that block's size, up to 32 MiB. After one large image, Pillow's 16 MiB canvas blocks
and the batches' arrays come from the heap instead, and a heap keeps what it had: a
gateway held ~260 MB more resident after a few 49 MP decodes, for good
(tests/integration/test_memory_return.py). A fixed threshold stops that adjustment.

Costs a page fault per 4 KiB of each such buffer on every use (~1-2 ms for a 19 MB
batch), far below the decode or forward pass that fills it.
"""

from __future__ import annotations

import ctypes
import logging
import os

_LOGGER = logging.getLogger(__name__)

#: glibc's `M_MMAP_THRESHOLD` parameter of `mallopt`.
_M_MMAP_THRESHOLD = -3
#: Larger than a 640×480 RGB canvas (0.9 MB), so common images stay on the fast heap.
MMAP_THRESHOLD_BYTES = 4 * 1024 * 1024


def return_large_buffers_to_the_os(threshold_bytes: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Fix glibc's mmap threshold at `threshold_bytes`; False where it cannot be (not
    glibc) or where the operator set `MALLOC_MMAP_THRESHOLD_` (theirs stands)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    done = bool(mallopt(_M_MMAP_THRESHOLD, threshold_bytes))
    if done:
        _LOGGER.debug("glibc mmap threshold fixed at %d bytes", threshold_bytes)
    return done
