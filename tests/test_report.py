"""Server report: pooling site counts gives the same figures as pooling the cases themselves."""

from __future__ import annotations

import numpy as np
import pytest

from server.report import build_report, group_stage_metrics
from shared_models.metrics import stage_counts, stage_metrics


def _site_payload(y, p, n_bins=100):
    """What client.tasks.stager_evaluate sends: flat confusion + per-stage histograms."""
    c = stage_counts(y, p, n_bins=n_bins)
    out = {"num-examples": len(y), "confusion": list(np.ravel(c["confusion"]))}
    for k in range(3):
        out[f"hist-pos-{k}"] = c["hist_pos"][k]
        out[f"hist-neg-{k}"] = c["hist_neg"][k]
    return out


def _cases(n, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3)) + 1.5 * np.eye(3)[y]
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, p


def test_group_pooling_matches_pooled_cases():
    (yc, pc), (yd, pd) = _cases(40, 1), _cases(25, 2)
    groups = {"external-2": ("C", "D"), "C-only": ("C",)}
    out = group_stage_metrics({"C": _site_payload(yc, pc), "D": _site_payload(yd, pd)}, groups)
    direct = stage_metrics(np.concatenate([yc, yd]), np.concatenate([pc, pd]))
    ext = out["external-2"]
    assert ext["n"] == 65 and ext["sites"] == ["C", "D"]
    for stage in ("0", "I", "II"):
        for key in ("accuracy", "sensitivity", "specificity", "f1"):
            assert ext["per_stage"][stage][key] == pytest.approx(direct["per_stage"][stage][key], abs=1e-12)
        # AUC from 100-bin histograms: only ties within a bin are merged
        assert ext["per_stage"][stage]["auc"] == pytest.approx(direct["per_stage"][stage]["auc"], abs=0.02)
    assert out["C-only"]["n"] == 40


def test_group_without_data_is_reported_empty():
    y, p = _cases(10, 3)
    out = group_stage_metrics({"A": _site_payload(y, p)}, {"A-test": ("A",), "external-1": ("B",)})
    assert out["external-1"]["n"] == 0 and out["external-1"]["missing"] == ["B"]


def test_report_is_json_safe_and_uses_last_round():
    y, p = _cases(12, 4)
    payload = _site_payload(y, p)
    det = {
        "num-examples": 3,
        "iou-mean": 0.61,
        "center-error-mm": 2.5,
        "recall30": 1.0,
        "recall50": 0.66,
        "low-confidence": 0,
        "iou-hist": [0] * 12 + [1, 0, 0, 0, 2, 0, 0, 0],
    }
    report = build_report(
        strategy="fedavg",
        proximal_mu=0.1,
        rounds={"detector": 2, "stager": 2},
        stager_history={1: {"A": {**payload, "confusion": [0] * 9}}, 2: {"A": payload}},
        detector_history={2: {"A": det}},
        selected_rounds={"detector": 2, "stager": 2},
        stager_train={2: {"A": {"train-loss": 0.3}}},
        detector_train={2: {"A": {"train-loss": 0.5}}},
        groups={"A-test": ("A",)},
        train_sites=("A",),
        crop_source="detector",
        wall_time_s=1.0,
    )
    import json

    json.dumps(report, allow_nan=False)
    assert report["proximal_mu"] is None  # mu only reported for FedProx
    assert report["sites"]["A-test"]["n"] == 12
    assert report["detector"]["A"] == {
        "n": 3,
        "iou_mean": 0.61,
        "center_error_mm": 2.5,
        "recall30": 1.0,
        "recall50": 0.66,
        "ap50": None,
        "low_confidence": 0,
        "iou_hist": [0] * 12 + [1, 0, 0, 0, 2, 0, 0, 0],
    }


