"""Pair sampling (Siamese) and P x K batches (triplet): composition, reproducibility, errors."""

import numpy as np
import pytest
import torch

from pipeline.training.samplers import PKBatchSampler, sample_pairs

LABELS = np.repeat(np.arange(10), 20)  # 10 classes x 20 images


def test_pairs_are_reproducible_from_the_generator():
    first = sample_pairs(LABELS, 8, 0.5, np.random.default_rng(3))
    again = sample_pairs(LABELS, 8, 0.5, np.random.default_rng(3))
    other = sample_pairs(LABELS, 8, 0.5, np.random.default_rng(4))
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    assert not np.array_equal(first[0], other[0])


def test_pairs_have_per_class_anchor_quotas_and_consistent_labels():
    i, j, same = sample_pairs(LABELS, 30, 0.5, np.random.default_rng(0))
    assert same.dtype == np.float32 and set(np.unique(same)) <= {0.0, 1.0}
    assert len(i) == len(j) == len(same) == 10 * 30
    assert np.array_equal(np.bincount(LABELS[i]), np.full(10, 30))
    positive = same == 1
    assert np.all(LABELS[i[positive]] == LABELS[j[positive]]) and np.all(i[positive] != j[positive])
    assert np.all(LABELS[i[~positive]] != LABELS[j[~positive]])


def test_positive_share_follows_positive_ratio():
    _, _, same = sample_pairs(LABELS, 500, 0.3, np.random.default_rng(0))
    assert same.mean() == pytest.approx(0.3, abs=0.02)  # 5000 draws: sd ~ 0.0065
    assert sample_pairs(LABELS, 20, 0.0, np.random.default_rng(0))[2].sum() == 0
    assert sample_pairs(LABELS, 20, 1.0, np.random.default_rng(0))[2].min() == 1


def test_anchors_are_drawn_without_replacement_when_the_class_is_large_enough():
    i, _, _ = sample_pairs(LABELS, 20, 0.5, np.random.default_rng(0))
    assert np.array_equal(np.sort(i), np.arange(len(LABELS)))  # each image exactly once


def test_small_and_singleton_classes():
    labels = np.array([0, 1, 1, 2, 2, 2])
    i, j, same = sample_pairs(labels, 10, 1.0, np.random.default_rng(0))
    from_singleton = labels[i] == 0
    assert np.all(same[from_singleton] == 0)  # no other image of class 0: negatives instead
    assert np.all(labels[j[from_singleton]] != 0)
    assert np.all(same[~from_singleton] == 1) and np.all(i[~from_singleton] != j[~from_singleton])
    assert np.array_equal(np.bincount(labels[i]), [10, 10, 10])  # with replacement for the small classes


def test_pair_errors():
    with pytest.raises(ValueError, match=r"train\.siamese\.positive_ratio"):
        sample_pairs(LABELS, 4, 1.5, np.random.default_rng(0))
    with pytest.raises(ValueError, match="siamese training needs at least two classes"):
        sample_pairs(np.zeros(5, dtype=int), 4, 0.5, np.random.default_rng(0))


# 6 classes x 5 images, then a singleton class 6 and a two-image class 7.
PK_LABELS = np.concatenate([np.repeat(np.arange(6), 5), [6], [7, 7]])


def batches(sampler, epoch):
    sampler.set_epoch(epoch)
    return list(sampler)


def test_pk_batches_hold_p_classes_of_k_images():
    sampler = PKBatchSampler(PK_LABELS, p=3, k=4, seed=0)
    assert sampler.p_effective == 3
    assert len(sampler) == int(np.ceil(32 / 12))  # the singleton's image does not count
    seen = set()
    for epoch in range(5):
        out = batches(sampler, epoch)
        assert len(out) == len(sampler)
        for batch in out:
            assert len(batch) == 12 and all(isinstance(i, int) for i in batch)
            classes, counts = np.unique(PK_LABELS[batch], return_counts=True)
            assert len(classes) == 3 and np.all(counts == 4)
            for cls in classes:
                members = [i for i in batch if PK_LABELS[i] == cls]
                if cls < 6:  # 5 images >= K: no repeats
                    assert len(set(members)) == 4
            seen.update(classes.tolist())
    assert 6 not in seen and 7 in seen  # the two-image class is drawn with replacement


def test_pk_batches_are_reproducible_per_seed_and_epoch():
    a, b = PKBatchSampler(PK_LABELS, 3, 4, seed=5), PKBatchSampler(PK_LABELS, 3, 4, seed=5)
    assert batches(a, 2) == batches(b, 2)
    assert batches(a, 2) != batches(a, 3)
    assert batches(a, 2) != batches(PKBatchSampler(PK_LABELS, 3, 4, seed=6), 2)


def test_pk_uses_all_classes_when_there_are_fewer_than_p():
    sampler = PKBatchSampler(np.array([0, 0, 0, 1, 1, 2]), p=8, k=2, seed=0)
    assert sampler.p_effective == 2
    for batch in batches(sampler, 0):
        assert sorted(np.array([0, 0, 0, 1, 1, 2])[batch].tolist()) == [0, 0, 1, 1]


def test_pk_sampler_drives_a_dataloader():
    dataset = torch.utils.data.TensorDataset(torch.arange(len(PK_LABELS)), torch.from_numpy(PK_LABELS))
    sampler = PKBatchSampler(PK_LABELS, 2, 3, seed=0)
    loaded = list(torch.utils.data.DataLoader(dataset, batch_sampler=sampler))
    assert len(loaded) == len(sampler) and all(len(x) == 6 for x, _ in loaded)


def test_pk_errors():
    with pytest.raises(ValueError, match=r"train\.triplet\.classes_per_batch.*two classes with 2\+ images"):
        PKBatchSampler(np.array([0, 0, 0, 1, 2]), p=2, k=2, seed=0)  # classes 1 and 2 are singletons
    with pytest.raises(ValueError, match=r"train\.triplet\.classes_per_batch"):
        PKBatchSampler(PK_LABELS, p=1, k=2, seed=0)
    with pytest.raises(ValueError, match=r"train\.triplet\.images_per_class"):
        PKBatchSampler(PK_LABELS, p=2, k=1, seed=0)


def test_pk_batches_leave_numpys_global_generator_as_it_was():
    """The library's sampler shuffles with NumPy's global generator; ours seeds it per epoch and puts it back."""
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    batches(PKBatchSampler(PK_LABELS, 3, 4, seed=0), 1)
    assert np.array_equal(np.random.get_state()[1], before)
