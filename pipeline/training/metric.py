"""Metric learning on the image tower: Siamese (contrastive loss on pairs) and triplet (projection
head, online-mined triplets from P x K class-balanced batches).

Both embed images L2-normalised, so Euclidean distances lie in [0, 2]. Validation loss after each
epoch drives early stopping and picks the best checkpoint; validation precision@1 and MAP@R are
logged beside it. The text tower is not trained.
"""

from __future__ import annotations

import math
import time
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler
from tqdm import tqdm  # not tqdm.auto, whose asyncio class calls iter() twice: DataLoader workers would start twice

from pipeline.distributed import RankShare, World, gather_rows, wrap_ddp
from pipeline.prepared import Prepared
from pipeline.metrics.metric_learning import accuracy_at_r, self_excluded_neighbours
from pipeline.metrics.tasks import has_pairs
from pipeline.metrics.verification import make_pairs
from pipeline.models import LoadedModel
from pipeline.models.encode import PreprocessedImages, autocast, encode_image_batches
from pipeline.models.heads import ProjectionHead, unfreeze_last_blocks
from pipeline.params import RuntimeParams, TrainParams
from pipeline.pixels import SampleTransform, split_transform
from pipeline.training.augment import PerSampleRandom, augmented, decode_once
from pipeline.training.checkpoints import Resume, TrainResult, capture_rng, restore_rng, result_from_state, result_state, snapshot, snapshot_on_main
from pipeline.training.losses import all_triplets_loss, contrastive_loss, pair_distance, triplet_margin_loss
from pipeline.training.miners import mine_triplets
from pipeline.training.optim import build_optimizer, cosine_with_warmup, seed_everything
from pipeline.training.progress import epoch_line
from pipeline.training.samplers import PKBatchSampler, sample_pairs

MAX_VAL_IMAGES = 2000  # validation mines over all pairs of val images: O(n^2) memory


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


def siamese_step_loss(embedder: torch.nn.Module, a: torch.Tensor, b: torch.Tensor, same: torch.Tensor, margin: float, world: World = World()) -> torch.Tensor:
    """Contrastive loss over the global batch of pairs (every rank's pair distances gathered)."""
    both = embedder(torch.cat([a, b]))  # one forward pass for both sides
    distances = pair_distance(both[: len(a)], both[len(a) :])
    return contrastive_loss(gather_rows(distances, world), gather_rows(same.float(), world), margin)


def triplet_step_loss(
    embedder: torch.nn.Module, pixels: torch.Tensor, labels: torch.Tensor, mining: str, margin: float, world: World = World()
) -> torch.Tensor:
    """Triplets mined within the global batch: every rank's embeddings and labels gathered first."""
    embeddings, labels = gather_rows(embedder(pixels), world), gather_rows(labels, world)
    anchors, positives, negatives = mine_triplets(embeddings.detach(), labels, mining, margin)
    return triplet_margin_loss(embeddings, anchors, positives, negatives, margin)


class Validator:
    """Validation loss (for early stopping / best checkpoint) and retrieval quality on the val split."""

    def __init__(self, loaded: LoadedModel, prepared: Prepared, params: TrainParams, batch_size: int = 256, image_cache_mb: float = 0.0):
        self.loaded, self.params = loaded, params
        self.images = labelled_split(prepared, "val", MAX_VAL_IMAGES, params.seed)
        self.labels = self.images["label"].to_numpy().astype(np.int64)
        # Preprocessed once when they fit: validation runs after every epoch.
        self.loader = PreprocessedImages(loaded, prepared.image_paths(self.images), batch_size, max_mb=image_cache_mb)
        self.usable = has_pairs(self.labels)
        if self.usable and params.method == "siamese":
            # Fixed pairs, so epochs are compared on the same validation task.
            self.pairs = make_pairs(self.labels, seed=params.seed)

    def __call__(self) -> dict:
        self.loaded.model.eval()
        if self.loaded.image_head is not None:
            self.loaded.image_head.eval()
        emb = torch.from_numpy(encode_image_batches(self.loaded, self.loader, desc="val images"))
        labels = torch.from_numpy(self.labels)
        if self.params.method == "siamese":
            i, j, same = (torch.from_numpy(np.asarray(a)) for a in self.pairs)
            loss = contrastive_loss(pair_distance(emb[i], emb[j]), same.float(), self.params.siamese.margin)
        else:
            # Every valid triplet of the val split, whatever the training miner: a batch-hard
            # val loss sits at the margin when embeddings collapse and hides real progress.
            loss = all_triplets_loss(emb, labels, self.params.triplet.margin)
        counts = np.bincount(self.labels)[self.labels] - 1
        neighbour_labels, relevant = self_excluded_neighbours(emb.numpy(), self.labels, k=int(max(counts.max(), 1)))
        quality = accuracy_at_r(neighbour_labels, self.labels, relevant)
        return {"val_loss": float(loss), "precision_at_1": quality["precision_at_1"], "map_at_r": quality["map_at_r"]}


