"""Everything evaluate draws or tabulates besides metrics.json: figures/ and plots/ (DVC plots)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from pipeline import io
from pipeline.metrics.tasks import TaskResult
from pipeline.prepared import Prepared
from pipeline.reporting import figures
from pipeline.retrieval.faiss_index import LoadedIndex
from pipeline.training.curves import read_curves


logger = logging.getLogger(__name__)


class Figures:
    """Draws figures into one folder, one at a time. A figure that cannot be drawn is recorded with
    its reason (report.md lists it) and never stops the stage: the metrics matter more."""

    def __init__(self, folder: Path, prefix: str = "figures/"):
        self.folder, self.prefix = folder, prefix
        self.written: dict[str, str] = {}  # role -> path relative to reports/
        self.failed: dict[str, str] = {}  # role -> why it was not drawn

    def draw(self, role: str, filename: str, function: Callable, *args) -> None:
        try:
            drawn = function(*args, self.folder / filename)
        except Exception as err:  # matplotlib and numpy raise many types on degenerate data
            plt.close("all")
            self.failed[role] = f"{type(err).__name__}: {err}"
            logger.warning("figure %s not drawn: %s", filename, self.failed[role])
            return
        if drawn is not False:  # a function returns False when there is nothing to draw
            self.written[role] = self.prefix + filename


def _retrieval_examples(retrieval: TaskResult, index: LoadedIndex, prepared: Prepared, n: int, k: int = 5):
    """The first caption of n evenly spaced images, searched in the FAISS index as a user would.

    A hit is correct by the metrics' rule: an image (of any split) that carries the caption's exact
    string, or an identical copy of one (the same decoded pixels)."""
    texts, text_emb = retrieval.extras["texts"], retrieval.extras["text_emb"]
    first = texts.drop_duplicates("image_id")
    picks = first.index[np.linspace(0, len(first) - 1, num=min(n, len(first)), dtype=int)]
    hits = index.search(text_emb[picks], k)
    content = prepared.images.set_index("image_id")["content_hash"]
    carriers = prepared.captions[prepared.captions["caption"].isin(texts.loc[picks, "caption"])]
    fitting = carriers.assign(content_hash=content[carriers["image_id"]].to_numpy()).groupby("caption")["content_hash"].agg(set)
    rows = [
        [(prepared.image_root / h.path, float(h.score), content.get(h.image_id) in fitting[texts.at[q, "caption"]]) for h in hit.itertuples()]
        for q, hit in zip(picks, hits)
    ]
    return texts.loc[picks, "caption"].tolist(), rows


def write(
    reports: Path,
    train_reports: Path,
    results: dict[str, TaskResult],
    prepared: Prepared,
    index: LoadedIndex,
    n_examples: int,
    probe_dir: Path | None = None,
) -> tuple[dict[str, str], dict[str, str]]:
    """Write reports/figures and reports/plots for the tasks that ran; returns the figures drawn
    (role -> path relative to reports/) and those that could not be (role -> reason)."""
    zero_shot, retrieval, verification = results["zero_shot"], results["retrieval"], results["verification"]
    # Whole folders are replaced, so a figure from an earlier run with other tasks cannot linger.
    with io.atomic_dir(reports / "figures") as figure_dir, io.atomic_dir(reports / "plots") as plot_dir:
        drawn = Figures(figure_dir)
        drawn.draw("training_curve", "training_curve.png", figures.training_curve, *read_curves(train_reports))
        if "skipped" not in zero_shot.metrics:
            drawn.draw("confusion", "confusion.png", figures.confusion, zero_shot.extras["labels"], zero_shot.extras["predicted"], prepared.class_names)
            pd.DataFrame(zero_shot.plots["zero_shot_predictions"]).to_csv(plot_dir / "zero_shot_predictions.csv", index=False)
            pd.DataFrame(zero_shot.plots["zero_shot_per_class"]).to_csv(plot_dir / "zero_shot_per_class.csv", index=False)
        if "skipped" not in retrieval.metrics:
            extras = retrieval.extras
            # Evenly spaced images (not the first n, which are often one class) and one caption each.
            picks = np.linspace(0, len(extras["images"]) - 1, num=min(16, len(extras["images"])), dtype=int)
            first_caption = extras["texts"].reset_index().drop_duplicates("image_id").set_index("image_id")
            first_caption = first_caption.loc[extras["images"]["image_id"].iloc[picks], "index"]
            drawn.draw(
                "heatmap", "similarity_heatmap.png", figures.similarity_heatmap,
                extras["image_emb"][picks], extras["text_emb"][first_caption.to_numpy()], extras["images"]["image_id"].iloc[picks].tolist(),
            )  # fmt: skip
            if n_examples:
                queries, hits = _retrieval_examples(retrieval, index, prepared, n_examples)
                drawn.draw("examples", "retrieval_examples.png", figures.retrieval_examples, queries, hits)
            pd.DataFrame(retrieval.plots["recall_at_k"]).to_csv(plot_dir / "recall_at_k.csv", index=False)
        if "skipped" not in verification.metrics:
            extras, m = verification.extras, verification.metrics
            drawn.draw("distances", "verification_distances.png", figures.distance_histograms, extras["distances"], extras["same"], m["threshold"])
            drawn.draw("roc", "verification_roc.png", figures.roc_curve_plot, extras["roc"]["fpr"], extras["roc"]["tpr"], m["roc_auc"], m["eer"])
            drawn.draw("verification_confusion", "verification_confusion.png", figures.verification_confusion, m["confusion"])
            pd.DataFrame(extras["roc"]).to_csv(plot_dir / "verification_roc.csv", index=False)

        probe = io.read_json(probe_dir / "probe.json") if probe_dir and (probe_dir / "probe.json").exists() else {}
        if probe.get("points"):
            # The accuracy-vs-time figure is the probe stage's own (reports/probe_tradeoff.png): times are not inputs here.
            drawn.written["probe_tradeoff"] = "probe_tradeoff.png"
            drawn.draw("probe_similarity", "probe_similarity.png", figures.probe_similarity_histograms, pd.read_parquet(probe_dir / "neighbours.parquet"))
            rows = [{"probe": name, **row} for name, row in probe["points"].items()]
            pd.DataFrame(rows).to_csv(plot_dir / "probe.csv", index=False)
    return drawn.written, drawn.failed
