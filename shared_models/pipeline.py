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

from shared_models.calibration import Calibration
from shared_models.detection import YOLOX3D, decode_best_box
from shared_models.gates import check_body_part, check_field_of_view, check_finite_voxels, check_head, check_pair
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
        low_confidence: True when the box scored below the bundle's validation-calibrated
            detector threshold (:class:`~shared_models.calibration.Calibration`), or collapsed
            (outside the volume, non-finite output).
        stage_probabilities: {"0", "I", "II"} -> probability (softmax of the logits divided by
            the calibrated temperature); empty when the head was not assessed.
        predicted_stage: the stage label (see :func:`analyse_study` for the rule), or None when
            the head was not assessed.
        gradcam: Grad-CAM map in [0, 1] resampled into the input study's geometry
            (same size, spacing, origin and direction), float32, 0 outside the crop; all 0
            when the head was not assessed.
        gradcam_volume_mm3: volume of the crop-grid map at or above
            :data:`GRADCAM_VOLUME_THRESHOLD` (0.5), mm³.
        crop_grid: the stager's crop grid (box plus ``spec.crop_margin_mm`` per side,
            ``spec.crop_shape`` voxels, LPS); ``None`` when the result was not made by
            :func:`analyse_study` (e.g. built by hand in a test) or the study was refused.
        gradcam_crop: the Grad-CAM map on ``crop_grid`` before it was resampled into the
            study, float32 ``(D, H, W)`` = ``crop_grid.size_dhw`` in ``[0, 1]``; the map that
            ``gradcam_volume_mm3`` measures. ``None`` together with ``crop_grid``.
        not_assessed: why the head's stage is withheld (empty: assessed): the study's reasons, then the head's.
        flags: machine-readable codes of those reasons: ``refused`` (a study gate failed),
            ``off_target`` (box size or position), ``low_detector_score``, ``out_of_distribution``,
            ``non_finite`` (the stager's energy or probabilities are NaN or infinite), ``uncalibrated``
            (the coordinator refused the bundle's calibration: every head is withheld).
        study_reasons: the study gates that failed (refused study; the same on both heads).
        energy: the stager's energy score ``-logsumexp(logits)`` (None when the stager did not run).
        early_probability: ``P(I) + P(II)`` after temperature scaling (None when not assessed).
    """

    side: str
    box_lps_mm: tuple[float, ...]
    detector_score: float
    low_confidence: bool
    stage_probabilities: dict[str, float]
    predicted_stage: str | None
    gradcam: sitk.Image
    gradcam_volume_mm3: float
    crop_grid: GridGeometry | None = None
    gradcam_crop: np.ndarray | None = None
    not_assessed: tuple[str, ...] = ()
    flags: tuple[str, ...] = ()
    study_reasons: tuple[str, ...] = ()
    energy: float | None = None
    early_probability: float | None = None

    @property
    def assessed(self) -> bool:
        return not self.not_assessed

    def summary(self) -> dict:
        """JSON-able dict (without the maps and the crop grid)."""
        return {
            "side": self.side,
            "box_lps_mm": [round(float(v), 3) for v in self.box_lps_mm],
            "detector_score": round(self.detector_score, 4),
            "low_confidence": self.low_confidence,
            "assessed": self.assessed,
            "not_assessed": list(self.not_assessed),
            "flags": list(self.flags),
            "stage_probabilities": {k: round(v, 4) for k, v in self.stage_probabilities.items()},
            "predicted_stage": self.predicted_stage,
            "early_onfh_probability": None if self.early_probability is None else round(self.early_probability, 4),
            "energy": None if self.energy is None else round(self.energy, 3),
            "gradcam_volume_mm3": round(self.gradcam_volume_mm3, 1),
        }


def study_verdict(results: list[HeadResult]) -> tuple[str, list[str]]:
    """``("refused" | "flagged" | "assessed", reasons)`` of a study from its heads.

    ``refused``: a study gate failed (no head staged); ``flagged``: at least one head was not
    assessed; reasons are the distinct reasons in order, each prefixed by the side for head reasons.
    """
    if any("refused" in r.flags for r in results):
        return "refused", list(next(r.study_reasons for r in results if r.study_reasons))
    reasons = [f"{r.side}: {reason}" for r in results for reason in r.not_assessed]
    return ("flagged" if reasons else "assessed"), reasons


def _stage_from(probs: np.ndarray, calibration: Calibration | None) -> FicatArletStage:
    """Arg-max, or with a calibrated early-ONFH threshold: 0 below it, else the likelier of I and II.

    Raises:
        ValueError: if a probability is not finite (the caller withholds such a stage).
    """
    if not np.all(np.isfinite(probs)):
        raise ValueError("stage probabilities are not finite")
    if calibration is None or calibration.early_threshold is None:
        return FicatArletStage(int(probs.argmax()))
    if not (probs[1] + probs[2] >= calibration.early_threshold):
        return FicatArletStage(0)
    return FicatArletStage(1 if probs[1] >= probs[2] else 2)


def analyse_study(
    image: sitk.Image,
    detector: YOLOX3D,
    stager: MulDenseNet3D,
    spec: PreprocessingSpec,
    *,
    device: torch.device | None = None,
    gradcam_layer: str | None = None,
    calibration: Calibration | None = None,
    body_part: str | None = None,
    gates: bool = True,
) -> list[HeadResult]:
    """Run the two-stage pipeline on one hip study, behind the gates of :mod:`shared_models.gates`.

    Steps: study gates (finite voxels, ``body_part``, field of view); the detector on both hemi-volumes; the
    pair gate (midline, inter-head distance); per head, the head gates (box size, edge of the
    scanned volume) and the calibrated detector threshold; then, unless the study is refused,
    the stager on each head's crop, its energy score against the calibrated
    out-of-distribution threshold, temperature-scaled probabilities and the stage. A refused
    study is not staged at all; a head that fails a head gate gets no stage and no Grad-CAM.

    Stage rule: with ``calibration.early_threshold``, stage 0 when ``P(I) + P(II)`` is below it,
    else the likelier of I and II; without it, the arg-max.

    Args:
        image: the study as read (any orientation; intensities in scanner units after
            rescale), 3D.
        device: where the networks run; default CPU.
        gradcam_layer: stager module to explain; default ``stager.gradcam_layer``.
        calibration: the bundle's validation-chosen thresholds and temperature; None = no
            detector-score or out-of-distribution gate, temperature 1, arg-max stage.
        body_part: DICOM ``BodyPartExamined`` of the series, if any.
        gates: False skips the study and head gates (benchmarks and model tests only); a study
            with non-finite voxels is refused either way, and a head whose stager output is not
            finite is never staged (flag ``non_finite``).

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
    study_reasons: list[str] = list(check_finite_voxels(oriented).reasons)  # always: NaN passes no gate
    if gates:
        study_reasons += check_body_part(body_part).reasons + check_field_of_view(oriented).reasons
    detections = {}
    for side in SIDES:
        hemi, grid = resample_hemi(oriented, side, spec)
        with torch.no_grad():
            boxes, scores, low = decode_best_box(
                detector(torch.from_numpy(hemi)[None, None].float().to(device)), spatial_shape=hemi.shape
            )
        # the hemi grid can reach past the scan (a head at the edge of the field of view)
        box_lps = clip_box_to_image(box_voxel_to_lps(boxes[0].float().cpu().numpy(), grid), oriented)
        # a box wholly outside the scan clips to zero extent: nothing of it can be staged
        outside = not all(box_lps[i + 3] > box_lps[i] for i in range(3))
        detections[side] = (box_lps, float(scores[0]), bool(low[0]) or outside)
    if gates and not study_reasons:
        study_reasons += check_pair({s: d[0] for s, d in detections.items()}, oriented).reasons
    empty_map = None
    results = []
    for side in SIDES:
        box_lps, score, collapsed = detections[side]
        reasons, flags = list(study_reasons), ["refused"] if study_reasons else []
        threshold = calibration.detector_threshold if calibration is not None else None
        below = threshold is not None and score < threshold
        if collapsed:
            reasons.append("the detector found no box inside the scanned volume")
            flags.append("off_target")
        if gates:
            head = check_head(box_lps, oriented).reasons
            reasons += head
            if head and "off_target" not in flags:
                flags.append("off_target")
        if below and threshold is not None:
            reasons.append(f"detector score {score:.2f} is below the validation threshold {threshold:.2f}")
            flags.append("low_detector_score")
        if calibration is not None and calibration.fallback:
            # one site could have forced this (server/calibration.py gate_problem): without validated
            # detector and out-of-distribution gates the tool cannot judge a head, so it says so
            reasons.append(
                f"the coordinator refused this bundle's calibration ({calibration.fallback}): "
                "no validated detector or out-of-distribution gate, so the stage is withheld"
            )
            flags.append("uncalibrated")
        energy = probs = cam = crop_grid = None
        if not study_reasons and not collapsed:
            crop, crop_grid = resample_crop(oriented, box_lps, side, spec)
            x = torch.from_numpy(crop)[None, None].float().to(device)
            with torch.no_grad():
                logits = stager(x).float()[0].cpu().double()
            energy = float(-torch.logsumexp(logits, dim=0))
            temperature = calibration.temperature if calibration is not None else 1.0
            probs = torch.softmax(logits / temperature, dim=0).numpy()
            if not (np.isfinite(energy) and np.all(np.isfinite(probs))):  # fail closed: NaN passes no gate
                reasons.append("the stager's output is not finite (NaN or infinity); stage withheld")
                flags.append("non_finite")
            elif (
                calibration is not None
                and calibration.energy_threshold is not None
                and not energy < calibration.energy_threshold
            ):
                reasons.append(
                    f"out of distribution: energy score {energy:.2f} is at or above the validation "
                    f"threshold {calibration.energy_threshold:.2f}"
                )
                flags.append("out_of_distribution")
        if reasons or probs is None or crop_grid is None:  # crop_grid is set whenever probs is
            if empty_map is None:  # an all-zero map in the input study's geometry
                empty_map = sitk.Image(image.GetSize(), sitk.sitkFloat32)
                empty_map.CopyInformation(image)
            results.append(
                HeadResult(
                    side=side,
                    box_lps_mm=tuple(float(v) for v in box_lps),
                    detector_score=score,
                    low_confidence=collapsed or below,
                    stage_probabilities={},
                    predicted_stage=None,
                    gradcam=empty_map,
                    gradcam_volume_mm3=0.0,
                    not_assessed=tuple(reasons),
                    flags=tuple(flags),
                    study_reasons=tuple(study_reasons),
                    energy=energy,
                )
            )
            continue
        stage = _stage_from(probs, calibration)
        cam = stage_gradcam(stager, x, target_layer=gradcam_layer, class_index=int(stage))
        # Evidence outside the scanned volume (the zero-filled part of a crop at the edge of the
        # field of view) is not anatomy: the map is 0 there and not counted in the volume.
        cam = cam * field_of_view_mask(oriented, crop_grid)
        results.append(
            HeadResult(
                side=side,
                box_lps_mm=tuple(float(v) for v in box_lps),
                detector_score=score,
                low_confidence=collapsed or below,
                stage_probabilities={s.label: float(probs[int(s)]) for s in FicatArletStage},
                predicted_stage=stage.label,
                gradcam=to_grid(cam, crop_grid, image),
                gradcam_volume_mm3=float(
                    heatmap_volume_mm3(cam, crop_grid.spacing_dhw_mm, threshold=GRADCAM_VOLUME_THRESHOLD)
                ),
                crop_grid=crop_grid,
                gradcam_crop=cam,
                energy=energy,
                early_probability=float(probs[1] + probs[2]),
            )
        )
    return results
