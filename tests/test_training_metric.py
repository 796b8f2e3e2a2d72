"""Siamese and triplet training loops: what they train, what they freeze, when they stop."""

import pytest
import torch
from pytorch_metric_learning import losses, reducers

from pipeline import models
from pipeline.datasets import prepare
from pipeline.prepared import load_prepared
from pipeline.models.heads import unfreeze_last_blocks
from pipeline.params import DataParams, RuntimeParams, TrainParams
from pipeline.distributed import World
from pipeline.models.encode import encode_images
from pipeline.training.loop import fit
from pipeline.training.metric import TripletMethod, estimate_batchnorm_statistics, labelled_split, train_siamese, train_triplet


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("prepared")
    prepare(DataParams(synthetic={"n_classes": 4, "images_per_class": 8, "extra_test_per_class": 0, "image_size": 32}, splits={"train": 0.5, "val": 0.25, "test": 0.25}), out)
    return load_prepared(out)


def _tiny():
    torch.manual_seed(0)
    return models.create_model(models.TINY_MODEL, "none", "cpu")


def _params(**overrides):
    base = dict(epochs=2, batch_size=8, augment=False, warmup_fraction=0.0)
    return TrainParams(**{**base, **overrides})


def _changed(before: dict, module: torch.nn.Module) -> set[str]:
    return {name for name, value in module.state_dict().items() if not torch.equal(before[name], value)}


def _tiny_with_batchnorm_statistics(prepared):
    """The random tiny tower as triplet training starts it: batch-norm statistics estimated on the
    training images (deterministic, so training's own estimate gives the same values)."""
    loaded = _tiny()
    assert estimate_batchnorm_statistics(loaded, prepared, seed=0)
    return loaded


def test_triplet_stage_one_trains_only_the_head(prepared):
    loaded = _tiny_with_batchnorm_statistics(prepared)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    params = _params(method="triplet", epochs=2, triplet={"head_epochs": 2, "classes_per_batch": 2, "images_per_class": 2, "head_dim": 16})
    result = train_triplet(loaded, prepared, params)
    assert not _changed(before, loaded.model), "the frozen tower (batch-norm statistics included) must not change while training"
    assert set(result.best) == {"model", "head", "epoch"} and result.best["head"]["proj.weight"].shape == (16, loaded.tower_dim)
    assert loaded.embed_dim == 16


def test_triplet_stage_two_unfreezes_only_the_last_blocks(prepared):
    loaded = _tiny_with_batchnorm_statistics(prepared)
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    params = _params(method="triplet", epochs=2, triplet={"head_epochs": 1, "unfreeze_blocks": 1, "classes_per_batch": 2, "images_per_class": 2})
    train_triplet(loaded, prepared, params)
    changed = _changed(before, loaded.model)
    # Block 1 from the end is the last ResNet stage; the attention pool after it trains with it.
    assert any(name.startswith("visual.layer4.") for name in changed)
    assert any(name.startswith("visual.attnpool.") for name in changed)
    assert all(name.startswith(("visual.layer4.", "visual.attnpool.")) for name in changed), changed


def test_siamese_trains_the_image_tower_not_the_text_tower(prepared):
    loaded = _tiny()
    before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    result = train_siamese(loaded, prepared, _params(method="siamese", siamese={"samples_per_class": 4}, checkpoint_every=1))
    changed = _changed(before, loaded.model)
    assert any(name.startswith("visual.") for name in changed)
    assert not [name for name in changed if not name.startswith("visual.")]
    assert set(result.periodic) == {"epoch-0001.pt", "epoch-0002.pt"}
    assert [row["epoch"] for row in result.loss_rows] == [1, 2]
    # Epoch 0 is the model before training; MAP@R picks the best checkpoint.
    assert [row["epoch"] for row in result.val_rows] == [0, 1, 2] and {"precision_at_1", "map_at_r"} <= set(result.val_rows[0])


def test_early_stopping_ends_training_and_keeps_the_best(prepared):
    loaded = _tiny()
    # The first validation after training always improves on -infinity; none can improve MAP@R by more than 10.
    params = _params(method="siamese", epochs=5, patience=1, min_delta=10.0, siamese={"samples_per_class": 2})
    result = train_siamese(loaded, prepared, params)
    assert result.stopped_early_at == 2 and len(result.loss_rows) == 2
    assert result.best_epoch == 1 and result.last["epoch"] == 2
    assert "early stopping at epoch 2" in result.notes[0]


def test_saved_triplet_model_embeds_through_its_head(prepared, tmp_path):
    loaded = _tiny()
    params = _params(method="triplet", epochs=1, triplet={"head_epochs": 1, "classes_per_batch": 2, "images_per_class": 2, "head_dim": 8})
    result = train_triplet(loaded, prepared, params)
    models.save_trained(tmp_path, loaded, {"method": "triplet", "checkpoint": "best.pt", "head_dim": 8}, {"best.pt": result.best})
    again, _ = models.load_trained(tmp_path, "cpu")
    from pipeline.models.encode import encode_images

    emb = encode_images(again, prepared.image_paths(prepared.images.head(3)))
    assert emb.shape == (3, 8)


def test_unfreezing_one_vit_block_means_the_last_transformer_block_and_the_projection():
    from open_clip.model import CLIPVisionCfg, _build_vision_tower

    visual = _build_vision_tower(16, CLIPVisionCfg(layers=3, width=32, patch_size=8, image_size=16, head_width=16))
    params, modules = unfreeze_last_blocks(visual, 1)
    trainable = {name for name, p in visual.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in visual.named_parameters() if n.startswith(("transformer.resblocks.2.", "ln_post.")) or n == "proj"}
    assert modules[0] is visual.transformer.resblocks[2] and len(params) == len(trainable)
    with pytest.raises(ValueError, match="unfreeze_blocks: 4 > the tower's 3 blocks"):
        unfreeze_last_blocks(visual, 4)


def _mean_triplet_loss(loaded, prepared, images, margin):
    """Mean of relu(d(a,p) - d(a,n) + margin) over every triplet of `images`, the model as it embeds them."""
    loaded.model.eval()
    loaded.image_head.eval()
    emb = torch.from_numpy(encode_images(loaded, prepared.image_paths(images)))
    labels = torch.as_tensor(images["label"].to_numpy().astype("int64"))
    return losses.TripletMarginLoss(margin=margin, reducer=reducers.MeanReducer())(emb, labels).item()


def test_head_only_epochs_on_a_random_tower_reduce_the_triplet_loss_instead_of_sitting_at_the_margin(prepared):
    """Four shapes, separable: the head alone, on the frozen random tower, must pull the loss well
    below the margin. Frozen batch norm with the init's statistics collapsed every image to one
    point, where every triplet costs exactly the margin whatever the head does."""
    images = labelled_split(prepared, "train")
    loaded = _tiny()
    params = _params(method="triplet", epochs=4, lr=1e-2, triplet={"head_epochs": 4, "classes_per_batch": 4, "images_per_class": 4, "margin": 0.2})
    method = TripletMethod(loaded, prepared, params, RuntimeParams(), World())
    start = _mean_triplet_loss(loaded, prepared, images, 0.2)
    fit(method, loaded, params)
    end = _mean_triplet_loss(loaded, prepared, images, 0.2)
    assert end < 0.5 * start and end < 0.1, (start, end)
