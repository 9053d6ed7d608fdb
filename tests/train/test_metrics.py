"""Tests for train.metrics against brute-force definitions and known cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from train.metrics import (
    auroc,
    average_precision,
    bootstrap_ci,
    group_mean,
    multiclass_metrics,
    ranking_summary,
    threshold_metrics,
)


def brute_auroc(y, s) -> float:
    """Mann-Whitney by explicit pairs: P(s+ > s-) + 0.5 P(s+ = s-)."""
    pos = [b for a, b in zip(y, s, strict=True) if a == 1]
    neg = [b for a, b in zip(y, s, strict=True) if a == 0]
    total = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p in pos for n in neg)
    return total / (len(pos) * len(neg))


def brute_ap(y, s) -> float:
    """Step-wise PR area over distinct thresholds, by explicit loops."""
    n_pos = sum(y)
    ap, previous_recall = 0.0, 0.0
    for t in sorted(set(s), reverse=True):
        tp = sum(1 for a, b in zip(y, s, strict=True) if b >= t and a == 1)
        predicted = sum(1 for b in s if b >= t)
        recall = tp / n_pos
        ap += (recall - previous_recall) * (tp / predicted)
        previous_recall = recall
    return ap


@pytest.mark.parametrize("seed", range(8))
def test_auroc_and_ap_match_brute_force_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(4, 40))
    y = rng.integers(0, 2, n)
    y[0], y[1] = 0, 1
    # Few distinct values: many ties, within and across classes.
    s = rng.integers(0, 5, n) / 4.0
    assert auroc(y, s) == pytest.approx(brute_auroc(y.tolist(), s.tolist()), abs=1e-12)
    assert average_precision(y, s) == pytest.approx(brute_ap(y.tolist(), s.tolist()), abs=1e-12)


def test_known_values() -> None:
    assert auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert auroc([0, 1], [0.5, 0.5]) == 0.5
    assert auroc([1, 0], [0.9, 0.1]) == 1.0
    assert auroc([1, 0], [0.1, 0.9]) == 0.0
    # scikit-learn's documented example: average_precision_score = 0.8333...
    assert average_precision([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.8333333333)
    # All tied: AP = prevalence.
    assert average_precision([0, 1, 1, 0, 0], [0.3] * 5) == pytest.approx(0.4)


@pytest.mark.parametrize("y,s", [([1, 1], [0.1, 0.2]), ([0, 2], [0.1, 0.2]), ([0, 1], [0.1]), ([0, 1], [0.1, np.nan])])
def test_ranking_metric_errors(y, s) -> None:
    with pytest.raises(ValueError):
        auroc(y, s)
    with pytest.raises(ValueError):
        average_precision(y, s)


def _delong_se(y: np.ndarray, s: np.ndarray) -> float:
    pos, neg = s[y == 1], s[y == 0]
    kernel = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    v10, v01 = kernel.mean(axis=1), kernel.mean(axis=0)
    return math.sqrt(v10.var() / pos.size + v01.var() / neg.size)


def test_bootstrap_interval_is_a_true_95_percent_interval() -> None:
    rng = np.random.default_rng(0)
    n_pos, n_neg, d = 150, 450, 1.0
    y = np.r_[np.ones(n_pos, int), np.zeros(n_neg, int)]
    s = np.r_[rng.normal(d, 1, n_pos), rng.normal(0, 1, n_neg)]
    analytic = 0.5 * (1 + math.erf(d / 2))  # Phi(d / sqrt 2)
    ci95, samples = bootstrap_ci(y, s, "auroc", seed=1, return_samples=True)
    ci90 = bootstrap_ci(y, s, "auroc", level=0.90, seed=1)
    assert samples.shape == (10_000,)
    assert ci95.estimate == pytest.approx(auroc(y, s))
    assert ci95.low < analytic < ci95.high
    # The bootstrap SD is the DeLong standard error, and a 95 % interval is
    # +-1.96 of it (a 90 % one, what the public code reported, is +-1.645).
    se = _delong_se(y, s)
    assert samples.std() == pytest.approx(se, rel=0.06)
    assert (ci95.high - ci95.low) == pytest.approx(2 * 1.96 * se, rel=0.07)
    assert (ci90.high - ci90.low) == pytest.approx(2 * 1.645 * se, rel=0.07)
    assert ci90.high - ci90.low < ci95.high - ci95.low
    assert np.percentile(samples, 2.5) == pytest.approx(ci95.low)
    assert np.percentile(samples, 97.5) == pytest.approx(ci95.high)


def test_bootstrap_is_stratified_seeded_and_narrows_with_n() -> None:
    rng = np.random.default_rng(2)
    y = np.r_[np.ones(5, int), np.zeros(95, int)]
    s = rng.random(100)
    # Stratified: with 5 positives a plain bootstrap would sometimes draw none
    # and fail; here every resample is defined.
    _, samples = bootstrap_ci(y, s, "auprc", n_resamples=2000, seed=0, return_samples=True)
    assert np.isfinite(samples).all()
    a = bootstrap_ci(y, s, n_resamples=500, seed=7)
    b = bootstrap_ci(y, s, n_resamples=500, seed=7)
    c = bootstrap_ci(y, s, n_resamples=500, seed=8)
    assert a == b and a != c
    big_y = np.repeat(y, 16)
    big_s = np.repeat(s, 16) + rng.normal(0, 1e-9, 1600)
    wide = bootstrap_ci(y, s, n_resamples=2000)
    narrow = bootstrap_ci(big_y, big_s, n_resamples=2000)
    # 16x the data: about a quarter of the width.
    ratio = (narrow.high - narrow.low) / (wide.high - wide.low)
    assert 0.15 < ratio < 0.4


def test_bootstrap_auprc_samples_match_direct_computation() -> None:
    """The count-based resampling equals recomputing AP on resampled arrays."""
    rng = np.random.default_rng(4)
    y = np.r_[np.ones(6, int), np.zeros(9, int)]
    s = rng.integers(0, 4, 15) / 3.0
    for metric, fn in (("auroc", brute_auroc), ("auprc", brute_ap)):
        _, samples = bootstrap_ci(y, s, metric, n_resamples=5, seed=3, return_samples=True)
        replay = np.random.default_rng(3)
        pos, neg = s[y == 1], s[y == 0]
        # One chunk: all positive draws, then all negative draws.
        pos_draws = replay.integers(0, pos.size, (5, pos.size))
        neg_draws = replay.integers(0, neg.size, (5, neg.size))
        for value, pi, ni in zip(samples, pos_draws, neg_draws, strict=True):
            yy = [1] * pos.size + [0] * neg.size
            ss = pos[pi].tolist() + neg[ni].tolist()
            assert value == pytest.approx(fn(yy, ss), abs=1e-12)


def test_bootstrap_argument_errors() -> None:
    with pytest.raises(ValueError):
        bootstrap_ci([0, 1], [0.1, 0.2], "accuracy")
    with pytest.raises(ValueError):
        bootstrap_ci([0, 1], [0.1, 0.2], level=95)


def test_threshold_metrics_hand_computed() -> None:
    y = [1, 1, 1, 0, 0, 0, 0, 0]
    p = [0.9, 0.6, 0.2, 0.7, 0.1, 0.3, 0.4, 0.05]
    m = threshold_metrics(y, p, 0.5)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (2, 1, 1, 4)
    assert m["accuracy"] == pytest.approx(6 / 8)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(4 / 5)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert m["f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert m["mcc"] == pytest.approx((2 * 4 - 1 * 1) / math.sqrt(3 * 3 * 5 * 5))
    # Everything predicted negative: no NaN.
    m0 = threshold_metrics(y, p, 0.99)
    assert m0["mcc"] == 0.0 and m0["f1"] == 0.0 and m0["specificity"] == 1.0


def test_group_mean_video_then_study() -> None:
    clip_video = ["v1", "v1", "v2", "v2", "v3", "v3"]
    clip_prob = [0.2, 0.4, 0.9, 0.7, 0.1, 0.1]
    videos, video_prob = group_mean(clip_video, clip_prob)
    assert videos == ["v1", "v2", "v3"]
    np.testing.assert_allclose(video_prob, [0.3, 0.8, 0.1])
    studies, study_prob = group_mean(["s1", "s1", "s2"], video_prob)
    assert studies == ["s1", "s2"]
    # Study = mean of the video means; with unequal clip counts that differs
    # from the mean over clips (2/3 here, not 0.75).
    np.testing.assert_allclose(study_prob, [0.55, 0.1])
    _, unequal = group_mean(["a", "a", "a", "b"], [1.0, 1.0, 0.0, 0.5])
    np.testing.assert_allclose(unequal, [2 / 3, 0.5])
    _, rows = group_mean(["a", "a"], np.array([[0.2, 0.8], [0.4, 0.6]]))
    np.testing.assert_allclose(rows, [[0.3, 0.7]])
    with pytest.raises(ValueError):
        group_mean(["a"], [1.0, 2.0])


def test_ranking_summary_single_class_and_multiclass() -> None:
    summary = ranking_summary([0, 0, 0], [0.1, 0.2, 0.3], n_resamples=10)
    assert summary["auroc"] is None and summary["threshold_metrics"]["n"] == 3
    full = ranking_summary([0, 1, 0, 1], [0.1, 0.9, 0.2, 0.8], n_resamples=50)
    assert full["auroc"]["estimate"] == 1.0 and full["auroc"]["level"] == 0.95
    mc = multiclass_metrics([0, 1, 2, 2], np.eye(3)[[0, 1, 2, 1]], ["plax", "a4c", "psax"])
    assert mc["accuracy"] == pytest.approx(0.75)
    assert mc["balanced_accuracy"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert mc["auroc_ovr"]["plax"] == 1.0
