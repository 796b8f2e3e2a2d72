"""Class-per-folder source: `root/<class>/<image>`."""

from __future__ import annotations

import hashlib
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.datasets import folder
from pipeline.prepared import load_prepared
from pipeline.datasets import prepare as prepare_dataset
from pipeline.datasets import with_content_hashes
from pipeline.datasets.base import DEFAULT_TEMPLATES, DatasetError, Rejections
from pipeline.params import DataParams


def write_image(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def make_tree(root: Path) -> Path:
    """4 images per class; classes created out of order; hidden and non-image files around."""
    for c, name in enumerate(["zebra", "ant", "Moose"]):
        for i in range(4):
            ext = [".jpg", ".PNG", ".jpeg", ".png"][i]
            write_image(root / name / f"img{i}{ext}", 40 * c + i)
    (root / "ant" / ".DS_Store").write_bytes(b"\x00\x01")
    (root / "ant" / "labels.csv").write_text("not an image\n")
    (root / ".cache").mkdir()
    write_image(root / ".cache" / "thumb.jpg", 1)
    (root / "README.txt").write_text("loose file\n")
    return root


def params(root: Path, **overrides) -> DataParams:
    base = dict(source="folder", root=str(root), splits={"train": 0.5, "val": 0.25, "test": 0.25}, download=False)
    return DataParams(**{**base, **overrides})


def test_classes_sorted_and_split_stratified(tmp_path):
    root = make_tree(tmp_path / "tree")
    ds = folder.prepare(params(root), tmp_path / "out")

    # Sorted by name (case-sensitive, as sorted() does); hidden folder skipped.
    assert [c["name"] for c in ds.classes] == ["Moose", "ant", "zebra"]
    assert [c["index"] for c in ds.classes] == [0, 1, 2]
    assert ds.templates == DEFAULT_TEMPLATES
    assert ds.image_root == root
    assert len(ds.images) == 12
    row = ds.images.set_index("image_id").loc["ant/img1"]
    assert row["path"] == "ant/img1.PNG" and row["label"] == 1 and row["class_name"] == "ant"
    assert all((root / p).is_file() for p in ds.images["path"])
    # Stratified: 4 per class -> 2 train, 1 val, 1 test in every class.
    counts = ds.images.groupby(["label", "split"]).size().unstack()
    assert (counts["train"] == 2).all() and (counts["val"] == 1).all() and (counts["test"] == 1).all()
    # labels.csv and README.txt are noted, never fatal; .DS_Store and .cache are ignored silently.
    assert any("non-image" in n and "ant/labels.csv" in n for n in ds.notes)
    assert any("README.txt" in n for n in ds.notes)
    assert ".cache" not in " ".join(ds.images["path"])


def test_split_is_seeded(tmp_path):
    root = make_tree(tmp_path / "tree")
    a = folder.prepare(params(root, seed=3), tmp_path / "a")
    b = folder.prepare(params(root, seed=3), tmp_path / "b")
    assert list(a.images["split"]) == list(b.images["split"])


def test_same_stem_different_extension_keeps_ids_unique(tmp_path):
    root = make_tree(tmp_path / "tree")
    write_image(root / "ant" / "img0.png", 7)  # beside ant/img0.jpg
    ds = folder.prepare(params(root), tmp_path / "out")
    assert {"ant/img0.jpg", "ant/img0.png"} <= set(ds.images["image_id"])


def test_corrupt_image_is_an_error_or_a_rejection(tmp_path):
    root = make_tree(tmp_path / "tree")
    bad = root / "zebra" / "broken.jpg"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 512, dtype=np.uint8).tobytes())
    with pytest.raises(DatasetError, match=r"zebra/broken\.jpg: not a readable image"):
        folder.prepare(params(root), tmp_path / "out")

    ds = folder.prepare(params(root, on_bad_image="skip", on_bad_annotation="skip"), tmp_path / "out")
    assert len(ds.images) == 12
    assert "zebra/broken" not in set(ds.images["image_id"])
    assert len(ds.rejected) == 1 and ds.rejected[0]["path"] == str(bad)


