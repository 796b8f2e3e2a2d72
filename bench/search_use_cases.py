"""Measure what `clipline search`, `classify` and `add` do for a user, on the pipeline's outputs.

Run after `dvc repro`, from the project folder (it reads artifacts/, data/prepared and reports/;
added images go to a scratch gallery, never to artifacts/gallery):

    python bench/search_use_cases.py                 # 50 test captions, every test image
    python bench/search_use_cases.py --captions 200 --seed 1

1. Text search: for captions of test images, is a correct image in the top 5 (and top 1)? By the
   evaluate stage's rule, a correct image is any gallery image that carries the caption's exact
   string (many synthetic captions fit several images: "a small red circle at the top" says nothing
   of the background), or an identical copy of one. The oracle column is the same rule's recall
   for embeddings that know which captions fit which images (`oracle_embeddings`): 1.0.
2. Classify: `Predictor.classify` on every test image against evaluate's zero-shot predictions
   (reports/plots/zero_shot_predictions.csv) and zero_shot.top1 (reports/metrics.json).
3. Add: new drawn images are added, then each is searched with `similar`: is it returned first?
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import typer

from pipeline import io
from pipeline.datasets.synthetic import BACKGROUNDS, COLOURS, SHAPES, draw_shape
from pipeline.metrics.retrieval import oracle_embeddings, retrieval_ranks
from pipeline.metrics.tasks import captioned_split
from pipeline.predict import Predictor
from pipeline.prepared import load_prepared

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def text_search(predictor: Predictor, data: Path, n_captions: int, seed: int) -> dict:
    prepared = load_prepared(data)
    gallery_ids = set(predictor.index.ids["image_id"])
    gallery = prepared.images[prepared.images["image_id"].isin(gallery_ids)].reset_index(drop=True)
    # The evaluate stage's rule over the whole gallery: a returned image is correct when it carries
    # the caption's exact string or is an identical copy (the same pixels) of one that does.
    captioned = captioned_split(gallery, prepared.captions, split=None)
    matches, texts = captioned.matches, captioned.texts
    fits = matches.fits()
    content_of = dict(zip(captioned.images["image_id"], matches.image_content))
    test = np.flatnonzero((texts["split"] == "test").to_numpy())
    chosen = np.random.default_rng(seed).choice(test, size=min(n_captions, len(test)), replace=False)
    # The oracle is the same function on embeddings that know which captions fit which images.
    oracle = retrieval_ranks(*oracle_embeddings(matches), matches).text_to_image
    rows = []
    start = time.perf_counter()
    for q in chosen:
        hits = predictor.search_text(texts.at[q, "caption"], 5)
        fitting = fits[matches.text_content[q]].toarray().ravel()
        correct = [bool(fitting[content_of[i]]) if i in content_of else False for i in hits["image_id"]]
        rows.append(
            {
                "template": int(texts.at[q, "caption_id"].rsplit("#", 1)[1]),
                "top1": correct[0],
                "top5": any(correct),
                "oracle_top5": bool(oracle[q] < 5),
            }
        )
    seconds = time.perf_counter() - start
    table = pd.DataFrame(rows)
    return {
        "n": len(table),
        "top1": float(table["top1"].mean()),
        "top5": float(table["top5"].mean()),
        "oracle_top5": float(table["oracle_top5"].mean()),
        "ms_per_query": round(1000 * seconds / len(table), 2),
        "by_template": table.groupby("template")[["top5", "oracle_top5"]].mean().round(3).to_dict("index"),
        "n_images_in_gallery": len(prepared.images),
        "distinct_images_in_gallery": matches.n_distinct_images,
    }


def classify(predictor: Predictor, data: Path, reports: Path) -> dict:
    images = pd.read_parquet(data / "images.parquet")
    test = images[images["split"] == "test"]
    start = time.perf_counter()
    predicted = [predictor.classify(data / path, k=1).at[0, "label"] for path in test["path"]]
    seconds = time.perf_counter() - start
    evaluated = pd.read_csv(reports / "plots" / "zero_shot_predictions.csv")["predicted"].tolist()
    return {
        "n": len(predicted),
        "agree_with_evaluate": float(np.mean(np.array(predicted) == np.array(evaluated))),
        "top1": float(np.mean(np.array(predicted) == test["class_name"].to_numpy())),
        "reports_zero_shot_top1": io.read_json(reports / "metrics.json")["zero_shot"]["top1"],
        "ms_per_image": round(1000 * seconds / len(predicted), 2),
    }


def add_then_search(model: Path, index: Path, data: Path, n_new: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        predictor = Predictor.from_artifacts(model, index, data, gallery_dir=scratch / "gallery")
        for i in range(n_new):
            path = scratch / "new" / f"new_{i}.png"
            path.parent.mkdir(exist_ok=True)
            colour, background = rng.choice(list(COLOURS)), rng.choice(list(BACKGROUNDS))
            side = 64
            draw_shape(rng.choice(SHAPES[:8]), COLOURS[colour], BACKGROUNDS[background], side, *rng.uniform(0.3, 0.7, 2) * side, rng.uniform(0.15, 0.35) * side).save(path)
        start = time.perf_counter()
        report = predictor.add([scratch / "new"])
        add_s = time.perf_counter() - start
        first = [predictor.similar(source, 1).at[0, "image_id"] == image_id for source, image_id in report.added]
        again = predictor.add([scratch / "new"])
        return {
            "n_new": n_new,
            "added": len(report.added),
            "already_present": len(report.duplicates),  # two random drawings can coincide
            "returned_first": float(np.mean(first)),
            "second_add_duplicates": len(again.duplicates),
            "add_s": round(add_s, 3),
        }


@app.command()
def main(
    captions: int = typer.Option(50, help="how many test captions to search with"),
    new_images: int = typer.Option(20, help="how many new images to add"),
    seed: int = typer.Option(0, help="which captions and new images"),
    model: Path = Path("artifacts/model"),
    index: Path = Path("artifacts/index"),
    data: Path = Path("data/prepared"),
    reports: Path = Path("reports"),
) -> None:
    with tempfile.TemporaryDirectory() as scratch:  # an empty gallery: the pipeline's index alone
        predictor = Predictor.from_artifacts(model, index, data, reports / "metrics.json", gallery_dir=scratch)
        search = text_search(predictor, data, captions, seed)
    typer.echo(f"text search, {search['n']} test captions over {predictor.index.index.ntotal} images ({search['ms_per_query']} ms/query):")
    typer.echo(f"  top-1 {search['top1']:.3f}   top-5 {search['top5']:.3f}   oracle top-5 {search['oracle_top5']:.3f}")
    for template, row in search["by_template"].items():
        typer.echo(f"  caption template {template}: top-5 {row['top5']:.3f} (oracle {row['oracle_top5']:.3f})")
    zero_shot = classify(predictor, data, reports)
    typer.echo(
        f"classify, {zero_shot['n']} test images ({zero_shot['ms_per_image']} ms/image): agrees with evaluate on "
        f"{zero_shot['agree_with_evaluate']:.3f}; top-1 {zero_shot['top1']:.4f} vs reports zero_shot.top1 {zero_shot['reports_zero_shot_top1']:.4f}"
    )
    added = add_then_search(model, index, data, new_images, seed)
    typer.echo(
        f"add, {added['n_new']} new images ({added['add_s']} s): {added['added']} added ({added['already_present']} already present), returned first by image search "
        f"{added['returned_first']:.3f}; adding them again: {added['second_add_duplicates']} duplicates"
    )


if __name__ == "__main__":
    app()
