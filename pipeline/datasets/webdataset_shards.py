"""WebDataset shards: `.tar` files of samples as img2dataset writes them, read in place.

`data.root` is a folder of `*.tar` shards (taken in name order), one shard, or a brace pattern
(`data/raw/laion/{00000..00099}.tar`, expanded by webdataset). A sample is the run of members that
share a key, grouped as WebDataset groups them (the member name up to the first dot of its file
name, extensions lower-cased):

- the image: `jpg`, `jpeg`, `png` or `webp` (the first of these the sample has);
- `txt`: its caption (captions.parquet, one per image);
- `cls` (optional): an integer class. Labels are the distinct `cls` values in ascending order,
  numbered 0..n-1 (classes.json keeps each class's `cls`); a class is named by the `class_name`
  field of its samples' `json` where there is one (img2dataset passes extra input columns through
  to the `json`), else by its `cls` number. Without any `cls` the images are unlabelled.

Pixels are not copied: images.parquet is a manifest whose rows also hold the shard (relative to
`image_root`, the shards' common folder), the key, the image member's name and its byte offset and
size in the tar, and every later stage reads an image's bytes by that range
(`pipeline.images.TarMember`). So shards must be uncompressed tar files, img2dataset's default.

image_id is the key (unique across shards: a key seen twice is a bad annotation). The split is a
seeded hash of the key compared with `data.splits`, so a sample keeps its split when shards are
added or removed. Bad samples follow `data.on_bad_image` (an undecodable or missing image; no
caption, or no class, where other samples have one); a malformed `txt`/`cls`/`json`, two members
of one kind in a sample and duplicate keys follow `data.on_bad_annotation`. Either way the error
names the shard and the key. A shard cut short (an interrupted download) is a bad image: the error
says where the file ends and how many samples before the cut are whole; under `skip` those are kept,
and the rejections record the cut and the sample it left incomplete.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pandas as pd
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

from pipeline.datasets.base import DEFAULT_TEMPLATES, DatasetError, PreparedDataset, Rejections, class_entry
from pipeline.images import TarMember, check_image
from pipeline.params import DataParams, SplitRatios

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
SKIP_META = re.compile(r"__[^/]*__($|/)")  # webdataset's tar_file_iterator skips these names too


@dataclass
class Sample:
    shard: str  # relative to the image root
    key: str
    image: tarfile.TarInfo
    where: str  # `shard:key`, as errors name the sample
    caption: Optional[str] = None
    cls: Optional[int] = None
    class_name: Optional[str] = None


def prepare(params: DataParams, out_dir: Path) -> PreparedDataset:
    shards, root = find_shards(params.root)
    rejections = Rejections.from_params(params)
    samples: dict[str, Sample] = {}  # by key, in shard order
    for shard in shards:
        for sample in read_shard(shard, shard.relative_to(root).as_posix(), rejections):
            if sample.key in samples:
                rejections.bad_annotation(sample.where, f"key {sample.key!r} is also in {samples[sample.key].where}; keys must be unique (the first is kept)")
                continue
            member = TarMember(str(shard), sample.image.name, sample.image.offset_data, sample.image.size)
            problem = check_image(member, params.max_image_pixels) if params.check_images else None
            if problem is not None:
                rejections.bad_image(member, problem)
                continue
            samples[sample.key] = sample
    kept = _complete(list(samples.values()), rejections)
    classes, labels = _classes(kept, rejections)

    images = pd.DataFrame(
        {
            "image_id": [s.key for s in kept],
            "path": [f"{s.shard}/{s.image.name}" for s in kept],
            "split": [hash_split(s.key, params.seed, params.splits) for s in kept],
            "label": pd.array([labels.get(s.cls) for s in kept], dtype="Int64"),
            "class_name": pd.array([None if s.cls is None else classes[labels[s.cls]]["name"] for s in kept], dtype="string"),
            "shard": [s.shard for s in kept],
            "key": [s.key for s in kept],
            "member": [s.image.name for s in kept],
            "offset": [s.image.offset_data for s in kept],
            "size": [s.image.size for s in kept],
        }
    )
    captions = None
    if any(s.caption is not None for s in kept):
        captions = pd.DataFrame({"caption_id": images["image_id"] + "#0", "image_id": images["image_id"], "caption": [s.caption for s in kept], "split": images["split"]})
    return PreparedDataset(
        source="webdataset",
        images=images,
        captions=captions,
        classes=classes,
        templates=list(DEFAULT_TEMPLATES),
        image_root=root,
        rejected=rejections.records,
    )


def find_shards(spec: str) -> tuple[list[Path], Path]:
    """The shard files `data.root` names, and their common folder (the manifest's `image_root`)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        if not shards:
            raise DatasetError(f"{path}: no .tar shards in this folder (expected WebDataset shards such as img2dataset writes)")
    else:
        shards = [Path(s) for s in expand_urls(str(path))]  # brace patterns, as webdataset reads them
        missing = [s for s in shards if not s.is_file()]
        if missing:
            raise DatasetError(f"{missing[0]}: shard not found ({len(missing)} of the {len(shards)} shards data.root {spec!r} names are missing)")
    return shards, Path(os.path.commonpath([s.parent for s in shards]))


def read_shard(shard: Path, name: str, rejections: Rejections) -> list[Sample]:
    """The samples of one shard with their text members read and their image's TarInfo (offset, size)."""
    try:
        with tarfile.open(shard, "r:") as tar:  # "r:": by offset, so a compressed shard is refused here
            members, cut = _members(tar, shard)
            # WebDataset's grouping: consecutive members with one key are a sample.
            groups = [(key, [(ext, info) for _, ext, info in group]) for key, group in itertools.groupby(members, key=lambda member: member[0])]
            partial = _partial_last_sample(groups) if cut else None
            if cut:
                lost = f"the incomplete sample {partial!r} and " if partial else ""
                rejections.bad_image(shard, f"{cut}; {len(groups) - bool(partial)} whole samples precede the cut, {lost}any samples after it are lost")
            samples = []
            for key, group in groups:
                if key == partial:
                    rejections.bad_image(f"{shard}:{key}", f"cut short by the shard's truncation (only {', '.join(ext for ext, _ in group)} remain)")
                    continue
                sample = _sample(tar, name, key, f"{shard}:{key}", group, rejections)
                if sample is not None:
                    samples.append(sample)
            return samples
    except tarfile.ReadError as err:
        raise DatasetError(f"{shard}: not an uncompressed tar file ({err}); images are read from shards by byte offset, so gunzip compressed ones") from None


def _members(tar: tarfile.TarFile, shard: Path) -> tuple[list[tuple[str, str, tarfile.TarInfo]], Optional[str]]:
    """(key, extension, TarInfo) of each regular member, in tar order; and, for a shard cut short,
    where it ends (None for a whole shard). A cut shard keeps the members wholly before the cut."""
    members = []
    try:
        for info in tar:
            if not info.isreg() or SKIP_META.match(info.name):
                continue
            key, ext = base_plus_ext(info.name)
            if key is not None:  # names without an extension (and hidden `._x` files) belong to no sample
                members.append((key, ext.lower(), info))
    except tarfile.ReadError as err:
        if not members:
            raise
        size = shard.stat().st_size
        whole = [m for m in members if m[2].offset_data + m[2].size <= size]  # the last one may have lost its tail
        last = f"after member {whole[-1][2].name}" if whole else "before its first whole member"
        return whole, f"truncated: the file ends at byte {size:,}, {last} ({err})"
    return members, None


def _partial_last_sample(groups: list[tuple[str, list]]) -> Optional[str]:
    """The key of the last sample before a cut when it may have lost members: it is whole only if it
    has the member kinds of the sample before it (a shard's samples share their layout)."""
    if not groups:
        return None
    def kinds(members: list) -> set[str]:
        return {"image" if ext in IMAGE_KEYS else ext for ext, _ in members}  # png and jpg samples mix

    if len(groups) > 1 and kinds(groups[-1][1]) == kinds(groups[-2][1]):
        return None
    return groups[-1][0]


def _sample(tar: tarfile.TarFile, shard: str, key: str, where: str, members: list[tuple[str, tarfile.TarInfo]], rejections: Rejections) -> Optional[Sample]:
    """One sample from its (extension, TarInfo) members, or None when it is rejected."""
    exts = [ext for ext, _ in members]
    doubled = sorted({ext for ext in exts if exts.count(ext) > 1})
    if doubled:
        rejections.bad_annotation(where, f"more than one member with extension {', '.join(doubled)} in this sample")
        return None
    by_ext = dict(members)
    image_ext = next((ext for ext in IMAGE_KEYS if ext in by_ext), None)
    if image_ext is None:
        rejections.bad_image(where, f"no image member ({', '.join(IMAGE_KEYS)}) in this sample, only {', '.join(exts)}")
        return None
    sample = Sample(shard, key, by_ext[image_ext], where)
    try:
        if "txt" in by_ext:
            sample.caption = _text(tar, by_ext["txt"]).strip()
            if not sample.caption:
                rejections.bad_image(where, "empty caption (.txt)")
                return None
        if "cls" in by_ext:
            sample.cls = int(_text(tar, by_ext["cls"]).strip())
            if "json" in by_ext:
                meta = json.loads(_text(tar, by_ext["json"]))
                name = meta.get("class_name") if isinstance(meta, dict) else None
                sample.class_name = None if name is None else str(name)
    except (UnicodeDecodeError, ValueError) as err:  # json.JSONDecodeError is a ValueError
        rejections.bad_annotation(where, f"malformed text member ({type(err).__name__}: {err})")
        return None
    return sample


def _text(tar: tarfile.TarFile, info: tarfile.TarInfo) -> str:
    return tar.extractfile(info).read().decode("utf-8")


def _complete(samples: list[Sample], rejections: Rejections) -> list[Sample]:
    """Where some samples have a caption (a class), one without is bad: it would be missing from that task."""
    kept = []
    with_captions = any(s.caption is not None for s in samples)
    with_classes = any(s.cls is not None for s in samples)
    for s in samples:
        if with_captions and s.caption is None:
            rejections.bad_image(s.where, "no caption (.txt member), though other samples have one")
        elif with_classes and s.cls is None:
            rejections.bad_image(s.where, "no class (.cls member), though other samples have one")
        else:
            kept.append(s)
    return kept


def _classes(samples: list[Sample], rejections: Rejections) -> tuple[list[dict], dict[int, int]]:
    """Classes in ascending `cls` order, named by the first `class_name` given; and cls -> label."""
    names: dict[int, tuple[str, str]] = {}  # cls -> (name, where it was given)
    for s in samples:
        if s.cls is None or s.class_name is None:
            continue
        if s.cls not in names:
            names[s.cls] = (s.class_name, s.where)
        elif names[s.cls][0] != s.class_name:
            first, where = names[s.cls]
            rejections.bad_annotation(s.where, f"class_name {s.class_name!r} for cls {s.cls}, which {where} names {first!r} (the first name is kept)")
    values = sorted({s.cls for s in samples if s.cls is not None})
    classes = [class_entry(i, names.get(c, (str(c),))[0], cls=c) for i, c in enumerate(values)]
    return classes, {c: i for i, c in enumerate(values)}


def hash_split(key: str, seed: int, ratios: SplitRatios) -> str:
    """train | val | test from a seeded hash of the key, uniform in [0, 1), against the cumulative
    ratios: a sample's split depends on its key alone, so adding shards moves no sample."""
    u = int.from_bytes(hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest(), "big") / 2**64
    if u < ratios.train:
        return "train"
    if u < ratios.train + ratios.val:
        return "val"
    # Past both cut points; rounding in the ratios' sum must not put a sample in an empty split.
    return "test" if ratios.test > 0 else "val" if ratios.val > 0 else "train"
