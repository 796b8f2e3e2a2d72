"""Dataset sources and the prepared table set that every later stage reads.

`prepare(params, out_dir)` dispatches to one module per source and writes, atomically:

    out_dir/images.parquet     one row per image (see base.IMAGE_COLUMNS; WebDataset adds base.TAR_COLUMNS),
                               with `content_hash`: the SHA-256 of the image's decoded RGB pixels, so that
                               later stages know identical images apart from their ids without reading files
    out_dir/captions.parquet   one row per caption, when the source has captions
    out_dir/classes.json       ordered classes + prompt templates
    out_dir/rejected.parquet   path, kind (image | annotation | note), reason: what was left out
    out_dir/dataset.json       source, where the image files are, counts (rejected ones included)
    out_dir/images/...         pixels, for sources that generate or unpack them
    out_dir/pixels.npy         every image decoded, in table order, when data.check_images is on
                               and all share one size and fit in PIXEL_STORE_MAX_MB (the synthetic
                               default, CIFAR): later stages read them by memory map, not decoding
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pipeline import io
from pipeline.images import PIXEL_STORE, image_refs, pixel_sha256, load_rgb, openable
from pipeline.datasets.base import DatasetError, PreparedDataset, Rejections, cap_per_split
from pipeline.params import DataParams

REJECTED_COLUMNS = ["path", "kind", "reason"]
REJECTED_KINDS = ("image", "annotation", "note")

SOURCES = {
    "synthetic": "pipeline.datasets.synthetic",
    "imagenet": "pipeline.datasets.imagenet",
    "flickr8k": "pipeline.datasets.flickr8k",
    "cifar10": "pipeline.datasets.cifar",
    "cifar100": "pipeline.datasets.cifar",  # one module for both releases; it picks by data.source
    "flickr30k": "pipeline.datasets.flickr30k",
    "mscoco": "pipeline.datasets.mscoco",
    "folder": "pipeline.datasets.folder",
    "webdataset": "pipeline.datasets.webdataset_shards",
}

__all__ = ["DatasetError", "prepare", "SOURCES"]


def prepare(params: DataParams, out_dir: str | Path) -> PreparedDataset:
    """Read the configured source and replace `out_dir` with its canonical tables."""
    module = importlib.import_module(SOURCES[params.source])
    with io.atomic_dir(out_dir) as tmp:
        dataset: PreparedDataset = module.prepare(params, tmp)
        dataset.images = cap_per_split(dataset.images, params.max_images_per_split, params.seed)
        dataset.images = with_content_hashes(dataset, Rejections.from_params(params))
        if dataset.captions is not None:
            dataset.captions = dataset.captions[dataset.captions["image_id"].isin(dataset.images["image_id"])]
        _write(dataset, tmp, pixel_store=params.check_images)
    if dataset.image_root == tmp:  # the temp folder was renamed to out_dir
        dataset.image_root = Path(out_dir)
    return dataset


def with_content_hashes(dataset: PreparedDataset, rejections: Rejections) -> pd.DataFrame:
    """`dataset.images` with `content_hash` (`pixel_sha256`: identical decoded pixels are one image,
    whatever the file names or encodings). An image that cannot be decoded (possible when
    `data.check_images` is off) is an error, or a recorded rejection when `data.on_bad_image` is
    skip; the rejections join `dataset.rejected`."""
    hashes = []
    for ref in image_refs(dataset.images, dataset.image_root):
        try:
            hashes.append(pixel_sha256(ref))
        except DatasetError as err:
            rejections.bad_image(ref, str(err).removeprefix(f"{ref}: "))
            hashes.append(None)
    images = dataset.images.assign(content_hash=pd.array(hashes, dtype="string"))
    dataset.rejected = [*dataset.rejected, *rejections.records]
    return images[images["content_hash"].notna().to_numpy()].reset_index(drop=True)


# A fixed size, not a param: whether the store exists is then a function of the data alone, and
# it changes how fast later stages read pixels, never which pixels they read.
PIXEL_STORE_MAX_MB = 1024


def write_pixel_store(images: pd.DataFrame, image_root: Path, path: Path, max_mb: float = PIXEL_STORE_MAX_MB) -> bool:
    """Decode every image of `images` into one (n, height, width, 3) uint8 array at `path`, when
    they all have one size and it fits in `max_mb`; returns whether it wrote one. Headers are read
    first (nothing decoded) and reading stops at the first image of another size."""
    refs = image_refs(images, image_root)
    if not refs:
        return False
    with Image.open(openable(refs[0])) as first:
        width, height = first.size
    if len(refs) * height * width * 3 > max_mb * 2**20:
        return False
    for ref in refs[1:]:
        with Image.open(openable(ref)) as img:
            if img.size != (width, height):
                return False
    with io.atomic_path(path) as tmp:
        store = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(refs), height, width, 3))
        for row, ref in enumerate(refs):
            store[row] = np.asarray(load_rgb(ref))
        store.flush()
        del store
    return True


def _write(dataset: PreparedDataset, out_dir: Path, pixel_store: bool) -> None:
    io.write_parquet(out_dir / "images.parquet", dataset.images)
    if pixel_store:  # data.check_images: the images are decoded anyway; keep what that gives
        write_pixel_store(dataset.images, dataset.image_root, out_dir / PIXEL_STORE)
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
            "notes": dataset.notes,
            # Details in rejected.parquet; notes are dataset quirks, not losses.
            "n_rejected": {kind: int((rejected["kind"] == kind).sum()) for kind in REJECTED_KINDS},
        },
    )
