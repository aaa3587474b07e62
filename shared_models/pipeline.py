"""Two-stage inference: hip MRI -> femoral head boxes (3DC-YOLOX) -> Ficat-Arlet stage (3D-MulDenseNet) -> Grad-CAM.

Yang et al., Front. Surg. 2025, section 2.4 (Figure 2): the detection subnet locates
the femoral head core area; the staging subnet grades that region; 3D Grad-CAM on
the stager's last 3D conv layer shows which signal changes drove the decision, and
is mapped back into the input study's geometry (the paper's "three-dimensional
reconstruction"), so it overlays the source MRI in ITK-SNAP or 3D Slicer.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from shared_models.detector import YOLOX3D, decode_best_box
from shared_models.gradcam import heatmap_volume_mm3, stage_gradcam
from shared_models.preprocessing import (
    GridGeometry,
    PreprocessingSpec,
    box_voxel_to_lps,
    clip_box_to_image,
    field_of_view_mask,
    orient_lps,
    resample_crop,
    resample_hemi,
    to_grid,
)
from shared_models.stager import MulDenseNet3D
from shared_models.stages import FicatArletStage

log = logging.getLogger(__name__)

SIDES = ("R", "L")

# Grad-CAM values at or above this count towards ``HeadResult.gradcam_volume_mm3`` (paper section 3.4);
# the figures in ``shared_models.overlay`` outline the same level.
GRADCAM_VOLUME_THRESHOLD = 0.5


@dataclass
class HeadResult:
    """Result for one femoral head.

    Attributes:
        side: ``"R"`` or ``"L"`` (patient right/left).
        box_lps_mm: (x0, y0, z0, x1, y1, z1) femoral head core box, LPS mm.
        detector_score: objectness x class score in [0, 1].
        low_confidence: True when no detection passed the score threshold (the best box
            is returned anyway).
        stage_probabilities: {"0", "I", "II"} -> probability (softmax).
        predicted_stage: the arg-max stage label.
        gradcam: Grad-CAM map in [0, 1] resampled into the input study's geometry
            (same size, spacing, origin and direction), float32, 0 outside the crop.
        gradcam_volume_mm3: volume of the crop-grid map at or above
            :data:`GRADCAM_VOLUME_THRESHOLD` (0.5), mm³.
        crop_grid: the stager's crop grid (box plus ``spec.crop_margin_mm`` per side,
            ``spec.crop_shape`` voxels, LPS); ``None`` when the result was not made by
            :func:`analyse_study` (e.g. built by hand in a test).
        gradcam_crop: the Grad-CAM map on ``crop_grid`` before it was resampled into the
            study, float32 ``(D, H, W)`` = ``crop_grid.size_dhw`` in ``[0, 1]``; the map that
            ``gradcam_volume_mm3`` measures. ``None`` together with ``crop_grid``.
    """

    side: str
    box_lps_mm: tuple[float, ...]
    detector_score: float
    low_confidence: bool
    stage_probabilities: dict[str, float]
    predicted_stage: str
    gradcam: sitk.Image
    gradcam_volume_mm3: float
    crop_grid: GridGeometry | None = None
    gradcam_crop: np.ndarray | None = None

    def summary(self) -> dict:
        """JSON-able dict (without the maps and the crop grid)."""
        return {
            "side": self.side,
            "box_lps_mm": [round(float(v), 3) for v in self.box_lps_mm],
            "detector_score": round(self.detector_score, 4),
            "low_confidence": self.low_confidence,
            "stage_probabilities": {k: round(v, 4) for k, v in self.stage_probabilities.items()},
            "predicted_stage": self.predicted_stage,
            "gradcam_volume_mm3": round(self.gradcam_volume_mm3, 1),
        }


def analyse_study(
    image: sitk.Image,
    detector: YOLOX3D,
    stager: MulDenseNet3D,
    spec: PreprocessingSpec,
    *,
    device: torch.device | None = None,
    gradcam_layer: str | None = None,
) -> list[HeadResult]:
    """Run the two-stage pipeline on one hip study.

    Args:
        image: the study as read (any orientation; intensities in scanner units after
            rescale), 3D.
        device: where the networks run; default CPU.
        gradcam_layer: stager module to explain; default ``stager.gradcam_layer``.

    Returns:
        One :class:`HeadResult` per side, right then left.

    Raises:
        ValueError: if the image is not 3D, or the Grad-CAM layer does not exist.
    """
    if image.GetDimension() != 3:
        raise ValueError(f"expected a 3D image, got {image.GetDimension()}D")
    device = torch.device("cpu") if device is None else device
    oriented = orient_lps(sitk.Cast(image, sitk.sitkFloat32))
    detector = detector.to(device).eval()
    stager = stager.to(device).eval()
    results = []
    for side in SIDES:
        hemi, grid = resample_hemi(oriented, side, spec)
        with torch.no_grad():
            boxes, scores, low = decode_best_box(detector(torch.from_numpy(hemi)[None, None].float().to(device)),
                                                 spatial_shape=hemi.shape)
        # the hemi grid can reach past the scan (a head at the edge of the field of view)
        box_lps = clip_box_to_image(box_voxel_to_lps(boxes[0].float().cpu().numpy(), grid), oriented)
        crop, crop_grid = resample_crop(oriented, box_lps, side, spec)
        x = torch.from_numpy(crop)[None, None].float().to(device)
        with torch.no_grad():
            probs = torch.softmax(stager(x).float(), dim=1)[0].cpu().numpy()
        cam = stage_gradcam(stager, x, target_layer=gradcam_layer, class_index=int(probs.argmax()))
        # Evidence outside the scanned volume (the zero-filled part of a crop at the edge of the
        # field of view) is not anatomy: the map is 0 there and not counted in the volume.
        cam = cam * field_of_view_mask(oriented, crop_grid)
        results.append(HeadResult(
            side=side,
            box_lps_mm=tuple(float(v) for v in box_lps),
            detector_score=float(scores[0]),
            low_confidence=bool(low[0]),
            stage_probabilities={s.label: float(probs[int(s)]) for s in FicatArletStage},
            predicted_stage=FicatArletStage(int(probs.argmax())).label,
            gradcam=to_grid(cam, crop_grid, image),
            gradcam_volume_mm3=float(
                heatmap_volume_mm3(cam, crop_grid.spacing_dhw_mm, threshold=GRADCAM_VOLUME_THRESHOLD)
            ),
            crop_grid=crop_grid,
            gradcam_crop=cam,
        ))
    return results

