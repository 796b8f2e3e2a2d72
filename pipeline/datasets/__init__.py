"""Dataset sources and the prepared table set that every later stage reads.

`prepare(params, out_dir)` dispatches to one module per source and writes, atomically:

    out_dir/images.parquet     one row per image (see base.IMAGE_COLUMNS)
    out_dir/captions.parquet   one row per caption, when the source has captions
    out_dir/classes.json       ordered classes + prompt templates
    out_dir/rejected.parquet   path, kind (image | annotation | note), reason: what was left out
    out_dir/dataset.json       source, where the image files are, counts (rejected ones included)
    out_dir/images/...         pixels, for sources that generate or unpack them
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pandas as pd

from pipeline import io
from pipeline.datasets.base import DatasetError, PreparedDataset, cap_per_split
from pipeline.params import DataParams

REJECTED_COLUMNS = ["path", "kind", "reason"]
REJECTED_KINDS = ("image", "annotation", "note")

SOURCES = {
    "synthetic": "pipeline.datasets.synthetic",
    "imagenet": "pipeline.datasets.imagenet",
    "flickr8k": "pipeline.datasets.flickr8k",
    "cifar10": "pipeline.datasets.cifar",
    "folder": "pipeline.datasets.folder",
}

__all__ = ["DatasetError", "Prepared", "load_prepared", "prepare", "SOURCES"]


def prepare(params: DataParams, out_dir: str | Path) -> PreparedDataset:
    """Read the configured source and replace `out_dir` with its canonical tables."""
    start = time.perf_counter()
    module = importlib.import_module(SOURCES[params.source])
    with io.atomic_dir(out_dir) as tmp:
        dataset: PreparedDataset = module.prepare(params, tmp)
        dataset.images = cap_per_split(dataset.images, params.max_images_per_split, params.seed)
        if dataset.captions is not None:
            dataset.captions = dataset.captions[dataset.captions["image_id"].isin(dataset.images["image_id"])]
        _write(dataset, tmp, params, time.perf_counter() - start)
    if dataset.image_root == tmp:  # the temp folder was renamed to out_dir
        dataset.image_root = Path(out_dir)
    return dataset


def _write(dataset: PreparedDataset, out_dir: Path, params: DataParams, elapsed_s: float) -> None:
    io.write_parquet(out_dir / "images.parquet", dataset.images)
    if dataset.captions is not None:
        io.write_parquet(out_dir / "captions.parquet", dataset.captions.reset_index(drop=True))
    io.write_json(out_dir / "classes.json", {"classes": dataset.classes, "templates": dataset.templates})
    rejected = pd.DataFrame(dataset.rejected, columns=REJECTED_COLUMNS).astype(str)
    io.write_parquet(out_dir / "rejected.parquet", rejected)
    in_prepared = dataset.image_root.resolve() == out_dir.resolve()
    counts = dataset.images["split"].value_counts().reindex(["train", "val", "test"], fill_value=0)
    io.write_json(
        out_dir / "dataset.json",
        {
            "source": dataset.source,
            # null: image paths are relative to this folder; else the raw dataset folder.
            "image_root": None if in_prepared else str(dataset.image_root),
            "n_images": int(len(dataset.images)),
            "n_images_per_split": {k: int(v) for k, v in counts.items()},
            "n_captions": 0 if dataset.captions is None else int(len(dataset.captions)),
            "n_classes": len(dataset.classes),
            "prepare_s": round(elapsed_s, 3),
            "notes": dataset.notes,
            # Details in rejected.parquet; notes are dataset quirks, not losses.
            "n_rejected": {kind: int((rejected["kind"] == kind).sum()) for kind in REJECTED_KINDS},
        },
    )


@dataclass
class Prepared:
    """The prepared tables as later stages read them."""

    root: Path
    images: pd.DataFrame
    captions: Optional[pd.DataFrame]
    classes: list[dict]
    templates: list[str]
    image_root: Path
    info: dict

    def image_paths(self, images: Optional[pd.DataFrame] = None) -> list[Path]:
        images = self.images if images is None else images
        return [self.image_root / p for p in images["path"]]

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.classes]


def load_prepared(root: str | Path = "data/prepared") -> Prepared:
    root = Path(root)
    info = io.read_json(root / "dataset.json")
    classes = io.read_json(root / "classes.json")
    captions_path = root / "captions.parquet"
    image_root = root if info["image_root"] is None else Path(info["image_root"])
    return Prepared(
        root=root,
        images=pd.read_parquet(root / "images.parquet"),
        captions=pd.read_parquet(captions_path) if captions_path.exists() else None,
        classes=classes["classes"],
        templates=classes["templates"],
        image_root=image_root,
        info=info,
    )