class EarlyStopping:
    """Best = lowest validation loss; stop after `patience` validations without an improvement > min_delta."""

    def __init__(self, patience: int, min_delta: float):
        self.patience, self.min_delta = patience, min_delta
        self.best = math.inf
        self.bad_rounds = 0

    def improved(self, loss: float) -> bool:
        if loss < self.best - self.min_delta:
            self.best, self.bad_rounds = loss, 0
            return True
        self.bad_rounds += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_rounds >= self.patience


def _run_epochs(
    loaded: LoadedModel,
    params: TrainParams,
    epochs: range,
    make_batches: Callable[[int], DataLoader],
    step_loss: Callable[[torch.nn.Module, tuple], torch.Tensor],
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    validator: Validator,
    stopper: EarlyStopping,
    result: TrainResult,
    set_train_mode: Callable[[], None],
    run: "RunState",
    phase: str = "train",
    world: World = World(),
) -> bool:
    """Shared epoch loop; returns False when early stopping ended training.

    `step_loss(embedder, batch)` gets the image embedder (its DDP replica under torchrun, wrapped
    here because each phase trains other parameters). After each epoch the whole state goes to
    `run.resume`; `run.state`, when it was saved in this phase, continues the loop after its epoch.
    """
    scheduler = cosine_with_warmup(optimizer, total_steps, params.warmup_fraction)
    if result.stopped_early_at is not None:  # resumed from the epoch that stopped the run
        return False
    if run.state is not None and run.state["phase"] == phase:
        optimizer.load_state_dict(run.state["optimizer"])
        scheduler.load_state_dict(run.state["scheduler"])
        epochs = range(run.state["epoch"] + 1, epochs.stop)
    trainable = [p for group in optimizer.param_groups for p in group["params"]]
    embedder = wrap_ddp(ImageEmbedder(loaded), world)
    for epoch in epochs:
        set_train_mode()
        start, losses = time.perf_counter(), []
        for batch in tqdm(make_batches(epoch), desc=f"epoch {epoch}/{params.epochs}", leave=False, disable=None if world.is_main else True):
            with autocast(loaded.device):
                loss = step_loss(embedder, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 5.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
        row = {"epoch": epoch, "loss": float(np.mean(losses)) if losses else float("nan"), "lr": scheduler.get_last_lr()[0]}
        row["epoch_s"] = round(time.perf_counter() - start, 3)
        score = None
        if validator.usable and (epoch % params.val_every == 0 or epoch == params.epochs):
            # Rank 0 validates (the weights are the same on every rank); the others wait for its row.
            val = world.on_main(validator)
            row["val_loss"] = val["val_loss"]
            result.val_rows.append({"epoch": epoch, **val})
            score = ("map_at_r", val["map_at_r"])
            if stopper.improved(val["val_loss"]):
                result.best, result.best_epoch = snapshot_on_main(world, loaded.model, epoch, loaded.image_head), epoch
        if world.is_main:
            epoch_line(epoch, params.epochs, row["loss"], time.perf_counter() - start, score)
        result.loss_rows.append(row)
        if params.checkpoint_every and epoch % params.checkpoint_every == 0 and world.is_main:
            result.periodic[f"epoch-{epoch:04d}.pt"] = snapshot(loaded.model, epoch, loaded.image_head)
        if stopper.should_stop:
            result.stopped_early_at = epoch
            result.notes.append(f"early stopping at epoch {epoch}: no val_loss improvement > {params.min_delta} for {params.patience} validations")
        run.save(epoch, phase, loaded, optimizer, scheduler, result, stopper)
        if result.stopped_early_at is not None:
            return False
    return True


class RunState:
    """A metric-learning run's link to `Resume`: restores a saved state, saves one after each epoch."""

    def __init__(self, resume: Resume, numpy_rngs: dict[str, np.random.Generator]):
        self.resume, self.numpy_rngs = resume, numpy_rngs
        self.state = resume.load()

    def restore(self, loaded: LoadedModel, stopper: EarlyStopping) -> TrainResult:
        """The result so far (empty when starting fresh); weights, stopper and random states restored."""
        if self.state is None:
            return TrainResult(best={}, last={}, best_epoch=0)
        loaded.model.load_state_dict(self.state["model"])
        if loaded.image_head is not None:
            loaded.image_head.load_state_dict(self.state["head"])
        stopper.best, stopper.bad_rounds = self.state["stopper"]["best"], self.state["stopper"]["bad_rounds"]
        restore_rng(self.state["rng"], {}, self.numpy_rngs)
        return result_from_state(self.state["result"])

    def save(self, epoch: int, phase: str, loaded: LoadedModel, optimizer, scheduler, result: TrainResult, stopper: EarlyStopping) -> None:
        self.resume.save(
            epoch=epoch, phase=phase, model=loaded.model.state_dict(),
            head=None if loaded.image_head is None else loaded.image_head.state_dict(),
            optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), result=result_state(result),
            stopper={"best": stopper.best, "bad_rounds": stopper.bad_rounds}, rng=capture_rng({}, self.numpy_rngs),
        )  # fmt: skip


