"""Stage 5: every task the data supports -> reports/metrics.json, reports/plots/, reports/figures/, reports/report.md."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import typer

from pipeline import io, params as params_lib
from pipeline.datasets import load_prepared
from pipeline.metrics import tasks
from pipeline.reporting import figures, markdown
from pipeline.retrieval import faiss_index
from pipeline.stage import stage_app


def _read_csv(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.exists() else None


def _retrieval_examples(retrieval: tasks.TaskResult, index: faiss_index.LoadedIndex, image_root: Path, n: int, k: int = 5):
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


def main(
    params_file: Path = typer.Option(params_lib.DEFAULT_PARAMS_FILE, "--params", help="params.yaml to read"),
    data: Path = typer.Option(Path("data/prepared"), help="prepared dataset folder"),
    embeddings: Path = typer.Option(Path("artifacts/embeddings"), help="embeddings folder"),
    index_dir: Path = typer.Option(Path("artifacts/index"), "--index", help="index folder"),
    train_reports: Path = typer.Option(Path("reports/train"), help="training curves folder"),
    reports: Path = typer.Option(Path("reports"), help="reports folder"),
    methods: Path = typer.Option(Path("reports/methods.json"), help="method comparison from bench/compare_methods.py"),
) -> None:
    params = params_lib.load(params_file).evaluate
    start = time.perf_counter()
    prepared = load_prepared(data)
    images, image_emb = io.read_embeddings(embeddings / "images")
    texts, text_emb = io.read_embeddings(embeddings / "texts") if (embeddings / "texts").exists() else (None, None)
    if texts is not None:  # shards carry ids only; the caption text is in the prepared table
        texts = texts.merge(prepared.captions[["caption_id", "caption"]], on="caption_id", how="left", validate="one_to_one")
    _, class_emb = io.read_embeddings(embeddings / "classes.parquet")
    embed_info = io.read_json(embeddings / "embed.json")
    index = faiss_index.load(index_dir)

    if embed_info["model"].get("image_text_aligned", True):
        zero_shot = tasks.zero_shot(images, image_emb, class_emb, prepared.class_names, params.split)
        retrieval = tasks.cross_modal_retrieval(images, image_emb, texts, text_emb, params.split, params.recall_k)
    else:
        reason = f"method '{embed_info['model']['method']}' maps images through a projection head; image and text embeddings no longer share a space"
        zero_shot = retrieval = tasks.TaskResult(tasks.skipped(reason))
    pairs = params.pairs
    verification = tasks.verification(
        images, image_emb, params.threshold_split, params.split, pairs.max_positive, pairs.negatives_per_positive, pairs.seed
    )
    metric_learning = tasks.metric_learning(images, image_emb, params.split)
    index_keys = ("factory", "metric", "n", "dim", "recall@10", "qps", "build_s")

    written: dict[str, str] = {}
    # Whole folders are replaced, so a figure from an earlier run with other tasks cannot linger.
    with io.atomic_dir(reports / "figures") as figure_dir, io.atomic_dir(reports / "plots") as plot_dir:
        if figures.training_curve(_read_csv(train_reports / "loss.csv"), _read_csv(train_reports / "val.csv"), figure_dir / "training_curve.png"):
            written["training_curve"] = "figures/training_curve.png"
        if "skipped" not in zero_shot.metrics:
            figures.confusion(zero_shot.extras["labels"], zero_shot.extras["predicted"], prepared.class_names, figure_dir / "confusion.png")
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
            if params.n_examples:
                queries, hits = _retrieval_examples(retrieval, index, prepared.image_root, params.n_examples)
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

    metrics = {
        "dataset": {"source": prepared.info["source"], "n_images": prepared.info["n_images"], "n_classes": len(prepared.classes), "split": params.split},
        "model": {k: embed_info["model"].get(k) for k in ("name", "pretrained", "method")},
        "zero_shot": zero_shot.metrics,
        "retrieval": retrieval.metrics,
        "verification": verification.metrics,
        "metric_learning": metric_learning.metrics,
        "index": {k: index.info[k] for k in index_keys if k in index.info},
        "timing": {**tasks.stage_timing(prepared.info, embed_info, index.info), "evaluate_s": round(time.perf_counter() - start, 3)},
    }
    io.write_json(reports / "metrics.json", metrics)
    comparison = io.read_json(methods) if methods.exists() else None
    io.write_text(reports / "report.md", markdown.render(metrics, written, comparison))
    summary = []
    if "top1" in zero_shot.metrics:
        summary.append(f"zero-shot top1 {zero_shot.metrics['top1']:.3f} (chance {zero_shot.metrics['chance_top1']:.3f})")
    if "text_to_image" in retrieval.metrics:
        summary.append(f"text->image R@5 {retrieval.metrics['text_to_image'].get('R@5', float('nan')):.3f}")
    if "accuracy" in verification.metrics:
        summary.append(f"verification accuracy {verification.metrics['accuracy']:.3f}")
    if "map_at_r" in metric_learning.metrics:
        summary.append(f"MAP@R {metric_learning.metrics['map_at_r']:.3f}")
    typer.echo(f"evaluate: {', '.join(summary) or 'no task applied'} -> {reports / 'metrics.json'}")


app = stage_app(main)

if __name__ == "__main__":
    app()
