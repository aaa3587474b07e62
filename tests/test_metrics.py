"""Staging metrics, poolable counts and detection metrics against hand-derived values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from shared_models.metrics import (
    METRIC_NAMES,
    detection_metrics,
    merge_counts,
    metrics_from_counts,
    stage_counts,
    stage_metrics,
)

# 7 heads; argmax predictions [0, 1, 1, 1, 1, 2, 0]
Y = np.array([0, 0, 1, 1, 1, 2, 2])
P = np.array(
    [
        [0.7, 0.2, 0.1],
        [0.4, 0.5, 0.1],
        [0.1, 0.8, 0.1],
        [0.3, 0.6, 0.1],
        [0.2, 0.7, 0.1],
        [0.1, 0.1, 0.8],
        [0.5, 0.2, 0.3],
    ]
)
# One-vs-rest counts by hand: stage 0 tp1 fn1 fp1 tn4; I tp3 fn0 fp1 tn3; II tp1 fn1 fp0 tn5.
# AUC 0: positives {.7, .4} vs negatives {.1, .3, .2, .1, .5}: 5 + 4 = 9 of 10 pairs.
EXPECTED = {
    "0": {"accuracy": 5 / 7, "sensitivity": 0.5, "specificity": 4 / 5, "f1": 0.5, "auc": 0.9},
    "I": {"accuracy": 6 / 7, "sensitivity": 1.0, "specificity": 3 / 4, "f1": 6 / 7, "auc": 1.0},
    "II": {"accuracy": 6 / 7, "sensitivity": 0.5, "specificity": 1.0, "f1": 2 / 3, "auc": 1.0},
}
SUPPORT = {"0": 2, "I": 3, "II": 2}


def _assert_report(report, expected):
    for stage, values in expected.items():
        for name, value in values.items():
            got = report["per_stage"][stage][name]
            if math.isnan(value):
                assert math.isnan(got), (stage, name)
            else:
                assert got == pytest.approx(value, abs=1e-12), (stage, name)


def test_stage_metrics_hand_example():
    report = stage_metrics(Y, P)
    assert report["n"] == 7
    _assert_report(report, EXPECTED)
    for name in METRIC_NAMES:
        values = [EXPECTED[s][name] for s in EXPECTED]
        assert report["macro"][name] == pytest.approx(sum(values) / 3, abs=1e-12)
        weighted = sum(SUPPORT[s] * EXPECTED[s][name] for s in EXPECTED) / 7
        assert report["weighted"][name] == pytest.approx(weighted, abs=1e-12)
    assert report["weighted"]["accuracy"] == pytest.approx(40 / 49)


def test_absent_stage_gives_nan_and_averages_skip_it():
    y = np.array([0, 0, 1, 1])
    p = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1], [0.6, 0.3, 0.1]])
    report = stage_metrics(y, p)
    ii = report["per_stage"]["II"]
    assert math.isnan(ii["sensitivity"]) and math.isnan(ii["f1"]) and math.isnan(ii["auc"])
    assert ii["specificity"] == 1.0 and ii["accuracy"] == 1.0
    # stages 0 and I: sensitivity 0.5 each (one of two heads found)
    assert report["macro"]["sensitivity"] == pytest.approx(0.5)
    assert report["weighted"]["sensitivity"] == pytest.approx(0.5)
    assert report["macro"]["specificity"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert report["weighted"]["specificity"] == pytest.approx(0.5)  # stage II has zero support
    counted = metrics_from_counts(stage_counts(y, p))
    assert math.isnan(counted["per_stage"]["II"]["auc"]) and math.isnan(counted["per_stage"]["II"]["f1"])


def test_empty_input_and_validation():
    report = stage_metrics(np.zeros(0, dtype=int), np.zeros((0, 3)))
    assert report["n"] == 0 and math.isnan(report["macro"]["accuracy"])
    assert metrics_from_counts(stage_counts(np.zeros(0, dtype=int), np.zeros((0, 3))))["n"] == 0
    with pytest.raises(ValueError, match="probs"):
        stage_metrics(Y, P[:, :2])
    with pytest.raises(ValueError, match="y_true"):
        stage_metrics(Y + 1, P)
    with pytest.raises(ValueError, match="n_bins"):
        stage_counts(Y, P, n_bins=0)


def _random_case(n: int, seed: int):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    logits = rng.normal(size=(n, 3)) + 1.5 * np.eye(3)[y]
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, p


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_counts_reproduce_stage_metrics(seed):
    y, p = _random_case(300, seed)
    direct = stage_metrics(y, p)
    counts = stage_counts(y, p, n_bins=100)
    assert json.loads(json.dumps(counts)) == counts  # JSON-friendly, no per-case data
    assert np.asarray(counts["confusion"]).sum() == 300
    pooled = metrics_from_counts(counts)
    for stage in direct["per_stage"]:
        for name in ("accuracy", "sensitivity", "specificity", "f1"):
            assert pooled["per_stage"][stage][name] == direct["per_stage"][stage][name]
        # binning turns scores of one bin into ties: |error| <= half the share of pos-neg pairs
        # that share a bin (derived independently here)
        k = ["0", "I", "II"].index(stage)
        bins = np.minimum((p[:, k] * 100).astype(int), 99)
        pos, neg = bins[y == k], bins[y != k]
        shared = sum(np.count_nonzero(neg == b) for b in pos) / (pos.size * neg.size)
        diff = abs(pooled["per_stage"][stage]["auc"] - direct["per_stage"][stage]["auc"])
        assert diff <= 0.5 * shared + 1e-12
        assert diff < 0.01
        # the report states that bound with the pooled metrics
        assert pooled["auc_bin_error_bound"][stage] == pytest.approx(0.5 * shared)
    # kappa and early ONFH come out of the confusion matrix exactly as from the per-case data
    from sklearn.metrics import cohen_kappa_score

    pred = p.argmax(axis=1)
    assert pooled["quadratic_kappa"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"))
    early, early_pred = y > 0, pred > 0
    assert pooled["early_onfh"]["sensitivity"] == pytest.approx(np.mean(early_pred[early]))
    assert pooled["early_onfh"]["specificity"] == pytest.approx(np.mean(~early_pred[~early]))


def test_counts_auc_exact_when_scores_on_bin_centres():
    rng = np.random.default_rng(5)
    n, n_bins = 200, 20
    y = rng.integers(0, 3, n)
    p = (rng.integers(0, n_bins, size=(n, 3)) + 0.5) / n_bins
    direct = stage_metrics(y, p)
    pooled = metrics_from_counts(stage_counts(y, p, n_bins=n_bins))
    for stage in direct["per_stage"]:
        assert pooled["per_stage"][stage]["auc"] == pytest.approx(direct["per_stage"][stage]["auc"], abs=1e-12)
    for avg in ("macro", "weighted"):
        for name in METRIC_NAMES:
            assert pooled[avg][name] == pytest.approx(direct[avg][name], abs=1e-12)


def test_merge_counts_equals_pooled_data():
    y, p = _random_case(150, 7)
    sites = [(y[:40], p[:40]), (y[40:90], p[40:90]), (y[90:], p[90:])]
    merged = merge_counts([stage_counts(ys, ps) for ys, ps in sites])
    assert merged == stage_counts(y, p)
    with pytest.raises(ValueError, match="n_bins"):
        merge_counts([stage_counts(y, p, n_bins=10), stage_counts(y, p, n_bins=20)])
    with pytest.raises(ValueError):
        merge_counts([])


def test_detection_metrics_hand_example():
    gt = np.array([[10.0, 10.0, 10.0, 2.0, 2.0, 2.0]] * 3)
    pred = np.array(
        [
            [10.0, 10.0, 11.0, 2.0, 2.0, 2.0],  # shifted 1 voxel in x: IoU 4 / 12, error 2.5 mm
            [10.0, 10.0, 10.0, 2.0, 2.0, 2.0],  # identical: IoU 1, error 0
            [13.0, 14.0, 10.0, 2.0, 2.0, 2.0],  # disjoint: IoU 0, error sqrt(12^2 + 8^2) mm
        ]
    )
    spacing = (4.0, 2.0, 2.5)  # (D, H, W) mm
    out = detection_metrics(pred, gt, spacing)
    assert out["n"] == 3
    assert out["iou_mean"] == pytest.approx((1 / 3 + 1 + 0) / 3)
    assert out["center_error_mm"] == pytest.approx(2.5)  # median of {2.5, 0, 14.42}
    assert out["recall30"] == pytest.approx(2 / 3)
    assert out["recall50"] == pytest.approx(1 / 3)
    # 20 IoU bins of 0.05: IoU 0 -> bin 0, 1/3 -> bin 6 (0.30-0.35), 1 -> the last bin (closed on the right)
    assert out["iou_hist"] == [1, 0, 0, 0, 0, 0, 1] + [0] * 12 + [1]
    per_case = detection_metrics(pred, gt, np.array([spacing, spacing, (1.0, 1.0, 1.0)]))
    assert per_case["center_error_mm"] == pytest.approx(2.5)
    empty = detection_metrics(np.zeros((0, 6)), np.zeros((0, 6)), spacing)
    assert empty["n"] == 0 and math.isnan(empty["iou_mean"]) and empty["iou_hist"] == [0] * 20
    with pytest.raises(ValueError, match="spacing"):
        detection_metrics(pred, gt, (1.0, -1.0, 1.0))
    with pytest.raises(ValueError):
        detection_metrics(pred, gt[:2], spacing)


def test_average_precision_101_matches_hand_computed_coco_value():
    from shared_models.metrics import average_precision_101

    # 4 ground-truth boxes; ranked detections TP, FP, TP, FP.
    # precision 1, 1/2, 2/3, 1/2 -> right envelope 1, 2/3, 2/3, 1/2; recall .25, .25, .5, .5.
    # Recall thresholds 0..0.25 (26 points) -> 1; 0.26..0.50 (25 points) -> 2/3; above 0.5 -> 0.
    expected = (26 * 1.0 + 25 * (2 / 3)) / 101
    got = average_precision_101(np.array([0.9, 0.8, 0.7, 0.6]), np.array([True, False, True, False]), 4)
    assert got == pytest.approx(expected, abs=1e-12)
    # order comes from the scores, not the input order
    shuffled = average_precision_101(np.array([0.6, 0.7, 0.8, 0.9]), np.array([False, True, False, True]), 4)
    assert shuffled == pytest.approx(expected, abs=1e-12)
    assert average_precision_101(np.array([0.5, 0.4]), np.array([True, True]), 2) == pytest.approx(1.0)
    assert average_precision_101(np.array([0.5]), np.array([False]), 1) == 0.0


def _brute_force_ap101(scores, is_tp, n_gt):
    # A second method, without the envelope or searchsorted: at each pycocotools recall threshold
    # (np.linspace(0, 1, 101), float64 recall as in COCOeval.accumulate), the best precision of any
    # rank whose recall reaches it, 0 if none does.
    order = sorted(range(len(scores)), key=lambda i: -scores[i])  # stable: ties keep input order
    tp, points = 0, []
    for rank, i in enumerate(order, start=1):
        tp += bool(is_tp[i])
        points.append((tp / n_gt, tp / rank))
    best = [max((p for r, p in points if r >= t), default=0.0) for t in np.linspace(0.0, 1.0, 101)]
    return sum(best) / 101


def _random_boxes(rng, n):
    gt = np.concatenate([rng.uniform(10, 20, (n, 3)), rng.uniform(4, 8, (n, 3))], axis=1)
    pred = gt + rng.normal(0.0, 1.5, gt.shape)
    pred[:, 3:] = np.abs(pred[:, 3:]) + 0.1
    return pred, gt


def _monai_ap(pred, gt, scores, iou=0.5):
    """MONAI's COCOMetric on one detection and one ground-truth box per case, IoU = our box_iou_3d."""
    from monai.apps.detection.metrics.coco import COCOMetric
    from monai.apps.detection.metrics.matching import matching_batch

    from shared_models.detection import box_iou_3d

    metric = COCOMetric(
        classes=["head"],
        iou_list=(iou,),
        iou_range=(iou, iou, 0.05),
        max_detection=(1,),
        per_class=False,
        verbose=False,
    )
    one = [np.zeros(1, dtype=int)] * len(gt)
    matched = matching_batch(
        iou_fn=box_iou_3d,
        iou_thresholds=metric.iou_thresholds,
        pred_boxes=[b[None] for b in pred],
        pred_classes=one,
        pred_scores=[np.array([s]) for s in scores],
        gt_boxes=[b[None] for b in gt],
        gt_classes=one,
        max_detections=1,
    )
    return metric(matched)[0][f"AP_IoU_{iou:.2f}_MaxDet_1"]


