"""Metric learning in-process, class-disjoint: untrained vs siamese vs triplet, one setting changed
at a time, and what the nearest neighbour shares with its query.

The datasets and their overrides are bench/compare_methods.py's (the generated shapes; scikit-learn's
bundled handwritten digits as class folders, split 6/2/2 digits by class: test identities never
appear in training), but each run trains in-process with the train stage's code, so a setting that
is not a param can be changed too, and both best.pt and the last epoch are scored. The test split is
scored exactly as `evaluate` does (MAP@R, precision@1, verification accuracy with the threshold
chosen on val). `--run pixels` scores the raw pixels (L2-normalised) as embeddings. On the shapes,
`nn_same_colours` is the share of test queries whose nearest neighbour has the query's fill and
background colours (neither is the class: it is the shape), and `precision_at_1_other_colours` the
precision@1 of the remaining queries.

    python bench/metric_ablation.py                                  # digits: none, siamese, triplet (~25 min, 2 cores)
    python bench/metric_ablation.py --dataset shapes --run pixels --run none --run triplet
    python bench/metric_ablation.py --run triplet --run triplet:train.grad_clip_norm=5.0
    python bench/metric_ablation.py --run triplet --no-batchnorm-estimate   # the random tower's init statistics

Writes one JSON line per (run, checkpoint) to --out.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import typer
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))  # compare_methods, also when this file is imported by path

from pipeline import models  # noqa: E402
from pipeline import params as params_lib  # noqa: E402
from pipeline.datasets import prepare  # noqa: E402
from pipeline.images import load_rgb  # noqa: E402
from pipeline.metrics import tasks  # noqa: E402
from pipeline.models.encode import encode_images  # noqa: E402
from pipeline.prepared import load_prepared  # noqa: E402
from pipeline.training import metric  # noqa: E402
from pipeline.training.optim import seed_everything  # noqa: E402

from compare_methods import OVERRIDES, write_digits  # noqa: E402


def fill_and_background(path) -> tuple[tuple, tuple]:
    """A shapes image's two colours: the corner pixel's (background) and the commonest other one (the shape)."""
    pixels = np.asarray(load_rgb(path)).reshape(-1, 3)
    background = pixels[0]
    others = pixels[(pixels != background).any(axis=1)]
    colours, counts = np.unique(others, axis=0, return_counts=True)
    return tuple(colours[counts.argmax()]), tuple(background)


def neighbour_colours(prepared, emb: np.ndarray, split: str) -> dict:
    """How often the nearest neighbour (cosine, itself left out) shares the query's two colours, and
    precision@1 of the queries whose neighbour does not."""
    in_split = (prepared.images["split"] == split).to_numpy()
    test = prepared.images[in_split]
    colours = [fill_and_background(path) for path in prepared.image_paths(test)]
    # float64: a random tower in eval mode maps the images within ~1e-4 cosine of one another
    # (median similarity 0.9999 on the shapes), where float32 rounding would pick the neighbour.
    x = emb[in_split].astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    similarity = x @ x.T
    np.fill_diagonal(similarity, -np.inf)
    nearest = similarity.argmax(axis=1)
    same_colours = np.array([colours[i] == colours[j] for i, j in enumerate(nearest)])
    labels = test["label"].to_numpy()
    correct = labels[nearest] == labels
    _, colour_ids = np.unique(np.array([sum(c, ()) for c in colours]), axis=0, return_inverse=True)
    counts = np.bincount(colour_ids)
    return {
        # A neighbour drawn at random from the other test images shares both colours this often.
        "same_colours_by_chance": round(float(((counts[colour_ids] - 1) / (len(colours) - 1)).mean()), 4),
        "nn_same_colours": round(float(same_colours.mean()), 4),
        "precision_at_1_same_colours": round(float(correct[same_colours].mean()), 4) if same_colours.any() else None,
        "precision_at_1_other_colours": round(float(correct[~same_colours].mean()), 4) if (~same_colours).any() else None,
    }


def score(prepared, params, emb: np.ndarray, dataset: str) -> dict:
    ev = params.evaluate
    found = tasks.metric_learning(prepared.images, emb, ev.split).metrics
    verified = tasks.verification(prepared.images, emb, ev.threshold_split, ev.split, ev.pairs.max_positive, ev.pairs.negatives_per_positive, ev.pairs.seed).metrics
    row = {"classes": len(prepared.classes), "map_at_r": round(found["map_at_r"], 4), "precision_at_1": round(found["precision_at_1"], 4), "verification_accuracy": round(verified["accuracy"], 4)}
    if dataset == "shapes":
        row.update(neighbour_colours(prepared, emb, ev.split))
    return row


def raw_pixels(prepared) -> np.ndarray:
    pixels = np.stack([np.asarray(load_rgb(path), dtype=np.float32).reshape(-1) for path in prepared.image_paths(prepared.images)])
    return pixels / np.linalg.norm(pixels, axis=1, keepdims=True)  # as the towers' embeddings are


def run(prepared, raw: dict, spec: str, dataset: str, batchnorm_estimate: bool) -> list[dict]:
    method, _, extra = spec.partition(":")
    raw = json.loads(json.dumps(raw))
    for override in [f"train.method={'none' if method == 'pixels' else method}", *filter(None, extra.split(","))]:
        params_lib.apply_override(raw, override)
    params = params_lib.parse(raw)
    label = {"dataset": dataset, "run": spec + ("" if batchnorm_estimate else " (no batch-norm estimate)")}
    if method == "pixels":
        return [{**label, "checkpoint": "none", "best_epoch": None, **score(prepared, params, raw_pixels(prepared), dataset), "train_s": 0}]
    seed_everything(params.train.seed)
    loaded = models.create_model(params.model.name, params.model.pretrained, "cpu")
    start = time.perf_counter()
    result = None
    if method != "none":
        trainer = {"siamese": metric.train_siamese, "triplet": metric.train_triplet}[method]
        result = trainer(loaded, prepared, params.train)
    rows = []
    for checkpoint in ("best", "last") if result is not None else ("none",):
        if result is not None:
            state = getattr(result, checkpoint)
            loaded.model.load_state_dict(state["model"])
            if "head" in state:
                loaded.image_head.load_state_dict(state["head"])
        loaded.model.eval()
        if loaded.image_head is not None:
            loaded.image_head.eval()
        emb = encode_images(loaded, prepared.image_paths(prepared.images))
        rows.append({
            **label, "checkpoint": checkpoint, "best_epoch": None if result is None else result.best_epoch,
            **score(prepared, params, emb, dataset), "train_s": round(time.perf_counter() - start),
        })  # fmt: skip
    return rows


def main(
    dataset: str = typer.Option("digits", help=f"one of {', '.join(OVERRIDES)}"),
    runs: Optional[list[str]] = typer.Option(None, "--run", help="pixels, or method[:override,override...]; default none, siamese, triplet"),
    batchnorm_estimate: bool = typer.Option(True, help="off: triplet keeps the random tower's init batch-norm statistics (the ablation)"),
    out: Path = typer.Option(ROOT / "reports" / "bench" / "metric_ablation.jsonl", help="JSON lines, appended"),
) -> None:
    if dataset not in OVERRIDES:
        raise typer.BadParameter(f"unknown {dataset!r}; choose from {list(OVERRIDES)}", param_hint="--dataset")
    if not batchnorm_estimate:
        metric.estimate_batchnorm_statistics = lambda *args, **kwargs: False  # the ablation: one change, nothing else
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        overrides = OVERRIDES[dataset] + ([f"data.root={write_digits(Path(tmp) / 'digits')}"] if dataset == "digits" else [])
        for override in overrides:
            params_lib.apply_override(raw, override)
        prepare(params_lib.parse(raw).data, Path(tmp) / "prepared")
        prepared = load_prepared(Path(tmp) / "prepared")
        out.parent.mkdir(parents=True, exist_ok=True)
        for spec in runs or ["none", "siamese", "triplet"]:
            for row in run(prepared, raw, spec, dataset, batchnorm_estimate):
                typer.echo(json.dumps(row))
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    typer.run(main)
