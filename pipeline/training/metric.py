"""Metric learning on the image tower: Siamese (contrastive loss on pairs) and triplet (projection
head, online-mined triplets from P x K class-balanced batches), with pytorch-metric-learning's
losses, miners and sampler (losses.py, miners.py, samplers.py) in the shared loop (loop.py).

Both embed images L2-normalised, so Euclidean distances lie in [0, 2]. MAP@R on the val split
after each epoch picks the best checkpoint and drives early stopping, as the library's own
trainers do with their `primary_metric`; precision@1 is logged beside it. The text tower is not
trained.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler

from pipeline.distributed import RankShare, World, gather_rows, wrap_ddp
from pipeline.prepared import Prepared
from pipeline.metrics.metric_learning import accuracy_at_r, self_excluded_neighbours
from pipeline.metrics.tasks import has_pairs
from pipeline.models import LoadedModel
from pipeline.models.encode import PreprocessedImages, encode_image_batches, image_loader
from pipeline.models.heads import ProjectionHead, unfreeze_last_blocks
from pipeline.params import RuntimeParams, TrainParams
from pipeline.pixels import SampleTransform, split_transform
from pipeline.training.augment import PerSampleRandom, augmented, decode_once
from pipeline.training.checkpoints import Resume, TrainResult
from pipeline.training.losses import contrastive_loss, pair_indices, triplet_loss
from pipeline.training.loop import Phase, fit
from pipeline.training.miners import make_miner
from pipeline.training.optim import build_optimizer, seed_everything
from pipeline.training.samplers import PKBatchSampler, sample_pairs

MAX_VAL_IMAGES = 2000  # validation ranks every val image against the others: O(n^2) memory
BATCHNORM_IMAGES = 2000  # training images that estimate a random tower's batch-norm statistics


def estimate_batchnorm_statistics(loaded: LoadedModel, prepared: Prepared, seed: int, batch_size: int = 256, num_workers: int = 0) -> bool:
    """Set the image tower's batch-norm running statistics from training images (torch's
    `swa_utils.update_bn`: a cumulative average over one pass), for a tower whose weights are random.

    Triplet training keeps frozen blocks in eval mode, where batch norm uses its running statistics.
    Those of a randomly initialised tower are the init's (mean 0, variance 1), never estimated: with
    them the tiny ResNet shrinks the spread between images 2.5-4x per stage, every image reaches the
    head at nearly one point, and the head-only epochs sit at the margin. A pretrained tower's
    statistics are kept. Returns whether there was batch norm to set (a ViT has none).
    """
    from torch.optim.swa_utils import update_bn

    visual = loaded.model.visual
    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in visual.modules()):
        return False
    images = labelled_split(prepared, "train", BATCHNORM_IMAGES, seed)
    normalise = loaded.eval_pixels[1]
    batches = image_loader(loaded, prepared.image_paths(images), batch_size, num_workers)
    with torch.no_grad():
        update_bn((normalise(batch.to(loaded.device)) for batch in batches), visual, device=loaded.device)
    visual.eval()
    return True


class LabelledImages(Dataset):
    """(uint8 pixels, label) of decoded images; augmentations drawn per sample from (seed, epoch, index)."""

    def __init__(self, images: Sequence, labels, transform: SampleTransform, seed: int = 0):
        self.images, self.labels, self.transform = images, np.asarray(labels), transform
        self.random = PerSampleRandom(seed)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.random.pixels(index, self.transform, self.images[index]), int(self.labels[index])


class ImagePairs(Dataset):
    """(pixels a, pixels b, same) of decoded images; both augmentations drawn from the pair's own seed."""

    def __init__(self, images: Sequence, first, second, same, transform: SampleTransform, random: PerSampleRandom):
        self.images, self.first, self.second, self.same, self.transform = images, first, second, same, transform
        self.random = random

    def __len__(self) -> int:
        return len(self.first)

    def __getitem__(self, index: int):
        a, b = self.first[index], self.second[index]
        return (*self.random(index, self._both, a, b), float(self.same[index]))

    def _both(self, a: int, b: int):
        return self.transform(self.images[a]), self.transform(self.images[b])


