"""Staging and detection metrics, and the poolable counts that sites send to the server.

Staging metrics follow Yang et al., Front. Surg. 2025, section 2.7 and Tables 1-3: per Ficat-Arlet
stage (one-vs-rest) accuracy, sensitivity, specificity, F1 and AUC, plus their macro average
(unweighted mean over stages) and weighted average (weights = class support). Per-stage accuracy is
one-vs-rest: the paper's macro accuracy (93.83 %) is the mean of its per-stage accuracies.
The metric math comes from scikit-learn.

Federated reporting: AUC cannot be averaged across sites, so each site also sends
:func:`stage_counts` (a confusion matrix and binned score histograms, no per-case data);
the server sums them (:func:`merge_counts`) and computes pooled figures
(:func:`metrics_from_counts`).

Undefined values are NaN: sensitivity and F1 of a stage absent from ``y_true`` and never predicted,
specificity when every case is of that stage, AUC when a stage is absent or is the only one. Macro
and weighted averages skip NaN entries (weighted renormalises the remaining supports); an average
with nothing left is NaN.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score, roc_auc_score

from shared_models.clinical_stats import auc_bin_error_bound, auc_from_histograms, quadratic_weighted_kappa
from shared_models.detection import box_iou_3d
from shared_models.stage_scores import check_stage_probs, score_histograms
from shared_models.stages import NUM_STAGES, STAGE_LABELS

__all__ = [
    "METRIC_NAMES",
    "stage_metrics",
    "stage_counts",
    "merge_counts",
    "metrics_from_counts",
    "detection_metrics",
]

logger = logging.getLogger(__name__)

METRIC_NAMES: tuple[str, ...] = ("accuracy", "sensitivity", "specificity", "f1", "auc")
_LABELS = list(range(NUM_STAGES))


def _average(per_stage: dict[str, dict[str, float]], support: np.ndarray) -> tuple[dict[str, float], dict[str, float]]:
    macro, weighted = {}, {}
    for name in METRIC_NAMES:
        values = np.array([per_stage[label][name] for label in STAGE_LABELS], dtype=np.float64)
        ok = np.isfinite(values)
        macro[name] = float(values[ok].mean()) if ok.any() else math.nan
        w = support[ok].astype(np.float64)
        weighted[name] = float(np.average(values[ok], weights=w)) if ok.any() and w.sum() > 0 else math.nan
    return macro, weighted


def _nan_report(n: int) -> dict[str, Any]:
    per_stage = {label: {name: math.nan for name in METRIC_NAMES} for label in STAGE_LABELS}
    return {
        "per_stage": per_stage,
        "macro": {name: math.nan for name in METRIC_NAMES},
        "weighted": {name: math.nan for name in METRIC_NAMES},
        "n": n,
    }


def stage_metrics(y_true: Sequence[int] | np.ndarray, probs: np.ndarray) -> dict[str, Any]:
    """Per-stage (one-vs-rest), macro and weighted staging metrics (paper section 2.7).

    Args:
        y_true: ``(N,)`` integer Ficat-Arlet class indices (0, 1, 2).
        probs: ``(N, 3)`` class probabilities (softmax of the stager logits); the predicted stage
            is the arg-max (first index on ties).

    Returns:
        ``{"per_stage": {"0"|"I"|"II": {accuracy, sensitivity, specificity, f1, auc}},
        "macro": {...}, "weighted": {...}, "n": N}``; values are floats in ``[0, 1]`` or NaN
        when undefined (module docstring). ``N = 0`` gives all NaN.

    Raises:
        ValueError: wrong shapes, labels outside 0..2 or non-finite probabilities.
    """
    y, p = check_stage_probs(y_true, probs)
    if y.size == 0:
        return _nan_report(0)
    pred = p.argmax(axis=1)
    per_stage: dict[str, dict[str, float]] = {}
    for k, label in enumerate(STAGE_LABELS):
        yt, yp = y == k, pred == k
        both = 0 < yt.sum() < yt.size
        per_stage[label] = {
            "accuracy": float(accuracy_score(yt, yp)),
            "sensitivity": float(recall_score(yt, yp, zero_division=np.nan)) if yt.any() else math.nan,
            "specificity": float(recall_score(~yt, ~yp, zero_division=np.nan)) if (~yt).any() else math.nan,
            "f1": float(f1_score(yt, yp, zero_division=np.nan)),
            "auc": float(roc_auc_score(yt, p[:, k])) if both else math.nan,
        }
    support = np.bincount(y, minlength=NUM_STAGES)
    macro, weighted = _average(per_stage, support)
    return {"per_stage": per_stage, "macro": macro, "weighted": weighted, "n": int(y.size)}


def stage_counts(y_true: Sequence[int] | np.ndarray, probs: np.ndarray, n_bins: int = 100) -> dict[str, Any]:
    """Poolable counts of one site: confusion matrix and binned score histograms.

    Nothing per case leaves the site: only integer counts.

    Args:
        y_true: ``(N,)`` integer class indices (0, 1, 2).
        probs: ``(N, 3)`` class probabilities.
        n_bins: equal-width bins on ``[0, 1]`` (the last bin includes 1.0); scores are clipped to
            ``[0, 1]`` first.

    Returns:
        JSON-friendly dict: ``n`` (int), ``n_bins`` (int), ``confusion`` (3x3 list of int, rows =
        true stage, columns = arg-max prediction), ``hist_pos[k]`` / ``hist_neg[k]`` (list of
        ``n_bins`` ints: counts of ``probs[:, k]`` among cases of stage ``k`` / not of stage ``k``).

    Raises:
        ValueError: as :func:`stage_metrics`, or ``n_bins < 1``.
    """
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins: expected a positive integer, got {n_bins!r}")
    y, p = check_stage_probs(y_true, probs)
    if y.size:
        conf = confusion_matrix(y, p.argmax(axis=1), labels=_LABELS)
    else:
        conf = np.zeros((NUM_STAGES, NUM_STAGES), dtype=np.int64)
    hist_pos, hist_neg = [], []
    for k in range(NUM_STAGES):
        pos, neg = score_histograms(y == k, p[:, k], int(n_bins))
        hist_pos.append(pos)
        hist_neg.append(neg)
    return {
        "n": int(y.size),
        "n_bins": int(n_bins),
        "confusion": [[int(c) for c in row] for row in conf],
        "hist_pos": hist_pos,
        "hist_neg": hist_neg,
    }


def _check_counts(counts: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    try:
        n_bins = int(counts["n_bins"])
        conf = np.asarray(counts["confusion"], dtype=np.int64)
        hp = np.asarray(counts["hist_pos"], dtype=np.int64)
        hn = np.asarray(counts["hist_neg"], dtype=np.int64)
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"counts: expected keys n_bins, confusion, hist_pos, hist_neg ({exc})") from exc
    if conf.shape != (NUM_STAGES, NUM_STAGES):
        raise ValueError(f"counts.confusion: expected {NUM_STAGES}x{NUM_STAGES}, got {conf.shape}")
    for key, h in (("hist_pos", hp), ("hist_neg", hn)):
        if h.shape != (NUM_STAGES, n_bins):
            raise ValueError(f"counts.{key}: expected shape ({NUM_STAGES}, {n_bins}), got {h.shape}")
    if (conf < 0).any() or (hp < 0).any() or (hn < 0).any():
        raise ValueError("counts: counts must be non-negative")
    return conf, hp, hn, n_bins


def merge_counts(counts_list: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Sum the counts of several sites (same ``n_bins``) into pooled counts.

    Raises:
        ValueError: empty list, malformed counts or different ``n_bins``.
    """
    if not counts_list:
        raise ValueError("counts_list: nothing to merge")
    parsed = [_check_counts(c) for c in counts_list]
    bins = {p[3] for p in parsed}
    if len(bins) != 1:
        raise ValueError(f"counts_list: all sites must use the same n_bins, got {sorted(bins)}")
    conf = np.sum([p[0] for p in parsed], axis=0)
    hp = np.sum([p[1] for p in parsed], axis=0)
    hn = np.sum([p[2] for p in parsed], axis=0)
    return {
        "n": int(conf.sum()),
        "n_bins": parsed[0][3],
        "confusion": conf.tolist(),
        "hist_pos": hp.tolist(),
        "hist_neg": hn.tolist(),
    }


