"""The canonical table set every source becomes, and the helpers the sources share.

A source module exposes `prepare(params: DataParams, out_dir: Path) -> PreparedDataset`.
It reads its native format, may write image files under `out_dir` (sources that ship pixels
in batches or generate them), and returns tables that follow the data contract:

- images:   image_id (str), path (str, relative to `image_root`), split (train|val|test),
            label (Int64, nullable), class_name (str, nullable)
- captions: caption_id (str), image_id (str), caption (str), split   (None if the source has none)
- classes:  ordered list of dicts with index, name, aliases and source ids (wnid, ...)
- templates: prompt templates with one `{}` for the class name
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import pandas as pd

from pipeline.errors import DatasetError  # noqa: F401 (callers import it from here too)
from pipeline.images import check_image
from pipeline.params import SPLITS, DataParams, SplitRatios

IMAGE_COLUMNS = ["image_id", "path", "split", "label", "class_name"]
# A WebDataset manifest's extra columns: where each image lies in its tar shard (shard relative to
# `image_root`, the sample's key, the member's name, its data's byte offset and size).
TAR_COLUMNS = ["shard", "key", "member", "offset", "size"]
CAPTION_COLUMNS = ["caption_id", "image_id", "caption", "split"]

# Generic prompts for sources that do not bring their own (CLIP's short ensemble).
DEFAULT_TEMPLATES = [
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a photo of the large {}.",
    "a photo of the small {}.",
    "a good photo of a {}.",
]



@dataclass
class Rejections:
    """Bad images and annotation lines: an error, or a recorded rejection when the params say skip.

    Each record is {path, kind (image | annotation | note), reason}; `path` is the file, or
    `file:line` for a line, or `shard:key` for a WebDataset sample (`shard:member` for its image).
    Notes are benign quirks of a dataset, recorded but never fatal.
    """

    on_bad_image: str = "fail"
    on_bad_annotation: str = "fail"
    records: list[dict] = field(default_factory=list)

    @classmethod
    def from_params(cls, params: DataParams) -> "Rejections":
        return cls(params.on_bad_image, params.on_bad_annotation)

    def bad_image(self, path: str | Path, reason: str) -> None:
        self._reject(path, reason, "image", self.on_bad_image)

    def bad_annotation(self, where: str | Path, reason: str) -> None:
        self._reject(where, reason, "annotation", self.on_bad_annotation)

    def note(self, where: str | Path, reason: str) -> None:
        self.records.append({"path": str(where), "kind": "note", "reason": reason})

    def _reject(self, path: str | Path, reason: str, kind: str, policy: str) -> None:
        if policy != "skip":
            raise DatasetError(f"{path}: {reason} (set data.on_bad_{kind}: skip to leave such {kind}s out and record them)")
        self.records.append({"path": str(path), "kind": kind, "reason": reason})


@dataclass
class PreparedDataset:
    source: str
    images: pd.DataFrame
    classes: list[dict]
    templates: list[str]
    image_root: Path
    captions: Optional[pd.DataFrame] = None
    rejected: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.images = normalise_images(self.images)
        if self.captions is not None:
            self.captions = self.captions[CAPTION_COLUMNS].reset_index(drop=True)
            self.captions["caption_id"] = self.captions["caption_id"].astype(str)
            self.captions["image_id"] = self.captions["image_id"].astype(str)
        validate(self)


def normalise_images(images: pd.DataFrame) -> pd.DataFrame:
    missing = [c for c in IMAGE_COLUMNS if c not in images.columns]
    if missing:
        raise ValueError(f"images table lacks columns {missing}")
    tar = [c for c in TAR_COLUMNS if c in images.columns]
    if tar and tar != TAR_COLUMNS:
        raise ValueError(f"images table has some of the tar manifest columns {TAR_COLUMNS} but not all: {tar}")
    out = images[IMAGE_COLUMNS + tar].reset_index(drop=True).copy()
    out["image_id"] = out["image_id"].astype(str)
    out["path"] = out["path"].astype(str)
    out["split"] = out["split"].astype(str)
    out["label"] = out["label"].astype("Int64")
    out["class_name"] = out["class_name"].astype("string")
    if tar:
        out = out.astype({"shard": str, "key": str, "member": str, "offset": "int64", "size": "int64"})
    return out


def validate(dataset: PreparedDataset) -> None:
    """Check the contract; a violation here is a bug in the source module, not in user data."""
    images = dataset.images
    if images.empty:
        raise DatasetError(f"{dataset.source}: no images were found")
    if images["image_id"].duplicated().any():
        dup = images.loc[images["image_id"].duplicated(), "image_id"].iloc[0]
        raise ValueError(f"{dataset.source}: duplicate image_id {dup!r}")
    bad_splits = set(images["split"]) - set(SPLITS)
    if bad_splits:
        raise ValueError(f"{dataset.source}: unknown splits {sorted(bad_splits)}")
    indices = [c["index"] for c in dataset.classes]
    if indices != list(range(len(indices))):
        raise ValueError(f"{dataset.source}: class indices must be 0..n-1 in order")
    labels = images["label"].dropna()
    if len(labels) and (labels.min() < 0 or labels.max() >= len(indices)):
        raise ValueError(f"{dataset.source}: labels outside 0..{len(indices) - 1}")
    if dataset.captions is not None:
        unknown = set(dataset.captions["image_id"]) - set(images["image_id"])
        if unknown:
            raise ValueError(f"{dataset.source}: captions for unknown images, e.g. {sorted(unknown)[:3]}")


def assign_splits(n: int, ratios: SplitRatios, rng: np.random.Generator) -> np.ndarray:
    """Shuffle n items into train/val/test by ratio (rounded, every item assigned)."""
    order = rng.permutation(n)
    n_val = int(round(ratios.val * n))
    n_test = int(round(ratios.test * n))
    n_val = min(n_val, n)
    n_test = min(n_test, n - n_val)
    splits = np.full(n, "train", dtype=object)
    splits[order[:n_val]] = "val"
    splits[order[n_val : n_val + n_test]] = "test"
    return splits


def stratified_splits(labels: Iterable[int], ratios: SplitRatios, seed: int) -> np.ndarray:
    """Per-class split so every class appears in each split in proportion."""
    labels = np.asarray(list(labels))
    rng = np.random.default_rng(seed)
    splits = np.empty(len(labels), dtype=object)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        splits[members] = assign_splits(len(members), ratios, rng)
    return splits


def class_disjoint_splits(labels: Iterable[int], ratios: SplitRatios, seed: int) -> np.ndarray:
    """Split whole classes by ratio, so no class (identity) is in two splits."""
    labels = np.asarray(list(labels))
    classes = np.unique(labels)
    assigned = assign_splits(len(classes), ratios, np.random.default_rng(seed))
    check_class_split(assigned, ratios)
    class_split = dict(zip(classes, assigned))
    return np.array([class_split[label] for label in labels], dtype=object)


MIN_CLASSES_PER_SPLIT = 2  # verification needs a different-class pair; MAP@R, zero-shot and validation a choice


def check_class_split(assigned: np.ndarray, ratios: SplitRatios) -> None:
    """Refuse a class split that leaves a split given a share with fewer than 2 classes: nothing
    could be validated or scored there, and training would run to the end before saying so."""
    counts = {name: int((assigned == name).sum()) for name in ("train", "val", "test")}
    short = [name for name, count in counts.items() if getattr(ratios, name) > 0 and count < MIN_CLASSES_PER_SPLIT]
    if not short:
        return
    n = len(assigned)
    got = ", ".join(f"{name} {count}" for name, count in counts.items())
    shared = [name for name in ("val", "test") if getattr(ratios, name) > 0]
    if n < MIN_CLASSES_PER_SPLIT * (1 + len(shared)):
        fix = f"{n} classes cannot give train{''.join(' and ' + name for name in shared)} {MIN_CLASSES_PER_SPLIT} classes each; use data.split_by=image"
    else:
        share = math.ceil(100 * MIN_CLASSES_PER_SPLIT / n) / 100  # rounds back to at least 2 classes
        proposal = {name: share if name in shared else 0.0 for name in ("val", "test")}
        fix = f"e.g. data.splits {{train: {1 - sum(proposal.values()):.2f}, val: {proposal['val']:.2f}, test: {proposal['test']:.2f}}}"
    raise DatasetError(
        f"data.splits: split_by=class puts the {n} classes into {got}; {' and '.join(short)} {'needs' if len(short) == 1 else 'need'} at least "
        f"{MIN_CLASSES_PER_SPLIT} classes{' each' if len(short) > 1 else ''} ({fix})"
    )


def split_images(labels: Iterable[int], params: DataParams) -> np.ndarray:
    """The split of each image per `data.split_by`: stratified per image, or whole classes."""
    if params.split_by == "class":
        return class_disjoint_splits(labels, params.splits, params.seed)
    labels = np.asarray(list(labels))
    splits = stratified_splits(labels, params.splits, params.seed)
    empty = [name for name in ("train", "val", "test") if getattr(params.splits, name) > 0 and not (splits == name).any()]
    if empty:
        # Each class is split on its own, so classes of one or two images all land in train.
        sizes = np.unique(labels, return_counts=True)[1]
        raise DatasetError(
            f"data.splits: split_by=image leaves {' and '.join(empty)} with no images: {len(labels)} images in {len(sizes)} classes "
            f"of {sizes.min()}-{sizes.max()} images, and each class is split on its own; "
            "give the classes more images, or use data.split_by=class"
        )
    return splits


def cap_per_split(images: pd.DataFrame, max_per_split: Optional[int], seed: int) -> pd.DataFrame:
    """Keep at most `max_per_split` images of each split (seeded sample, stable order)."""
    if max_per_split is None:
        return images
    kept = [
        group if len(group) <= max_per_split else group.sample(n=max_per_split, random_state=seed)
        for _, group in images.groupby("split", sort=False)
    ]
    return pd.concat(kept).sort_index()


def drop_unreadable(images: pd.DataFrame, image_root: Path, rejections: Rejections, max_pixels: Optional[int] = None) -> pd.DataFrame:
    """Decode every image once; an unreadable one is an error or a recorded rejection."""
    keep = []
    for path in images["path"]:
        problem = check_image(image_root / path, max_pixels)
        if problem is not None:
            rejections.bad_image(image_root / path, problem)
        keep.append(problem is None)
    return images[np.array(keep, dtype=bool)]


def safe_member(root: Path, name: str, where: str) -> str:
    """`name` from an annotation file, as a path under `root`; refused if it is absolute or climbs out."""
    candidate = Path(name)
    if candidate.is_absolute() or ".." in candidate.parts or not name.strip():
        raise DatasetError(f"{where}: image path {name!r} is not a plain relative path inside {root}")
    return name


def resolve_root(params: DataParams) -> Path:
    return Path(params.root).expanduser()


def class_entry(index: int, name: str, aliases: Optional[list[str]] = None, **source_ids) -> dict:
    return {"index": index, "name": name, "aliases": aliases or [name], **source_ids}
