"""MS-COCO captions (2014 images) in Karpathy's split: 113k train (restval included), 5k val, 5k test.

The 5k test images are the standard text-image retrieval benchmark ("MSCOCO 5k test": CLIP paper,
CLIP_benchmark's mscoco_captions). Nothing is downloaded (13 GB of train images). Under `data.root`:

    dataset_coco.json                       Karpathy's JSON, from caption_datasets.zip (also read
                                            from annotations/ or karpathy/)
    train2014/COCO_train2014_*.jpg          train2014.zip, unpacked
    val2014/COCO_val2014_*.jpg              val2014.zip, unpacked

Each entry's `filepath` names its folder. Karpathy's val, test and restval images are all in
val2014/, so for evaluation alone val2014/ is enough: a folder that is absent altogether is one
bad image (an error by default; with `data.on_bad_image: skip`, one record in rejected.parquet and
its images left out), not one per file. Some images have more than 5 captions; all are kept.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.datasets.base import DatasetError, PreparedDataset
from pipeline.datasets.karpathy import CAPTION_ZIP, open_listing, prepare_captioned
from pipeline.params import DataParams

JSON_FILE = "dataset_coco.json"
FOLDER_KEY = "filepath"
IMAGES_URL = "http://images.cocodataset.org/zips"
IMAGE_ZIPS = ("train2014.zip", "val2014.zip")


def prepare(params: DataParams, out_dir: Path) -> PreparedDataset:
    root, json_path, listing, rejections = open_listing(params, JSON_FILE, _missing_message, folder_key=FOLDER_KEY)
    folders = sorted({Path(file).parent.as_posix() for file in listing.splits})
    if not any((root / folder).is_dir() for folder in folders):
        raise DatasetError(_missing_message(root, f"none of the image folders {json_path.name} names: {', '.join(folders)}"))
    return prepare_captioned(params, "mscoco", json_path, listing, root, rejections, notes=[])


def _missing_message(root: Path, what: str) -> str:
    zips = " and ".join(f"{IMAGES_URL}/{name}" for name in IMAGE_ZIPS)
    return (
        f"MS-COCO not found under {root} ({what}; it is not downloaded automatically). Download {zips} "
        f"and unzip them into {root} (giving {root}/train2014/ and {root}/val2014/; val2014 alone is enough "
        f"to evaluate, with data.on_bad_image: skip), and put Karpathy's {JSON_FILE} from {CAPTION_ZIP} in {root}"
    )
