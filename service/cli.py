"""`clipsvc`: serve, export, run Triton locally, and call a running service."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from service.settings import Settings

_LOGGER = logging.getLogger("clipsvc")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def _cmd_serve(args: argparse.Namespace) -> int:
    settings = Settings.from_sources(args)
    _setup_logging(settings.log_level)
    _LOGGER.info("settings: %s", json.dumps(settings.masked(), default=str, sort_keys=True))
    from service.server.app import serve

    asyncio.run(serve(settings))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    _setup_logging("WARNING")
    from service.model.export import export_model
    from service.model.triton_config import BatchingOptions

    batching = BatchingOptions(
        max_batch_size=args.max_batch_size,
        instances=args.instances,
        max_queue_delay_us=args.max_queue_delay_us,
        max_queue_size=args.max_queue_size,
        queue_timeout_us=args.queue_timeout_us,
        torch_threads=args.torch_threads,
    )
    summary = export_model(
        args.model, args.pretrained, Path(args.out), flavor=args.flavor, batching=batching
    )
    print(summary.render())
    return 0


def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="Export an open_clip model to a Triton model repository.")
    p.add_argument(
        "--model", required=True, help="open_clip model name (ViT-B-32, clip-demo-shapes)"
    )
    p.add_argument(
        "--pretrained", default="none", help="pretrained tag, a checkpoint PATH, or 'none'"
    )
    p.add_argument("--out", required=True, help="output model repository directory")
    p.add_argument(
        "--flavor",
        choices=("pytorch", "python"),
        default="python",
        help="pytorch: libtorch backend on GPU (NGC image); python: pip tritonserver",
    )
    p.add_argument("--max-batch-size", type=int, default=32, help="Triton max_batch_size")
    p.add_argument("--instances", type=int, default=1, help="model instances per device")
    p.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=2000,
        help="dynamic batcher's wait for a fuller batch, in microseconds",
    )
    p.add_argument(
        "--max-queue-size",
        type=int,
        default=256,
        help="requests Triton queues before refusing new ones",
    )
    p.add_argument(
        "--queue-timeout-us",
        type=int,
        default=10_000_000,
        help="longest a request waits in Triton's queue before it is refused",
    )
    p.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="python flavor: torch threads per instance (0 = torch default)",
    )
    p.set_defaults(func=_cmd_export)


def build_parser() -> argparse.ArgumentParser:
    """The full `clipsvc` argument parser."""
    parser = argparse.ArgumentParser(prog="clipsvc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="Run the gRPC gateway.")
    Settings.add_arguments(serve)
    serve.set_defaults(func=_cmd_serve)
    _add_export(sub)
    from service import client_cli
    from service.processes import triton_server

    triton = sub.add_parser("triton", help="Run the pip tritonserver on a model repository.")
    triton_server.add_triton_arguments(triton)
    triton.set_defaults(func=triton_server.run_triton)
    client_cli.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `clipsvc` console script."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub at run time
    # Before torch loads OpenMP: idle workers that spin starve the decode threads and the
    # event loop sharing the cores; measured 10-200x slower forward passes (bench/README).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
