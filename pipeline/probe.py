"""Probe stage: k-NN classification on features cut at several encoder depths -> artifacts/probe/.

    probe.json          per probe point: top1, top5, dim; the zero-shot row
    neighbours.parquet  per probe and query: top-1 neighbour similarity and whether the vote was right

The encoder and index-query times per image are measurements, not results: they go to
reports/timing/probe.json and the accuracy-vs-time figure reports/probe_tradeoff.png, outside the
cached output, so a rerun that reproduces the same accuracies reruns nothing downstream.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import typer

from pipeline import io, preflight
from pipeline.metrics.classification import scores_among_present_classes
from pipeline.metrics.probe import knn_probe, normalise, timed_features, topk_from_scores
from pipeline.models import load_trained
from pipeline.models.encode import PreprocessedImages, encode_class_prompts
from pipeline.models.probe import point_name, probe_encoder, resolve_points, tower_depth
from pipeline.prepared import load_prepared
from pipeline.reporting import figures
from pipeline.stage import DATA_OPTION, MODEL_OPTION, PARAMS_OPTION, load_params, stage_app, timing_option, write_timing


def main(
    params_file: Path = PARAMS_OPTION,
    data: Path = DATA_OPTION,
    model_dir: Path = MODEL_OPTION,
    out: Path = typer.Option(Path("artifacts/probe"), help="probe results folder (replaced atomically)"),
    timing: Path = timing_option("probe"),
    tradeoff_figure: Path = typer.Option(Path("reports/probe_tradeoff.png"), help="accuracy vs time per image, one point per probe"),
) -> None:
    start = time.perf_counter()
    everything = load_params(params_file)
    params, runtime = everything.probe, everything.runtime
    prepared = load_prepared(data)
    preflight.check_against_data(everything, prepared)
    loaded, model_info = load_trained(model_dir, runtime.device)
    images = prepared.images[prepared.images["label"].notna()]
    gallery = images[images["split"] == params.gallery_split]
    queries = images[images["split"] == params.query_split]
    n_classes = len(prepared.classes)
    summary: dict = {"k": params.k, "metric": params.metric}
    rows, neighbour_rows, times = {}, [], {}

    if gallery.empty or queries.empty or n_classes < 2:
        summary["skipped"] = (
            f"needs labelled images in the '{params.gallery_split}' (gallery) and '{params.query_split}' (query) splits and 2+ classes"
        )
    elif not queries["label"].isin(gallery["label"]).any():
        # Class-disjoint splits: a vote among gallery classes can never name a query's class.
        summary["skipped"] = (
            f"no class of the '{params.query_split}' split is in the '{params.gallery_split}' gallery (a class-disjoint split), "
            "so a k-NN vote could never be right"
        )
    else:
        gallery_labels = gallery["label"].to_numpy().astype(np.int64)
        query_labels = queries["label"].to_numpy().astype(np.int64)

        # Each split is preprocessed once (kept in memory when it fits) and encoded at every depth.
        gallery_pixels, query_pixels = (
            PreprocessedImages(loaded, prepared.image_paths(frame), runtime.batch_size, runtime.num_workers, runtime.image_cache_mb)
            for frame in (gallery, queries)
        )
        normalise_pixels = loaded.eval_pixels[1]

        def batches(pixels):  # normalised before the timer starts: encode_ms is the encoder alone
            return (normalise_pixels(batch) for batch in pixels)

        points = resolve_points(params.points, tower_depth(loaded.model.visual))
        final = None  # the full encoder's query features and time, shared with the zero-shot row
        for point in points:
            encode = probe_encoder(loaded, point, params.pooling)
            gallery_features, _ = timed_features(encode, batches(gallery_pixels), loaded.device)
            query_features, encode_s = timed_features(encode, batches(query_pixels), loaded.device)
            if point == "final":
                final = (query_features, encode_s)
            result = knn_probe(gallery_features, gallery_labels, query_features, query_labels, n_classes, params.k, params.metric)
            name = point_name(point)
            rows[name] = {**{k: result[k] for k in ("top1", "top5") if k in result}, "dim": int(query_features.shape[1])}
            times[name] = {"encode_ms": 1000 * encode_s / len(queries), "query_ms": 1000 * result["query_s"] / len(queries)}
            neighbour_rows.append(pd.DataFrame({"probe": name, "top1_similarity": result["top1_similarity"], "correct": result["correct"]}))
            typer.echo(f"probe {name:<10} top1 {rows[name]['top1']:.3f}  encode {times[name]['encode_ms']:.3f} ms  query {times[name]['query_ms']:.3f} ms  dim {rows[name]['dim']}")

        if model_info.get("image_text_aligned", True):
            # Baseline: the full encoder, then one product with the class-prompt embeddings (encoded once).
            class_emb = encode_class_prompts(loaded, prepared.class_names, prepared.templates)
            query_features, encode_s = final or timed_features(probe_encoder(loaded, "final"), batches(query_pixels), loaded.device)
            query_start = time.perf_counter()
            # The candidates are the classes present in the query split, as in evaluate's zero-shot task.
            scores, columns, _ = scores_among_present_classes(normalise(query_features), class_emb, query_labels)
            query_s = time.perf_counter() - query_start
            rows["zero_shot"] = {**topk_from_scores(scores, columns), "dim": int(class_emb.shape[1])}
            times["zero_shot"] = {"encode_ms": 1000 * encode_s / len(queries), "query_ms": 1000 * query_s / len(queries)}
        summary.update(n_gallery=len(gallery), n_queries=len(queries))

    with io.atomic_dir(out) as tmp:
        io.write_json(tmp / "probe.json", {**summary, "points": rows})
        frame = pd.concat(neighbour_rows) if neighbour_rows else pd.DataFrame(columns=["probe", "top1_similarity", "correct"])
        io.write_parquet(tmp / "neighbours.parquet", frame)
    # Drawn even when the probe was skipped (it then says why): DVC expects every declared output.
    figures.probe_tradeoff({name: {**rows[name], **times[name]} for name in rows}, tradeoff_figure, summary.get("skipped"))
    write_timing(
        timing,
        {"probe_s": round(time.perf_counter() - start, 3), "device": str(loaded.device), "batch_size": runtime.batch_size, "points": times},
    )


app = stage_app(main)

if __name__ == "__main__":
    app()
