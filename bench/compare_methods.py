"""Train and evaluate several `train.method`s on one configuration as DVC experiments; write
reports/methods.json.

Each method is one queued experiment (`dvc exp run --queue -S train.method=... -S ...`) run by
`dvc exp run --run-all`, so it runs in DVC's own temporary workspace from the current commit plus
the workspace's changes, the project's outputs are untouched, and every run stays in `dvc exp show`
(named methods-<method>-<run id>; `dvc exp apply` brings one into the workspace). The metrics are
read back from `dvc exp show --json`. `evaluate` reads methods.json into the "Methods compared"
table of reports/report.md; after running this, `dvc repro` refreshes the report (only evaluate reruns).

    python bench/compare_methods.py                       # none, siamese, triplet on class-disjoint shapes (~10 min, 2 cores)
    python bench/compare_methods.py --method clip --method triplet -S train.epochs=5

Needs a git repository with a commit (DVC experiments are git refs).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Optional

import typer

ROOT = Path(__file__).resolve().parents[1]
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


def dvc(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def queue(method: str, overrides: list[str], run_id: str) -> str:
    name = f"methods-{method}-{run_id}"
    dvc("exp", "run", "--queue", "--name", name, *(arg for o in [*overrides, f"train.method={method}"] for arg in ("-S", o)))
    return name


def experiment_metrics(names: list[str]) -> dict[str, dict]:
    """Each named experiment's metrics files, as `dvc exp show --json` reports them."""
    found = {}
    for commit in json.loads(dvc("exp", "show", "--json")):
        for experiment in commit.get("experiments") or []:
            if experiment.get("name") in names:
                data = experiment["revs"][0]["data"]
                metrics = data.get("metrics") or {}
                found[experiment["name"]] = {path: (entry or {}).get("data", {}) for path, entry in metrics.items()}
    missing = [name for name in names if name not in found or "reports/metrics.json" not in found[name]]
    if missing:
        raise SystemExit(f"no metrics for {missing} in `dvc exp show`: see `dvc queue logs <name>`")
    return found


def row_of(method: str, metrics: dict[str, dict]) -> dict:
    evaluated = metrics["reports/metrics.json"]
    row = {"method": method}
    for name, (section, key) in KEYS.items():
        row[name] = evaluated.get(section, {}).get(key)
    # Seconds are not metrics: the train stage writes them beside its outputs.
    row["timing.train_s"] = metrics.get("reports/timing/train.json", {}).get("train_s")
    return row


def main(
    method: list[str] = typer.Option(["none", "siamese", "triplet"], help="methods to compare (repeat the option)"),
    set_param: Optional[list[str]] = typer.Option(None, "--set-param", "-S", help="extra override KEY=VALUE, as for dvc exp run -S"),
    jobs: int = typer.Option(1, "--jobs", "-j", help="experiments run at once (dvc exp run --run-all --jobs)"),
    out: Path = typer.Option(ROOT / "reports/methods.json"),
) -> None:
    overrides = DEFAULT_OVERRIDES + list(set_param or [])
    run_id = time.strftime("%Y%m%d-%H%M%S")
    names = {name: queue(name, overrides, run_id) for name in method}
    typer.echo(f"queued {', '.join(names.values())}; running them (dvc exp run --run-all --jobs {jobs}) ...")
    start = time.perf_counter()
    dvc("exp", "run", "--run-all", "--jobs", str(jobs))
    typer.echo(f"ran in {time.perf_counter() - start:.0f}s")
    metrics = experiment_metrics(list(names.values()))
    rows = [row_of(name, metrics[experiment]) for name, experiment in names.items()]
    payload = {
        "generated_by": "python bench/compare_methods.py",
        "date": date.today().isoformat(),
        "overrides": overrides,
        "experiments": list(names.values()),
        "rows": rows,
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    columns = [*KEYS, "timing.train_s"]
    typer.echo(f"\n{'method':<10}" + "".join(f"{k.split('.')[-1]:>16}" for k in columns))
    for row in rows:
        typer.echo(f"{row['method']:<10}" + "".join(f"{row[k]:>16.4f}" if isinstance(row[k], float) else f"{str(row[k]):>16}" for k in columns))
    typer.echo(f"-> {out}")


if __name__ == "__main__":
    typer.run(main)
