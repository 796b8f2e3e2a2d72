"""Zero-shot classification accuracy from image-to-class-prompt similarities."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import top_k_accuracy_score


def zero_shot_scores(image_emb: np.ndarray, class_emb: np.ndarray) -> np.ndarray:
    """(images, classes) similarities; both sides L2-normalised, so this is cosine similarity."""
    return image_emb @ class_emb.T


def top_k_accuracy(labels: np.ndarray, scores: np.ndarray, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-K accuracy for each K that is smaller than the number of classes (K >= classes is trivially 1)."""
    n_classes = scores.shape[1]
    out = {}
    for k in ks:
        if k == 1:
            out["top1"] = float(np.mean(scores.argmax(axis=1) == labels))
        elif k < n_classes:
            out[f"top{k}"] = float(top_k_accuracy_score(labels, scores, k=k, labels=np.arange(n_classes)))
    return out


def chance_top1(n_classes: int) -> float:
    """Accuracy of a uniform random guess."""
    return 1.0 / n_classes
