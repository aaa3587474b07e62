"""What a site sends to calibrate the final models (issue 17 items 2-4): aggregates only.

Two steps, each a ``query`` from the server after the stager phase (``server/calibration.py``):

1. :func:`validation_stats`, on the site's ``val`` heads: the histogram of detector scores of
   the heads whose box has 3D IoU >= 0.5 with the ground truth, the histogram of the stager's
   energy scores, and the summed NLL at every temperature of ``TEMPERATURE_GRID``.
2. :func:`calibrated_stats`, given the chosen :class:`~shared_models.calibration.Calibration`,
   on the ``val`` and ``test`` heads: reliability counts before and after temperature scaling,
   the histograms of ``P(early)`` of positives (stage I/II) and negatives (stage 0), and how many
   heads the detector and out-of-distribution thresholds would flag.

Small cells: a split with fewer heads than the run's ``min-cell-heads`` sends only its head count
(``<split>-heads``) and ``<split>-suppressed = 1``: no histogram of a handful of patients leaves
the site (the rule of ``client.tasks.suppress_small_cells``, applied to these keys; an empty split
is "suppressed" too, having nothing to send). Keys are kebab-case; every list has a fixed length (checked by the server).
"""

from __future__ import annotations

import json

import numpy as np
import torch

from client.detector_training import predict_boxes
from client.site_data import SiteData
from shared_models import calibration as cal
from shared_models.config import RunConfig
from shared_models.detection import YOLOX3D, box_iou_3d
from shared_models.device import select_device
from shared_models.specs import (
    CALIBRATION,
    CROPS_KEY,
    DET_GOOD,
    DET_HEADS,
    DET_SCORE_HIST,
    ENERGY_HIST,
    NLL,
    VAL_HEADS,
    VAL_SUPPRESSED,
    Action,
)
from shared_models.stager import MulDenseNet3D


@torch.no_grad()
def stage_logits(model: MulDenseNet3D, crops: np.ndarray, *, device: torch.device, batch_size: int = 16) -> np.ndarray:
    """Stager logits ``(N, 3)`` float64 for crops ``(N, 1, D, H, W)``, eval mode."""
    model.to(device).eval()
    out = [
        model(torch.from_numpy(np.asarray(crops[i : i + batch_size], np.float32)).to(device)).double().cpu().numpy()
        for i in range(0, len(crops), batch_size)
    ]
    return np.concatenate(out) if out else np.zeros((0, 3))


