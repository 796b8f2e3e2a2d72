"""Figures for reports/figures/: training curves, similarity heatmap, retrieval examples, confusion."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers or CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline import io  # noqa: E402
from pipeline.images import load_rgb  # noqa: E402


def histogram_bins(values: np.ndarray, n: int) -> np.ndarray:
    """n shared bin edges for `values`, also when they are constant, nearly constant or empty.

    numpy refuses n bins over a range too narrow to split at float precision (an untrained model's
    similarities can all be 1.0 but for rounding); such data gets one narrow window around it.
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return np.linspace(0.0, 1.0, n + 1)
    low, high = float(values.min()), float(values.max())
    if high - low > 1e-9 * max(1.0, abs(low), abs(high)):
        try:
            return np.histogram_bin_edges(values, bins=n)
        except ValueError:  # the range is real but still too narrow for n float steps
            pass
    half = max(1e-3, 1e-3 * abs(low))
    return np.linspace(low - half, high + half, n + 1)


def _save(fig: plt.Figure, path: Path) -> None:
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip("."), dpi=110, bbox_inches="tight")
    plt.close(fig)


def training_curve(loss: pd.DataFrame | None, val: pd.DataFrame | None, path: Path) -> bool:
    """Loss (left) and validation recall (right) per epoch. False when there is nothing to draw."""
    if (loss is None or loss.empty) and (val is None or val.empty):
        return False
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.5))
    if loss is not None and not loss.empty:
        ax_loss.plot(loss["epoch"], loss["loss"], marker=".", label="train")
        ax_loss.set(title="loss", xlabel="epoch", ylabel="loss")
    else:
        ax_loss.text(0.5, 0.5, "no training (method: none)", ha="center", va="center")
        ax_loss.set_axis_off()
    if val is not None and not val.empty:
        shown = [c for c in val.columns if c.endswith("R@5") or c in ("mean_recall", "precision_at_1", "map_at_r")]
        for column in shown:
            ax_val.plot(val["epoch"], val[column], marker=".", label=column)
        ax_val.set(title="validation", xlabel="epoch", ylim=(0, 1.02))
        ax_val.legend(fontsize=8)
    else:
        ax_val.set_axis_off()
    _save(fig, path)
    return True


def similarity_heatmap(image_emb: np.ndarray, text_emb: np.ndarray, image_labels: Sequence[str], path: Path) -> None:
    """Cosine similarity of n images (rows) and one caption of each (columns); a good model is diagonal."""
    sims = image_emb @ text_emb.T
    n = len(sims)
    fig, ax = plt.subplots(figsize=(0.45 * n + 2, 0.45 * n + 1.5))
    im = ax.imshow(sims, cmap="viridis")
    ax.set(xlabel="caption of image j", ylabel="image i", title="image-caption cosine similarity")
    ax.set_yticks(range(n), labels=image_labels, fontsize=7)
    ax.set_xticks(range(n), labels=range(n), fontsize=7)
    fig.colorbar(im, ax=ax, shrink=0.8)
    _save(fig, path)


def retrieval_examples(queries: Sequence[str], hits: Sequence[Sequence[tuple[Path, float, bool]]], path: Path) -> None:
    """One row per text query: its top images with scores, correct ones framed in green."""
    k = max(len(h) for h in hits)
    fig, axes = plt.subplots(len(queries), k + 1, figsize=(1.6 * (k + 1), 1.7 * len(queries)), squeeze=False)
    for row, (query, row_hits) in enumerate(zip(queries, hits)):
        axes[row, 0].text(0, 0.5, textwrap.fill(query, 22), va="center", fontsize=8)
        axes[row, 0].set_axis_off()
        for col in range(k):
            ax = axes[row, col + 1]
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(row_hits):
                ax.set_axis_off()
                continue
            image_path, score, correct = row_hits[col]
            ax.imshow(load_rgb(image_path))
            ax.set_title(f"{score:.2f}", fontsize=7)
            for spine in ax.spines.values():
                spine.set_edgecolor("green" if correct else "lightgray")
                spine.set_linewidth(3 if correct else 1)
    _save(fig, path)


def confusion(labels: np.ndarray, predicted: np.ndarray, class_names: list[str], path: Path) -> None:
    from sklearn.metrics import ConfusionMatrixDisplay  # imported here: a second or more, for two figures

    n = len(class_names)
    fig, ax = plt.subplots(figsize=(0.5 * n + 3, 0.5 * n + 2.5))
    ConfusionMatrixDisplay.from_predictions(
        labels, predicted, labels=np.arange(n), display_labels=class_names, ax=ax, colorbar=False, xticks_rotation=45
    )
    ax.set_title("zero-shot confusion")
    _save(fig, path)


