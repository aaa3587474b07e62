"""Voxel boxes of the 3DC-YOLOX detector: corner conversion, IoU and 3D NMS, via MONAI.

Box convention (``docs/CONVENTIONS.md``): voxel boxes ``(cz, cy, cx, d, h, w)`` in continuous
voxel-index units of the model input, voxel centres at integer indices. MONAI's box utilities
(``monai.data.box_utils``: ``convert_box_mode``, ``box_iou``, ``non_max_suppression``) do the
arithmetic; this module maps our convention onto theirs and checks the inputs. :func:`pair_iou` is
the exception: a plain-torch IoU of many boxes against one, without checks, for SimOTA's inner loop.
"""

from __future__ import annotations

from typing import cast

import numpy as np
import torch
from monai.data.box_utils import box_iou, convert_box_mode, non_max_suppression

__all__ = ["CENTER_MODE", "CORNER_MODE", "box_iou_3d", "nms_3d", "pair_iou", "to_corners"]

#: Box mode strings for ``monai.data.box_utils``. MONAI names the axes x, y, z; we feed our array
#: axes (D, H, W) in that order, so ``(cz, cy, cx, d, h, w)`` is MONAI's "cccwhd" and the corner
#: form is ``(z0, y0, x0, z1, y1, x1)`` ("xyzxyz"). IoU/GIoU do not depend on axis names.
CENTER_MODE = "cccwhd"
CORNER_MODE = "xyzxyz"


def to_corners(boxes: torch.Tensor) -> torch.Tensor:
    """``(N, 6)`` czyxdhw -> MONAI standard corners ``(z0, y0, x0, z1, y1, x1)`` (differentiable)."""
    if boxes.shape[0] == 0:
        return boxes.reshape(0, 6)
    return cast(torch.Tensor, convert_box_mode(boxes, src_mode=CENTER_MODE, dst_mode=CORNER_MODE))


def box_iou_3d(boxes1: torch.Tensor | np.ndarray, boxes2: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
    """Pairwise 3D IoU of voxel boxes (MONAI ``box_iou`` after conversion to corner form).

    Args:
        boxes1: ``(N, 6)`` boxes ``(cz, cy, cx, d, h, w)``, torch tensor or numpy array, any units
            (the same for both inputs).
        boxes2: ``(M, 6)`` boxes of the same kind and container type.

    Returns:
        ``(N, M)`` IoU in ``[0, 1]``, same container type as ``boxes1`` (float32 for integer input).

    Raises:
        ValueError: wrong shape, non-finite values or a negative size.
    """
    is_numpy = isinstance(boxes1, np.ndarray)
    b1 = torch.as_tensor(np.asarray(boxes1) if is_numpy else boxes1)
    b2 = torch.as_tensor(np.asarray(boxes2) if isinstance(boxes2, np.ndarray) else boxes2, device=b1.device)
    for name, b in (("boxes1", b1), ("boxes2", b2)):
        if b.ndim != 2 or b.shape[1] != 6:
            raise ValueError(f"{name}: expected (N, 6) boxes (cz, cy, cx, d, h, w), got {tuple(b.shape)}")
        if not torch.isfinite(b).all():
            raise ValueError(f"{name}: boxes must be finite")
        if (b[:, 3:] < 0).any():
            raise ValueError(f"{name}: box sizes (d, h, w) must be non-negative")
    if not b1.dtype.is_floating_point:
        b1 = b1.float()
    b2 = b2.to(b1.dtype)
    if b1.shape[0] == 0 or b2.shape[0] == 0:
        out = torch.zeros(b1.shape[0], b2.shape[0], dtype=b1.dtype, device=b1.device)
    else:
        out = cast(torch.Tensor, box_iou(to_corners(b1), to_corners(b2)))
    return out.cpu().numpy() if is_numpy else out


def nms_3d(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float, max_proposals: int = -1) -> torch.Tensor:
    """3D non-maximum suppression of voxel boxes (MONAI ``non_max_suppression`` on corner boxes).

    Args:
        boxes: ``(N, 6)`` ``(cz, cy, cx, d, h, w)``, positive sizes.
        scores: ``(N,)`` scores; higher is kept first.
        iou_threshold: a box whose IoU with a kept, higher-scoring box exceeds this is dropped.
        max_proposals: keep at most this many (``-1``: all).

    Returns:
        ``(K,)`` int64 indices into ``boxes`` of the kept boxes, by descending score.
    """
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    kept = non_max_suppression(to_corners(boxes), scores, nms_thresh=iou_threshold, max_proposals=max_proposals)
    return cast(torch.Tensor, kept)


def pair_iou(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """IoU of ``(N, 6)`` boxes against one ``(6,)`` box -> ``(N,)`` (no validity checks; float32)."""
    p0, p1 = pred[:, :3] - pred[:, 3:] / 2, pred[:, :3] + pred[:, 3:] / 2
    g0, g1 = gt[:3] - gt[3:] / 2, gt[:3] + gt[3:] / 2
    inter = (torch.minimum(p1, g1) - torch.maximum(p0, g0)).clamp(min=0).prod(dim=1)
    union = pred[:, 3:].prod(dim=1) + gt[3:].prod() - inter
    return inter / union.clamp(min=torch.finfo(torch.float32).eps)
