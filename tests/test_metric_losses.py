"""The metric-learning losses are pytorch-metric-learning's, with its semantics (not squared, averaged
over non-zero terms); these tests pin what that means on hand-computable batches."""

import math

import pytest
import torch

from pipeline.training.losses import contrastive_loss, pair_indices, triplet_loss


def on_circle(angles) -> torch.Tensor:
    """Unit vectors at these angles: the distance between two is the chord 2 sin(|a - b| / 2)."""
    angles = torch.tensor(angles, dtype=torch.float64)
    return torch.stack([angles.cos(), angles.sin()], dim=1)


def chord(a: float, b: float) -> float:
    return 2 * math.sin(abs(a - b) / 2)


def test_pair_indices_join_row_i_to_row_n_plus_i():
    a1, p, a2, n = pair_indices(torch.tensor([1.0, 0.0, 1.0, 0.0]))
    assert a1.tolist() == [0, 2] and p.tolist() == [4, 6]
    assert a2.tolist() == [1, 3] and n.tolist() == [5, 7]


def test_contrastive_loss_is_the_librarys_not_hadsells():
    # Pairs (first angle, second angle, same): distances 0.2, 0 (ignored), 0.5 and 1.9 (beyond the margin).
    pairs = [(0.0, 0.2013, 1), (1.0, 1.0, 1), (2.0, 2.5066, 0), (0.0, 2.6, 0)]
    first, second = on_circle([a for a, _, _ in pairs]), on_circle([b for _, b, _ in pairs])
    same = torch.tensor([float(s) for _, _, s in pairs])
    d = [chord(a, b) for a, b, _ in pairs]
    margin = 1.0
    loss = contrastive_loss(margin)(torch.cat([first, second]), indices_tuple=pair_indices(same))
    # Each part averaged over its non-zero terms, the two parts added, nothing squared.
    expected = d[0] / 1 + (margin - d[2]) / 1
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    hadsell = (d[0] ** 2 + 0 + (margin - d[2]) ** 2 + 0) / 4  # what this project computed before
    assert abs(float(loss) - hadsell) > 0.1


def test_triplet_loss_averages_the_non_zero_triplets():
    # Labels 0, 0, 1, 1 on a line of angles: with every valid triplet, only some violate the margin.
    angles = [0.0, 0.3, 0.4, 1.5]
    labels = torch.tensor([0, 0, 1, 1])
    margin = 0.2
    terms = []
    for a in range(4):
        for p in range(4):
            for n in range(4):
                if a != p and labels[a] == labels[p] and labels[n] != labels[a]:
                    terms.append(max(chord(angles[a], angles[p]) - chord(angles[a], angles[n]) + margin, 0.0))
    nonzero = [t for t in terms if t > 0]
    assert 0 < len(nonzero) < len(terms)  # the batch has easy and hard triplets
    loss = triplet_loss(margin)(on_circle(angles), labels)
    assert float(loss) == pytest.approx(sum(nonzero) / len(nonzero), rel=1e-5)


def test_no_triplets_gives_a_zero_that_backward_accepts():
    embeddings = on_circle([0.0, 1.0, 2.0]).float().requires_grad_(True)
    empty = torch.empty(0, dtype=torch.long)
    loss = triplet_loss(0.2)(embeddings, torch.tensor([0, 1, 2]), (empty, empty, empty))
    assert loss.item() == 0.0
    loss.backward()
    assert embeddings.grad is not None and torch.all(embeddings.grad == 0)


def test_gradients_are_finite_for_identical_embeddings():
    embeddings = on_circle([0.5, 0.5, 0.5, 0.5]).float().requires_grad_(True)
    loss = triplet_loss(0.2)(embeddings, torch.tensor([0, 0, 1, 1]))
    loss.backward()
    assert torch.isfinite(embeddings.grad).all()