def test_average_precision_101_equals_a_brute_force_second_method():
    from shared_models.metrics import average_precision_101

    rng = np.random.default_rng(7)
    for trial in range(150):
        n_gt = int(rng.integers(1, 60))
        n_det = int(rng.integers(1, 70))
        # odd trials: coarse scores, so ties are frequent and the stable order matters
        scores = rng.choice(np.linspace(0.0, 1.0, 6), n_det) if trial % 2 else rng.uniform(0.0, 1.0, n_det)
        is_tp = rng.uniform(size=n_det) < 0.6
        is_tp[np.flatnonzero(is_tp)[n_gt:]] = False  # at most one TP per ground-truth box
        got = average_precision_101(scores, is_tp, n_gt)
        assert got == pytest.approx(_brute_force_ap101(list(scores), list(is_tp), n_gt), abs=1e-12), trial


def test_ap50_agrees_with_monai_coco_metric_where_float32_recall_is_exact():
    # With a power-of-two number of boxes, k / n_gt is exact in float32, so MONAI's float32 recall
    # (see average_precision_101's docstring) cannot differ: the two must then agree.
    rng = np.random.default_rng(3)
    for n in (1, 2, 4, 8, 16, 32, 64):
        for ties in (False, True):
            pred, gt = _random_boxes(rng, n)
            scores = rng.choice(np.linspace(0.0, 1.0, 4), n) if ties else rng.uniform(0.0, 1.0, n)
            ours = detection_metrics(pred, gt, (1.0, 1.0, 1.0), scores=scores)["ap50"]
            assert 0.0 <= ours <= 1.0
            assert ours == pytest.approx(_monai_ap(pred, gt, scores), abs=1e-12), (n, ties)


