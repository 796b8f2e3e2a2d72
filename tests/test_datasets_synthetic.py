"""The generated default dataset: seeded, captioned beyond the class, split per image or per class."""

import numpy as np
import pandas as pd

from pipeline.datasets import prepare
from pipeline.prepared import load_prepared
from pipeline.datasets import synthetic
from pipeline.datasets.synthetic import SHAPES, draw_shape
from pipeline.params import DataParams, SplitRatios


def _params(**overrides):
    base = {"synthetic": {"n_classes": 4, "images_per_class": 10, "extra_test_per_class": 0, "image_size": 32}}
    return DataParams(**{**base, **overrides})


def test_same_seed_same_dataset_and_every_class_in_every_split(tmp_path):
    first = prepare(_params(), tmp_path / "a")
    second = prepare(_params(), tmp_path / "b")
    pd.testing.assert_frame_equal(first.images, second.images)
    assert (tmp_path / "a" / first.images["path"].iloc[0]).read_bytes() == (tmp_path / "b" / second.images["path"].iloc[0]).read_bytes()
    per_split = first.images.groupby("split")["label"].nunique()
    assert per_split.to_dict() == {"test": 4, "train": 4, "val": 4}


def test_captions_carry_more_than_the_class(tmp_path):
    dataset = prepare(_params(), tmp_path / "out")
    captions = dataset.captions
    assert captions.groupby("image_id").size().eq(5).all()
    merged = captions.merge(dataset.images[["image_id", "class_name"]], on="image_id")
    assert all(name in caption for name, caption in zip(merged["class_name"], merged["caption"]))
    # Two images of one class must be told apart by the other attributes their captions name.
    assert merged.groupby("class_name")["caption"].nunique().min() > 10


def test_class_split_keeps_identities_out_of_training(tmp_path):
    params = _params(split_by="class", splits=SplitRatios(train=0.5, val=0.25, test=0.25), synthetic={"n_classes": 12, "images_per_class": 4, "extra_test_per_class": 0, "image_size": 32})
    prepare(params, tmp_path / "out")
    images = load_prepared(tmp_path / "out").images
    classes = images.groupby("split")["label"].apply(set)
    assert len(classes["train"]) == 6 and len(classes["val"]) == 3 and len(classes["test"]) == 3
    assert not (classes["train"] & classes["test"]) and not (classes["train"] & classes["val"]) and not (classes["val"] & classes["test"])
    assert sorted(images["class_name"].unique()) == sorted(SHAPES[:12])
    assert np.all(images.groupby("label")["split"].nunique() == 1)


def test_extra_test_images_enlarge_test_only(tmp_path):
    plain = prepare(_params(), tmp_path / "plain").images
    extended = prepare(_params(synthetic={"n_classes": 4, "images_per_class": 10, "extra_test_per_class": 6, "image_size": 32}), tmp_path / "more").images
    # Train and val are the same images, pixel for pixel, with the same splits.
    for split in ("train", "val"):
        a, b = plain[plain["split"] == split], extended[extended["split"] == split]
        pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))
        assert all((tmp_path / "plain" / p).read_bytes() == (tmp_path / "more" / p).read_bytes() for p in a["path"])
    per_class = lambda images: images[images["split"] == "test"].groupby("label").size()  # noqa: E731
    assert (per_class(extended) == per_class(plain) + 6).all()


def test_extra_test_images_go_to_test_classes_only_in_a_class_split(tmp_path):
    synthetic = {"n_classes": 12, "images_per_class": 4, "extra_test_per_class": 5, "image_size": 32}
    params = _params(split_by="class", splits=SplitRatios(train=0.5, val=0.25, test=0.25), synthetic=synthetic)
    images = prepare(params, tmp_path / "out").images
    sizes = images.groupby(["split", "label"]).size()
    assert (sizes["test"] == 9).all() and (sizes["train"] == 4).all() and (sizes["val"] == 4).all()
    assert np.all(images.groupby("label")["split"].nunique() == 1)


def test_every_shape_has_a_silhouette_of_its_own():
    masks = {shape: np.asarray(draw_shape(shape, (255, 255, 255), (0, 0, 0), 64, 32, 32, 0.34 * 64).convert("L")) > 127 for shape in SHAPES}
    for i, a in enumerate(SHAPES):
        for b in SHAPES[i + 1 :]:
            differ = np.logical_xor(masks[a], masks[b]).sum() / max(masks[a].sum(), masks[b].sum())
            assert differ > 0.1, f"{a} and {b} share all but {differ:.0%} of their pixels"


def test_more_shapes_leave_the_first_classes_images_unchanged(tmp_path, monkeypatch):
    params = _params(splits=SplitRatios(train=0.5, val=0.25, test=0.25), synthetic={"n_classes": 4, "images_per_class": 4, "extra_test_per_class": 1, "image_size": 32})
    full = prepare(params, tmp_path / "full")
    monkeypatch.setattr(synthetic, "SHAPES", synthetic.SHAPES[:4])
    short = prepare(params, tmp_path / "short")
    pd.testing.assert_frame_equal(full.images, short.images)
    for path in full.images["path"]:
        assert (tmp_path / "full" / path).read_bytes() == (tmp_path / "short" / path).read_bytes()
