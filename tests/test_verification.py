"""Verification pairs, threshold and metrics on cases small enough to compute by hand."""

from itertools import combinations

import numpy as np
import pytest

from pipeline.metrics import verification
from pipeline.metrics.verification import (
    choose_threshold,
    make_pairs,
    pair_distances,
    roc_points,
    verification_metrics,
)


def _pairs_set(i, j):
    return set(zip(i.tolist(), j.tolist()))


def _split(same_d, different_d):
    d = np.array(same_d + different_d, dtype=float)
    return d, np.array([True] * len(same_d) + [False] * len(different_d))


def test_make_pairs_counts_order_and_labels():
    labels = np.array([5, 5, 5, -1, -1, 7])  # positives: (0,1) (0,2) (1,2) (3,4); 15 - 4 = 11 negatives
    i, j, same = make_pairs(labels)
    assert same.sum() == 4 and (~same).sum() == 4
    assert _pairs_set(i[same], j[same]) == {(0, 1), (0, 2), (1, 2), (3, 4)}
    assert (i < j).all() and len(_pairs_set(i, j)) == len(i)
    assert (labels[i] == labels[j]).tolist() == same.tolist()

    i, j, same = make_pairs(labels, n_negative_per_positive=10)  # 40 wanted, only 11 exist
    every_negative = {(a, b) for a, b in combinations(range(6), 2) if labels[a] != labels[b]}
    assert _pairs_set(i[~same], j[~same]) == every_negative

    i, j, same = make_pairs(labels, n_negative_per_positive=1.5, max_positive=2)
    assert same.sum() == 2 and (~same).sum() == 3