def metrics_from_counts(counts: Mapping[str, Any]) -> dict[str, Any]:
    """Staging metrics from (pooled) counts; same structure as :func:`stage_metrics`.

    Accuracy, sensitivity, specificity and F1 are exact: they depend only on the confusion matrix
    (one-vs-rest ``tp, fp, fn, tn`` of each stage, same formulas and NaN rules as scikit-learn with
    ``zero_division=nan``). AUC is :func:`shared_models.clinical_stats.auc_from_histograms` (equal to
    scikit-learn's ``roc_auc_score`` on the bin centres with the counts as weights): binning only
    merges scores that fall in the same bin into ties, so the result equals the per-case AUC when no positive and negative share a bin
    (exactly when scores already sit on bin centres); otherwise the error is at most half the
    fraction of positive-negative pairs sharing a bin. That bound is returned per stage under
    ``auc_bin_error_bound`` (:func:`shared_models.clinical_stats.auc_bin_error_bound`); the macro
    AUC's error is at most the mean of the three. Also exact from the confusion matrix: the
    quadratic-weighted Cohen's kappa (``quadratic_kappa``, stages are ordinal) and early ONFH
    (stage I or II, predicted as either) against stage 0 (``early_onfh``: sensitivity, specificity).

    Raises:
        ValueError: malformed counts.
    """
    conf, hp, hn, _ = _check_counts(counts)
    n = int(conf.sum())
    if n == 0:
        return _nan_report(0)
    per_stage: dict[str, dict[str, float]] = {}
    auc_bounds: dict[str, float] = {}
    for k, label in enumerate(STAGE_LABELS):
        tp = int(conf[k, k])
        fn = int(conf[k, :].sum()) - tp
        fp = int(conf[:, k].sum()) - tp
        tn = n - tp - fn - fp
        auc = auc_from_histograms(hp[k], hn[k])  # NaN when stage k or the rest is absent
        per_stage[label] = {
            "accuracy": (tp + tn) / n,
            "sensitivity": tp / (tp + fn) if tp + fn > 0 else math.nan,
            "specificity": tn / (tn + fp) if tn + fp > 0 else math.nan,
            "f1": 2 * tp / (2 * tp + fp + fn) if 2 * tp + fp + fn > 0 else math.nan,
            "auc": auc,
        }
        auc_bounds[label] = auc_bin_error_bound(hp[k], hn[k])
    support = conf.sum(axis=1)
    macro, weighted = _average(per_stage, support)
    # Exact from the confusion matrix too: the ordinal agreement and early ONFH (stage I or II) vs stage 0.
    true_idx, pred_idx = np.nonzero(conf)
    reps = conf[true_idx, pred_idx].astype(int)
    kappa = quadratic_weighted_kappa(np.repeat(true_idx, reps), np.repeat(pred_idx, reps))
    early_tp, early_fn = int(conf[1:, 1:].sum()), int(conf[1:, 0].sum())
    early_tn, early_fp = int(conf[0, 0]), int(conf[0, 1:].sum())
    early = {
        "sensitivity": early_tp / (early_tp + early_fn) if early_tp + early_fn else math.nan,
        "specificity": early_tn / (early_tn + early_fp) if early_tn + early_fp else math.nan,
    }
    return {
        "per_stage": per_stage,
        "macro": macro,
        "weighted": weighted,
        "n": n,
        "auc_bin_error_bound": auc_bounds,
        "quadratic_kappa": kappa,
        "early_onfh": early,
    }