def _finish(loaded: LoadedModel, params: TrainParams, result: TrainResult, validator: Validator, last_epoch: int, world: World) -> TrainResult:
    result.last = snapshot_on_main(world, loaded.model, last_epoch, loaded.image_head)
    if not validator.usable:
        result.notes.append("no usable val split (needs 2+ labelled classes): the best checkpoint is the last one")
        result.best, result.best_epoch = result.last, last_epoch
    return result


def _training_images(prepared: Prepared) -> pd.DataFrame:
    images = labelled_split(prepared, "train")
    if images["label"].nunique() < 2:
        raise ValueError("metric learning needs labelled train images of at least two classes; the prepared data has fewer")
    return images


def train_siamese(
    loaded: LoadedModel, prepared: Prepared, params: TrainParams, resume: Resume = Resume(), runtime: RuntimeParams = RuntimeParams(), world: World = World()
) -> TrainResult:
    seed_everything(params.seed)
    model, device, cfg = loaded.model, loaded.device, params.siamese
    images = _training_images(prepared)
    decoded, labels = decode_once(prepared.image_paths(images), runtime, world, "train"), images["label"].to_numpy().astype(np.int64)
    transform, normalise = split_transform(augmented(loaded.preprocess, params.augment))
    rng = np.random.default_rng(params.seed)
    random = PerSampleRandom(params.seed)

    # Only the image tower learns; the text tower is left as it was.
    for param in model.parameters():
        param.requires_grad_(False)
    for param in model.visual.parameters():
        param.requires_grad_(True)
    optimizer = build_optimizer([{"params": list(model.visual.parameters()), "weight_decay": params.weight_decay}], params.optimizer, params.lr)
    pairs_per_epoch = cfg.samples_per_class * len(np.unique(labels))
    steps = math.ceil(pairs_per_epoch / params.batch_size) * params.epochs

    def make_batches(epoch: int) -> DataLoader:
        first, second, same = sample_pairs(labels, cfg.samples_per_class, cfg.positive_ratio, rng)
        random.epoch = epoch
        pairs = ImagePairs(decoded, first, second, same, transform, random)
        shuffle = torch.Generator().manual_seed(params.seed + epoch)
        batches = BatchSampler(RandomSampler(pairs, generator=shuffle), params.batch_size, drop_last=False)
        # generator: as DataLoader(shuffle=True) would, worker seeds come from it too
        return DataLoader(pairs, batch_sampler=RankShare(batches, world), num_workers=runtime.num_workers, generator=shuffle)

    def step_loss(embedder, batch) -> torch.Tensor:
        a, b, same = (t.to(device, non_blocking=True) for t in batch)
        a, b = normalise(a), normalise(b)
        return siamese_step_loss(embedder, a, b, same, cfg.margin, world)

    validator = Validator(loaded, prepared, params, image_cache_mb=runtime.image_cache_mb)
    stopper = EarlyStopping(params.patience, params.min_delta)
    run = RunState(resume, {"pairs": rng})
    result = run.restore(loaded, stopper)
    finished = _run_epochs(
        loaded, params, range(1, params.epochs + 1), make_batches, step_loss, optimizer, steps, validator, stopper, result, model.train, run,
        world=world,
    )  # fmt: skip
    return _finish(loaded, params, result, validator, params.epochs if finished else result.stopped_early_at, world)


