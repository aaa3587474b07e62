"""Training loss of the 3DC-YOLOX detector, with SimOTA assignment (:mod:`.simota`).

Loss (``detector_loss``), normalised by the number of positives as in YOLOX:
``5 * GIoU + BCE(obj, all cells) + BCE(cls, positives; target = IoU of the prediction, YOLOX's
IoU-aware class target) + l1_weight * L1`` (L1 on the raw-parameter scale: centre offset in
strides and log-size). GIoU is MONAI ``BoxGIoULoss`` on corner boxes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import BoxGIoULoss

from shared_models.detection.boxes import to_corners
from shared_models.detection.network import PRED_CHANNELS
from shared_models.detection.simota import simota_assign

__all__ = ["detector_loss"]

_GIOU = BoxGIoULoss(reduction="sum")


def _check_gt(gt_boxes: torch.Tensor, batch: int) -> None:
    if gt_boxes.ndim != 2 or gt_boxes.shape != (batch, 6):
        raise ValueError(
            f"gt_boxes: expected ({batch}, 6) voxel boxes (cz, cy, cx, d, h, w), got {tuple(gt_boxes.shape)}"
        )
    if not torch.isfinite(gt_boxes).all():
        raise ValueError("gt_boxes: boxes must be finite")
    if (gt_boxes[:, 3:] <= 0).any():
        raise ValueError("gt_boxes: box sizes (d, h, w) must be positive")


def detector_loss(
    pred: torch.Tensor, gt_boxes: torch.Tensor, cells: torch.Tensor, l1_weight: float = 0.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """YOLOX loss with SimOTA assignment, one GT box per hemi-volume (arXiv:2107.08430).

    ``loss = (5 * sum GIoU_loss(pos) + sum BCE(obj, all) + sum BCE(cls, pos) + l1_weight * sum L1(pos))
    / num_pos`` with ``num_pos`` the positives of the whole batch. GIoU uses MONAI
    ``BoxGIoULoss`` on corner boxes; the objectness target is 1 at positives and 0 elsewhere;
    the class target at positives is the (detached) IoU of the prediction with the GT (YOLOX's
    IoU-aware target); L1 is on the raw-parameter scale: ``|centre error| / stride +
    |log size - log gt size|``. All computed in float32 (AMP-safe).

    Args:
        pred: ``(B, N, 8)`` output of :class:`~.network.YOLOX3D`.
        gt_boxes: ``(B, 6)`` GT boxes ``(cz, cy, cx, d, h, w)`` in input voxels.
        cells: ``(N, 4)`` ``YOLOX3D.cells`` of the same forward pass.
        l1_weight: weight of the L1 term (YOLOX turns it on for the last epochs); ``>= 0``.

    Returns:
        ``(loss, logs)``: scalar loss tensor and floats ``loss, giou, obj, cls, l1, num_pos``
        (each term already divided by ``num_pos``; ``giou`` unweighted).

    Raises:
        ValueError: mismatched shapes, non-finite or non-positive GT boxes, negative ``l1_weight``,
            or (from MONAI) NaN/Inf predicted boxes.
    """
    if pred.ndim != 3 or pred.shape[-1] != PRED_CHANNELS:
        raise ValueError(f"pred: expected (B, N, {PRED_CHANNELS}), got {tuple(pred.shape)}")
    if cells.ndim != 2 or cells.shape != (pred.shape[1], 4):
        raise ValueError(f"cells: expected ({pred.shape[1]}, 4) matching pred, got {tuple(cells.shape)}")
    if not (l1_weight >= 0):
        raise ValueError(f"l1_weight: must be >= 0, got {l1_weight}")
    pred = pred.float()
    batch = pred.shape[0]
    gt_boxes = torch.as_tensor(gt_boxes, dtype=torch.float32, device=pred.device)
    _check_gt(gt_boxes, batch)
    cells = cells.to(device=pred.device, dtype=torch.float32)

    pos_masks, iou_targets = [], []
    for b in range(batch):
        pos, ious = simota_assign(pred[b], cells, gt_boxes[b])
        pos_masks.append(pos)
        iou_targets.append(ious)
    pos_mask = torch.stack(pos_masks)  # (B, N)
    iou_t = torch.stack(iou_targets)  # (B, N)
    num_pos = max(int(pos_mask.sum().item()), 1)

    pos_pred = pred[pos_mask]  # (P, 8)
    gt_rep = gt_boxes.unsqueeze(1).expand(-1, pred.shape[1], -1)[pos_mask]  # (P, 6)
    giou = _GIOU(to_corners(pos_pred[:, :6]), to_corners(gt_rep))
    obj = F.binary_cross_entropy_with_logits(pred[..., 6], pos_mask.float(), reduction="sum")
    cls = F.binary_cross_entropy_with_logits(pos_pred[:, 7], iou_t[pos_mask], reduction="sum")
    stride = cells[:, 3].unsqueeze(0).expand(batch, -1)[pos_mask].unsqueeze(1)
    l1 = ((pos_pred[:, :3] - gt_rep[:, :3]).abs() / stride).sum() + (
        torch.log(pos_pred[:, 3:6]) - torch.log(gt_rep[:, 3:6])
    ).abs().sum()
    total = (5.0 * giou + obj + cls + float(l1_weight) * l1) / num_pos
    logs = {
        "loss": float(total.detach()),
        "giou": float(giou.detach()) / num_pos,
        "obj": float(obj.detach()) / num_pos,
        "cls": float(cls.detach()) / num_pos,
        "l1": float(l1.detach()) / num_pos,
        "num_pos": float(num_pos),
    }
    return total, logs
