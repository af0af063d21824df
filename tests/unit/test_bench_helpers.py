"""The benchmarks' own helpers: result writing, the replicas ratios, the GPU report's rows."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from bench.gpu import parse_args, ratio_rows, steps_table
from bench.harness import CallFailed, LoadResult, closed_loop, interleaved, write_result
from bench.replicas import Round, paired_ratios


def test_write_result_writes_the_report_then_prints_summary_and_paths(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "deeper" / "x.md"
    write_result(out, "# report\n", "the summary", tmp_path / "x.png")
    assert out.read_text() == "# report\n"
    printed = capsys.readouterr().out
    assert "=== summary ===" in printed
    assert printed.index("the summary") < printed.index(f"wrote {out} and {tmp_path / 'x.png'}")


def _round(index: int, path: str, items: int, seconds: float = 1.0) -> Round:
    result = LoadResult(path, 4, calls=items, items=items, seconds=seconds)
    return Round(index, path, result, {"A": items, "B": 0}, {"A": 1, "B": 0}, {}, 0.0)


def test_paired_ratios_pair_round_n_of_each_path() -> None:
    rounds = [
        _round(1, "one", 100),
        _round(1, "two", 90),
        _round(2, "one", 50),
        _round(2, "two", 60),
    ]
    assert paired_ratios(rounds) == pytest.approx([0.9, 1.2])


def test_ratio_rows_divide_gateway_by_triton_alone_at_the_same_callers() -> None:
    point = {"p50_ms": 1.0, "p99_ms": 2.0, "errors": "0"}
    part = {
        "model": "m",
        "precision": "fp16",
        "points": [
            {
                **point,
                "path": "triton",
                "modality": "image",
                "concurrency": 8,
                "items_per_s": 200.0,
            },
            {
                **point,
                "path": "gateway",
                "modality": "image",
                "concurrency": 8,
                "items_per_s": 150.0,
            },
            {**point, "path": "triton", "modality": "text", "concurrency": 8, "items_per_s": 100.0},
        ],
    }
    rows = {row[1]: row for row in ratio_rows(part)}
    assert rows["image (images/s)"][7] == "0.75×"
    assert rows["text (texts/s)"][7] == "–"  # the gateway point is missing (a step timed out)


def test_steps_table_names_timeouts_and_skips(tmp_path: Path) -> None:
    args: argparse.Namespace = parse_args(["report", "--smoke", "--work", str(tmp_path)])
    (tmp_path / "steps.tsv").write_text(
        "export a\t0\t3\nmeasure a\t124\t150\nmeasure b\tskipped\t0\n"
    )
    assert [row[1] for row in steps_table(args)] == [
        "ok",
        "TIMED OUT",
        "SKIPPED (the run's time budget was spent)",
    ]


async def test_interleaved_rotates_the_order_each_round() -> None:
    seen: list[tuple[int, str]] = []

    async def measure(n: int, point: str) -> str:
        seen.append((n, point))
        return f"{point}{n}"

    rounds = await interleaved(3, ["a", "b", "c"], measure, step=1)
    assert [list(r) for r in rounds] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"]]
    assert rounds[1]["a"] == "a2"
    assert seen[:4] == [(1, "a"), (1, "b"), (1, "c"), (2, "b")]


async def test_closed_loop_counts_failures_by_code_and_stops_at_max_calls() -> None:
    async def call(i: int) -> int:
        if i % 3 == 0:
            raise CallFailed("RESOURCE_EXHAUSTED")
        return 2

    result = await closed_loop(
        call, label="t", concurrency=2, seconds=60, max_calls=9, warmup_rounds=0, progress=False
    )
    assert result.calls == 9
    assert result.errors == {"RESOURCE_EXHAUSTED": 3}
    assert (len(result.latencies_s), result.items) == (6, 12)
    assert result.error_text == "RESOURCE_EXHAUSTED×3"
