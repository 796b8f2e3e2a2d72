"""The metric-learning losses: pytorch-metric-learning's, configured from `train.*`.

Both work on L2-normalised embeddings with Euclidean distances in [0, 2] (the library's
`LpDistance`, which normalises again: a no-op on our embeddings).

The library's semantics are kept, not the ones this project had before (README: "Metric learning"):
- contrastive: relu(d) for same-class pairs and relu(margin - d) for others, not squared (Hadsell
  et al. square both), each part averaged over its non-zero pairs and the two parts added;
- triplet: relu(d(a,p) - d(a,n) + margin) averaged over the triplets whose loss is not zero.
"""

from __future__ import annotations

import torch
from pytorch_metric_learning import losses


def contrastive_loss(margin: float) -> losses.ContrastiveLoss:
    """`train.siamese.margin`: how far apart different-class pairs are pushed."""
    return losses.ContrastiveLoss(pos_margin=0.0, neg_margin=margin)


def triplet_loss(margin: float) -> losses.TripletMarginLoss:
    """`train.triplet.margin`; with no mined triplets given, every valid triplet of the batch."""
    return losses.TripletMarginLoss(margin=margin, triplets_per_anchor="all")


def pair_indices(same: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The library's pair tuple (a1, p, a2, n) for explicit pairs: row i pairs embedding i with
    embedding n + i of a (2n, dim) batch, same-class pairs into (a1, p), the others into (a2, n)."""
    n = len(same)
    first = torch.arange(n, device=same.device)
    positive = same.bool()
    return first[positive], first[positive] + n, first[~positive], first[~positive] + n