def distance_histograms(distances: np.ndarray, same: np.ndarray, threshold: float, path: Path) -> None:
    """Pair distances of same-class and different-class pairs, overlaid, with the decision threshold."""
    distances, same = np.asarray(distances, dtype=np.float64), np.asarray(same).astype(bool)
    bins = histogram_bins(distances, 40)  # shared bins, so the two shapes line up
    fig, ax = plt.subplots(figsize=(6, 3.5))
    # Densities, so the overlap reads correctly even when there are more negatives than positives.
    for kind, colour, label in ((same, "tab:green", "same class"), (~same, "tab:red", "different class")):
        if kind.any():  # a density of no pairs is 0/0
            ax.hist(distances[kind], bins=bins, density=True, alpha=0.55, color=colour, label=f"{label} ({kind.sum()})")
    ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3f}")
    ax.set(title="pair distances", xlabel="Euclidean distance", ylabel="density")
    ax.legend(fontsize=8)
    _save(fig, path)


def roc_curve_plot(fpr: Sequence[float], tpr: Sequence[float], auc: float, eer: float, path: Path) -> None:
    """ROC of same-vs-different (score: -distance), with chance and the equal-error-rate point."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr, label=f"ROC (AUC {auc:.3f})")
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", label="chance")
    ax.plot([eer], [1 - eer], "o", color="tab:red", label=f"EER {eer:.3f}")  # FPR == FNR = 1 - TPR
    ax.set(title="verification ROC", xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1.02))
    ax.set_aspect("equal")
    ax.legend(fontsize=8, loc="lower right")
    _save(fig, path)


def verification_confusion(confusion: dict, path: Path) -> None:
    """2x2 confusion of verification: rows actual different/same, columns predicted."""
    from sklearn.metrics import ConfusionMatrixDisplay  # imported here: a second or more, for two figures

    matrix = np.array([[confusion["tn"], confusion["fp"]], [confusion["fn"], confusion["tp"]]])
    fig, ax = plt.subplots(figsize=(3.8, 3.3))
    ConfusionMatrixDisplay(confusion_matrix=matrix, display_labels=["different", "same"]).plot(
        ax=ax, colorbar=False, values_format="d"
    )
    ax.set_title("verification confusion")
    _save(fig, path)


def contact_sheet(hits: pd.DataFrame, path: Path, query_image: Optional[Path] = None, query_text: Optional[str] = None) -> None:
    """The query (an image, or a text), then its hits left to right with rank, score and class."""
    fig, axes = plt.subplots(1, len(hits) + 1, figsize=(1.8 * (len(hits) + 1), 2.2), squeeze=False)
    axes = axes[0]
    if query_image is not None:
        axes[0].imshow(load_rgb(query_image))
        axes[0].set_title("query", fontsize=8)
    else:
        axes[0].text(0.5, 0.5, textwrap.fill(query_text or "", 18), ha="center", va="center", fontsize=7, wrap=True)
        axes[0].set_title("query text", fontsize=8)
    for ax, hit in zip(axes[1:], hits.itertuples()):
        ax.imshow(load_rgb(hit.full_path))
        label = "" if pd.isna(hit.class_name) else f"\n{hit.class_name}"
        ax.set_title(f"#{hit.Index + 1} {hit.score:.3f}{label}", fontsize=7)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    _save(fig, Path(path))


def probe_tradeoff(points: dict[str, dict], path: Path, skipped: Optional[str] = None) -> None:
    """Top-1 against time per image (encoder + query), one labelled point per probe."""
    fig, ax = plt.subplots(figsize=(6, 4))
    if skipped:
        ax.text(0.5, 0.5, textwrap.fill(f"probe skipped: {skipped}", 50), ha="center", va="center", transform=ax.transAxes)
    for name, row in points.items():
        total = row["encode_ms"] + row["query_ms"]
        marker = "*" if name == "zero_shot" else "o"
        ax.scatter(total, row["top1"], s=80 if marker == "*" else 40, marker=marker)
        ax.annotate(name, (total, row["top1"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set(xlabel="ms per image (encoder + query)", ylabel="top-1", title="accuracy vs time per probe point", ylim=(0, 1.02), xlim=(0, None))
    _save(fig, path)


def probe_similarity_histograms(neighbours: pd.DataFrame, path: Path) -> None:
    """Per probe: top-1 neighbour similarity of correct vs wrong k-NN predictions."""
    probes = list(dict.fromkeys(neighbours["probe"]))
    fig, axes = plt.subplots(1, len(probes), figsize=(3.2 * len(probes), 2.8), squeeze=False)
    for ax, name in zip(axes[0], probes):
        rows = neighbours[neighbours["probe"] == name]
        bins = histogram_bins(rows["top1_similarity"], 20)
        for correct, colour, label in ((True, "tab:green", "correct"), (False, "tab:red", "wrong")):
            ax.hist(rows.loc[rows["correct"] == correct, "top1_similarity"], bins=bins, alpha=0.6, color=colour, label=label)
        ax.set(title=name, xlabel="top-1 neighbour similarity")
        ax.legend(fontsize=7)
    _save(fig, path)
