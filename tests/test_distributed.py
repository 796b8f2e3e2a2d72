"""Training and embedding under torchrun: 2 CPU processes with gloo, as CI can run them.

The same code runs one process per GPU with NCCL; that path is not run here (no GPU). What the
tests pin down: a DDP step over the ranks computes the loss and gradients of a one-process step on
the same global batch; `runtime.processes: 2` makes the stage command launch torchrun itself; a
2-process run resumes after a kill to the same weights as an uninterrupted 2-process run, and its
checkpoint embeds, indexes and evaluates like any other.
"""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from conftest import invoke
from pipeline import embed, evaluate, index, io, probe
from pipeline.datasets import prepare
from pipeline.params import DataParams
from pipeline.training.curves import read_curves

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("distributed_worker.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _run(args, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, f"{' '.join(map(str, args))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def test_a_ddp_step_equals_one_process_on_the_global_batch(tmp_path):
    out = tmp_path / "steps.json"
    _run([*TORCHRUN, WORKER, "steps", out])
    report = json.loads(out.read_text())
    assert report["world_size"] == 2
    for rank in report["ranks"]:
        assert set(rank) == {"clip/8", "siamese/8", "siamese/7", "triplet/8"}
        for case, result in rank.items():
            assert result["same_parameters"] and result["n_parameters"] > 0, case
            assert result["loss_ddp"] == pytest.approx(result["loss_one_process"], abs=1e-5), case
            assert result["max_gradient"] > 1e-3, case  # the step did move something
            assert result["max_gradient_gap"] <= 1e-5, case


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("distributed") / "prepared"
    prepare(DataParams(synthetic={"n_classes": 4, "images_per_class": 8, "extra_test_per_class": 0}, splits={"train": 0.5, "val": 0.25, "test": 0.25}), out)
    return out


def _params(folder: Path, resume: bool) -> Path:
    """Two processes, CLIP, global batches of 8 (4 per process): 2 steps an epoch, 2 epochs."""
    folder.mkdir(parents=True, exist_ok=True)
    params = {
        "train": {"method": "clip", "epochs": 2, "batch_size": 8},
        "index": {"factory": "Flat", "search_params": ""},
        "evaluate": {"recall_k": [1, 5], "n_examples": 1},  # the test split has 8 images
        "runtime": {"processes": 2, "resume": resume, "device": "cpu"},
    }
    path = folder / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _train(folder: Path, data: Path, resume: bool = False) -> subprocess.CompletedProcess:
    """The stage command as dvc.yaml has it; runtime.processes makes it launch torchrun."""
    params = _params(folder, resume)
    return _run([sys.executable, "-m", "pipeline.train", "--params", params, "--data", data, "--out", folder / "model",
                 "--reports", folder / "reports", "--timing", folder / "timing.json"])  # fmt: skip


def _weights(folder: Path) -> dict:
    return {name: torch.load(folder / "model" / name, weights_only=True)["model"] for name in ("best.pt", "last.pt")}


def test_two_processes_resume_after_a_kill_and_their_model_evaluates(data, tmp_path):
    straight = tmp_path / "straight"
    launched = _train(straight, data)
    assert "2 processes under torchrun" in launched.stdout
    timing = json.loads((straight / "timing.json").read_text())
    assert timing["processes"] == 2
    assert len(read_curves(straight / "reports")[0]) == 2

    # Killed on both ranks right after epoch 1's state was saved, then run again with resume on.
    interrupted = tmp_path / "interrupted"
    params = _params(interrupted, resume=True)
    killed = _run([*TORCHRUN, WORKER, "killed-train", params, data, interrupted, 1], check=False)
    assert killed.returncode != 0 and "killed after epoch 1" in killed.stderr
    assert (interrupted / "model.resume.pt").exists() and not (interrupted / "model").exists()
    resumed = _train(interrupted, data, resume=True)
    assert "resuming from" in resumed.stderr and "after epoch 1" in resumed.stderr
    assert not (interrupted / "model.resume.pt").exists()
    expected, got = _weights(straight), _weights(interrupted)
    for name in expected:
        assert expected[name].keys() == got[name].keys()
        assert all(torch.equal(expected[name][k], got[name][k]) for k in expected[name]), name
    pd.testing.assert_frame_equal(read_curves(interrupted / "reports")[0], read_curves(straight / "reports")[0])

    # The 2-process checkpoint is a checkpoint like any other: it embeds, indexes, probes and
    # evaluates in one process (2-rank embedding has its own tests in test_pipeline_e2e and
    # test_webdataset).
    params, reports, emb = straight / "params.yaml", straight / "eval", straight / "embeddings"
    one_process = yaml.safe_load(params.read_text())
    one_process["runtime"]["processes"] = 1
    params.write_text(yaml.safe_dump(one_process))
    invoke(embed.app, ["--params", params, "--data", data, "--model", straight / "model", "--out", emb, "--timing", reports / "embed.json"])
    meta, _ = io.read_embeddings(emb / "images")
    assert sorted(meta["image_id"]) == sorted(pd.read_parquet(data / "images.parquet")["image_id"])
    invoke(index.app, ["--params", params, "--embeddings", emb, "--out", straight / "index", "--timing", reports / "index.json"])
    invoke(probe.app, ["--params", params, "--data", data, "--model", straight / "model", "--out", straight / "probe",
                       "--timing", reports / "probe.json", "--tradeoff-figure", reports / "tradeoff.png"])  # fmt: skip
    invoke(evaluate.app, ["--params", params, "--data", data, "--embeddings", emb, "--index", straight / "index", "--probe", straight / "probe",
                          "--train-reports", straight / "reports", "--reports", reports,
                          "--timing", reports / "evaluate.json"])  # fmt: skip
    metrics = json.loads((reports / "metrics.json").read_text())
    assert 0 <= metrics["zero_shot"]["top1"] <= 1
    assert metrics["retrieval"]["text_to_image"]["R@1"] >= 0


def test_two_process_triplet_training_mines_the_global_batch_as_one_process(data, tmp_path):
    """Head-only triplet epochs on a frozen tower (no batch-norm statistics involved): the 2-process
    run draws the same P x K batches and mines the same triplets, so its curves match one process's.

    Not bit for bit: the tower computes a share of 4 images in other float order than a batch of 8
    (1e-7), and Adam's normalised steps grow that to ~1e-4 over a few steps. Mining within each
    rank's share instead of the global batch changes the loss by percents."""
    train_params = {"method": "triplet", "epochs": 2, "batch_size": 8,
                    "triplet": {"head_epochs": 2, "classes_per_batch": 4, "images_per_class": 2}}  # fmt: skip
    curves = {}
    for processes in (1, 2):
        folder = tmp_path / f"p{processes}"
        folder.mkdir()
        params = folder / "params.yaml"
        params.write_text(yaml.safe_dump({"train": train_params, "evaluate": {"recall_k": [1, 5]}, "runtime": {"processes": processes, "device": "cpu"}}))
        _run([sys.executable, "-m", "pipeline.train", "--params", params, "--data", data, "--out", folder / "model",
              "--reports", folder / "reports", "--timing", folder / "timing.json"])  # fmt: skip
        assert json.loads((folder / "timing.json").read_text())["processes"] == processes
        curves[processes] = read_curves(folder / "reports")[0]
    pd.testing.assert_frame_equal(curves[1], curves[2], rtol=2e-3)


def test_a_clip_batch_that_does_not_split_over_the_processes_is_refused(data):
    """Checked before any collective call, so one process standing in for rank 0 of 3 shows it."""
    from pipeline import models
    from pipeline.distributed import World
    from pipeline.params import TrainParams
    from pipeline.prepared import load_prepared
    from pipeline.training.clip import train_clip

    loaded = models.create_model("clipline-tiny", "none", "cpu")
    with pytest.raises(ValueError, match=r"train.batch_size 8 does not split evenly over 3 processes \(runtime.processes\)"):
        train_clip(loaded, load_prepared(data), TrainParams(method="clip", epochs=1, batch_size=8), world=World(rank=0, size=3))


@pytest.mark.parametrize("processes, device, gpus, words", [(4, "auto", 2, "4 processes, but this machine has 2 GPUs"), (2, "cuda:1", 2, "each process takes its own GPU")])
def test_a_launch_the_gpus_cannot_serve_is_refused(monkeypatch, processes, device, gpus, words):
    from pipeline import preflight
    from pipeline.errors import ParamsError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    with pytest.raises(ParamsError, match=words):
        preflight.check_processes(processes, device)
    preflight.check_processes(gpus, "auto")  # one process per GPU is fine
    preflight.check_processes(processes, "cpu")  # CPU processes need no GPU
