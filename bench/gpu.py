"""The GPU benchmark's steps: export, Triton alone and the gateway end to end, report.

`bench/gpu.sh` runs each step in its own process under its own timeout, so one failing
or slow step does not lose the others:

    python -m bench.gpu export  --model ViT-B-32 --precision fp16      # clipsvc export
    python -m bench.gpu measure --model ViT-B-32 --precision fp16      # Triton, gateway
    python -m bench.gpu report                                         # gpu-cuda.md
    python -m bench.gpu ... --smoke                                    # CPU, demo model

- **export**: `clipsvc export --flavor pytorch --precision fp32|fp16` with random weights
  (`--pretrained none`; the demo model's own weights in `--smoke`), into
  `<work>/<model>-<precision>/`, skipped when already there.
- **measure**: serves that export from the pip `tritonserver` (the only Triton here; it
  has only the python backend, so the served copy gets `bench/triton_device_model.py`,
  which runs the same `model.pt` on `--device`; weights are symlinked), then measures
  1. Triton alone: `perf_analyzer` where it is on PATH and runs, otherwise a
     tritonclient gRPC loop: closed-loop callers, one pre-decoded image (uint8) or one
     short caption (int64 ids, padded to the gateway's 16-token bucket) per request;
  2. the gateway end to end (`clipsvc serve --backend triton` in its own process, cache
     off) against that Triton: one 640×480 JPEG or one short caption per EmbedImage /
     EmbedText call, every input new;
  at each concurrency, and writes `<work>/parts/<model>-<precision>.json` after every
  point (a timeout keeps what was measured).
- **report**: every part of this mode into `bench/results/gpu-cuda.md` (or
  `gpu-smoke.md`), with images/s and texts/s and the ratio gateway ÷ Triton alone, and
  the status of every step that `gpu.sh` recorded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bench import harness as h
from bench.captions import short_caption
from bench.harness import DEMO_MODEL, REPO_ROOT, fmt, md_table, section

GPU_MODELS = ("ViT-B-32", "ViT-L-14")
PRECISIONS = ("fp32", "fp16")
MODALITIES = ("image", "text")
PHOTO_SIZE = (640, 480)
TEXT_BUCKET = 16  # short captions are 13-15 tokens: the gateway pads them to this bucket
DEVICE_MODEL = Path(__file__).resolve().parent / "triton_device_model.py"
BASE_MODEL = REPO_ROOT / "service" / "model" / "triton_python_model.py"


@dataclass
class PointRecord:
    """One measured point, as stored in a part file."""

    path: str  # triton, gateway
    modality: str  # image, text
    concurrency: int
    items_per_s: float
    p50_ms: float
    p99_ms: float
    calls: int
    errors: str
    tool: str  # perf_analyzer, tritonclient loop, gateway


# ---------------------------------------------------------------------------- settings
def mode_defaults(smoke: bool) -> dict[str, object]:
    """What each mode measures unless told otherwise."""
    if smoke:
        return {
            "device": "cpu",
            "seconds": 1.0,
            "warmup_seconds": 1.0,
            "concurrency": "1,8",
            "instances": 1,
            "max_batch": 32,
            "inflight": 2,
        }
    return {
        "device": "cuda",
        "seconds": 2.5,
        "warmup_seconds": 2.0,
        "concurrency": "1,16,64",
        "instances": 2,
        "max_batch": 64,
        "inflight": 4,
    }


def work_dir(args: argparse.Namespace) -> Path:
    """Exports and parts of this mode (exports are reused by later runs)."""
    return Path(args.work) if args.work else h.MODELS_DIR / ("gpu-smoke" if args.smoke else "gpu")


def export_dir(args: argparse.Namespace) -> Path:
    """The pytorch-flavor export of `args.model` at `args.precision`."""
    return work_dir(args) / f"{args.model}-{args.precision}"


def part_file(args: argparse.Namespace) -> Path:
    """Where `measure` keeps the points of `args.model` at `args.precision`."""
    return work_dir(args) / "parts" / f"{args.model}-{args.precision}.json"


# ---------------------------------------------------------------------------- export
def export(args: argparse.Namespace) -> int:
    """`clipsvc export --flavor pytorch --precision P` (random weights), unless already done."""
    target = export_dir(args)
    if (target / "metadata.json").is_file():
        print(f"  {target} exists: reused", flush=True)
        return 0
    pretrained = "none"
    if args.model == DEMO_MODEL and h.DEMO_WEIGHTS.is_file():
        pretrained = str(h.DEMO_WEIGHTS)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    command = [
        sys.executable, "-m", "service.cli", "export",
        "--model", args.model, "--pretrained", pretrained, "--out", str(partial),
        "--flavor", "pytorch", "--precision", args.precision,
        "--max-batch-size", str(args.max_batch), "--instances", str(args.instances),
    ]  # fmt: skip
    print("  $ clipsvc " + " ".join(command[3:]), flush=True)
    started = time.perf_counter()
    code = subprocess.run(command, cwd=REPO_ROOT, check=False).returncode
    if code != 0:
        print(f"  export failed with {code}", flush=True)
        return code
    partial.rename(target)
    print(f"  exported in {time.perf_counter() - started:.1f} s → {target}", flush=True)
    return 0


def served_repository(source: Path, into: Path, device: str, args: argparse.Namespace) -> Path:
    """A repository the pip tritonserver can serve: the python backend, the model on `device`.

    The pytorch flavor's `config.pbtxt` names the libtorch backend (KIND_GPU), which the
    pip wheel does not have; this copy renders the python flavor's config (KIND_CPU: the
    stub process) with a `DEVICE` parameter, and `bench/triton_device_model.py` loads the
    same `model.pt` (symlinked) onto that device.
    """
    from service.model.metadata import (
        IMAGE_INPUT,
        IMAGE_MODEL,
        OUTPUT,
        TEXT_INPUT,
        TEXT_MODEL,
        ModelMetadata,
    )
    from service.model.triton_config import TensorSpec, render_config
    from service.settings import BatchingOptions

    metadata = ModelMetadata.load(source)
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir(parents=True)
    shutil.copyfile(source / "metadata.json", into / "metadata.json")
    size = metadata.image_size
    towers = {
        IMAGE_MODEL: TensorSpec(IMAGE_INPUT, "TYPE_UINT8", (3, size, size)),
        TEXT_MODEL: TensorSpec(TEXT_INPUT, "TYPE_INT64", (-1,), ragged=True),
    }
    batching = BatchingOptions(max_batch_size=args.max_batch, instances=args.instances)
    for name, input_spec in towers.items():
        version = into / name / "1"
        version.mkdir(parents=True)
        (version / "model.pt").symlink_to((source / name / "1" / "model.pt").resolve())
        shutil.copyfile(DEVICE_MODEL, version / "model.py")
        shutil.copyfile(BASE_MODEL, version / "clip_base_model.py")
        config = render_config(
            name=name,
            flavor="python",
            inputs=[input_spec],
            outputs=[TensorSpec(OUTPUT, "TYPE_FP32", (metadata.embedding_dim,))],
            batching=batching,
            parameters={**metadata.triton_parameters(), "DEVICE": device},
        )
        (into / name / "config.pbtxt").write_text(config)
    return into


# ---------------------------------------------------------------------------- inputs
@dataclass
class Inputs:
    """What both paths are fed: JPEGs for the gateway, the same decoded for Triton."""

    jpegs: list[bytes]
    pixels: np.ndarray  # uint8 [N,3,S,S], decoded by the gateway's own code
    token_rows: list[np.ndarray]  # int64 [1,16] each
    image_note: str


def make_inputs(repository: Path) -> Inputs:
    """64 photos and 1024 short captions, prepared as the gateway prepares them."""
    from service.core.text_tokenize import TextTokenizer
    from service.model.metadata import ModelMetadata

    metadata = ModelMetadata.load(repository)
    jpegs = h.photo_pool(64, PHOTO_SIZE, seed=5)
    tokenizer = TextTokenizer(metadata.context_length, (8, 16, 24, 32, 48, 77))
    rows = [
        TextTokenizer.pad([tokenizer.tokenize(short_caption(i))], TEXT_BUCKET) for i in range(1024)
    ]
    size = metadata.image_size
    note = f"{h.photo_note(jpegs, PHOTO_SIZE)} to the gateway, the same decoded to uint8 3×{size}×{size} to Triton alone"
    return Inputs(jpegs, h.decoded(jpegs, metadata), rows, note)


# ---------------------------------------------------------------------------- Triton alone
def perf_analyzer_usable() -> str | None:
    """`perf_analyzer`'s path when it is on PATH and starts (its libraries resolve)."""
    path = shutil.which("perf_analyzer")
    if path is None:
        return None
    try:
        probe = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=20, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if "error while loading shared libraries" in probe.stderr:
        print(f"  perf_analyzer at {path} does not start: {probe.stderr.strip()[:200]}")
        return None
    return path


