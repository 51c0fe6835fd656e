"""Print the requirements `make test-latest` installs: the newest releases we may meet next.

pyproject.toml caps each dependency at the newest release we have tested. This script lifts
every cap to the next major version, so `pip install --upgrade -r <(python latest.py)` takes
whatever each project released since, and a break shows up in CI the day the release lands.
PyTorch is the exception: it stays at the version in constraints.in, because every newer
wheel on PyPI is a multi-gigabyte CUDA build.

Usage: python requirements/latest.py   (prints one requirement per line)
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pip vendors the same parser
    from pip._vendor import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
EXTRAS = ("dev", "finetune")


def lift_cap(requirement: str) -> str:
    """``"numpy>=1.26,<2.5"`` → ``"numpy>=1.26,<3"``; ``"deepspeed>=0.15,<0.20"`` → ``<1``."""

    def next_major(match: re.Match[str]) -> str:
        return f"<{int(match.group(1)) + 1}"

    return re.sub(r"<(\d+)(?:\.\d+)*", next_major, requirement)


def pinned_torch() -> str:
    for line in (ROOT / "requirements" / "constraints.in").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("torch=="):
            return line
    raise SystemExit("requirements/constraints.in does not pin torch")


def latest_requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in EXTRAS:
        requirements += project["optional-dependencies"][extra]
    return [
        pinned_torch() if re.match(r"torch\b", req) else lift_cap(req) for req in requirements
    ]


if __name__ == "__main__":
    sys.stdout.write("\n".join(latest_requirements()) + "\n")
