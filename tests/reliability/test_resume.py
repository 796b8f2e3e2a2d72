"""train.resume: a run killed after an epoch continues from its saved state and ends exactly where an
uninterrupted run with the same seed ends (CPU): the same weights, the same curves."""

import pandas as pd
import pytest
import torch
import yaml

from pipeline import train
from pipeline.datasets import prepare
from pipeline.params import DataParams
from pipeline.training.checkpoints import Resume
from pipeline.training.curves import read_curves

METHODS = {
    "clip": {},
    "siamese": {"siamese": {"samples_per_class": 8}},
    # One head-only epoch, then the tail: the kill after epoch 2 lands in the second stage.
    "triplet": {"triplet": {"head_epochs": 1, "unfreeze_blocks": 1, "classes_per_batch": 4, "images_per_class": 4}},
}

SMALL_SPLIT = {"recall_k": [1, 5]}  # the test split has 8 images: every stage refuses R@10 on it


class Killed(Exception):
    """Stands in for SIGKILL right after an epoch's state was saved."""


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "prepared"
    prepare(DataParams(synthetic={"n_classes": 4, "images_per_class": 8, "extra_test_per_class": 0}, splits={"train": 0.5, "val": 0.25, "test": 0.25}), out)
    return out


def _train(data, folder, method, resume=False):
    folder.mkdir(exist_ok=True)
    params = folder / "params.yaml"
    train_params = {"method": method, "epochs": 4, "batch_size": 8, **METHODS[method]}
    params.write_text(yaml.safe_dump({"train": train_params, "evaluate": SMALL_SPLIT, "runtime": {"resume": resume}}))
    train.main(params_file=params, data=data, out=folder / "model", reports=folder / "reports", timing=folder / "timing.json")


def _outcome(folder):
    weights = {name: torch.load(folder / "model" / name, weights_only=True) for name in ("best.pt", "last.pt")}
    loss = read_curves(folder / "reports")[0]
    return weights, loss, read_curves(folder / "reports")[1]


def _same_weights(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    return all(_same_weights(a[k], b[k]) if isinstance(a[k], dict) else torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)


@pytest.mark.parametrize("method", list(METHODS))
def test_a_resumed_run_ends_bit_identical_to_an_uninterrupted_one(data, tmp_path, monkeypatch, method):
    _train(data, tmp_path / "straight", method)  # resume off: nothing saved between epochs
    expected = _outcome(tmp_path / "straight")
    assert not (tmp_path / "straight" / "model.resume.pt").exists()

    save = Resume.save

    def save_then_die(self, **state):
        save(self, **state)
        if state["epoch"] == 2:
            raise Killed

    monkeypatch.setattr(Resume, "save", save_then_die)
    with pytest.raises(Killed):
        _train(data, tmp_path / "interrupted", method, resume=True)
    monkeypatch.undo()
    assert (tmp_path / "interrupted" / "model.resume.pt").exists() and not (tmp_path / "interrupted" / "model").exists()

    _train(data, tmp_path / "interrupted", method, resume=True)
    weights, loss, val = _outcome(tmp_path / "interrupted")
    assert _same_weights(weights["last.pt"], expected[0]["last.pt"]) and _same_weights(weights["best.pt"], expected[0]["best.pt"])
    pd.testing.assert_frame_equal(loss, expected[1])
    pd.testing.assert_frame_equal(val, expected[2])
    assert not (tmp_path / "interrupted" / "model.resume.pt").exists()


def test_a_state_from_other_params_is_not_resumed(data, tmp_path, monkeypatch, caplog):
    save = Resume.save

    def die_after_first_epoch(self, **state):
        save(self, **state)
        raise Killed

    monkeypatch.setattr(Resume, "save", die_after_first_epoch)
    with pytest.raises(Killed):
        _train(data, tmp_path, "clip", resume=True)
    monkeypatch.undo()

    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"train": {"method": "clip", "epochs": 2, "batch_size": 8, "lr": 0.01}, "evaluate": SMALL_SPLIT, "runtime": {"resume": True}}))
    train.main(params_file=params, data=data, out=tmp_path / "model", reports=tmp_path / "reports", timing=tmp_path / "timing.json")
    assert "saved with other params or data: training starts from the beginning" in caplog.text
    assert list(read_curves(tmp_path / "reports")[0]["epoch"]) == [1, 2]
