"""precision@1, R-precision and MAP@R (pytorch-metric-learning's definitions) computed by hand."""

import numpy as np
import pytest

from pipeline.metrics.metric_learning import accuracy_at_r, self_excluded_neighbours


def test_map_at_r_hand_computed_and_lone_queries_left_out():
    neighbour_labels = np.array(
        [
            [0, 1, 0, 0],  # R=3: relevant at ranks 1 and 3 (rank 4 is past R) -> AP@R (1/1 + 2/3) / 3
            [0, 1, 1, 0],  # R=1: first neighbour wrong -> 0 everywhere
            [0, 1, 2, 3],  # R=0: a lone label, not counted
        ]
    )
    result = accuracy_at_r(neighbour_labels, np.array([0, 1, 9]), np.array([3, 1, 0]))
    assert result["n_queries"] == 2
    assert result["precision_at_1"] == pytest.approx((1 + 0) / 2)
    assert result["r_precision"] == pytest.approx((2 / 3 + 0) / 2)
    assert result["map_at_r"] == pytest.approx((5 / 9 + 0) / 2)


def test_single_query_values():
    result = accuracy_at_r(np.array([[7, 3, 7]]), np.array([7]), np.array([3]))
    assert result == {"precision_at_1": 1.0, "r_precision": pytest.approx(2 / 3), "map_at_r": pytest.approx(5 / 9), "n_queries": 1}


def test_all_lone_queries_give_zero_like_pml():
    result = accuracy_at_r(np.array([[1], [0]]), np.array([0, 1]), np.array([0, 0]))
    assert result == {"precision_at_1": 0.0, "r_precision": 0.0, "map_at_r": 0.0, "n_queries": 0}


def test_too_few_neighbours_is_an_error():
    with pytest.raises(ValueError, match="k >= 3"):
        accuracy_at_r(np.array([[0, 0]]), np.array([0]), np.array([3]))


def test_self_excluded_neighbours_on_a_line():
    # 1-D points: 0 1 | 3 10 12 with labels 0 0 | 1 1 1
    emb = np.array([[0.0], [1.0], [3.0], [10.0], [12.0]])
    labels = np.array([0, 0, 1, 1, 1])
    neighbour_labels, relevant = self_excluded_neighbours(emb, labels, k=2)
    # nearest others: 0 -> 1, 2; 1 -> 0, 2; 2 -> 1, 0; 3 -> 4, 2; 4 -> 3, 2
    assert neighbour_labels.tolist() == [[0, 1], [0, 1], [0, 0], [1, 1], [1, 1]]
    assert relevant.tolist() == [1, 1, 2, 2, 2]
    # every query is perfect except point 2, whose two neighbours are both of class 0
    assert accuracy_at_r(neighbour_labels, labels, relevant) == {
        "precision_at_1": pytest.approx(0.8),
        "r_precision": pytest.approx(0.8),
        "map_at_r": pytest.approx(0.8),
        "n_queries": 5,
    }


def test_inner_product_and_duplicates():
    angles = np.radians([0, 10, 90, 100])
    unit = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    neighbour_labels, _ = self_excluded_neighbours(unit, np.array([0, 0, 1, 1]), k=1, metric="ip")
    assert neighbour_labels[:, 0].tolist() == [0, 0, 1, 1]
    # identical rows: the row itself must still be the one left out
    neighbour_labels, relevant = self_excluded_neighbours(np.ones((4, 3)), np.array([0, 1, 2, 3]), k=3)
    assert all(sorted(row) == sorted(set(range(4)) - {q}) for q, row in enumerate(neighbour_labels.tolist()))
    assert relevant.tolist() == [0, 0, 0, 0]


def test_self_excluded_neighbours_checks_k():
    with pytest.raises(ValueError, match="between 1 and n - 1"):
        self_excluded_neighbours(np.zeros((3, 2)), np.array([0, 0, 1]), k=3)


def test_agrees_with_pytorch_metric_learnings_accuracy_calculator_without_ties():
    """The reference implementation on the same embeddings (random: no tied distances). PML's
    calculator is not used by the pipeline itself: ours also refuses k < R and scores ties against
    the model (README: "How the metrics treat ties")."""
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=60)
    embeddings = (rng.normal(size=(60, 8)) + labels[:, None] * 0.5).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    counts = np.bincount(labels)[labels] - 1
    neighbour_labels, relevant = self_excluded_neighbours(embeddings, labels, k=int(counts.max()))
    ours = accuracy_at_r(neighbour_labels, labels, relevant)
    calculator = AccuracyCalculator(include=("precision_at_1", "r_precision", "mean_average_precision_at_r"), device=torch.device("cpu"))
    theirs = calculator.get_accuracy(torch.from_numpy(embeddings), torch.from_numpy(labels))
    assert ours["precision_at_1"] == pytest.approx(theirs["precision_at_1"], abs=1e-9)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-6)
    assert ours["map_at_r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)
