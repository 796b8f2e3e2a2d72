"""Metric-learning losses on values small enough to compute by hand."""

import pytest
import torch

from pipeline.training.losses import contrastive_loss, pair_distance, pairwise_distances, triplet_margin_loss


def test_contrastive_loss_hand_computed():
    d = torch.tensor([0.5, 0.3, 1.5])
    y = torch.tensor([1.0, 0.0, 0.0])
    # same pair: 0.5^2; close negative: (1 - 0.3)^2; far negative (beyond the margin): 0
    assert contrastive_loss(d, y, margin=1.0).item() == pytest.approx((0.25 + 0.49 + 0.0) / 3)


def test_contrastive_loss_accepts_boolean_labels_and_rejects_mismatched_shapes():
    d = torch.tensor([2.0, 0.5])
    assert contrastive_loss(d, torch.tensor([True, False]), margin=1.5).item() == pytest.approx((4.0 + 1.0) / 2)
    with pytest.raises(ValueError, match="contrastive_loss"):
        contrastive_loss(d, torch.tensor([1.0]), margin=1.0)


def test_pair_distance_per_row():
    a = torch.tensor([[0.0, 0.0], [3.0, 4.0], [1.0, 1.0]])
    b = torch.tensor([[0.0, 0.0], [0.0, 0.0], [2.0, 1.0]])
    assert torch.allclose(pair_distance(a, b), torch.tensor([0.0, 5.0, 1.0]), atol=1e-5)
    with pytest.raises(ValueError, match="shapes differ"):
        pair_distance(a, b[:2])


def test_gradient_is_finite_for_an_identical_pair():
    a = torch.tensor([[0.6, 0.8]], requires_grad=True)
    b = torch.tensor([[0.6, 0.8]], requires_grad=True)
    contrastive_loss(pair_distance(a, b), torch.tensor([0.0]), margin=1.0).backward()
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()


def test_pairwise_distances_match_cdist_and_have_finite_gradients():
    x = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    x = torch.cat([x, x[:1]]).requires_grad_(True)  # rows 0 and 7 identical
    d = pairwise_distances(x)
    assert torch.allclose(d, torch.cdist(x.detach(), x.detach()), atol=1e-4)
    assert d.diagonal().max().item() < 1e-5
    d.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_triplet_loss_hand_computed_in_one_dimension():
    emb = torch.tensor([[0.0], [1.0], [3.0], [0.5]])
    a, p, n = torch.tensor([0, 0, 1]), torch.tensor([1, 2, 0]), torch.tensor([2, 3, 3])
    # (0,1,2): 1 - 3 + 0.5 < 0 -> 0;  (0,2,3): 3 - 0.5 + 0.5 = 3;  (1,0,3): 1 - 0.5 + 0.5 = 1
    assert triplet_margin_loss(emb, a, p, n, margin=0.5).item() == pytest.approx(4.0 / 3, abs=1e-5)


def test_triplet_loss_hand_computed_in_two_dimensions_with_gradients():
    emb = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]], requires_grad=True)
    # (0,1,2): 5 - 10 + 0.2 < 0 -> 0;  (0,2,1): 10 - 5 + 0.2 = 5.2
    loss = triplet_margin_loss(emb, torch.tensor([0, 0]), torch.tensor([1, 2]), torch.tensor([2, 1]), margin=0.2)
    assert loss.item() == pytest.approx(5.2 / 2, abs=1e-4)
    loss.backward()
    # Only (0,2,1) is active: d(0,2) pulls 2 towards 0 and d(0,1) pushes 1 away, each by a unit vector / 2.
    unit = torch.tensor([0.6, 0.8])
    assert torch.allclose(emb.grad[2], unit / 2, atol=1e-4)
    assert torch.allclose(emb.grad[1], -unit / 2, atol=1e-4)
    assert torch.allclose(emb.grad[0], torch.zeros(2), atol=1e-4)


def test_no_triplets_gives_a_zero_that_backward_accepts():
    emb = torch.randn(4, 3, requires_grad=True)
    empty = torch.empty(0, dtype=torch.long)
    loss = triplet_margin_loss(emb, empty, empty, empty, margin=0.2)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(emb.grad, torch.zeros_like(emb))


def test_triplet_loss_rejects_ragged_indices():
    with pytest.raises(ValueError, match="2 anchors, 1 positives"):
        triplet_margin_loss(torch.zeros(3, 2), torch.tensor([0, 1]), torch.tensor([1]), torch.tensor([2, 2]), margin=0.2)


def test_all_triplets_loss_equals_the_mean_over_mined_triplets():
    from pipeline.training.losses import all_triplets_loss
    from pipeline.training.miners import mine_triplets

    torch.manual_seed(0)
    emb = torch.randn(12, 3)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 3])
    a, p, n = mine_triplets(emb, labels, "all", 0.5)
    expected = triplet_margin_loss(emb, a, p, n, 0.5)
    assert torch.allclose(all_triplets_loss(emb, labels, 0.5), expected, atol=1e-5)
