"""ImageNet-1k validation set (ILSVRC2012 val) from the official devkit and val JPEGs.

Expected under `data.root` (nothing is downloaded: ImageNet needs an account at image-net.org):

    ILSVRC2012_devkit_t12/data/meta.mat                              (or meta.mat in root)
    ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt (or in root)
    val/ILSVRC2012_val_00000001.JPEG ...                              (or the JPEGs in root)

The val JPEGs may also sit one folder deeper (`val/<wnid>/ILSVRC2012_val_*.JPEG`, the layout
torchvision and the usual `valprep.sh` produce); labels still come from the ground-truth file.

Class indices follow sorted-WNID order (what torchvision and open_clip use), not the devkit's
ILSVRC2012_ID order. ImageNet val has no official split, so it is split per class by `data.splits`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.io

from pipeline.datasets.base import (
    DEFAULT_TEMPLATES,
    DatasetError,
    PreparedDataset,
    Rejections,
    class_entry,
    drop_unreadable,
    resolve_root,
    stratified_splits,
)
from pipeline.params import DataParams

DEVKIT_DIR = Path("ILSVRC2012_devkit_t12") / "data"
META_FILE = "meta.mat"
GROUND_TRUTH_FILE = "ILSVRC2012_validation_ground_truth.txt"
SYNSET_FIELDS = ("ILSVRC2012_ID", "WNID", "words", "num_children")
VAL_NAME = re.compile(r"^ILSVRC2012_val_(\d{8})\.jpe?g$", re.IGNORECASE)

DOWNLOAD_HINT = (
    "ImageNet cannot be downloaded automatically (it needs an account): get "
    "ILSVRC2012_devkit_t12.tar.gz and ILSVRC2012_img_val.tar from https://image-net.org/download-images.php, "
    "extract the devkit into {root} (giving {root}/ILSVRC2012_devkit_t12/data/meta.mat) and the val "
    "images into {root}/val/"
)


@dataclass(frozen=True)
class Synset:
    ilsvrc2012_id: int
    wnid: str
    words: str


def prepare(params: DataParams, out_dir: Path) -> PreparedDataset:
    root = resolve_root(params)
    if not root.is_dir():
        raise DatasetError(f"{root}: ImageNet root folder not found. {DOWNLOAD_HINT.format(root=root)}")
    rejections = Rejections.from_params(params)
    notes: list[str] = []

    meta_path = _find_devkit_file(root, META_FILE)
    gt_path = _find_devkit_file(root, GROUND_TRUTH_FILE)
    leaves = _read_leaves(meta_path)
    index_of_id = {synset.ilsvrc2012_id: index for index, synset in enumerate(leaves)}

    if len(leaves) == 1000:
        # open_clip's cleaned names and the OpenAI prompt ensemble, both in sorted-WNID order.
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

        names = list(IMAGENET_CLASSNAMES)
        templates = [template("{}") for template in OPENAI_IMAGENET_TEMPLATES]
    else:
        names = [synset.words.split(", ")[0] for synset in leaves]
        templates = list(DEFAULT_TEMPLATES)
        notes.append(f"{meta_path}: {len(leaves)} leaf synsets (not 1000): class names are the first WordNet alias")
    classes = [
        class_entry(
            index,
            names[index],
            aliases=synset.words.split(", "),
            wnid=synset.wnid,
            ilsvrc2012_id=synset.ilsvrc2012_id,
        )
        for index, synset in enumerate(leaves)
    ]

    image_dir, files = _find_val_images(root)
    rows = []
    for line_no, text in _ground_truth_lines(gt_path):
        where = f"{gt_path}:{line_no}"
        try:
            ilsvrc2012_id = int(text)
        except ValueError:
            rejections.bad_annotation(where, f"expected an ILSVRC2012_ID (an integer), got {text!r}")
            continue
        if ilsvrc2012_id not in index_of_id:
            rejections.bad_annotation(where, f"ILSVRC2012_ID {ilsvrc2012_id} is not a leaf class in {meta_path}")
            continue
        # Line i of the ground truth labels ILSVRC2012_val_{i:08d}.JPEG.
        number = f"{line_no:08d}"
        if number not in files:
            rejections.bad_image(
                image_dir / f"ILSVRC2012_val_{number}.JPEG", f"image for line {line_no} of {gt_path} not found"
            )
            continue
        label = index_of_id[ilsvrc2012_id]
        relative = files.pop(number)
        rows.append(
            {
                "image_id": Path(relative).stem,
                "path": relative,
                "label": label,
                "class_name": names[label],
            }
        )
    if files:
        notes.append(f"{image_dir}: {len(files)} val images have no ground-truth line and were left out")
    if not rows:
        raise DatasetError(f"{gt_path}: no usable ground-truth lines (nothing matched an image in {image_dir})")

    images = pd.DataFrame(rows)
    images["split"] = stratified_splits(images["label"], params.splits, params.seed)
    if params.check_images:
        images = drop_unreadable(images, image_dir, rejections, params.max_image_pixels)
    return PreparedDataset(
        source="imagenet",
        images=images,
        classes=classes,
        templates=templates,
        image_root=image_dir,
        rejected=rejections.records,
        notes=notes,
    )


def _find_devkit_file(root: Path, name: str) -> Path:
    tried = [root / DEVKIT_DIR / name, root / name]
    for path in tried:
        if path.is_file():
            return path
    hint = ""
    if (root / "ILSVRC2012_devkit_t12.tar.gz").is_file():
        hint = f" ({root / 'ILSVRC2012_devkit_t12.tar.gz'} is there: extract it in {root})"
    raise DatasetError(
        f"ImageNet devkit file {name} not found; tried {', '.join(map(str, tried))}{hint}. "
        + DOWNLOAD_HINT.format(root=root)
    )


def _read_leaves(meta_path: Path) -> list[Synset]:
    """Leaf synsets (the 1000 classes) of the devkit's meta.mat, sorted by WNID."""
    try:
        mat = scipy.io.loadmat(meta_path, squeeze_me=True, struct_as_record=False)
    except Exception as err:  # scipy raises ValueError, TypeError, ... for non-MAT data
        raise DatasetError(f"{meta_path}: not a readable MATLAB file ({type(err).__name__}: {err})") from None
    if "synsets" not in mat:
        found = sorted(k for k in mat if not k.startswith("__"))
        raise DatasetError(f"{meta_path}: no 'synsets' variable (found {found})")
    # squeeze_me turns a one-element struct array into a bare struct.
    synsets = mat["synsets"]
    synsets = list(synsets.ravel()) if isinstance(synsets, np.ndarray) else [synsets]

    leaves = []
    for position, synset in enumerate(synsets, start=1):
        missing = [f for f in SYNSET_FIELDS if not hasattr(synset, f)]
        if missing:
            raise DatasetError(f"{meta_path}: synsets({position}) lacks field(s) {missing}")
        try:
            if int(synset.num_children) != 0:
                continue
            leaves.append(Synset(int(synset.ILSVRC2012_ID), str(synset.WNID), str(synset.words)))
        except (TypeError, ValueError) as err:
            raise DatasetError(f"{meta_path}: synsets({position}) has a malformed field ({err})") from None
    if not leaves:
        raise DatasetError(f"{meta_path}: no leaf synsets (num_children == 0)")
    for attr, what in (("wnid", "WNID"), ("ilsvrc2012_id", "ILSVRC2012_ID")):
        values = [getattr(s, attr) for s in leaves]
        if len(set(values)) != len(values):
            dup = next(v for v in values if values.count(v) > 1)
            raise DatasetError(f"{meta_path}: {what} {dup!r} appears on more than one leaf synset")
    return sorted(leaves, key=lambda s: s.wnid)


