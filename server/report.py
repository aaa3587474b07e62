"""The run report: per-site-group stager metrics pooled from counts, detector metrics per site.

Sites send only counts (a 3x3 confusion matrix and per-stage binned score
histograms) and aggregate detector figures; no per-case value leaves a site. The
server pools the counts of the sites in each report group (paper section 2.3:
internal test set from center A, two external test sets grouped by scanner) and
computes accuracy, sensitivity, specificity and F1 exactly from the pooled
confusion matrix, and AUC from the pooled histograms (section 2.7 defines the
macro and weighted averages).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from shared_models.metrics import merge_counts, metrics_from_counts
from shared_models.specs import (
    AP50,
    CENTER_ERROR_MM,
    CONFUSION,
    HIST_NEG_PREFIX,
    HIST_POS_PREFIX,
    IOU_HIST,
    IOU_MEAN,
    LOW_CONFIDENCE,
    MACRO_AUC,
    NUM_EXAMPLES,
    RECALL30,
    RECALL50,
    SUPPRESSED,
    TRAIN_LOSS,
    VAL_NUM_EXAMPLES,
    VAL_SCORE,
)
from shared_models.stages import NUM_STAGES


def counts_from_site_metrics(m: dict) -> dict:
    """Rebuild the ``stage_counts`` structure from a site's evaluate MetricRecord."""
    return {
        "n_bins": len(m[f"{HIST_POS_PREFIX}0"]),
        "confusion": np.asarray(m[CONFUSION], dtype=np.int64).reshape(NUM_STAGES, NUM_STAGES),
        "hist_pos": [np.asarray(m[f"{HIST_POS_PREFIX}{k}"], dtype=np.int64) for k in range(NUM_STAGES)],
        "hist_neg": [np.asarray(m[f"{HIST_NEG_PREFIX}{k}"], dtype=np.int64) for k in range(NUM_STAGES)],
    }


def json_safe(value):
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


# Small-n rule (issue 18): a figure on fewer heads than this is marked unreliable in report.json,
# the console and report.html. An AUC on 2 heads of a stage can be anything from 0 to 1.
MIN_GROUP_HEADS = 10
MIN_STAGE_HEADS = 3


def small_n(confusion) -> dict:
    """Which figures of a group rest on too few heads.

    Args:
        confusion: the pooled 3x3 confusion matrix (rows = true Ficat-Arlet stage), ints.

    Returns:
        ``{"unreliable": bool, "reasons": [str, ...], "unreliable_stages": [label, ...]}``: the whole group
        is unreliable below :data:`MIN_GROUP_HEADS` heads; a stage with fewer than :data:`MIN_STAGE_HEADS`
        heads makes its own row and the macro average (which includes it) unreliable. The figures are
        kept as computed (comparable with other runs) and only marked.
    """
    from shared_models.stages import STAGE_LABELS

    conf = np.asarray(confusion, dtype=np.int64).reshape(NUM_STAGES, NUM_STAGES)
    n, support = int(conf.sum()), conf.sum(axis=1)
    reasons, stages = [], []
    if n < MIN_GROUP_HEADS:
        reasons.append(f"{n} heads (fewer than {MIN_GROUP_HEADS}): every figure is unreliable")
    for label, k in zip(STAGE_LABELS, support):
        if k < MIN_STAGE_HEADS:
            stages.append(label)
            reasons.append(
                f"stage {label}: {int(k)} heads (fewer than {MIN_STAGE_HEADS}): its row and the macro "
                "average are unreliable"
            )
    return {"unreliable": bool(reasons), "reasons": reasons, "unreliable_stages": stages}


def group_stage_metrics(site_metrics: dict[str, dict], groups: dict[str, tuple[str, ...]]) -> dict[str, dict]:
    """Pool each group's site counts and compute its stage metrics.

    Args:
        site_metrics: ``{site_id: stager evaluate metrics}`` of one round.
        groups: ``{group name: (site ids)}``.

    Returns:
        ``{group: {"n", "per_stage", "macro", "weighted", "sites", "counts", "small_n", ...}}`` (``counts``: the
        pooled confusion matrix and score histograms, see :func:`shared_models.metrics.stage_counts`; ``small_n``:
        :func:`small_n`); a group whose
        sites all failed or hold no test heads gets ``n = 0`` and no metrics. Sites that suppressed their
        counts as a small cell (``client.tasks.suppress_small_cells``) are listed under ``suppressed``
        with their head count only; the pooled figures are exact for the sites that sent counts.
    """
    out: dict[str, dict] = {}
    for name, members in groups.items():
        suppressed = {
            s: int(site_metrics[s].get(NUM_EXAMPLES, 0))
            for s in members
            if s in site_metrics and site_metrics[s].get(SUPPRESSED)
        }
        present = [
            s
            for s in members
            if s in site_metrics and int(site_metrics[s].get(NUM_EXAMPLES, 0)) > 0 and s not in suppressed
        ]
        if not present:
            out[name] = {"n": 0, "sites": list(members), "missing": [s for s in members if s not in site_metrics]}
            if suppressed:
                out[name]["suppressed"] = suppressed
            continue
        pooled = merge_counts([counts_from_site_metrics(site_metrics[s]) for s in present])
        metrics = metrics_from_counts(pooled)
        out[name] = {"sites": present, **metrics}
        out[name]["n"] = int(np.asarray(pooled["confusion"]).sum())
        out[name]["counts"] = pooled  # confusion matrix and score histograms: aggregates only, for ROC figures
        if suppressed:
            out[name]["suppressed"] = suppressed
        out[name]["small_n"] = small_n(pooled["confusion"])
    return out


