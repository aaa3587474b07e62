"""3DC-YOLOX, the femoral-head detector (Yang et al., Front. Surg. 2025, section 2.4), read as a 3D
YOLOX (Ge et al. 2021, arXiv:2107.08430). Import the public names from this package."""

from __future__ import annotations

from shared_models.detection.network import (
    CENTER_RADIUS,
    PRED_CHANNELS,
    YOLOX3D,
    box_iou_3d,
    center_prior,
    decode_best_box,
    detector_loss,
    nms_3d,
    simota_assign,
)

__all__ = [
    "CENTER_RADIUS",
    "PRED_CHANNELS",
    "YOLOX3D",
    "box_iou_3d",
    "center_prior",
    "decode_best_box",
    "detector_loss",
    "nms_3d",
    "simota_assign",
]