def _ground_truth_lines(gt_path: Path) -> list[tuple[int, str]]:
    """(1-based line number, stripped text); trailing blank lines are dropped, inner ones kept."""
    try:
        lines = gt_path.read_text(encoding="ascii").splitlines()
    except UnicodeDecodeError as err:
        raise DatasetError(f"{gt_path}: not a text file of integers ({err})") from None
    while lines and not lines[-1].strip():
        lines.pop()
    return [(number, text.strip()) for number, text in enumerate(lines, start=1)]


def _find_val_images(root: Path) -> tuple[Path, dict[str, str]]:
    """The folder holding the val JPEGs and {8-digit number: path relative to it}."""
    tried = [root / "val", root]
    for image_dir in tried:
        if not image_dir.is_dir():
            continue
        files = _scan_val_names(image_dir, "")
        if not files:
            # val/<wnid>/ILSVRC2012_val_*.JPEG: one level deeper.
            for entry in sorted(os.scandir(image_dir), key=lambda e: e.name):
                if entry.is_dir() and not entry.name.startswith("."):
                    files.update(_scan_val_names(Path(entry.path), entry.name + "/"))
        if files:
            return image_dir, files
    raise DatasetError(
        f"no ILSVRC2012_val_*.JPEG images found; tried {', '.join(map(str, tried))} "
        f"(and their subfolders). {DOWNLOAD_HINT.format(root=root)}"
    )


def _scan_val_names(folder: Path, prefix: str) -> dict[str, str]:
    files = {}
    for entry in os.scandir(folder):
        match = VAL_NAME.match(entry.name)
        if match and entry.is_file():
            files[match.group(1)] = prefix + entry.name
    return files
