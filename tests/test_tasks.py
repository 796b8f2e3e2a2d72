"""Evaluation tasks: what they measure, and the reason they give when the data cannot support them."""

import numpy as np
import pandas as pd

from pipeline.metrics import tasks


def _images(splits, labels):
    return pd.DataFrame({"image_id": [f"i{n}" for n in range(len(splits))], "split": splits, "label": pd.array(labels, dtype="Int64")})


def test_zero_shot_uses_only_labelled_images_of_the_split():
    images = _images(["test", "test", "train", "test"], [0, 1, 0, None])
    image_emb = np.array([[1, 0], [0, 1], [0, 1], [1, 0]], dtype=np.float32)
    class_emb = np.eye(2, dtype=np.float32)
    result = tasks.zero_shot(images, image_emb, class_emb, ["cat", "dog"], "test")
    assert result.metrics == {"top1": 1.0, "chance_top1": 0.5, "n": 2, "n_classes": 2}
    assert result.plots["zero_shot_predictions"] == [{"actual": "cat", "predicted": "cat"}, {"actual": "dog", "predicted": "dog"}]


def test_zero_shot_is_skipped_with_a_reason():
    images = _images(["test"], [None])
    emb = np.ones((1, 2), dtype=np.float32)
    assert "no classes" in tasks.zero_shot(images, emb, np.zeros((0, 2)), [], "test").metrics["skipped"]
    assert "no labelled images" in tasks.zero_shot(images, emb, np.eye(2), ["a", "b"], "test").metrics["skipped"]


def test_retrieval_is_skipped_without_captions_and_restricted_to_the_split():
    images = _images(["test", "test", "train"], [0, 1, 0])
    image_emb = np.eye(3, dtype=np.float32)
    skipped = tasks.cross_modal_retrieval(images, image_emb, None, None, "test", [1]).metrics
    assert skipped == {"skipped": "the dataset has no captions"}
    texts = pd.DataFrame({"caption_id": ["c0", "c1", "c2"], "image_id": ["i0", "i1", "i2"], "split": ["test", "test", "train"]})
    # caption of i1 points at i0's direction: t2i R@1 = 1/2 within the test split
    text_emb = np.array([[1, 0, 0], [0.9, 0.1, 0], [0, 0, 1]], dtype=np.float32)
    result = tasks.cross_modal_retrieval(images, image_emb, texts, text_emb, "test", [1])
    assert result.metrics["n_images"] == 2 and result.metrics["n_texts"] == 2
    assert result.metrics["text_to_image"] == {"R@1": 0.5}
    assert tasks.cross_modal_retrieval(images, image_emb, texts.iloc[2:], text_emb[2:], "test", [1]).metrics == {
        "skipped": "no captioned images in the 'test' split"
    }
