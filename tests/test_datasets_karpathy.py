"""flickr30k and mscoco sources: Karpathy's caption JSON (splits, restval, COCO's image folders),
malformed entries, missing images and folders, and what to do when the files are not there."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.datasets import SOURCES, flickr30k, mscoco
from pipeline.datasets import prepare as prepare_dataset
from pipeline.datasets.base import DEFAULT_TEMPLATES, DatasetError
from pipeline.params import DataParams
from pipeline.prepared import load_prepared


def write_jpeg(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def sentences(*raws: str) -> list[dict]:
    return [{"raw": raw, "tokens": raw.lower().split(), "sentid": i} for i, raw in enumerate(raws)]


FLICKR_ENTRIES = [
    {"filename": "1000092795.jpg", "split": "train", "sentences": sentences("Two young guys.", "Two men outside.")},
    {"filename": "10002456.jpg", "split": "restval", "sentences": sentences("Workers on a roof.")},
    {"filename": "1000268201.jpg", "split": "val", "sentences": sentences("A child in pink.")},
    {"filename": "1000344755.jpg", "split": "test", "sentences": sentences(" A man on a ladder. ", "Someone cleans.")},
    {"filename": "1000366164.jpg", "split": "test", "sentences": sentences("A dog.")},
]
COCO_ENTRIES = [
    {"filepath": "train2014", "filename": "COCO_train2014_000000000009.jpg", "split": "train", "cocoid": 9,
     "sentences": sentences("A plate of food.", "Broccoli and bread.")},
    {"filepath": "train2014", "filename": "COCO_train2014_000000000025.jpg", "split": "train", "cocoid": 25,
     "sentences": sentences("A giraffe eating.")},
    {"filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg", "split": "restval", "cocoid": 42,
     "sentences": sentences("A red bus.")},
    {"filepath": "val2014", "filename": "COCO_val2014_000000000073.jpg", "split": "val", "cocoid": 73,
     "sentences": sentences("A motorcycle.")},
    {"filepath": "val2014", "filename": "COCO_val2014_000000391895.jpg", "split": "test", "cocoid": 391895,
     "sentences": sentences(*[f"A man on a moped, caption {n}." for n in range(6)])},  # six: all kept
]  # fmt: skip


def make_flickr30k(root: Path, json_dir: str = ".", image_dir: str = "flickr30k-images", entries=FLICKR_ENTRIES) -> Path:
    listing = root / json_dir / "dataset_flickr30k.json"
    listing.parent.mkdir(parents=True, exist_ok=True)
    listing.write_text(json.dumps({"dataset": "flickr30k", "images": entries}))
    for i, entry in enumerate(entries):
        if isinstance(entry, dict) and isinstance(entry.get("filename"), str):
            write_jpeg(root / image_dir / entry["filename"], 30 * i)
    return listing


def make_coco(root: Path, json_dir: str = ".", entries=COCO_ENTRIES) -> Path:
    listing = root / json_dir / "dataset_coco.json"
    listing.parent.mkdir(parents=True, exist_ok=True)
    listing.write_text(json.dumps({"dataset": "coco", "images": entries}))
    for i, entry in enumerate(entries):
        if isinstance(entry.get("filepath"), str) and isinstance(entry.get("filename"), str):
            write_jpeg(root / entry["filepath"] / entry["filename"], 30 * i)
    return listing


def params(source: str, root: Path, **overrides) -> DataParams:
    return DataParams(**{**dict(source=source, root=str(root), download=False), **overrides})


SKIP = dict(on_bad_image="skip", on_bad_annotation="skip")


def test_sources_are_registered():
    assert SOURCES["flickr30k"] == "pipeline.datasets.flickr30k"
    assert SOURCES["mscoco"] == "pipeline.datasets.mscoco"
    assert params("mscoco", Path("x")).source == "mscoco"


def test_flickr30k_splits_captions_and_no_classes(tmp_path):
    root = tmp_path / "flickr30k"
    make_flickr30k(root)
    ds = flickr30k.prepare(params("flickr30k", root), tmp_path / "out")

    assert ds.image_root == root / "flickr30k-images"
    assert dict(zip(ds.images["image_id"], ds.images["split"])) == {
        "1000092795": "train",
        "10002456": "train",  # restval -> train
        "1000268201": "val",
        "1000344755": "test",
        "1000366164": "test",
    }
    assert list(ds.images["path"]) == [e["filename"] for e in FLICKR_ENTRIES]
    assert ds.images["label"].isna().all() and ds.images["class_name"].isna().all()
    assert ds.classes == [] and ds.templates == DEFAULT_TEMPLATES  # a caption dataset, as flickr8k

    caps = ds.captions
    assert caps.groupby("image_id").size().to_dict() == {"1000092795": 2, "10002456": 1, "1000268201": 1, "1000344755": 2, "1000366164": 1}
    assert list(caps.loc[caps["image_id"] == "1000344755", "caption_id"]) == ["1000344755#0", "1000344755#1"]
    assert caps.set_index("caption_id").loc["1000344755#0", "caption"] == "A man on a ladder."  # stripped
    assert set(caps.loc[caps["image_id"] == "10002456", "split"]) == {"train"}
    assert ds.rejected == []
    assert any("dataset_flickr30k.json" in note and "1 val, 2 test" in note for note in ds.notes)


@pytest.mark.parametrize("json_dir, image_dir", [("annotations", "Images"), ("karpathy", "flickr30k_images"), (".", ".")])
def test_flickr30k_other_layouts(tmp_path, json_dir, image_dir):
    root = tmp_path / "flickr30k"
    make_flickr30k(root, json_dir=json_dir, image_dir=image_dir)
    ds = flickr30k.prepare(params("flickr30k", root), tmp_path / "out")
    assert ds.image_root == (root / image_dir if image_dir != "." else root)
    assert len(ds.images) == 5 and len(ds.captions) == 7


def test_mscoco_image_folders_from_filepath(tmp_path):
    root = tmp_path / "coco"
    make_coco(root, json_dir="annotations")
    ds = mscoco.prepare(params("mscoco", root), tmp_path / "out")

    assert ds.image_root == root
    rows = ds.images.set_index("image_id")
    assert rows.loc["COCO_val2014_000000391895", "path"] == "val2014/COCO_val2014_000000391895.jpg"
    assert rows.loc["COCO_train2014_000000000009", "path"] == "train2014/COCO_train2014_000000000009.jpg"
    assert all((root / path).is_file() for path in ds.images["path"])
    assert rows["split"].to_dict() == {
        "COCO_train2014_000000000009": "train",
        "COCO_train2014_000000000025": "train",
        "COCO_val2014_000000000042": "train",  # restval
        "COCO_val2014_000000000073": "val",
        "COCO_val2014_000000391895": "test",
    }
    test_caps = ds.captions[ds.captions["split"] == "test"]
    assert len(test_caps) == 6 and set(test_caps["image_id"]) == {"COCO_val2014_000000391895"}
    assert ds.classes == []


@pytest.mark.parametrize(
    "bad_entry, problem",
    [
        ({"split": "test", "sentences": sentences("No file name.")}, r"no 'filename'"),
        ({"filename": "x.jpg", "split": "test", "sentences": []}, r"x\.jpg: no captions"),
        ({"filename": "x.jpg", "split": "test"}, r"x\.jpg: no captions"),
        ({"filename": "x.jpg", "split": "holdout", "sentences": sentences("A cat.")}, r"x\.jpg: unknown split 'holdout'"),
        ({"filename": "x.jpg", "split": "test", "sentences": [{"tokens": ["a"]}]}, r"x\.jpg: sentences\[0\] has no 'raw'"),
        ({"filename": "1000092795.jpg", "split": "test", "sentences": sentences("Again.")}, r"1000092795\.jpg: listed again \(first at images\[0\]\)"),
        ("not an object", r"expected an object, got str"),
    ],
)
def test_flickr30k_malformed_entry_names_file_and_entry(tmp_path, bad_entry, problem):
    root = tmp_path / "flickr30k"
    make_flickr30k(root, entries=[*FLICKR_ENTRIES[:2], bad_entry, *FLICKR_ENTRIES[2:]])
    with pytest.raises(DatasetError, match=rf"dataset_flickr30k\.json: images\[2\]: {problem}.*data\.on_bad_annotation: skip"):
        flickr30k.prepare(params("flickr30k", root), tmp_path / "out")

    ds = flickr30k.prepare(params("flickr30k", root, **SKIP), tmp_path / "out")
    assert [(r["kind"], r["path"].endswith("dataset_flickr30k.json: images[2]")) for r in ds.rejected] == [("annotation", True)]
    assert len(ds.images) == 5 and "x" not in set(ds.images["image_id"])  # the good entries all stay
    assert set(ds.captions.loc[ds.captions["image_id"] == "1000092795", "caption"]) == {"Two young guys.", "Two men outside."}


def test_mscoco_entry_without_filepath(tmp_path):
    root = tmp_path / "coco"
    bad = {k: v for k, v in COCO_ENTRIES[3].items() if k != "filepath"}
    make_coco(root, entries=[*COCO_ENTRIES[:3], bad, COCO_ENTRIES[4]])
    with pytest.raises(DatasetError, match=r"dataset_coco\.json: images\[3\]: COCO_val2014_000000000073\.jpg: no 'filepath'"):
        mscoco.prepare(params("mscoco", root), tmp_path / "out")
    ds = mscoco.prepare(params("mscoco", root, **SKIP), tmp_path / "out")
    assert "val" not in set(ds.images["split"]) and len(ds.rejected) == 1


def test_mscoco_one_image_id_for_two_files(tmp_path):
    root = tmp_path / "coco"
    twin = {**COCO_ENTRIES[4], "filepath": "train2014", "split": "train"}  # same file name, other folder
    make_coco(root, entries=[*COCO_ENTRIES, twin])
    with pytest.raises(DatasetError, match=r"images\[5\]: train2014/COCO_val2014_000000391895\.jpg: image id .* is already val2014/.*'s \(first at images\[4\]\)"):
        mscoco.prepare(params("mscoco", root), tmp_path / "out")
    ds = mscoco.prepare(params("mscoco", root, **SKIP), tmp_path / "out")
    assert ds.images.set_index("image_id").loc["COCO_val2014_000000391895", "path"].startswith("val2014/")


@pytest.mark.parametrize("folder, name", [("..", "x.jpg"), ("val2014", "../../x.jpg"), ("/nonexistent", "x.jpg")])
def test_mscoco_paths_that_leave_the_root_are_refused_even_when_skipping(tmp_path, folder, name):
    root = tmp_path / "coco"
    listing = make_coco(root)  # then the hostile entry, in the JSON only
    hostile = {"filepath": folder, "filename": name, "split": "test", "sentences": sentences("x")}
    listing.write_text(json.dumps({"images": [*COCO_ENTRIES, hostile]}))
    with pytest.raises(DatasetError, match=r"dataset_coco\.json: images\[5\]: image path .* is not a plain relative path"):
        mscoco.prepare(params("mscoco", root, **SKIP), tmp_path / "out")


def test_json_that_is_not_a_karpathy_listing(tmp_path):
    root = tmp_path / "flickr30k"
    make_flickr30k(root)
    (root / "dataset_flickr30k.json").write_text('{"annotations": []}')
    with pytest.raises(DatasetError, match=r"dataset_flickr30k\.json: expected an object with an 'images' list"):
        flickr30k.prepare(params("flickr30k", root, **SKIP), tmp_path / "out")
    (root / "dataset_flickr30k.json").write_text('{"images": [')
    with pytest.raises(DatasetError, match=r"dataset_flickr30k\.json: not valid JSON"):
        flickr30k.prepare(params("flickr30k", root), tmp_path / "out")


def test_missing_image_is_a_bad_image(tmp_path):
    root = tmp_path / "flickr30k"
    make_flickr30k(root)
    (root / "flickr30k-images" / "1000366164.jpg").unlink()
    with pytest.raises(DatasetError, match=r"1000366164\.jpg: image of the test split not found \(listed at .*dataset_flickr30k\.json: images\[4\]\)"):
        flickr30k.prepare(params("flickr30k", root), tmp_path / "out")
    ds = flickr30k.prepare(params("flickr30k", root, **SKIP), tmp_path / "out")
    assert "1000366164" not in set(ds.images["image_id"]) and "1000366164" not in set(ds.captions["image_id"])
    assert [r["kind"] for r in ds.rejected] == ["image"]


def test_corrupt_image_is_dropped_with_its_captions_when_skipping(tmp_path):
    root = tmp_path / "coco"
    make_coco(root)
    (root / "val2014" / "COCO_val2014_000000391895.jpg").write_bytes(b"\x00garbage")
    with pytest.raises(DatasetError, match=r"COCO_val2014_000000391895\.jpg: not a readable image"):
        mscoco.prepare(params("mscoco", root), tmp_path / "out")
    ds = mscoco.prepare(params("mscoco", root, **SKIP), tmp_path / "out")
    assert "test" not in set(ds.images["split"]) and "test" not in set(ds.captions["split"])


def test_mscoco_absent_folder_is_one_bad_image(tmp_path):
    """Only val2014/ downloaded (enough to evaluate): one error or one record for train2014/, not one per image."""
    root = tmp_path / "coco"
    make_coco(root)
    for file in (root / "train2014").iterdir():
        file.unlink()
    (root / "train2014").rmdir()
    with pytest.raises(DatasetError, match=r"train2014: folder not found; dataset_coco\.json lists 2 images in it \(2 train\)"):
        mscoco.prepare(params("mscoco", root), tmp_path / "out")
    ds = mscoco.prepare(params("mscoco", root, on_bad_image="skip"), tmp_path / "out")
    assert [(r["kind"], Path(r["path"]).name) for r in ds.rejected] == [("image", "train2014")]
    assert set(ds.images["path"].str.split("/").str[0]) == {"val2014"}
    assert ds.images["split"].value_counts().to_dict() == {"train": 1, "val": 1, "test": 1}


def test_missing_files_say_where_to_put_what(tmp_path, offline_downloads):
    root = tmp_path / "flickr30k"
    with pytest.raises(DatasetError) as err:
        flickr30k.prepare(params("flickr30k", root, download=True), tmp_path / "out")
    message = str(err.value)
    assert "no dataset_flickr30k.json" in message and "cannot be downloaded automatically" in message
    assert "caption_datasets.zip" in message and str(root / "flickr30k-images") in message

    make_flickr30k(root, image_dir="elsewhere")
    with pytest.raises(DatasetError, match=r"Flickr30k not found under .*\(no image folder"):
        flickr30k.prepare(params("flickr30k", root), tmp_path / "out")

    root = tmp_path / "coco"
    with pytest.raises(DatasetError) as err:
        mscoco.prepare(params("mscoco", root, download=True), tmp_path / "out")
    message = str(err.value)
    assert "no dataset_coco.json" in message and "train2014.zip" in message and "val2014.zip" in message
    assert "caption_datasets.zip" in message and str(root) in message
    assert offline_downloads == []  # nothing was even tried

    (root / "karpathy").mkdir(parents=True)
    (root / "karpathy" / "dataset_coco.json").write_text(json.dumps({"images": COCO_ENTRIES}))
    with pytest.raises(DatasetError, match=r"none of the image folders dataset_coco\.json names: train2014, val2014"):
        mscoco.prepare(params("mscoco", root), tmp_path / "out")


@pytest.mark.parametrize("source, make", [("flickr30k", make_flickr30k), ("mscoco", make_coco)])
def test_prepare_writes_tables_that_load_back(tmp_path, source, make):
    root = tmp_path / source
    make(root)
    out = tmp_path / "prepared"
    prepare_dataset(params(source, root), out)
    prepared = load_prepared(out)

    assert prepared.info["source"] == source
    assert prepared.info["n_images"] == 5 and prepared.info["n_classes"] == 0
    assert prepared.info["n_captions"] == (7 if source == "flickr30k" else 11)
    assert prepared.info["n_rejected"] == {"image": 0, "annotation": 0, "note": 0}
    assert all(p.is_file() for p in prepared.image_files())
    assert set(prepared.captions["image_id"]) == set(prepared.images["image_id"])
