"""CLIP dual-encoder training: symmetric InfoNCE over image/caption batches, learnable temperature.

From scratch for the tiny model, fine-tuning for pretrained weights: the same loop. Validation
recall (text<->image on the val split) after each epoch picks the best checkpoint.
Sources without captions train on class prompts (template x class name), as FLYP does.
"""

from __future__ import annotations

import math
import time
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from open_clip.loss import ClipLoss
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler
from tqdm import tqdm  # not tqdm.auto, whose asyncio class calls iter() twice: DataLoader workers would start twice

from pipeline.distributed import RankShare, World, wrap_ddp
from pipeline.prepared import Prepared
from pipeline.metrics import tasks
from pipeline.metrics.retrieval import recall_at_k
from pipeline.models import LoadedModel
from pipeline.models.encode import PreprocessedImages, autocast, encode_image_batches, encode_texts
from pipeline.params import RuntimeParams, TrainParams
from pipeline.pixels import SampleTransform
from pipeline.training.augment import PerSampleRandom, decode_once
from pipeline.training.checkpoints import Resume, TrainResult, capture_rng, restore_rng, result_from_state, result_state, snapshot, snapshot_on_main
from pipeline.training.optim import build_optimizer, cosine_with_warmup, param_groups, seed_everything
from pipeline.training.progress import epoch_line

MAX_LOGIT_SCALE = math.log(100)  # CLIP clamps the temperature so logits stay <= 100


def captions_by_image(prepared: Prepared, split: str) -> tuple[pd.DataFrame, list[list[str]]]:
    """Images of one split with their captions; class prompts stand in when the source has none."""
    images = prepared.images[prepared.images["split"] == split].reset_index(drop=True)
    if prepared.captions is not None:
        grouped = prepared.captions.groupby("image_id")["caption"].apply(list)
        images = images[images["image_id"].isin(grouped.index)].reset_index(drop=True)
        return images, [grouped[i] for i in images["image_id"]]
    images = images[images["label"].notna()].reset_index(drop=True)
    names = prepared.class_names
    return images, [[t.format(names[int(label)]) for t in prepared.templates] for label in images["label"]]


class ImageCaptionPairs(Dataset):
    """(image, one of its captions), the caption and the image's random crop drawn afresh each epoch
    from (seed, epoch, index): the same whatever the number of DataLoader workers, and whether the
    images are decoded once (`DecodedImages` in memory) or read from disk each time.

    Images come out as uint8 pixels; the training loop normalises whole batches."""

    def __init__(self, images: Sequence, captions: list[list[str]], tokenizer, transform: SampleTransform, seed: int):
        self.images = images
        flat = [c for caps in captions for c in caps]
        self.tokens = tokenizer(flat)  # tokenised once, not per step
        offsets = np.cumsum([0] + [len(c) for c in captions])
        self.first, self.count = offsets[:-1], np.diff(offsets)
        self.transform = transform
        self.seed = seed
        self.random = PerSampleRandom(seed)

    @property
    def epoch(self) -> int:
        return self.random.epoch

    @epoch.setter
    def epoch(self, epoch: int) -> None:
        self.random.epoch = epoch

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        rng = np.random.default_rng((self.seed, self.epoch, index))
        pick = rng.integers(self.count[index])
        return self.random.pixels(index, self.transform, self.images[index], rng), self.tokens[self.first[index] + pick]


class Validation:
    """Recall@1/5/10 both ways on the val split, plus their mean (the model-selection score).

    Made once per run: the val images are preprocessed once (kept in memory when they fit in
    `image_cache_mb`) and the captions tokenised once, so each epoch's validation is forward passes."""

    def __init__(self, loaded: LoadedModel, prepared: Prepared, split: str = "val", batch_size: int = 256, image_cache_mb: float = 0.0):
        self.loaded, self.split, self.batch_size = loaded, split, batch_size
        self.images, captions = captions_by_image(prepared, split)
        self.texts = [c for caps in captions for c in caps]
        self.text_image = np.repeat(np.arange(len(self.images)), [len(c) for c in captions])
        self.pixels = PreprocessedImages(loaded, prepared.image_paths(self.images), batch_size, max_mb=image_cache_mb)

    @property
    def empty(self) -> bool:
        return self.images.empty

    def __call__(self) -> dict | None:
        if self.empty:
            return None
        self.loaded.model.eval()
        image_emb = encode_image_batches(self.loaded, self.pixels, desc=f"{self.split} images")
        text_emb = encode_texts(self.loaded, self.texts, self.batch_size, desc=f"{self.split} texts")
        recalls = recall_at_k(image_emb, text_emb, self.text_image, (1, 5, 10))
        row = {f"{direction}_{k}": v for direction, ks in recalls.items() for k, v in ks.items()}
        row["mean_recall"] = float(np.mean(list(row.values())))
        # The image-only retrieval metrics the metric-learning methods log, so curves compare across methods.
        within = tasks.metric_learning(self.images, image_emb, self.split)
        if "skipped" not in within.metrics:
            row.update(precision_at_1=within.metrics["precision_at_1"], map_at_r=within.metrics["map_at_r"])
        return row


def validation_recall(loaded: LoadedModel, prepared: Prepared, split: str = "val", batch_size: int = 256) -> dict | None:
    """One validation of `loaded` (the untrained model's row for `train.method: none`)."""
    return Validation(loaded, prepared, split, batch_size)()


