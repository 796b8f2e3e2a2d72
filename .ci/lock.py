"""Write requirements.lock: the exact installed version of every package clipline[test] needs.

    python .ci/lock.py            # after `pip install -e ".[test]"` in a working environment

The closure is walked from clipline's own requirements through each installed distribution's
metadata, so nothing the environment happens to hold besides is pinned. torch's CUDA runtime
wheels (nvidia-*, triton) are left out: they come with the CUDA build of torch, and a CPU-only
machine installs the CPU build instead (README: "Installing").
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
CUDA_ONLY = re.compile(r"^(nvidia-.*|triton|cuda-.*)$")


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(root: str, extras: set[str]) -> dict[str, str]:
    pinned: dict[str, str] = {}
    todo = [(root, frozenset(extras))]
    seen = set()
    while todo:
        name, wanted = todo.pop()
        if (name, wanted) in seen:
            continue
        seen.add((name, wanted))
        dist = metadata.distribution(name)
        if _canonical(name) != _canonical(root):
            pinned[_canonical(dist.metadata["Name"])] = dist.version
        for line in dist.requires or []:
            requirement = Requirement(line)
            env = {**default_environment(), "extra": ""}
            active = requirement.marker is None or any(requirement.marker.evaluate({**env, "extra": e}) for e in ("", *wanted))
            if active:
                todo.append((requirement.name, frozenset(requirement.extras)))
    return pinned


def main() -> None:
    pinned = closure("clipline", {"test"})
    lines = [f"{name}=={version}" for name, version in sorted(pinned.items()) if not CUDA_ONLY.match(name)]
    header = [
        "# Exact versions of everything clipline[test] needs, from the environment CI and the committed",
        "# reports were made in. Regenerate with `python .ci/lock.py` after a deliberate upgrade.",
        f"# Python {sys.version_info.major}.{sys.version_info.minor}. torch's CUDA runtime wheels are not listed: the",
        "# CUDA build of torch brings its own; CPU-only machines install the CPU build (README).",
    ]
    (ROOT / "requirements.lock").write_text("\n".join(header + lines) + "\n")
    print(f"{len(lines)} packages -> {ROOT / 'requirements.lock'}")


if __name__ == "__main__":
    main()