def labelled_split(prepared: Prepared, split: str, limit: Optional[int] = None, seed: int = 0) -> pd.DataFrame:
    images = prepared.images[(prepared.images["split"] == split) & prepared.images["label"].notna()]
    if limit is not None and len(images) > limit:
        images = images.sample(n=limit, random_state=seed)
    return images.reset_index(drop=True)


class ImageEmbedder(torch.nn.Module):
    """L2-normalised image embeddings with gradients: the tower, through the head when there is one.

    One module over both, so DDP can average the gradients of whatever part of it is trainable.
    """

    def __init__(self, loaded: LoadedModel):
        super().__init__()
        self.model, self.head = loaded.model, loaded.image_head

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.model.encode_image(images)
        if self.head is not None:
            features = self.head(features)
        return F.normalize(features.float(), dim=-1)


def siamese_step_loss(embedder: torch.nn.Module, loss_fn, a: torch.Tensor, b: torch.Tensor, same: torch.Tensor, world: World = World()) -> torch.Tensor:
    """Contrastive loss over the global batch of pairs: every rank's embeddings gathered (with
    their gradients), pair i joining row i of the a-half to row i of the b-half."""
    both = embedder(torch.cat([a, b]))  # one forward pass for both sides
    first, second, same = gather_rows(both[: len(a)], world), gather_rows(both[len(a) :], world), gather_rows(same.float(), world)
    return loss_fn(torch.cat([first, second]), indices_tuple=pair_indices(same))


def triplet_step_loss(embedder: torch.nn.Module, loss_fn, miner, pixels: torch.Tensor, labels: torch.Tensor, world: World = World()) -> torch.Tensor:
    """Triplets mined within the global batch: every rank's embeddings and labels gathered first."""
    embeddings, labels = gather_rows(embedder(pixels), world), gather_rows(labels, world)
    triplets = None if miner is None else miner(embeddings.detach(), labels)
    return loss_fn(embeddings, labels, triplets)


class Validator:
    """Precision@1 and MAP@R of the val images among themselves (the score that picks the best checkpoint)."""

    def __init__(self, loaded: LoadedModel, prepared: Prepared, params: TrainParams, batch_size: int = 256, image_cache_mb: float = 0.0):
        self.loaded = loaded
        self.images = labelled_split(prepared, "val", MAX_VAL_IMAGES, params.seed)
        self.labels = self.images["label"].to_numpy().astype(np.int64)
        # Preprocessed once when they fit: validation runs after every epoch.
        self.loader = PreprocessedImages(loaded, prepared.image_paths(self.images), batch_size, max_mb=image_cache_mb)
        self.usable = has_pairs(self.labels)

    def __call__(self) -> dict:
        self.loaded.model.eval()
        if self.loaded.image_head is not None:
            self.loaded.image_head.eval()
        emb = encode_image_batches(self.loaded, self.loader, desc="val images")
        counts = np.bincount(self.labels)[self.labels] - 1
        neighbour_labels, relevant = self_excluded_neighbours(emb, self.labels, k=int(max(counts.max(), 1)))
        quality = accuracy_at_r(neighbour_labels, self.labels, relevant)
        return {"precision_at_1": quality["precision_at_1"], "map_at_r": quality["map_at_r"]}


FEW_VALIDATION_CLASSES = 5


def few_validation_classes(prepared: Prepared) -> Optional[str]:
    """A warning when the val split holds fewer than `FEW_VALIDATION_CLASSES` classes: MAP@R over
    two or three identities swings from epoch to epoch with the model's state, so the epoch it
    picks for best.pt says little about the test identities. None when there are enough."""
    n = labelled_split(prepared, "val")["label"].nunique()
    if n == 0 or n >= FEW_VALIDATION_CLASSES:
        return None
    return (
        f"the val split holds {n} class(es): MAP@R over so few identities is a noisy score to pick best.pt and to stop by; "
        f"give val at least {FEW_VALIDATION_CLASSES} classes (data.splits.val; README: Metric learning)"
    )


def _training_images(prepared: Prepared) -> pd.DataFrame:
    images = labelled_split(prepared, "train")
    if images["label"].nunique() < 2:
        raise ValueError("metric learning needs labelled train images of at least two classes; the prepared data has fewer")
    return images


