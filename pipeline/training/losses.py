"""Metric-learning losses on Euclidean distances: contrastive (pairs) and triplet margin (index triplets).

Losses take distances or index triplets and nothing else; which pairs or triplets to use is the
job of samplers.py (pairs) and miners.py (triplets), as in pytorch-metric-learning.
"""

from __future__ import annotations

import torch

# Inside the sqrt so that d = 0 (identical embeddings) has a finite gradient; it shifts d by at
# most 1e-6, far below anything a margin can see.
EPS = 1e-12


def pair_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distance between matching rows of a and b (shape (n,)), differentiable at a == b."""
    if a.shape != b.shape:
        raise ValueError(f"pair_distance: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    return ((a - b).pow(2).sum(dim=-1) + EPS).sqrt()


def pairwise_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """All n x n Euclidean distances between rows, differentiable everywhere (the diagonal included).

    Uses |a|^2 + |b|^2 - 2ab, so memory is O(n^2) rather than O(n^2 * dim). The product runs in
    float32 with autocast off: in half precision its rounding error alone is ~1e-3, which turns into
    distances of ~0.03 between (near-)identical embeddings.
    """
    if embeddings.ndim != 2:
        raise ValueError(f"pairwise_distances: expected an (n, dim) tensor, got shape {tuple(embeddings.shape)}")
    with torch.autocast(device_type=embeddings.device.type, enabled=False):
        x = embeddings.float()
        squared = x.pow(2).sum(dim=1)
        d2 = squared[:, None] + squared[None, :] - 2.0 * (x @ x.T)
        # Rounding can leave tiny negatives; the diagonal is zero by definition.
        diagonal = torch.eye(len(x), dtype=torch.bool, device=x.device)
        d2 = d2.clamp_min(0.0).masked_fill(diagonal, 0.0)
        return (d2 + EPS).sqrt()


def contrastive_loss(distances: torch.Tensor, same: torch.Tensor, margin: float) -> torch.Tensor:
    """Hadsell et al. 2006: mean of y*d^2 + (1-y)*max(margin - d, 0)^2, y = 1 for same-class pairs."""
    if distances.shape != same.shape:
        raise ValueError(f"contrastive_loss: {tuple(distances.shape)} distances but {tuple(same.shape)} labels")
    y = same.to(distances.dtype)
    return (y * distances.pow(2) + (1 - y) * torch.relu(margin - distances).pow(2)).mean()


def triplet_margin_loss(
    embeddings: torch.Tensor,
    anchors: torch.Tensor,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    margin: float,
) -> torch.Tensor:
    """Mean of relu(d(a, p) - d(a, n) + margin) over the index triplets into `embeddings`.

    No triplets (nothing mined in this batch) gives a zero that is still attached to `embeddings`,
    so the training step's backward() works and simply changes nothing.
    """
    if not (len(anchors) == len(positives) == len(negatives)):
        raise ValueError(f"triplet_margin_loss: {len(anchors)} anchors, {len(positives)} positives, {len(negatives)} negatives")
    if len(anchors) == 0:
        return embeddings.sum() * 0.0
    # One n x n matrix, then gathers: O(n^2 + triplets) memory, where gathering embedding rows per
    # triplet would cost O(triplets * dim) -- "all" mining easily gives n^2 or more triplets.
    distances = pairwise_distances(embeddings)
    return torch.relu(distances[anchors, positives] - distances[anchors, negatives] + margin).mean()


def all_triplets_loss(embeddings: torch.Tensor, labels: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean of relu(d(a,p) - d(a,n) + margin) over every valid triplet, one anchor at a time.

    The same value as mining "all" and averaging, without materialising the triplet indices
    (O(n^3) of them), so validation can score its whole split every epoch in O(n^2) memory.
    """
    distances = pairwise_distances(embeddings)
    total, count = embeddings.new_zeros(()), 0
    for anchor in range(len(embeddings)):
        same = labels == labels[anchor]
        same[anchor] = False
        d_ap, d_an = distances[anchor][same], distances[anchor][labels != labels[anchor]]
        if len(d_ap) and len(d_an):
            total = total + torch.relu(d_ap[:, None] - d_an[None, :] + margin).sum()
            count += len(d_ap) * len(d_an)
    return total / count if count else total