def perf_analyzer_point(
    tool: str,
    url: str,
    model: str,
    input_name: str,
    shape: str,
    modality: str,
    concurrency: int,
    seconds: float,
) -> PointRecord | None:
    """One perf_analyzer run at `concurrency` (batch 1 per request); None when it fails."""
    with tempfile.TemporaryDirectory(prefix="bench-pa-") as tmp:
        csv = Path(tmp) / "out.csv"
        command = [
            tool, "-m", model, "-u", url, "-i", "grpc", "-b", "1",
            "--concurrency-range", f"{concurrency}:{concurrency}",
            "--measurement-mode", "time_windows",
            "--measurement-interval", str(int(seconds * 1000)),
            "--max-trials", "3", "-s", "20",
            "--input-data", "random", "--shape", f"{input_name}:{shape}",
            "-f", str(csv),
        ]  # fmt: skip
        try:
            run = subprocess.run(
                command, capture_output=True, text=True, timeout=seconds * 8 + 60, check=False
            )
        except (OSError, subprocess.SubprocessError) as exc:
            print(f"  perf_analyzer failed: {exc}")
            return None
        if run.returncode != 0 or not csv.is_file():
            print(f"  perf_analyzer exited {run.returncode}: {(run.stderr or run.stdout)[-300:]}")
            return None
        header, *rows = [line.split(",") for line in csv.read_text().splitlines() if line]
        if not rows:
            return None
        row = dict(zip(header, rows[0], strict=False))
    return PointRecord(
        "triton",
        modality,
        concurrency,
        float(row["Inferences/Second"]),
        float(row.get("p50 latency", "nan")) / 1000.0,
        float(row.get("p99 latency", "nan")) / 1000.0,
        0,
        "0",
        "perf_analyzer",
    )


