"""`python -m tests.support.gated_serve serve ...`: `clipsvc` with its backend behind a gate.

The child of `GatedGatewayProcess`: the real `service.cli.main` (flags, logging, signal
handling, graceful shutdown), with the one change that `service.wiring.build_backend`
wraps the backend in a `GatedBackend` asking the `FileGate` its parent named.
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    """Install the gate, then run `clipsvc` with this process's arguments."""
    # As `clipsvc` does before torch loads (importing the wiring below loads it).
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from service import cli
    from tests.support.gate import gate_from_environment, gated_wiring

    with gated_wiring(gate_from_environment()):
        return cli.main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
