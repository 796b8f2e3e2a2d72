"""Stage 5: every task the data supports -> reports/metrics.json, reports/plots/, reports/figures/, reports/report.md."""

from __future__ import annotations

import time
from pathlib import Path

import pandas as pd
import typer

from pipeline import io, preflight
from pipeline.errors import ArtifactError
from pipeline.metrics import tasks
from pipeline.prepared import load_prepared
from pipeline.reporting import markdown, outputs
from pipeline.retrieval import faiss_index
from pipeline.stage import DATA_OPTION, EMBEDDINGS_OPTION, PARAMS_OPTION, load_params, stage_app, timing_option, write_timing


def main(
    params_file: Path = PARAMS_OPTION,
    data: Path = DATA_OPTION,
    embeddings: Path = EMBEDDINGS_OPTION,
    index_dir: Path = typer.Option(Path("artifacts/index"), "--index", help="index folder"),
    probe_dir: Path = typer.Option(Path("artifacts/probe"), "--probe", help="probe results folder"),
    train_reports: Path = typer.Option(Path("reports/train"), help="training curves folder"),
    reports: Path = typer.Option(Path("reports"), help="reports folder"),
    timing: Path = timing_option("evaluate"),
) -> None:
    start = time.perf_counter()
    everything = load_params(params_file)
    params = everything.evaluate
    prepared = load_prepared(data)
    preflight.check_against_data(everything, prepared)
    tasks.check_recall_k(params.recall_k, params.split, prepared.images, prepared.captions)
    images, image_emb = io.read_embeddings(embeddings / "images")
    texts, text_emb = io.read_embeddings(embeddings / "texts") if (embeddings / "texts").exists() else (None, None)
    # Shards carry ids only; the content hashes and caption strings are in the prepared tables.
    images = with_prepared_columns(images, prepared.images, "image_id", ["content_hash"], embeddings / "images", data / "images.parquet")
    if texts is not None:
        captions = prepared.captions if prepared.captions is not None else pd.DataFrame(columns=["caption_id", "caption"])
        texts = with_prepared_columns(texts, captions, "caption_id", ["caption"], embeddings / "texts", data / "captions.parquet")
    _, class_emb = io.read_embeddings(embeddings / "classes.parquet")
    embed_info = io.read_json(embeddings / "embed.json")
    index = faiss_index.load(index_dir)
    if index.index.d != image_emb.shape[1]:
        raise ArtifactError(f"{index_dir}: an index of dimension {index.index.d} for embeddings of dimension {image_emb.shape[1]} ({embeddings / 'images'})", "rerun `dvc repro index`")

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
    index_keys = ("factory", "metric", "n", "dim", "recall@10")

    results = {"zero_shot": zero_shot, "retrieval": retrieval, "verification": verification}
    written, not_drawn = outputs.write(reports, train_reports, results, prepared, index, params.n_examples, probe_dir)
    probe = io.read_json(probe_dir / "probe.json") if (probe_dir / "probe.json").exists() else {"skipped": f"no {probe_dir}/probe.json; run `dvc repro probe`"}

    metrics = {
        "dataset": {
            "source": prepared.info["source"],
            "n_images": prepared.info["n_images"],
            "n_classes": len(prepared.classes),
            "split": params.split,
            # Left out by data.on_bad_image / on_bad_annotation: skip (data/prepared/rejected.parquet).
            "n_rejected_images": prepared.info.get("n_rejected", {}).get("image", 0),
            "n_rejected_annotations": prepared.info.get("n_rejected", {}).get("annotation", 0),
        },
        "model": {k: embed_info["model"].get(k) for k in ("name", "pretrained", "method")},
        "zero_shot": zero_shot.metrics,
        "retrieval": retrieval.metrics,
        "verification": verification.metrics,
        "metric_learning": metric_learning.metrics,
        "index": {k: index.info[k] for k in index_keys if k in index.info},
        "probe": probe.get("points") or {"skipped": probe.get("skipped", "no probe points")},
    }
    # Wall-clock times are in reports/timing/ (one file per stage), never here: metrics.json is a
    # pure function of the stage's inputs, so `dvc metrics diff` after a rerun shows real changes only.
    io.write_json(reports / "metrics.json", metrics)
    io.write_text(reports / "report.md", markdown.render(metrics, written, not_drawn, zero_shot.plots.get("zero_shot_per_class")))
    write_timing(timing, {"evaluate_s": round(time.perf_counter() - start, 3)})
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


def with_prepared_columns(frame: pd.DataFrame, prepared: pd.DataFrame, key: str, columns: list[str], frame_path: Path, prepared_path: Path) -> pd.DataFrame:
    """`frame` (embedding metadata) with `columns` of the prepared table joined on `key`. embed
    embeds every prepared row once, so the ids must match exactly: an id the prepared table lacks
    means other prepared data, a prepared id without a row means shards lost rows (a metric over
    what is left would be a number about another test set), a repeated id a mixed folder."""
    extra = ~frame[key].isin(prepared[key])
    if extra.any():
        raise ArtifactError(
            f"{frame_path}: {int(extra.sum())} {key}s not in {prepared_path} (e.g. {frame.loc[extra, key].iloc[0]!r}): "
            "the embeddings were made from other prepared data",
            "rerun `dvc repro embed`",
        )
    repeated = frame[key].duplicated()
    if repeated.any():
        raise ArtifactError(f"{frame_path}: {int(repeated.sum())} {key}s embedded twice (e.g. {frame.loc[repeated, key].iloc[0]!r})", "rerun `dvc repro embed`")
    lacking = ~prepared[key].isin(frame[key])
    if lacking.any():
        raise ArtifactError(
            f"{frame_path}: no embedding for {int(lacking.sum())} of the {len(prepared)} {key}s in {prepared_path} "
            f"(e.g. {prepared.loc[lacking, key].iloc[0]!r}): the shards are incomplete",
            "rerun `dvc repro embed`",
        )
    return frame.merge(prepared[[key, *columns]], on=key, how="left", validate="one_to_one")


app = stage_app(main)

if __name__ == "__main__":
    app()
