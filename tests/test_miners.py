"""Online triplet mining on batches where the right triplets are known by construction."""

import pytest
import torch

from pipeline.training.miners import MINING_STRATEGIES, mine_triplets, pairwise_distances

# Points on a line, so every distance is a difference:
#   index:  0    1    2    3    4    5
#   x:      0    1    2.2  2.5  5.5  10
#   label:  0    0    0    1    1    2   (class 2 is a singleton: no positives, never an anchor)
EMB = torch.tensor([[0.0], [1.0], [2.2], [2.5], [5.5], [10.0]])
LABELS = torch.tensor([0, 0, 0, 1, 1, 2])


def triplets(mined) -> list[tuple[int, int, int]]:
    return list(zip(*(t.tolist() for t in mined)))


def brute_force(emb, labels, strategy, margin):
    d = torch.cdist(emb, emb)
    n, out = len(labels), []
    for a in range(n):
        pos = [p for p in range(n) if p != a and labels[p] == labels[a]]
        neg = [x for x in range(n) if labels[x] != labels[a]]
        if strategy == "all":
            out += [(a, p, x) for p in pos for x in neg]
        elif strategy == "batch_hard" and pos and neg:
            out.append((a, max(pos, key=lambda p: d[a, p]), min(neg, key=lambda x: d[a, x])))
        elif strategy == "semi_hard":
            for p in pos:
                semi = [x for x in neg if d[a, p] < d[a, x] < d[a, p] + margin]
                if semi:
                    out.append((a, p, min(semi, key=lambda x: d[a, x])))
    return out


def test_batch_hard_takes_the_farthest_positive_and_nearest_negative():
    mined = mine_triplets(EMB, LABELS, "batch_hard", margin=0.2)
    assert all(t.dtype == torch.long for t in mined)
    assert triplets(mined) == [(0, 2, 3), (1, 2, 3), (2, 0, 3), (3, 4, 2), (4, 3, 2)]


def test_semi_hard_keeps_only_pairs_with_a_negative_inside_the_margin():
    # (0,1) d=1: nearest negative at 2.5 > 1 + 0.6 -> dropped;  (2,0) d=2.2: negatives at 0.3 (hard)
    # and 3.3 (easy) -> dropped;  (4,3) d=3: negative 2 at 3.3 is the only one in (3, 3.6).
    mined = mine_triplets(EMB, LABELS, "semi_hard", margin=0.6)
    assert triplets(mined) == [(0, 2, 3), (1, 0, 3), (1, 2, 3), (4, 3, 2)]


def test_semi_hard_picks_the_hardest_of_several_semi_hard_negatives():
    # With margin 2, anchor 4 / positive 3 (d=3) has negatives 2 (3.3), 1 (4.5) and 5 (4.5) in (3, 5).
    assert (4, 3, 2) in triplets(mine_triplets(EMB, LABELS, "semi_hard", margin=2.0))


def test_all_gives_every_valid_triplet_once():
    mined = triplets(mine_triplets(EMB, LABELS, "all", margin=0.2))
    # class 0: 3 anchors x 2 positives x 3 negatives; class 1: 2 x 1 x 4; the singleton: none
    assert len(mined) == 3 * 2 * 3 + 2 * 1 * 4
    assert len(set(mined)) == len(mined)
    for a, p, n in mined:
        assert a != p and LABELS[a] == LABELS[p] and LABELS[n] != LABELS[a]


@pytest.mark.parametrize("strategy", MINING_STRATEGIES)
def test_miners_agree_with_a_brute_force_reference(strategy):
    g = torch.Generator().manual_seed(1)
    emb = torch.nn.functional.normalize(torch.randn(24, 8, generator=g), dim=1)
    labels = torch.randint(0, 4, (24,), generator=g)
    assert sorted(triplets(mine_triplets(emb, labels, strategy, margin=0.3))) == sorted(brute_force(emb, labels, strategy, 0.3))


@pytest.mark.parametrize("strategy", MINING_STRATEGIES)
def test_a_batch_of_one_class_mines_nothing(strategy):
    mined = mine_triplets(torch.randn(5, 3), torch.zeros(5, dtype=torch.long), strategy, margin=0.2)
    assert all(len(t) == 0 and t.dtype == torch.long for t in mined)


def test_mining_does_not_touch_the_graph():
    emb = torch.randn(6, 3, requires_grad=True)
    mined = mine_triplets(emb, LABELS, "batch_hard", margin=0.2)
    assert not any(t.requires_grad for t in mined)


def test_pairwise_distances_on_a_line():
    d = pairwise_distances(torch.tensor([[0.0], [1.0], [3.0]]))
    assert torch.allclose(d, torch.tensor([[0.0, 1.0, 3.0], [1.0, 0.0, 2.0], [3.0, 2.0, 0.0]]), atol=1e-5)


def test_unknown_strategy_names_the_setting_and_the_choices():
    with pytest.raises(ValueError, match=r"train\.triplet\.mining.*'hardest'.*batch_hard, semi_hard, all"):
        mine_triplets(EMB, LABELS, "hardest", margin=0.2)


def test_mismatched_labels_are_rejected():
    with pytest.raises(ValueError, match="n labels"):
        mine_triplets(EMB, LABELS[:3], "all", margin=0.2)
