"""Shared fixtures: a tiny set of pipeline artifacts, built once per test session."""

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from pipeline import embed, evaluate, index, prepare, probe, train

runner = CliRunner()
TINY = {
    "data": {"synthetic": {"n_classes": 4, "images_per_class": 8}, "splits": {"train": 0.5, "val": 0.25, "test": 0.25}},
    "train": {"method": "none"},
    "index": {"factory": "Flat", "search_params": ""},
    "evaluate": {"n_examples": 1},
}


def invoke(app, args):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    root = tmp_path_factory.mktemp("artifacts")
    params = root / "params.yaml"
    params.write_text(yaml.safe_dump(TINY))
    folders = {"data": "data/prepared", "model": "artifacts/model", "emb": "artifacts/embeddings", "index": "artifacts/index",
               "reports": "reports", "gallery": "artifacts/gallery"}  # fmt: skip
    paths = {key: root / folder for key, folder in folders.items()}
    invoke(prepare.app, ["--params", params, "--out", paths["data"]])
    invoke(train.app, ["--params", params, "--data", paths["data"], "--out", paths["model"], "--reports", paths["reports"] / "train"])
    invoke(embed.app, ["--params", params, "--data", paths["data"], "--model", paths["model"], "--out", paths["emb"]])
    invoke(index.app, ["--params", params, "--embeddings", paths["emb"], "--out", paths["index"]])
    invoke(probe.app, ["--params", params, "--data", paths["data"], "--model", paths["model"], "--out", root / "artifacts/probe"])
    invoke(
        evaluate.app,
        ["--params", params, "--data", paths["data"], "--embeddings", paths["emb"], "--index", paths["index"], "--probe", root / "artifacts/probe",
         "--train-reports", paths["reports"] / "train", "--reports", paths["reports"], "--methods", root / "none.json"],
    )
    images = pd.read_parquet(paths["data"] / "images.parquet")
    paths["images"] = [paths["data"] / p for p in images["path"]]
    return paths


def where(paths) -> list:
    """The app-level options that point `clipline` at the tiny artifacts."""
    return [
        "--model", paths["model"], "--index", paths["index"], "--data", paths["data"],
        "--metrics", paths["reports"] / "metrics.json", "--embeddings", paths["emb"], "--gallery", paths["gallery"],
    ]  # fmt: skip


