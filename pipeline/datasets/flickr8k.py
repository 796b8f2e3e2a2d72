"""Flickr8k: 8,091 images with 5 captions each, and the official 6k/1k/1k split.

Under `data.root` (the layout the two public zips unpack to; text files may also sit in
`Flickr8k_text/`):

    Flickr8k.token.txt            `<image>.jpg#<n>\\t<caption>` per line
    Flickr_8k.trainImages.txt     one image file name per line  -> split train
    Flickr_8k.devImages.txt                                     -> split val
    Flickr_8k.testImages.txt                                    -> split test
    Flicker8k_Dataset/*.jpg       (the official zip's spelling; Flickr8k_Dataset/ or Images/ work too)

Instead of the token and split files, Karpathy's `dataset_flickr8k.json` (captions and splits in
one file, `restval` counted as train; read by `karpathy.py`, as for flickr30k and mscoco) is
accepted. When both are there the official token file wins, because it is what the split files
refer to; a note in dataset.json says the JSON was ignored.

The token file names a few images that do not exist (`2258277193_586949ec62.jpg.1#0` ...). Those
captions are recorded as notes in rejected.parquet and never fail the stage. Images in no split file are left
out and counted in the notes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import pandas as pd

from pipeline.datasets.archives import download_and_extract
from pipeline.datasets.base import (
    DEFAULT_TEMPLATES,
    DatasetError,
    PreparedDataset,
    Rejections,
    drop_unreadable,
    resolve_root,
    safe_member,
)
from pipeline.datasets.karpathy import image_id_of, read_karpathy
from pipeline.params import DataParams

TOKEN_FILE = "Flickr8k.token.txt"
KARPATHY_FILE = "dataset_flickr8k.json"
SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
TEXT_DIRS = (".", "Flickr8k_text")
IMAGE_DIRS = ("Flicker8k_Dataset", "Flickr8k_Dataset", "Images")

# jbrownlee's GitHub release mirror of the two zips the University of Illinois used to serve.
# The md5 sums are the ones the R torchvision package (mlverse/torchvision, R/dataset-flickr.R)
# checks these exact URLs against; a CMake fetch script for the same URLs expects the same sums.
MIRROR = "https://github.com/jbrownlee/Datasets/releases/download/Flickr8k"
TEXT_ARCHIVE = ("Flickr8k_text.zip", "bf6c1abcb8e4a833b7f922104de18627")
IMAGE_ARCHIVE = ("Flickr8k_Dataset.zip", "f18a1e2920de5bd84dae7cf08ec78978")


def prepare(params: DataParams, out_dir: Path) -> PreparedDataset:
    root = resolve_root(params)
    token_path, karpathy_path, image_dir = _locate(root)
    missing = []
    if token_path is None and karpathy_path is None:
        missing.append(TEXT_ARCHIVE)
    if image_dir is None:
        missing.append(IMAGE_ARCHIVE)
    if missing:
        if not params.download:
            raise DatasetError(_missing_message(root, missing, "data.download is false"))
        _download(root, missing)
        token_path, karpathy_path, image_dir = _locate(root)
        if (token_path is None and karpathy_path is None) or image_dir is None:
            raise DatasetError(_missing_message(root, missing, "the downloaded archives did not unpack as expected"))

    rejections = Rejections.from_params(params)
    notes: list[str] = []
    on_disk = {p.name for p in image_dir.iterdir() if p.is_file()}
    if token_path is not None:
        if karpathy_path is not None:
            notes.append(f"captions and splits from {token_path} and the official split files; {karpathy_path} ignored")
        splits, listed_at = _read_split_files(token_path.parent, root)
        captions = _read_token_file(token_path, rejections)
    else:
        notes.append(f"captions and splits from {karpathy_path} (Karpathy split, restval counted as train)")
        listing = read_karpathy(karpathy_path, rejections)
        splits, captions, listed_at = listing.splits, listing.captions, listing.origin

    # Captions of images that are not on disk (the token file's `.jpg.1` entries): reported only.
    absent = captions[~captions["file"].isin(on_disk)]
    for file, group in absent.groupby("file", sort=True):
        rejections.note(
            group["source"].iloc[0],
            f"{len(group)} caption(s) name image {file}, which is not in {image_dir}",
        )
    captions = captions[captions["file"].isin(on_disk)]

    unsplit = set(captions["file"]) - set(splits)
    if unsplit:
        notes.append(f"{len(unsplit)} captioned images are in no split file and were left out")
    captions = captions[captions["file"].isin(splits)]

    rows = []
    captioned = set(captions["file"])
    uncaptioned = 0
    for file, split in splits.items():
        if file not in on_disk:
            rejections.bad_image(image_dir / file, f"image of the {split} split not found (listed at {listed_at[file]})")
            continue
        if file not in captioned:
            uncaptioned += 1
            continue
        rows.append({"image_id": image_id_of(file), "path": file, "split": split, "label": None, "class_name": None})
    if uncaptioned:
        notes.append(f"{uncaptioned} images in the split files have no captions and were left out")
    if not rows:
        raise DatasetError(f"{image_dir}: none of the images in the split files has captions")

    images = pd.DataFrame(rows)
    if params.check_images:
        images = drop_unreadable(images, image_dir, rejections, params.max_image_pixels)
    captions = captions[captions["file"].isin(set(images["path"]))].copy()
    captions["image_id"] = captions["file"].map(image_id_of)
    captions["caption_id"] = captions["image_id"] + "#" + captions["n"].astype(str)
    captions["split"] = captions["file"].map(splits)
    return PreparedDataset(
        source="flickr8k",
        images=images,
        classes=[],
        templates=list(DEFAULT_TEMPLATES),
        image_root=image_dir,
        captions=captions,
        rejected=rejections.records,
        notes=notes,
    )


def _locate(root: Path) -> tuple[Optional[Path], Optional[Path], Optional[Path]]:
    """(token file, Karpathy JSON, image folder); None for each that is absent."""
    text_dirs = [root / d for d in TEXT_DIRS]
    token = next((d / TOKEN_FILE for d in text_dirs if (d / TOKEN_FILE).is_file()), None)
    karpathy = next((d / KARPATHY_FILE for d in text_dirs if (d / KARPATHY_FILE).is_file()), None)
    image_dir = next((root / d for d in IMAGE_DIRS if (root / d).is_dir()), None)
    return token, karpathy, image_dir


def _missing_message(root: Path, missing: list[tuple[str, str]], why: str) -> str:
    wanted = " and ".join(f"{MIRROR}/{name}" for name, _ in missing)
    return (
        f"Flickr8k not found under {root} ({why}). Download {wanted} and unzip into {root}, so that it "
        f"holds {TOKEN_FILE} and the Flickr_8k.*Images.txt split files (directly or in Flickr8k_text/) and "
        f"the images in Flicker8k_Dataset/; Karpathy's {KARPATHY_FILE} with the images in Images/ works too"
    )


def _download(root: Path, archives: list[tuple[str, str]]) -> None:
    for name, md5 in archives:
        try:
            download_and_extract(f"{MIRROR}/{name}", root, name, md5)
        except DatasetError:
            raise  # an archive member that would escape root: say so, not "download failed"
        except Exception as err:  # no network, HTTP errors, checksum mismatch (RuntimeError)
            raise DatasetError(
                _missing_message(root, archives, f"downloading {name} failed: {type(err).__name__}: {err}")
            ) from None


def _read_text(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path}: not UTF-8 text ({err})") from None


def _read_split_files(folder: Path, root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """({image file name: split}, {image file name: "split file:line"}); the split files sit beside the token file."""
    splits: dict[str, str] = {}
    origin: dict[str, str] = {}
    for split, name in SPLIT_FILES.items():
        path = folder / name
        if not path.is_file():
            raise DatasetError(
                f"{path}: official split file not found (the three Flickr_8k.*Images.txt files come with "
                f"{TOKEN_FILE} in {MIRROR}/{TEXT_ARCHIVE[0]}; unzip it into {root})"
            )
        for line_no, line in enumerate(_read_text(path), start=1):
            file = line.strip()
            if not file:
                continue
            safe_member(root, file, f"{path}:{line_no}")
            if file in splits and splits[file] != split:
                raise DatasetError(f"{path}:{line_no}: {file} is already listed in {origin[file]}")
            splits[file] = split
            origin[file] = f"{path}:{line_no}"
    return splits, origin


def _read_token_file(path: Path, rejections: Rejections) -> pd.DataFrame:
    """One row per caption: file, n, caption and source (file:line, for messages)."""
    rows = []
    seen: set[tuple[str, int]] = set()
    for line_no, line in enumerate(_read_text(path), start=1):
        if not line.strip():
            continue
        where = f"{path}:{line_no}"
        key, tab, caption = line.partition("\t")
        file, hash_sign, number = key.strip().rpartition("#")
        if not tab:
            rejections.bad_annotation(where, "expected '<image>.jpg#<n><TAB><caption>', found no tab")
            continue
        if not hash_sign or not file or not (number.isascii() and number.isdigit()):
            rejections.bad_annotation(where, f"expected '<image>.jpg#<n>' before the tab, got {key!r}")
            continue
        if (file, int(number)) in seen:
            rejections.bad_annotation(where, f"caption {file}#{number} appears twice")
            continue
        safe_member(path.parent, file, where)
        seen.add((file, int(number)))
        rows.append({"file": file, "n": int(number), "caption": caption.strip(), "source": where})
    if not rows:
        raise DatasetError(f"{path}: no captions")
    return pd.DataFrame(rows)
