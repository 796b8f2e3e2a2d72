"""Stage 2: build the model and train it per `train.method` -> artifacts/model/, reports/train/."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import typer

from pipeline import distributed, io, models, preflight
from pipeline import params as params_lib
from pipeline.metrics import tasks
from pipeline.prepared import load_prepared
from pipeline.stage import DATA_OPTION, PARAMS_OPTION, load_params, stage_app, timing_option, write_timing
from pipeline.training.checkpoints import Resume, TrainResult
from pipeline.training.loop import STATE_VERSION
from pipeline.training.clip import train_clip, validation_recall
from pipeline.training.curves import LiveCurves
from pipeline.training.metric import few_validation_classes, train_siamese, train_triplet
from pipeline.training.optim import seed_everything

TRAINERS = {"clip": train_clip, "siamese": train_siamese, "triplet": train_triplet}


def resume_path(out: Path) -> Path:
    """Beside the model folder, not in it: DVC replaces the folder, the resume state must outlive a kill."""
    return out.with_name(f"{out.name}.resume.pt")


def run_fingerprint(params: params_lib.Params, data: Path) -> str:
    """What a saved run state must have been made with to be resumed: model and train params, and the data."""
    digest = hashlib.sha256()
    settings = {"model": params.model.model_dump(), "train": params.train.model_dump(), "state_version": STATE_VERSION}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    for table in ("images.parquet", "captions.parquet"):
        if (data / table).exists():
            digest.update((data / table).read_bytes())
    return digest.hexdigest()


def main(
    params_file: Path = PARAMS_OPTION,
    data: Path = DATA_OPTION,
    out: Path = typer.Option(Path("artifacts/model"), help="model folder (replaced atomically)"),
    reports: Path = typer.Option(Path("reports/train"), help="training curves folder"),
    timing: Path = timing_option("train"),
) -> None:
    start = time.perf_counter()
    params = load_params(params_file)
    prepared = load_prepared(data)
    preflight.check_against_data(params, prepared)
    tasks.check_recall_k(params.evaluate.recall_k, params.evaluate.split, prepared.images, prepared.captions)
    world = distributed.init(params.runtime.device)  # one process, or one of a torchrun launch
    seed_everything(params.train.seed)  # the initial weights of an untrained model depend on it
    loaded = models.create_model(params.model.name, params.model.pretrained, distributed.rank_device(params.runtime.device, world))
    if params.train.method == "clip" and prepared.captions is None and world.is_main:
        typer.echo(
            f"train clip: {prepared.info['source']} has no captions, so each image is paired with its class's "
            f"prompts ({len(prepared.templates)} templates x class name) as captions, as FLYP fine-tunes on class labels"
        )
    if params.train.method in ("siamese", "triplet") and world.is_main and (warning := few_validation_classes(prepared)):
        typer.echo(f"train {params.train.method}: warning: {warning}")
    info = {"method": params.train.method, "trained_on": prepared.info["source"]}
    curves = LiveCurves(reports) if world.is_main else None  # rank 0 logs the curves, as it writes everything
    if params.train.method == "none":
        # Weights as they are. A random init has no file to come back to, so it is saved.
        checkpoints = {} if loaded.pretrained != "none" else {"last.pt": {"model": loaded.model.state_dict()}}
        info["checkpoint"] = "last.pt" if checkpoints else None
        val = validation_recall(loaded, prepared) if world.is_main else None
        result = TrainResult(best={}, last={}, best_epoch=0, val_rows=[] if val is None else [{"epoch": 0, **val}])
        if curves is not None:
            curves(result)
        loss_rows, val_rows = [], result.val_rows
    else:
        # Every rank resumes from the same state; rank 0 alone saves it.
        resume = Resume(resume_path(out), run_fingerprint(params, data), params.runtime.resume, write=world.is_main)
        result = TRAINERS[params.train.method](loaded, prepared, params.train, resume, params.runtime, world, on_epoch=curves)
        checkpoints = {"best.pt": result.best, "last.pt": result.last, **result.periodic}
        info.update(
            checkpoint="best.pt",
            best_epoch=result.best_epoch,
            epochs=params.train.epochs,
            stopped_early_at=result.stopped_early_at,
            notes=result.notes,
        )
        loss_rows, val_rows = result.loss_rows, result.val_rows
    info["embed_dim"] = loaded.embed_dim
    if loaded.image_head is not None:
        info["head_dim"] = loaded.embed_dim
    # A projection head puts images in a space of their own: text prompts no longer compare.
    info["image_text_aligned"] = loaded.image_head is None
    if not world.is_main:  # rank 0 writes the model, the curves and the timings
        distributed.finish(world)
        return

    with io.atomic_dir(out) as tmp:
        models.save_trained(tmp, loaded, info, checkpoints)
    Resume(resume_path(out)).clear()  # the run is complete: nothing to resume
    curves.end()
    train_s = round(time.perf_counter() - start, 3)
    epoch_s = [row["epoch_s"] for row in loss_rows]
    write_timing(
        timing, {"train_s": train_s, "epoch_s": epoch_s, "device": str(loaded.device), "num_workers": params.runtime.num_workers, "processes": world.size}
    )  # fmt: skip
    best = f", best epoch {info['best_epoch']}" if "best_epoch" in info else ""
    # The score of the checkpoint kept (best.pt), not of the last epoch; none: its one validation.
    kept = next((row for row in val_rows if row["epoch"] == info.get("best_epoch", val_rows[-1]["epoch"] if val_rows else None)), None)
    score = next((k for k in ("mean_recall", "map_at_r") if kept and k in kept), None)
    final = f", val {score} {kept[score]:.3f}" if score else ""
    typer.echo(f"train {params.train.method}: {params.model.name}/{params.model.pretrained}{best}{final} in {train_s:.0f}s -> {out}")
    distributed.finish(world)


app = stage_app(main, distributed=True)

if __name__ == "__main__":
    app()
