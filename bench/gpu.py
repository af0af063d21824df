"""The GPU benchmark's steps: export, Triton alone and the gateway end to end, report.

    python -m bench.gpu export  --model ViT-B-32 --precision fp16      # clipsvc export
    python -m bench.gpu measure --model ViT-B-32 --precision fp16      # Triton, gateway
    python -m bench.gpu report                                         # gpu-cuda.md
    python -m bench.gpu ... --smoke                                    # CPU, demo model

What it measures and how: bench/README.md.
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
from pathlib import Path

from bench import harness as h
from bench.captions import short_caption
from bench.harness import DEMO_MODEL, REPO_ROOT, fmt, md_table

GPU_MODELS, PRECISIONS, MODALITIES = ("ViT-B-32", "ViT-L-14"), ("fp32", "fp16"), ("image", "text")
TEXT_BUCKET = 16  # short captions are 13-15 tokens: the gateway pads them to this bucket
DEVICE_MODEL = Path(__file__).resolve().parent / "triton_device_model.py"
BASE_MODEL = REPO_ROOT / "service" / "model" / "triton_python_model.py"
#: What each mode measures unless told otherwise: (GPU run, smoke run).
DEFAULTS = {
    "device": ("cuda", "cpu", "torch device of Triton's model"),
    "seconds": (2.5, 1.0, "per point"),
    "warmup_seconds": (2.0, 1.0, "unreported, per path and input"),
    "concurrency": ("1,16,64", "1,8", "callers per point"),
    "instances": (2, 1, "Triton instances per tower"),
    "max_batch": (64, 32, "Triton's and the gateway's"),
    "inflight": (4, 2, "gateway batches in flight"),
}
UTC = "%Y-%m-%d %H:%M:%S UTC"
TITLE = "GPU benchmark: Triton alone and the gateway end to end"
SMOKE_TITLE = "GPU benchmark script, CPU SMOKE RUN (not GPU figures)"
SMOKE_NOTE = (
    "**A smoke run of `bench/gpu.sh --smoke` on a CPU machine (demo model, tiny points): it "
    "proves that the script runs end to end; the numbers are not GPU figures.**"
)
RESULT_HEADERS = [
    "model", "input", "callers", "Triton alone items/s", "Triton p50 / p99 ms",
    "gateway items/s", "gateway p50 / p99 ms", "gateway ÷ Triton", "errors",
]  # fmt: skip
STEP_STATUS = {
    "0": "ok", "124": "TIMED OUT", "137": "KILLED (past its timeout)",
    "skipped": "SKIPPED (the run's time budget was spent)",
}  # fmt: skip


def work_dir(args: argparse.Namespace) -> Path:
    """Exports and parts of this mode (exports are reused by later runs)."""
    return Path(args.work) if args.work else h.MODELS_DIR / ("gpu-smoke" if args.smoke else "gpu")


def export(args: argparse.Namespace) -> int:
    """`clipsvc export --flavor pytorch --precision P` (random weights), unless already done."""
    target = work_dir(args) / f"{args.model}-{args.precision}"
    if (target / "metadata.json").is_file():
        print(f"  {target} exists: reused", flush=True)
        return 0
    demo = args.model == DEMO_MODEL and h.DEMO_WEIGHTS.is_file()
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    command = [
        sys.executable, "-m", "service.cli", "export", "--model", args.model,
        "--pretrained", str(h.DEMO_WEIGHTS) if demo else "none", "--out", str(partial),
        "--flavor", "pytorch", "--precision", args.precision,
        "--max-batch-size", str(args.max_batch), "--instances", str(args.instances),
    ]  # fmt: skip
    print("  $ clipsvc " + " ".join(command[3:]), flush=True)
    if code := subprocess.run(command, cwd=REPO_ROOT, check=False).returncode:
        print(f"  export failed with {code}", flush=True)
        return code
    partial.rename(target)
    return 0


def served_repository(source: Path, into: Path, args: argparse.Namespace) -> Path:
    """A repository the pip tritonserver (no libtorch backend) can serve: the python
    flavor's config with a `DEVICE` parameter, `bench/triton_device_model.py` loading the
    same `model.pt` (symlinked) onto that device."""
    from service.model import metadata as m
    from service.model.triton_config import TensorSpec, render_config
    from service.settings import BatchingOptions

    metadata = m.ModelMetadata.load(source)
    shutil.rmtree(into, ignore_errors=True)
    into.mkdir(parents=True)
    shutil.copyfile(source / "metadata.json", into / "metadata.json")
    size = metadata.image_size
    towers = {
        m.IMAGE_MODEL: TensorSpec(m.IMAGE_INPUT, "TYPE_UINT8", (3, size, size)),
        m.TEXT_MODEL: TensorSpec(m.TEXT_INPUT, "TYPE_INT64", (-1,), ragged=True),
    }
    for name, input_spec in towers.items():
        version = into / name / "1"
        version.mkdir(parents=True)
        (version / "model.pt").symlink_to((source / name / "1" / "model.pt").resolve())
        shutil.copyfile(DEVICE_MODEL, version / "model.py")
        shutil.copyfile(BASE_MODEL, version / "clip_base_model.py")
        (into / name / "config.pbtxt").write_text(
            render_config(
                name=name, flavor="python", inputs=[input_spec],
                outputs=[TensorSpec(m.OUTPUT, "TYPE_FP32", (metadata.embedding_dim,))],
                batching=BatchingOptions(max_batch_size=args.max_batch, instances=args.instances),
                parameters={**metadata.triton_parameters(), "DEVICE": args.device},
            )
        )  # fmt: skip
    return into


def perf_analyzer_point(
    tool: str, url: str, spec: tuple, concurrency: int, seconds: float
) -> dict | None:
    """One perf_analyzer run at `concurrency` (batch 1 per request); None when it fails."""
    model, input_name, _, _, shape = spec
    with tempfile.TemporaryDirectory(prefix="bench-pa-") as tmp:
        csv = Path(tmp) / "out.csv"
        command = [
            tool, "-m", model, "-u", url, "-i", "grpc", "-b", "1",
            "--concurrency-range", f"{concurrency}:{concurrency}", "--measurement-mode",
            "time_windows", "--measurement-interval", str(int(seconds * 1000)), "--max-trials", "3",
            "-s", "20", "--input-data", "random", "--shape", f"{input_name}:{shape}",
            "-f", str(csv),
        ]  # fmt: skip
        try:
            run = subprocess.run(command, capture_output=True, text=True, timeout=seconds * 8 + 60)
        except (OSError, subprocess.SubprocessError) as exc:
            print(f"  perf_analyzer failed: {exc}")
            return None
        text = csv.read_text() if csv.is_file() else ""
        lines = [line.split(",") for line in text.splitlines() if line]
        if run.returncode != 0 or len(lines) < 2:
            print(f"  perf_analyzer exited {run.returncode}: {(run.stderr or run.stdout)[-300:]}")
            return None
        row = dict(zip(lines[0], lines[1], strict=False))
    ms = lambda key: float(row.get(key, "nan")) / 1000.0  # noqa: E731
    return point(float(row["Inferences/Second"]), ms("p50 latency"), ms("p99 latency"))


async def triton_loop(
    url: str, spec: tuple, concurrency: int, seconds: float, counter: itertools.count
) -> dict:
    """Closed-loop tritonclient gRPC callers, one item per request."""
    import tritonclient.grpc.aio as triton_aio
    from tritonclient.utils import InferenceServerException

    from service.model.metadata import OUTPUT

    model, input_name, datatype, rows, _ = spec
    client = triton_aio.InferenceServerClient(url)

    async def call(i: int) -> int:
        tensor = triton_aio.InferInput(input_name, list(rows(i).shape), datatype)
        tensor.set_data_from_numpy(rows(i))
        output = triton_aio.InferRequestedOutput(OUTPUT)
        try:
            await client.infer(model, [tensor], outputs=[output], client_timeout=120)
        except InferenceServerException as exc:
            raise h.CallFailed("triton") from exc
        return 1

    try:
        result = await h.closed_loop(
            call, label=f"triton {model} c{concurrency}", concurrency=concurrency,
            seconds=seconds, min_calls=concurrency, counter=counter,
        )  # fmt: skip
    finally:
        await client.close()
    return record(result, "tritonclient loop")


def point(items_per_s: float, p50: float, p99: float, calls=0, errors="0", tool="perf_analyzer"):
    """A part-file point."""
    return dict(
        items_per_s=items_per_s, p50_ms=p50, p99_ms=p99, calls=calls, errors=errors, tool=tool
    )


def record(r: h.LoadResult, tool: str) -> dict:
    """A LoadResult as a part-file point."""
    return point(
        r.items_per_s, r.percentile_ms(50), r.percentile_ms(99), r.calls, r.error_text, tool
    )


class Part:
    """The part file of one model and precision, rewritten (atomically) after every point."""

    def __init__(self, path: Path, header: dict[str, object]) -> None:
        self.path, self.data = path, {**header, "points": [], "notes": []}
        self.save()

    def add(self, path: str, modality: str, concurrency: int, point: dict) -> None:
        self.data["points"].append(
            dict(path=path, modality=modality, concurrency=concurrency, **point)
        )
        rate, p50, p99 = (fmt(point[k]) for k in ("items_per_s", "p50_ms", "p99_ms"))
        print(f"  {path:<8} {modality:<5} conc {concurrency:>3}: {rate:>8} items/s, p50 {p50} ms, "
              f"p99 {p99} ms, errors {point['errors']} ({point['tool']})", flush=True)  # fmt: skip
        self.save()

    def note(self, text: str) -> None:
        self.data["notes"].append(text)
        print(f"  note: {text}", flush=True)
        self.save()

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.with_suffix(".tmp").write_text(json.dumps(self.data, indent=1))
        self.path.with_suffix(".tmp").replace(self.path)


async def measure(args: argparse.Namespace) -> int:
    """Triton alone, then the gateway against it, at every concurrency; both modalities."""
    from service.core.text_tokenize import TextTokenizer
    from service.model import metadata as m

    source = work_dir(args) / f"{args.model}-{args.precision}"
    if not (source / "metadata.json").is_file():
        print(f"  no export at {source}: run the export step first", flush=True)
        return 2
    keys = ("model", "precision", "device", "seconds", "instances", "max_batch", "inflight")
    header = {k: getattr(args, k) for k in keys} | {"started": time.strftime(UTC, time.gmtime())}
    part = Part(work_dir(args) / "parts" / f"{args.model}-{args.precision}.json", header)
    metadata = m.ModelMetadata.load(source)
    jpegs = h.photo_pool(64, seed=5)
    pixels = h.decoded(jpegs, metadata)
    tokenizer = TextTokenizer(metadata.context_length, (8, 16, 24, 32, 48, 77))
    tokens = [
        TextTokenizer.pad([tokenizer.tokenize(short_caption(i))], TEXT_BUCKET) for i in range(1024)
    ]
    size = metadata.image_size
    decoded_note = f"the same decoded to uint8 3×{size}×{size} to Triton alone"
    part.data["inputs"] = f"{h.photo_note(jpegs)} to the gateway, {decoded_note}"
    specs = {  # (model, input, datatype, request i's rows, perf_analyzer's shape)
        "image": (m.IMAGE_MODEL, m.IMAGE_INPUT, "UINT8", lambda i: pixels[i % len(pixels)][None],
                  f"3,{size},{size}"),
        "text": (m.TEXT_MODEL, m.TEXT_INPUT, "INT64", lambda i: tokens[i % len(tokens)],
                 str(TEXT_BUCKET)),
    }  # fmt: skip
    concurrencies, counter = [int(c) for c in args.concurrency.split(",")], itertools.count()
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-gpu-")))
        served = served_repository(source, tmp / "repository", args)
        started = time.perf_counter()
        triton = stack.enter_context(
            h.triton(served, workdir=tmp / "triton", startup_timeout_s=240)
        )
        part.note(
            f"tritonserver (pip wheel, python backend, model on {args.device}, {args.instances} "
            f"instance(s) per tower, max batch {args.max_batch}) ready in "
            f"{time.perf_counter() - started:.1f} s"
        )
        h.section("Triton alone")
        tool = shutil.which("perf_analyzer")  # where it is on PATH; it may still fail to start
        for modality in MODALITIES:
            # Unreported: the first batches at each size are slow (TorchScript's profiling
            # executor, CUDA kernels and allocator, the stub's shared memory).
            await triton_loop(
                triton.grpc_url, specs[modality], max(concurrencies), args.warmup_seconds, counter
            )
            for n in concurrencies:
                spec = (triton.grpc_url, specs[modality], n, args.seconds)
                found = tool and perf_analyzer_point(tool, *spec)
                if tool and found is None:
                    part.note("perf_analyzer failed: the tritonclient loop measures instead")
                    tool = None
                found = found or await triton_loop(*spec, counter)
                part.add("triton", modality, n, found)
        h.section("gateway end to end")
        started = time.perf_counter()
        gateway = stack.enter_context(h.gateway(
            served, "gpu-gateway", backend="triton", triton_url=triton.grpc_url,
            local_cache_items=0, redis_url="",  # every input reaches Triton
            max_batch_size=args.max_batch, max_inflight_batches=args.inflight,
        ))  # fmt: skip
        part.note(
            f"gateway (cache off, max batch {args.max_batch}, {args.inflight} batches in flight) "
            f"SERVING in {time.perf_counter() - started:.1f} s"
        )
        async with h.channel(gateway.target) as channel:
            calls = h.grpc_calls(h.RawClip(channel), jpegs)
            for modality, concurrency in itertools.product(MODALITIES, [0, *concurrencies]):
                warm = concurrency == 0  # an unreported warm-up at the highest concurrency first
                result = await h.closed_loop(
                    calls[modality], label=f"gateway {modality} c{concurrency}",
                    concurrency=concurrency or max(concurrencies),
                    seconds=args.warmup_seconds if warm else args.seconds,
                    min_calls=0 if warm else concurrency, counter=counter,
                )  # fmt: skip
                if not warm:
                    part.add("gateway", modality, concurrency, record(result, "gateway"))
        if not gateway.running:
            part.note("the gateway process died during the run")
    part.data["finished"] = time.strftime(UTC, time.gmtime())
    part.save()
    return 0


def load_parts(args: argparse.Namespace) -> list[dict]:
    """Every part of this mode, in the order of the models and precisions."""
    parts = []
    for path in sorted((work_dir(args) / "parts").glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            parts.append(json.loads(path.read_text()))
    order = {name: i for i, name in enumerate((*GPU_MODELS, DEMO_MODEL))}
    return sorted(
        parts, key=lambda p: (order.get(p["model"], 99), PRECISIONS.index(p["precision"]))
    )


def ratio_rows(part: dict) -> list[list[str]]:
    """Per modality and concurrency: Triton alone, gateway, and gateway ÷ Triton."""
    by = {(p["path"], p["modality"], p["concurrency"]): p for p in part["points"]}
    rows = []
    for modality, n in sorted({(p["modality"], p["concurrency"]) for p in part["points"]}):
        alone, gateway = by.get(("triton", modality, n)), by.get(("gateway", modality, n))
        ratio = "–"
        if alone and gateway and alone["items_per_s"]:
            ratio = f"{gateway['items_per_s'] / alone['items_per_s']:.2f}×"
        errors = [
            f"{p['path']} {p['errors']}" for p in (alone, gateway) if p and p["errors"] != "0"
        ]
        cells = [
            c for p in (alone, gateway)
            for c in ([fmt(p["items_per_s"]), f"{fmt(p['p50_ms'])} / {fmt(p['p99_ms'])}"]
                      if p else ["–", "–"])
        ]  # fmt: skip
        unit = "images/s" if modality == "image" else "texts/s"
        rows.append([f"{part['model']} {part['precision']}", f"{modality} ({unit})", str(n),
                     *cells, ratio, ", ".join(errors) or "0"])  # fmt: skip
    return rows


def steps_table(args: argparse.Namespace) -> list[list[str]]:
    """The steps `gpu.sh` ran: name, exit status, seconds (`steps.tsv` in the work folder)."""
    path = work_dir(args) / "steps.tsv"
    lines = path.read_text().splitlines() if path.is_file() else []
    rows = [[*line.split("\t"), "", ""][:3] for line in lines]
    return [[name, STEP_STATUS.get(code, f"FAILED (exit {code})"), s] for name, code, s in rows]


def report(args: argparse.Namespace) -> int:
    """Every part of this mode into one Markdown file; prints its summary."""
    parts = load_parts(args)
    rows = [row for part in parts for row in ratio_rows(part)]
    table = h.md_table(RESULT_HEADERS, rows)
    steps = md_table(["step", "status", "seconds"], steps_table(args))
    notes = [
        f"- {p['model']} {p['precision']}: {'; '.join(p['notes'])}" for p in parts if p.get("notes")
    ]
    cut = ", ".join(f"{p['model']} {p['precision']}" for p in parts if "finished" not in p)
    first = parts[0] if parts else {}
    text = [
        f"# {SMOKE_TITLE if args.smoke else TITLE}", "", *([SMOKE_NOTE, ""] if args.smoke else []),
        md_table(["", ""], h.machine_info()), "", "## What ran", "",
        "- open_clip architectures with random weights (a smoke run: the demo model's own), "
        "`clipsvc export --flavor pytorch`, served by the pip `tritonserver` (python backend) "
        f"through `bench/triton_device_model.py` on `{first.get('device', '?')}`; the steps, "
        "Triton alone and the gateway end to end: bench/README.md (gpu.sh).",
        "- On 2-core CPU machines Triton now and then holds a request ~0.5 s in its queue: read "
        "points with p99 ≈ 500 ms by p50.",
        f"- Each point ≥ {first.get('seconds', '?')} s after a warm-up.",
        "", "## Results", "", table if rows else "No part was measured (see the steps below).", "",
        *(["Notes:", "", *notes, ""] if notes else []),
        *([f"Incomplete (the step ended before its last point): {cut}.", ""] if cut else []),
        "## Steps (from gpu.sh)", "", steps, "",
    ]  # fmt: skip
    out = args.results_dir / ("gpu-smoke.md" if args.smoke else "gpu-cuda.md")
    h.write_result(out, "\n".join(text), f"{table}\n\n{steps}")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = h.parser(__doc__, model=None, threads=False)
    p.add_argument("step", choices=("export", "measure", "report"))
    p.add_argument("--model", default=GPU_MODELS[0], help="open_clip model name")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32")
    p.add_argument(
        "--smoke", action="store_true", default=os.environ.get("GPU_BENCH_SMOKE") == "1",
        help="CPU smoke run: device cpu, tiny points, gpu-smoke.md (env GPU_BENCH_SMOKE=1)",
    )  # fmt: skip
    for key, (gpu, smoke, about) in DEFAULTS.items():
        p.add_argument(
            "--" + key.replace("_", "-"), type=type(gpu), help=f"{about} ({gpu}; smoke: {smoke})"
        )
    p.add_argument("--work", help="exports and parts (default bench/.models/gpu[-smoke])")
    p.add_argument("--results-dir", type=Path, default=h.RESULTS_DIR)
    args = p.parse_args(argv)
    for key, (gpu, smoke, _) in DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, smoke if args.smoke else gpu)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    h.interrupt_on_sigterm()  # gpu.sh's `timeout` must not leave Triton or a gateway behind
    what = "" if args.step == "report" else f": {args.model} {args.precision}"
    h.section(f"gpu {args.step}{what} ({'CPU smoke run' if args.smoke else args.device})")
    if args.step == "export":
        return export(args)
    return asyncio.run(measure(args)) if args.step == "measure" else report(args)


if __name__ == "__main__":
    sys.exit(main())
