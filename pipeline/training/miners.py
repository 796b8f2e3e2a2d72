"""Online triplet mining inside a batch (`train.triplet.mining`): pytorch-metric-learning's miners.

- all: no miner; the loss takes every valid triplet of the batch.
- batch_hard: `BatchHardMiner`, Hermans et al. 2017: per anchor, the farthest positive and the
  nearest negative.
- semi_hard: `TripletMarginMiner(type_of_triplets="semihard")`: every triplet with
  d(a,p) < d(a,n) <= d(a,p) + margin. FaceNet keeps only the nearest such negative per (a, p); the
  library keeps them all, and so do we (README: "Metric learning").
"""

from __future__ import annotations

from typing import Optional

from pytorch_metric_learning import miners

MINING_STRATEGIES = ("batch_hard", "semi_hard", "all")


def make_miner(strategy: str, margin: float) -> Optional[miners.BaseMiner]:
    if strategy == "all":
        return None
    if strategy == "batch_hard":
        return miners.BatchHardMiner()
    if strategy == "semi_hard":
        return miners.TripletMarginMiner(margin=margin, type_of_triplets="semihard")
    raise ValueError(f"train.triplet.mining: unknown strategy {strategy!r} ({', '.join(MINING_STRATEGIES)})")
