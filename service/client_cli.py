"""Client commands of `clipsvc`: embed-text, embed-image, classify, similarity, info, models,
embed-dir. Each takes `--model NAME` (default: the server's default model)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from service.client import WIRE_FORMATS, AsyncClipClient, ClipClient, StreamValue
from service.client_pixels import PixelPool, PixelRecipe
from service.core.image_preprocess import PresizedPixels

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--target",
        default=os.environ.get("CLIP_TARGET", "127.0.0.1:50051"),
        help="server address host:port [env CLIP_TARGET]",
    )
    p.add_argument(
        "--api-key",
        default=os.environ.get("CLIP_API_KEY"),
        help="API key sent as 'authorization: Bearer' [env CLIP_API_KEY]",
    )
    p.add_argument("--tls", action="store_true", help="use TLS")
    p.add_argument("--tls-ca", type=Path, help="PEM CA bundle to verify the server")
    p.add_argument("--timeout", type=float, default=120.0, help="per-call deadline in seconds")
    p.add_argument(
        "--model",
        default=os.environ.get("CLIP_MODEL", ""),
        help="served model name (`clipsvc models` lists them; '' = the server's default) "
        "[env CLIP_MODEL]",
    )


def _vector_format(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--vector-format",
        default="float32",
        choices=list(WIRE_FORMATS),
        help="format the server answers in: float32, float16, or a compact one (int8, uint8, "
        "binary, ubinary: the README's 'Compact vectors')",
    )


def _env_flag(name: str, default: bool) -> bool:
    value = os.environ.get(name)
    return default if value is None else value.strip().lower() in ("1", "true", "yes", "on")


def _workers(text: str) -> int | None:
    """`--workers` (or CLIP_WORKERS): a number of processes; 0 means the default (None)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of processes: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (one per CPU) or more, not {value}")
    return value or None


def _switch(p: argparse.ArgumentParser, flag: str, env: str, default: bool, help: str) -> None:
    """`--flag` / `--no-flag`, defaulting to the environment variable `env`."""
    p.add_argument(
        flag,
        action=argparse.BooleanOptionalAction,
        default=_env_flag(env, default),
        help=f"{help} [env {env}]",
    )


def _pixel_flags(p: argparse.ArgumentParser) -> None:
    """Local preprocessing: decode here and send the model's pixels (issue 28)."""
    _switch(
        p, "--pixels", "CLIP_PIXELS", True,
        "decode, resize and crop images here with the gateway's own code and send the "
        "model's pixels when the server takes them (same vectors, bit for bit; the "
        "gateway's CPU is spared); --no-pixels sends the encoded files",
    )  # fmt: skip
    p.add_argument(
        "--workers",
        type=_workers,
        # A string: argparse runs it through `type` too, so a bad CLIP_WORKERS is a usage
        # error like a bad flag.
        default=os.environ.get("CLIP_WORKERS", "0"),
        help="processes making pixels (default, or 0: one per CPU this process may use) "
        "[env CLIP_WORKERS]",
    )
    _switch(
        p, "--fast-jpeg", "CLIP_FAST_JPEG", False,
        "with --pixels: decode large JPEGs at a reduced size (libjpeg DCT scaling, never "
        "below 2x the model's size) before the resize; several times faster on photos, "
        "vectors no longer bit-identical (README: measured cosine)",
    )  # fmt: skip


def _client(args: argparse.Namespace) -> ClipClient:
    ca = args.tls_ca.read_bytes() if args.tls_ca else None
    return ClipClient(
        args.target,
        api_key=args.api_key,
        tls=args.tls,
        tls_ca=ca,
        timeout_s=args.timeout,
        local_preprocess=getattr(args, "pixels", False),
        workers=getattr(args, "workers", None),
        fast_jpeg=getattr(args, "fast_jpeg", False),
    )


def _print_vectors(vectors: np.ndarray, names: list[str], full: bool) -> None:
    for name, vec in zip(names, vectors, strict=True):
        shown = vec.tolist() if full else [*np.round(vec[:6], 4).tolist(), "..."]
        print(json.dumps({"input": name, "dim": len(vec), "vector": shown}))


