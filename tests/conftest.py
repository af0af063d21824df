"""Set before any test module loads torch; the fixtures live beside the tests that use them.

Session fixtures of the integration tests (exported models, photos) are in
`tests/integration/conftest.py`; helpers that tests import are in `tests/support/`.
"""

from __future__ import annotations

import os

from hypothesis import settings

# Before torch loads OpenMP, as `clipsvc` does: in-process gateways share the cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Nothing in the suite downloads: open_clip must not try.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# No example database: it would be ./.hypothesis in the repository, shared by concurrent
# runs and replaying old failures into unrelated ones. Each run draws its own examples
# (a failure still prints the example and the seed to reproduce it); every other setting
# stays Hypothesis' default or the test's own.
settings.register_profile("clip", database=None)
settings.load_profile("clip")
