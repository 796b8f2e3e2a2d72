"""Evaluation tasks: what they measure, and the reason they give when the data cannot support them."""

import numpy as np
import pytest
import pandas as pd

from pipeline.errors import ParamsError
from pipeline.metrics import tasks


def _images(splits, labels):
    return pd.DataFrame({"image_id": [f"i{n}" for n in range(len(splits))], "split": splits, "label": pd.array(labels, dtype="Int64")})


def test_zero_shot_uses_only_labelled_images_of_the_split():
    images = _images(["test", "test", "train", "test"], [0, 1, 0, None])
    image_emb = np.array([[1, 0], [0, 1], [0, 1], [1, 0]], dtype=np.float32)
    class_emb = np.eye(2, dtype=np.float32)
    result = tasks.zero_shot(images, image_emb, class_emb, ["cat", "dog"], "test")
    assert result.metrics == {"top1": 1.0, "chance_top1": 0.5, "n": 2, "n_classes": 2, "n_classes_in_dataset": 2, "n_per_class": {"min": 1, "max": 1}}
    assert result.plots["zero_shot_predictions"] == [{"actual": "cat", "predicted": "cat"}, {"actual": "dog", "predicted": "dog"}]


def test_zero_shot_counts_images_and_accuracy_per_class():
    images = _images(["test"] * 5 + ["train"], [0, 0, 0, 2, 2, 1])
    # Class 0: two of three right; class 2: one of two (the other image ties 0 and 2: counted against it).
    image_emb = np.array([[1, 0, 0], [1, 0, 0], [0, 0, 1], [0, 0, 1], [1, 0, 1], [0, 1, 0]], dtype=np.float32)
    result = tasks.zero_shot(images, image_emb, np.eye(3, dtype=np.float32), ["a", "b", "c"], "test")
    assert result.metrics["n_per_class"] == {"min": 2, "max": 3}
    assert result.plots["zero_shot_per_class"] == [{"class": "a", "n": 3, "top1": 2 / 3}, {"class": "c", "n": 2, "top1": 0.5}]


def test_zero_shot_chooses_among_the_classes_present_in_the_split():
    """A class-disjoint test split of 2 of 4 classes is a 2-way task: chance 0.5, not 0.25, and an
    image cannot be 'wrong' by picking a class that is not among the test's."""
    images = _images(["test"] * 4 + ["train"] * 2, [2, 2, 3, 3, 0, 1])
    class_emb = np.eye(4, dtype=np.float32)
    # Each test image is nearest to a training class (0 or 1), then to its own class.
    image_emb = np.array([[0.9, 0, 0.4, 0], [0, 0.9, 0.4, 0], [0.9, 0, 0, 0.4], [0, 0.9, 0, 0.4], [1, 0, 0, 0], [0, 1, 0, 0]], dtype=np.float32)
    result = tasks.zero_shot(images, image_emb, class_emb, ["a", "b", "c", "d"], "test")
    assert result.metrics["top1"] == 1.0 and result.metrics["chance_top1"] == 0.5
    assert result.metrics["n_classes"] == 2 and result.metrics["n_classes_in_dataset"] == 4
    assert result.extras["predicted"].tolist() == [2, 2, 3, 3]  # in the dataset's class indices


def test_zero_shot_is_skipped_with_a_reason():
    images = _images(["test"], [None])
    emb = np.ones((1, 2), dtype=np.float32)
    assert "no labelled images" in tasks.zero_shot(images, emb, np.zeros((0, 2)), [], "test").metrics["skipped"]
    assert "no labelled images" in tasks.zero_shot(images, emb, np.eye(2), ["a", "b"], "test").metrics["skipped"]
    one_class = _images(["test", "test"], [1, 1])
    assert "holds 1 class(es)" in tasks.zero_shot(one_class, np.ones((2, 2)), np.eye(2), ["a", "b"], "test").metrics["skipped"]