def test_monai_coco_metric_still_loses_recall_thresholds_with_25_boxes():
    # Why average_precision_101 stays ours: 25 ground-truth boxes, ranked detections TP, FP, TP
    # (the rest missed). Precision 1, 1/2, 2/3 -> envelope 1, 2/3, 2/3; recall 1/25 = 0.04, 0.08.
    # pycocotools (float64): thresholds 0..0.04 (5) -> 1, 0.05..0.08 (4) -> 2/3.
    # MONAI casts TP counts to float32, and float32(1)/25 < 0.04, float32(2)/25 < 0.08, so 0.04
    # takes 2/3 and 0.08 takes 0: 4 -> 1, 4 -> 2/3. If this fails, MONAI now matches pycocotools
    # and average_precision_101 can be replaced by COCOMetric.
    from shared_models.detection import box_iou_3d
    from shared_models.metrics import average_precision_101

    gt = np.array([[16.0, 16.0, 16.0 + 12.0 * i, 6.0, 6.0, 6.0] for i in range(25)])
    pred = gt.copy()
    pred[1, 2] += 3.0  # half a box off in x: IoU 1/3, a false positive at 0.5
    pred[3:, 2] += 100.0  # no overlap at all
    scores = np.array([0.9, 0.8, 0.7] + [0.1] * 22)
    ious = np.diagonal(box_iou_3d(pred, gt))
    assert ious[1] == pytest.approx(1 / 3)
    is_tp = ious >= 0.5
    assert is_tp.tolist() == [True, False, True] + [False] * 22
    ours = (5 * 1.0 + 4 * (2 / 3)) / 101
    assert average_precision_101(scores, is_tp, 25) == pytest.approx(ours, abs=1e-12)
    assert detection_metrics(pred, gt, (1.0, 1.0, 1.0), scores=scores)["ap50"] == pytest.approx(ours, abs=1e-12)
    assert _monai_ap(pred, gt, scores) == pytest.approx((4 * 1.0 + 4 * (2 / 3)) / 101, abs=1e-12)


def test_metrics_and_clinical_stats_do_not_import_each_other_in_a_circle():
    import ast
    import importlib.util

    def imports(module):
        tree = ast.parse(open(importlib.util.find_spec(module).origin, encoding="utf-8").read())
        names = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        return names

    assert "shared_models.metrics" not in imports("shared_models.clinical_stats")
    assert "shared_models.metrics" not in imports("shared_models.stage_scores")
    assert "shared_models.clinical_stats" not in imports("shared_models.stage_scores")
