"""Same/different verification on embedding pairs: is this pair of images one class or two?

A pair is predicted "same" when the Euclidean distance of its embeddings is <= a threshold.
The threshold is fitted with `choose_threshold` on the validation split's pairs and then applied
unchanged to the test split's pairs by the caller (`pipeline.metrics.tasks.verification`), so the
reported test accuracy is never tuned on test.

Ties: a tie never helps the model. Pairs at equal distance always get the same call, so a
threshold can only separate distinct distances, and it lies strictly between the two it separates
(or below the minimum / above the maximum), never on one, so float rounding cannot flip a pair it
was chosen to separate. A collapsed model (every distance equal) calls every pair one way: the
accuracy of always guessing one class.
"""

from __future__ import annotations

import numpy as np

# sklearn.metrics is imported where it is used: it takes a second or more to import, and the
# train stage (which imports make_pairs through the evaluation tasks) never scores pairs.

_CHUNK = 65_536  # pairs per distance block, so (pairs, dim) copies stay small


def _triangle(linear: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Linear index -> (a, b), a < b, with pairs listed as (0,1), (0,2), (1,2), (0,3), ...

    Ordered by b, the block of b starts at b(b-1)/2 whatever the set size, so one formula
    decodes pairs of every class; the two corrections fix float rounding of the square root.
    """
    b = np.floor((1 + np.sqrt(1 + 8 * linear.astype(np.float64))) / 2).astype(np.int64)
    b = np.where(b * (b - 1) // 2 > linear, b - 1, b)
    b = np.where((b + 1) * b // 2 <= linear, b + 1, b)
    return linear - b * (b - 1) // 2, b


def _sample(rng: np.random.Generator, total: int, wanted: int) -> np.ndarray:
    """`wanted` distinct indices of range(total), sorted; all of them when wanted >= total."""
    if wanted >= total:
        return np.arange(total, dtype=np.int64)
    # Without replacement and without shuffling numpy samples in O(wanted) when wanted << total.
    return np.sort(rng.choice(total, size=wanted, replace=False, shuffle=False)).astype(np.int64)


def _ordered(i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((j, i))
    return i[order], j[order]


def make_pairs(
    labels: np.ndarray, n_negative_per_positive: float = 1.0, max_positive: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index pairs (i, j, same) with i < j: positives first, then negatives, each sorted by (i, j).

    Positives are all same-label pairs, or a seeded sample of `max_positive` of them.
    Negatives are round(positives * n_negative_per_positive) distinct different-label pairs
    (all of them if fewer exist). Both are drawn as distinct linear indices into the set of
    such pairs, so there are no duplicates and nothing is enumerated that is not returned.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if n_negative_per_positive < 0:
        raise ValueError(f"n_negative_per_positive must be >= 0, got {n_negative_per_positive}")
    if max_positive is not None and max_positive < 1:
        raise ValueError(f"max_positive must be >= 1 (or None for all), got {max_positive}")
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    counts = counts.astype(np.int64)
    # Images grouped by class, ascending within a class (stable sort), so a < b gives i < j.
    members = np.argsort(inverse, kind="stable").astype(np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    ends = starts + counts

    positive_per_class = counts * (counts - 1) // 2
    n_positive_total = int(positive_per_class.sum())
    if n_positive_total == 0:
        raise ValueError("verification needs at least two images of one class (no same-class pairs)")
    # Class c paired with every image of a later class: each different-class pair exactly once.
    negative_per_class = counts * (len(labels) - ends)
    n_negative_total = int(negative_per_class.sum())
    if n_negative_total == 0:
        raise ValueError("verification needs images of at least two classes (no different-class pairs)")

    rng = np.random.default_rng(seed)
    wanted = n_positive_total if max_positive is None else min(max_positive, n_positive_total)
    linear = _sample(rng, n_positive_total, wanted)
    cls = np.searchsorted(np.cumsum(positive_per_class), linear, side="right")
    a, b = _triangle(linear - (np.cumsum(positive_per_class) - positive_per_class)[cls])
    pos_i, pos_j = _ordered(members[starts[cls] + a], members[starts[cls] + b])

    wanted = min(int(round(len(pos_i) * n_negative_per_positive)), n_negative_total)
    linear = _sample(rng, n_negative_total, wanted)
    cls = np.searchsorted(np.cumsum(negative_per_class), linear, side="right")
    local = linear - (np.cumsum(negative_per_class) - negative_per_class)[cls]
    later = len(labels) - ends[cls]  # images of the classes after cls
    x, y = members[starts[cls] + local // later], members[ends[cls] + local % later]
    neg_i, neg_j = _ordered(np.minimum(x, y), np.maximum(x, y))

    same = np.concatenate([np.ones(len(pos_i), dtype=bool), np.zeros(len(neg_i), dtype=bool)])
    return np.concatenate([pos_i, neg_i]), np.concatenate([pos_j, neg_j]), same


def pair_distances(embeddings: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Euclidean distance of each pair (embeddings[i], embeddings[j]), float64."""
    i, j = np.asarray(i, dtype=np.int64), np.asarray(j, dtype=np.int64)
    if i.shape != j.shape:
        raise ValueError(f"i and j differ in shape: {i.shape} vs {j.shape}")
    out = np.empty(len(i), dtype=np.float64)
    for start in range(0, len(i), _CHUNK):
        block = slice(start, start + _CHUNK)
        diff = embeddings[i[block]].astype(np.float64) - embeddings[j[block]].astype(np.float64)
        out[block] = np.sqrt(np.einsum("ij,ij->i", diff, diff))
    return out


def _checked(distances, same, both_kinds_for: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Matching finite 1-D arrays; with `both_kinds_for`, what needs same and different pairs both."""
    distances = np.asarray(distances, dtype=np.float64)
    same = np.asarray(same).astype(bool)
    if distances.ndim != 1 or distances.shape != same.shape:
        raise ValueError(f"distances {distances.shape} and same {same.shape} must be matching 1-D arrays")
    if len(distances) == 0:
        raise ValueError("no pairs to evaluate")
    if not np.isfinite(distances).all():
        raise ValueError("distances contain NaN or inf (check the embeddings)")
    if both_kinds_for and (same.all() or not same.any()):
        raise ValueError(f"{both_kinds_for} needs both same-class and different-class pairs")
    return distances, same


def choose_threshold(distances: np.ndarray, same: np.ndarray) -> float:
    """The threshold t (same when distance <= t) with the highest accuracy on these pairs.

    Candidates are midpoints between consecutive distinct sorted distances, plus one below the
    minimum and one above the maximum (half the mean gap outside the range). Ties in accuracy go
    to the midpoint of the widest gap, i.e. the largest margin to the nearest pairs on either side;
    the two outer candidates only win when no midpoint ties with them.

    Every candidate lies strictly between the distances it separates: a midpoint that rounds onto
    an endpoint is moved one float inside. When the two distances are adjacent floats nothing lies
    between them, and t = the lower one is the only value that separates them under "<= t".
    """
    distances, same = _checked(distances, same)
    order = np.argsort(distances, kind="stable")
    d, s = distances[order], same[order]
    last_of_value = np.flatnonzero(np.append(d[1:] != d[:-1], True))  # last index of each distinct value
    values = d[last_of_value]
    same_at_or_below = np.cumsum(s)[last_of_value]
    different_at_or_below = (last_of_value + 1) - same_at_or_below
    n_different = int((~s).sum())
    # Correct predictions (integers, so ties are exact) for "same iff distance <= value[k]",
    # preceded by the below-minimum candidate, which calls every pair different.
    correct = np.concatenate([[n_different], same_at_or_below + (n_different - different_at_or_below)])

    lower, upper = values[:-1], values[1:]
    gaps = upper - lower
    middle = lower + gaps / 2
    # Rounding can land a midpoint on an endpoint; pull it back inside where a float lies between.
    middle = np.where(middle >= upper, np.nextafter(upper, -np.inf), middle)
    inside = np.nextafter(lower, np.inf)
    middle = np.where((middle <= lower) & (inside < upper), inside, middle)
    outside = 0.5 * (values[-1] - values[0]) / len(gaps) if len(gaps) else 0.5
    # A tiny spread can round the outer candidates onto the extremes; they must lie strictly outside.
    below = min(values[0] - outside, np.nextafter(values[0], -np.inf))
    above = max(values[-1] + outside, np.nextafter(values[-1], np.inf))
    thresholds = np.concatenate([[below], middle, [above]])
    margins = np.concatenate([[-np.inf], gaps, [-np.inf]])
    best = np.flatnonzero(correct == correct.max())
    return float(thresholds[best[np.argmax(margins[best])]])


def _eer(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Equal error rate: where FPR == FNR (= 1 - TPR), linear between the bracketing ROC points."""
    gap = fpr - (1 - tpr)  # rises from -1 at (0, 0) to +1 at (1, 1)
    k = int(np.argmax(gap >= 0))
    if gap[k] == 0 or k == 0:
        return float(fpr[k])
    t = -gap[k - 1] / (gap[k] - gap[k - 1])
    return float(fpr[k - 1] + t * (fpr[k] - fpr[k - 1]))


def verification_metrics(distances: np.ndarray, same: np.ndarray, threshold: float) -> dict:
    """Accuracy, precision/recall/F1 of "same", ROC AUC and EER at a fixed threshold; JSON-ready."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support, roc_auc_score, roc_curve

    distances, same = _checked(distances, same, both_kinds_for="computing verification metrics")
    predicted = distances <= threshold
    precision, recall, f1, _ = precision_recall_fscore_support(same, predicted, average="binary", zero_division=0)
    tn, fp, fn, tp = confusion_matrix(same, predicted, labels=[False, True]).ravel()
    score = -distances  # sklearn wants "higher means positive"
    fpr, tpr, _ = roc_curve(same, score)
    return {
        "threshold": float(threshold),
        "accuracy": float(accuracy_score(same, predicted)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "roc_auc": float(roc_auc_score(same, score)),
        "eer": _eer(fpr, tpr),
        "n_pairs": int(len(distances)),
        "n_positive": int(same.sum()),
        "confusion": {"tn": int(tn), "fp": int(fp), "fn": int(fn), "tp": int(tp)},
    }


def roc_points(distances: np.ndarray, same: np.ndarray) -> dict[str, list[float]]:
    """ROC curve of the score -distance, as fpr/tpr lists for a plot."""
    from sklearn.metrics import roc_curve

    distances, same = _checked(distances, same)
    fpr, tpr, _ = roc_curve(same, -distances)
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist()}


def fit_same_probability(distances: np.ndarray, same: np.ndarray) -> dict:
    """P(same | distance) by logistic regression on the distance (Platt scaling), with
    scikit-learn's default L2 penalty (C=1): over thousands of pairs it moves the fit by little, and
    it keeps the fit finite when the pairs are separable. Fitted on the threshold split's pairs, where same and
    different pairs come in the evaluation's proportion (`evaluate.pairs.negatives_per_positive`):
    the probability is "same" among pairs drawn that way, not under another prior."""
    from sklearn.linear_model import LogisticRegression

    distances, same = _checked(distances, same, both_kinds_for="fitting a probability of 'same'")
    fit = LogisticRegression().fit(distances.reshape(-1, 1), same)
    return {"intercept": float(fit.intercept_[0]), "coef": float(fit.coef_[0, 0])}


def same_probability(distances: np.ndarray, calibration: dict) -> np.ndarray:
    """The fitted P(same | distance): sigmoid(intercept + coef * distance)."""
    from scipy.special import expit

    return expit(calibration["intercept"] + calibration["coef"] * np.asarray(distances, dtype=np.float64))


def calibration_metrics(probabilities: np.ndarray, same: np.ndarray, n_bins: int = 10) -> dict:
    """How far predicted probabilities of "same" can be taken at their word, on pairs with known answers.

    ece: expected calibration error. Pairs binned by predicted probability into `n_bins` equal-width
    bins (as sklearn.calibration.calibration_curve bins them); the pair-weighted mean over bins of
    |share of same pairs - mean predicted probability|. 0 is perfectly calibrated.
    brier: sklearn's Brier score, the mean squared error of the probabilities (0 is best).
    """
    from sklearn.metrics import brier_score_loss

    probabilities, same = np.asarray(probabilities, dtype=np.float64), np.asarray(same, dtype=bool)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.searchsorted(edges[1:-1], probabilities, side="right")
    predicted = np.bincount(bins, weights=probabilities, minlength=n_bins)
    observed = np.bincount(bins, weights=same.astype(np.float64), minlength=n_bins)
    ece = float(np.abs(observed - predicted).sum() / len(probabilities))
    return {"ece": ece, "brier": float(brier_score_loss(same, probabilities)), "n_bins": n_bins}
