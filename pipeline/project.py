"""Where a clipline project is: the folder holding dvc.yaml. Imports nothing heavy, so the CLI
can find its paths (and answer --help) without loading torch."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def find_project_root(start: Path) -> Optional[Path]:
    """The nearest folder at or above `start` holding dvc.yaml, as git and dvc find theirs."""
    for folder in [start, *start.parents]:
        if (folder / "dvc.yaml").is_file():
            return folder
    return None
