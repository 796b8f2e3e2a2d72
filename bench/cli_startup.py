"""How long `clipline` commands take from start to exit, each in a fresh process, over the
project's artifacts (run `dvc repro` first): what a person waits for at the prompt.

    python bench/cli_startup.py                         # 5 runs of each command, interleaved
    python bench/cli_startup.py --repeats 9
    python bench/cli_startup.py --checkout /tmp/other   # another checkout's code, same artifacts

The commands run interleaved (one of each, then again), so a load that comes and goes on shared
cores touches them alike. Prints min and median seconds per command.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import typer

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = {
    "--help": ["--help"],
    "a mistyped option": ["search", "--txet", "a red circle"],
    "info": ["info"],
    "search --text": ["search", "--text", "a red circle", "--top-k", "1"],
}


def main(
    repeats: int = typer.Option(5, min=1, help="runs of each command"),
    checkout: Optional[Path] = typer.Option(None, help="run this checkout's `pipeline` package (default: this one)"),
) -> None:
    # `python -m` would put the working folder (this project, for its artifacts) first on the path.
    code = (checkout or ROOT).resolve()
    launcher = f"import sys; sys.path.insert(0, {str(code)!r}); from pipeline.cli import app; app(prog_name='clipline')"
    seconds: dict[str, list[float]] = {name: [] for name in COMMANDS}
    for _ in range(repeats):
        for name, args in COMMANDS.items():
            began = time.perf_counter()
            subprocess.run([sys.executable, "-c", launcher, *args], cwd=ROOT, capture_output=True)
            seconds[name].append(time.perf_counter() - began)
    typer.echo(f"clipline start to exit, {repeats} runs each, code from {checkout or ROOT}")
    for name, times in seconds.items():
        typer.echo(f"{name:>20}: min {min(times):.2f} s, median {statistics.median(times):.2f} s")


if __name__ == "__main__":
    typer.run(main)
