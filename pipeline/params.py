"""Typed, validated pipeline parameters: the one place that defines defaults and checks values.

`params.yaml` holds one section per stage concern (data, model, train, embed, index, evaluate).
Each stage loads only the sections it declares in `dvc.yaml`, so a change elsewhere does not
rerun it. Unknown keys and bad values are errors that name the key, e.g. `train.lr: ...`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_PARAMS_FILE = Path("params.yaml")
SPLITS = ("train", "val", "test")


class ParamsError(ValueError):
    """A params file or value that cannot be used; the message names the key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class SyntheticParams(_Section):
    n_classes: int = Field(8, ge=2, le=8)
    images_per_class: int = Field(150, ge=4)
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
    source: Literal["synthetic", "imagenet", "flickr8k", "cifar10", "folder"] = "synthetic"
    # Where the raw dataset lives (ignored by `synthetic`). Relative paths are from the project root.
    root: Optional[str] = None
    seed: int = 0
    # Used where the source has no official split (folder, imagenet val, synthetic).
    splits: SplitRatios = SplitRatios()
    # Fraction of an official train split held out as `val` (cifar10).
    val_fraction: float = Field(0.1, ge=0, lt=1)
    # Cap on images per split after splitting, for quick runs; null keeps all.
    max_images_per_split: Optional[int] = Field(None, ge=1)
    # Download public datasets (cifar10, flickr8k) when `root` holds none and a network is there.
    download: bool = True
    # Open every image once while preparing; corrupt files fail (or are rejected, see below).
    check_images: bool = True
    # false: the first bad file or line is an error. true: it is skipped and recorded in
    # data/prepared/dataset.json under `rejected`.
    skip_bad_files: bool = False
    synthetic: SyntheticParams = SyntheticParams()

    @model_validator(mode="after")
    def _root_for_real_sources(self) -> "DataParams":
        if self.source != "synthetic" and not self.root:
            raise ValueError(f"data.root is required for source '{self.source}' (the raw dataset folder)")
        return self


class ModelParams(_Section):
    # An open_clip model name (`ViT-B-32`, ...) or the project's `clipline-tiny`.
    name: str = "clipline-tiny"
    # An open_clip hub tag (`openai`, `laion2b_s34b_b79k`), a local checkpoint path, or `none`.
    pretrained: str = "none"


class TrainParams(_Section):
    method: Literal["none", "clip"] = "clip"
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(64, ge=2)
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    warmup_fraction: float = Field(0.1, ge=0, lt=1)
    seed: int = 0
    device: str = "auto"
    num_workers: int = Field(0, ge=0)
    # Epochs between validation passes (validation recall picks the best checkpoint).
    val_every: int = Field(1, ge=1)


class EmbedParams(_Section):
    batch_size: int = Field(256, ge=1)
    num_workers: int = Field(0, ge=0)
    device: str = "auto"


class IndexParams(_Section):
    # A FAISS index_factory string: Flat, HNSW32, IVF64,Flat, IVF64,PQ8, ...
    factory: str = "HNSW32"
    metric: Literal["ip", "l2"] = "ip"
    # FAISS ParameterSpace string applied at search time, e.g. "efSearch=64" or "nprobe=8".
    search_params: str = ""
    gallery_splits: list[Literal["train", "val", "test"]] = ["train", "val", "test"]
    query_split: Literal["train", "val", "test"] = "test"
    seed: int = 0

    @field_validator("gallery_splits")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("needs at least one split")
        return value


class EvaluateParams(_Section):
    split: Literal["train", "val", "test"] = "test"
    recall_k: list[int] = [1, 5, 10]
    # How many text queries to show with their top images in the report.
    n_examples: int = Field(4, ge=0, le=16)

    @field_validator("recall_k")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if not value or any(k < 1 for k in value):
            raise ValueError("must be a non-empty list of positive integers")
        return sorted(set(value))


class Params(_Section):
    data: DataParams = DataParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    embed: EmbedParams = EmbedParams()
    index: IndexParams = IndexParams()
    evaluate: EvaluateParams = EvaluateParams()


def _format_error(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid params"]
    for problem in err.errors():
        key = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            message = "unknown key (check the spelling against params.yaml)"
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
