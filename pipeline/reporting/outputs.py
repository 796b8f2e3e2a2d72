"""Everything evaluate draws or tabulates besides metrics.json: figures/ and plots/ (DVC plots)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import io
from pipeline.metrics.tasks import TaskResult
from pipeline.reporting import figures
from pipeline.retrieval.faiss_index import LoadedIndex


def _read_csv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.exists() else None


def _retrieval_examples(retrieval: TaskResult, index: LoadedIndex, image_root: Path, n: int, k: int = 5):
    """The first caption of n evenly spaced images, searched in the FAISS index as a user would."""
    texts, text_emb = retrieval.extras["texts"], retrieval.extras["text_emb"]
    first = texts.drop_duplicates("image_id")
    picks = first.index[np.linspace(0, len(first) - 1, num=min(n, len(first)), dtype=int)]
    hits = index.search(text_emb[picks], k)
    rows = [
        [(image_root / h.path, float(h.score), h.image_id == texts.at[q, "image_id"]) for h in hit.itertuples()]
        for q, hit in zip(picks, hits)
    ]
    return texts.loc[picks, "caption"].tolist(), rows


def write(
    reports: Path,
    train_reports: Path,
    results: dict[str, TaskResult],
    class_names: list[str],
    index: LoadedIndex,
    image_root: Path,
    n_examples: int,
    probe_dir: Path | None = None,
) -> dict[str, str]:
    """Write reports/figures and reports/plots for the tasks that ran; returns figure role -> path."""
    zero_shot, retrieval, verification = results["zero_shot"], results["retrieval"], results["verification"]
    written: dict[str, str] = {}
    # Whole folders are replaced, so a figure from an earlier run with other tasks cannot linger.
    with io.atomic_dir(reports / "figures") as figure_dir, io.atomic_dir(reports / "plots") as plot_dir:
        if figures.training_curve(_read_csv(train_reports / "loss.csv"), _read_csv(train_reports / "val.csv"), figure_dir / "training_curve.png"):
            written["training_curve"] = "figures/training_curve.png"
        if "skipped" not in zero_shot.metrics:
            figures.confusion(zero_shot.extras["labels"], zero_shot.extras["predicted"], class_names, figure_dir / "confusion.png")
            written["confusion"] = "figures/confusion.png"
            pd.DataFrame(zero_shot.plots["zero_shot_predictions"]).to_csv(plot_dir / "zero_shot_predictions.csv", index=False)
        if "skipped" not in retrieval.metrics:
            extras = retrieval.extras
            # Evenly spaced images (not the first n, which are often one class) and one caption each.
            picks = np.linspace(0, len(extras["images"]) - 1, num=min(16, len(extras["images"])), dtype=int)
            first_caption = extras["texts"].reset_index().drop_duplicates("image_id").set_index("image_id")
            first_caption = first_caption.loc[extras["images"]["image_id"].iloc[picks], "index"]
            figures.similarity_heatmap(
                extras["image_emb"][picks],
                extras["text_emb"][first_caption.to_numpy()],
                extras["images"]["image_id"].iloc[picks].tolist(),
                figure_dir / "similarity_heatmap.png",
            )
            written["heatmap"] = "figures/similarity_heatmap.png"
            if n_examples:
                queries, hits = _retrieval_examples(retrieval, index, image_root, n_examples)
                figures.retrieval_examples(queries, hits, figure_dir / "retrieval_examples.png")
                written["examples"] = "figures/retrieval_examples.png"
            pd.DataFrame(retrieval.plots["recall_at_k"]).to_csv(plot_dir / "recall_at_k.csv", index=False)
        if "skipped" not in verification.metrics:
            extras, m = verification.extras, verification.metrics
            figures.distance_histograms(extras["distances"], extras["same"], m["threshold"], figure_dir / "verification_distances.png")
            figures.roc_curve_plot(extras["roc"]["fpr"], extras["roc"]["tpr"], m["roc_auc"], m["eer"], figure_dir / "verification_roc.png")
            figures.verification_confusion(m["confusion"], figure_dir / "verification_confusion.png")
            written.update(
                distances="figures/verification_distances.png",
                roc="figures/verification_roc.png",
                verification_confusion="figures/verification_confusion.png",
            )
            pd.DataFrame(extras["roc"]).to_csv(plot_dir / "verification_roc.csv", index=False)

        probe = io.read_json(probe_dir / "probe.json") if probe_dir and (probe_dir / "probe.json").exists() else {}
        if probe.get("points"):
            # The accuracy-vs-time figure is the probe stage's own (reports/probe_tradeoff.png): times are not inputs here.
            figures.probe_similarity_histograms(pd.read_parquet(probe_dir / "neighbours.parquet"), figure_dir / "probe_similarity.png")
            written.update(probe_tradeoff="probe_tradeoff.png", probe_similarity="figures/probe_similarity.png")
            rows = [{"probe": name, **row} for name, row in probe["points"].items()]
            pd.DataFrame(rows).to_csv(plot_dir / "probe.csv", index=False)
    return written
