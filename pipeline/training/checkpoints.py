"""What a training loop hands back (checkpoints to keep, the per-epoch curves) and what it keeps
between epochs so that an interrupted run can resume."""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from pipeline import io

log = logging.getLogger(__name__)


def cpu_state(module: torch.nn.Module) -> dict:
    """A detached CPU copy of a module's weights (a snapshot that later steps do not change)."""
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def snapshot(model: torch.nn.Module, epoch: int, head: Optional[torch.nn.Module] = None) -> dict:
    """A checkpoint as saved to disk: {"model", "epoch"} plus "head" for methods that add one."""
    state = {"model": cpu_state(model), "epoch": epoch}
    if head is not None:
        state["head"] = cpu_state(head)
    return state


def snapshot_on_main(world, model: torch.nn.Module, epoch: int, head: Optional[torch.nn.Module] = None) -> dict:
    """`snapshot` on rank 0, which writes the checkpoints; the other ranks of a torchrun launch
    (`pipeline.distributed.World`) keep no copy of the weights."""
    return snapshot(model, epoch, head) if world.is_main else {}


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


def capture_rng(generators: dict[str, torch.Generator], numpy_rngs: dict[str, np.random.Generator]) -> dict:
    """Every random state a training epoch draws from, as tensors and plain values (weights_only-safe)."""
    kind, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy_global": {"keys": torch.from_numpy(keys.astype(np.int64)), "position": position, "has_gauss": has_gauss, "cached": cached},
        "generators": {name: generator.get_state() for name, generator in generators.items()},
        "numpy": {name: rng.bit_generator.state for name, rng in numpy_rngs.items()},
    }


def restore_rng(state: dict, generators: dict[str, torch.Generator], numpy_rngs: dict[str, np.random.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    g = state["numpy_global"]
    np.random.set_state(("MT19937", g["keys"].numpy().astype(np.uint32), g["position"], g["has_gauss"], g["cached"]))
    for name, generator in generators.items():
        generator.set_state(state["generators"][name])
    for name, rng in numpy_rngs.items():
        rng.bit_generator.state = state["numpy"][name]


@dataclass
class Resume:
    """Where a run's whole state is kept between epochs, so a killed run can go on (`train.resume`).

    With `enabled`, the trainer saves model, optimizer, schedule, random states and the curves so
    far after every epoch (atomically), and a saved state whose fingerprint (the params and data it
    was made with) matches is loaded and training continues after its epoch; on the CPU the result
    is the same, bit for bit, as a run that was never interrupted. Without it nothing is saved:
    the state is model + optimizer + best checkpoint, 130 MB an epoch for the tiny model.
    """

    path: Optional[Path] = None
    fingerprint: str = ""
    enabled: bool = False
    write: bool = True  # False on the ranks of a torchrun launch other than 0: they load, never save

    def load(self) -> Optional[dict]:
        if not self.enabled or self.path is None or not self.path.exists():
            return None
        from pipeline.models import ModelError, load_weights  # the same weights_only loading as checkpoints

        try:
            state = load_weights(self.path)
        except ModelError as err:  # damaged on disk (it is written atomically): the next save replaces it
            log.warning("%s; training starts from the beginning", err)
            return None
        if not isinstance(state, dict) or state.get("fingerprint") != self.fingerprint:
            log.warning("%s was saved with other params or data: training starts from the beginning", self.path)
            return None
        log.warning("resuming from %s after epoch %d", self.path, state["epoch"])
        return state

    def save(self, **state) -> None:
        if not self.enabled or self.path is None or not self.write:
            return
        with io.atomic_path(self.path) as tmp:
            torch.save({"fingerprint": self.fingerprint, **state}, tmp)

    def clear(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)


def result_state(result: TrainResult) -> dict:
    return dict(vars(result))


def result_from_state(state: dict) -> TrainResult:
    return TrainResult(**state)