def test_class_without_images_names_the_folder(tmp_path):
    root = make_tree(tmp_path / "tree")
    (root / "empty").mkdir()
    (root / "empty" / "notes.txt").write_text("nothing here\n")
    with pytest.raises(DatasetError, match=r"tree/empty: class folder holds no images"):
        folder.prepare(params(root), tmp_path / "out")


def test_empty_or_missing_tree(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty: no class subfolders"):
        folder.prepare(params(tmp_path / "empty"), tmp_path / "out")
    with pytest.raises(DatasetError, match=r"nowhere: image folder not found"):
        folder.prepare(params(tmp_path / "nowhere"), tmp_path / "out")


def test_prepare_writes_tables_that_load_back(tmp_path):
    root = make_tree(tmp_path / "tree")
    out = tmp_path / "prepared"
    prepare_dataset(params(root), out)
    prepared = load_prepared(out)

    assert prepared.info["source"] == "folder"
    assert prepared.info["n_images_per_split"] == {"train": 6, "val": 3, "test": 3}
    assert prepared.image_root == root
    assert all(p.is_file() for p in prepared.image_files())
    assert prepared.class_names == ["Moose", "ant", "zebra"]
    assert prepared.templates == DEFAULT_TEMPLATES
    assert prepared.captions is None


def test_identical_images_share_a_content_hash_whatever_their_files(tmp_path):
    root = make_tree(tmp_path / "tree")
    shutil.copyfile(root / "ant" / "img0.jpg", root / "zebra" / "copy_of_ant.jpg")  # same bytes, another class
    with Image.open(root / "ant" / "img2.jpeg") as img:
        img.convert("RGB").save(root / "Moose" / "png_of_ant.png")  # other bytes, the same decoded pixels
    out = tmp_path / "prepared"
    prepare_dataset(params(root), out)
    images = load_prepared(out).images.set_index("image_id")
    assert images.at["zebra/copy_of_ant", "content_hash"] == images.at["ant/img0", "content_hash"]
    assert images.at["Moose/png_of_ant", "content_hash"] == images.at["ant/img2", "content_hash"]
    with Image.open(root / "ant" / "img0.jpg") as img:
        rgb = img.convert("RGB")
        expected = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode() + rgb.tobytes()).hexdigest()
    assert images.at["ant/img0", "content_hash"] == expected
    assert images["content_hash"].nunique() == len(images) - 2  # every other image is its own content


@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_an_image_that_cannot_be_read_for_its_hash_is_an_error_or_a_rejection(tmp_path, policy):
    # With data.check_images off nothing checks the files first, so hashing is the first decode.
    root = make_tree(tmp_path / "tree")
    dataset = folder.prepare(params(root, check_images=False, on_bad_image=policy), tmp_path / "out")
    (root / "ant" / "img2.jpeg").unlink()
    rejections = Rejections.from_params(params(root, on_bad_image=policy))
    if policy == "fail":
        with pytest.raises(DatasetError, match=r"tree/ant/img2.jpeg: image file not found \(set data.on_bad_image: skip"):
            with_content_hashes(dataset, rejections)
        return
    images = with_content_hashes(dataset, rejections)
    assert len(images) == 11 and "ant/img2" not in set(images["image_id"]) and images["content_hash"].notna().all()
    assert dataset.rejected == [{"path": str(root / "ant" / "img2.jpeg"), "kind": "image", "reason": "image file not found"}]


def test_prepared_tables_without_content_hashes_are_refused(tmp_path):
    root = make_tree(tmp_path / "tree")
    out = tmp_path / "prepared"
    prepare_dataset(params(root), out)
    images = pd.read_parquet(out / "images.parquet")
    images.drop(columns="content_hash").to_parquet(out / "images.parquet", index=False)
    with pytest.raises(DatasetError, match=r"prepared/images.parquet: no content_hash for every image .* rerun `dvc repro prepare`"):
        load_prepared(out)


