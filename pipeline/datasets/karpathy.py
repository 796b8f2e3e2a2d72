"""Andrej Karpathy's caption JSON: the splits every image-text retrieval benchmark uses.

`caption_datasets.zip` (https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip)
holds `dataset_flickr8k.json`, `dataset_flickr30k.json` and `dataset_coco.json`, all of this shape:

    {"dataset": "coco", "images": [
        {"filepath": "val2014",                       (COCO only: the image's folder)
         "filename": "COCO_val2014_000000391895.jpg",
         "split": "test",                             train | restval | val | test
         "sentences": [{"raw": "A man with a red helmet ...", "tokens": [...], ...}, ...],
         "imgid": 0, "sentids": [...], "cocoid": 391895},
        ...]}

`restval` (the COCO and Flickr30k images Karpathy kept out of val and test) counts as train. An
entry with no usable file name, an unknown split or no captions follows `data.on_bad_annotation`:
an error naming the JSON file and the entry (`dataset_coco.json: images[17]: ...`), or a recorded
rejection. Image ids are the file names without their extension, as in the flickr8k source.
The flickr8k, flickr30k and mscoco sources all read their JSON here.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Optional

import pandas as pd

from pipeline.datasets.base import (
    DEFAULT_TEMPLATES,
    DatasetError,
    PreparedDataset,
    Rejections,
    drop_unreadable,
    resolve_root,
    safe_member,
)
from pipeline.params import DataParams

CAPTION_ZIP = "https://cs.stanford.edu/people/karpathy/deepimagesent/caption_datasets.zip"
KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}
# Where the JSON may sit under `data.root` (flickr30k and mscoco; flickr8k has its own places).
JSON_DIRS = (".", "annotations", "karpathy")


@dataclass
class KarpathyCaptions:
    splits: dict[str, str]  # image path (relative to the image folder) -> train | val | test
    origin: dict[str, str]  # image path -> "<json>: images[i]", for messages
    captions: pd.DataFrame  # one row per caption: file, n, caption, source


def find_json(root: Path, name: str) -> Optional[Path]:
    return next((root / d / name for d in JSON_DIRS if (root / d / name).is_file()), None)


def open_listing(
    params: DataParams, json_name: str, missing_message: Callable[[Path, str], str], folder_key: Optional[str] = None
) -> tuple[Path, Path, KarpathyCaptions, Rejections]:
    """(data.root, its Karpathy JSON, the JSON read, the rejections to record in) for a source whose
    JSON sits in one of `JSON_DIRS` (flickr30k, mscoco); no JSON fails with the source's own
    `missing_message(root, what is missing)`."""
    root = resolve_root(params)
    json_path = find_json(root, json_name)
    if json_path is None:
        raise DatasetError(missing_message(root, f"no {json_name}"))
    rejections = Rejections.from_params(params)
    return root, json_path, read_karpathy(json_path, rejections, folder_key=folder_key), rejections


def read_karpathy(path: Path, rejections: Optional[Rejections] = None, folder_key: Optional[str] = None) -> KarpathyCaptions:
    """Read one Karpathy JSON. `folder_key` names the entry field holding the image's folder
    (COCO's "filepath"), joined in front of the file name; without it the file name is the path."""
    rejections = rejections if rejections is not None else Rejections()
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{path}: not valid JSON ({err})") from None
    entries = data.get("images") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise DatasetError(f"{path}: expected an object with an 'images' list (Karpathy's caption JSON)")

    splits: dict[str, str] = {}
    origin: dict[str, str] = {}
    owner_of_id: dict[str, str] = {}  # image id -> file, so that two entries never share an id
    rows = []
    for position, entry in enumerate(entries):
        where = f"{path}: images[{position}]"
        file, problem = _entry_file(entry, folder_key)
        if problem is not None:
            rejections.bad_annotation(where, problem)
            continue
        safe_member(path.parent, file, where)  # never skippable: a path that climbs out is hostile
        split, sentences = entry.get("split"), entry.get("sentences")
        if not isinstance(split, str) or split not in KARPATHY_SPLITS:
            rejections.bad_annotation(where, f"{file}: unknown split {split!r} (expected one of {sorted(KARPATHY_SPLITS)})")
            continue
        captions, problem = _entry_captions(sentences)
        if problem is not None:
            rejections.bad_annotation(where, f"{file}: {problem}")
            continue
        image_id = image_id_of(file)
        if image_id in owner_of_id:
            first = owner_of_id[image_id]
            first_at = origin[first].rpartition(": ")[2]  # images[j]
            again = "listed again" if first == file else f"image id {image_id!r} is already {first}'s"
            rejections.bad_annotation(where, f"{file}: {again} (first at {first_at})")
            continue
        owner_of_id[image_id] = file
        splits[file] = KARPATHY_SPLITS[split]
        origin[file] = where
        rows += [{"file": file, "n": n, "caption": caption, "source": where} for n, caption in enumerate(captions)]
    if not rows:
        raise DatasetError(f"{path}: no captioned images")
    return KarpathyCaptions(splits, origin, pd.DataFrame(rows))


def image_id_of(file: str) -> str:
    return PurePosixPath(file).stem


def _entry_file(entry: object, folder_key: Optional[str]) -> tuple[str, Optional[str]]:
    """(relative image path, None) or ("", what is wrong with the entry)."""
    if not isinstance(entry, dict):
        return "", f"expected an object, got {type(entry).__name__}"
    name = entry.get("filename")
    if not isinstance(name, str) or not name.strip():
        return "", f"no 'filename' (got {name!r})"
    if folder_key is None:
        return name, None
    folder = entry.get(folder_key)
    if not isinstance(folder, str) or not folder.strip():
        return "", f"{name}: no {folder_key!r} (the image's folder, e.g. val2014; got {folder!r})"
    return f"{folder}/{name}", None


def _entry_captions(sentences: object) -> tuple[list[str], Optional[str]]:
    """(captions, None) or ([], what is wrong with the entry's 'sentences')."""
    if not isinstance(sentences, list) or not sentences:
        return [], f"no captions ('sentences' must be a non-empty list, got {sentences!r:.60})"
    captions = []
    for n, sentence in enumerate(sentences):
        raw = sentence.get("raw") if isinstance(sentence, dict) else None
        if not isinstance(raw, str) or not raw.strip():
            return [], f"sentences[{n}] has no 'raw' caption text"
        captions.append(raw.strip())
    return captions, None


def prepare_captioned(
    params: DataParams, source: str, json_path: Path, listing: KarpathyCaptions, image_dir: Path, rejections: Rejections, notes: list[str]
) -> PreparedDataset:
    """The prepared tables for a Karpathy-JSON source whose image paths are relative to `image_dir`.

    A listed image that is not on disk is a bad image (an error, or a rejection with skip). A whole
    folder that is absent (COCO's train2014/ when only val2014/ was downloaded) is one bad image
    for the folder rather than one per file in it.
    """
    counts = Counter(listing.splits.values())
    notes.append(
        f"captions and splits from {json_path} (Karpathy split, restval counted as train): "
        + ", ".join(f"{counts[s]} {s}" for s in ("train", "val", "test"))
    )
    folder_exists: dict[str, bool] = {".": True}
    absent_folders: dict[str, Counter] = {}
    rows = []
    for file, split in listing.splits.items():
        folder = str(PurePosixPath(file).parent)
        if folder not in folder_exists:
            folder_exists[folder] = (image_dir / folder).is_dir()
        if not folder_exists[folder]:
            absent_folders.setdefault(folder, Counter())[split] += 1
            continue
        if not (image_dir / file).is_file():
            rejections.bad_image(image_dir / file, f"image of the {split} split not found (listed at {listing.origin[file]})")
            continue
        rows.append({"image_id": image_id_of(file), "path": file, "split": split, "label": None, "class_name": None})
    for folder, by_split in absent_folders.items():
        listed = ", ".join(f"{n} {s}" for s, n in sorted(by_split.items()))
        rejections.bad_image(image_dir / folder, f"folder not found; {json_path.name} lists {sum(by_split.values())} images in it ({listed})")
    if not rows:
        raise DatasetError(f"{image_dir}: none of the {len(listing.splits)} images listed in {json_path} is there")

    images = pd.DataFrame(rows)
    if params.check_images:
        images = drop_unreadable(images, image_dir, rejections, params.max_image_pixels)
    captions = listing.captions[listing.captions["file"].isin(set(images["path"]))].copy()
    captions["image_id"] = captions["file"].map(image_id_of)
    captions["caption_id"] = captions["image_id"] + "#" + captions["n"].astype(str)
    captions["split"] = captions["file"].map(listing.splits)
    return PreparedDataset(
        source=source,
        images=images,
        classes=[],  # caption datasets: retrieval tasks only, as flickr8k
        templates=list(DEFAULT_TEMPLATES),
        image_root=image_dir,
        captions=captions,
        rejected=rejections.records,
        notes=notes,
    )