class _MetricMethod:
    """What Siamese and triplet training share: the image embedder, validation, no extra epoch values."""

    score = "map_at_r"

    def __init__(self, loaded: LoadedModel, prepared: Prepared, params: TrainParams, runtime: RuntimeParams, world: World):
        self.loaded, self.params, self.runtime, self.world = loaded, params, runtime, world
        self.device = loaded.device
        images = _training_images(prepared)
        self.decoded = decode_once(prepared.image_paths(images), runtime, world, "train")
        self.labels = images["label"].to_numpy().astype(np.int64)
        self.transform, self.normalise = split_transform(augmented(loaded.preprocess, params.augment))
        self.validator = Validator(loaded, prepared, params, image_cache_mb=runtime.image_cache_mb)
        self.generators: dict[str, torch.Generator] = {}
        self.numpy_rngs: dict[str, np.random.Generator] = {}
        self.embedder: Optional[torch.nn.Module] = None

    def wrap(self) -> None:
        """A fresh DDP replica of the embedder: each phase trains other parameters."""
        self.embedder = wrap_ddp(ImageEmbedder(self.loaded), self.world)

    def after_step(self) -> None:
        pass

    def epoch_values(self) -> dict:
        return {}

    def can_validate(self) -> bool:
        return self.validator.usable

    def validate(self) -> dict:
        return self.validator()


class SiameseMethod(_MetricMethod):
    """The image tower trained on labelled pairs, re-drawn every epoch, with the contrastive loss."""

    def __init__(self, *args):
        super().__init__(*args)
        cfg = self.params.siamese
        self.loss_fn = contrastive_loss(cfg.margin)
        self.rng = np.random.default_rng(self.params.seed)
        self.numpy_rngs = {"pairs": self.rng}
        self.random = PerSampleRandom(self.params.seed)
        self.pairs_per_epoch = cfg.samples_per_class * len(np.unique(self.labels))

    def phases(self) -> list[Phase]:
        model, params = self.loaded.model, self.params

        def start() -> torch.optim.Optimizer:
            # Only the image tower learns; the text tower is left as it was.
            for param in model.parameters():
                param.requires_grad_(False)
            for param in model.visual.parameters():
                param.requires_grad_(True)
            self.wrap()
            return build_optimizer([{"params": list(model.visual.parameters()), "weight_decay": params.weight_decay}], params.optimizer, params.lr)

        return [Phase("train", range(1, params.epochs + 1), start)]

    def steps_per_epoch(self) -> int:
        return math.ceil(self.pairs_per_epoch / self.params.batch_size)

    def batches(self, epoch: int):
        cfg = self.params.siamese
        first, second, same = sample_pairs(self.labels, cfg.samples_per_class, cfg.positive_ratio, self.rng)
        self.random.epoch = epoch
        pairs = ImagePairs(self.decoded, first, second, same, self.transform, self.random)
        shuffle = torch.Generator().manual_seed(self.params.seed + epoch)
        batches = BatchSampler(RandomSampler(pairs, generator=shuffle), self.params.batch_size, drop_last=False)
        # generator: as DataLoader(shuffle=True) would, worker seeds come from it too
        return DataLoader(pairs, batch_sampler=RankShare(batches, self.world), num_workers=self.runtime.num_workers, generator=shuffle)

    def step_loss(self, batch) -> torch.Tensor:
        a, b, same = (t.to(self.device, non_blocking=True) for t in batch)
        return siamese_step_loss(self.embedder, self.loss_fn, self.normalise(a), self.normalise(b), same, self.world)

    def train_mode(self) -> None:
        self.loaded.model.train()


