"""Zero-shot classification accuracy from image-to-class-prompt similarities.

Ties: a tie never helps the model. The rank of the true class is the number of OTHER classes
scoring at least as high as it, and a top-K hit needs rank < K; so a top-1 hit is always a top-5
hit, and a class whose prompt embedding equals another class's (CLIP's ImageNet names repeat
"missile" and "sunglasses") can never be a top-1 hit. The same rank scores the layer probe's
k-NN votes (`pipeline.metrics.probe`). Ties are exact float equality; bitwise-identical vectors
are scored once (`dot_scores`), so they always tie.
"""

from __future__ import annotations

import numpy as np


def distinct_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(unique, inverse) with x == unique[inverse]: bitwise-identical rows kept once, in order of
    first appearance, so with no copies unique is x itself.

    Score the unique rows and spread the scores with inverse (`dot_scores`), and identical vectors
    score exactly alike. BLAS (numpy's matmul, FAISS) can score two identical rows a few ulps
    apart, by where they fall in its tiles, which would turn an exact tie into a coin toss.
    """
    x = np.ascontiguousarray(x)
    rows = x.view(np.dtype((np.void, x.dtype.itemsize * x.shape[1]))).reshape(-1)
    _, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
    by_appearance = np.argsort(first)
    renumber = np.empty_like(by_appearance)
    renumber[by_appearance] = np.arange(len(first))
    return x[first[by_appearance]], renumber[inverse.reshape(-1)]


def dot_scores(queries: np.ndarray, unique: np.ndarray, inverse: np.ndarray) -> np.ndarray:
    """queries @ x.T for x given as `distinct_rows(x)`: copies of a row score exactly alike."""
    scores = queries @ unique.T
    # Without copies the spread would be a costly identity (unique is x, in order).
    return scores if len(unique) == len(inverse) else np.take(scores, inverse, axis=1)


def zero_shot_scores(image_emb: np.ndarray, class_emb: np.ndarray) -> np.ndarray:
    """(images, classes) similarities; both sides L2-normalised, so this is cosine similarity.

    Classes with identical prompt embeddings get identical scores (`distinct_rows`).
    """
    return dot_scores(image_emb, *distinct_rows(class_emb))


def scores_among_present_classes(image_emb: np.ndarray, class_emb: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zero-shot scores against the classes present in `labels` only: (scores, each label as a column
    of them, the present classes' indices). A split holding 2 of 10 classes is a 2-way choice."""
    present = np.unique(labels)
    return zero_shot_scores(image_emb, class_emb[present]), np.searchsorted(present, labels), present


def _checked(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, scores = np.asarray(labels, dtype=np.int64), np.asarray(scores)
    if scores.ndim != 2 or labels.shape != (len(scores),):
        raise ValueError(f"expected scores (n, classes) and labels (n,), got {scores.shape} and {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= scores.shape[1]):
        raise ValueError(f"labels must lie in [0, {scores.shape[1]}), got {labels.min()}..{labels.max()}")
    return labels, scores


def true_class_rank(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(n,) rank of each row's true class: how many other classes score at least as high (0 = best).

    Counted as "not strictly lower", so a tie, or a NaN on either side, counts against the model.
    """
    labels, scores = _checked(labels, scores)
    true = np.take_along_axis(scores, labels[:, None], axis=1)
    return (~(scores < true)).sum(axis=1) - 1  # - 1: the true class itself is never lower than itself


def top_k_accuracy(labels: np.ndarray, scores: np.ndarray, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-K accuracy (hit when `true_class_rank` < K): top1 always, topK for each K < classes
    (K >= classes would be trivially 1)."""
    rank = true_class_rank(labels, scores)
    return {f"top{k}": float(np.mean(rank < k)) for k in ks if k == 1 or k < scores.shape[1]}


def predicted_classes(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """(n,) predicted class per row, consistent with the tie rule, for a confusion matrix.

    The argmax, except that when the true class ties for the maximum the prediction is the
    lowest-index other tied class; so the diagonal counts exactly the top-1 hits.
    """
    labels, scores = _checked(labels, scores)
    hit = true_class_rank(labels, scores) == 0
    # Best class other than the true one: the argmax when the true class is not at the top, and
    # the lowest-index other tied class when it shares the top.
    others = np.where(np.arange(scores.shape[1]) == labels[:, None], -np.inf, scores)
    return np.where(hit, labels, others.argmax(axis=1))


def chance_top1(n_classes: int) -> float:
    """Accuracy of a uniform random guess."""
    return 1.0 / n_classes
