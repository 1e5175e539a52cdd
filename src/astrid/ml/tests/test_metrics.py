"""Tests of the classifier metrics against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from astrid.ml.metrics import (
    completeness_vs_snr,
    expected_calibration_error,
    fnr_at_fpr,
    fpr_at_fnr,
    plot_completeness,
    plot_reliability,
    plot_roc,
    reliability_curve,
    roc_auc,
    roc_curve,
)


def test_roc_curve_of_a_four_point_example() -> None:
    # accepted in order 0.8 (real), 0.4 (bogus), 0.35 (real), 0.1 (bogus)
    curve = roc_curve([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
    np.testing.assert_allclose(curve.fpr, [0, 0, 0.5, 0.5, 1])
    np.testing.assert_allclose(curve.tpr, [0, 0.5, 0.5, 1, 1])
    np.testing.assert_allclose(curve.thresholds, [np.inf, 0.8, 0.4, 0.35, 0.1])
    # 3 of the 4 (real, bogus) pairs are ordered correctly
    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)


def test_tied_scores_count_one_half() -> None:
    # pairs (real, bogus): (.5,.5) tie -> 1/2, (.5,.2), (.9,.5), (.9,.2) -> 1 each
    labels, scores = [0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]
    assert roc_auc(labels, scores) == pytest.approx(3.5 / 4)
    assert len(roc_curve(labels, scores).thresholds) == 4  # inf, .9, .5 (tied), .2


def test_auc_matches_scikit_learn_on_random_scores() -> None:
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 500)
    scores = np.round(rng.normal(labels * 0.8, 1.0), 1)  # rounding makes many ties
    assert roc_auc(labels, scores) == pytest.approx(
        sklearn_metrics.roc_auc_score(labels, scores), abs=1e-12
    )
    ours = roc_curve(labels, scores)
    fpr, tpr, _ = sklearn_metrics.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(ours.fpr, fpr)
    np.testing.assert_allclose(ours.tpr, tpr)


def test_operating_points() -> None:
    bogus = np.arange(10) / 10.0  # 0.0 ... 0.9
    real = np.array([0.85, 0.95, 0.55, 0.05])
    labels = np.r_[np.zeros(10), np.ones(4)]
    scores = np.r_[bogus, real]
    # FPR <= 10 % allows one bogus (0.9) in: the lowest such threshold is 0.85, which
    # accepts 2 of the 4 real ones.
    point = fnr_at_fpr(labels, scores, fpr=0.1)
    assert (point.threshold, point.fpr, point.fnr) == pytest.approx((0.85, 0.1, 0.5))
    # at 1 % FPR no bogus may pass: only 0.95 is accepted
    assert fnr_at_fpr(labels, scores, fpr=0.01).fnr == pytest.approx(0.75)
    # FNR <= 25 % needs 3 real ones: threshold 0.55 lets 0.6, 0.7, 0.8, 0.9 through
    point = fpr_at_fnr(labels, scores, fnr=0.25)
    assert (point.threshold, point.fpr, point.fnr) == pytest.approx((0.55, 0.4, 0.25))


def test_reliability_curve_and_ece_by_hand() -> None:
    probs, labels = [0.05, 0.15, 0.95, 0.9, 1.0], [0, 0, 1, 0, 1]
    curve = reliability_curve(probs, labels, n_bins=2)
    np.testing.assert_array_equal(curve.counts, [2, 3])  # 1.0 falls in the last bin
    np.testing.assert_allclose(curve.mean_predicted, [0.1, 2.85 / 3])
    np.testing.assert_allclose(curve.fraction_positive, [0.0, 2 / 3])
    expected = (2 * 0.1 + 3 * abs(2 / 3 - 2.85 / 3)) / 5
    assert expected_calibration_error(probs, labels, n_bins=2) == pytest.approx(expected)
    assert np.isnan(reliability_curve([0.1], [0], n_bins=4).mean_predicted[1])


def test_completeness_against_snr() -> None:
    snr = [2, 4, 4, 6, 6, 6, 6, 20]
    scores = [0.9, 0.1, 0.7, 0.6, 0.6, 0.2, 0.9, 0.99]
    curve = completeness_vs_snr(snr, scores, threshold=0.5, bin_edges=[0, 3, 5, 10])
    np.testing.assert_array_equal(curve.n_total, [1, 2, 4])  # S/N 20 is out of range
    np.testing.assert_array_equal(curve.n_accepted, [1, 1, 3])
    np.testing.assert_allclose(curve.completeness, [1.0, 0.5, 0.75])
    np.testing.assert_allclose(curve.error, [0.0, 0.5 / np.sqrt(2), np.sqrt(0.75 * 0.25 / 4)])


def test_input_checks() -> None:
    with pytest.raises(ValueError, match="both real and bogus"):
        roc_curve([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"0 \(bogus\) or 1"):
        roc_curve([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        reliability_curve([1.5], [1])


def test_plots_are_written_as_png(tmp_path) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    scores = 1 / (1 + np.exp(-rng.normal(labels * 3 - 1.5, 1.0)))
    paths = [
        plot_roc(
            roc_curve(labels, scores),
            tmp_path / "roc.png",
            operating_points={"1% FPR": fnr_at_fpr(labels, scores, 0.01)},
        ),
        plot_reliability(reliability_curve(scores, labels), tmp_path / "rel.png"),
        plot_completeness(
            completeness_vs_snr(rng.uniform(0, 50, 200), scores), tmp_path / "comp.png"
        ),
    ]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
