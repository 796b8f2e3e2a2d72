"""Screen a training recipe without the pipeline: train, then score the best checkpoint on test.

`bench/default_run.py` times the whole default `dvc repro` (about 4 minutes a seed here). To
compare recipes (epochs, learning rate, temperature, tower sizes, captions), only training and the
two headline numbers matter. This script trains in-process with the train stage's own code
(`params.yaml` plus `-S` overrides, `pipeline.train.TRAINERS`), encodes the test split's images,
captions and class prompts as embed does, and scores them with the evaluate stage's functions
(`pipeline.metrics.tasks`). For the default recipe it gives the pipeline's zero-shot top-1 and
text->image R@5 for the same seed.

    python bench/recipe_screen.py --seed 0 -S train.epochs=40
    python bench/recipe_screen.py --seed 0 --model-set text_cfg.width=64 --model-set text_cfg.layers=2
    python bench/recipe_screen.py --seed 0 --model-set init_logit_scale=3.5066     # temperature 0.03
    python bench/recipe_screen.py --data /elsewhere/data/prepared ...              # another prepared set

`--model-set KEY=JSON` edits the open_clip JSON config of `model.name` (dotted keys, JSON values)
and trains that config from scratch. Train times are the wall clock of the training call: compare
them only within one machine and one load (two screens side by side with `--threads 1` each take
about 1.4x as long each as one screen alone with two threads). Not a test: it trains for minutes.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

import open_clip
import torch
import typer
import yaml

from pipeline import params as params_lib
from pipeline.metrics import tasks
from pipeline.models import create_model, register_configs
from pipeline.models.encode import encode_class_prompts, encode_images, encode_texts
from pipeline.prepared import Prepared, load_prepared
from pipeline.train import TRAINERS
from pipeline.training.optim import seed_everything

ROOT = Path(__file__).resolve().parents[1]


def model_with(name: str, settings: list[str]) -> str:
    """`name`, or a copy of its open_clip config with `settings` (KEY=JSON, dotted keys) applied and
    registered under a new name."""
    if not settings:
        return name
    register_configs()
    config = open_clip.get_model_config(name)
    if config is None:
        raise typer.BadParameter(f"model.name {name!r} has no open_clip config to edit", param_hint="--model-set")
    config = copy.deepcopy(config)
    for setting in settings:
        key, sep, value = setting.partition("=")
        if not sep:
            raise typer.BadParameter(f"{setting!r} is not KEY=JSON", param_hint="--model-set")
        *parents, last = key.split(".")
        node = config
        for part in parents:
            if not isinstance(node.get(part), dict):
                raise typer.BadParameter(f"{key}: {name}'s config has no section {part!r}", param_hint="--model-set")
            node = node[part]
        try:
            node[last] = json.loads(value)
        except json.JSONDecodeError as err:
            raise typer.BadParameter(f"{key}: {value!r} is not JSON ({err})", param_hint="--model-set") from err
    folder = Path(tempfile.mkdtemp(prefix="clipline-screen-"))
    (folder / "screen-model.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    return "screen-model"


def screen_once(params: params_lib.Params, model_name: str, prepared: Prepared, seed: int) -> dict:
    train = params.train.model_copy(update={"seed": seed})
    seed_everything(seed)  # as the train stage: the initial weights depend on it
    loaded = create_model(model_name, params.model.pretrained, params.runtime.device)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the per-epoch lines
        result = TRAINERS[train.method](loaded, prepared, train, runtime=params.runtime)
    train_s = time.perf_counter() - start
    loaded.model.load_state_dict(result.best["model"])
    loaded.model.eval()

    row = {"seed": seed, "train_s": round(train_s, 1), "best_epoch": result.best_epoch}
    if loaded.image_head is not None:  # triplet's head leaves the text space: compare_methods scores it
        return row
    split = params.evaluate.split
    images = prepared.images[prepared.images["split"] == split].reset_index(drop=True)
    image_emb = encode_images(loaded, prepared.image_paths(images), params.runtime.batch_size)
    zero_shot = tasks.zero_shot(images, image_emb, encode_class_prompts(loaded, prepared.class_names, prepared.templates), prepared.class_names, split)
    row["zero_shot.top1"] = zero_shot.metrics.get("top1")
    if prepared.captions is not None:
        texts = prepared.captions[prepared.captions["image_id"].isin(images["image_id"])].reset_index(drop=True)
        text_emb = encode_texts(loaded, texts["caption"].tolist(), params.runtime.batch_size)
        retrieval = tasks.cross_modal_retrieval(images, image_emb, texts, text_emb, split, [5])
        row["t2i.R@5"] = retrieval.metrics.get("text_to_image", {}).get("R@5")
    return row


def main(
    seed: list[int] = typer.Option([0], help="train.seed values, one training each"),
    set_: Optional[list[str]] = typer.Option(None, "--set", "-S", help="params override, as dvc exp run -S"),
    model_set: Optional[list[str]] = typer.Option(None, help="KEY=JSON edit of model.name's open_clip config"),
    data: Path = typer.Option(ROOT / "data" / "prepared", help="prepared dataset (dvc repro prepare makes it)"),
    params_file: Path = typer.Option(ROOT / "params.yaml", "--params"),
    threads: Optional[int] = typer.Option(None, help="torch threads (default: torch's, all cores)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the rows and the summary here"),
) -> None:
    logging.getLogger().setLevel(logging.ERROR)  # open_clip's "no pretrained weights" for every seed
    if threads:
        torch.set_num_threads(threads)
    raw = yaml.safe_load(params_file.read_text())
    for override in set_ or []:
        params_lib.apply_override(raw, override)
    params = params_lib.parse(raw)
    if params.train.method not in TRAINERS:
        raise typer.BadParameter(f"train.method {params.train.method!r} trains nothing to screen ({', '.join(TRAINERS)})", param_hint="-S")
    model_name = model_with(params.model.name, model_set or [])
    prepared = load_prepared(data)  # once: training leaves it as it was
    rows = []
    for s in seed:
        rows.append(screen_once(params, model_name, prepared, s))
        typer.echo("  ".join(f"{k} {v:.3f}" if isinstance(v, float) and k != "train_s" else f"{k} {v}" for k, v in rows[-1].items()))
    summary = {}
    for key in ("zero_shot.top1", "t2i.R@5", "train_s"):
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:
            summary[key] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}
            digits = 1 if key == "train_s" else 3
            typer.echo(f"{key}: mean {summary[key]['mean']:.{digits}f}  min {summary[key]['min']:.{digits}f}  max {summary[key]['max']:.{digits}f}")
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps({"overrides": set_ or [], "model_set": model_set or [], "rows": rows, "summary": summary}, indent=2) + "\n")


if __name__ == "__main__":
    typer.run(main)
