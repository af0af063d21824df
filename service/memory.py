"""glibc's allocator, set for a gateway: large short-lived buffers go back to the
operating system when freed; the steady working set of smaller ones stays mapped.

- **Mmap threshold, fixed at 4 MiB.** glibc serves an allocation from the mmap threshold
  up (128 KiB at first) with its own mapping, unmapped on free; but each time such a
  block is freed it raises the threshold to that block's size, up to 32 MiB. After one
  large image, Pillow's 16 MiB canvas blocks and the batches' arrays come from the heap
  instead, and a heap keeps what it had: a gateway held ~260 MB more resident after a
  few 49 MP decodes, for good (tests/integration/test_memory_return.py). A fixed
  threshold stops that adjustment; it costs a page fault per 4 KiB of each such buffer
  on every use (~1-2 ms for a 19 MB batch), far below the decode or forward pass that
  fills it.
- **Trim threshold, 64 MiB.** Fixing the mmap threshold also stops glibc from raising
  the trim threshold with it, which leaves it at 128 KiB: every time the top of the heap
  is freed past that, glibc gives the pages back, and the next request's buffers (a
  request's message, the batch array, the Triton request: ~1.2 MB each for 8 images of
  224×224) fault them in again, zero-filled by the kernel. On the pre-sized pixel path
  that churn was half of the gateway's CPU per image (bench/results/gateway-cpu.md). The
  heap now keeps up to 64 MiB free at its top: a bounded cost, far below the RSS bound
  the memory test holds.
"""

from __future__ import annotations

import ctypes
import logging
import os

_LOGGER = logging.getLogger(__name__)

#: glibc's `mallopt` parameters.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
#: Larger than a 640×480 RGB canvas (0.9 MB), so common images stay on the fast heap.
MMAP_THRESHOLD_BYTES = 4 * 1024 * 1024
#: Free memory the heap keeps at its top: several requests' buffers in flight.
TRIM_THRESHOLD_BYTES = 64 * 1024 * 1024


def tune_malloc(
    mmap_threshold_bytes: int = MMAP_THRESHOLD_BYTES,
    trim_threshold_bytes: int = TRIM_THRESHOLD_BYTES,
) -> bool:
    """Fix glibc's mmap and trim thresholds; False where they cannot be set (not glibc).
    A threshold the operator set through `MALLOC_MMAP_THRESHOLD_` or
    `MALLOC_TRIM_THRESHOLD_` stands."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    done = True
    for env, parameter, value in (
        ("MALLOC_MMAP_THRESHOLD_", _M_MMAP_THRESHOLD, mmap_threshold_bytes),
        ("MALLOC_TRIM_THRESHOLD_", _M_TRIM_THRESHOLD, trim_threshold_bytes),
    ):
        if env not in os.environ:
            done = bool(mallopt(parameter, value)) and done
    if done:
        _LOGGER.debug(
            "glibc mmap threshold %d bytes, trim threshold %d bytes",
            mmap_threshold_bytes,
            trim_threshold_bytes,
        )
    return done
