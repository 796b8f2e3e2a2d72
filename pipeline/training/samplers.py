"""What goes into a metric-learning epoch: labelled pairs (Siamese) and P x K class-balanced batches (triplet).

pytorch-metric-learning has no pair sampler (its losses pair up the images of a batch), so
`sample_pairs` is ours; the P x K batches are the library's `MPerClassSampler`.

Both are reproducible: sample_pairs from the generator it is given, PKBatchSampler from (seed, epoch).
"""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
from pytorch_metric_learning.samplers import MPerClassSampler


def sample_pairs(
    labels: np.ndarray, samples_per_class: int, positive_ratio: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A fresh epoch of pairs (first, second, same) as index arrays and float32 0/1, in shuffled order.

    Per class, `samples_per_class` anchors (with replacement only when the class is smaller); each
    is paired with another image of its class with probability `positive_ratio`, else with an image
    of another class drawn uniformly over images. Singleton classes can only give negatives.
    Per-class quotas keep small classes from being drowned out by large ones.
    """
    if not 0.0 <= positive_ratio <= 1.0:
        raise ValueError(f"train.siamese.positive_ratio must lie in [0, 1], got {positive_ratio}")
    if samples_per_class < 1:
        raise ValueError(f"train.siamese.samples_per_class must be >= 1, got {samples_per_class}")
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if len(classes) < 2:
        raise ValueError(f"siamese training needs at least two classes; the labels have {len(classes)}")
    first, second, same = [], [], []
    for cls in classes:
        members = np.flatnonzero(labels == cls)
        others = np.flatnonzero(labels != cls)
        slots = rng.choice(len(members), size=samples_per_class, replace=len(members) < samples_per_class)
        positive = rng.random(samples_per_class) < positive_ratio
        if len(members) >= 2:
            # A shift of 1..n-1 slots: uniform over the class's other images, never the anchor itself.
            partners = members[(slots + rng.integers(1, len(members), size=samples_per_class)) % len(members)]
        else:
            positive[:] = False  # no other image of this class to pair with
            partners = members[slots]
        negatives = rng.choice(others, size=samples_per_class)
        first.append(members[slots])
        second.append(np.where(positive, partners, negatives))
        same.append(positive.astype(np.float32))
    order = rng.permutation(len(classes) * samples_per_class)
    return np.concatenate(first)[order], np.concatenate(second)[order], np.concatenate(same)[order]


class PKBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of P distinct classes x K images each (pytorch-metric-learning's `MPerClassSampler`),
    so every anchor has positives and negatives.

    What this adds to the library's sampler: classes with a single image are left out (they cannot
    give a positive, and the library would repeat the image as its own "positive"); with fewer than
    P usable classes every batch uses all of them (`p_effective`, where the library would refuse);
    an epoch has ceil(usable images / (p_effective * K)) batches; and each epoch's batches come from
    (seed, epoch) (`set_epoch`), not from NumPy's global state, which the library draws from.
    K images are drawn without replacement when the class has >= K, with replacement otherwise.
    """

    def __init__(self, labels, p: int, k: int, seed: int):
        super().__init__()
        if p < 2:
            raise ValueError(f"train.triplet.classes_per_batch must be >= 2 (a batch needs negatives), got {p}")
        if k < 2:
            raise ValueError(f"train.triplet.images_per_class must be >= 2 (a batch needs positives), got {k}")
        labels = np.asarray(labels)
        classes, counts = np.unique(labels, return_counts=True)
        eligible = classes[counts >= 2]
        if len(eligible) < 2:
            raise ValueError(
                f"train.triplet.classes_per_batch: P x K batches need at least two classes with 2+ images; "
                f"the labels have {len(eligible)}"
            )
        self.usable = np.flatnonzero(np.isin(labels, eligible))  # dataset index of each image the library sees
        self.classes = eligible
        self.p, self.k, self.seed = p, k, seed
        self.p_effective = min(p, len(eligible))
        self.num_images = len(self.usable)
        self.batch = self.p_effective * self.k
        self.library = MPerClassSampler(labels[self.usable], m=k, batch_size=self.batch, length_before_new_iter=len(self) * self.batch)
        self.class_order = list(self.library.labels)  # the library shuffles this list in place
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.num_images / (self.p_effective * self.k))

    def __iter__(self) -> Iterator[list[int]]:
        # The library shuffles with NumPy's global generator: seed it for this epoch, then put it back.
        outside = np.random.get_state()
        np.random.seed([self.seed, self.epoch])
        self.library.labels = list(self.class_order)
        try:
            order = self.usable[np.fromiter(iter(self.library), dtype=np.int64)]
        finally:
            np.random.set_state(outside)
        for start in range(0, len(order), self.batch):
            yield order[start : start + self.batch].tolist()