def clip_step_loss(model: torch.nn.Module, loss_fn: ClipLoss, image: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """The contrastive loss of one step; `model` may be the DDP replica, `loss_fn` gathers across ranks."""
    with autocast(image.device):
        image_features, text_features, logit_scale = model(image, tokens)[:3]
        return loss_fn(image_features, text_features, logit_scale)


def global_clip_loss(world: World) -> ClipLoss:
    """open_clip's loss over the global batch: features of every rank gathered with their gradients."""
    return ClipLoss(local_loss=False, gather_with_grad=True, rank=world.rank, world_size=world.size)


def train_clip(
    loaded: LoadedModel, prepared: Prepared, params: TrainParams, resume: Resume = Resume(), runtime: RuntimeParams = RuntimeParams(), world: World = World()
) -> TrainResult:
    seed_everything(params.seed)
    model, device = loaded.model, loaded.device
    images, captions = captions_by_image(prepared, "train")
    if images.empty:
        raise ValueError("train.method 'clip' needs a train split with captions or class labels; the prepared data has none")
    decoded = decode_once(prepared.image_paths(images), runtime, world, "train")
    sample_transform, normalise = loaded.train_pixels
    pairs = ImageCaptionPairs(decoded, captions, loaded.tokenizer, sample_transform, params.seed)
    batch_size = min(params.batch_size, len(pairs))
    if batch_size % world.size:
        raise ValueError(f"train.batch_size {batch_size} does not split evenly over {world.size} processes (runtime.processes)")
    shuffle = torch.Generator().manual_seed(params.seed)
    # Global batches drawn in the main process, whatever the workers; a tiny last batch is dropped
    # (it gives a noisy contrastive loss). Each rank loads its share of every batch.
    batches = BatchSampler(RandomSampler(pairs, generator=shuffle), batch_size, drop_last=True)
    loader = DataLoader(
        pairs,
        batch_sampler=RankShare(batches, world),
        num_workers=runtime.num_workers,
        generator=shuffle,  # as DataLoader(shuffle=True) would: worker seeds come from it too
        persistent_workers=False,  # workers must see `pairs.epoch`, set before each epoch
    )
    optimizer = build_optimizer(param_groups(model, params.weight_decay), params.optimizer, params.lr)
    scheduler = cosine_with_warmup(optimizer, params.epochs * len(loader), params.warmup_fraction)
    loss_fn = global_clip_loss(world)
    replica = wrap_ddp(model, world)
    # Rank 0 alone validates; its val images are preprocessed once for the whole run.
    validation = Validation(loaded, prepared, image_cache_mb=runtime.image_cache_mb) if world.is_main else None

    state = resume.load()
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        restore_rng(state["rng"], {"shuffle": shuffle}, {})
        result, best_score, has_val, first_epoch = result_from_state(state["result"]), state["best_score"], state["has_val"], state["epoch"] + 1
    else:
        result, best_score, first_epoch = TrainResult(best={}, last={}, best_epoch=0), -1.0, 1
        val = world.on_main(validation)
        has_val = val is not None
        if has_val:
            result.val_rows.append({"epoch": 0, **val})
        else:
            result.notes.append("no val split: the best checkpoint is the last one")

    for epoch in range(first_epoch, params.epochs + 1):
        model.train()
        pairs.epoch = epoch
        start, losses = time.perf_counter(), []
        for image, tokens in tqdm(loader, desc=f"epoch {epoch}/{params.epochs}", leave=False, disable=None if world.is_main else True):
            image, tokens = normalise(image.to(device, non_blocking=True)), tokens.to(device, non_blocking=True)
            loss = clip_step_loss(replica, loss_fn, image, tokens)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)
            losses.append(loss.item())
        result.loss_rows.append(
            {
                "epoch": epoch,
                "loss": float(np.mean(losses)),
                "lr": scheduler.get_last_lr()[0],
                "temperature": float(1.0 / model.logit_scale.exp().item()),
                "epoch_s": round(time.perf_counter() - start, 3),
            }
        )
        score = None
        if has_val and (epoch % params.val_every == 0 or epoch == params.epochs):
            # Rank 0 validates (the weights are the same on every rank); the others wait for its row.
            row = world.on_main(validation)
            result.val_rows.append({"epoch": epoch, **row})
            score = ("mean_recall", row["mean_recall"])
            if row["mean_recall"] > best_score:
                best_score, result.best_epoch = row["mean_recall"], epoch
                result.best = snapshot_on_main(world, model, epoch)
        if world.is_main:
            epoch_line(epoch, params.epochs, result.loss_rows[-1]["loss"], time.perf_counter() - start, score)
        if params.checkpoint_every and epoch % params.checkpoint_every == 0 and world.is_main:
            result.periodic[f"epoch-{epoch:04d}.pt"] = snapshot(model, epoch)
        resume.save(
            epoch=epoch, model=model.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
            rng=capture_rng({"shuffle": shuffle}, {}), result=result_state(result), best_score=best_score, has_val=has_val,
        )  # fmt: skip
    result.last = snapshot_on_main(world, model, params.epochs)
    if not has_val:
        result.best, result.best_epoch = result.last, params.epochs
    return result
