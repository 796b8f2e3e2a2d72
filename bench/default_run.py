"""Wall time and headline metrics of the default `dvc repro`, over training seeds.

For each seed, the project (its tracked and untracked, not ignored files: the working tree, not
the last commit) is copied into a temporary folder with a git repository and an empty DVC cache,
`train.seed` is set there, and `dvc repro` runs every stage from scratch. It prints each stage's
wall time (from DVC's "Running stage" lines: process start, imports and DVC's own hashing
included), the total, and the headline metrics, then the median / min / max over the seeds.

    python bench/default_run.py                       # seeds 0 1 2, a quiet machine
    python bench/default_run.py --competing-load      # the same beside one CPU-bound process
    python bench/default_run.py --seed 0 -S train.epochs=40 --json reports/bench/x.json

`--competing-load` starts one busy process of its own (a pure-Python loop: one core's worth of
work, as another user's job would be) before the first run and stops it after the last, to show
how the pipeline degrades when it gets a fair half of a 2-core machine. Runs are sequential: a
benchmark that ran its seeds side by side would measure the contention it made itself.

`t2i.R@5 ceiling` is what a perfect model would score, computed by the metric's own function (see
`caption_ceiling`): the generated captions name only some of an image's attributes, so many fit
several test images word for word, and any image that carries the caption is a correct answer.

Thread settings come from the environment as in any run (pipeline/__init__.py sets a default);
`OMP_WAIT_POLICY=ACTIVE python bench/default_run.py ...` measures torch's own default instead.

This is a benchmark, not a test: numbers depend on the machine and on what else runs on it.
The load average before each run is printed so a busy machine shows.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import typer
import yaml

from pipeline.params import apply_override

ROOT = Path(__file__).resolve().parents[1]
# (label, path in reports/metrics.json)
HEADLINES = [
    ("zero_shot.top1", ("zero_shot", "top1")),
    ("t2i.R@1", ("retrieval", "text_to_image", "R@1")),
    ("t2i.R@5", ("retrieval", "text_to_image", "R@5")),
    ("i2t.R@1", ("retrieval", "image_to_text", "R@1")),
    ("i2t.R@5", ("retrieval", "image_to_text", "R@5")),
    ("verification.acc", ("verification", "accuracy")),
    ("map_at_r", ("metric_learning", "map_at_r")),
    ("test images", ("zero_shot", "n")),
]
RUNNING_STAGE = re.compile(r"Running stage '([^']+)'")


def _busy_loop() -> None:  # pragma: no cover - runs in the competing process
    while True:
        pass


def copy_project(dest: Path) -> None:
    """The working tree as git sees it (tracked + untracked, not ignored), as a fresh repository:
    DVC needs git, and an empty cache makes every stage run."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, check=True, capture_output=True
    ).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    subprocess.run(git + ["init", "-q"], cwd=dest, check=True)
    subprocess.run(git + ["add", "-A"], cwd=dest, check=True)
    subprocess.run(git + ["commit", "-qm", "bench copy"], cwd=dest, check=True)


