"""`clipsvc`: serve, export, run Triton locally, and call a running service."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Sequence

from service.extras import MissingExtra
from service.settings import (
    BatchingOptions,
    ExportSettings,
    Settings,
    SettingsError,
    TritonServerSettings,
)

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
    from service.wiring import serve

    asyncio.run(serve(settings))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    _setup_logging("WARNING")
    from service.model.export import export_model

    export = ExportSettings.from_sources(args)
    summary = export_model(
        export.model,
        export.pretrained,
        export.out,
        flavor=export.flavor,
        tensorrt=export.tensorrt,
        precision=export.precision,
        batching=BatchingOptions.from_sources(args),
        name=export.name,
    )
    print(summary.render())
    return 0


def _cmd_triton(args: argparse.Namespace) -> int:
    _setup_logging("INFO")
    from service.processes.triton_server import run_triton

    return run_triton(TritonServerSettings.from_sources(args))


def build_parser() -> argparse.ArgumentParser:
    """The full `clipsvc` argument parser."""
    parser = argparse.ArgumentParser(prog="clipsvc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="Run the gRPC gateway.")
    Settings.add_arguments(serve)
    serve.set_defaults(func=_cmd_serve)
    export = sub.add_parser(
        "export", help="Export an open_clip model to a Triton model repository."
    )
    ExportSettings.add_arguments(export)
    BatchingOptions.add_arguments(export)
    export.set_defaults(func=_cmd_export)
    triton = sub.add_parser("triton", help="Run the pip tritonserver on a model repository.")
    TritonServerSettings.add_arguments(triton)
    triton.set_defaults(func=_cmd_triton)
    from service import catalog_cli, client_cli

    client_cli.add_commands(sub)
    catalog_cli.add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `clipsvc` console script."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub at run time
    # Before torch loads OpenMP: idle workers that spin starve the decode threads and the
    # event loop sharing the cores; measured 10-200x slower forward passes (bench/README).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = build_parser()
    args = parser.parse_args(argv)
    import grpc  # every client command talks gRPC; `serve` imports it anyway

    try:
        return int(args.func(args) or 0)
    except SettingsError as exc:
        parser.error(str(exc))  # a bad flag or CLIP_* value: a usage error, exit 2
    except MissingExtra as exc:  # the message names the extra to install
        print(f"clipsvc: {exc}", file=sys.stderr)
        return 1
    except grpc.RpcError as exc:  # a refused call or no server: its status, not a traceback
        code = exc.code().name if hasattr(exc, "code") else "UNKNOWN"
        details = exc.details() if hasattr(exc, "details") else str(exc)
        print(f"clipsvc: {code}: {details}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
