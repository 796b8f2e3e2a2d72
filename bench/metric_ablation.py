"""Metric learning on real handwritten digits, class-disjoint: untrained vs siamese vs triplet, and
triplet with one setting changed at a time.

The digits are scikit-learn's bundled copy of the UCI handwritten digits (1,797 8x8 images, 10
classes; no download), written as class folders (dark strokes on white, 32x32) and prepared by the
`folder` source with `data.split_by=class` and splits 0.6/0.2/0.2: test identities (digits) never
appear in training, 2 in val, 2 in test. Each run trains in-process with the train stage's code
(the rest of params.yaml at its defaults), then scores the test split exactly as `evaluate` does
(MAP@R, precision@1, verification accuracy with the threshold chosen on val), for best.pt and for
the last epoch.

    python bench/triplet_digits.py                                   # none, siamese, triplet (~25 min, 2 cores)
    python bench/triplet_digits.py --run triplet --run triplet:train.grad_clip_norm=5.0
    python bench/triplet_digits.py --run triplet --no-batchnorm-estimate   # the random tower's init statistics

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

from pipeline import models  # noqa: E402
from pipeline import params as params_lib  # noqa: E402
from pipeline.datasets import prepare  # noqa: E402
from pipeline.metrics import tasks  # noqa: E402
from pipeline.models.encode import encode_images  # noqa: E402
from pipeline.prepared import load_prepared  # noqa: E402
from pipeline.training import metric  # noqa: E402
from pipeline.training.optim import seed_everything  # noqa: E402

DATA = ["data.source=folder", "data.split_by=class", "data.splits.train=0.6", "data.splits.val=0.2", "data.splits.test=0.2"]


def write_digits(root: Path) -> Path:
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for n, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        dark_on_white = 255 - (pixels / 16 * 255).astype(np.uint8)
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(dark_on_white).resize((32, 32), Image.NEAREST).convert("RGB").save(root / str(label) / f"{n:04d}.png")
    return root


def run(prepared, raw: dict, spec: str, batchnorm_estimate: bool) -> list[dict]:
    method, _, extra = spec.partition(":")
    raw = json.loads(json.dumps(raw))
    for override in [f"train.method={method}", *filter(None, extra.split(","))]:
        params_lib.apply_override(raw, override)
    params = params_lib.parse(raw)
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
        ev = params.evaluate
        found = tasks.metric_learning(prepared.images, emb, ev.split).metrics
        verified = tasks.verification(prepared.images, emb, ev.threshold_split, ev.split, ev.pairs.max_positive, ev.pairs.negatives_per_positive, ev.pairs.seed).metrics
        rows.append({
            "run": spec + ("" if batchnorm_estimate else " (no batch-norm estimate)"), "checkpoint": checkpoint,
            "best_epoch": None if result is None else result.best_epoch,
            "map_at_r": round(found["map_at_r"], 4), "precision_at_1": round(found["precision_at_1"], 4),
            "verification_accuracy": round(verified["accuracy"], 4), "train_s": round(time.perf_counter() - start),
        })  # fmt: skip
    return rows


def main(
    runs: Optional[list[str]] = typer.Option(None, "--run", help="method[:override,override...]; default none, siamese, triplet"),
    batchnorm_estimate: bool = typer.Option(True, help="off: triplet keeps the random tower's init batch-norm statistics (the ablation)"),
    out: Path = typer.Option(ROOT / "reports" / "bench" / "triplet_digits.jsonl", help="JSON lines, appended"),
) -> None:
    if not batchnorm_estimate:
        metric.estimate_batchnorm_statistics = lambda *args, **kwargs: False  # the ablation: one change, nothing else
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        for override in [*DATA, f"data.root={write_digits(Path(tmp) / 'digits')}"]:
            params_lib.apply_override(raw, override)
        prepare(params_lib.parse(raw).data, Path(tmp) / "prepared")
        prepared = load_prepared(Path(tmp) / "prepared")
        out.parent.mkdir(parents=True, exist_ok=True)
        for spec in runs or ["none", "siamese", "triplet"]:
            for row in run(prepared, raw, spec, batchnorm_estimate):
                typer.echo(json.dumps(row))
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    typer.run(main)