def average_precision_101(scores: np.ndarray, is_tp: np.ndarray, n_gt: int) -> float:
    """COCO-style average precision: 101-point interpolated precision over recall.

    Follows ``COCOeval.accumulate`` (cocodataset/cocoapi, PythonAPI/pycocotools/cocoeval.py):
    detections sorted by score (descending, stable), cumulative precision and recall
    (recall = TP / number of ground-truth boxes), precision made non-increasing from the
    right, then averaged at recall thresholds 0, 0.01, ..., 1 (0 where a recall is never
    reached). pycocotools itself is 2D-only, hence this small 3D-agnostic port. Like pycocotools,
    the recall thresholds are ``np.linspace(0, 1, 101)`` and recall is float64, so a recall of
    exactly ``j / 100`` can fall one ulp short of threshold ``j`` (e.g. 7 of 10 boxes); we keep
    that to stay equal to the reference implementation.

    Why not MONAI's ``monai.apps.detection.metrics.coco.COCOMetric`` (checked with MONAI 1.6.1,
    ``tests/test_metrics.py``): its ``_compute_statistics`` casts the cumulative TP/FP counts to
    float32 before ``recall = tp / num_gt``. Wherever ``float32(k) / n_gt`` rounds below the
    float64 threshold ``j / 100`` that recall ``k / n_gt`` should reach, that threshold takes the
    precision of a later detection (0 when none), so its AP is lower than pycocotools': with 25
    ground-truth boxes, 14 of the 25 recalls ``k / 25`` miss their threshold (k = 1, 2, 3, 4, 6,
    ...); in a random check (400 sets of 1 to 59 boxes, AP compared at 1e-12) 16 APs differed, all
    with 25 or 50 boxes, and each time ours equalled an exact rational computation. Otherwise it
    agrees: same 101 thresholds, same stable merge sort by score, same right-to-left precision
    envelope, a match at IoU >= threshold; its ``tp / (tp + fp + eps)`` precision differs from
    ours only at the first detection when it is a TP (by 2.2e-16). Its other conventions do not matter here: the box format is whatever
    ``iou_fn`` reads (ours: :func:`shared_models.detection.box_iou_3d`), it has no area ranges,
    and its max-detections cap is moot with one detection per ground-truth box. A site computes
    this locally on its own cases (numpy only) and sends only the resulting float.

    Args:
        scores: (N,) detection scores.
        is_tp: (N,) bool, True where the detection matches a ground-truth box.
        n_gt: number of ground-truth boxes (> 0).

    Returns:
        AP in ``[0, 1]`` (float).

    Raises:
        ValueError: if ``n_gt`` < 1 or the arrays differ in length.
    """
    scores = np.asarray(scores, dtype=np.float64)
    is_tp = np.asarray(is_tp, dtype=bool)
    if n_gt < 1 or scores.shape != is_tp.shape:
        raise ValueError(
            f"average_precision_101: need n_gt >= 1 and matching arrays, got {n_gt}, {scores.shape}, {is_tp.shape}"
        )
    order = np.argsort(-scores, kind="mergesort")
    tp = np.cumsum(is_tp[order])
    precision = tp / np.arange(1, len(order) + 1)
    recall = tp / n_gt
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    thresholds = np.linspace(0.0, 1.0, 101)
    idx = np.searchsorted(recall, thresholds, side="left")
    return float(np.where(idx < len(precision), precision[np.minimum(idx, len(precision) - 1)], 0.0).mean())


