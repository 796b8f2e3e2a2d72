"""Train and evaluate several `train.method`s on one configuration; write reports/methods.json.

Each method runs the stages evaluate needs (not the probe) in a scratch folder (the project's params.yaml with the
overrides below), so the project's own outputs are untouched. `evaluate` reads methods.json
into the "Methods compared" table of reports/report.md; after running this, `dvc repro`
refreshes the report (only evaluate reruns).

    python bench/compare_methods.py                       # none, siamese, triplet on class-disjoint shapes (~8 min, 2 cores)
    python bench/compare_methods.py --method clip --method triplet -S train.epochs=5
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path
from typing import Optional

import typer
import yaml

from pipeline.params import apply_override

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["prepare", "train", "embed", "index", "evaluate"]
# Re-identification setting: test identities never appear in training.
DEFAULT_OVERRIDES = [
    "data.split_by=class",
    "data.synthetic.n_classes=12",
    "data.splits.train=0.5",
    "data.splits.val=0.25",
    "data.splits.test=0.25",
    "index.factory=Flat",
    "index.search_params=",
    # Pinned so the comparison does not move when the default run's CLIP training length changes.
    "train.epochs=30",
    # The tiny model starts from random weights: its whole tower must learn, at the full rate.
    "train.triplet.head_epochs=2",
    "train.triplet.unfreeze_blocks=4",
    "train.triplet.backbone_lr_scale=1.0",
]
KEYS = {
    "verification.accuracy": ("verification", "accuracy"),
    "verification.roc_auc": ("verification", "roc_auc"),
    "verification.eer": ("verification", "eer"),
    "verification.f1": ("verification", "f1"),
    "metric_learning.precision_at_1": ("metric_learning", "precision_at_1"),
    "metric_learning.r_precision": ("metric_learning", "r_precision"),
    "metric_learning.map_at_r": ("metric_learning", "map_at_r"),
}


def run_method(method: str, overrides: list[str], workdir: Path) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for override in overrides + [f"train.method={method}"]:
        apply_override(params, override)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for stage in STAGES:
        start = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", f"pipeline.{stage}"], cwd=workdir, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"{method}: stage {stage} failed:\n{result.stdout}\n{result.stderr}")
        typer.echo(f"  {method:<8} {stage:<8} {time.perf_counter() - start:6.1f}s  {result.stdout.strip().splitlines()[-1]}")
    metrics = json.loads((workdir / "reports/metrics.json").read_text())
    row = {"method": method}
    for name, (section, key) in KEYS.items():
        row[name] = metrics.get(section, {}).get(key)
    # Seconds are not metrics: the train stage writes them beside its outputs.
    row["timing.train_s"] = json.loads((workdir / "reports/timing/train.json").read_text())["train_s"]
    return row


def main(
    method: list[str] = typer.Option(["none", "siamese", "triplet"], help="methods to compare (repeat the option)"),
    set_param: Optional[list[str]] = typer.Option(None, "--set-param", "-S", help="extra override KEY=VALUE, like dvc exp run -S"),
    out: Path = typer.Option(ROOT / "reports/methods.json"),
) -> None:
    overrides = DEFAULT_OVERRIDES + list(set_param or [])
    rows = []
    for name in method:
        with tempfile.TemporaryDirectory(prefix=f"clipline-{name}-") as tmp:
            rows.append(run_method(name, overrides, Path(tmp)))
    payload = {"generated_by": "python bench/compare_methods.py", "date": date.today().isoformat(), "overrides": overrides, "rows": rows}
    out.write_text(json.dumps(payload, indent=2) + "\n")
    columns = [*KEYS, "timing.train_s"]
    typer.echo(f"\n{'method':<10}" + "".join(f"{k.split('.')[-1]:>16}" for k in columns))
    for row in rows:
        typer.echo(f"{row['method']:<10}" + "".join(f"{row[k]:>16.4f}" if isinstance(row[k], float) else f"{str(row[k]):>16}" for k in columns))
    typer.echo(f"-> {out}")


if __name__ == "__main__":
    typer.run(main)
