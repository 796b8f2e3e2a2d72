"""The prepared table set (`data/prepared/`, written by `prepare`) as the later stages read it.

Apart from `pipeline.datasets`, which parses raw sources: the stages after `prepare` read these
tables only, so the parsers and split logic are not among their dependencies.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pandas as pd

from pipeline import io


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
