"""Train and evaluate several `train.method`s on class-disjoint datasets as DVC experiments; write
reports/methods.json and, beside it, reports/methods.md (the rows side by side).

Two datasets, both in the re-identification setting (test identities never appear in training):
the generated shapes, and real handwritten digits (scikit-learn's bundled copy of the UCI digits,
1,797 8x8 images of 10 digits; no download) written as class folders, dark strokes on white, 32x32,
and read by the `folder` source, split 6/2/2 digits by class.

Each (dataset, method) is one queued experiment (`dvc exp run --queue -S train.method=... -S ...`) run by
`dvc exp run --run-all`, so it runs in DVC's own temporary workspace from the current commit plus
the workspace's changes, the project's outputs are untouched, and every run stays in `dvc exp show`
(named methods-<dataset>[-seed<N>]-<method>-<run id>; `dvc exp apply` brings one into the workspace). The metrics are
read back from `dvc exp show --json`. The pipeline's own report (reports/report.md) shows only what
its run computed, never these rows.

    python bench/compare_methods.py                       # none, siamese, triplet on shapes and digits (~20 min, 2 cores)
    python bench/compare_methods.py --dataset shapes --method clip --method triplet -S train.epochs=5
    python bench/compare_methods.py --dataset shapes --data-seed 0 --data-seed 1 --data-seed 2 --out reports/bench/methods_shapes_seeds.json

Needs a git repository with a commit (DVC experiments are git refs).
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

import numpy as np
import typer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.reporting import markdown  # noqa: E402

# Every dataset is compared with exact search, so the index is not part of the comparison.
EXACT_INDEX = ["index.factory=Flat", "index.search_params="]
OVERRIDES = {
    "shapes": [
        "data.split_by=class",
        "data.synthetic.n_classes=20",
        "data.splits.train=0.5",
        "data.splits.val=0.25",
        "data.splits.test=0.25",
        *EXACT_INDEX,
        # Pinned so the comparison does not move when the default run's CLIP training length changes.
        "train.epochs=30",
        # The tiny model starts from random weights: its whole tower must learn, at the full rate.
        "train.triplet.head_epochs=2",
        "train.triplet.unfreeze_blocks=4",
        "train.triplet.backbone_lr_scale=1.0",
    ],
    # The rest of params.yaml at its defaults, as a user would first try their own class folders;
    # data.root is added when the folders are written.
    "digits": ["data.source=folder", "data.split_by=class", "data.splits.train=0.6", "data.splits.val=0.2", "data.splits.test=0.2", *EXACT_INDEX],
}
KEYS = {
    "verification.accuracy": ("verification", "accuracy"),
    "verification.roc_auc": ("verification", "roc_auc"),
    "verification.eer": ("verification", "eer"),
    "verification.f1": ("verification", "f1"),
    "metric_learning.precision_at_1": ("metric_learning", "precision_at_1"),
    "metric_learning.r_precision": ("metric_learning", "r_precision"),
    "metric_learning.map_at_r": ("metric_learning", "map_at_r"),
}


def write_digits(root: Path) -> Path:
    """scikit-learn's bundled handwritten digits as one folder per digit (dark strokes on white, 32x32)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    for n, (pixels, label) in enumerate(zip(digits.images, digits.target)):
        dark_on_white = 255 - (pixels / 16 * 255).astype(np.uint8)
        (root / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(dark_on_white).resize((32, 32), Image.NEAREST).convert("RGB").save(root / str(label) / f"{n:04d}.png")
    return root


def dvc(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"dvc {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result.stdout


def experiment_name(dataset: str, seed: Optional[int], method: str, run_id: str) -> str:
    return f"methods-{dataset}{'' if seed is None else f'-seed{seed}'}-{method}-{run_id}"


def queue(dataset: str, seed: Optional[int], method: str, overrides: list[str], run_id: str) -> str:
    name = experiment_name(dataset, seed, method, run_id)
    overrides = overrides + ([] if seed is None else [f"data.seed={seed}"])
    dvc("exp", "run", "--queue", "--name", name, *(arg for o in [*overrides, f"train.method={method}"] for arg in ("-S", o)))
    return name


def experiment_metrics(names: list[str], baseline: str) -> dict[str, dict]:
    """Each named experiment's metrics files, as `dvc exp show --json` reports them. `baseline` is
    the commit they were queued from; a queued run started after a new commit is listed under that
    commit, so every commit since is searched too (names carry the run id: no two runs share one)."""
    since = subprocess.run(["git", "rev-list", f"{baseline}..HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    found = {}
    for commit in json.loads(dvc("exp", "show", "--json", *(arg for rev in [baseline, *since] for arg in ("--rev", rev)))):
        for experiment in commit.get("experiments") or []:
            if experiment.get("name") in names:
                data = experiment["revs"][0]["data"]
                metrics = data.get("metrics") or {}
                found[experiment["name"]] = {path: (entry or {}).get("data", {}) for path, entry in metrics.items()}
    missing = [name for name in names if name not in found or "reports/metrics.json" not in found[name]]
    if missing:
        raise SystemExit(f"no metrics for {missing} in `dvc exp show`: see `dvc queue logs <name>`")
    return found


def row_of(dataset: str, seed: Optional[int], method: str, metrics: dict[str, dict]) -> dict:
    evaluated = metrics["reports/metrics.json"]
    row = {"dataset": dataset, "method": method, **({} if seed is None else {"data_seed": seed})}
    for name, (section, key) in KEYS.items():
        row[name] = evaluated.get(section, {}).get(key)
    # Seconds are not metrics: the train stage writes them beside its outputs.
    row["timing.train_s"] = metrics.get("reports/timing/train.json", {}).get("train_s")
    return row


def mean_rows(rows: list[dict]) -> list[dict]:
    """One row per (dataset, method): the mean over its data seeds."""
    means = []
    for dataset, method in dict.fromkeys((row["dataset"], row["method"]) for row in rows):
        group = [row for row in rows if (row["dataset"], row["method"]) == (dataset, method)]
        mean = {"dataset": dataset, "method": method, "data_seed": f"mean of {len(group)}"}
        for key in [*KEYS, "timing.train_s"]:
            values = [row[key] for row in group if isinstance(row.get(key), (int, float))]
            mean[key] = sum(values) / len(values) if len(values) == len(group) else None
        means.append(mean)
    return means


def main(
    dataset: list[str] = typer.Option(list(OVERRIDES), help=f"datasets to compare on (repeat the option): {', '.join(OVERRIDES)}"),
    method: list[str] = typer.Option(["none", "siamese", "triplet"], help="methods to compare (repeat the option)"),
    set_param: Optional[list[str]] = typer.Option(None, "--set-param", "-S", help="extra override KEY=VALUE for every run, as for dvc exp run -S"),
    data_seed: Optional[list[int]] = typer.Option(
        None, help="data.seed of a run (repeat the option): each seed draws another class split and images; with 2+, mean rows are added"
    ),
    jobs: int = typer.Option(1, "--jobs", "-j", help="experiments run at once (dvc exp run --run-all --jobs)"),
    out: Path = typer.Option(ROOT / "reports/methods.json"),
    collect: Optional[str] = typer.Option(None, help="RUN_ID[@COMMIT]: queue and run nothing; read the experiments of an earlier run (names end in its run id) with the same options"),
) -> None:
    unknown = sorted(set(dataset) - set(OVERRIDES))
    if unknown:
        raise typer.BadParameter(f"unknown {unknown}; choose from {list(OVERRIDES)}", param_hint="--dataset")
    run_id, _, queued_from = (collect or time.strftime("%Y%m%d-%H%M%S")).partition("@")
    baseline = subprocess.run(["git", "rev-parse", queued_from or "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="compare-methods-") as tmp:
        overrides = {name: OVERRIDES[name] + list(set_param or []) for name in dataset}
        if "digits" in overrides:
            # Outside the project: DVC runs each experiment in its own copy of the workspace.
            overrides["digits"].append(f"data.root={write_digits(Path(tmp) / 'digits')}")
        seeds = data_seed or [None]
        if collect:
            names = {(d, seed, m): experiment_name(d, seed, m, run_id) for d in dataset for seed in seeds for m in method}
        else:
            names = {(d, seed, m): queue(d, seed, m, overrides[d], run_id) for d in dataset for seed in seeds for m in method}
            typer.echo(f"queued {', '.join(names.values())}; running them (dvc exp run --run-all --jobs {jobs}) ...")
            start = time.perf_counter()
            dvc("exp", "run", "--run-all", "--jobs", str(jobs))
            typer.echo(f"ran in {time.perf_counter() - start:.0f}s")
    metrics = experiment_metrics(list(names.values()), baseline)
    rows = [row_of(d, seed, m, metrics[experiment]) for (d, seed, m), experiment in names.items()]
    if len(seeds) > 1:
        rows += mean_rows(rows)
    payload = {
        "generated_by": "python bench/compare_methods.py",
        "date": date.today().isoformat(),
        # The digits' data.root is a temporary folder, gone when the runs end: left out.
        "overrides": {name: [o for o in values if not o.startswith("data.root=")] for name, values in overrides.items()},
        "experiments": list(names.values()),
        "rows": rows,
    }
    out.write_text(json.dumps(payload, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown.methods_table(payload))
    columns = [*KEYS, "timing.train_s"]
    typer.echo(f"\n{'dataset':<8}{'method':<10}{'data_seed':>12}" + "".join(f"{k.split('.')[-1]:>16}" for k in columns))
    for row in rows:
        typer.echo(f"{row['dataset']:<8}{row['method']:<10}{str(row.get('data_seed', '-')):>12}" + "".join(f"{row[k]:>16.4f}" if isinstance(row[k], float) else f"{str(row[k]):>16}" for k in columns))
    typer.echo(f"-> {out}, {out.with_suffix('.md')}")


if __name__ == "__main__":
    typer.run(main)