def _cmd_embed_text(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.embed_text(args.texts, model=args.model, vector_format=args.vector_format)
    _print_vectors(result.vectors, args.texts, args.full)
    return 0


def _cmd_embed_image(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.embed_image(
            [Path(f) for f in args.files], model=args.model, vector_format=args.vector_format
        )
    _print_vectors(result.vectors, args.files, args.full)
    return 0


def _cmd_classify(args: argparse.Namespace) -> int:
    with _client(args) as client:
        results = client.classify(
            [Path(f) for f in args.images],
            args.labels,
            templates=args.templates or (),
            top_k=args.top_k,
            model=args.model,
        )
    for name, labels in zip(args.images, results, strict=True):
        print(name)
        for label in labels:
            print(f"  {label.probability:7.2%}  {label.label}  (cosine {label.score:.3f})")
    return 0


def _parse_item(value: str) -> str | Path:
    return Path(value[1:]) if value.startswith("@") else value


def _cmd_similarity(args: argparse.Namespace) -> int:
    with _client(args) as client:
        scores, probs = client.similarity(
            [_parse_item(q) for q in args.queries],
            [_parse_item(c) for c in args.candidates],
            model=args.model,
        )
    for i, query in enumerate(args.queries):
        print(query)
        for j, candidate in enumerate(args.candidates):
            print(f"  cosine {scores[i, j]: .4f}  p {probs[i, j]:7.2%}  {candidate}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    with _client(args) as client:
        info = client.model_info(args.model)
    print(json.dumps({f.name: v for f, v in info.ListFields()}, indent=2))
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    with _client(args) as client:
        infos = client.list_models()
    for info in infos:
        print(json.dumps({f.name: v for f, v in info.ListFields()}))
    return 0


def folder_images(directory: str) -> tuple[Path, list[Path]]:
    """The folder and every image file under it (recursively, by suffix), sorted; says so
    when there is none."""
    root = Path(directory)
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        print(f"no images under {root}", file=sys.stderr)
    return root, files


def _cmd_embed_dir(args: argparse.Namespace) -> int:
    root, files = folder_images(args.directory)
    return asyncio.run(_embed_dir(args, root, files)) if files else 1


async def _encoded_files(files: list[Path]) -> AsyncIterator[tuple[str, StreamValue]]:
    # Read lazily: the stream's flow control keeps only a window of files in memory.
    for index, path in enumerate(files):
        yield str(index), path.read_bytes()


async def _pixel_files(
    files: list[Path], pool: PixelPool, recipe: PixelRecipe
) -> AsyncIterator[tuple[str, StreamValue]]:
    """Each file's pixels, made `2 × workers` files ahead (every worker busy while the
    stream sends); a file that cannot be made here goes as its bytes, for the server's
    error."""
    ahead = max(2 * pool.workers, 2)
    pending: deque[tuple[int, asyncio.Future[bytes | None]]] = deque()
    for index, path in enumerate(files):
        pending.append((index, asyncio.ensure_future(pool.amake(str(path), recipe))))
        while len(pending) >= ahead or (pending and index == len(files) - 1):
            done_index, future = pending.popleft()
            pixels = await future
            if pixels is None:
                yield str(done_index), files[done_index].read_bytes()
            else:
                yield str(done_index), PresizedPixels(pixels)


async def local_files(
    client: AsyncClipClient,
    args: argparse.Namespace,
    files: list[Path],
    pool: PixelPool,
    *,
    catalog: bool = False,
) -> AsyncIterator[tuple[str, StreamValue]]:
    """(index, value) of each file: its pixels made by `pool` when `--pixels` and the
    server takes them (`GetModelInfo`; for the `catalog`, its catalog too), else its
    encoded bytes; says which it sends."""
    recipe = None
    if not files:  # an index re-run with nothing new: no model info asked, nothing said
        return _encoded_files(files)
    if args.pixels:
        info = await client.model_info(args.model)
        if not catalog or getattr(info, "catalog_accepts_pixels", False):
            recipe = PixelRecipe.from_model_info(info, fast_jpeg=args.fast_jpeg)
    if recipe is None:
        print("sending encoded files", flush=True)
        return _encoded_files(files)
    print(f"sending pixels made by {pool.workers} local workers", flush=True)
    return _pixel_files(files, pool, recipe)


async def _embed_dir(args: argparse.Namespace, root: Path, files: list[Path]) -> int:
    ca = args.tls_ca.read_bytes() if args.tls_ca else None
    started = time.perf_counter()
    pool = PixelPool(args.workers)  # None (no --workers, or 0): one per CPU

    async with AsyncClipClient(
        args.target, api_key=args.api_key, tls=args.tls, tls_ca=ca, timeout_s=None
    ) as client:
        items = await local_files(client, args, files, pool)
        try:
            vectors, errors = await _stream_all(client, items, len(files), args)
        finally:
            pool.close()
    return _write_embeddings(args, root, files, vectors, errors, started)


async def _stream_all(
    client: AsyncClipClient,
    items: AsyncIterator[tuple[str, StreamValue]],
    total: int,
    args: argparse.Namespace,
) -> tuple[dict[int, np.ndarray], dict[int, str]]:
    vectors: dict[int, np.ndarray] = {}
    errors: dict[int, str] = {}
    with tqdm(total=total, unit="img", desc="embedding") as bar:
        stream = client.embed_stream(items, model=args.model, vector_format=args.vector_format)
        async for item_id, vector, error in stream:
            if vector is not None:
                vectors[int(item_id)] = vector
            else:
                errors[int(item_id)] = error or "unknown error"
            bar.update()
    return vectors, errors


def _write_embeddings(
    args: argparse.Namespace,
    root: Path,
    files: list[Path],
    vectors: dict[int, np.ndarray],
    errors: dict[int, str],
    started: float,
) -> int:
    done = sorted(vectors)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    np.save(out, np.stack([vectors[i] for i in done]) if done else np.zeros((0, 0), np.float32))
    index_path = out.with_suffix(".paths.txt")
    index_path.write_text("".join(f"{files[i].relative_to(root)}\n" for i in done))
    seconds = time.perf_counter() - started
    print(
        f"embedded {len(done)}/{len(files)} images in {seconds:.1f}s "
        f"({len(done) / max(seconds, 1e-9):.1f} img/s) → {out} (row i = line i of {index_path})"
    )
    for i, message in sorted(errors.items()):
        print(f"  failed: {files[i].relative_to(root)}: {message}")
    return 0 if not errors else 2


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register the client commands on the `clipsvc` parser."""
    p = sub.add_parser("embed-text", help="Embed texts.")
    _common(p)
    p.add_argument("texts", nargs="+")
    p.add_argument("--full", action="store_true", help="print whole vectors")
    _vector_format(p)
    p.set_defaults(func=_cmd_embed_text)

    p = sub.add_parser("embed-image", help="Embed image files.")
    _common(p)
    p.add_argument("files", nargs="+")
    p.add_argument("--full", action="store_true", help="print whole vectors")
    _vector_format(p)
    _pixel_flags(p)
    p.set_defaults(func=_cmd_embed_image)

    p = sub.add_parser("classify", help="Zero-shot classify images against labels.")
    _common(p)
    p.add_argument("images", nargs="+")
    p.add_argument("--labels", nargs="+", required=True)
    p.add_argument("--templates", nargs="*", help="prompt templates with one {} each")
    p.add_argument("--top-k", type=int, default=5)
    p.set_defaults(func=_cmd_classify)

    p = sub.add_parser("similarity", help="Cosine similarity; @path means an image file.")
    _common(p)
    p.add_argument("--queries", nargs="+", required=True)
    p.add_argument("--candidates", nargs="+", required=True)
    p.set_defaults(func=_cmd_similarity)

    p = sub.add_parser("info", help="Show a served model (--model; default: the default one).")
    _common(p)
    p.set_defaults(func=_cmd_info)

    p = sub.add_parser("models", help="List the served models (ListModels), the default first.")
    _common(p)
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("embed-dir", help="Embed every image under a folder into a .npy file.")
    _common(p)
    p.add_argument("directory")
    p.add_argument("--out", required=True, help="output .npy (a .paths.txt lists the rows)")
    _vector_format(p)
    _pixel_flags(p)
    p.set_defaults(func=_cmd_embed_dir)