def _detector_scores(site: SiteData, cfg: RunConfig, state, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Best-box scores and IoUs with the ground truth of the ``split`` heads that have a box."""
    heads = [h for h in site.heads_in(split) if h.box_lps_mm is not None]
    if not heads:
        return np.zeros(0), np.zeros(0)
    model = YOLOX3D(cfg.detector)
    model.load_state_dict(state)
    volumes = np.stack([site.hemi_volume(h)[0] for h in heads]).astype(np.float32)
    boxes, scores, _ = predict_boxes(model, volumes, device=select_device(cfg.device))
    gt = np.stack([site.gt_box_voxels(h) for h in heads])
    ious = np.diagonal(box_iou_3d(np.asarray(boxes, np.float64), np.asarray(gt, np.float64)))
    return np.asarray(scores, np.float64), np.asarray(ious, np.float64)


def _split_logits(site: SiteData, cfg: RunConfig, state, key: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    from client.tasks import load_crops

    crops, stages = load_crops(site, key).select(split)
    if len(crops) == 0:
        return np.zeros((0, 3)), np.zeros(0, np.int64)
    model = MulDenseNet3D(cfg.stager)
    model.load_state_dict(state)
    return stage_logits(model, crops, device=select_device(cfg.device)), np.asarray(stages, np.int64)


def validation_stats(site: SiteData, cfg: RunConfig, detector_state, stager_state, key: str) -> dict:
    """Step 1 on the ``val`` heads (see the module docstring).

    Returns:
        ``val-heads``; unless suppressed: ``det-heads``, ``det-good`` (IoU >= 0.5),
        ``det-score-hist`` (100 ints: scores of the good boxes), ``energy-hist``
        (``len(ENERGY_EDGES) - 1`` ints), ``nll`` (``len(TEMPERATURE_GRID)`` floats, nats).
    """
    logits, stages = _split_logits(site, cfg, stager_state, key, "val")
    out: dict = {VAL_HEADS: int(len(stages))}
    if len(stages) < cfg.min_cell_heads:
        return {**out, VAL_SUPPRESSED: 1}
    scores, ious = (
        _detector_scores(site, cfg, detector_state, "val") if detector_state is not None else (np.zeros(0),) * 2
    )
    good = ious >= 0.5
    out.update(
        {
            VAL_SUPPRESSED: 0,
            DET_HEADS: int(len(ious)),
            DET_GOOD: int(good.sum()),
            DET_SCORE_HIST: cal.histogram(scores[good], cal.SCORE_EDGES),
            ENERGY_HIST: cal.histogram(cal.energy_scores(logits), cal.ENERGY_EDGES),
            NLL: cal.nll_sums(logits, stages),
        }
    )
    return out


def calibrated_stats(
    site: SiteData, cfg: RunConfig, detector_state, stager_state, key: str, calibration: cal.Calibration
) -> dict:
    """Step 2 on the ``val`` and ``test`` heads (see the module docstring).

    Returns per split ``s``: ``s-heads``, ``s-suppressed``; unless suppressed
    ``s-rel-count-before`` / ``-correct-before`` / ``-conf-before`` and the same ``-after``
    (``RELIABILITY_BINS`` each), ``s-early-pos`` / ``s-early-neg`` (100 ints, ``P(I) + P(II)``
    after scaling), ``s-ood-flagged`` (energy at or above the threshold), ``s-det-heads`` and
    ``s-det-flagged`` (score below the detector threshold).
    """
    out: dict = {}
    for split in ("val", "test"):
        logits, stages = _split_logits(site, cfg, stager_state, key, split)
        out[f"{split}-heads"] = int(len(stages))
        if len(stages) < cfg.min_cell_heads:
            out[f"{split}-suppressed"] = 1
            continue
        out[f"{split}-suppressed"] = 0
        for when, t in (("before", 1.0), ("after", calibration.temperature)):
            probs = cal.softmax_t(logits, t)
            counts = cal.reliability_counts(probs, stages)
            for name in ("count", "correct", "conf"):
                out[f"{split}-rel-{name}-{when}"] = counts[name]
        p_early = cal.early_probability(cal.softmax_t(logits, calibration.temperature))
        out[f"{split}-early-pos"] = cal.histogram(p_early[stages > 0], cal.SCORE_EDGES)
        out[f"{split}-early-neg"] = cal.histogram(p_early[stages == 0], cal.SCORE_EDGES)
        energy = cal.energy_scores(logits)
        thr = calibration.energy_threshold
        out[f"{split}-ood-flagged"] = int((energy >= thr).sum()) if thr is not None else 0
        if detector_state is not None:
            scores, _ = _detector_scores(site, cfg, detector_state, split)
            dthr = calibration.detector_threshold
            out[f"{split}-det-heads"] = int(len(scores))
            out[f"{split}-det-flagged"] = int((scores < dthr).sum()) if dthr is not None else 0
    return out


def run(action: str, site: SiteData, cfg: RunConfig, detector_state, stager_state, config: dict) -> dict:
    """Dispatch a ``calibrate-val`` / ``calibrate-eval`` query (``config``: ``crops-key``, and for
    ``calibrate-eval`` the JSON ``calibration`` chosen by the server, validated here).

    Raises:
        ValueError: an unknown action or an invalid calibration.
    """
    key = str(config[CROPS_KEY])
    if action == Action.CALIBRATE_VAL:
        return validation_stats(site, cfg, detector_state, stager_state, key)
    if action == Action.CALIBRATE_EVAL:
        calibration = cal.Calibration.from_dict(json.loads(str(config[CALIBRATION])))
        return calibrated_stats(site, cfg, detector_state, stager_state, key, calibration)
    raise ValueError(f"unknown calibration action {action!r}")