class TripletMethod(_MetricMethod):
    """A projection head on the image tower, trained on mined triplets of P x K batches: first alone
    on the frozen tower (`head_epochs`), then with the last `unfreeze_blocks` tower blocks at
    lr x `backbone_lr_scale`."""

    def __init__(self, loaded: LoadedModel, prepared: Prepared, params: TrainParams, runtime: RuntimeParams, world: World):
        super().__init__(loaded, prepared, params, runtime, world)
        cfg = self.params.triplet
        self.loss_fn, self.miner = triplet_loss(cfg.margin), make_miner(cfg.mining, cfg.margin)
        self.dataset = LabelledImages(self.decoded, self.labels, self.transform, self.params.seed)
        self.sampler = PKBatchSampler(self.labels, cfg.classes_per_batch, cfg.images_per_class, self.params.seed)
        loaded.image_head = ProjectionHead(loaded.tower_dim, cfg.head_dim).to(self.device)
        for param in loaded.model.parameters():
            param.requires_grad_(False)
        self.tail_modules: list[torch.nn.Module] = []
        # Every rank estimates the same statistics from the same images; a resumed run's saved
        # state replaces them with the ones it trained with.
        self.batchnorm_estimated = loaded.pretrained == "none" and estimate_batchnorm_statistics(
            loaded, prepared, self.params.seed, num_workers=runtime.num_workers
        )

    def phases(self) -> list[Phase]:
        params, cfg, loaded = self.params, self.params.triplet, self.loaded
        head_epochs = min(cfg.head_epochs, params.epochs)
        head_group = {"params": list(loaded.image_head.parameters()), "weight_decay": params.weight_decay}

        def head_only() -> torch.optim.Optimizer:
            self.wrap()
            return build_optimizer([head_group], params.optimizer, params.lr)

        def with_tail() -> torch.optim.Optimizer:
            tail_params, self.tail_modules = unfreeze_last_blocks(loaded.model.visual, cfg.unfreeze_blocks)
            groups = [head_group]
            if tail_params:
                groups.append({"params": tail_params, "weight_decay": params.weight_decay, "lr": params.lr * cfg.backbone_lr_scale})
            self.wrap()
            return build_optimizer(groups, params.optimizer, params.lr)

        phases = []
        if head_epochs:
            phases.append(Phase("head", range(1, head_epochs + 1), head_only))
        if params.epochs > head_epochs:
            phases.append(Phase("tail", range(head_epochs + 1, params.epochs + 1), with_tail))
        return phases

    def steps_per_epoch(self) -> int:
        return len(self.sampler)

    def batches(self, epoch: int):
        self.sampler.set_epoch(epoch)
        self.dataset.random.epoch = epoch
        return DataLoader(self.dataset, batch_sampler=RankShare(self.sampler, self.world), num_workers=self.runtime.num_workers)

    def step_loss(self, batch) -> torch.Tensor:
        pixels, labels = self.normalise(batch[0].to(self.device, non_blocking=True)), batch[1].to(self.device)
        return triplet_step_loss(self.embedder, self.loss_fn, self.miner, pixels, labels, self.world)

    def train_mode(self) -> None:
        # Frozen blocks stay in eval mode, so their batch-norm statistics do not drift.
        self.loaded.model.eval()
        self.loaded.image_head.train()
        for module in self.tail_modules:
            module.train()


def train_siamese(
    loaded: LoadedModel, prepared: Prepared, params: TrainParams, resume: Resume = Resume(), runtime: RuntimeParams = RuntimeParams(),
    world: World = World(), on_epoch=None,
) -> TrainResult:  # fmt: skip
    seed_everything(params.seed)
    return fit(SiameseMethod(loaded, prepared, params, runtime, world), loaded, params, resume, world, on_epoch)


def train_triplet(
    loaded: LoadedModel, prepared: Prepared, params: TrainParams, resume: Resume = Resume(), runtime: RuntimeParams = RuntimeParams(),
    world: World = World(), on_epoch=None,
) -> TrainResult:  # fmt: skip
    seed_everything(params.seed)
    method = TripletMethod(loaded, prepared, params, runtime, world)
    result = fit(method, loaded, params, resume, world, on_epoch)
    cfg = params.triplet
    if method.batchnorm_estimated:
        result.notes.append("triplet: the random tower's batch-norm statistics were estimated on the training images before training")
    result.notes.append(f"triplet: {min(cfg.head_epochs, params.epochs)} head-only epochs, then the last {cfg.unfreeze_blocks} tower blocks at lr x {cfg.backbone_lr_scale}")
    return result