def test_make_pairs_is_deterministic_and_without_duplicates():
    labels = np.random.default_rng(1).integers(0, 7, size=300) * 3 + 100  # any ints
    first = make_pairs(labels, n_negative_per_positive=2.5, max_positive=500, seed=3)
    again = make_pairs(labels, n_negative_per_positive=2.5, max_positive=500, seed=3)
    other = make_pairs(labels, n_negative_per_positive=2.5, max_positive=500, seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not np.array_equal(first[0], other[0])
    i, j, same = first
    assert same.sum() == 500 and (~same).sum() == 1250
    assert len(_pairs_set(i, j)) == len(i) and (i < j).all()
    assert (labels[i] == labels[j]).tolist() == same.tolist()


def test_make_pairs_without_sampling_lists_every_positive():
    labels = np.random.default_rng(2).integers(0, 5, size=40)
    i, j, same = make_pairs(labels, n_negative_per_positive=0.5)
    expected = {(a, b) for a, b in combinations(range(40), 2) if labels[a] == labels[b]}
    assert _pairs_set(i[same], j[same]) == expected
    assert (~same).sum() == round(len(expected) * 0.5)


def test_make_pairs_samples_large_classes_without_listing_them():
    labels = np.repeat([0, 1], [4000, 3])  # 8.0M positive pairs; only the sample is built
    i, j, same = make_pairs(labels, max_positive=1000, seed=0)
    assert same.sum() == 1000 and len(_pairs_set(i, j)) == 2000
    assert (i < j).all() and (labels[i] == labels[j]).tolist() == same.tolist()


def test_make_pairs_needs_positives_and_negatives():
    with pytest.raises(ValueError, match="at least two images of one class"):
        make_pairs(np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="at least two classes"):
        make_pairs(np.array([4, 4, 4]))


def test_pair_distances_are_euclidean():
    emb = np.array([[0, 0], [3, 4], [1, 1]], dtype=np.float32)
    d = pair_distances(emb, np.array([0, 0, 1]), np.array([1, 2, 2]))
    assert d.dtype == np.float64
    np.testing.assert_allclose(d, [5.0, np.sqrt(2), np.sqrt(13)])


def test_threshold_ties_go_to_the_widest_gap():
    # sorted: .1s .2s .5d .9s 1.0d 1.2d; 5/6 correct between .2/.5 (gap .3) and .9/1.0 (gap .1)
    d, same = _split([0.1, 0.2, 0.9], [0.5, 1.0, 1.2])
    t = choose_threshold(d, same)
    assert t == pytest.approx(0.35)
    assert verification_metrics(d, same, t)["accuracy"] == pytest.approx(5 / 6)
    # order of the pairs does not matter
    order = np.random.default_rng(0).permutation(len(d))
    assert choose_threshold(d[order], same[order]) == t


def test_separable_pairs_give_perfect_scores():
    d, same = _split([0.1, 0.3, 0.2], [0.8, 0.7])
    t = choose_threshold(d, same)
    assert t == pytest.approx(0.5)
    m = verification_metrics(d, same, t)
    assert (m["accuracy"], m["roc_auc"], m["eer"]) == (1.0, 1.0, 0.0)
    assert m["confusion"] == {"tn": 2, "fp": 0, "fn": 0, "tp": 3}


def test_all_equal_distances_pick_the_majority_side():
    d = np.full(5, 0.4)
    assert choose_threshold(d, np.array([1, 1, 1, 0, 0])) > 0.4  # all "same": 3/5
    assert choose_threshold(d, np.array([1, 0, 0, 0, 1])) < 0.4  # all "different": 3/5


def test_metrics_from_a_hand_computed_confusion():
    d, same = _split([0.1, 0.4, 0.6], [0.3, 0.45, 0.7, 0.8])
    m = verification_metrics(d, same, 0.5)
    # same & <= .5: .1 .4 -> tp 2, fn 1 (.6); different & <= .5: .3 .45 -> fp 2, tn 2
    assert m["confusion"] == {"tn": 2, "fp": 2, "fn": 1, "tp": 2}
    assert m["accuracy"] == pytest.approx(4 / 7)
    assert m["precision"] == pytest.approx(1 / 2)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(4 / 7)
    # same closer than different in 4 + 3 + 2 of the 12 (same, different) combinations
    assert m["roc_auc"] == pytest.approx(9 / 12)
    assert (m["n_pairs"], m["n_positive"], m["threshold"]) == (7, 3, 0.5)
    assert all(type(v) in (float, int) for k, v in m.items() if k != "confusion")


def test_eer_between_roc_points():
    # ROC (fpr, tpr): (0,0) (0,.5) (1/3,.5) (1/3,1) ...; FPR - FNR goes -1/6 -> +1/3 on the
    # vertical step at fpr 1/3, where FNR falls from .5 to 0 and crosses 1/3.
    d, same = _split([0.1, 0.3], [0.2, 0.4, 0.5])
    assert verification_metrics(d, same, 0.25)["eer"] == pytest.approx(1 / 3)


def test_eer_on_a_tied_diagonal_roc_segment():
    # The tie at .3 (two same, one different) joins (0, 1/3) to (1/2, 1): fpr = s/2 and
    # fnr = 2/3 (1 - s) meet at s = 4/7, so EER = 2/7.
    d, same = _split([0.1, 0.3, 0.3], [0.3, 0.6])
    assert verification_metrics(d, same, 0.3)["eer"] == pytest.approx(2 / 7)
    roc = roc_points(d, same)
    assert roc["fpr"][0] == 0.0 and roc["tpr"][-1] == 1.0 and len(roc["fpr"]) == len(roc["tpr"])


def test_metrics_need_both_kinds_of_pair():
    with pytest.raises(ValueError, match="both same-class and different-class"):
        verification_metrics(np.array([0.1, 0.2]), np.array([1, 1]), 0.5)


def test_verification_figures_are_written(tmp_path):
    from pipeline.reporting import figures

    d, same = _split([0.1, 0.4, 0.6], [0.3, 0.45, 0.7, 0.8])
    m, roc = verification_metrics(d, same, 0.5), roc_points(d, same)
    figures.distance_histograms(d, same, m["threshold"], tmp_path / "distances.png")
    figures.roc_curve_plot(roc["fpr"], roc["tpr"], m["roc_auc"], m["eer"], tmp_path / "roc.png")
    figures.verification_confusion(m["confusion"], tmp_path / "confusion.png")
    assert all((tmp_path / name).stat().st_size > 0 for name in ("distances.png", "roc.png", "confusion.png"))


def test_the_same_probability_recovers_a_known_logistic_law_and_is_calibrated_on_fresh_pairs():
    """Pairs whose true P(same | d) is sigmoid(4 - 4d): the fit finds it, and its probabilities on
    pairs drawn afresh from the same law have a small calibration error, where a probability that
    says 1.0 for every "same" call (what a margin score near the threshold amounts to) does not."""
    rng = np.random.default_rng(0)

    def draw(n):
        d = rng.uniform(0.0, 2.0, n)
        return d, rng.random(n) < 1 / (1 + np.exp(-(4 - 4 * d)))

    d, same = draw(20_000)
    fit = verification.fit_same_probability(d, same)
    assert fit["intercept"] == pytest.approx(4, abs=0.2) and fit["coef"] == pytest.approx(-4, abs=0.2)
    fresh_d, fresh_same = draw(20_000)
    calibrated = verification.calibration_metrics(verification.same_probability(fresh_d, fit), fresh_same)
    overconfident = verification.calibration_metrics((fresh_d <= 1.0).astype(float), fresh_same)
    assert calibrated["ece"] < 0.02 < 0.1 < overconfident["ece"]
    assert calibrated["brier"] < overconfident["brier"]


def test_calibration_error_by_hand():
    # Bin 0: p 0.05 twice, one of the two pairs same (0.5); bin 9: p 0.95 twice, both same.
    # ECE = (2/4)|0.5 - 0.05| + (2/4)|1.0 - 0.95| = 0.25; Brier = (0.05^2 + 0.95^2 + 2 * 0.05^2) / 4.
    metrics = verification.calibration_metrics(np.array([0.05, 0.05, 0.95, 0.95]), np.array([False, True, True, True]))
    assert metrics["ece"] == pytest.approx(0.25) and metrics["brier"] == pytest.approx((3 * 0.05**2 + 0.95**2) / 4)
    with pytest.raises(ValueError, match="needs both same-class and different-class pairs"):
        verification.fit_same_probability(np.array([0.1, 0.2]), np.array([True, True]))
