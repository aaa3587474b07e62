"""Tests for shared_models.clinical_stats; expected values derived by hand or with another library."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest
from scipy.stats import binomtest, chi2
from sklearn.metrics import roc_auc_score

from shared_models.clinical_stats import (
    auc_bin_error_bound,
    auc_from_histograms,
    bootstrap_ci,
    early_onfh_binary,
    histogram_auc_bound,
    mcnemar_test,
    quadratic_weighted_kappa,
)
from shared_models.metrics import metrics_from_counts, stage_counts

# --------------------------------------------------------------------------- early ONFH binary


def test_early_onfh_binary_hand_example():
    # 6 heads. Score = P(I)+P(II) = 1 - P(0).
    y = [0, 0, 0, 1, 2, 2]
    probs = np.array(
        [
            [0.8, 0.1, 0.1],  # stage 0, score .2, pred 0   -> TN
            [0.3, 0.6, 0.1],  # stage 0, score .7, pred I   -> FP
            [0.6, 0.2, 0.2],  # stage 0, score .4, pred 0   -> TN
            [0.5, 0.3, 0.2],  # stage I, score .5, pred 0   -> FN
            [0.1, 0.1, 0.8],  # stage II, score .9, pred II -> TP
            [0.2, 0.5, 0.3],  # stage II, score .8, pred I  -> TP (I vs II confusion is still "early")
        ]
    )
    out = early_onfh_binary(y, probs)
    # sensitivity = TP/(TP+FN) = 2/3; specificity = TN/(TN+FP) = 2/3.
    assert out["sensitivity"] == pytest.approx(2 / 3)
    assert out["specificity"] == pytest.approx(2 / 3)
    # AUC by pair counting: positives scores {.5, .9, .8}, negatives {.2, .7, .4}.
    # .5 beats .2,.4 (2); .9 beats all 3; .8 beats all 3 -> 8/9.
    assert out["auc"] == pytest.approx(8 / 9)
    assert out["n"] == 6 and out["n_early"] == 3


def test_early_onfh_binary_one_group_is_nan():
    out = early_onfh_binary([0, 0], np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1]]))
    assert math.isnan(out["auc"]) and math.isnan(out["sensitivity"])
    assert out["specificity"] == pytest.approx(0.5)


def test_early_onfh_binary_rejects_bad_shape():
    with pytest.raises(ValueError, match="probs"):
        early_onfh_binary([0, 1], np.ones((2, 2)) / 2)


# --------------------------------------------------------------------------- kappa


def test_quadratic_kappa_by_hand():
    # y_true = [0, 1, 2, 2], y_pred = [0, 2, 2, 1]. Weights w_ij = (i-j)^2 / 4.
    # Observed: pairs (0,0) w0, (1,2) w 1/4, (2,2) w0, (2,1) w 1/4 -> mean observed weight = (1/4+1/4)/4 = 1/8.
    # Marginals: true (1,1,2)/4, pred (1,1,2)/4. Expected weight = sum_ij r_i c_j w_ij
    #   = [r0c1 + r1c0](1/4) + [r0c2 + r2c0](1) + [r1c2 + r2c1](1/4)
    #   = (1/16+1/16)/4 + (2/16+2/16) + (2/16+2/16)/4 = 1/32 + 1/4 + 1/16 = 11/32.
    # kappa = 1 - (1/8)/(11/32) = 1 - 4/11 = 7/11.
    assert quadratic_weighted_kappa([0, 1, 2, 2], [0, 2, 2, 1]) == pytest.approx(7 / 11)
    assert quadratic_weighted_kappa([0, 1, 2], [0, 1, 2]) == pytest.approx(1.0)


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")
def test_quadratic_kappa_undefined_is_nan():
    # both raters give stage I only: expected disagreement 0, kappa = 0/0
    assert math.isnan(quadratic_weighted_kappa([1, 1], [1, 1]))


def test_quadratic_kappa_rejects_bad_input():
    with pytest.raises(ValueError, match="class indices"):
        quadratic_weighted_kappa([0, 3], [0, 1])
    with pytest.raises(ValueError, match="expected two"):
        quadratic_weighted_kappa([0, 1], [0])


# --------------------------------------------------------------------------- bootstrap


def _accuracy(y, pred):
    return float(np.mean(np.asarray(y) == np.asarray(pred)))


def test_bootstrap_keeps_both_heads_of_a_patient_together():
    # 5 patients; patients 0-3 have heads R and L, patient 4 has one head. y encodes the head id
    # (patient*10 + side), and the metric records the multiset of head ids of each resample.
    pids = [0, 0, 1, 1, 2, 2, 3, 3, 4]
    heads = [0, 1, 10, 11, 20, 21, 30, 31, 40]
    seen: list[Counter] = []

    def record(y, p):
        seen.append(Counter(int(v) for v in y))
        return 0.0

    ci = bootstrap_ci(pids, np.array(heads), np.zeros(9), record, n_boot=200, seed=3)
    assert ci.n_skipped == 0 and ci.n_patients == 5
    assert len(seen) == 201  # the point estimate + 200 resamples
    split = 0
    for counts in seen[1:]:
        for patient in range(4):
            # a drawn patient brings both heads, as many times as it was drawn
            split += counts[patient * 10] != counts[patient * 10 + 1]
        # 5 patients drawn in total: two-head patients count 2 rows each, patient 4 one row
        drawn = sum(counts[p * 10] for p in range(4)) + counts[40]
        assert drawn == 5
    assert split == 0


def test_bootstrap_ci_contains_point_and_narrows_with_more_patients():
    rng = np.random.default_rng(1)

    def make(n_patients):
        pids = np.repeat(np.arange(n_patients), 2)
        y = rng.integers(0, 3, size=2 * n_patients)
        pred = np.where(rng.random(2 * n_patients) < 0.8, y, (y + 1) % 3)
        return pids, y, pred

    small = bootstrap_ci(*make(20), _accuracy, n_boot=500, seed=0)
    large = bootstrap_ci(*make(500), _accuracy, n_boot=500, seed=0)
    for ci in (small, large):
        point, low, high = ci
        assert low <= point <= high
    # width ~ 1/sqrt(n): 500 vs 20 patients should be ~5x narrower; ask for at least 2.5x.
    assert (large.high - large.low) * 2.5 < (small.high - small.low)


def test_bootstrap_matches_exact_enumeration_on_three_patients():
    # Patients A (2 heads, y=1,1), B (1 head, y=0), C (2 heads, y=0,1). Metric: mean of y over heads.
    # All 27 ordered draws of 3 patients are equally likely (1/27): enumerate them exactly.
    pids = np.array(["A", "A", "B", "C", "C"])
    y = np.array([1, 1, 0, 0, 1], dtype=float)
    groups = {"A": [1, 1], "B": [0], "C": [0, 1]}
    exact = [np.mean([v for g in draw for v in groups[g]]) for draw in itertools.product("ABC", repeat=3)]
    exact = np.sort(np.array(exact))
    values, counts = np.unique(np.round(exact, 12), return_counts=True)
    cdf = np.cumsum(counts) / 27.0

    def exact_quantile(q):  # inverse CDF of the exact discrete distribution
        return values[np.searchsorted(cdf, q)]

    # Guard: the 2.5 % and 97.5 % levels are well inside an atom, so sampling noise cannot move
    # the empirical quantile to a neighbour atom (margin >> sd of an empirical CDF, ~0.0016 here).
    for q in (0.025, 0.975):
        assert np.min(np.abs(cdf - q)) > 0.01

    draws: list[float] = []

    def mean_and_record(yy, pp):
        draws.append(float(np.mean(yy)))
        return float(np.mean(yy))

    ci = bootstrap_ci(pids, y, y, mean_and_record, n_boot=20000, seed=7)
    assert ci.point == pytest.approx(3 / 5)
    assert ci.low == pytest.approx(exact_quantile(0.025), abs=1e-9)
    assert ci.high == pytest.approx(exact_quantile(0.975), abs=1e-9)
    # The whole bootstrap distribution matches the exact one (probability of each atom within 0.01).
    empirical = Counter(np.round(draws[1:], 12))
    for v, c in zip(values, counts):
        assert empirical[v] / 20000 == pytest.approx(c / 27, abs=0.01)
    assert set(empirical) <= set(values)


def test_bootstrap_skips_undefined_resamples():
    # Two patients, one positive head each side of the AUC: a resample drawing the same patient
    # twice (probability 1/2) has one class only -> roc_auc_score raises ValueError -> skipped.
    pids = [0, 1]
    y = np.array([0, 1])
    s = np.array([0.2, 0.9])
    ci = bootstrap_ci(pids, y, s, roc_auc_score, n_boot=1000, seed=0)
    assert ci.point == 1.0
    # Binomial(1000, 1/2): sd = 15.8; 6 sd tolerance.
    assert abs(ci.n_skipped - 500) < 95
    assert ci.low == ci.high == 1.0


def test_bootstrap_all_skipped_gives_nan_interval():
    ci = bootstrap_ci([0, 0], np.array([1, 1]), np.array([0.1, 0.2]), roc_auc_score, n_boot=10)
    assert ci.n_skipped == 10 and math.isnan(ci.point) and math.isnan(ci.low) and math.isnan(ci.high)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_boot": 0}, "n_boot"),
        ({"alpha": 1.0}, "alpha"),
    ],
)
def test_bootstrap_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        bootstrap_ci([0, 1], [0, 1], [0, 1], _accuracy, **kwargs)


def test_bootstrap_rejects_length_mismatch():
    with pytest.raises(ValueError, match="first dimension"):
        bootstrap_ci([0, 1, 2], [0, 1], [0, 1], _accuracy)


# --------------------------------------------------------------------------- McNemar


def _paired(b, c, a=5, d=3):
    """Correctness vectors with a both-right, b model-only, c reader-only, d both-wrong heads."""
    model = [True] * a + [True] * b + [False] * c + [False] * d
    reader = [True] * a + [False] * b + [True] * c + [False] * d
    return np.array(model), np.array(reader)


@pytest.mark.parametrize("b, c", [(7, 2), (0, 5), (3, 3), (12, 12), (0, 0)])
def test_mcnemar_exact_matches_scipy_binomtest(b, c):
    out = mcnemar_test(*_paired(b, c))
    assert (out["b"], out["c"]) == (b, c)
    assert out["method"] == "exact binomial"
    expected = binomtest(min(b, c), b + c, 0.5).pvalue if b + c else 1.0
    assert out["p_value"] == pytest.approx(expected, rel=1e-12)
    assert out["statistic"] == min(b, c)


@pytest.mark.parametrize("b, c", [(20, 8), (30, 30), (40, 11)])
def test_mcnemar_asymptotic_matches_hand_formula(b, c):
    out = mcnemar_test(*_paired(b, c))
    assert out["method"] == "chi-square, continuity corrected"
    stat = (abs(b - c) - 1) ** 2 / (b + c)
    assert out["statistic"] == pytest.approx(stat, rel=1e-12)
    assert out["p_value"] == pytest.approx(chi2.sf(stat, df=1), rel=1e-12)


def test_mcnemar_exact_flag_overrides_rule():
    out = mcnemar_test(*_paired(30, 10), exact=True)
    assert out["method"] == "exact binomial"
    assert out["p_value"] == pytest.approx(binomtest(10, 40, 0.5).pvalue, rel=1e-12)
    out = mcnemar_test(*_paired(6, 1), exact=False)
    assert out["statistic"] == pytest.approx((5 - 1) ** 2 / 7)


def test_mcnemar_rejects_bad_input():
    with pytest.raises(ValueError, match="same length"):
        mcnemar_test([True, False], [True])
    with pytest.raises(ValueError, match="booleans"):
        mcnemar_test([0, 2], [1, 1])
    with pytest.raises(ValueError, match="discordant"):
        mcnemar_test([True], [True], exact=False)


# --------------------------------------------------------------------------- histogram AUC


@pytest.mark.parametrize("seed", range(25))
def test_histogram_auc_within_bound_of_exact(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(20, 300))
    labels = rng.random(n) < rng.uniform(0.2, 0.8)
    labels[:2] = [True, False]
    scores = np.clip(rng.normal(0.5 + 0.15 * labels, 0.2), 0, 1)
    out = histogram_auc_bound(labels, scores, n_bins=100)
    exact = roc_auc_score(labels, scores)
    assert abs(out["auc_hist"] - exact) <= out["bound"] + 1e-12
    assert 0 <= out["bound"] <= 0.5


def test_histogram_auc_bound_is_tight_when_everything_shares_one_bin():
    # All scores in bin [0.50, 0.51); positives above negatives: exact AUC 1, histogram AUC 1/2,
    # bound = 1/2 * (P N)/(P N) = 1/2, reached exactly.
    labels = np.array([1, 1, 1, 0, 0], dtype=bool)
    scores = np.array([0.509, 0.508, 0.507, 0.501, 0.502])
    out = histogram_auc_bound(labels, scores, n_bins=100)
    exact = roc_auc_score(labels, scores)
    assert exact == 1.0
    assert out["auc_hist"] == 0.5 and out["bound"] == 0.5
    assert abs(out["auc_hist"] - exact) == out["bound"]


def test_auc_from_histograms_by_hand():
    # bins 0..2: positives (0, 1, 2), negatives (2, 1, 0). Pairs: P*N = 9.
    # bin1 positive beats 2 negatives in bin0 + 1/2 tie with bin1 negative -> 2.5
    # bin2 positives each beat 3 negatives -> 6. AUC = 8.5/9. Bound = 1/2 * (1*1)/9 = 1/18.
    assert auc_from_histograms([0, 1, 2], [2, 1, 0]) == pytest.approx(8.5 / 9)
    assert auc_bin_error_bound([0, 1, 2], [2, 1, 0]) == pytest.approx(1 / 18)
    assert math.isnan(auc_from_histograms([0, 0], [1, 2]))


def test_auc_from_histograms_matches_metrics_from_counts():
    # metrics_from_counts computes the pooled AUC with sklearn (weighted, bin centres): same number.
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, size=120)
    probs = rng.dirichlet([1, 1, 1], size=120)
    counts = stage_counts(y, probs, n_bins=100)
    pooled = metrics_from_counts(counts)
    for k, label in enumerate(("0", "I", "II")):
        ours = auc_from_histograms(counts["hist_pos"][k], counts["hist_neg"][k])
        assert ours == pytest.approx(pooled["per_stage"][label]["auc"], abs=1e-12)


def test_histogram_inputs_are_validated():
    with pytest.raises(ValueError, match="pos_hist/neg_hist"):
        auc_from_histograms([1, 2], [1])
    with pytest.raises(ValueError, match="non-negative"):
        auc_bin_error_bound([1, -1], [1, 1])
    with pytest.raises(ValueError, match="n_bins"):
        histogram_auc_bound([True, False], [0.1, 0.2], n_bins=0)
