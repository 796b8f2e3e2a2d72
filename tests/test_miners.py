"""`train.triplet.mining` -> pytorch-metric-learning's miners, on batches whose triplets are known
by construction (a brute force over the same chord distances is the reference)."""

import math

import pytest
import torch

from pipeline.training.losses import triplet_loss
from pipeline.training.miners import MINING_STRATEGIES, make_miner

# Unit vectors at these angles: distances grow with the angle between them (a chord), so this is
# the line 0, 1, 2.2, 2.5, 5.5, 10 scaled onto a tenth of a circle.
ANGLES = [0.0, 0.1, 0.22, 0.25, 0.55, 1.0]
LABELS = torch.tensor([0, 0, 0, 1, 1, 2])  # class 2 is a singleton: never an anchor
EMB = torch.tensor([[math.cos(a), math.sin(a)] for a in ANGLES])
MARGIN = 0.2


def d(a: int, b: int) -> float:
    return 2 * math.sin(abs(ANGLES[a] - ANGLES[b]) / 2)


def triplets(mined) -> set[tuple[int, int, int]]:
    return set(zip(*(t.tolist() for t in mined)))


def brute_force(strategy: str) -> set[tuple[int, int, int]]:
    n, out = len(LABELS), set()
    for a in range(n):
        pos = [p for p in range(n) if p != a and LABELS[p] == LABELS[a]]
        neg = [x for x in range(n) if LABELS[x] != LABELS[a]]
        if strategy == "batch_hard" and pos:
            out.add((a, max(pos, key=lambda p: d(a, p)), min(neg, key=lambda x: d(a, x))))
        elif strategy == "semi_hard":  # the library's: every negative in (d(a,p), d(a,p) + margin]
            out |= {(a, p, x) for p in pos for x in neg if 0 < d(a, x) - d(a, p) <= MARGIN}
    return out


@pytest.mark.parametrize("strategy", ["batch_hard", "semi_hard"])
def test_miners_agree_with_a_brute_force_reference(strategy):
    mined = make_miner(strategy, MARGIN)(EMB, LABELS)
    assert triplets(mined) == brute_force(strategy)
    assert brute_force(strategy), "the batch must give this strategy something to mine"


def test_semi_hard_keeps_every_semi_hard_negative_not_only_the_nearest():
    """FaceNet keeps the nearest one per (a, p); the library keeps them all (README: Metric learning)."""
    mined = triplets(make_miner("semi_hard", MARGIN)(EMB, LABELS))
    per_pair = {}
    for a, p, _ in mined:
        per_pair[(a, p)] = per_pair.get((a, p), 0) + 1
    assert max(per_pair.values()) > 1


def test_all_means_no_miner_and_the_loss_takes_every_valid_triplet():
    assert make_miner("all", MARGIN) is None
    terms = [
        max(d(a, p) - d(a, x) + MARGIN, 0.0)
        for a in range(6) for p in range(6) for x in range(6)
        if a != p and LABELS[a] == LABELS[p] and LABELS[x] != LABELS[a]
    ]  # fmt: skip
    nonzero = [t for t in terms if t > 0]
    assert float(triplet_loss(MARGIN)(EMB, LABELS)) == pytest.approx(sum(nonzero) / len(nonzero), rel=1e-5)


def test_a_batch_of_one_class_mines_nothing():
    for strategy in ("batch_hard", "semi_hard"):
        assert not triplets(make_miner(strategy, MARGIN)(EMB[:3], LABELS[:3]))


def test_unknown_strategy_names_the_setting_and_the_choices():
    with pytest.raises(ValueError, match=r"train\.triplet\.mining: unknown strategy 'hardest'.*batch_hard, semi_hard, all"):
        make_miner("hardest", MARGIN)
    assert set(MINING_STRATEGIES) == {"batch_hard", "semi_hard", "all"}
