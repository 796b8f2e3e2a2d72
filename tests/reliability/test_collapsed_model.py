"""A collapsed image tower (every image embedding the same vector) scores at chance or below in
reports/metrics.json: no metric may count its ties as hits."""

import shutil

import numpy as np
import pandas as pd
from conftest import invoke

from pipeline import evaluate, io


def _collapse(shard_folder) -> None:
    """Every image embedding becomes the first one, written back in the same shard format."""
    for shard in sorted(shard_folder.glob("part-*.parquet")):
        meta, vectors = io.read_embeddings(shard)
        io.write_embedding_shard(shard, meta, np.repeat(vectors[:1], len(vectors), axis=0))


def test_a_collapsed_image_tower_scores_at_chance_or_below(artifacts, tmp_path):
    embeddings = tmp_path / "embeddings"
    shutil.copytree(artifacts["emb"], embeddings)
    _collapse(embeddings / "images")
    params = tmp_path / "params.yaml"
    params.write_text("evaluate: {n_examples: 1, recall_k: [1, 5]}\n")
    reports = tmp_path / "reports"
    invoke(
        evaluate.app,
        ["--params", params, "--data", artifacts["data"], "--embeddings", embeddings, "--index", artifacts["index"],
         "--probe", artifacts["probe"], "--train-reports", artifacts["reports"] / "train", "--reports", reports,
         "--timing", tmp_path / "timing.json"],
    )  # fmt: skip
    metrics = io.read_json(reports / "metrics.json")

    zero_shot = metrics["zero_shot"]
    assert zero_shot["top1"] <= zero_shot["chance_top1"]
    n_images = metrics["retrieval"]["n_images"]
    for k in (1, 5):
        # text -> image: every image ties, so the caption's own image ranks last (chance: K / N).
        assert metrics["retrieval"]["text_to_image"][f"R@{k}"] == 0.0
        # image -> text: every image ranks the texts alike, so at most K images can have a caption
        # among the top K (chance: K / N).
        assert metrics["retrieval"]["image_to_text"][f"R@{k}"] <= k / n_images
    verification = metrics["verification"]
    confusion = verification["confusion"]
    majority = max(confusion["tn"] + confusion["fp"], confusion["fn"] + confusion["tp"]) / verification["n_pairs"]
    assert verification["accuracy"] <= majority and verification["roc_auc"] == 0.5
    confusion_rows = pd.read_csv(reports / "plots" / "zero_shot_predictions.csv")
    assert (confusion_rows["actual"] == confusion_rows["predicted"]).mean() == zero_shot["top1"]