def detector_site_metrics(site_metrics: dict[str, dict]) -> dict[str, dict]:
    """Per-site detector figures: ``iou_mean``, ``center_error_mm`` (median), ``recall30``, ``recall50``, ``ap50``, ``n``,
    ``iou_hist`` (heads per IoU bin, equal bins on [0, 1]); a site that suppressed its figures as a
    small cell gets ``n`` and ``suppressed: True`` only."""
    out: dict[str, dict[str, Any]] = {}
    for site, m in sorted(site_metrics.items()):
        n = int(m.get(NUM_EXAMPLES, 0))
        if m.get(SUPPRESSED):
            out[site] = {"n": n, "suppressed": True}
            continue
        out[site] = {
            "n": n,
            "iou_mean": float(m[IOU_MEAN]) if n else None,
            "center_error_mm": float(m[CENTER_ERROR_MM]) if n else None,
            "recall30": float(m[RECALL30]) if n else None,
            "recall50": float(m[RECALL50]) if n else None,
            "ap50": float(m[AP50]) if n and AP50 in m else None,
            "low_confidence": int(m.get(LOW_CONFIDENCE, 0)),
            "iou_hist": [int(v) for v in m.get(IOU_HIST, [])],
        }
    return out


def transfer_summary(states: dict[str, dict], *, n_sites: int, n_train: int) -> dict[str, dict]:
    """Model payload per phase and per round: every training site gets the global arrays and sends its
    update (2 x ``n_train`` transfers), every site gets the arrays to evaluate (``n_sites``); replies to
    evaluate carry metrics only. Bytes are the tensors' own (``numel x itemsize``), without framing."""
    out = {}
    for phase, state in states.items():
        nbytes = int(sum(v.numel() * v.element_size() for v in state.values()))
        out[phase] = {
            "model_bytes": nbytes,
            "arrays": len(state),
            "transfers_per_round": 2 * n_train + n_sites,
            "bytes_per_round": nbytes * (2 * n_train + n_sites),
        }
    return out


def build_report(
    *,
    strategy: str,
    proximal_mu: float,
    rounds: dict[str, int],
    stager_history: dict[int, dict[str, dict]],
    detector_history: dict[int, dict[str, dict]],
    selected_rounds: dict[str, int],
    stager_train: dict[int, dict[str, dict]],
    detector_train: dict[int, dict[str, dict]],
    groups: dict[str, tuple[str, ...]],
    train_sites: tuple[str, ...],
    crop_source: str,
    wall_time_s: float,
    site_data: dict[str, dict] | None = None,
    transfer: dict[str, dict] | None = None,
    min_cell_heads: int = 5,
) -> dict:
    """Assemble ``report.json`` from the per-round per-site metrics of both phases.

    The per-site figures are those of each phase's selected round (best validation score;
    the bundle holds that round's weights). ``min_cell_heads`` is the run's small-cell threshold,
    recorded so the report can say why a site's figures are absent.
    """
    last_stager = stager_history.get(selected_rounds["stager"], {})
    last_detector = detector_history.get(selected_rounds["detector"], {})
    history = {
        "detector_iou_mean": {
            r: {s: m.get(IOU_MEAN) for s, m in sites.items()} for r, sites in sorted(detector_history.items())
        },
        "stager_macro_auc": {
            r: {s: m.get(MACRO_AUC) for s, m in sites.items()} for r, sites in sorted(stager_history.items())
        },
        "detector_val_iou": {
            r: {s: m.get(VAL_SCORE) for s, m in sites.items() if m.get(VAL_NUM_EXAMPLES)}
            for r, sites in sorted(detector_history.items())
        },
        "stager_val_macro_auc": {
            r: {s: m.get(VAL_SCORE) for s, m in sites.items() if m.get(VAL_NUM_EXAMPLES)}
            for r, sites in sorted(stager_history.items())
        },
        "detector_train_loss": {
            r: {s: m.get(TRAIN_LOSS) for s, m in sites.items()} for r, sites in sorted(detector_train.items())
        },
        "stager_train_loss": {
            r: {s: m.get(TRAIN_LOSS) for s, m in sites.items()} for r, sites in sorted(stager_train.items())
        },
    }
    return json_safe(
        {
            "strategy": strategy,
            "proximal_mu": proximal_mu if strategy == "fedprox" else None,
            "rounds": rounds,
            "selected_rounds": selected_rounds,
            "train_sites": list(train_sites),
            "crop_source": crop_source,
            "site_data": {
                s: {k.replace("-", "_"): v for k, v in m.items()} for s, m in sorted((site_data or {}).items())
            },
            "sites": group_stage_metrics(last_stager, groups),
            # each site on its own (the cross-site matrix of `onfh sim compare`): sites without test heads are left out
            "per_site": {
                s: {k: m[k] for k in ("n", "macro", "weighted", "quadratic_kappa", "counts", "small_n") if k in m}
                for s, m in group_stage_metrics(last_stager, {s: (s,) for s in sorted(last_stager)}).items()
                if m["n"]
            },
            "min_cell_heads": min_cell_heads,
            "detector": detector_site_metrics(last_detector),
            "history": history,
            "wall_time_s": wall_time_s,
            "transfer": transfer or {},
        }
    )