def run_once(seed: int, overrides: list[str], keep: Optional[Path]) -> dict:
    with tempfile.TemporaryDirectory(prefix="clipline-bench-") as tmp:
        work = Path(tmp) / "project"
        work.mkdir()
        copy_project(work)
        params = yaml.safe_load((work / "params.yaml").read_text())
        for override in [f"train.seed={seed}", *overrides]:
            apply_override(params, override)
        (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        load = os.getloadavg()[0]
        stage_starts: list[tuple[str, float]] = []
        start = time.perf_counter()
        process = subprocess.Popen(
            ["dvc", "repro", "--force"], cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
        )
        log = []
        for line in process.stdout:
            log.append(line)
            match = RUNNING_STAGE.search(line)
            if match:
                stage_starts.append((match.group(1), time.perf_counter() - start))
        total = time.perf_counter() - start
        if process.wait():
            sys.stderr.write("".join(log[-40:]))
            raise typer.Exit(f"dvc repro failed for seed {seed} (last lines above)")
        ends = [t for _, t in stage_starts[1:]] + [total]
        stages = {name: round(end - begin, 1) for (name, begin), end in zip(stage_starts, ends)}
        metrics = json.loads((work / "reports" / "metrics.json").read_text())
        headline = {}
        for label, keys in HEADLINES:
            value = metrics
            for key in keys:
                value = value.get(key, {}) if isinstance(value, dict) else {}
            headline[label] = value if isinstance(value, (int, float)) else None
        headline["t2i.R@5 ceiling"] = caption_ceiling(work / "data" / "prepared", metrics.get("dataset", {}).get("split", "test"))
        train_timing = json.loads((work / "reports" / "timing" / "train.json").read_text())
        if keep is not None:
            shutil.copytree(work / "reports", keep / f"seed{seed}", dirs_exist_ok=True)
    return {
        "seed": seed,
        "load_before": round(load, 2),
        "total_s": round(total, 1),
        "stages_s": stages,
        "epochs": len(train_timing.get("epoch_s", [])),
        "metrics": headline,
    }


def caption_ceiling(prepared: Path, split: str, k: int = 5) -> Optional[float]:
    """The text->image R@k a perfect model would get on `split`, by the metric's own function: the
    recall of embeddings that know which captions fit which images (`oracle_embeddings`). A
    candidate is its content, so a caption that several images carry word for word is a hit through
    any of them, and the ceiling is 1.0; a line below 1 would mean the rule lets ties decide."""
    from pipeline.metrics.retrieval import oracle_embeddings, recall_at_k
    from pipeline.metrics.tasks import captioned_split
    from pipeline.prepared import load_prepared

    tables = load_prepared(prepared)
    captioned = None if tables.captions is None else captioned_split(tables.images, tables.captions, split)
    if captioned is None:
        return None
    return recall_at_k(*oracle_embeddings(captioned.matches), captioned.matches, (k,))["text_to_image"][f"R@{k}"]


def summarise(runs: list[dict]) -> dict:
    def stats(values):
        values = [v for v in values if v is not None]
        if not values:
            return None
        return {"median": statistics.median(values), "mean": statistics.fmean(values), "min": min(values), "max": max(values)}

    stages = list(dict.fromkeys(name for run in runs for name in run["stages_s"]))
    labels = list(dict.fromkeys(label for run in runs for label in run["metrics"]))
    return {
        "total_s": stats([run["total_s"] for run in runs]),
        "stages_s": {name: stats([run["stages_s"].get(name) for run in runs]) for name in stages},
        "metrics": {label: stats([run["metrics"].get(label) for run in runs]) for label in labels},
    }


def main(
    seed: list[int] = typer.Option([0, 1, 2], "--seed", help="train.seed values, one full run each"),
    competing_load: bool = typer.Option(False, help="run beside one CPU-bound process started by this benchmark"),
    override: list[str] = typer.Option([], "-S", "--set", help="params override for every run, as dvc exp run -S"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the runs and summary here"),
    keep_reports: Optional[Path] = typer.Option(None, help="copy each run's reports/ to <this>/seed<N>"),
) -> None:
    competitor = None
    if competing_load:
        competitor = multiprocessing.Process(target=_busy_loop, daemon=True)
        competitor.start()
        typer.echo(f"competing load: one busy process (pid {competitor.pid})")
    runs = []
    try:
        for s in seed:
            run = run_once(s, override, keep_reports)
            runs.append(run)
            stages = "  ".join(f"{name} {t:.1f}" for name, t in run["stages_s"].items())
            metrics = "  ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in run["metrics"].items())
            typer.echo(f"seed {s}: total {run['total_s']:.1f}s (load before {run['load_before']})  {stages}")
            typer.echo(f"        {metrics}")
    finally:
        if competitor is not None:
            competitor.terminate()
            competitor.join()
    summary = summarise(runs)
    typer.echo(f"\n{len(runs)} runs{' with competing load' if competing_load else ''}, {os.cpu_count()} CPUs")
    typer.echo(f"{'':<18} {'median':>8} {'mean':>8} {'min':>8} {'max':>8}")
    rows = [("total_s", summary["total_s"])] + [(f"  {k}", v) for k, v in summary["stages_s"].items()]
    rows += list(summary["metrics"].items())  # t2i.R@5 ceiling: what a perfect model would score
    for name, s in rows:
        if s:
            typer.echo(f"{name:<18} {s['median']:8.3f} {s['mean']:8.3f} {s['min']:8.3f} {s['max']:8.3f}")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"competing_load": competing_load, "overrides": override, "cpus": os.cpu_count(), "runs": runs, "summary": summary}
        json_out.write_text(json.dumps(payload, indent=2) + "\n")


if __name__ == "__main__":
    typer.run(main)
