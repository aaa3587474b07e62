"""What a site does in each federated step, as plain functions over its data.

Each function takes the site's :class:`~client.site_data.SiteData`, the run's
:class:`~shared_models.config.RunConfig` and plain state dicts, and returns plain
state dicts and metric dicts. The ClientApp (``client/client_app.py``) only
translates Flower messages to and from these calls.

Privacy: metrics are aggregates (counts, means, histograms). No patient id, path
or per-head value leaves these functions.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from client.detector_training import predict_boxes, train_detector
from client.site_data import SITE_CACHE_NAME, HeadRecord, SiteData
from client.stager_training import predict_stages, train_stager
from shared_models.config import RunConfig
from shared_models.detection import YOLOX3D
from shared_models.determinism import stream_seed
from shared_models.device import select_device
from shared_models.metrics import IOU_HIST_BINS, detection_metrics, stage_counts, stage_metrics
from shared_models.preprocessing import box_voxel_to_lps
from shared_models.specs import (
    ACCURACY,
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
    VAL_NUM_EXAMPLES,
    VAL_SCORE,
    VAL_SUPPRESSED,
    Phase,
)
from shared_models.stager import MulDenseNet3D
from shared_models.weights import state_dict_sha256

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]
HIST_BINS = 100


def site_cache_dir(cfg: RunConfig, site_id: str, site_root: Path) -> Path:
    """The simulated site's preprocessing cache: ``<cache-dir>/<site>`` or ``<site-root>/.onfh-cache``.

    Only for simulation (and tools run at the site): a deployed site's cache is site-local and never
    comes from the run config (``client.client_app.site_cache_dir``).
    """
    return Path(cfg.cache_dir) / site_id if cfg.cache_dir else site_root / SITE_CACHE_NAME


def open_site(cfg: RunConfig, site_id: str, site_root: Path, cache_dir: Path | None = None) -> SiteData:
    """Load (from cache when possible) the site's manifest, studies and hemi-volumes.

    ``cache_dir`` defaults to :func:`site_cache_dir`.
    """
    cache = Path(cache_dir) if cache_dir is not None else site_cache_dir(cfg, site_id, site_root)
    return SiteData(site_root, site_id, cache, cfg.spec)


def _boxed(heads: list[HeadRecord]) -> list[HeadRecord]:
    return [h for h in heads if h.box_lps_mm is not None]


def _staged(heads: list[HeadRecord]) -> list[HeadRecord]:
    return [h for h in heads if h.stage is not None]


def _hemi_batch(site: SiteData, heads: list[HeadRecord]) -> np.ndarray:
    if not heads:
        return np.zeros((0, 1, *site.spec.hemi_shape), np.float32)
    return np.stack([site.hemi_volume(h)[0] for h in heads]).astype(np.float32)


# ----------------------------------------------------------------------------- phase 1


def detector_train(
    site: SiteData, cfg: RunConfig, state: StateDict, *, proximal_mu: float, server_round: int
) -> tuple[StateDict, dict]:
    """One round of local 3DC-YOLOX training on the site's ``train`` heads.

    Returns:
        The updated state dict and ``{"num-examples": #training volumes, "train-loss": ...}``.

    Raises:
        ValueError: if the site has no training heads with a box.
    """
    heads = _boxed(site.heads_in("train"))
    if not heads:
        raise ValueError(f"site {site.site_id}: no training heads with a femoral head box")
    model = YOLOX3D(cfg.detector)
    model.load_state_dict(state)
    volumes = _hemi_batch(site, heads)
    boxes = np.stack([site.gt_box_voxels(h) for h in heads]).astype(np.float32)
    metrics = train_detector(
        model,
        volumes,
        boxes,
        steps=cfg.phase(Phase.DETECTOR).local_steps,
        batch_size=cfg.phase(Phase.DETECTOR).batch_size,
        lr=cfg.phase(Phase.DETECTOR).lr,
        weight_decay=cfg.weight_decay,
        device=select_device(cfg.device),
        amp=cfg.amp,
        proximal_mu=proximal_mu,
        seed=stream_seed(cfg.seed, site.site_id, Phase.DETECTOR, server_round),
        l1_weight=cfg.detector_l1_weight(server_round),
        **cfg.lr_schedule_args(Phase.DETECTOR, server_round),
    )
    return {k: v.cpu() for k, v in model.state_dict().items()}, {NUM_EXAMPLES: len(heads), **metrics}


def detector_evaluate(site: SiteData, cfg: RunConfig, state: StateDict, split: str = "test") -> dict:
    """Evaluate the detector on the site's ``split`` heads that have a ground-truth box.

    Returns:
        ``num-examples``, ``iou-mean``, ``center-error-mm`` (median), ``recall30``,
        ``recall50``, ``ap50`` (COCO 101-point AP at 3D IoU 0.5), ``low-confidence`` (count),
        ``iou-hist`` (counts of heads per IoU bin, ``IOU_HIST_BINS`` equal bins on [0, 1]: an
        aggregate, for the report's IoU distribution). Zeros when the split is empty.
    """
    heads = _boxed(site.heads_in(split))
    out = {
        NUM_EXAMPLES: len(heads),
        IOU_MEAN: 0.0,
        CENTER_ERROR_MM: 0.0,
        RECALL30: 0.0,
        RECALL50: 0.0,
        AP50: 0.0,
        LOW_CONFIDENCE: 0,
        IOU_HIST: [0] * IOU_HIST_BINS,
    }
    if not heads:
        return out
    model = YOLOX3D(cfg.detector)
    model.load_state_dict(state)
    pred, scores, low = predict_boxes(model, _hemi_batch(site, heads), device=select_device(cfg.device))
    gt = np.stack([site.gt_box_voxels(h) for h in heads])
    m = detection_metrics(pred, gt, site.spec.hemi_spacing_mm, scores=scores)
    out.update(
        {
            IOU_MEAN: float(m["iou_mean"]),
            CENTER_ERROR_MM: float(m["center_error_mm"]),
            RECALL30: float(m["recall30"]),
            RECALL50: float(m["recall50"]),
            AP50: float(m["ap50"]),
            LOW_CONFIDENCE: int(low.sum()),
            IOU_HIST: m["iou_hist"],
        }
    )
    return out


# ----------------------------------------------------------------------------- crops


@dataclass(frozen=True)
class CropSet:
    """Stager inputs of one site: crops (N, 1, *crop_shape) float32, stages (N,) int64, splits (N,)."""

    crops: np.ndarray
    stages: np.ndarray
    splits: np.ndarray

    def select(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        mask = self.splits == split
        return self.crops[mask], self.stages[mask]


#: What a crop-set key looks like (:func:`crops_key` makes ``ground-truth-<hex>`` / ``detector-<hex>``).
CROPS_KEY_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")


class InvalidCropsKey(ValueError):
    """The server's ``crops-key`` is not a crop-set key; the site refuses it (its type names the
    problem in the error the server receives, ``client.client_app._contained``)."""


def crops_path(site: SiteData, key: str) -> Path:
    """``<cache>/crops/<key>.npz``, for a key that matches :data:`CROPS_KEY_PATTERN` only.

    The key comes from the server, so it is checked before it becomes a path: a key such as
    ``../x`` or an absolute path would let the coordinator choose which ``.npz`` the site reads.

    Raises:
        InvalidCropsKey: the key does not match the pattern, or the path it names (symbolic
            links resolved) is not directly inside the site's crops folder.
    """
    if not isinstance(key, str) or not CROPS_KEY_PATTERN.fullmatch(key):
        raise InvalidCropsKey(
            f"site {site.site_id}: crops-key {str(key)[:80]!r} refused: it must match {CROPS_KEY_PATTERN.pattern}"
        )
    folder = site.cache_dir / "crops"
    path = folder / f"{key}.npz"
    if path.resolve().parent != folder.resolve():
        raise InvalidCropsKey(f"site {site.site_id}: crops-key {key!r} refused: {path} resolves outside {folder}")
    return path


def crops_key(cfg: RunConfig, detector_state: StateDict | None) -> str:
    """Cache key of a crop set: crop source, preprocessing spec and (for detector crops) the weights' hash."""
    digest = hashlib.sha256(json.dumps(cfg.spec.to_dict(), sort_keys=True).encode())
    if cfg.crop_source == "ground-truth" or detector_state is None:
        return f"ground-truth-{digest.hexdigest()[:12]}"
    digest.update(state_dict_sha256(detector_state).encode())
    return f"detector-{digest.hexdigest()[:16]}"


def make_crops(site: SiteData, cfg: RunConfig, detector_state: StateDict | None) -> tuple[str, dict]:
    """Crop every staged femoral head with the global detector (or its ground-truth box).

    The crops are cached at the site under ``<cache>/crops/<key>.npz`` and never travel.

    Returns:
        ``(key, metrics)`` with ``num-examples`` (#crops) and ``low-confidence`` (#heads
        whose detector box fell below the score threshold).
    """
    key = crops_key(cfg, detector_state)
    path = crops_path(site, key)
    heads = _staged(site.heads)
    low_count = 0
    if not path.exists():
        if key.startswith("ground-truth"):
            boxes_lps = [h.box_lps_mm for h in heads]
            missing = sum(b is None for b in boxes_lps)
            if missing:
                raise ValueError(f"site {site.site_id}: crop-source=ground-truth but {missing} heads lack a box")
        else:
            model = YOLOX3D(cfg.detector)
            model.load_state_dict(detector_state)
            device = select_device(cfg.device)
            boxes_lps = []
            for start in range(0, len(heads), 16):
                chunk = heads[start : start + 16]
                loaded = [site.hemi_volume(h) for h in chunk]  # read each cached volume once: array and grid
                pred, _, low = predict_boxes(model, np.stack([v for v, _ in loaded]), device=device)
                low_count += int(low.sum())
                boxes_lps += [box_voxel_to_lps(b, grid) for b, (_, grid) in zip(pred, loaded)]
        crops = (
            np.stack([site.crop(h, b) for h, b in zip(heads, boxes_lps)])
            if heads
            else np.zeros((0, 1, *site.spec.crop_shape), np.float32)
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{key}.{os.getpid()}.tmp.npz")
        np.savez(
            tmp,
            crops=crops.astype(np.float32),
            stages=np.array([h.stage for h in heads], np.int64),
            low_confidence=np.int64(low_count),
        )
        tmp.replace(path)
    with np.load(path) as data:
        low_count = int(data["low_confidence"])
    return key, {NUM_EXAMPLES: len(heads), LOW_CONFIDENCE: low_count}


def load_crops(site: SiteData, key: str) -> CropSet:
    """Load a crop set made by :func:`make_crops`.

    Raises:
        InvalidCropsKey: ``key`` (sent by the server) is not a crop-set key (:func:`crops_path`).
        FileNotFoundError: if the crops for ``key`` were never made at this site.
    """
    path = crops_path(site, key)
    if not path.exists():
        raise FileNotFoundError(
            f"site {site.site_id}: no crops for key {key}; the server must send a crops query first"
        )
    heads = _staged(site.heads)
    with np.load(path) as data:
        crops, stages = data["crops"], data["stages"]
    if len(crops) != len(heads):
        raise ValueError(
            f"site {site.site_id}: crop set {key} holds {len(crops)} crops for {len(heads)} staged heads; "
            "the site's manifest changed since the crops were made"
        )
    # The split comes from today's split.csv, never from the cache: a crop set is reused by every
    # run with the same key (ground-truth crops: every seed and variant), and runs differ in splits.
    return CropSet(crops, stages, np.array([h.split for h in heads]))


# ----------------------------------------------------------------------------- phase 2


def stager_train(
    site: SiteData, cfg: RunConfig, state: StateDict, key: str, *, proximal_mu: float, server_round: int
) -> tuple[StateDict, dict]:
    """One round of local 3D-MulDenseNet training on the site's ``train`` crops.

    Returns:
        Updated state dict and ``{"num-examples": #training crops, "train-loss": ...}``.

    Raises:
        ValueError: if the site has no staged training heads.
    """
    crops, stages = load_crops(site, key).select("train")
    if len(crops) == 0:
        raise ValueError(f"site {site.site_id}: no staged training heads")
    model = MulDenseNet3D(cfg.stager)
    model.load_state_dict(state)
    metrics = train_stager(
        model,
        crops,
        stages,
        steps=cfg.phase(Phase.STAGER).local_steps,
        batch_size=cfg.phase(Phase.STAGER).batch_size,
        lr=cfg.phase(Phase.STAGER).lr,
        weight_decay=cfg.weight_decay,
        focal_gamma=cfg.focal_gamma,
        device=select_device(cfg.device),
        amp=cfg.amp,
        proximal_mu=proximal_mu,
        seed=stream_seed(cfg.seed, site.site_id, Phase.STAGER, server_round),
        **cfg.lr_schedule_args(Phase.STAGER, server_round),
    )
    return {k: v.cpu() for k, v in model.state_dict().items()}, {NUM_EXAMPLES: len(crops), **metrics}


def stager_evaluate(site: SiteData, cfg: RunConfig, state: StateDict, key: str, split: str = "test") -> dict:
    """Evaluate the stager on the site's ``split`` crops.

    Returns:
        ``num-examples``; ``confusion`` (9 ints, row-major, rows = true stage);
        ``hist-pos-k`` / ``hist-neg-k`` (HIST_BINS ints each) for k = 0, 1, 2; and the
        site's own ``macro-auc`` / ``accuracy`` (NaN-free: 0.0 when undefined).
    """
    crops, stages = load_crops(site, key).select(split)
    out: dict = {NUM_EXAMPLES: len(crops)}
    if len(crops):
        model = MulDenseNet3D(cfg.stager)
        model.load_state_dict(state)
        probs = predict_stages(model, crops, device=select_device(cfg.device))
    else:
        probs = np.zeros((0, 3), np.float32)
    counts = stage_counts(stages, probs, n_bins=HIST_BINS)
    out[CONFUSION] = [int(v) for v in np.asarray(counts["confusion"]).ravel()]
    for k in range(3):
        out[f"{HIST_POS_PREFIX}{k}"] = [int(v) for v in counts["hist_pos"][k]]
        out[f"{HIST_NEG_PREFIX}{k}"] = [int(v) for v in counts["hist_neg"][k]]
    if len(crops):
        m = stage_metrics(stages, probs)
        out[MACRO_AUC] = float(np.nan_to_num(m["macro"]["auc"]))
        out[ACCURACY] = float(np.nan_to_num(m["macro"]["accuracy"]))
    else:
        out[MACRO_AUC] = 0.0
        out[ACCURACY] = 0.0
    return out


def evaluate(site: SiteData, cfg: RunConfig, phase: Phase | str, state: StateDict, key: str = "") -> dict:
    """Evaluate one phase's global model at the site: test metrics plus a validation score.

    The test heads give the reported metrics. The site's ``val`` heads (training sites
    only) give ``val-score`` — mean IoU for the detector, macro AUC for the stager — and
    ``val-num-examples``, from which the server selects the round to keep (model selection
    on the federated validation metric, never on test data).

    Raises:
        ValueError: for an unknown phase.
    """
    phase = Phase.parse(phase)
    if phase is Phase.DETECTOR:
        metrics = detector_evaluate(site, cfg, state)
        val = detector_evaluate(site, cfg, state, split="val")
    else:
        metrics = stager_evaluate(site, cfg, state, key)
        val = stager_evaluate(site, cfg, state, key, split="val")
    score = val[phase.score_key]
    return {**metrics, VAL_NUM_EXAMPLES: int(val[NUM_EXAMPLES]), VAL_SCORE: float(score)}


# ----------------------------------------------------------------------------- small-cell suppression
# the flags SUPPRESSED and VAL_SUPPRESSED are message keys (shared_models.specs)


def suppress_small_cells(metrics: dict, min_heads: int) -> dict:
    """Small-cell suppression of an evaluate reply (statistical disclosure control's threshold rule).

    A split with at least 1 and fewer than ``min_heads`` heads would let the server read single
    patients' stages and scores from its confusion matrix, histograms and metrics. For such a test
    split the reply keeps only ``num-examples`` and ``suppressed = 1``; for such a validation split it
    keeps ``val-num-examples`` and ``val-suppressed = 1`` and drops ``val-score``. Every other key is
    dropped too (an allow-list: metrics added later, e.g. calibration statistics, are suppressed
    without being named here).

    Args:
        metrics: what :func:`evaluate` returns (not modified).
        min_heads: the site's threshold (>= 1; 1 suppresses nothing): in deployment the larger of the
            run config's ``min-cell-heads`` and the site's own floor (``client.client_app.site_min_cell_heads``).

    Returns:
        The metrics to send.
    """
    out = dict(metrics)
    n, n_val = int(metrics.get(NUM_EXAMPLES, 0)), int(metrics.get(VAL_NUM_EXAMPLES, 0))
    if 0 < n < min_heads:
        out = {
            NUM_EXAMPLES: n,
            SUPPRESSED: 1,
            **{k: v for k, v in metrics.items() if k in (VAL_NUM_EXAMPLES, VAL_SCORE)},
        }
    if 0 < n_val < min_heads:
        out.pop(VAL_SCORE, None)
        out[VAL_SUPPRESSED] = 1
    return out
