"""Print the distributions a wheelhouse lacks for another Python 3.11 release, one a line.

    python scripts/wheelhouse_missing.py WHEELHOUSE PYTHON_VERSION

`pip wheel` resolves the gateway's dependencies for the Python running it, and markers can
differ between patch releases: redis needs async-timeout on Python < 3.11.3, so Debian
bookworm's 3.11.2 needs a wheel that a 3.11.7 host never fetches (and `pip download
--python-version` does not evaluate markers for the version it is given). This walks the
dependencies of pyproject.toml through the wheels' metadata with the markers of
PYTHON_VERSION (the image's) and names what is missing; build_image.sh fetches those.
"""

from __future__ import annotations

import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name, parse_wheel_filename
except ImportError:  # pip always carries a copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename

REPO_ROOT = Path(__file__).resolve().parents[1]


def requirements_of(wheel: Path) -> list[str]:
    """The `Requires-Dist` lines of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(archive.read(name).decode("utf-8"), headersonly=True)
    return metadata.get_all("Requires-Dist") or []


def missing(wheelhouse: Path, python_version: str) -> set[str]:
    """Names needed under `python_version`'s markers that no wheel in `wheelhouse` provides."""
    environment = {
        "python_full_version": python_version,
        "python_version": ".".join(python_version.split(".")[:2]),
    }
    wheels = {
        canonicalize_name(parse_wheel_filename(w.name)[0]): w for w in wheelhouse.glob("*.whl")
    }
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    queue = [Requirement(line) for line in project["dependencies"]]
    seen: set[tuple[str, frozenset[str]]] = set()
    absent: set[str] = set()
    while queue:
        requirement = queue.pop()
        name = canonicalize_name(requirement.name)
        key = (name, frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        wheel = wheels.get(name)
        if wheel is None:
            absent.add(name)
            continue
        for line in requirements_of(wheel):
            dependency = Requirement(line)
            extras = requirement.extras or {""}
            if dependency.marker is None or any(
                dependency.marker.evaluate({**environment, "extra": extra}) for extra in extras
            ):
                queue.append(dependency)
    return absent


if __name__ == "__main__":
    print(*sorted(missing(Path(sys.argv[1]), sys.argv[2])), sep="\n")
