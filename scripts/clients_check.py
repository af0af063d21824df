"""`make clients-check`: LangChain, LlamaIndex, LiteLLM and Haystack against a gateway.

Starts an in-process gateway on loopback over the exported demo model (`--repository`),
runs `clients_probe.py` with `--client-python` (the Python of a venv holding the client
libraries, which are not the project's dependencies), and exits with its status.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from service.processes.gateway import gateway_settings, running_gateway


async def _run(repository: Path, client_python: str) -> int:
    async with running_gateway(gateway_settings(repository)) as gateway:
        probe = await asyncio.create_subprocess_exec(
            client_python, str(Path(__file__).with_name("clients_probe.py")), str(gateway.http_port)
        )
        return await probe.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--client-python", default=".venv-clients/bin/python")
    args = parser.parse_args()
    return asyncio.run(_run(args.repository, args.client_python))


if __name__ == "__main__":
    sys.exit(main())
