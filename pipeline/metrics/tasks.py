"""The evaluation tasks. Each returns its metrics, or {"skipped": reason} when the data cannot
support it, so `reports/metrics.json` always says why a number is missing."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from pipeline.errors import ParamsError
from pipeline.metrics import verification as verification_metrics
from pipeline.metrics.classification import chance_top1, predicted_classes, scores_among_present_classes, top_k_accuracy
from pipeline.metrics.metric_learning import accuracy_at_r, self_excluded_neighbours
from pipeline.metrics.retrieval import ContentMatches, retrieval_ranks


def skipped(reason: str) -> dict:
    return {"skipped": reason}


@dataclass
class TaskResult:
    metrics: dict
    # Rows for DVC plots and data for figures, keyed by name; empty when the task was skipped.
    plots: dict[str, list[dict]] = field(default_factory=dict)
    extras: dict = field(default_factory=dict)


def zero_shot(images: pd.DataFrame, image_emb: np.ndarray, class_emb: np.ndarray, class_names: list[str], split: str) -> TaskResult:
    """Top-1/top-5 of image -> class-prompt similarity on the labelled images of `split`.

    The candidates are the classes present in the split, and chance is over them: a class-disjoint
    test split of 2 unseen classes is a 2-way task (chance 0.5), not a choice among every class of
    the dataset. `predicted` follows the metrics' tie rule (`classification.predicted_classes`), so
    the confusion matrix's diagonal counts exactly the top-1 hits.
    """
    emb, labels = _labelled(images, image_emb, split)
    if len(labels) == 0:
        return TaskResult(skipped(f"no labelled images in the '{split}' split"))
    scores, local, present = scores_among_present_classes(emb, class_emb, labels)
    if len(present) < 2:
        return TaskResult(skipped(f"the '{split}' split holds {len(present)} class(es); zero-shot needs at least 2 to choose from"))
    predicted = present[predicted_classes(local, scores)]
    metrics = {
        **top_k_accuracy(local, scores, (1, 5)),
        "chance_top1": chance_top1(len(present)),
        "n": int(len(labels)),
        "n_classes": int(len(present)),  # the candidates: the classes present in the split
        "n_classes_in_dataset": len(class_names),
    }
    counts = np.bincount(labels, minlength=len(class_names))[present]
    # How many images each class's accuracy rests on: a class with few is a noisy number.
    metrics["n_per_class"] = {"min": int(counts.min()), "max": int(counts.max())}
    hits = predicted == labels
    per_class = [
        {"class": class_names[c], "n": int(n), "top1": float(hits[labels == c].mean())} for c, n in zip(present, counts)
    ]
    rows = [{"actual": class_names[a], "predicted": class_names[p]} for a, p in zip(labels, predicted)]
    return TaskResult(
        metrics,
        plots={"zero_shot_predictions": rows, "zero_shot_per_class": per_class},
        extras={"labels": labels, "predicted": predicted},
    )


@dataclass
class CaptionedSplit:
    """The captioned images of a split, their captions, and which of them are one candidate."""

    images: pd.DataFrame  # the split's images that have captions
    image_rows: np.ndarray  # their rows in the table they came from (and in its embeddings)
    texts: pd.DataFrame  # the captions of those images
    text_rows: np.ndarray
    matches: ContentMatches


def captioned_split(images: pd.DataFrame, texts: pd.DataFrame, split: str | None) -> CaptionedSplit | None:
    """The images of `split` (every image for None) that have captions, with those captions; None
    when there are none. `texts` needs the caption strings (`caption`) and `images` each image's
    `content_hash`, as the prepared tables hold them."""
    in_split = np.ones(len(images), dtype=bool) if split is None else (images["split"] == split).to_numpy()
    text_rows = np.flatnonzero(texts["image_id"].isin(images.loc[in_split, "image_id"]).to_numpy())
    if len(text_rows) == 0:
        return None
    image_rows = np.flatnonzero(in_split & images["image_id"].isin(texts["image_id"].iloc[text_rows]).to_numpy())
    kept, split_texts = images.iloc[image_rows].reset_index(drop=True), texts.iloc[text_rows].reset_index(drop=True)
    row_of_image = pd.Series(np.arange(len(kept)), index=kept["image_id"].to_numpy())
    matches = ContentMatches.build(row_of_image[split_texts["image_id"]].to_numpy(), split_texts["caption"], kept["content_hash"])
    return CaptionedSplit(kept, image_rows, split_texts, text_rows, matches)


def check_recall_k(recall_k: list[int], split: str, images: pd.DataFrame, texts: pd.DataFrame | None) -> None:
    """Recall at K >= the number of distinct candidates is 1 whatever the model: refuse it rather
    than report it. Candidates are counted as the metric counts them (`captioned_split`):
    distinct images of the split's captioned images, distinct caption strings. Train calls it too,
    so a bad value is refused before the training it would otherwise wait for."""
    captioned = None if texts is None else captioned_split(images, texts, split)
    if captioned is None:
        return
    largest = max(recall_k)
    for n, what in ((captioned.matches.n_distinct_images, "distinct captioned images"), (captioned.matches.n_distinct_texts, "distinct captions")):
        if largest >= n:
            raise ParamsError(
                f"evaluate.recall_k: R@{largest} asked for, but the '{split}' split has {n} {what}, "
                f"so recall at {n} or more is 1 whatever the model; use values below {n}"
            )


def cross_modal_retrieval(
    images: pd.DataFrame, image_emb: np.ndarray, texts: pd.DataFrame | None, text_emb: np.ndarray | None, split: str, ks: list[int]
) -> TaskResult:
    """Recall@K text->image and image->text over the images of `split` that have captions, a
    candidate counted once per content (`retrieval.ContentMatches`, built by `captioned_split`)."""
    if texts is None or text_emb is None or len(texts) == 0:
        return TaskResult(skipped("the dataset has no captions"))
    captioned = captioned_split(images, texts, split)
    if captioned is None:
        return TaskResult(skipped(f"no captioned images in the '{split}' split"))
    matches = captioned.matches
    img, txt = image_emb[captioned.image_rows], text_emb[captioned.text_rows]
    ranks = retrieval_ranks(img, txt, matches)
    metrics = ranks.recall(ks)
    for direction, counts in matches.counts().items():
        metrics[direction].update(counts)
    metrics.update(n_images=matches.n_images, n_texts=matches.n_texts, merged=matches.merged())
    return TaskResult(
        metrics,
        plots={"recall_at_k": ranks.curve(max_k=min(max(ks) * 2, matches.n_distinct_images))},
        extras={"images": captioned.images, "image_emb": img, "texts": captioned.texts, "text_emb": txt, "matches": matches},
    )


def _labelled(images: pd.DataFrame, image_emb: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
    mask = ((images["split"] == split) & images["label"].notna()).to_numpy()
    return image_emb[mask], images.loc[mask, "label"].to_numpy().astype(np.int64)


def has_pairs(labels: np.ndarray) -> bool:
    """True when the labels give at least one same-class pair and one different-class pair."""
    counts = np.bincount(labels) if len(labels) else np.array([])
    return bool((counts >= 2).any() and (counts > 0).sum() >= 2)


def verification(
    images: pd.DataFrame, image_emb: np.ndarray, threshold_split: str, split: str, max_positive: int, negatives_per_positive: float, seed: int
) -> TaskResult:
    """Same/different by embedding distance: the threshold is chosen on `threshold_split` (max accuracy)
    and applied unchanged to `split`, so the test score is never tuned on test."""
    chosen_on, chosen_labels = _labelled(images, image_emb, threshold_split)
    scored_on, scored_labels = _labelled(images, image_emb, split)
    for name, labels in ((threshold_split, chosen_labels), (split, scored_labels)):
        if not has_pairs(labels):
            return TaskResult(skipped(f"the '{name}' split needs 2+ labelled classes, one with 2+ images, to form same/different pairs"))

    def distances(emb, labels):
        i, j, same = verification_metrics.make_pairs(labels, negatives_per_positive, max_positive, seed)
        return verification_metrics.pair_distances(emb, i, j), same

    chosen_d, chosen_same = distances(chosen_on, chosen_labels)
    threshold = verification_metrics.choose_threshold(chosen_d, chosen_same)
    scored_d, scored_same = distances(scored_on, scored_labels)
    metrics = verification_metrics.verification_metrics(scored_d, scored_same, threshold)
    metrics["threshold_split"] = threshold_split
    # P(same | distance) for `clipline verify`, fitted where the threshold was chosen and judged on
    # `split`'s pairs: the calibration error says how far its probabilities can be taken at their word.
    calibration = verification_metrics.fit_same_probability(chosen_d, chosen_same)
    probabilities = verification_metrics.same_probability(scored_d, calibration)
    metrics["calibration"] = {
        **calibration,
        "fitted_on": threshold_split,
        **verification_metrics.calibration_metrics(probabilities, scored_same),
    }
    roc = verification_metrics.roc_points(scored_d, scored_same)
    return TaskResult(metrics, extras={"distances": scored_d, "same": scored_same, "roc": roc})


def metric_learning(images: pd.DataFrame, image_emb: np.ndarray, split: str) -> TaskResult:
    """Each image of `split` queries the others (exact FAISS search, itself left out):
    precision@1, R-precision and MAP@R as pytorch-metric-learning defines them."""
    emb, labels = _labelled(images, image_emb, split)
    if not has_pairs(labels):
        return TaskResult(skipped(f"the '{split}' split needs 2+ labelled classes, one with 2+ images"))
    relevant = np.bincount(labels)[labels] - 1
    neighbour_labels, relevant = self_excluded_neighbours(emb, labels, k=int(relevant.max()))
    return TaskResult(accuracy_at_r(neighbour_labels, labels, relevant))
