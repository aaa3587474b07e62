"""Simulation-only exact check: histogram AUC within its bound of sklearn's exact AUC, patient-bootstrap CIs."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from server.report import group_stage_metrics
from shared_models.stages import STAGE_LABELS
from sim.experiments.exact_check import group_check
from tests.test_report_html import _cases, _site_metrics


@pytest.fixture(scope="module")
def group():
    rng = np.random.default_rng(7)
    y, p = _cases(rng, 80)
    patients = np.repeat([f"P{i:02d}" for i in range(40)], 2)  # two heads per patient
    reported = group_stage_metrics(
        {"A": _site_metrics(y[:50], p[:50]), "B": _site_metrics(y[50:], p[50:])}, {"g": ("A", "B")}
    )["g"]  # what the server pools from two sites' counts
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
    # the bootstrap's fast metrics agree with the report's definitions (sklearn-based stage_metrics)
    from shared_models.clinical_stats import early_onfh_binary
    from shared_models.metrics import stage_metrics

    m = stage_metrics(y, p)
    assert check["ci"]["macro_auc"]["point"] == pytest.approx(m["macro"]["auc"])
    assert check["ci"]["macro_accuracy"]["point"] == pytest.approx(m["macro"]["accuracy"])
    assert check["ci"]["early_onfh_auc"]["point"] == pytest.approx(early_onfh_binary(y, p)["auc"])
    tied = np.round(p, 1)  # ties count 1/2 as in sklearn
    from sim.experiments.exact_check import _macro_auc

    assert _macro_auc(y, tied) == pytest.approx(np.mean([roc_auc_score(y == k, tied[:, k]) for k in range(3)]))
    assert _macro_auc(np.zeros(5, int), tied[:5]) != _macro_auc(np.zeros(5, int), tied[:5])  # NaN: one class


def test_a_report_from_another_model_is_flagged(group):
    y, p, patients, reported = group
    shuffled = p[np.random.default_rng(0).permutation(len(p))]
    check = group_check(y, shuffled, patients, reported, n_boot=10)
    assert not check["confusion_matches"]


def test_report_page_shows_intervals_exact_auc_and_the_reader_table(group, tmp_path):
    from server.report_html import write_report_html
    from sim.reports.readers import compare_with_readers, simulate_readers

    y, p, patients, reported = group
    rows = [
        {"patient_id": pid, "side": "LR"[i % 2], "stage": int(t), "predicted_stage": int(q.argmax())}
        for i, (pid, t, q) in enumerate(zip(patients, y, p))
    ]
    readers = compare_with_readers(rows, simulate_readers(rows, {"r70": 0.7}, seed=1))
    check = group_check(y, p, patients, reported, n_boot=100)
    html = write_report_html(
        {"sites": {"g": reported}, "exact_check": {"g": check, "readers": readers}}, tmp_path
    ).read_text()
    ci = check["ci"]["macro_auc"]
    assert f"{ci['low']:.3f} to {ci['high']:.3f}" in html
    assert f"{check['auc']['II']['exact']:.4f}" in html and "NO" not in html  # every stage within its bound
    r = readers[0]
    assert r["n"] == 80 and f"{r['p_value']:.4f}" in html and "Table 3" in html
