"""Bounds that need no server: the decode pixel budget, usable CPUs, API-key reloads."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from service import cpus
from service.core.admission import PixelBudget
from service.cpus import cgroup_cpu_quota, usable_cpus
from service.server.credentials import ApiKeys


def test_the_pixel_budget_makes_a_decode_wait_until_others_finish() -> None:
    budget = PixelBudget(100)
    entered = threading.Event()
    leave = threading.Event()
    order: list[str] = []

    def big(name: str) -> None:
        with budget.hold(80):
            order.append(f"{name} in")
            entered.set()
            leave.wait(10)
            order.append(f"{name} out")

    first = threading.Thread(target=big, args=("a",))
    first.start()
    assert entered.wait(10)
    second = threading.Thread(target=big, args=("b",))
    second.start()
    # b cannot fit (80 + 80 > 100) while a holds its pixels.
    for _ in range(50):
        if budget.in_use == 80 and order == ["a in"]:
            break
        time.sleep(0.01)
    assert order == ["a in"] and budget.in_use == 80
    leave.set()
    first.join(10)
    second.join(10)
    assert order == ["a in", "a out", "b in", "b out"] and budget.in_use == 0


def test_a_canvas_larger_than_the_budget_runs_alone_rather_than_never() -> None:
    budget = PixelBudget(100)
    with budget.hold(10_000):
        assert budget.in_use == 100
    assert budget.in_use == 0
    with pytest.raises(ValueError):
        PixelBudget(0)


def test_cgroup_quota_files(tmp_path: Path) -> None:
    v2 = tmp_path / "cpu.max"
    v2.write_text("150000 100000\n")
    assert cgroup_cpu_quota(v2, tmp_path / "no", tmp_path / "no") == 1.5
    v2.write_text("max 100000\n")
    assert cgroup_cpu_quota(v2, tmp_path / "no", tmp_path / "no") is None
    quota, period = tmp_path / "quota", tmp_path / "period"
    quota.write_text("200000")
    period.write_text("100000")
    assert cgroup_cpu_quota(tmp_path / "missing", quota, period) == 2.0
    quota.write_text("-1")
    assert cgroup_cpu_quota(tmp_path / "missing", quota, period) is None


@pytest.mark.parametrize(
    ("affinity", "cpu_max", "usable"),
    [
        ({0, 1, 2, 3}, "150000 100000", 2),  # 1.5 CPUs of quota: 2 threads, not 4
        ({0, 1, 2, 3}, "max 100000", 4),  # no quota: the affinity
        ({0, 1, 2, 3}, "800000 100000", 4),  # a quota above the affinity: the affinity
        ({0, 1, 2, 3}, "20000 100000", 1),  # 0.2 CPUs: still one
        ({0}, "150000 100000", 1),
        ({0}, "max 100000", 1),
        ({2, 5, 7}, "max 100000", 3),  # the count of the mask, not its highest CPU + 1
        (None, "150000 100000", 2),  # no affinity call: the host's count, capped the same
        (None, "max 100000", 64),
    ],
)
def test_usable_cpus_is_the_affinity_capped_by_the_quota_rounded_up(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    affinity: set[int] | None,
    cpu_max: str,
    usable: int,
) -> None:
    v2 = tmp_path / "cpu.max"
    v2.write_text(cpu_max + "\n")
    missing = tmp_path / "missing"

    def sched_getaffinity(pid: int) -> set[int]:
        if affinity is None:
            raise OSError("not on this platform")
        return set(affinity)

    monkeypatch.setattr(cpus.os, "sched_getaffinity", sched_getaffinity, raising=False)
    monkeypatch.setattr(cpus.os, "cpu_count", lambda: 64)  # the host's count
    monkeypatch.setattr(cpus, "cgroup_cpu_quota", lambda: cgroup_cpu_quota(v2, missing, missing))
    assert usable_cpus() == usable


def test_api_keys_follow_their_file_and_fail_closed(tmp_path: Path) -> None:
    now = [0.0]
    keys_file = tmp_path / "keys"
    keys_file.write_text("alpha\n")
    keys = ApiKeys(frozenset({"fixed"}), keys_file, check_interval_s=1.0, clock=lambda: now[0])
    assert keys.enabled and set(keys.current()) == {b"fixed", b"alpha"}
    keys_file.write_text("# rotated\nbravo\n")
    assert b"alpha" in keys.current()  # not checked again within the interval
    now[0] = 1.5
    assert set(keys.current()) == {b"fixed", b"bravo"}
    keys_file.unlink()
    now[0] = 3.0
    assert set(keys.current()) == {b"fixed", b"bravo"}  # missing mid-swap: keep the last
    empty = tmp_path / "empty"
    empty.write_text("")
    assert ApiKeys(frozenset(), empty).enabled  # configured but empty: every call refused
    assert not ApiKeys(frozenset(), None).enabled
