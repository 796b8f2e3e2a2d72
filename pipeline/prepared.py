"""The prepared table set (`data/prepared/`, written by `prepare`) as the later stages read it.

Apart from `pipeline.datasets`, which parses raw sources: the stages after `prepare` read these
tables only, so the parsers and split logic are not among their dependencies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from pipeline import io
from pipeline.errors import ArtifactError, DatasetError
from pipeline.images import PIXEL_STORE, ImageRef, StoredPixels, image_refs, pixel_store


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

    def image_paths(self, images: Optional[pd.DataFrame] = None) -> list[ImageRef]:
        """What `load_rgb` reads for each row (of `images`, rows of this table): its row of the pixel
        store when `prepare` wrote one, else its file (`image_files`)."""
        images = self.images if images is None else images
        store = self.root / PIXEL_STORE
        if not store.exists():
            return self.image_files(images)
        rows_stored = pixel_store(str(store)).shape[0]
        if rows_stored != len(self.images):  # a row off and every image would be its neighbour's
            raise ArtifactError(f"{store}: {rows_stored} images where {self.root / 'images.parquet'} lists {len(self.images)}", "rerun `dvc repro prepare`")
        row_of = pd.Series(np.arange(len(self.images)), index=self.images["image_id"].to_numpy())
        rows = row_of[images["image_id"].to_numpy()].to_numpy()
        return [StoredPixels(str(store), int(row), str(self.image_root / path)) for row, path in zip(rows, images["path"])]

    def image_files(self, images: Optional[pd.DataFrame] = None) -> list[ImageRef]:
        """Where each row's image file is: a path under `image_root`, or a tar shard's byte range."""
        return image_refs(self.images if images is None else images, self.image_root)

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.classes]


def block(frame: pd.DataFrame, rank: int, world: int) -> pd.DataFrame:
    """Rows [rank*n//world, (rank+1)*n//world): the ranks' blocks concatenate to the table in order."""
    n = len(frame)
    return frame.iloc[rank * n // world : (rank + 1) * n // world]


def rows_for_rank(prepared: Prepared, rank: int, world: int) -> pd.DataFrame:
    """The image rows that rank `rank` of `world` processes reads (embeds).

    The contiguous block of `block`; for WebDataset rows whole shards instead, so that each rank
    opens only its own shards: a shard goes to the rank whose block holds its first row. The ranks
    still get contiguous runs of rows in table order, none more than one shard over n/world.
    """
    images = prepared.images
    if "shard" not in images.columns or images.empty:
        return block(images, rank, world)
    first_row = pd.Series(np.arange(len(images))).groupby(images["shard"].to_numpy()).transform("min").to_numpy()
    return images[first_row * world // len(images) == rank]


def load_prepared(root: str | Path = "data/prepared") -> Prepared:
    root = Path(root)
    info = io.read_json(root / "dataset.json")
    classes = io.read_json(root / "classes.json")
    captions_path = root / "captions.parquet"
    image_root = root if info["image_root"] is None else Path(info["image_root"])
    images = pd.read_parquet(root / "images.parquet")
    if "content_hash" not in images.columns or images["content_hash"].isna().any():
        # Retrieval counts identical images as one candidate by this column (prepare writes it).
        raise DatasetError(f"{root / 'images.parquet'}: no content_hash for every image (prepared by an older clipline); rerun `dvc repro prepare`")
    return Prepared(
        root=root,
        images=images,
        captions=pd.read_parquet(captions_path) if captions_path.exists() else None,
        classes=classes["classes"],
        templates=classes["templates"],
        image_root=image_root,
        info=info,
    )
