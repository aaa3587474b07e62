"""Validation calibration from aggregates: thresholds, temperature, ECE, early-ONFH threshold (issue 17 items 2-4)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shared_models import calibration as cal


def test_histogram_bins_match_numpy_within_range_and_clip_outside():
    rng = np.random.default_rng(0)
    v = rng.uniform(0, 1, 500)
    assert cal.histogram(v, cal.SCORE_EDGES)[:-1] == list(np.histogram(v, cal.SCORE_EDGES)[0][:-1])
    h = cal.histogram([-100.0, 100.0, float("nan")], cal.ENERGY_EDGES)
    assert h[0] == 1 and h[-1] == 1 and sum(h) == 2


def test_detector_threshold_keeps_the_stated_share_of_good_boxes():
    rng = np.random.default_rng(1)
    scores = rng.beta(5, 2, 1000)
    t = cal.lower_threshold(cal.histogram(scores, cal.SCORE_EDGES), cal.SCORE_EDGES, 0.01)
    assert np.mean(scores < t) <= 0.01  # at most 1 % of the good boxes fall below
    assert np.mean(scores < t + 0.01) > 0.01  # and the next edge would lose more: the highest such edge
    assert cal.lower_threshold([0] * 100, cal.SCORE_EDGES, 0.01) is None


def test_energy_threshold_holds_the_false_alarm_rate():
    rng = np.random.default_rng(2)
    energies = rng.normal(-8.0, 2.0, 2000)
    t = cal.upper_threshold(cal.histogram(energies, cal.ENERGY_EDGES), cal.ENERGY_EDGES, 0.05)
    assert np.mean(energies >= t) <= 0.05
    assert np.mean(energies >= t - 0.25) > 0.05  # the lowest such edge
    # everything in the top (clipped) bin: no edge achieves the rate -> inf (nothing can be flagged)
    assert cal.upper_threshold(cal.histogram([50.0] * 10, cal.ENERGY_EDGES), cal.ENERGY_EDGES, 0.05) == math.inf


def test_energy_score_is_minus_logsumexp():
    z = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(cal.energy_scores(z), [-np.log(np.exp(1) + np.exp(2) + np.exp(3)), -np.log(3.0)])


def test_temperature_from_summed_nll_recovers_overconfidence():
    rng = np.random.default_rng(3)
    z = rng.normal(0, 1.5, (4000, 3))
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    y = np.array([rng.choice(3, p=row) for row in p])
    # two "sites" with logits 3x too large; their summed NLLs choose T near 3
    sums = np.add(cal.nll_sums(3 * z[:2000], y[:2000]), cal.nll_sums(3 * z[2000:], y[2000:]))
    t = cal.choose_temperature(sums)
    assert 2.4 <= t <= 3.7
    # the sum equals a direct computation at T = 1
    direct = -np.log(p[np.arange(len(y)), y]).sum()
    assert cal.nll_sums(z, y, grid=(1.0,))[0] == pytest.approx(direct, rel=1e-9)


def test_ece_from_reliability_counts_equals_direct_ece():
    rng = np.random.default_rng(4)
    probs = rng.dirichlet([1, 1, 1], 300)
    y = rng.integers(0, 3, 300)
    c = cal.reliability_counts(probs, y)
    conf, correct = probs.max(axis=1), probs.argmax(axis=1) == y
    bins = np.minimum((conf * 10).astype(int), 9)
    direct = (
        sum(
            abs(correct[bins == b].mean() - conf[bins == b].mean()) * (bins == b).sum()
            for b in range(10)
            if (bins == b).any()
        )
        / 300
    )
    assert cal.ece_from_counts(c["count"], c["correct"], c["conf"]) == pytest.approx(direct, abs=1e-9)
    assert cal.ece_from_counts([0] * 10, [0] * 10, [0.0] * 10) is None


def test_early_threshold_maximises_youden_and_sens_spec_match_raw_values():
    rng = np.random.default_rng(5)
    pos, neg = rng.beta(4, 2, 300), rng.beta(2, 4, 200)
    hp, hn = cal.histogram(pos, cal.SCORE_EDGES), cal.histogram(neg, cal.SCORE_EDGES)
    t = cal.choose_early_threshold(hp, hn)
    j = lambda th: np.mean(pos >= th) + np.mean(neg < th) - 1  # noqa: E731
    assert j(t) == pytest.approx(max(j(e) for e in cal.SCORE_EDGES[1:-1]))
    s = cal.sens_spec(hp, hn, t)
    assert s["sensitivity"] == pytest.approx(np.mean(pos >= t)) and s["specificity"] == pytest.approx(np.mean(neg < t))
    assert cal.choose_early_threshold(hp, [0] * 100) is None


def test_calibration_round_trips_and_rejects_bad_values():
    c = cal.Calibration(
        temperature=1.7, detector_threshold=0.31, energy_threshold=math.inf, early_threshold=0.42, val_heads=40
    )
    assert cal.Calibration.from_dict(c.to_dict()) == c
    with pytest.raises(ValueError):
        cal.Calibration(temperature=0.0)
    with pytest.raises(ValueError):
        cal.Calibration(detector_threshold=1.5)
    with pytest.raises(ValueError, match="unknown"):
        cal.Calibration.from_dict({"temperature": 1.0, "exec": "x"})
