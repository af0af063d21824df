"""`clipsvc index DIR` and `clipsvc search TEXT`: a folder of images into a running
gateway's catalog (`clipsvc serve --catalog ...`), and queries against it.

`index` is incremental and resumable: an image's id is its path under DIR, the catalog
keeps the SHA-256 of the file it embedded, and images whose stored hash equals the
file's are not sent again; a run that was interrupted adds only what it had not stored.
Like `embed-dir`, it decodes here by default (`--pixels`, `--workers`) and sends the
model's pixels with the file's hash, so the gateway's CPU does not bound the indexing.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

from tqdm import tqdm

from service.api.clip.v1 import clip_pb2
from service.client import AsyncClipClient
from service.client_cli import _common, _pixel_flags, folder_images, local_files
from service.client_pixels import PixelPool
from service.core.image_preprocess import PresizedPixels

# Ids asked about in one CatalogGet (under the server's --max-items default).
_GET_CHUNK = 256


def _async_client(args: argparse.Namespace, timeout_s: float | None) -> AsyncClipClient:
    ca = args.tls_ca.read_bytes() if args.tls_ca else None
    return AsyncClipClient(
        args.target, api_key=args.api_key, tls=args.tls, tls_ca=ca, timeout_s=timeout_s
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _cmd_index(args: argparse.Namespace) -> int:
    root, files = folder_images(args.directory)
    return asyncio.run(_index(args, root, files)) if files else 1


async def _index(args: argparse.Namespace, root: Path, files: list[Path]) -> int:
    ids = {path: path.relative_to(root).as_posix() for path in files}
    errors: dict[str, str] = {}
    added = 0
    pool = PixelPool(args.workers)  # None (no --workers, or 0): one per CPU
    async with _async_client(args, args.timeout) as client:
        with tqdm(total=len(files), unit="img", desc="indexing") as bar:
            # Which files the catalog already holds with the same bytes: those are skipped.
            todo: list[Path] = []
            hashes: dict[Path, str] = {}
            for start in range(0, len(files), _GET_CHUNK):
                chunk = files[start : start + _GET_CHUNK]
                stored = await client.catalog_get([ids[p] for p in chunk], model=args.model)
                for path in chunk:
                    hashes[path] = await asyncio.to_thread(_sha256, path)
                    if stored.get(ids[path]) == hashes[path]:
                        bar.update()
                    else:
                        todo.append(path)
            skipped = len(files) - len(todo)
            values = await local_files(client, args, todo, pool, catalog=True)

            async def items() -> AsyncIterator[clip_pb2.CatalogItem]:
                # Made lazily: the stream's flow control keeps a window of files in memory.
                async for index, value in values:
                    path = todo[int(index)]
                    item = clip_pb2.CatalogItem(
                        id=ids[path],
                        metadata_json=json.dumps({"path": str(path.resolve())}),
                        model=args.model,
                    )
                    if isinstance(value, PresizedPixels):
                        # The file's hash, not the pixels': a later run skips it unread.
                        item.pixels, item.source_sha256 = value.data, hashes[path]
                    else:
                        item.image = value  # type: ignore[assignment]
                    yield item

            try:
                async for result in client.catalog_add(items()):
                    if result.HasField("error"):
                        errors[result.id] = f"{result.error.code}: {result.error.message}"
                    else:
                        added += 1
                    bar.update()
            finally:
                pool.close()
    print(f"indexed {root}: {added} added or updated, {skipped} unchanged, {len(errors)} failed")
    for item_id, message in sorted(errors.items()):
        print(f"  failed: {item_id}: {message}")
    return 0 if not errors else 2


def _cmd_search(args: argparse.Namespace) -> int:
    if (args.query is None) == (args.like is None):
        print("clipsvc search: give a query or --like ID, exactly one", file=sys.stderr)
        return 2
    return asyncio.run(_search(args))


async def _search(args: argparse.Namespace) -> int:
    query: str | Path | None = args.query
    if args.query and args.query.startswith("@"):
        query = Path(args.query[1:])
    async with _async_client(args, args.timeout) as client:
        hits = await client.search(
            query,
            like=args.like or "",
            top_k=args.top_k,
            filter_json=args.filter or "",
            model=args.model,
        )
    for hit in hits:
        metadata = json.loads(hit.metadata_json) if hit.metadata_json else {}
        print(f"{hit.score:.4f}  {metadata.get('path', hit.id)}")
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `index` and `search` on the `clipsvc` parser."""
    p = sub.add_parser(
        "index",
        help="Add every image under a folder to the catalog (unchanged files are skipped).",
    )
    _common(p)
    p.add_argument("directory")
    _pixel_flags(p)
    p.set_defaults(func=_cmd_index)

    p = sub.add_parser(
        "search", help="Search the catalog by text, @image-file, or --like a stored item."
    )
    _common(p)
    p.add_argument("query", nargs="?", help="a text, or @path of an image")
    p.add_argument(
        "--like",
        metavar="ID",
        help="items like the stored item ID (a path under the indexed folder, as `index` "
        "names them), itself left out; instead of a query",
    )
    p.add_argument("-k", "--top-k", type=int, default=10, help="how many hits")
    p.add_argument(
        "--filter", help='JSON object of metadata values to match, e.g. \'{"colour": "red"}\''
    )
    p.set_defaults(func=_cmd_search)
