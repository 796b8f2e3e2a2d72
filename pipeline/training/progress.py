"""One line per epoch when no progress bar is shown (`dvc repro` and CI capture the output, so
tqdm stays quiet): without it a long training stage prints nothing for minutes."""

from __future__ import annotations

import sys
from typing import Optional


def bars_shown() -> bool:
    """tqdm's own rule with `disable=None`: bars only on a terminal."""
    return sys.stderr.isatty()


def epoch_line(epoch: int, epochs: int, loss: float, seconds: float, score: Optional[tuple[str, float]] = None) -> None:
    if bars_shown():
        return
    validation = f"  val {score[0]} {score[1]:.4f}" if score else ""
    print(f"epoch {epoch}/{epochs}  loss {loss:.4f}{validation}  {seconds:.1f}s", flush=True)