def test_report_uses_the_selected_round_not_the_last():
    y, p = _cases(12, 5)
    good = _site_payload(y, p)
    empty = {**good, "num-examples": 0}
    report = build_report(
        strategy="fedavg",
        proximal_mu=0.0,
        rounds={"detector": 1, "stager": 3},
        stager_history={1: {"A": empty}, 2: {"A": good}, 3: {"A": empty}},
        detector_history={1: {}},
        selected_rounds={"detector": 1, "stager": 2},
        stager_train={},
        detector_train={},
        groups={"A-test": ("A",)},
        train_sites=("A",),
        crop_source="detector",
        wall_time_s=0.0,
    )
    assert report["selected_rounds"]["stager"] == 2 and report["sites"]["A-test"]["n"] == 12


def test_validation_score_weights_sites_by_validation_heads():
    from server.server_app import validation_score

    sites = {
        "A": {"val-num-examples": 3, "val-score": 0.9},
        "B": {"val-num-examples": 1, "val-score": 0.5},
        "C": {"val-num-examples": 0, "val-score": 0.0},
    }
    assert validation_score(sites) == pytest.approx((3 * 0.9 + 1 * 0.5) / 4)
    assert validation_score({"C": sites["C"]}) is None


def test_training_curves_png_is_written(tmp_path):
    from server.report_plots import plot_training_curves

    report = {
        "strategy": "fedavg",
        "selected_rounds": {"detector": 1, "stager": 2},
        "history": {
            "detector_iou_mean": {"1": {"A": 0.5, "B": 0.4}},
            "stager_macro_auc": {"1": {"A": 0.6}, "2": {"A": 0.7}},
            "stager_train_loss": {"1": {"A": None}},
        },
    }
    path = plot_training_curves(report, tmp_path / "c.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_small_groups_and_small_stages_are_marked_unreliable():
    rng = np.random.default_rng(6)
    # 30 heads, stage I only twice: the group is large enough, stage I and the macro average are not
    y = np.array([0] * 14 + [1] * 2 + [2] * 14)
    p = rng.dirichlet(np.ones(3), size=y.size)
    small_stage = group_stage_metrics({"D": _site_payload(y, p)}, {"D": ("D",)})["D"]["small_n"]
    assert small_stage["unreliable"] and small_stage["unreliable_stages"] == ["I"]
    assert any("stage I: 2 heads" in r for r in small_stage["reasons"])
    # 9 heads, 3 of each stage: every figure unreliable, no stage on its own
    y9 = np.repeat([0, 1, 2], 3)
    nine = group_stage_metrics({"B": _site_payload(y9, rng.dirichlet(np.ones(3), size=9))}, {"B": ("B",)})["B"][
        "small_n"
    ]
    assert nine["unreliable"] and nine["unreliable_stages"] == [] and "9 heads" in nine["reasons"][0]
    # 10 heads with at least 3 of each stage: reliable
    y10 = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2])
    ten = group_stage_metrics({"A": _site_payload(y10, rng.dirichlet(np.ones(3), size=10))}, {"A": ("A",)})["A"][
        "small_n"
    ]
    assert ten == {"unreliable": False, "reasons": [], "unreliable_stages": []}


def test_per_site_figures_carry_the_small_n_mark():
    y = np.array([0] * 8 + [1] * 2 + [2] * 8)
    rng = np.random.default_rng(7)
    payload = _site_payload(y, rng.dirichlet(np.ones(3), size=y.size))
    report = build_report(
        strategy="fedavg",
        proximal_mu=0.0,
        rounds={"detector": 1, "stager": 1},
        stager_history={1: {"D": payload}},
        detector_history={1: {}},
        selected_rounds={"detector": 1, "stager": 1},
        stager_train={},
        detector_train={},
        groups={"external-2": ("D",)},
        train_sites=("A",),
        crop_source="detector",
        wall_time_s=0.0,
    )
    assert report["per_site"]["D"]["small_n"]["unreliable_stages"] == ["I"]
    assert report["sites"]["external-2"]["small_n"]["unreliable"]