def test_retrieval_is_skipped_without_captions_and_restricted_to_the_split():
    images = _images(["test", "test", "train"], [0, 1, 0]).assign(content_hash=["h0", "h1", "h2"])
    image_emb = np.eye(3, dtype=np.float32)
    skipped = tasks.cross_modal_retrieval(images, image_emb, None, None, "test", [1]).metrics
    assert skipped == {"skipped": "the dataset has no captions"}
    texts = pd.DataFrame(
        {"caption_id": ["c0", "c1", "c2"], "image_id": ["i0", "i1", "i2"], "split": ["test", "test", "train"], "caption": ["a", "b", "a"]}
    )
    # caption of i1 points at i0's direction: t2i R@1 = 1/2 within the test split (the train
    # image's copy of string "a" is not a candidate there)
    text_emb = np.array([[1, 0, 0], [0.9, 0.1, 0], [0, 0, 1]], dtype=np.float32)
    result = tasks.cross_modal_retrieval(images, image_emb, texts, text_emb, "test", [1])
    assert result.metrics["n_images"] == 2 and result.metrics["n_texts"] == 2
    assert result.metrics["text_to_image"] == {"R@1": 0.5, "n_queries": 2, "n_candidates": 2}
    assert result.metrics["merged"] == {"repeated_captions": 0, "identical_images": 0}
    assert tasks.cross_modal_retrieval(images, image_emb, texts.iloc[2:], text_emb[2:], "test", [1]).metrics == {
        "skipped": "no captioned images in the 'test' split"
    }


def test_verification_threshold_comes_from_val_and_is_applied_unchanged_to_test():
    # 1-D points: in val, same-class pairs are 0.2 apart and different ones >= 1.0, so the widest
    # gap puts the threshold at 0.6. In test, same-class pairs are 0.8 apart: a threshold tuned on
    # test would score 1.0, the val threshold calls them different.
    x = [0.0, 0.2, 1.2, 1.4, 0.0, 0.8, 2.5, 3.3]
    images = _images(["val"] * 4 + ["test"] * 4, [0, 0, 1, 1, 0, 0, 1, 1])
    emb = np.array([[v, 0.0] for v in x], dtype=np.float32)
    result = tasks.verification(images, emb, "val", "test", max_positive=100, negatives_per_positive=2.0, seed=0)
    m = result.metrics
    assert m["threshold"] == pytest.approx(0.6) and m["threshold_split"] == "val"
    assert m["n_pairs"] == 6 and m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion"] == {"tn": 4, "fp": 0, "fn": 2, "tp": 0}
    assert m["roc_auc"] == 1.0  # the ranking is perfect; only the transferred threshold is off
    # P(same) is fitted on the val pairs too: separable there, the fit stays finite and falls with distance.
    calibration = m["calibration"]
    assert calibration["fitted_on"] == "val" and calibration["coef"] < 0 and np.isfinite([calibration["intercept"], calibration["coef"]]).all()
    assert 0 <= calibration["ece"] <= 1 and 0 <= calibration["brier"] <= 1 and calibration["n_bins"] == 10


def test_verification_and_metric_learning_skip_without_pairs():
    images = _images(["val", "test"], [0, 1])
    emb = np.eye(2, dtype=np.float32)
    assert "needs 2+ labelled classes" in tasks.verification(images, emb, "val", "test", 10, 1.0, 0).metrics["skipped"]
    assert "needs 2+ labelled classes" in tasks.metric_learning(images, emb, "test").metrics["skipped"]


def test_metric_learning_scores_a_clustered_split():
    images = _images(["test"] * 4, [0, 0, 1, 1])
    emb = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=np.float32)
    assert tasks.metric_learning(images, emb, "test").metrics == {"precision_at_1": 1.0, "r_precision": 1.0, "map_at_r": 1.0, "n_queries": 4}


def test_recall_k_at_or_above_the_distinct_candidates_is_refused_before_scoring():
    """Four test images, two of them pixel-identical (one candidate), and five captions of which
    two pairs are the same string: 3 distinct images, 3 distinct captions. R@3 is 1 for any model."""
    images = _images(["test"] * 4 + ["train"], [None] * 5).assign(content_hash=["a", "b", "c", "c", "d"])
    captions = pd.DataFrame({
        "caption_id": [f"c{n}" for n in range(6)],
        "image_id": ["i0", "i1", "i2", "i3", "i3", "i4"],
        "caption": ["red", "blue", "green", "green", "red", "train only"],
    })  # fmt: skip
    tasks.check_recall_k([1, 2], "test", images, captions)
    with pytest.raises(ParamsError, match=r"evaluate.recall_k: R@3 .* 'test' split has 3 distinct captioned images"):
        tasks.check_recall_k([1, 3], "test", images, captions)
    four_images = images.assign(content_hash=["a", "b", "c", "e", "d"])
    with pytest.raises(ParamsError, match=r"R@3 .* 3 distinct captions"):
        tasks.check_recall_k([3], "test", four_images, captions)
    tasks.check_recall_k([3], "test", four_images, captions.assign(caption=["red", "blue", "green", "teal", "red", "x"]))
    tasks.check_recall_k([100], "test", images, None)  # no captions: nothing to refuse