IOU_HIST_BINS = 20  # equal IoU bins on [0, 1] for the per-site IoU distribution


def detection_metrics(
    pred_boxes: np.ndarray,
    gt_boxes: np.ndarray,
    spacing_dhw_mm: Sequence[float] | np.ndarray,
    scores: np.ndarray | None = None,
) -> dict[str, float | list[int]]:
    """Localisation quality of the detector, one predicted box per ground-truth box.

    Args:
        pred_boxes: ``(N, 6)`` predicted ``(cz, cy, cx, d, h, w)`` in voxels of the detector grid.
        gt_boxes: ``(N, 6)`` ground-truth boxes, same grid.
        spacing_dhw_mm: voxel spacing of that grid in mm, ``(D, H, W)`` order: ``(3,)`` for all
            cases or ``(N, 3)`` per case.
        scores: optional ``(N,)`` detection scores; with them ``ap50`` is added.

    Returns:
        ``n``; ``iou_mean`` (mean 3D IoU); ``center_error_mm`` (median Euclidean distance of the
        box centres in mm); ``recall30`` / ``recall50`` (fraction of cases with IoU >= 0.3 / 0.5);
        with ``scores``, ``ap50``: COCO 101-point AP at 3D IoU 0.5
        (:func:`average_precision_101`; one detection per ground-truth box here).
        All NaN when ``N = 0``.

    Raises:
        ValueError: mismatched shapes, non-finite values, negative sizes or non-positive spacing.
    """
    pred = np.asarray(pred_boxes, dtype=np.float64)
    gt = np.asarray(gt_boxes, dtype=np.float64)
    if pred.ndim != 2 or pred.shape[1] != 6 or pred.shape != gt.shape:
        raise ValueError(f"pred_boxes/gt_boxes: expected two (N, 6) arrays, got {pred.shape} and {gt.shape}")
    n = pred.shape[0]
    spacing = np.asarray(spacing_dhw_mm, dtype=np.float64)
    if spacing.shape not in ((3,), (n, 3)) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ValueError(f"spacing_dhw_mm: expected (3,) or ({n}, 3) positive mm values, got shape {spacing.shape}")
    if n == 0:
        empty: dict[str, float | list[int]] = {
            "n": 0,
            "iou_mean": math.nan,
            "center_error_mm": math.nan,
            "recall30": math.nan,
            "recall50": math.nan,
            "iou_hist": [0] * IOU_HIST_BINS,
        }
        return empty if scores is None else {**empty, "ap50": math.nan}
    ious = np.diagonal(box_iou_3d(pred, gt)).astype(np.float64)
    err = np.linalg.norm((pred[:, :3] - gt[:, :3]) * spacing, axis=1)
    out: dict[str, float | list[int]] = {
        "n": int(n),
        "iou_mean": float(ious.mean()),
        "center_error_mm": float(np.median(err)),
        "recall30": float(np.mean(ious >= 0.3)),
        "recall50": float(np.mean(ious >= 0.5)),
        "iou_hist": [int(v) for v in np.histogram(ious, bins=IOU_HIST_BINS, range=(0.0, 1.0))[0]],
    }
    if scores is not None:
        out["ap50"] = average_precision_101(np.asarray(scores).reshape(-1)[:n], ious >= 0.5, n)
    return out
