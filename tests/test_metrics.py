"""Metric functions on cases small enough to compute by hand."""

import numpy as np
import pytest

from pipeline.metrics.classification import chance_top1, top_k_accuracy
from pipeline.metrics.retrieval import ContentMatches, recall_at_k, recall_curve


def test_top_k_accuracy_hand_computed():
    scores = np.array(
        [
            [0.9, 0.1, 0.0, 0.0, 0.0, 0.0],  # label 0: rank 1
            [0.5, 0.4, 0.3, 0.2, 0.1, 0.0],  # label 2: rank 3
            [0.0, 0.1, 0.2, 0.3, 0.4, 0.5],  # label 0: rank 6
            [0.1, 0.9, 0.0, 0.0, 0.0, 0.0],  # label 1: rank 1
        ]
    )
    labels = np.array([0, 2, 0, 1])
    assert top_k_accuracy(labels, scores, (1, 5)) == {"top1": 0.5, "top5": 0.75}


def test_top5_is_left_out_when_there_are_no_more_than_five_classes():
    scores = np.eye(3)
    assert top_k_accuracy(np.array([0, 1, 2]), scores, (1, 5)) == {"top1": 1.0}
    assert chance_top1(8) == 0.125


def _unit(*rows):
    m = np.array(rows, dtype=np.float32)
    return m / np.linalg.norm(m, axis=1, keepdims=True)


def test_recall_both_ways_with_several_captions_per_image():
    images = np.eye(3, dtype=np.float32)  # dot products are read straight off the text vectors
    texts = np.array(
        [
            [0.9, 0.1, 0.0],  # image 0's caption: image 0 first                  -> rank 0
            [0.2, 0.8, 0.0],  # image 0's caption: image 1 first, image 0 second  -> rank 1
            [0.0, 0.3, 0.7],  # image 1's caption: image 2 first, image 1 second  -> rank 1
            [0.0, 0.0, 1.0],  # image 2's caption: image 2 first                  -> rank 0
        ],
        dtype=np.float32,
    )
    text_image = np.array([0, 0, 1, 2])
    result = recall_at_k(images, texts, ContentMatches.distinct(text_image, 3), ks=(1, 2))
    assert result["text_to_image"] == {"R@1": 0.5, "R@2": 1.0}
    # image 0: own best t0 (0.9) is the top text -> rank 0
    # image 1: own t2 (0.3) is beaten by t1 (0.8) -> rank 1
    # image 2: own t3 (1.0) is the top text -> rank 0
    assert result["image_to_text"] == {"R@1": pytest.approx(2 / 3), "R@2": 1.0}


def test_perfect_embeddings_give_recall_one_and_curve_is_monotonic():
    rng = np.random.default_rng(0)
    images = _unit(*rng.normal(size=(20, 8)))
    texts = np.repeat(images, 5, axis=0)  # five identical captions per image
    text_image = np.repeat(np.arange(20), 5)
    matches = ContentMatches.distinct(text_image, 20)
    result = recall_at_k(images, texts, matches, ks=(1, 5))
    assert result["text_to_image"]["R@1"] == 1.0 and result["image_to_text"]["R@1"] == 1.0
    noisy = texts + rng.normal(scale=0.8, size=texts.shape)
    curve = recall_curve(images, noisy, matches, max_k=20)
    t2i = [row["text_to_image"] for row in curve]
    assert t2i == sorted(t2i) and t2i[-1] == 1.0


def test_recall_rejects_images_without_text():
    images = _unit([1, 0], [0, 1])
    with pytest.raises(ValueError, match="every image needs"):
        recall_at_k(images, images[:1], ContentMatches.distinct([0], 2))
