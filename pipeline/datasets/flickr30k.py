"""Flickr30k: 31,783 images with 5 captions each, in Karpathy's split (29k train, 1k val, 1k test).

The 1k test images are the standard text-image retrieval benchmark (CLIP paper, CLIP_benchmark).
Nothing is downloaded: the images need a request form. Under `data.root`:

    dataset_flickr30k.json     Karpathy's JSON, from caption_datasets.zip (also read from
                               annotations/ or karpathy/)
    flickr30k-images/*.jpg     the images, as flickr30k-images.tar unpacks (flickr30k_images/ or
                               Images/ work too, or the JPEGs directly in data.root)

`restval` counts as train. Malformed entries and missing images are handled as in karpathy.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

from pipeline.datasets.base import DatasetError, PreparedDataset
from pipeline.datasets.karpathy import CAPTION_ZIP, open_listing, prepare_captioned
from pipeline.params import DataParams

JSON_FILE = "dataset_flickr30k.json"
IMAGE_DIRS = ("flickr30k-images", "flickr30k_images", "Images")
IMAGES_URL = "https://shannon.cs.illinois.edu/DenotationGraph/"


def prepare(params: DataParams, out_dir: Path) -> PreparedDataset:
    root, json_path, listing, rejections = open_listing(params, JSON_FILE, _missing_message)
    image_dir = _image_dir(root, listing.splits)
    if image_dir is None:
        raise DatasetError(_missing_message(root, "no image folder"))
    return prepare_captioned(params, "flickr30k", json_path, listing, image_dir, rejections, notes=[])


def _image_dir(root: Path, listed: Iterable[str]) -> Optional[Path]:
    """The first of IMAGE_DIRS that exists, else root itself if it holds any listed image."""
    for name in IMAGE_DIRS:
        if (root / name).is_dir():
            return root / name
    return root if any((root / file).is_file() for file in listed) else None


def _missing_message(root: Path, what: str) -> str:
    return (
        f"Flickr30k not found under {root} ({what}; it cannot be downloaded automatically). Get the images "
        f"from {IMAGES_URL} (a request form) and unpack them into {root / IMAGE_DIRS[0]}/, and put Karpathy's "
        f"{JSON_FILE} from {CAPTION_ZIP} in {root}"
    )
