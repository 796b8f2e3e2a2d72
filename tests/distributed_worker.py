"""What each process of a test torchrun launch does (tests/test_distributed.py starts them).

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py steps OUT.json
        one training step of every method, on one global batch, as a DDP run over the ranks and as
        one process over the whole batch; rank 0 writes the losses and the largest gradient gap.
    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py killed-train PARAMS DATA OUT EPOCH
        the train stage, killed on every rank right after the resume state of EPOCH was saved.
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
from pathlib import Path

import open_clip
import torch

from pipeline import distributed, models
from pipeline.models.heads import ProjectionHead
from pipeline.training.clip import clip_step_loss, global_clip_loss
from pipeline.training.losses import contrastive_loss, triplet_loss
from pipeline.training.metric import ImageEmbedder, siamese_step_loss, triplet_step_loss
from pipeline.training.miners import make_miner

# A tower without batch norm: PyTorch has no SyncBatchNorm on CPU, so a ResNet tower (clipline-tiny)
# normalises each rank's share on its own under gloo; a ViT computes exactly what one process does.
TINY_VIT = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
GLOBAL_BATCH = 8


def _tiny_vit() -> models.LoadedModel:
    folder = Path(tempfile.mkdtemp())
    (folder / "clipline-test-vit.json").write_text(json.dumps(TINY_VIT))
    open_clip.add_model_config(folder)
    torch.manual_seed(0)
    return models.create_model("clipline-test-vit", "none", "cpu")


def _batch(loaded: models.LoadedModel) -> dict:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(2 * GLOBAL_BATCH, 3, 32, 32, generator=generator)
    return {
        "images": images[:GLOBAL_BATCH],
        "others": images[GLOBAL_BATCH:],
        "tokens": loaded.tokenizer([f"a photo of thing number {i}" for i in range(GLOBAL_BATCH)]),
        "same": torch.tensor([1, 0] * (GLOBAL_BATCH // 2), dtype=torch.float32),
        "labels": torch.arange(GLOBAL_BATCH) // 2,  # four classes, two images each
    }


def _step(method: str, loaded: models.LoadedModel, batch: dict, rows, world) -> tuple[float, dict]:
    """One forward/backward of `method` on `rows` of the global batch; (loss, gradients by name)."""
    if method == "clip":
        module = loaded.model
        replica = distributed.wrap_ddp(module, world)
        loss = clip_step_loss(replica, global_clip_loss(world), batch["images"][rows], batch["tokens"][rows])
    else:
        # As the trainers do: siamese trains the image tower, triplet only its head.
        loaded.model.requires_grad_(False)
        loaded.model.visual.requires_grad_(method == "siamese")
        module = ImageEmbedder(loaded)
        replica = distributed.wrap_ddp(module, world)
        if method == "siamese":
            loss = siamese_step_loss(replica, contrastive_loss(1.0), batch["images"][rows], batch["others"][rows], batch["same"][rows], world)
        else:
            loss = triplet_step_loss(replica, triplet_loss(0.2), make_miner("all", 0.2), batch["images"][rows], batch["labels"][rows], world)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in module.named_parameters() if p.requires_grad and p.grad is not None}
    return loss.item(), grads


def steps(out: str) -> None:
    world = distributed.init("cpu")
    report = {}
    # The last batch of a siamese epoch may not split evenly: 7 rows are shared 3 + 4.
    for method, rows in (("clip", GLOBAL_BATCH), ("siamese", GLOBAL_BATCH), ("siamese", GLOBAL_BATCH - 1), ("triplet", GLOBAL_BATCH)):
        loaded = _tiny_vit()
        if method == "triplet":
            torch.manual_seed(2)
            loaded.image_head = ProjectionHead(loaded.tower_dim, 16)
        batch = _batch(loaded)
        one_process = copy.deepcopy(loaded)  # before DDP wraps (and syncs) the original
        loss_one, grads_one = _step(method, one_process, batch, slice(0, rows), distributed.World())
        share = world.share(range(rows))
        loss_ddp, grads_ddp = _step(method, loaded, batch, slice(share.start, share.stop), world)
        report[f"{method}/{rows}"] = {
            "loss_one_process": loss_one,
            "loss_ddp": loss_ddp,
            "n_parameters": len(grads_one),
            "same_parameters": sorted(grads_one) == sorted(grads_ddp),
            "max_gradient_gap": max(float((grads_one[name] - grads_ddp[name]).abs().max()) for name in grads_one),
            "max_gradient": max(float(g.abs().max()) for g in grads_one.values()),
        }
    gathered = world.all_objects(report)
    if world.is_main:
        Path(out).write_text(json.dumps({"world_size": world.size, "ranks": gathered}, indent=1))
    distributed.finish(world)


class Killed(Exception):
    """Stands in for SIGKILL right after an epoch's state was saved."""


def killed_train(params_file: str, data: str, out: str, epoch: str) -> None:
    from pipeline import train
    from pipeline.training.checkpoints import Resume

    save = Resume.save

    def save_then_die(self, **state):
        save(self, **state)  # rank 0 writes, the others do nothing
        if state["epoch"] == int(epoch):
            torch.distributed.barrier()  # rank 0's state is on disk before any rank dies
            raise Killed(f"killed after epoch {epoch}")

    Resume.save = save_then_die
    out = Path(out)
    train.main(params_file=Path(params_file), data=Path(data), out=out / "model", reports=out / "reports", timing=out / "timing.json")


if __name__ == "__main__":
    command, *args = sys.argv[1:]
    {"steps": steps, "killed-train": killed_train}[command](*args)
