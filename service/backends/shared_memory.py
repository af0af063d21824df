"""A POSIX shared-memory region cut into fixed slots: input tensors for a Triton on this host.

Why: with pre-sized pixels, sending a batch to Triton as gRPC bytes is most of what the
gateway still spends per image (copy into the request, serialize, loopback `sendmsg`;
bench/results/gateway-cpu.md). A Triton that maps the same region reads the batch where
the gateway wrote it: one copy, and only the region's name crosses the wire.

Contract:
- `SlotRegion(name, slot_bytes, slots)` creates (or takes over) `/dev/shm/<name>`, mode
  0600, `slot_bytes × slots` long, its memory reserved up front: OSError (and no file)
  when /dev/shm cannot hold it. The name is the caller's; Triton registers it by `key`.
- `take(array)` copies a C-contiguous array into a free slot and returns the slot's byte
  offset, or None when the array is larger than a slot or every slot is taken: the
  caller then sends bytes as before. It never waits.
- `give_back(offset)` frees the slot; call it once the request that read it has ended.
- `close()` unmaps and unlinks. Thread-unsafe: one event loop uses it.
"""

from __future__ import annotations

import mmap
import os
from pathlib import Path

import numpy as np

SHM_DIR = Path("/dev/shm")


class SlotRegion:
    """`slots` slots of `slot_bytes` each, in one file under /dev/shm."""

    def __init__(self, name: str, slot_bytes: int, slots: int) -> None:
        if slot_bytes <= 0 or slots <= 0:
            raise ValueError(f"a region needs slots of some size, got {slots} × {slot_bytes}")
        self.name = name
        self.slot_bytes = slot_bytes
        self.byte_size = slot_bytes * slots
        self.path = SHM_DIR / name
        # Not O_EXCL: a gateway restarted under the same host name and pid (a container's
        # pid 1) takes over what its predecessor left; nobody else writes this name.
        fd = os.open(self.path, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o600)
        try:
            # Reserved now, not page by page later: a write into a mapped tmpfs page that
            # a full /dev/shm (64 MiB in a default container) cannot back is a SIGBUS,
            # which would kill the gateway mid-call.
            os.posix_fallocate(fd, 0, self.byte_size)
            self._map = mmap.mmap(fd, self.byte_size)
        except OSError:
            self.path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        self._buffer = np.frombuffer(self._map, dtype=np.uint8)
        self._free = list(range(0, self.byte_size, slot_bytes))

    @property
    def key(self) -> str:
        """What Triton's `shm_open` is given."""
        return f"/{self.name}"

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def take(self, array: np.ndarray) -> int | None:
        """Copy `array` into a free slot; its offset, or None (too big, or none free)."""
        if array.nbytes > self.slot_bytes or not self._free:
            return None
        offset = self._free.pop()
        self._buffer[offset : offset + array.nbytes] = array.reshape(-1).view(np.uint8)
        return offset

    def give_back(self, offset: int) -> None:
        self._free.append(offset)

    def close(self) -> None:
        """Unmap and unlink (Triton keeps its own mapping until it unregisters)."""
        del self._buffer
        self._map.close()
        self.path.unlink(missing_ok=True)
