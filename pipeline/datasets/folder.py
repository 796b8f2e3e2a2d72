"""A class-per-folder image tree: `data.root/<class>/<image>` (subfolders inside a class are walked too).

Classes are the sorted names of the non-hidden subfolders of `data.root`. Files with an image
extension (any case) are the images; hidden files and folders are ignored; other files, and files
directly in `data.root`, are left out and counted in the notes. There is no official split, so
images are split per class by `data.splits`.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pandas as pd

from pipeline.datasets.base import (
    DEFAULT_TEMPLATES,
    DatasetError,
    PreparedDataset,
    Rejections,
    class_entry,
    drop_unreadable,
    resolve_root,
    split_images,
)
from pipeline.images import IMAGE_EXTENSIONS
from pipeline.params import DataParams


def prepare(params: DataParams, out_dir: Path) -> PreparedDataset:
    root = resolve_root(params)
    if not root.is_dir():
        raise DatasetError(f"{root}: image folder not found (expected {root}/<class>/<image> files)")
    notes: list[str] = []
    rejections = Rejections.from_params(params)
    inside = _Inside(root, rejections)
    class_dirs = sorted(
        (entry for entry in os.scandir(root) if not entry.name.startswith(".") and inside.keeps(entry) and entry.is_dir()),
        key=lambda entry: entry.name,
    )
    if not class_dirs:
        raise DatasetError(f"{root}: no class subfolders (expected {root}/<class>/<image> files)")
    loose = [e.name for e in os.scandir(root) if not e.name.startswith(".") and not e.is_symlink() and e.is_file()]
    if loose:
        notes.append(f"{len(loose)} files directly in {root} (not in a class folder) were left out, e.g. {loose[:3]}")

    rows = []
    skipped: list[str] = []
    for label, class_dir in enumerate(class_dirs):
        files, others = _images_under(Path(class_dir.path), inside)
        if not files:
            extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise DatasetError(f"{class_dir.path}: class folder holds no images ({extensions})")
        skipped += [f"{class_dir.name}/{name}" for name in others]
        for relative in files:
            rows.append({"path": f"{class_dir.name}/{relative}", "label": label, "class_name": class_dir.name})
    if skipped:
        notes.append(f"{len(skipped)} non-image files were left out, e.g. {skipped[:3]}")

    images = pd.DataFrame(rows)
    images["image_id"] = _image_ids(images["path"])
    images["split"] = split_images(images["label"], params)
    if params.check_images:
        images = drop_unreadable(images, root, rejections, params.max_image_pixels)
    return PreparedDataset(
        source="folder",
        images=images,
        classes=[class_entry(i, entry.name) for i, entry in enumerate(class_dirs)],
        templates=list(DEFAULT_TEMPLATES),
        image_root=root,
        rejected=rejections.records,
        notes=notes,
    )


class _Inside:
    """The archive rule for links: a symlink must resolve inside `data.root`. One that leads out of
    it (or loops, or leads nowhere) is a bad image: an error naming it, or a recorded rejection."""

    def __init__(self, root: Path, rejections: Rejections):
        self.root = root.resolve()
        self.rejections = rejections

    def keeps(self, entry: os.DirEntry | Path) -> bool:
        path = Path(entry.path if isinstance(entry, os.DirEntry) else entry)
        if not path.is_symlink():
            return True
        try:
            target = path.resolve(strict=True)
        except (OSError, RuntimeError) as err:  # ELOOP, a dangling link
            self.rejections.bad_image(path, f"a symlink that resolves to nothing ({type(err).__name__}: {err.strerror if isinstance(err, OSError) else err})")
            return False
        if not target.is_relative_to(self.root):
            self.rejections.bad_image(path, f"a symlink to {target}, outside data.root ({self.root})")
            return False
        return True


def _images_under(folder: Path, inside: _Inside) -> tuple[list[str], list[str]]:
    """(image paths, other file paths) relative to `folder`, POSIX style, sorted; hidden entries
    skipped, links out of data.root refused (`_Inside`)."""
    images, others = [], []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and inside.keeps(Path(dirpath) / d)]
        base = Path(dirpath).relative_to(folder)
        for name in filenames:
            if name.startswith(".") or not inside.keeps(Path(dirpath) / name):
                continue
            relative = (base / name).as_posix()
            (images if Path(name).suffix.lower() in IMAGE_EXTENSIONS else others).append(relative)
    return sorted(images), sorted(others)


def _image_ids(paths: pd.Series) -> list[str]:
    """`<class>/<stem>`; where two files differ only by extension (a.jpg, a.png) both keep it."""
    stems = [p.rsplit(".", 1)[0] for p in paths]
    counts = Counter(stems)
    return [stem if counts[stem] == 1 else path for stem, path in zip(stems, paths)]
