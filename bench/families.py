"""Coverage: does every architecture in `open_clip.list_models()` export, load and match?

    python -m bench.families                       # every architecture but the very large
    python -m bench.families --large               # all of them (hours, tens of GB of RAM)
    python -m bench.families --only ViT-B-16-SigLIP2 MobileCLIP2-S0
    python -m bench.families --budget-min 45       # stop starting new ones after 45 minutes

What it measures and how: bench/README.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from bench import standins
from bench.harness import RESULTS_DIR, md_table

#: Names of the architectures that need `--large` (roughly > 400M parameters or > 10 GB
#: to export on a CPU).
LARGE = re.compile(
    r"(ViT-[LHgGe]-|bigG|SO400M|gopt|xxlarge|xlarge|mt5-xl|1\.3B|large|EVA0[12]-[LEg]|"
    r"EVA01-g|ViTamin-[LX]|-L-|-H-|RN50x64)"
)
TIMEOUT_S = 1800
STAND_IN_NOTE = "stand-in HF tokenizer"


def model_config(name: str) -> dict:
    """open_clip's config of `name`, the service's own (the demo model's) included."""
    from open_clip.factory import get_model_config

    from service.model import configs

    configs.register()
    return get_model_config(name)


def _family(cfg: dict) -> str:
    text = cfg.get("text_cfg", {})
    if "multimodal_cfg" in cfg:
        return "CoCa"
    if text.get("hf_model_name"):
        return "HF text tower"
    if cfg.get("init_logit_bias") is not None:
        return "SigLIP"
    if cfg.get("custom_text"):
        return "CustomTextCLIP"
    return "CLIP"


def _stand_in_config(name: str, cfg: dict, directory: Path) -> tuple[dict, list[str]]:
    """`cfg` with hub tokenizers / HF text models replaced by local stand-ins."""
    cfg = copy.deepcopy(cfg)
    text = cfg.setdefault("text_cfg", {})
    hub_tok, hub_model = text.get("hf_tokenizer_name"), text.get("hf_model_name")
    source = hub_model or hub_tok
    if not source or (hub_tok and Path(hub_tok).is_dir()):
        return cfg, []
    style = "bert" if "bert" in source and "roberta" not in source else "xlmr"
    style = "t5" if "mt5" in source or "siglip" in source.lower() else style
    text["hf_tokenizer_name"] = str(standins.styled_tokenizer(directory / "stand-in", style))
    notes = [f"{STAND_IN_NOTE} for {hub_tok}"]
    if hub_model:
        kind = "mt5" if "mt5" in hub_model else "m2m100" if "nllb" in hub_model else "xlm-roberta"
        kind = "roberta" if hub_model.startswith("roberta") else kind
        text["hf_model_name"] = str(
            standins.tiny_hf_config(kind, directory / "stand-in", width=64, max_positions=130)
        )
        notes.append(f"tiny {hub_model.split('/')[-1]}-shaped HF config")
    return cfg, notes


def run_one(name: str) -> dict[str, object]:
    """Export, load and check one architecture (in this process)."""
    import numpy as np
    import torch

    from service.core.hf_tokenize import build_tokenizer
    from service.model.export import export_model
    from service.model.metadata import ModelMetadata

    started = time.perf_counter()
    cfg = model_config(name)
    row: dict[str, object] = {"model": name, "family": _family(cfg)}
    with tempfile.TemporaryDirectory(prefix="families-") as tmp:
        directory = Path(tmp)
        cfg, notes = _stand_in_config(name, cfg, directory)
        row["notes"] = "; ".join(notes)
        path = directory / f"{name}.json"
        path.write_text(json.dumps(cfg))
        summary = export_model(str(path), "none", directory / "repo", progress=False)
        row["export_s"] = round(time.perf_counter() - started, 1)
        row["max_diff"] = summary.max_abs_diff
        metadata = ModelMetadata.load(directory / "repo")
        row |= {"tokenizer": metadata.tokenizer, "padding": metadata.text_padding}
        row |= {"score": metadata.score_function, "context": metadata.context_length}
        tokenizer = build_tokenizer(metadata, (16, 32, 48, 64))
        tokens = [tokenizer.tokenize(t) for t in ("a photo of a cat", "")]
        length = max(tokenizer.bucket_length(len(t.ids)) for t in tokens)
        ids = torch.from_numpy(tokenizer.pad(tokens, length))
        text = torch.jit.load(str(directory / "repo" / "clip_text" / "1" / "model.pt"))
        image = torch.jit.load(str(directory / "repo" / "clip_image" / "1" / "model.pt"))
        size = metadata.image_size
        with torch.no_grad():
            pixels = torch.zeros(2, 3, size, size, dtype=torch.uint8)
            vectors = [text(ids).numpy(), image(pixels).numpy()]
        for v in vectors:
            norms = np.linalg.norm(v, axis=1)
            if not np.all(np.isfinite(v)) or np.abs(norms - 1).max() > 1e-3:
                raise RuntimeError(f"loaded tower answered non-unit vectors: norms {norms}")
    row["status"] = "ok"
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


def _reason(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b", line):
            return line[:300]
    return (lines[-1] if lines else "no output")[:300]


def failed(name: str, reason: str, **more: str) -> dict[str, object]:
    """The row of an architecture that did not pass."""
    return {"model": name, "status": "fail", "reason": reason, **more}


def _child(name: str, out: Path) -> None:
    try:
        row = run_one(name)
    except BaseException as exc:  # the parent writes every failure with its reason
        reason = f"{type(exc).__name__}: {exc}"[:400]
        row = failed(name, reason, trace=traceback.format_exc()[-2000:])
    out.write_text(json.dumps(row, default=float))


def _order(names: list[str]) -> list[str]:
    """One architecture of each family first, then the rest: a cut-short run still spans
    every family."""
    firsts: dict[str, str] = {}
    for name in names:
        firsts.setdefault(_family(model_config(name)), name)
    head = list(firsts.values())
    return head + [n for n in names if n not in head]


def _write(rows: list[dict], skipped: dict[str, str], path: Path, took_s: float) -> None:
    import open_clip

    families = sorted({str(r.get("family", "?")) for r in rows})
    tried = [[r.get("status") == "ok" for r in rows if r.get("family", "?") == f] for f in families]
    table = [
        [*(r.get(k, "") for k in ("model", "family", "status", "tokenizer", "padding", "score")),
         f"{r['max_diff']:.1e}" if "max_diff" in r else "", r.get("seconds", ""),
         str(r.get("notes", "") if r["status"] == "ok" else r.get("reason", ""))
         .replace("|", "\\|").replace("\n", " ")]
        for r in rows
    ]  # fmt: skip
    headers = ["model", "family", "status", "tokenizer", "padding", "score", "max diff", "s",
               "notes / reason"]  # fmt: skip
    lines = [
        "# open_clip architectures: export, load, parity (random weights, no hub)", "",
        f"`python -m bench.families` on {time.strftime('%Y-%m-%d')}, open_clip "
        f"{open_clip.__version__}, {took_s / 60:.0f} min on this machine's CPUs.", "",
        f"**{sum(r['status'] == 'ok' for r in rows)} of {len(rows)} tried architectures pass**; "
        f"{len(skipped)} not tried (listed at the end with why).", "",
        md_table(["family", "pass / tried"],
                 [[f, f"{sum(t)} / {len(t)}"] for f, t in zip(families, tried, strict=True)]),
        "", "A pass: the export's self-checks (TorchScript against open_clip ≤ 1e-4, `max diff`; "
        "the gateway's token ids against `open_clip.get_tokenizer`) held, and the repository "
        "loaded alone gave unit vectors.", "",
        md_table(headers, table),
    ]  # fmt: skip
    if skipped:
        lines += ["", "## Not tried", "", md_table(["model", "why"], list(skipped.items()))]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Run the coverage table (or, with `--child`, one architecture for the parent)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", action="store_true", help="also the very large ones")
    parser.add_argument("--only", nargs="*", help="these architectures only")
    parser.add_argument("--budget-min", type=float, default=0, help="0: no time budget")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "families.md")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "JSON"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.child[0], Path(args.child[1]))
        return 0

    import open_clip
    from tqdm import tqdm

    names = args.only or open_clip.list_models()
    skipped: dict[str, str] = {}
    if not args.large and not args.only:
        skipped = {n: "very large: `--large`" for n in names if LARGE.search(n)}
        names = [n for n in names if n not in skipped]
    rows: list[dict] = []
    started = time.monotonic()
    bar = tqdm(_order(names), unit="model")
    for name in bar:
        if args.budget_min and time.monotonic() - started > args.budget_min * 60:
            skipped[name] = f"time budget ({args.budget_min:g} min) spent"
            continue
        bar.set_postfix_str(name)
        with tempfile.NamedTemporaryFile(suffix=".json") as out:
            try:
                command = [sys.executable, "-m", "bench.families", "--child", name, out.name]
                proc = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S)
                text = Path(out.name).read_text()
                ended = f"process ended with {proc.returncode}: {_reason(proc.stderr)}"
                row = json.loads(text) if text else failed(name, ended)
            except subprocess.TimeoutExpired:
                row = failed(name, f"over {TIMEOUT_S} s")
        if "family" not in row:
            row["family"] = _family(model_config(name))
        rows.append(row)
        ok = sum(r["status"] == "ok" for r in rows)
        bar.set_description(f"{ok}/{len(rows)} pass")
        _write(rows, skipped, args.out, time.monotonic() - started)  # a cut run keeps its rows
    bar.close()
    _write(rows, skipped, args.out, time.monotonic() - started)
    ok = sum(r["status"] == "ok" for r in rows)
    print(f"{ok} of {len(rows)} tried pass; {len(skipped)} not tried → {args.out}")
    for r in rows:
        if r["status"] != "ok":
            print(f"  FAIL {r['model']}: {r.get('reason')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
