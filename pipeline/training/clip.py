"""CLIP dual-encoder training: symmetric InfoNCE over image/caption batches, learnable temperature.

From scratch for the tiny model, fine-tuning for pretrained weights: the same loop. Validation
recall (text<->image on the val split) after each epoch picks the best checkpoint.
Sources without captions train on class prompts (template x class name), as FLYP does.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from open_clip.loss import ClipLoss
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from pipeline.distributed import RankShare, World, wrap_ddp
from pipeline.prepared import Prepared
from pipeline.metrics import tasks
from pipeline.metrics.retrieval import ContentMatches, recall_at_k
from pipeline.models import LoadedModel
from pipeline.models.encode import PreprocessedImages, autocast, encode_image_batches, encode_tokens
from pipeline.params import RuntimeParams, TrainParams
from pipeline.pixels import SampleTransform
from pipeline.training.augment import PerSampleRandom, decode_once
from pipeline.training.checkpoints import Resume, TrainResult
from pipeline.training.loop import Phase, fit
from pipeline.training.optim import build_optimizer, param_groups, seed_everything

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
    """Recall@1/5/10 both ways on the val split, plus their mean (the model-selection score), by
    the evaluate stage's rule: identical caption strings and identical images are one candidate.

    Made once per run: the val images are preprocessed once (kept in memory when they fit in
    `image_cache_mb`) and the distinct caption strings tokenised once, so each epoch's validation is
    forward passes."""

    def __init__(self, loaded: LoadedModel, prepared: Prepared, split: str = "val", batch_size: int = 256, image_cache_mb: float = 0.0):
        self.loaded, self.split, self.batch_size = loaded, split, batch_size
        self.images, captions = captions_by_image(prepared, split)
        flat = [c for caps in captions for c in caps]
        text_image = np.repeat(np.arange(len(self.images)), [len(c) for c in captions])
        # A candidate is its content, as in evaluate: class prompts shared by a class's images are one caption each.
        self.matches = ContentMatches.build(text_image, flat, self.images["content_hash"])
        # Each distinct string is tokenised once per run and encoded once per validation (in order
        # of first appearance, as `text_content` numbers them); every caption row takes its string's.
        self.tokens = loaded.tokenizer(list(pd.unique(pd.Series(flat, dtype=object))))
        self.pixels = PreprocessedImages(loaded, prepared.image_paths(self.images), batch_size, max_mb=image_cache_mb)

    @property
    def empty(self) -> bool:
        return self.images.empty

    def __call__(self) -> dict | None:
        if self.empty:
            return None
        self.loaded.model.eval()
        image_emb = encode_image_batches(self.loaded, self.pixels, desc=f"{self.split} images")
        text_emb = encode_tokens(self.loaded, self.tokens, self.batch_size, desc=f"{self.split} texts")[self.matches.text_content]
        recalls = recall_at_k(image_emb, text_emb, self.matches, (1, 5, 10))
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


class ClipMethod:
    """CLIP's contrastive training of both towers on (image, caption) batches, for `loop.fit`.

    The best checkpoint is the one with the highest mean text<->image recall on the val split."""

    score = "mean_recall"

    def __init__(self, loaded: LoadedModel, prepared: Prepared, params: TrainParams, runtime: RuntimeParams, world: World):
        self.loaded, self.params, self.world = loaded, params, world
        images, captions = captions_by_image(prepared, "train")
        if images.empty:
            raise ValueError("train.method 'clip' needs a train split with captions or class labels; the prepared data has none")
        decoded = decode_once(prepared.image_paths(images), runtime, world, "train")
        sample_transform, self.normalise = loaded.train_pixels
        self.pairs = ImageCaptionPairs(decoded, captions, loaded.tokenizer, sample_transform, params.seed)
        batch_size = min(params.batch_size, len(self.pairs))
        if batch_size % world.size:
            raise ValueError(f"train.batch_size {batch_size} does not split evenly over {world.size} processes (runtime.processes)")
        self.shuffle = torch.Generator().manual_seed(params.seed)
        self.generators, self.numpy_rngs = {"shuffle": self.shuffle}, {}
        # Global batches drawn in the main process, whatever the workers; a tiny last batch is dropped
        # (it gives a noisy contrastive loss). Each rank loads its share of every batch.
        batches = BatchSampler(RandomSampler(self.pairs, generator=self.shuffle), batch_size, drop_last=True)
        self.loader = DataLoader(
            self.pairs,
            batch_sampler=RankShare(batches, world),
            num_workers=runtime.num_workers,
            generator=self.shuffle,  # as DataLoader(shuffle=True) would: worker seeds come from it too
            persistent_workers=False,  # workers must see `pairs.epoch`, set before each epoch
        )
        self.loss_fn = global_clip_loss(world)
        self.replica = wrap_ddp(loaded.model, world)
        # Rank 0 alone validates; its val images are preprocessed once for the whole run.
        self.validation = Validation(loaded, prepared, image_cache_mb=runtime.image_cache_mb) if world.is_main else None
        self.has_val = not captions_by_image(prepared, "val")[0].empty  # known on every rank

    def phases(self) -> list[Phase]:
        model, params = self.loaded.model, self.params
        return [Phase("train", range(1, params.epochs + 1), lambda: build_optimizer(param_groups(model, params.weight_decay), params.optimizer, params.lr))]

    def steps_per_epoch(self) -> int:
        return len(self.loader)

    def batches(self, epoch: int):
        self.pairs.epoch = epoch
        for image, tokens in self.loader:
            yield self.normalise(image.to(self.loaded.device, non_blocking=True)), tokens.to(self.loaded.device, non_blocking=True)

    def step_loss(self, batch) -> torch.Tensor:
        image, tokens = batch
        return clip_step_loss(self.replica, self.loss_fn, image, tokens)

    def train_mode(self) -> None:
        self.loaded.model.train()

    def after_step(self) -> None:
        with torch.no_grad():
            self.loaded.model.logit_scale.clamp_(0, MAX_LOGIT_SCALE)

    def epoch_values(self) -> dict:
        return {"temperature": float(1.0 / self.loaded.model.logit_scale.exp().item())}

    def can_validate(self) -> bool:
        return self.has_val

    def validate(self) -> dict:
        return self.validation()


def train_clip(
    loaded: LoadedModel, prepared: Prepared, params: TrainParams, resume: Resume = Resume(), runtime: RuntimeParams = RuntimeParams(),
    world: World = World(), on_epoch=None,
) -> TrainResult:  # fmt: skip
    seed_everything(params.seed)
    return fit(ClipMethod(loaded, prepared, params, runtime, world), loaded, params, resume, world, on_epoch)
