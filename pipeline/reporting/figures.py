"""Figures for reports/figures/: training curves, similarity heatmap, retrieval examples, confusion."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers or CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402

from pipeline import io  # noqa: E402
from pipeline.datasets.base import load_rgb  # noqa: E402


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
        ax_loss.plot(loss["epoch"], loss["loss"], marker=".")
        ax_loss.set(title="training loss", xlabel="epoch", ylabel="loss")
    else:
        ax_loss.text(0.5, 0.5, "no training (method: none)", ha="center", va="center")
        ax_loss.set_axis_off()
    if val is not None and not val.empty:
        for column in [c for c in val.columns if c.endswith("R@5")] + ["mean_recall"]:
            ax_val.plot(val["epoch"], val[column], marker=".", label=column)
        ax_val.set(title="validation recall", xlabel="epoch", ylim=(0, 1.02))
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
    n = len(class_names)
    fig, ax = plt.subplots(figsize=(0.5 * n + 3, 0.5 * n + 2.5))
    ConfusionMatrixDisplay.from_predictions(
        labels, predicted, labels=np.arange(n), display_labels=class_names, ax=ax, colorbar=False, xticks_rotation=45
    )
    ax.set_title("zero-shot confusion")
    _save(fig, path)
