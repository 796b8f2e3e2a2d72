"""ImageNet val source: a tiny devkit (meta.mat written with scipy) and a few JPEGs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image

from pipeline.datasets import imagenet
from pipeline.prepared import load_prepared
from pipeline.datasets import prepare as prepare_dataset
from pipeline.datasets.base import DEFAULT_TEMPLATES, DatasetError
from pipeline.params import DataParams

FIELDS = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children", "wordnet_height", "num_train_images"]

# (ILSVRC2012_ID, WNID, words, num_children). ID order differs from WNID order on purpose, two
# leaves share the name "crane", and the non-leaf synsets sort before the leaves by WNID.
SYNSETS = [
    (1, "n03126707", "crane", 0),
    (2, "n01440764", "tench, Tinca tinca", 0),
    (3, "n02012849", "crane", 0),
    (4, "n00001740", "entity", 2),
    (5, "n00002137", "abstraction, abstract entity", 1),
]
# Expected class index per ILSVRC2012_ID: sorted WNIDs n01440764 < n02012849 < n03126707.
INDEX_OF_ID = {2: 0, 3: 1, 1: 2}
# Ground truth: 4 images per leaf class, interleaved.
GROUND_TRUTH = [1, 2, 3] * 4


def write_meta(path: Path, synsets=SYNSETS) -> None:
    """A devkit-style meta.mat: a column struct array `synsets` with the devkit's fields."""
    table = np.zeros((len(synsets), 1), dtype=[(f, object) for f in FIELDS])
    for row, (ilsvrc_id, wnid, words, n_children) in enumerate(synsets):
        children = np.array([1, 2][:n_children], dtype=np.uint16) if n_children else np.zeros((0,), np.uint16)
        table[row, 0] = (ilsvrc_id, wnid, words, f"gloss of {wnid}", n_children, children, 0, 1300)
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"synsets": table})


