"""Simulation-only exact check: histogram AUC within its bound of sklearn's exact AUC, patient-bootstrap CIs."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from server.report import group_stage_metrics
from shared_models.stages import STAGE_LABELS
from sim.exact_check import group_check
from tests.test_report_html import _cases, _site_metrics


@pytest.fixture(scope="module")
def group():
    rng = np.random.default_rng(7)
    y, p = _cases(rng, 80)
    patients = np.repeat([f"P{i:02d}" for i in range(40)], 2)  # two heads per patient
    reported = group_stage_metrics({"A": _site_metrics(y[:50], p[:50]), "B": _site_metrics(y[50:], p[50:])},
                                   {"g": ("A", "B")})["g"]  # what the server pools from two sites' counts
    return y, p, patients, reported


def test_histogram_auc_is_within_its_bound_of_the_exact_auc(group):
    y, p, patients, reported = group
    check = group_check(y, p, patients, reported, n_boot=50)
    assert check["n"] == 80 and check["confusion_matches"]
    for k, label in enumerate(STAGE_LABELS):
        a = check["auc"][label]
        exact = roc_auc_score(y == k, p[:, k])  # independent: sklearn on the raw scores
        assert a["exact"] == pytest.approx(exact)
        assert a["histogram"] == pytest.approx(reported["per_stage"][label]["auc"])
        assert a["abs_error"] == pytest.approx(abs(exact - a["histogram"]))
        assert a["within_bound"] and a["abs_error"] <= a["bound"]


def test_bootstrap_intervals_are_over_patients_and_bracket_the_point(group):
    y, p, patients, reported = group
    check = group_check(y, p, patients, reported, n_boot=200)
    for name, ci in check["ci"].items():
        assert ci["n_patients"] == 40, name
        assert ci["low"] <= ci["point"] <= ci["high"], name
        assert ci["high"] - ci["low"] > 0, name  # 40 patients: a real interval
    assert check["ci"]["macro_auc"]["point"] == pytest.approx(
        np.mean([roc_auc_score(y == k, p[:, k]) for k in range(3)]))


def test_a_report_from_another_model_is_flagged(group):
    y, p, patients, reported = group
    shuffled = p[np.random.default_rng(0).permutation(len(p))]
    check = group_check(y, shuffled, patients, reported, n_boot=10)
    assert not check["confusion_matches"]
