"""Post-processing of the 3DC-YOLOX detector: one femoral-head box per hemi-volume.

Post-processing (``decode_best_box``): ``score = sigmoid(obj) * sigmoid(cls)``, score threshold,
3D NMS (MONAI ``non_max_suppression``), and exactly one box per hemi-volume (each half holds one
femoral head): the top box; when nothing passes the threshold (default 0: only the validation-
calibrated threshold of ``shared_models.calibration`` means anything) the best box is returned
anyway and flagged ``low_confidence``. Non-finite predictions (e.g. from a NaN input) are
sanitised rather than raised: such a box sits at the origin with sizes 1e-3 and is flagged
``low_confidence``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from shared_models.detection.boxes import nms_3d
from shared_models.detection.network import PRED_CHANNELS

__all__ = ["decode_best_box"]


@torch.no_grad()
def decode_best_box(
    pred: torch.Tensor,
    score_threshold: float = 0.0,
    nms_iou: float = 0.5,
    spatial_shape: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exactly one femoral-head box per hemi-volume from :class:`~.network.YOLOX3D` output.

    Per image: ``score = sigmoid(obj) * sigmoid(cls)``; cells with ``score >= score_threshold``
    go through 3D NMS (MONAI ``non_max_suppression`` at ``nms_iou``) and the top surviving box is
    returned. (For a single output box NMS keeps the arg-max; it is kept so that the same path
    serves a multi-box variant.) If no cell passes the threshold the highest-scoring cell is
    returned anyway with ``low_confidence = True``. NaN/Inf predictions are sanitised (score 0,
    positive sizes), so this never raises for an input of the right shape.

    The default ``score_threshold`` of 0 flags only collapsed boxes: a fixed score cut-off
    (formerly 0.05) means nothing for a trained model. The decision threshold is chosen on the
    validation split (``shared_models.calibration``), shipped in the bundle and applied by
    ``shared_models.pipeline.analyse_study``.

    Args:
        pred: ``(B, N, 8)`` output of :class:`~.network.YOLOX3D`.
        score_threshold: minimum score in ``[0, 1]``.
        nms_iou: NMS IoU threshold in ``[0, 1]``.
        spatial_shape: ``(D, H, W)`` of the model input; when given, the returned box is clipped
            to the volume (voxel centres at ``0 .. size - 1``, so edges at ``-0.5 .. size - 0.5``).
            A box wholly outside collapses onto the nearest face with size 0 and is flagged
            ``low_confidence``.

    Returns:
        ``boxes`` ``(B, 6)`` float32 ``(cz, cy, cx, d, h, w)`` voxels, ``scores`` ``(B,)`` float32,
        ``low_confidence`` ``(B,)`` bool; all on ``pred``'s device.

    Raises:
        ValueError: wrong ``pred`` shape, thresholds outside ``[0, 1]`` or a non-positive
            ``spatial_shape``.
    """
    if spatial_shape is not None and (len(spatial_shape) != 3 or min(spatial_shape) <= 0):
        raise ValueError(f"spatial_shape: expected (D, H, W) > 0, got {tuple(spatial_shape)}")
    if pred.ndim != 3 or pred.shape[-1] != PRED_CHANNELS or pred.shape[1] == 0:
        raise ValueError(f"pred: expected (B, N>0, {PRED_CHANNELS}), got {tuple(pred.shape)}")
    if not (0.0 <= score_threshold <= 1.0) or not (0.0 <= nms_iou <= 1.0):
        raise ValueError(f"score_threshold and nms_iou must be in [0, 1], got {score_threshold}, {nms_iou}")
    pred = pred.detach().float()
    boxes = torch.nan_to_num(pred[..., :6], nan=0.0, posinf=1e6, neginf=-1e6)
    boxes[..., 3:] = boxes[..., 3:].clamp(min=1e-3, max=1e6)
    logits = torch.nan_to_num(pred[..., 6:8], nan=-1e4, posinf=1e4, neginf=-1e4)
    scores = torch.sigmoid(logits[..., 0]) * torch.sigmoid(logits[..., 1])  # (B, N)
    batch = pred.shape[0]
    out_boxes = torch.zeros(batch, 6, dtype=torch.float32, device=pred.device)
    out_scores = torch.zeros(batch, dtype=torch.float32, device=pred.device)
    low_conf = torch.zeros(batch, dtype=torch.bool, device=pred.device)
    for b in range(batch):
        keep = (scores[b] >= score_threshold).nonzero(as_tuple=True)[0]
        idx = int(scores[b].argmax())
        if keep.numel() == 0:
            low_conf[b] = True
        else:
            kept = nms_3d(boxes[b, keep], scores[b, keep], nms_iou, max_proposals=1)
            idx = int(keep[kept[0]])
        out_boxes[b] = boxes[b, idx]
        out_scores[b] = scores[b, idx]
    if spatial_shape is not None:
        hi = torch.tensor([float(s) - 0.5 for s in spatial_shape], device=pred.device)
        lo0 = (out_boxes[:, :3] - out_boxes[:, 3:] / 2).clamp(min=-0.5)
        hi0 = torch.minimum(out_boxes[:, :3] + out_boxes[:, 3:] / 2, hi)
        lo0 = torch.minimum(lo0, hi)
        hi0 = torch.maximum(hi0, lo0)
        out_boxes = torch.cat([(lo0 + hi0) / 2, hi0 - lo0], dim=1)
        low_conf |= (out_boxes[:, 3:] <= 0).any(dim=1)
    return out_boxes, out_scores, low_conf