def write_jpeg(path: Path, value: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def make_imagenet(root: Path, ground_truth=GROUND_TRUTH, *, flat: bool = False, synsets=SYNSETS) -> Path:
    devkit = root if flat else root / "ILSVRC2012_devkit_t12" / "data"
    write_meta(devkit / "meta.mat", synsets)
    (devkit / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{v}\n" for v in ground_truth))
    image_dir = root if flat else root / "val"
    for i in range(1, len(ground_truth) + 1):
        write_jpeg(image_dir / f"ILSVRC2012_val_{i:08d}.JPEG", i * 10)
    return devkit / "ILSVRC2012_validation_ground_truth.txt"


def params(root: Path, **overrides) -> DataParams:
    base = dict(
        source="imagenet",
        root=str(root),
        seed=0,
        splits={"train": 0.5, "val": 0.25, "test": 0.25},
        download=False,
    )
    return DataParams(**{**base, **overrides})


def test_labels_follow_sorted_wnid_order_not_ilsvrc_id(tmp_path):
    root = tmp_path / "imagenet"
    make_imagenet(root)
    ds = imagenet.prepare(params(root), tmp_path / "out")

    assert [c["wnid"] for c in ds.classes] == ["n01440764", "n02012849", "n03126707"]
    assert [c["ilsvrc2012_id"] for c in ds.classes] == [2, 3, 1]
    assert [c["name"] for c in ds.classes] == ["tench", "crane", "crane"]  # duplicate names are fine
    assert ds.classes[0]["aliases"] == ["tench", "Tinca tinca"]
    assert ds.templates == DEFAULT_TEMPLATES

    assert ds.image_root == root / "val"
    assert list(ds.images["image_id"]) == [f"ILSVRC2012_val_{i:08d}" for i in range(1, 13)]
    assert list(ds.images["path"]) == [f"ILSVRC2012_val_{i:08d}.JPEG" for i in range(1, 13)]
    assert list(ds.images["label"]) == [INDEX_OF_ID[v] for v in GROUND_TRUTH]
    assert list(ds.images["class_name"]) == [ds.classes[INDEX_OF_ID[v]]["name"] for v in GROUND_TRUTH]
    # Stratified: each of the 3 classes has 4 images -> 2 train, 1 val, 1 test.
    counts = ds.images.groupby(["label", "split"]).size().unstack()
    assert (counts["train"] == 2).all() and (counts["val"] == 1).all() and (counts["test"] == 1).all()
    assert ds.rejected == []


def test_split_is_seeded(tmp_path):
    root = tmp_path / "imagenet"
    make_imagenet(root)
    a = imagenet.prepare(params(root, seed=1), tmp_path / "a")
    b = imagenet.prepare(params(root, seed=1), tmp_path / "b")
    assert list(a.images["split"]) == list(b.images["split"])


def test_flat_layout_in_root(tmp_path):
    root = tmp_path / "flat"
    make_imagenet(root, flat=True)
    ds = imagenet.prepare(params(root), tmp_path / "out")
    assert ds.image_root == root
    assert len(ds.images) == 12


def test_wnid_subfolder_layout(tmp_path):
    root = tmp_path / "imagenet"
    make_imagenet(root)
    wnid_of_id = {s[0]: s[1] for s in SYNSETS}
    for i, ilsvrc_id in enumerate(GROUND_TRUTH, start=1):
        name = f"ILSVRC2012_val_{i:08d}.JPEG"
        (root / "val" / wnid_of_id[ilsvrc_id]).mkdir(exist_ok=True)
        (root / "val" / name).rename(root / "val" / wnid_of_id[ilsvrc_id] / name)
    ds = imagenet.prepare(params(root), tmp_path / "out")
    assert ds.images["path"].iloc[0] == "n03126707/ILSVRC2012_val_00000001.JPEG"
    assert list(ds.images["label"]) == [INDEX_OF_ID[v] for v in GROUND_TRUTH]


def test_thousand_leaves_use_open_clip_names_and_templates(tmp_path):
    # IDs run opposite to WNID order, as in the real devkit.
    synsets = [(1000 - i, f"n{i:08d}", f"synset {i}, alias", 0) for i in range(1000)]
    root = tmp_path / "imagenet"
    make_imagenet(root, ground_truth=[1000, 1], synsets=synsets)
    ds = imagenet.prepare(params(root, splits={"train": 1.0, "val": 0.0, "test": 0.0}), tmp_path / "out")
    assert len(ds.classes) == 1000
    assert ds.classes[0]["name"] == "tench" and ds.classes[0]["aliases"] == ["synset 0", "alias"]
    assert ds.classes[999]["name"] == "toilet paper"
    assert list(ds.images["label"]) == [0, 999]
    assert len(ds.templates) == 80
    assert ds.templates[0] == "a bad photo of a {}."
    assert all(t.count("{}") == 1 for t in ds.templates)


@pytest.mark.parametrize("bad", ["seven", "4"])  # not an int; a non-leaf ID
def test_malformed_ground_truth_line_names_file_and_line(tmp_path, bad):
    root = tmp_path / "imagenet"
    gt = make_imagenet(root)
    lines = gt.read_text().splitlines()
    lines[2] = bad
    gt.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"ILSVRC2012_validation_ground_truth\.txt:3: "):
        imagenet.prepare(params(root), tmp_path / "out")

    ds = imagenet.prepare(params(root, on_bad_image="skip", on_bad_annotation="skip"), tmp_path / "out")
    assert len(ds.images) == 11
    assert "ILSVRC2012_val_00000003" not in set(ds.images["image_id"])
    assert len(ds.rejected) == 1 and ds.rejected[0]["path"].endswith(":3")


def test_missing_image_is_an_error_or_a_rejection(tmp_path):
    root = tmp_path / "imagenet"
    make_imagenet(root)
    (root / "val" / "ILSVRC2012_val_00000005.JPEG").unlink()
    with pytest.raises(DatasetError, match=r"ILSVRC2012_val_00000005\.JPEG: image for line 5"):
        imagenet.prepare(params(root), tmp_path / "out")
    ds = imagenet.prepare(params(root, on_bad_image="skip", on_bad_annotation="skip"), tmp_path / "out")
    assert len(ds.images) == 11
    assert ds.rejected[0]["path"].endswith("ILSVRC2012_val_00000005.JPEG")


def test_corrupt_image_with_check_images(tmp_path):
    root = tmp_path / "imagenet"
    make_imagenet(root)
    (root / "val" / "ILSVRC2012_val_00000002.JPEG").write_bytes(b"not a jpeg at all")
    with pytest.raises(DatasetError, match=r"ILSVRC2012_val_00000002\.JPEG: not a readable image"):
        imagenet.prepare(params(root), tmp_path / "out")
    ds = imagenet.prepare(params(root, check_images=False), tmp_path / "out")
    assert len(ds.images) == 12


def test_missing_devkit_lists_paths_tried(tmp_path):
    root = tmp_path / "imagenet"
    root.mkdir()
    with pytest.raises(DatasetError) as err:
        imagenet.prepare(params(root), tmp_path / "out")
    message = str(err.value)
    assert str(root / "ILSVRC2012_devkit_t12" / "data" / "meta.mat") in message
    assert str(root / "meta.mat") in message
    assert "ILSVRC2012_img_val.tar" in message and "image-net.org" in message


def test_missing_root_says_what_to_download(tmp_path):
    with pytest.raises(DatasetError, match="ILSVRC2012_devkit_t12.tar.gz"):
        imagenet.prepare(params(tmp_path / "nowhere"), tmp_path / "out")


def test_prepare_writes_tables_that_load_back(tmp_path):
    root = tmp_path / "imagenet"
    make_imagenet(root)
    out = tmp_path / "prepared"
    prepare_dataset(params(root), out)
    prepared = load_prepared(out)

    assert prepared.info["source"] == "imagenet"
    assert prepared.info["n_images"] == 12
    assert prepared.image_root == root / "val"
    assert all(p.is_file() for p in prepared.image_files())
    assert prepared.class_names == ["tench", "crane", "crane"]
    assert [c["wnid"] for c in prepared.classes] == ["n01440764", "n02012849", "n03126707"]
    assert prepared.templates == DEFAULT_TEMPLATES
    assert prepared.captions is None
    assert list(prepared.images["label"]) == [INDEX_OF_ID[v] for v in GROUND_TRUTH]
    assert str(prepared.images["label"].dtype) == "Int64"
