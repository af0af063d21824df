"""`SlotRegion`: fixed slots in one /dev/shm file; never waits, never overflows a slot."""

from __future__ import annotations

import errno
import mmap
import os
from pathlib import Path

import numpy as np
import pytest

from service.backends import shared_memory
from service.backends.shared_memory import SlotRegion


@pytest.fixture
def shm_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(shared_memory, "SHM_DIR", tmp_path)
    return tmp_path


def _read(path: Path, offset: int, n: int) -> bytes:
    with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        return bytes(m[offset : offset + n])


def test_a_batch_lands_in_a_free_slot_that_another_process_can_read(shm_dir: Path) -> None:
    region = SlotRegion("r1", slot_bytes=48, slots=2)
    assert region.key == "/r1" and region.byte_size == 96
    assert (shm_dir / "r1").stat().st_size == 96
    assert (shm_dir / "r1").stat().st_mode & 0o777 == 0o600  # nobody else's to read
    batch = np.arange(2 * 3 * 2 * 2, dtype=np.uint8).reshape(2, 3, 2, 2)
    first = region.take(batch)
    second = region.take(batch[::-1].copy())
    assert {first, second} == {0, 48}
    assert first is not None and second is not None
    assert _read(shm_dir / "r1", first, 24) == batch.tobytes()
    assert _read(shm_dir / "r1", second, 24) == batch[::-1].tobytes()
    region.close()
    assert not (shm_dir / "r1").exists()


def test_none_when_too_big_or_every_slot_is_taken(shm_dir: Path) -> None:
    region = SlotRegion("r2", slot_bytes=16, slots=1)
    assert region.take(np.zeros(17, np.uint8)) is None  # larger than a slot
    assert region.free_slots == 1
    offset = region.take(np.ones(16, np.uint8))
    assert offset == 0 and region.free_slots == 0
    assert region.take(np.ones(4, np.uint8)) is None  # all taken: the caller sends bytes
    region.give_back(offset)
    assert region.take(np.full(4, 7, np.uint8)) == 0
    assert _read(shm_dir / "r2", 0, 4) == bytes([7] * 4)
    region.close()


def test_a_restarted_gateway_takes_over_its_predecessors_file(shm_dir: Path) -> None:
    (shm_dir / "r3").write_bytes(b"x" * 1000)  # left by a gateway that was killed
    os.chmod(shm_dir / "r3", 0o600)
    region = SlotRegion("r3", slot_bytes=8, slots=2)
    assert (shm_dir / "r3").stat().st_size == 16
    assert _read(shm_dir / "r3", 0, 16) == bytes(16)
    region.close()


def test_a_region_needs_slots() -> None:
    with pytest.raises(ValueError, match="slots"):
        SlotRegion("r4", slot_bytes=0, slots=2)


def test_a_region_dev_shm_cannot_hold_is_refused_up_front_and_leaves_no_file(
    shm_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A full /dev/shm: refused now, not a SIGBUS at the first write into an unbacked page.
    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shared_memory.os, "posix_fallocate", full)
    with pytest.raises(OSError, match="No space"):
        SlotRegion("r5", slot_bytes=1 << 20, slots=4)
    assert not (shm_dir / "r5").exists()


def test_the_memory_is_reserved_when_the_region_is_made(shm_dir: Path) -> None:
    region = SlotRegion("r6", slot_bytes=1 << 20, slots=2)
    assert (shm_dir / "r6").stat().st_blocks * 512 >= 2 << 20  # allocated, not sparse
    region.close()
