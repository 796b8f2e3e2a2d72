"""Online triplet mining inside a batch: which (anchor, positive, negative) index triplets to train on.

Miners return indices only; the loss (losses.triplet_margin_loss) recomputes the distances with
gradients. Batches should hold several images per class (samplers.PKBatchSampler), else anchors
have no positives and nothing is mined.
"""

from __future__ import annotations

import torch

from pipeline.training.losses import pairwise_distances

MINING_STRATEGIES = ("batch_hard", "semi_hard", "all")

__all__ = ["MINING_STRATEGIES", "mine_triplets", "pairwise_distances"]

Triplets = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _batch_hard(distances: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor) -> Triplets:
    """Hermans et al. 2017: per anchor, the farthest positive and the nearest negative."""
    usable = positive.any(dim=1) & negative.any(dim=1)
    hardest_positive = distances.masked_fill(~positive, -torch.inf).argmax(dim=1)
    hardest_negative = distances.masked_fill(~negative, torch.inf).argmin(dim=1)
    anchors = usable.nonzero(as_tuple=True)[0]
    return anchors, hardest_positive[anchors], hardest_negative[anchors]


def _semi_hard(distances: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float) -> Triplets:
    """FaceNet: per (a, p), the nearest negative farther than p but within the margin; else no triplet."""
    anchors, positives = positive.nonzero(as_tuple=True)
    d_ap = distances[anchors, positives][:, None]
    d_an = distances[anchors]  # (pairs, n)
    candidate = negative[anchors] & (d_an > d_ap) & (d_an < d_ap + margin)
    negatives = d_an.masked_fill(~candidate, torch.inf).argmin(dim=1)
    keep = candidate.any(dim=1)
    return anchors[keep], positives[keep], negatives[keep]


def _all(positive: torch.Tensor, negative: torch.Tensor) -> Triplets:
    """Every valid triplet, built from the (a, p) and (a, n) pair lists rather than an n^3 mask."""
    anchors, positives = positive.nonzero(as_tuple=True)  # row-major: sorted by anchor
    negative_rows, negative_cols = negative.nonzero(as_tuple=True)
    per_anchor = negative.sum(dim=1)
    first = torch.cumsum(per_anchor, dim=0) - per_anchor  # where anchor a's negatives start
    counts = per_anchor[anchors]
    starts = first[anchors].repeat_interleave(counts)
    offsets = torch.arange(int(counts.sum()), device=positive.device) - (torch.cumsum(counts, 0) - counts).repeat_interleave(counts)
    return anchors.repeat_interleave(counts), positives.repeat_interleave(counts), negative_cols[starts + offsets]


def mine_triplets(embeddings: torch.Tensor, labels: torch.Tensor, strategy: str, margin: float) -> Triplets:
    """`train.triplet.mining`: (anchor, positive, negative) long index tensors into this batch.

    batch_hard: one triplet per anchor that has both a positive and a negative in the batch.
    semi_hard: one per (a, p) pair that has a negative with d(a,p) < d(a,n) < d(a,p) + margin.
    all: every a != p of one class with n of another class (grows as n^3; fine for P x K batches).
    """
    if strategy not in MINING_STRATEGIES:
        raise ValueError(f"train.triplet.mining: unknown strategy {strategy!r} ({', '.join(MINING_STRATEGIES)})")
    if embeddings.ndim != 2 or labels.ndim != 1 or len(labels) != len(embeddings):
        raise ValueError(f"mine_triplets: expected (n, dim) embeddings and n labels, got {tuple(embeddings.shape)} and {tuple(labels.shape)}")
    with torch.no_grad():
        labels = labels.to(embeddings.device)
        same = labels[:, None] == labels[None, :]
        itself = torch.eye(len(labels), dtype=torch.bool, device=embeddings.device)
        positive, negative = same & ~itself, ~same
        if strategy == "all":
            return _all(positive, negative)
        distances = pairwise_distances(embeddings.detach())
        if strategy == "batch_hard":
            return _batch_hard(distances, positive, negative)
        return _semi_hard(distances, positive, negative, margin)
