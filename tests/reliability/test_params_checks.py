"""Params that cannot work are refused before any heavy work, naming the key."""

import subprocess
import sys
import time

import pytest
import yaml
from conftest import runner

from pipeline import evaluate, preflight, probe
from pipeline.errors import IndexBuildError, ParamsError
from pipeline.params import Params, load


@pytest.mark.parametrize(
    "text, key",
    [
        ("data:\n  sorce: synthetic\n", "data.sorce"),  # unknown key
        ("train:\n  epochs: many\n", "train.epochs"),  # wrong type
        ("train:\n  lr: -1\n", "train.lr"),  # impossible value
        ("index:\n  gallery_splits: [train, dev]\n", "index.gallery_splits"),
        ("data:\n  on_bad_image: ignore\n", "data.on_bad_image"),
        ("train:\n  lr: .inf\n", "train.lr"),  # non-finite: trains to NaN
        ("train:\n  triplet:\n    margin: .nan\n", "train.triplet.margin"),
    ],
)
def test_params_file_errors_name_the_key(tmp_path, text, key):
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(ParamsError, match=key.replace(".", r"\.")):
        load(tmp_path / "params.yaml")


@pytest.mark.parametrize(
    "overrides, error, words",
    [
        ({"model": {"name": "ViT-B-23"}}, ParamsError, "model.name: unknown model 'ViT-B-23'"),
        ({"index": {"factory": "IVF16,PQ7"}}, IndexBuildError, "index.factory 'IVF16,PQ7' is not a valid FAISS factory string for dim 128"),
        ({"index": {"factory": "HNSW32x"}}, IndexBuildError, "index.factory 'HNSW32x'"),
        ({"index": {"factory": "Flat", "search_params": "nprobe=4"}}, IndexBuildError, "index.search_params 'nprobe=4'"),
        ({"train": {"method": "triplet", "triplet": {"head_dim": 100}}, "index": {"factory": "PQ8"}}, IndexBuildError, "dim 100"),
    ],
)
def test_preflight_catches_what_only_later_stages_would(overrides, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(")):
        preflight.check(Params.model_validate(overrides))


def test_preflight_accepts_the_defaults_and_real_model_names():
    preflight.check(Params())
    preflight.check(Params.model_validate({"model": {"name": "ViT-B-32"}, "index": {"factory": "IVF64,PQ16", "search_params": "nprobe=8"}}))
    preflight.check(Params.model_validate({"model": {"name": "hf-hub:timm/ViT-B-16-SigLIP"}}))  # known only online


def test_prepare_fails_in_seconds_on_a_bad_model_name(tmp_path):
    """dvc repro runs prepare first: it refuses before reading (let alone decoding) any data."""
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"data": {"source": "folder", "root": str(tmp_path / "nowhere")}, "model": {"name": "clipline-tiny2"}}))
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pipeline.prepare", "--params", str(params), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 1 and "error: model.name: unknown model 'clipline-tiny2'" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
    assert time.perf_counter() - start < 30


def test_k_larger_than_the_gallery_is_refused(artifacts, tmp_path):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"probe": {"k": 100}}))
    result = runner.invoke(probe.app, ["--params", str(params), "--data", str(artifacts["data"]), "--model", str(artifacts["model"]), "--out", str(tmp_path / "probe")])
    assert result.exit_code == 1 and "probe.k: 100 neighbours asked for, but the 'train' gallery has 16 labelled images" in result.output

    params.write_text(yaml.safe_dump({"evaluate": {"recall_k": [1, 10]}}))
    result = runner.invoke(
        evaluate.app,
        [str(a) for a in ["--params", params, "--data", artifacts["data"], "--embeddings", artifacts["emb"], "--index", artifacts["index"],
                          "--probe", artifacts["probe"], "--train-reports", artifacts["reports"] / "train", "--reports", tmp_path / "reports"]],
    )  # fmt: skip
    assert result.exit_code == 1 and "evaluate.recall_k: R@10 asked for, but the 'test' split has 8 distinct captioned images" in result.output
    assert not (tmp_path / "reports").exists()
