"""Params validation names the key; atomic writes never leave partial files."""

import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from pipeline import io, params

ROOT = Path(__file__).resolve().parents[1]


def committed_params_yaml() -> dict:
    """params.yaml as committed, not as the workspace holds it: `dvc exp run -S ...` leaves an
    experiment's values in the workspace file, and the suite must pass whatever experiment that is."""
    shown = subprocess.run(["git", "show", "HEAD:params.yaml"], cwd=ROOT, capture_output=True, text=True)
    if shown.returncode != 0:
        pytest.skip(f"needs the git checkout to read the committed params.yaml ({shown.stderr.strip()})")
    return yaml.safe_load(shown.stdout)


def test_defaults_load_from_an_empty_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("")
    loaded = params.load(path)
    assert loaded.data.source == "synthetic" and loaded.train.method == "clip"


def test_committed_params_yaml_holds_the_defaults_of_params_py():
    assert params.parse(committed_params_yaml()) == params.Params()


@pytest.mark.parametrize(
    "text, key",
    [
        ("train:\n  lr: -1\n", "train.lr"),
        ("train:\n  epocs: 3\n", "train.epocs"),
        ("data:\n  source: mnist\n", "data.source"),
        ("data:\n  source: folder\n", "data.root is required"),
        ("data:\n  splits: {train: 0.9, val: 0.2, test: 0.1}\n", "data.splits"),
        ("evaluate:\n  recall_k: [0, 5]\n", "evaluate.recall_k"),
        ("runtime:\n  image_cache_mb: -1\n", "runtime.image_cache_mb"),
        ("data:\n  synthetic:\n    extra_test_per_class: -5\n", "data.synthetic.extra_test_per_class"),
    ],
)
def test_bad_values_name_the_key(tmp_path, text, key):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(params.ParamsError) as err:
        params.load(path)
    assert key in str(err.value) and str(path) in str(err.value)


def test_malformed_yaml_names_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(params.ParamsError, match="not valid YAML"):
        params.load(path)


def test_atomic_path_leaves_nothing_when_interrupted(tmp_path):
    target = tmp_path / "out.json"
    io.write_json(target, {"ok": 1})
    with pytest.raises(RuntimeError):
        with io.atomic_path(target) as tmp:
            tmp.write_text('{"half": ')
            raise RuntimeError("killed mid-write")
    assert io.read_json(target) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_dir_replaces_whole_folder_or_nothing(tmp_path):
    target = tmp_path / "folder"
    with io.atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("first")
    with pytest.raises(RuntimeError):
        with io.atomic_dir(target) as tmp:
            (tmp / "b.txt").write_text("second")
            raise RuntimeError("killed")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]
    with io.atomic_dir(target) as tmp:
        (tmp / "c.txt").write_text("third")
    assert sorted(p.name for p in target.iterdir()) == ["c.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder"]


def test_embedding_shards_round_trip_as_fixed_size_float32(tmp_path):
    meta = pd.DataFrame({"image_id": ["a", "b", "c"], "split": ["train", "test", "test"]})
    vectors = np.arange(12, dtype=np.float64).reshape(3, 4)
    io.write_embedding_shard(tmp_path / "emb" / "part-00000.parquet", meta.iloc[:2], vectors[:2])
    io.write_embedding_shard(tmp_path / "emb" / "part-00001.parquet", meta.iloc[2:], vectors[2:])
    read_meta, read_vectors = io.read_embeddings(tmp_path / "emb")
    assert read_meta["image_id"].tolist() == ["a", "b", "c"]
    assert read_vectors.dtype == np.float32 and np.array_equal(read_vectors, vectors.astype(np.float32))
    with pytest.raises(FileNotFoundError, match="dvc repro embed"):
        io.read_embeddings(tmp_path / "missing")


def _keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        keys.add(prefix + key)
        if isinstance(value, dict):
            keys |= _keys(value, f"{prefix}{key}.")
    return keys


def test_params_yaml_spells_out_every_key():
    written = _keys(committed_params_yaml())
    assert written == _keys(params.Params().model_dump())


@pytest.mark.parametrize("moved, new", [("train:\n  device: cuda\n", "runtime.device"), ("embed:\n  batch_size: 64\n", "runtime")])
def test_runtime_settings_that_moved_say_where_they_went(tmp_path, moved, new):
    path = tmp_path / "params.yaml"
    path.write_text(moved)
    with pytest.raises(params.ParamsError, match=f"moved to {new}"):
        params.load(path)


def test_threshold_cannot_be_tuned_on_the_split_it_is_scored_on():
    with pytest.raises(params.ParamsError, match="evaluate: Value error, threshold_split must differ"):
        params.parse({"evaluate": {"split": "test", "threshold_split": "test"}})


def test_overrides_keep_yaml_types_and_reject_malformed_ones():
    raw = {}
    for override in ["train.epochs=5", "probe.points=[pixels,3,final]", "index.search_params=", "data.download=false"]:
        params.apply_override(raw, override)
    assert raw == {"train": {"epochs": 5}, "probe": {"points": ["pixels", 3, "final"]}, "index": {"search_params": ""}, "data": {"download": False}}
    with pytest.raises(params.ParamsError, match="expected KEY=VALUE"):
        params.apply_override(raw, "train.epochs")


def test_atomic_outputs_get_the_modes_of_ordinary_files(tmp_path):
    """Temporary files are created private (0600, 0700); what they become must not be."""
    if io.UMASK & 0o077 == 0o077:
        pytest.skip("under a private umask the outputs are rightly 0600 too; nothing to tell apart")
    io.write_json(tmp_path / "out.json", {"ok": 1})
    with io.atomic_dir(tmp_path / "folder") as tmp:
        (tmp / "a.txt").write_text("a")
    assert (tmp_path / "out.json").stat().st_mode & 0o777 == 0o666 & ~io.UMASK
    assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o777 & ~io.UMASK
