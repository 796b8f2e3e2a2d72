"""The one training loop: every option does the same for every method."""

import pytest
import torch

from pipeline import models
from pipeline.datasets import prepare
from pipeline.params import DataParams, TrainParams
from pipeline.prepared import load_prepared
from pipeline.training.clip import train_clip
from pipeline.training.metric import train_siamese, train_triplet

TRAINERS = {"clip": train_clip, "siamese": train_siamese, "triplet": train_triplet}
METHOD_PARAMS = {
    "clip": {},
    "siamese": {"siamese": {"samples_per_class": 4}},
    "triplet": {"triplet": {"head_epochs": 1, "classes_per_batch": 2, "images_per_class": 2, "head_dim": 16}},
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    prepare(DataParams(synthetic={"n_classes": 4, "images_per_class": 8, "extra_test_per_class": 0, "image_size": 32}, splits={"train": 0.5, "val": 0.25, "test": 0.25}), out)
    return load_prepared(out)


def _train(method, prepared, **overrides):
    torch.manual_seed(0)
    loaded = models.create_model(models.TINY_MODEL, "none", "cpu")
    params = TrainParams(method=method, batch_size=8, augment=False, warmup_fraction=0.0, **{**METHOD_PARAMS[method], **overrides})
    return TRAINERS[method](loaded, prepared, params)


@pytest.mark.parametrize("method", list(TRAINERS))
def test_early_stopping_and_periodic_checkpoints_for_every_method(prepared, method):
    # The first validation after training improves on -infinity; no score can improve by more than 10.
    result = _train(method, prepared, epochs=5, patience=1, min_delta=10.0, checkpoint_every=1)
    assert result.stopped_early_at == 2 and [row["epoch"] for row in result.loss_rows] == [1, 2]
    assert result.best_epoch == 1 and result.best["epoch"] == 1 and result.last["epoch"] == 2
    assert set(result.periodic) == {"epoch-0001.pt", "epoch-0002.pt"}
    assert "early stopping at epoch 2" in result.notes[0]
    assert result.val_rows[0]["epoch"] == 0  # the model before training, on the curves


@pytest.mark.parametrize("method", list(TRAINERS))
def test_gradient_clipping_is_applied_for_every_method_and_only_when_set(prepared, method, monkeypatch):
    calls = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording(parameters, max_norm, *args, **kwargs):
        parameters = list(parameters)
        calls.append((max_norm, len(parameters)))
        return clip(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    _train(method, prepared, epochs=1)
    assert calls == []  # 0: off
    _train(method, prepared, epochs=1, grad_clip_norm=0.5)
    assert calls and all(max_norm == 0.5 and n_parameters > 0 for max_norm, n_parameters in calls)  # on the parameters that train


def test_a_loss_that_is_not_finite_stops_training_before_any_step(prepared, monkeypatch):
    from pipeline.errors import TrainingError
    from pipeline.training import clip

    plain = clip.ClipMethod.step_loss
    calls = []

    def blows_up_on_the_third(self, batch):
        calls.append(1)
        loss = plain(self, batch)
        return loss * float("inf") if len(calls) == 3 else loss  # two steps an epoch: epoch 2, step 1

    monkeypatch.setattr(clip.ClipMethod, "step_loss", blows_up_on_the_third)
    with pytest.raises(TrainingError, match=r"train: the loss is inf at epoch 2, step 1; stopped with nothing saved \(train.lr 0.001 may be too high"):
        _train("clip", prepared, epochs=2)