def train_triplet(
    loaded: LoadedModel, prepared: Prepared, params: TrainParams, resume: Resume = Resume(), runtime: RuntimeParams = RuntimeParams(), world: World = World()
) -> TrainResult:
    seed_everything(params.seed)
    model, device, cfg = loaded.model, loaded.device, params.triplet
    images = _training_images(prepared)
    decoded, labels = decode_once(prepared.image_paths(images), runtime, world, "train"), images["label"].to_numpy().astype(np.int64)
    transform, normalise = split_transform(augmented(loaded.preprocess, params.augment))
    dataset = LabelledImages(decoded, labels, transform, params.seed)
    sampler = PKBatchSampler(labels, cfg.classes_per_batch, cfg.images_per_class, params.seed)
    loaded.image_head = ProjectionHead(loaded.tower_dim, cfg.head_dim).to(device)
    for param in model.parameters():
        param.requires_grad_(False)

    def make_batches(epoch: int) -> DataLoader:
        sampler.set_epoch(epoch)
        dataset.random.epoch = epoch
        return DataLoader(dataset, batch_sampler=RankShare(sampler, world), num_workers=runtime.num_workers)

    def step_loss(embedder, batch) -> torch.Tensor:
        pixels, batch_labels = normalise(batch[0].to(device, non_blocking=True)), batch[1].to(device)
        return triplet_step_loss(embedder, pixels, batch_labels, cfg.mining, cfg.margin, world)

    def train_mode() -> None:
        # Frozen blocks stay in eval mode, so their batch-norm statistics do not drift.
        model.eval()
        loaded.image_head.train()
        for module in tail_modules:
            module.train()

    validator = Validator(loaded, prepared, params, image_cache_mb=runtime.image_cache_mb)
    stopper = EarlyStopping(params.patience, params.min_delta)
    run = RunState(resume, {})
    result = run.restore(loaded, stopper)
    steps_per_epoch = len(sampler)
    head_epochs = min(cfg.head_epochs, params.epochs)
    last_epoch = params.epochs

    # Stage 1: the head alone on the frozen tower.
    tail_modules: list[torch.nn.Module] = []
    head_group = {"params": list(loaded.image_head.parameters()), "weight_decay": params.weight_decay}
    if head_epochs and (run.state is None or run.state["phase"] == "head"):
        optimizer = build_optimizer([head_group], params.optimizer, params.lr)
        finished = _run_epochs(
            loaded, params, range(1, head_epochs + 1), make_batches, step_loss, optimizer, steps_per_epoch * head_epochs,
            validator, stopper, result, train_mode, run, phase="head", world=world,
        )
        if not finished:
            return _finish(loaded, params, result, validator, result.stopped_early_at, world)
    # Stage 2: the last N blocks too, at a lower learning rate.
    if params.epochs > head_epochs:
        tail_params, tail_modules = unfreeze_last_blocks(model.visual, cfg.unfreeze_blocks)
        groups = [head_group]
        if tail_params:
            groups.append({"params": tail_params, "weight_decay": params.weight_decay, "lr": params.lr * cfg.backbone_lr_scale})
        optimizer = build_optimizer(groups, params.optimizer, params.lr)
        finished = _run_epochs(
            loaded, params, range(head_epochs + 1, params.epochs + 1), make_batches, step_loss, optimizer,
            steps_per_epoch * (params.epochs - head_epochs), validator, stopper, result, train_mode, run, phase="tail", world=world,
        )
        last_epoch = params.epochs if finished else result.stopped_early_at
    result.notes.append(f"triplet: {head_epochs} head-only epochs, then the last {cfg.unfreeze_blocks} tower blocks at lr x {cfg.backbone_lr_scale}")
    return _finish(loaded, params, result, validator, last_epoch, world)