async def triton_loop_point(
    url: str,
    model: str,
    input_name: str,
    datatype: str,
    rows: Callable[[int], np.ndarray],
    modality: str,
    concurrency: int,
    seconds: float,
    counter: itertools.count[int],
) -> PointRecord:
    """Closed-loop tritonclient gRPC callers, one item per request."""
    import tritonclient.grpc.aio as triton_aio
    from tritonclient.utils import InferenceServerException

    from service.model.metadata import OUTPUT

    failures = {"n": 0}
    client = triton_aio.InferenceServerClient(url)
    try:

        async def call(i: int) -> int:
            data = rows(i)
            tensor = triton_aio.InferInput(input_name, list(data.shape), datatype)
            tensor.set_data_from_numpy(data)
            try:
                await client.infer(
                    model,
                    [tensor],
                    outputs=[triton_aio.InferRequestedOutput(OUTPUT)],
                    client_timeout=120,
                )
            except InferenceServerException:
                failures["n"] += 1
                return 0
            return 1

        result = await h.closed_loop(
            call,
            label=f"triton {modality} c{concurrency}",
            concurrency=concurrency,
            seconds=seconds,
            min_calls=concurrency,
            counter=counter,
        )
    finally:
        await client.close()
    return record("triton", modality, result, "tritonclient loop", failures["n"])


