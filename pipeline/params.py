"""Typed, validated pipeline parameters: the one place that defines defaults and checks values.

`params.yaml` holds one section per stage concern (data, model, train, index, probe, evaluate),
which DVC tracks per stage (`dvc.yaml` declares the sections each stage reads), and `runtime`,
how the stages run (device, workers, batch size, processes, resume), which no stage declares, so changing it
reruns nothing. Unknown keys and bad values are errors that name the key, e.g. `train.lr: ...`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.errors import ParamsError  # noqa: F401 (callers import it from here too)

DEFAULT_PARAMS_FILE = Path("params.yaml")
PIL_MAX_IMAGE_PIXELS = 89_478_485  # PIL.Image.MAX_IMAGE_PIXELS: above it PIL warns, at twice it refuses
SPLITS = ("train", "val", "test")



class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, allow_inf_nan=False)  # lr: .inf trains to NaN


class SyntheticParams(_Section):
    n_classes: int = Field(8, ge=2, le=20)
    images_per_class: int = Field(150, ge=4)
    # Drawn after the others and put in the test split only (of the test classes, when
    # split_by: class): a test set large enough to compare runs, with the same train and val sets.
    extra_test_per_class: int = Field(50, ge=0)
    image_size: int = Field(64, ge=16, le=512)


class SplitRatios(_Section):
    train: float = Field(0.8, ge=0, le=1)
    val: float = Field(0.1, ge=0, le=1)
    test: float = Field(0.1, ge=0, le=1)

    @model_validator(mode="after")
    def _sum_to_one(self) -> "SplitRatios":
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"train + val + test must sum to 1, got {total:g}")
        return self


class DataParams(_Section):
    source: Literal[
        "synthetic", "imagenet", "flickr8k", "flickr30k", "mscoco", "cifar10", "cifar100", "folder", "webdataset"
    ] = "synthetic"
    # Where the raw dataset lives (ignored by `synthetic`). Relative paths are from the project root.
    # webdataset: a folder of .tar shards, one shard, or a brace pattern (`shards/{00000..00099}.tar`).
    root: Optional[str] = None
    seed: int = 0
    # Used where the source has no official split (folder, imagenet val, synthetic, webdataset:
    # by a seeded hash of each sample's key, so adding shards never moves a sample).
    splits: SplitRatios = SplitRatios()
    # image: every class is in every split (classification). class: the ratios apply to classes,
    # so test identities never appear in training (re-identification). folder and synthetic only.
    split_by: Literal["image", "class"] = "image"
    # Fraction of an official train split held out as `val` (cifar10, cifar100).
    val_fraction: float = Field(0.1, ge=0, lt=1)
    # Cap on images per split after splitting, for quick runs; null keeps all.
    max_images_per_split: Optional[int] = Field(None, ge=1)
    # Download public datasets (cifar10, cifar100, flickr8k) when `root` holds none and a network is
    # there. imagenet, flickr30k and mscoco are never downloaded (registration, a form, 13 GB).
    download: bool = True
    # Decode every image once while preparing; a bad one is handled per on_bad_image.
    check_images: bool = True
    # A missing, empty, truncated, corrupt or oversized image. fail: stop, naming the file and why.
    # skip: leave it out and record it in data/prepared/rejected.parquet (counted in the reports).
    on_bad_image: Literal["fail", "skip"] = "fail"
    # A malformed annotation line or entry (caption file, split file, ground truth), likewise.
    on_bad_annotation: Literal["fail", "skip"] = "fail"
    # Decompression-bomb limit: an image with more pixels (width x height, from its header) is bad.
    # At most PIL's own limit, which every later stage's image loading keeps.
    max_image_pixels: int = Field(PIL_MAX_IMAGE_PIXELS, ge=1, le=PIL_MAX_IMAGE_PIXELS)
    synthetic: SyntheticParams = SyntheticParams()

    @model_validator(mode="after")
    def _root_for_real_sources(self) -> "DataParams":
        if self.source != "synthetic" and not self.root:
            raise ValueError(f"data.root is required for source '{self.source}' (the raw dataset folder)")
        if self.split_by == "class" and self.source not in ("synthetic", "folder"):
            raise ValueError(f"data.split_by 'class' applies to synthetic and folder sources, not '{self.source}'")
        return self


class ModelParams(_Section):
    # An open_clip model name (`ViT-B-32`, ...) or the project's `clipline-tiny`.
    name: str = "clipline-tiny"
    # An open_clip hub tag (`openai`, `laion2b_s34b_b79k`), a local checkpoint path, or `none`.
    pretrained: str = "none"


class SiameseParams(_Section):
    # pytorch-metric-learning's contrastive loss on L2-normalised embeddings (d in [0, 2]): d for
    # same-class pairs, max(margin - d, 0) for the others, each averaged over its non-zero pairs.
    margin: float = Field(1.0, gt=0)
    # Pairs are re-drawn every epoch: this many anchors per class, each paired with an image of
    # the same class with probability positive_ratio, else with another class.
    samples_per_class: int = Field(64, ge=1)
    positive_ratio: float = Field(0.5, ge=0, le=1)


class TripletParams(_Section):
    margin: float = Field(0.2, gt=0)
    head_dim: int = Field(128, ge=2)
    # all: every valid triplet in the batch (pytorch-metric-learning's default); batch_hard:
    # BatchHardMiner; semi_hard: TripletMarginMiner(semihard). batch_hard can collapse every
    # embedding to one point when training starts from random weights.
    mining: Literal["batch_hard", "semi_hard", "all"] = "all"
    # P x K class-balanced batches: P classes, K images each.
    classes_per_batch: int = Field(8, ge=2)
    images_per_class: int = Field(8, ge=2)
    # Stage 1 trains the head on a frozen backbone; stage 2 also trains the last N blocks.
    head_epochs: int = Field(5, ge=0)
    unfreeze_blocks: int = Field(1, ge=0)
    backbone_lr_scale: float = Field(0.1, gt=0, le=1)


class TrainParams(_Section):
    method: Literal["none", "clip", "siamese", "triplet"] = "clip"
    epochs: int = Field(60, ge=1)
    batch_size: int = Field(64, ge=2)
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    seed: int = 0
    # Epochs between validation passes. Validation picks the best checkpoint by the method's score
    # (clip: mean text<->image recall; siamese, triplet: MAP@R on the val split).
    val_every: int = Field(1, ge=1)
    # Early stopping: stop after `patience` validations without that score improving by more
    # than `min_delta`. 0 disables it.
    patience: int = Field(0, ge=0)
    min_delta: float = Field(0.0, ge=0)
    # Clip the gradient norm of the trained parameters to this before each step (0: no clipping).
    grad_clip_norm: float = Field(0.0, ge=0)
    # Keep a checkpoint every N epochs besides best and last (0: none).
    checkpoint_every: int = Field(0, ge=0)
    # Horizontal flip and brightness/contrast jitter on training images (siamese, triplet).
    augment: bool = True
    siamese: SiameseParams = SiameseParams()
    triplet: TripletParams = TripletParams()


class IndexParams(_Section):
    # A FAISS index_factory string (Flat, HNSW32, IVF64,Flat, IVF64,PQ8, ...), or `auto`: the
    # `index` stage picks one by the gallery's size and dimension (pipeline.retrieval.factory.
    # choose_factory) and records it, with why, in index.json.
    factory: str = "HNSW32"
    metric: Literal["ip", "l2"] = "ip"
    # FAISS ParameterSpace string applied at search time, e.g. "efSearch=64" or "nprobe=8". With
    # `factory: auto`, "" uses auto's own settings for the index it chose; a setting given here
    # replaces auto's of the same name, and must apply to the chosen index.
    search_params: str = "efSearch=64"
    gallery_splits: list[Literal["train", "val", "test"]] = ["train", "val", "test"]
    query_split: Literal["train", "val", "test"] = "test"
    seed: int = 0

    @field_validator("gallery_splits")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("needs at least one split")
        return value

    @field_validator("factory")
    @classmethod
    def _auto_in_lower_case(cls, value: str) -> str:
        if value.strip().lower() == "auto" and value != "auto":
            raise ValueError("write `auto` (lower case, no spaces) to let the index stage choose")
        return value


class ProbeParams(_Section):
    """Nearest-neighbour classification on features cut at several encoder depths."""

    # pixels | half | penultimate | final | a block number (after transformer block / ResNet stage k)
    points: list[Union[Literal["pixels", "half", "penultimate", "final"], int]] = ["pixels", "half", "penultimate", "final"]
    pooling: Literal["cls", "mean"] = "cls"  # ViT towers: CLS token or mean of patch tokens
    k: int = Field(10, ge=1)
    metric: Literal["cosine", "l2"] = "cosine"
    gallery_split: Literal["train", "val", "test"] = "train"
    query_split: Literal["train", "val", "test"] = "test"


class PairParams(_Section):
    """Verification pairs, drawn once per split with a seed: all same-class pairs up to
    `max_positive`, and `negatives_per_positive` times as many different-class pairs."""

    max_positive: int = Field(5000, ge=1)
    negatives_per_positive: float = Field(1.0, gt=0)
    seed: int = 0


class EvaluateParams(_Section):
    split: Literal["train", "val", "test"] = "test"
    # Verification chooses its distance threshold here and applies it, unchanged, to `split`.
    threshold_split: Literal["train", "val", "test"] = "val"
    pairs: PairParams = PairParams()
    recall_k: list[int] = [1, 5, 10]
    # How many text queries to show with their top images in the report.
    n_examples: int = Field(4, ge=0, le=16)

    @field_validator("recall_k")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if not value or any(k < 1 for k in value):
            raise ValueError("must be a non-empty list of positive integers")
        return sorted(set(value))

    @model_validator(mode="after")
    def _threshold_not_tuned_on_test(self) -> "EvaluateParams":
        if self.threshold_split == self.split:
            raise ValueError(f"threshold_split must differ from split ('{self.split}'): a threshold tuned on the data it is scored on overstates accuracy")
        return self


class RuntimeParams(_Section):
    """How the stages run, not what they compute: no stage declares this section in dvc.yaml, so
    changing it reruns nothing. Outputs do not depend on these values (on one device type, bit for
    bit; CPU and CUDA differ in float rounding only)."""

    device: str = "auto"  # auto | cpu | cuda | cuda:N (train, embed, probe)
    # DataLoader worker processes (train, embed, probe). Training draws its augmentations per
    # sample from train.seed, so the workers do not change what it learns.
    num_workers: int = Field(0, ge=0)
    # Images or texts per encoder call when embedding and probing (the probe times at this size).
    batch_size: int = Field(256, ge=1)
    # Decoded images each process may keep in memory (MB): a training split that fits is decoded
    # once, not every epoch, and evaluation inputs encoded repeatedly (validation, the probe's
    # depths) are preprocessed once. Larger data is read from disk at each use.
    image_cache_mb: float = Field(2048, ge=0)
    # Processes for train and embed: > 1 runs them under torchrun (one per GPU with NCCL, or CPU
    # processes with gloo). Training batches are global (train.batch_size over all processes).
    processes: int = Field(1, ge=1)
    # true: `train` saves its whole state after every epoch (artifacts/model.resume.pt), and a run
    # interrupted with the same params and data continues from it instead of starting over.
    resume: bool = False


class Params(_Section):
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    index: IndexParams = IndexParams()
    probe: ProbeParams = ProbeParams()
    evaluate: EvaluateParams = EvaluateParams()
    runtime: RuntimeParams = RuntimeParams()


# Keys that moved to `runtime` (they change speed, not results): the error says where they went.
MOVED_TO_RUNTIME = {
    "train.device": "runtime.device",
    "train.num_workers": "runtime.num_workers",
    "train.resume": "runtime.resume",
    "embed": "runtime (device, num_workers, batch_size)",
    "probe.device": "runtime.device",
    "probe.num_workers": "runtime.num_workers",
    "probe.batch_size": "runtime.batch_size",
}


def apply_override(raw: dict, override: str) -> None:
    """Apply one `dotted.key=value` override (as `dvc exp run -S` takes it) to a raw params dict.

    The value is read as YAML, so numbers, booleans and lists keep their types; empty is "".
    """
    key, sep, value = override.partition("=")
    if not sep or not key:
        raise ParamsError(f"override {override!r}: expected KEY=VALUE, e.g. train.epochs=5")
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = yaml.safe_load(value) if value else ""


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid params"]
    for problem in err.errors():
        key = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            moved = MOVED_TO_RUNTIME.get(key)
            message = f"moved to {moved}" if moved else "unknown key (check the spelling against params.yaml)"
        lines.append(f"  {key}: {message} (got {problem.get('input')!r})")
    return "\n".join(lines)


def parse(raw: dict, source: str = "params") -> Params:
    try:
        return Params.model_validate(raw or {})
    except ValidationError as err:
        raise ParamsError(_format_error(err, source)) from None


def load(path: str | Path = DEFAULT_PARAMS_FILE) -> Params:
    """Load and validate a params file. Missing sections take their defaults."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found") from None
    except yaml.YAMLError as err:
        raise ParamsError(f"{path}: not valid YAML ({err})") from None
    if raw is not None and not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return parse(raw or {}, str(path))
