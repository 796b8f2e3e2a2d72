"""What a training loop hands back: checkpoints to keep and the per-epoch curves."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


def cpu_state(module: torch.nn.Module) -> dict:
    """A detached CPU copy of a module's weights (a snapshot that later steps do not change)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def snapshot(model: torch.nn.Module, epoch: int, head: Optional[torch.nn.Module] = None) -> dict:
    """A checkpoint as saved to disk: {"model", "epoch"} plus "head" for methods that add one."""
    state = {"model": cpu_state(model), "epoch": epoch}
    if head is not None:
        state["head"] = cpu_state(head)
    return state


@dataclass
class TrainResult:
    best: dict
    last: dict
    best_epoch: int
    # Extra checkpoints (train.checkpoint_every), keyed by file name.
    periodic: dict[str, dict] = field(default_factory=dict)
    loss_rows: list[dict] = field(default_factory=list)
    val_rows: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stopped_early_at: Optional[int] = None
