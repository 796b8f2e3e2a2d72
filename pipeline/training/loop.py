"""The one training loop every method uses (`train.method`: clip, siamese, triplet).

A method supplies what differs: its phases (which parameters train, with which optimizer), its
batches, the loss of one batch, and its validation (a row of numbers, one of which picks the best
checkpoint). The loop owns the rest, the same for all of them: stepping under autocast, gradient
clipping (`train.grad_clip_norm`), the warmup + cosine schedule of each phase, validation every
`train.val_every` epochs, the best checkpoint and early stopping (`patience`, `min_delta`),
`checkpoint_every`, the per-epoch log, and saving / resuming the whole state after every epoch
(`runtime.resume`; on the CPU a resumed run ends bit-identical to an uninterrupted one).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Protocol

import numpy as np
import torch
from tqdm import tqdm  # not tqdm.auto, whose asyncio class calls iter() twice: DataLoader workers would start twice

from pipeline.distributed import World
from pipeline.errors import TrainingError
from pipeline.models import LoadedModel
from pipeline.models.encode import autocast
from pipeline.params import TrainParams
from pipeline.training.checkpoints import Resume, TrainResult, capture_rng, restore_rng, result_from_state, result_state, snapshot, snapshot_on_main
from pipeline.training.optim import cosine_with_warmup
from pipeline.training.progress import epoch_line

# Part of the fingerprint a saved run state must match to be resumed (pipeline/train.py): bump when
# the state's layout changes, or what a resumed run would continue from (3: a random tower's
# batch-norm statistics are estimated before triplet training; older states hold the init's).
STATE_VERSION = 3


@dataclass
class Phase:
    """Epochs that train one set of parameters with one optimizer and one schedule.

    `start` is called when the phase begins (fresh or resumed): it sets which parameters train and
    returns their optimizer."""

    name: str
    epochs: range
    start: Callable[[], torch.optim.Optimizer]


class Method(Protocol):
    # The validation row's key that picks the best checkpoint and drives early stopping (higher is better).
    score: str
    # Random generators the batches draw from, saved and restored with the run.
    generators: dict[str, torch.Generator]
    numpy_rngs: dict[str, np.random.Generator]

    def phases(self) -> list[Phase]: ...
    def steps_per_epoch(self) -> int: ...
    def batches(self, epoch: int) -> Iterable: ...
    def step_loss(self, batch) -> torch.Tensor: ...
    def train_mode(self) -> None: ...
    def after_step(self) -> None: ...
    def epoch_values(self) -> dict: ...
    def can_validate(self) -> bool: ...
    def validate(self) -> dict: ...


class EarlyStopping:
    """Best = highest validation score; stop after `patience` validations without an improvement > min_delta."""

    def __init__(self, patience: int, min_delta: float):
        self.patience, self.min_delta = patience, min_delta
        self.best = -math.inf
        self.bad_rounds = 0

    def improved(self, score: float) -> bool:
        if score > self.best + self.min_delta:
            self.best, self.bad_rounds = score, 0
            return True
        self.bad_rounds += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_rounds >= self.patience


def fit(
    method: Method,
    loaded: LoadedModel,
    params: TrainParams,
    resume: Resume = Resume(),
    world: World = World(),
    on_epoch: Optional[Callable[[TrainResult], None]] = None,
) -> TrainResult:
    """Train `method` through its phases; `on_epoch(result)` runs on rank 0 after each epoch's rows
    are in `result` (and once after the epoch-0 validation), e.g. to log them live."""
    stopper = EarlyStopping(params.patience, params.min_delta)
    has_val = method.can_validate()
    state = resume.load()
    if state is not None:
        loaded.model.load_state_dict(state["model"])
        if loaded.image_head is not None:
            loaded.image_head.load_state_dict(state["head"])
        stopper.best, stopper.bad_rounds = state["stopper"]["best"], state["stopper"]["bad_rounds"]
        restore_rng(state["rng"], method.generators, method.numpy_rngs)
        result = result_from_state(state["result"])
    else:
        result = TrainResult(best={}, last={}, best_epoch=0)
        if has_val:  # the starting point, for the curves; it is not a candidate for the best checkpoint
            result.val_rows.append({"epoch": 0, **world.on_main(method.validate)})
    if world.is_main and on_epoch is not None:
        on_epoch(result)

    phases = method.phases()
    names = [phase.name for phase in phases]
    last_epoch = 0 if state is None else state["epoch"]
    for number, phase in enumerate(phases):
        if state is not None and number < names.index(state["phase"]):
            continue  # finished before the run was interrupted
        if result.stopped_early_at is not None:
            break
        optimizer = phase.start()
        scheduler = cosine_with_warmup(optimizer, len(phase.epochs) * method.steps_per_epoch(), params.warmup_fraction)
        epochs = phase.epochs
        if state is not None and state["phase"] == phase.name:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            epochs = range(state["epoch"] + 1, epochs.stop)
        trainable = [p for group in optimizer.param_groups for p in group["params"]]
        for epoch in epochs:
            start = time.perf_counter()
            _train_epoch(method, loaded, params, optimizer, scheduler, trainable, epoch, world, result)
            score = None
            if has_val and (epoch % params.val_every == 0 or epoch == params.epochs):
                # Rank 0 validates (the weights are the same on every rank); the others wait for its row.
                row = world.on_main(method.validate)
                result.val_rows.append({"epoch": epoch, **row})
                score = (method.score, row[method.score])
                if stopper.improved(row[method.score]):
                    result.best, result.best_epoch = snapshot_on_main(world, loaded.model, epoch, loaded.image_head), epoch
            if world.is_main:
                epoch_line(epoch, params.epochs, result.loss_rows[-1]["loss"], time.perf_counter() - start, score)  # validation included
                if on_epoch is not None:
                    on_epoch(result)
            if params.checkpoint_every and epoch % params.checkpoint_every == 0 and world.is_main:
                result.periodic[f"epoch-{epoch:04d}.pt"] = snapshot(loaded.model, epoch, loaded.image_head)
            if stopper.should_stop:
                result.stopped_early_at = epoch
                result.notes.append(
                    f"early stopping at epoch {epoch}: no val {method.score} improvement > {params.min_delta} for {params.patience} validations"
                )
            last_epoch = epoch
            resume.save(
                epoch=epoch, phase=phase.name, model=loaded.model.state_dict(),
                head=None if loaded.image_head is None else loaded.image_head.state_dict(),
                optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), result=result_state(result),
                stopper={"best": stopper.best, "bad_rounds": stopper.bad_rounds}, rng=capture_rng(method.generators, method.numpy_rngs),
            )  # fmt: skip
            if result.stopped_early_at is not None:
                break
    result.last = snapshot_on_main(world, loaded.model, last_epoch, loaded.image_head)
    if not has_val:
        result.notes.append("no usable val split: the best checkpoint is the last one")
        result.best, result.best_epoch = result.last, last_epoch
    return result


def _train_epoch(method: Method, loaded: LoadedModel, params: TrainParams, optimizer, scheduler, trainable, epoch: int, world: World, result: TrainResult) -> None:
    method.train_mode()
    start, losses = time.perf_counter(), []
    bar = dict(total=method.steps_per_epoch(), desc=f"epoch {epoch}/{params.epochs}", leave=False, disable=None if world.is_main else True)
    for step, batch in enumerate(tqdm(method.batches(epoch), **bar), start=1):
        with autocast(loaded.device):
            loss = method.step_loss(batch)
        if not math.isfinite(value := loss.item()):  # one step on would make every weight NaN, and best.pt with them
            raise TrainingError(
                f"train: the loss is {value} at epoch {epoch}, step {step}; stopped with nothing saved "
                f"(train.lr {params.lr:g} may be too high; train.grad_clip_norm bounds the steps)"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if params.grad_clip_norm:
            torch.nn.utils.clip_grad_norm_(trainable, params.grad_clip_norm)
        optimizer.step()
        scheduler.step()
        method.after_step()
        losses.append(value)
    result.loss_rows.append(
        {
            "epoch": epoch,
            "loss": float(np.mean(losses)) if losses else float("nan"),
            "lr": scheduler.get_last_lr()[0],
            **method.epoch_values(),
            "epoch_s": round(time.perf_counter() - start, 3),  # wall clock: to reports/timing, never the curves
        }
    )