def record(
    path: str, modality: str, result: h.LoadResult, tool: str, failures: int = 0
) -> PointRecord:
    """A LoadResult as a part-file record."""
    errors = result.error_text
    if failures:
        errors = f"{errors}, triton×{failures}" if errors != "0" else f"triton×{failures}"
    return PointRecord(
        path,
        modality,
        result.concurrency,
        result.items_per_s,
        result.percentile_ms(50),
        result.percentile_ms(99),
        result.calls,
        errors,
        tool,
    )


# ---------------------------------------------------------------------------- measure
class Part:
    """The part file of one model and precision, rewritten after every point."""

    def __init__(self, path: Path, header: dict[str, object]) -> None:
        self.path = path
        self.data: dict[str, object] = {**header, "points": [], "notes": []}
        self.save()

    def add(self, point: PointRecord) -> None:
        """Keep `point` and write the file again."""
        self.data["points"].append(asdict(point))  # type: ignore[union-attr]
        print(
            f"  {point.path:<8} {point.modality:<5} conc {point.concurrency:>3}: "
            f"{fmt(point.items_per_s):>8} items/s, p50 {fmt(point.p50_ms)} ms, "
            f"p99 {fmt(point.p99_ms)} ms, errors {point.errors} ({point.tool})",
            flush=True,
        )
        self.save()

    def note(self, text: str) -> None:
        """A line for the report (what was used, what went wrong)."""
        self.data["notes"].append(text)  # type: ignore[union-attr]
        print(f"  note: {text}", flush=True)
        self.save()

    def save(self) -> None:
        """Write atomically, so a step killed mid-write leaves the last good file."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


async def measure(args: argparse.Namespace) -> int:
    """Triton alone, then the gateway against it, at every concurrency; both modalities."""
    from service.model.metadata import IMAGE_INPUT, IMAGE_MODEL, TEXT_INPUT, TEXT_MODEL

    source = export_dir(args)
    if not (source / "metadata.json").is_file():
        print(f"  no export at {source}: run the export step first", flush=True)
        return 2
    part = Part(
        part_file(args),
        {
            "model": args.model,
            "precision": args.precision,
            "device": args.device,
            "seconds": args.seconds,
            "instances": args.instances,
            "max_batch": args.max_batch,
            "inflight": args.inflight,
            "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        },
    )
    inputs = make_inputs(source)
    part.data["inputs"] = inputs.image_note
    concurrencies = [int(c) for c in args.concurrency.split(",")]
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-gpu-")))
        served = served_repository(source, tmp / "repository", args.device, args)
        started = time.perf_counter()
        triton = stack.enter_context(
            h.triton(served, workdir=tmp / "triton", startup_timeout_s=args.startup_timeout)
        )
        part.note(
            f"tritonserver (pip wheel, python backend, model on {args.device}, "
            f"{args.instances} instance(s) per tower, max batch {args.max_batch}) ready in "
            f"{time.perf_counter() - started:.1f} s"
        )
        counter = itertools.count()
        section("Triton alone")
        tool = None if args.no_perf_analyzer else perf_analyzer_usable()
        specs = {
            "image": (
                IMAGE_MODEL, IMAGE_INPUT, "UINT8",
                lambda i: inputs.pixels[i % len(inputs.pixels)][None],
                ",".join(str(d) for d in inputs.pixels.shape[1:]),
            ),
            "text": (
                TEXT_MODEL, TEXT_INPUT, "INT64",
                lambda i: inputs.token_rows[i % len(inputs.token_rows)],
                str(TEXT_BUCKET),
            ),
        }  # fmt: skip
        for modality in MODALITIES:
            model, input_name, datatype, rows, shape = specs[modality]
            # Unreported: the first batches at each size are slow (TorchScript's profiling
            # executor, CUDA kernels and allocator, the stub's shared memory).
            warm = await triton_loop_point(
                triton.grpc_url, model, input_name, datatype, rows, modality,
                max(concurrencies), args.warmup_seconds, counter,
            )  # fmt: skip
            print(f"  (warm-up {modality}: {fmt(warm.items_per_s)} items/s, not reported)")
            for concurrency in concurrencies:
                point = None
                if tool is not None:
                    point = perf_analyzer_point(
                        tool, triton.grpc_url, model, input_name, shape, modality,
                        concurrency, args.seconds,
                    )  # fmt: skip
                    if point is None:
                        part.note("perf_analyzer failed: the tritonclient loop measures instead")
                        tool = None
                if point is None:
                    point = await triton_loop_point(
                        triton.grpc_url, model, input_name, datatype, rows, modality,
                        concurrency, args.seconds, counter,
                    )  # fmt: skip
                part.add(point)

        section("gateway end to end")
        started = time.perf_counter()
        gateway = stack.enter_context(
            h.gateway(
                served,
                "gpu-gateway",
                backend="triton",
                triton_url=triton.grpc_url,
                local_cache_items=0,
                redis_url="",
                max_batch_size=args.max_batch,
                max_inflight_batches=args.inflight,
            )
        )
        part.note(
            f"gateway (cache off, max batch {args.max_batch}, {args.inflight} batches in "
            f"flight) SERVING in {time.perf_counter() - started:.1f} s"
        )
        async with h.channel(gateway.target) as ch:
            calls = h.grpc_calls(h.RawClip(ch), inputs.jpegs)
            for modality in MODALITIES:
                warm_result = await h.closed_loop(
                    calls[modality],
                    label=f"gateway {modality} warm-up",
                    concurrency=max(concurrencies),
                    seconds=args.warmup_seconds,
                    counter=counter,
                )
                print(
                    f"  (warm-up {modality}: {fmt(warm_result.items_per_s)} items/s, not reported)"
                )
                for concurrency in concurrencies:
                    result = await h.closed_loop(
                        calls[modality],
                        label=f"gateway {modality} c{concurrency}",
                        concurrency=concurrency,
                        seconds=args.seconds,
                        min_calls=concurrency,
                        counter=counter,
                    )
                    part.add(record("gateway", modality, result, "gateway"))
        if not gateway.running:
            part.note("the gateway process died during the run")
    part.data["finished"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    part.save()
    return 0


# ---------------------------------------------------------------------------- report
def load_parts(args: argparse.Namespace) -> list[dict[str, object]]:
    """Every part of this mode, in the order of the models and precisions."""
    parts = []
    for path in sorted((work_dir(args) / "parts").glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            parts.append(json.loads(path.read_text()))
    order = {m: i for i, m in enumerate((*GPU_MODELS, DEMO_MODEL))}
    parts.sort(key=lambda p: (order.get(str(p["model"]), 99), PRECISIONS.index(p["precision"])))
    return parts


def ratio_rows(part: dict[str, object]) -> list[list[str]]:
    """Per modality and concurrency: Triton alone, gateway, and gateway ÷ Triton."""
    points = part["points"]
    assert isinstance(points, list)
    by_key = {(p["path"], p["modality"], p["concurrency"]): p for p in points}
    rows = []
    keys = sorted({(p["modality"], p["concurrency"]) for p in points})
    for modality, concurrency in keys:
        alone = by_key.get(("triton", modality, concurrency))
        gateway = by_key.get(("gateway", modality, concurrency))
        unit = "images/s" if modality == "image" else "texts/s"
        ratio = "–"
        if alone and gateway and alone["items_per_s"]:
            ratio = f"{gateway['items_per_s'] / alone['items_per_s']:.2f}×"
        rows.append(
            [
                f"{part['model']} {part['precision']}",
                f"{modality} ({unit})",
                str(concurrency),
                fmt(alone["items_per_s"]) if alone else "–",
                f"{fmt(alone['p50_ms'])} / {fmt(alone['p99_ms'])}" if alone else "–",
                fmt(gateway["items_per_s"]) if gateway else "–",
                f"{fmt(gateway['p50_ms'])} / {fmt(gateway['p99_ms'])}" if gateway else "–",
                ratio,
                ", ".join(
                    f"{x['path']} {x['errors']}"
                    for x in (alone, gateway)
                    if x and x["errors"] != "0"
                )
                or "0",
            ]
        )
    return rows


def steps_table(args: argparse.Namespace) -> list[list[str]]:
    """The steps `gpu.sh` ran: name, exit status, seconds (`steps.tsv` in the work folder)."""
    path = work_dir(args) / "steps.tsv"
    rows = []
    if path.is_file():
        for line in path.read_text().splitlines():
            name, code, seconds = [*line.split("\t"), "", "", ""][:3]
            verdict = {
                "0": "ok",
                "124": "TIMED OUT",
                "137": "KILLED (past its timeout)",
                "skipped": "SKIPPED (the run's time budget was spent)",
            }.get(code, f"FAILED (exit {code})")
            rows.append([name, verdict, seconds])
    return rows


def report(args: argparse.Namespace) -> int:
    """Every part of this mode into one Markdown file; prints its summary."""
    parts = load_parts(args)
    rows = [row for part in parts for row in ratio_rows(part)]
    title = (
        "# GPU benchmark script, CPU SMOKE RUN (not GPU figures)"
        if args.smoke
        else "# GPU benchmark: Triton alone and the gateway end to end"
    )
    lead = (
        [
            "**This is a smoke run of `bench/gpu.sh --smoke` on a CPU machine, with the demo "
            "model and tiny durations. It proves that the script runs end to end (exports, "
            "Triton, the gateway, the report); the numbers are not GPU figures and say "
            "nothing about a GPU.**",
            "",
        ]
        if args.smoke
        else []
    )
    notes = [
        f"- {part['model']} {part['precision']}: " + "; ".join(str(n) for n in part["notes"])
        for part in parts
        if part.get("notes")
    ]
    incomplete = [f"{p['model']} {p['precision']}" for p in parts if "finished" not in p]
    first = parts[0] if parts else {}
    table = md_table(
        [
            "model",
            "input",
            "callers",
            "Triton alone items/s",
            "Triton p50 / p99 ms",
            "gateway items/s",
            "gateway p50 / p99 ms",
            "gateway ÷ Triton",
            "errors",
        ],
        rows,
    )
    text = "\n".join(
        [
            title,
            "",
            *lead,
            md_table(["", ""], h.machine_info()),
            "",
            "## What ran",
            "",
            "- Models: open_clip architectures with random weights (`--pretrained none`; the "
            "demo model's own weights in a smoke run), exported by `clipsvc export --flavor "
            "pytorch --precision fp32|fp16` (fp16: half weights, uint8 / int64 inputs and "
            "float32 outputs; the export checks cosine ≥ 0.999 against fp32 open_clip).",
            "- Triton: the pip `tritonserver` (nvidia-pytriton), the only one on these "
            "machines. It has only the python backend, so the export's `model.pt` runs "
            "through `bench/triton_device_model.py` (the project's python-backend model, "
            f"moved to the device `{first.get('device', '?')}`); NVIDIA's image with the "
            "libtorch backend would run the same file without the python stub's copies.",
            "- Triton alone: closed-loop callers, one item per request (a pre-decoded uint8 "
            f"image, or a short caption's ids padded to {TEXT_BUCKET}), Triton's dynamic "
            "batcher merging them (`perf_analyzer` where it runs, else a tritonclient gRPC "
            "loop; the tool is named per point in the parts).",
            "- Gateway: `clipsvc serve --backend triton` in its own process in front of the "
            "same Triton, cache off, one JPEG (decoded, resized and cropped by the gateway) "
            "or one caption (tokenized by it) per call, every input new. "
            "`gateway ÷ Triton` is what the gateway costs (or gains by batching) at the same "
            "number of callers.",
            "- Seen on the 2-core CPU machines (pip tritonserver 2.41, python backend): now and "
            "then Triton holds a request about 0.5 s in its queue (its own statistics put the "
            "time in `queue`, with the project's python-flavor model as well, with the asyncio "
            "and the sync tritonclient). A point with p99 ≈ 500 ms met such a stall, and at "
            "1 caller it lowers the rate a lot: read those points by p50.",
            f"- Each point ≥ {first.get('seconds', '?')} s after one unmeasured call per caller; "
            "before the points of each path and input, an unreported warm-up at the highest "
            "concurrency.",
            "",
            "## Results",
            "",
            table if rows else "No part was measured (see the steps below).",
            "",
            *(["Notes:", "", *notes, ""] if notes else []),
            *(
                [f"Incomplete (the step ended before its last point): {', '.join(incomplete)}.", ""]
                if incomplete
                else []
            ),
            "## Steps (from gpu.sh)",
            "",
            md_table(["step", "status", "seconds"], steps_table(args)) or "",
            "",
        ]
    )
    out = args.results_dir / ("gpu-smoke.md" if args.smoke else "gpu-cuda.md")
    summary = "\n".join(
        [
            table,
            "",
            md_table(["step", "status", "seconds"], steps_table(args)),
        ]
    )
    h.write_result(out, text, summary)
    return 0


# ---------------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("step", choices=("export", "measure", "report"))
    parser.add_argument("--model", default=GPU_MODELS[0], help="open_clip model name")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32")
    parser.add_argument(
        "--smoke",
        action="store_true",
        default=os.environ.get("GPU_BENCH_SMOKE", "") == "1",
        help="CPU smoke run: device cpu, tiny points, gpu-smoke.md (env GPU_BENCH_SMOKE=1)",
    )
    parser.add_argument("--device", help="torch device of Triton's model (cuda; smoke: cpu)")
    parser.add_argument("--seconds", type=float, help="per point (2.5; smoke: 1)")
    parser.add_argument(
        "--warmup-seconds", type=float, help="unreported, per path and input (2; smoke: 1)"
    )
    parser.add_argument("--concurrency", help="callers per point (1,16,64; smoke: 1,8)")
    parser.add_argument("--instances", type=int, help="Triton instances per tower (2; smoke: 1)")
    parser.add_argument("--max-batch", type=int, help="Triton's and the gateway's (64; smoke: 32)")
    parser.add_argument("--inflight", type=int, help="gateway batches in flight (4; smoke: 2)")
    parser.add_argument("--startup-timeout", type=float, default=240.0)
    parser.add_argument("--no-perf-analyzer", action="store_true", help="always the loop")
    parser.add_argument("--work", help="exports and parts (default bench/.models/gpu[-smoke])")
    parser.add_argument("--results-dir", type=Path, default=h.RESULTS_DIR)
    args = parser.parse_args(argv)
    for key, value in mode_defaults(args.smoke).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    h.interrupt_on_sigterm()  # gpu.sh's `timeout` must not leave Triton or a gateway behind
    what = "" if args.step == "report" else f": {args.model} {args.precision}"
    section(f"gpu {args.step}{what} ({'CPU smoke run' if args.smoke else args.device})")
    if args.step == "export":
        return export(args)
    if args.step == "measure":
        return asyncio.run(measure(args))
    return report(args)


if __name__ == "__main__":
    sys.exit(main())