def test_a_class_split_leaving_a_split_with_one_class_stops_before_any_image_is_decoded(tmp_path):
    """10 identities with the default 0.8/0.1/0.1 leave val and test one class each: nothing could
    be validated or scored. The error gives the counts and a split that works, before decoding
    (the corrupt file would otherwise be the error)."""
    root = tmp_path / "ids"
    for c in range(10):
        for i in range(2):
            write_image(root / f"id{c}" / f"{i}.png", 20 * c + i)
    (root / "id3" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"data.splits: split_by=class puts the 10 classes into train 8, val 1, test 1; val and test need at least 2 classes each \(e.g. data.splits \{train: 0.60, val: 0.20, test: 0.20\}\)"):
        prepare_dataset(DataParams(source="folder", root=str(root), split_by="class"), tmp_path / "out")
    (root / "id3" / "broken.png").unlink()
    prepare_dataset(DataParams(source="folder", root=str(root), split_by="class", splits={"train": 0.6, "val": 0.2, "test": 0.2}), tmp_path / "out")
    images = load_prepared(tmp_path / "out").images
    assert images.groupby("split")["label"].nunique().to_dict() == {"test": 2, "train": 6, "val": 2}
    with pytest.raises(DatasetError, match=r"test needs at least 2 classes \(e.g. data.splits \{train: 0.80, val: 0.00, test: 0.20\}\)"):
        prepare_dataset(DataParams(source="folder", root=str(root), split_by="class", splits={"train": 0.9, "val": 0.0, "test": 0.1}), tmp_path / "out")
    for c in range(4, 10):
        shutil.rmtree(root / f"id{c}")
    with pytest.raises(DatasetError, match=r"4 classes cannot give train and val and test 2 classes each; use data.split_by=image"):
        prepare_dataset(DataParams(source="folder", root=str(root), split_by="class", splits={"train": 0.5, "val": 0.25, "test": 0.25}), tmp_path / "out")


def _linked_tree(root: Path, outside: Path, links: list[str]) -> Path:
    make_tree(root)
    write_image(outside / "secret.png", 7)
    targets = {"evil": outside, "ant/x.png": outside / "secret.png", "loop": root / "loop", "zebra/inner.png": root / "zebra" / "img0.jpg"}
    for link in links:
        (root / link).symlink_to(targets[link])
    return root


@pytest.mark.parametrize("link, reason", [
    ("evil", "a symlink to {outside}, outside data.root"),  # a class folder that leads out
    ("ant/x.png", "a symlink to {outside}/secret.png, outside data.root"),  # a file that does
    ("loop", "a symlink that resolves to nothing"),  # loop -> loop
])  # fmt: skip
def test_a_link_out_of_the_root_or_in_a_loop_is_refused_or_recorded(tmp_path, link, reason):
    outside = tmp_path / "outside"
    root = _linked_tree(tmp_path / "tree", outside, [link, "zebra/inner.png"])
    expected = reason.format(outside=outside.resolve())
    with pytest.raises(DatasetError, match=re.escape(f"{root / link}: {expected}")):
        folder.prepare(params(root), tmp_path / "out")
    ds = folder.prepare(params(root, on_bad_image="skip"), tmp_path / "out")
    assert set(ds.images["class_name"]) == {"ant", "Moose", "zebra"} and len(ds.images) == 13
    assert "zebra/inner" in set(ds.images["image_id"])  # a link inside the root is an image like any other
    assert [(r["path"], r["reason"][: len(expected)]) for r in ds.rejected] == [(str(root / link), expected)]


def test_classes_too_small_to_fill_every_split_are_refused(tmp_path):
    root = tmp_path / "tiny"
    for c in range(30):
        write_image(root / f"class{c:02d}" / "only.png", c)
    with pytest.raises(DatasetError, match=r"data.splits: split_by=image leaves val and test with no images: 30 images in 30 classes of 1-1 images"):
        folder.prepare(params(root), tmp_path / "out")
    assert set(folder.prepare(params(root, split_by="class"), tmp_path / "out").images["split"]) == {"train", "val", "test"}
