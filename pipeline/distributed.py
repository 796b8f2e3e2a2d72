"""torch.distributed for the stages: one process per GPU (or CPU slot) under `torchrun`.

A stage launched by `torchrun` (or by `dvc repro` with `runtime.processes > 1`, which relaunches
the stage under torchrun: `pipeline.stage`) joins the process group here: NCCL on GPUs, gloo on
CPU. One process is `World()`, rank 0 of 1, and every helper below is then a plain no-op, so the
single-process code path is the distributed one with nothing to gather.

Training splits each *global* batch (what `train.batch_size` and the samplers describe, the same
batches as a one-process run) into contiguous per-rank shares (`RankShare`), gathers features
across ranks with gradients (`gather_rows`) so losses see the whole global batch, and lets DDP
average the gradients. The loss and gradients of a step then equal a one-process step on the same
global batch (tests/test_distributed.py).
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one launch."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # the GPU this process drives on its machine

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes outputs, checkpoints, curves and the resume state."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def from_main(self, value: Any) -> Any:
        """Rank 0's `value`, on every rank (a picklable object)."""
        if not self.distributed:
            return value
        shared = [value]
        dist.broadcast_object_list(shared, src=0)
        return shared[0]

    def on_main(self, compute: Callable[[], Any]) -> Any:
        """`compute()` run on rank 0 alone, its result on every rank (e.g. validation, whose
        numbers every rank needs to agree on the best checkpoint and early stopping)."""
        return self.from_main(compute() if self.is_main else None)

    def all_objects(self, value: Any) -> list:
        """Every rank's `value`, in rank order."""
        if not self.distributed:
            return [value]
        gathered = [None] * self.size
        dist.all_gather_object(gathered, value)
        return gathered

    def share(self, batch: Sequence[int]) -> Sequence[int]:
        """This rank's contiguous share of a global batch (sizes differ by at most one)."""
        n = len(batch)
        return batch[self.rank * n // self.size : (self.rank + 1) * n // self.size]


def init(device: str = "auto") -> World:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); else one process.

    On CUDA each process drives GPU LOCAL_RANK (NCCL); on CPU the backend is gloo.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    world = World(rank=int(os.environ["RANK"]), size=size, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        on_gpu = device != "cpu" and torch.cuda.is_available()
        if on_gpu:
            torch.cuda.set_device(world.local_rank)
        # A long timeout: rank 0 alone validates and writes checkpoints while the others wait.
        dist.init_process_group("nccl" if on_gpu else "gloo", timeout=datetime.timedelta(hours=2))
    return world


def finish(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank_device(device: str, world: World) -> str:
    """`runtime.device` for this rank: `auto`/`cuda` become this process's own GPU."""
    if world.distributed and torch.cuda.is_available() and device in ("auto", "cuda"):
        return f"cuda:{world.local_rank}"
    return device


def gather_rows(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """Every rank's rows, concatenated in rank order; gradients flow back to each rank's own rows.

    Ranks may hold different numbers of rows (the last batch of an epoch): each pads to the
    largest share before the all-gather and the padding is cut off again.
    """
    if not world.distributed:
        return tensor
    sizes = [int(n) for n in _all_gather_plain(torch.tensor([len(tensor)], device=tensor.device), world)]
    padded = tensor
    if len(tensor) < max(sizes):
        padding = tensor.new_zeros((max(sizes) - len(tensor), *tensor.shape[1:]))
        padded = torch.cat([tensor, padding])
    if tensor.requires_grad:
        # The backward of this all-gather sums each rank's gradient for our rows, so every rank's
        # copy of the (identical) global loss contributes; DDP's averaging then divides by the
        # number of ranks again: the gradient of the global loss, as one process would compute it.
        parts = dist_fn.all_gather(padded)
    else:
        parts = _all_gather_plain(padded, world)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


def _all_gather_plain(tensor: torch.Tensor, world: World) -> list[torch.Tensor]:
    parts = [torch.empty_like(tensor) for _ in range(world.size)]
    dist.all_gather(parts, tensor.contiguous())
    return parts


class RankShare(torch.utils.data.Sampler[list[int]]):
    """This rank's share of each global batch that `batches` yields (a batch sampler).

    The global batches are the same on every rank (the same seeded sampler), so together the ranks
    see each batch exactly once, and one rank's share is what it feeds its DDP replica. A final
    global batch smaller than the number of ranks is dropped, as no rank may get an empty share.
    """

    def __init__(self, batches: Iterable[list[int]], world: World):
        self.batches, self.world = batches, world

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self.batches:
            if len(batch) >= self.world.size:
                yield list(self.world.share(batch))


def wrap_ddp(module: torch.nn.Module, world: World) -> torch.nn.Module:
    """`module` in DistributedDataParallel when there are several ranks, else itself.

    Gradients of the parameters that require them at this call are averaged across ranks; a
    training phase that unfreezes more parameters wraps again. On GPUs, batch norm becomes
    SyncBatchNorm so that it normalises over the global batch as one process would; PyTorch has
    no CPU SyncBatchNorm, so on CPU (gloo) batch norm sees each rank's share only.
    """
    if not world.distributed:
        return module
    device = next(module.parameters()).device
    if device.type == "cuda":
        module = torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
        return torch.nn.parallel.DistributedDataParallel(module, device_ids=[device.index])
    if world.is_main and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        log.warning("batch norm on CPU under %d processes normalises each process's share of the batch, not the global batch", world.size)
    return torch.nn.parallel.DistributedDataParallel(module)
