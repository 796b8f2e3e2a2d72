"""Shared fixtures: a tiny set of pipeline artifacts, built once per test session, and no network."""

from urllib.error import URLError

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from pipeline import embed, evaluate, index, prepare, probe, train
from pipeline.predict import Predictor

runner = CliRunner()
TINY = {
    "data": {"synthetic": {"n_classes": 4, "images_per_class": 8, "extra_test_per_class": 0}, "splits": {"train": 0.5, "val": 0.25, "test": 0.25}},
    "train": {"method": "none"},
    "index": {"factory": "Flat", "search_params": ""},
    "evaluate": {"n_examples": 1, "recall_k": [1, 5]},  # the test split has 8 images
}


def invoke(app, args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def run_pipeline(root, params: dict) -> dict:
    """Every stage, in order, as `dvc repro` runs them, into folders under `root`; returns their paths."""
    root.mkdir(parents=True, exist_ok=True)
    params_file = root / "params.yaml"
    params_file.write_text(yaml.safe_dump(params))
    folders = {"data": "data/prepared", "model": "artifacts/model", "emb": "artifacts/embeddings", "index": "artifacts/index",
               "probe": "artifacts/probe", "reports": "reports", "gallery": "artifacts/gallery"}  # fmt: skip
    paths = {key: root / folder for key, folder in folders.items()}
    paths["timing"] = paths["reports"] / "timing"

    def timing(stage):
        return ["--timing", paths["timing"] / f"{stage}.json"]

    invoke(prepare.app, ["--params", params_file, "--out", paths["data"], *timing("prepare")])
    invoke(train.app, ["--params", params_file, "--data", paths["data"], "--out", paths["model"], "--reports", paths["reports"] / "train", *timing("train")])
    invoke(embed.app, ["--params", params_file, "--data", paths["data"], "--model", paths["model"], "--out", paths["emb"], *timing("embed")])
    invoke(index.app, ["--params", params_file, "--embeddings", paths["emb"], "--out", paths["index"], *timing("index")])
    invoke(probe.app, ["--params", params_file, "--data", paths["data"], "--model", paths["model"], "--out", paths["probe"], *timing("probe"),
                       "--tradeoff-figure", paths["reports"] / "probe_tradeoff.png"])  # fmt: skip
    invoke(
        evaluate.app,
        ["--params", params_file, "--data", paths["data"], "--embeddings", paths["emb"], "--index", paths["index"], "--probe", paths["probe"],
         "--train-reports", paths["reports"] / "train", "--reports", paths["reports"], *timing("evaluate")],
    )  # fmt: skip
    images = pd.read_parquet(paths["data"] / "images.parquet")
    paths["images"] = [paths["data"] / p for p in images["path"]]
    return paths


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    return run_pipeline(tmp_path_factory.mktemp("artifacts"), TINY)


def where(paths) -> list:
    """The app-level options that point `clipline` at the tiny artifacts."""
    return [
        "--model", paths["model"], "--index", paths["index"], "--data", paths["data"],
        "--metrics", paths["reports"] / "metrics.json", "--embeddings", paths["emb"], "--gallery", paths["gallery"],
    ]  # fmt: skip




def load_predictor(paths, gallery=None) -> Predictor:
    """The Predictor over artifacts from `run_pipeline`; `gallery` overrides their gallery folder."""
    return Predictor.from_artifacts(
        paths["model"], paths["index"], paths["data"], paths["reports"] / "metrics.json",
        embeddings_dir=paths["emb"], gallery_dir=gallery or paths["gallery"],
    )  # fmt: skip


@pytest.fixture
def offline_downloads(monkeypatch) -> list:
    """Every dataset download fails as it does without a network; yields the (url, md5) of each attempt."""
    import torchvision.datasets.utils as tv_utils

    calls = []

    def offline(url, root, filename=None, md5=None, **kwargs):
        calls.append((url, md5))
        raise URLError("network is unreachable")

    monkeypatch.setattr(tv_utils, "download_url", offline)
    return calls
