"""SimOTA label assignment of the 3DC-YOLOX detector (training only).

YOLOX SimOTA (arXiv:2107.08430, section 2.2 "SimOTA") for the one
ground-truth box per hemi-volume:

1. *Centre prior*: candidate cells are those whose centre lies inside the GT box **or** within
   2.5 strides of the GT centre (per axis); cells satisfying **both** are strongly preferred
   (cost + 1e5 otherwise), exactly as YOLOX ``get_geometry_constraint``/``get_in_boxes_info``.
2. *Cost* per candidate: ``cls_cost + 3 * (-log IoU)`` with
   ``cls_cost = BCE(sqrt(sigmoid(cls) * sigmoid(obj)), 1)`` and IoU between the (detached)
   decoded prediction and the GT box.
3. *Dynamic k* = ``max(1, int(sum of the top-10 candidate IoUs))``; the ``k`` lowest-cost
   candidates become positives. With one GT per image there are no conflicts to resolve.
4. If no cell is a candidate at all (degenerate box outside the grid), the cell whose centre is
   nearest to the GT centre (in stride units) is the single positive, so training never sees an
   image without positives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from shared_models.detection.boxes import pair_iou

__all__ = ["CENTER_RADIUS", "center_prior", "simota_assign"]

#: YOLOX centre-prior radius in strides.
CENTER_RADIUS = 2.5


def center_prior(
    cells: torch.Tensor, gt_box: torch.Tensor, radius: float = CENTER_RADIUS
) -> tuple[torch.Tensor, torch.Tensor]:
    """YOLOX centre prior (arXiv:2107.08430, section 2.2; ``get_in_boxes_info``) for one GT box.

    Args:
        cells: ``(N, 4)`` float ``[cz, cy, cx, stride]`` (``YOLOX3D.cells``), voxels.
        gt_box: ``(6,)`` ``(cz, cy, cx, d, h, w)`` voxels.
        radius: centre radius in strides (YOLOX: 2.5).

    Returns:
        ``(in_box, in_center)``: ``(N,)`` bool, cell centre strictly inside the GT box, and cell
        centre within ``radius * stride`` of the GT centre on every axis.
    """
    delta = (cells[:, :3] - gt_box[:3]).abs()
    in_box = (delta < gt_box[3:] / 2).all(dim=1)
    in_center = (delta < radius * cells[:, 3:4]).all(dim=1)
    return in_box, in_center


@torch.no_grad()
def simota_assign(pred: torch.Tensor, cells: torch.Tensor, gt_box: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Simplified SimOTA for one image with one GT box (YOLOX arXiv:2107.08430, section 2.2).

    Args:
        pred: ``(N, 8)`` decoded predictions of one image (see :class:`~.network.YOLOX3D`), any float dtype.
        cells: ``(N, 4)`` ``[cz, cy, cx, stride]`` of the same cells.
        gt_box: ``(6,)`` GT ``(cz, cy, cx, d, h, w)`` in voxels, positive sizes.

    Returns:
        ``(positive, iou)``: ``(N,)`` bool positive mask (at least one True) and ``(N,)`` float32
        IoU of each prediction with the GT (0 for non-candidates), used as the class target.
    """
    pred = torch.nan_to_num(pred.detach().float(), nan=0.0, posinf=1e6, neginf=-1e6)
    boxes = pred[:, :6].clone()
    boxes[:, 3:] = boxes[:, 3:].clamp(min=1e-6)
    gt_box = gt_box.float()
    n = pred.shape[0]
    in_box, in_center = center_prior(cells, gt_box)
    candidate = in_box | in_center
    positive = torch.zeros(n, dtype=torch.bool, device=pred.device)
    ious = torch.zeros(n, dtype=torch.float32, device=pred.device)
    if not candidate.any():
        dist = ((cells[:, :3] - gt_box[:3]) / cells[:, 3:4]).norm(dim=1)
        idx = int(dist.argmin())
        positive[idx] = True
        ious[idx] = pair_iou(boxes[idx : idx + 1], gt_box)[0]
        return positive, ious
    cand_idx = candidate.nonzero(as_tuple=True)[0]
    cand_iou = pair_iou(boxes[cand_idx], gt_box)
    ious[cand_idx] = cand_iou
    cls_cost = -0.5 * (F.logsigmoid(pred[cand_idx, 6]) + F.logsigmoid(pred[cand_idx, 7]))
    iou_cost = -torch.log(cand_iou + 1e-8)
    cost = cls_cost + 3.0 * iou_cost + 1e5 * (~(in_box[cand_idx] & in_center[cand_idx])).float()
    top_iou = torch.topk(cand_iou, k=min(10, cand_iou.numel())).values
    dynamic_k = max(1, int(top_iou.sum().item()))
    dynamic_k = min(dynamic_k, cand_idx.numel())
    chosen = torch.topk(cost, k=dynamic_k, largest=False).indices
    positive[cand_idx[chosen]] = True
    return positive, ious
