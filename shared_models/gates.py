"""Can this study hold two femoral heads? Gates before and after the detector (issue 17 item 1).

A study that fails a *study* gate is ``refused``: no head is staged. A head that fails a
*head* gate is ``not assessed`` (its stage withheld) while the other head may still be staged.

Study gates, before the detector:

* DICOM ``BodyPartExamined``, where present, must name a region that contains the hips
  (:data:`HIP_BODY_PARTS`, DICOM PS3.16 CID 4031 code meanings written as the attribute
  holds them); e.g. ``BRAIN`` is refused. Absent or empty: no decision.
* Every voxel must be finite (no NaN or infinity).
* The field of view must be wide enough, left to right (LPS x extent of the scanned volume),
  to hold both femoral heads: :data:`MIN_FOV_LR_MM`; and tall enough (LPS z) to hold one:
  :data:`MIN_FOV_SI_MM`.

Study gates, after the detector: the two boxes lie one each side of the midline, and the
distance between their centres is within :data:`INTER_HEAD_MM`.

Head gates, after the detector: every edge of the box is within :data:`HEAD_BOX_MM`, and the
box does not touch the edge of the scanned volume (:data:`EDGE_MARGIN_MM`, or one voxel if
larger: the head is cut by the field of view).

Anatomy the limits come from (adults): femoral head diameter about 40-55 mm (Rubin et al.,
"The morphology of the proximal femur", J Bone Joint Surg Br 1992;74:28-32: mean about 43 mm
with a range of roughly 36-55 mm; larger in men); the distance between the two hip joint
centres about 150-210 mm (Harrington et al., "Prediction of the hip joint centre in adults,
children, and patients with cerebral palsy based on magnetic resonance imaging", J Biomech
2007;40:595-602, who measure it on MRI as the pelvic width used in their regressions). The
limits below are wider than those ranges by the detector's box error (about 10-15 mm). The
phantoms (``sim/phantoms/anatomy.py``) use head diameters of 44-52 mm and centres 170-200 mm apart,
inside every limit. A field of view of 250 mm left-right is the narrowest that holds two
heads 200 mm apart with 25 mm radius each; a brain study is about 140-180 mm wide.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from shared_models.preprocessing import image_bounds_lps, midline_x_mm

HIP_BODY_PARTS = frozenset(
    {
        "HIP",
        "HIPS",
        "PELVIS",
        "ABDOMENPELVIS",
        "ABDOMEN PELVIS",
        "WHOLEBODY",
        "WHOLE BODY",
        "LOWERLIMB",
        "LOWER LIMB",
        "LEG",
        "FEMUR",
        "THIGH",
        "PROSTATE",
        "BLADDER",
        "RECTUM",
        "SACRUM",
        "COCCYX",
        "BUTTOCK",
        "GLUTEAL REGION",
        "SIJOINT",
        "SI JOINT",
        "LSPINE",
        "LUMBAR SPINE",
    }
)
MIN_FOV_LR_MM = 250.0
MIN_FOV_SI_MM = 40.0
HEAD_BOX_MM = (28.0, 72.0)
INTER_HEAD_MM = (130.0, 240.0)
EDGE_MARGIN_MM = 2.0


@dataclass(frozen=True)
class GateResult:
    """``passed`` and, when not, the reasons (short, no patient data)."""

    reasons: tuple[str, ...] = ()

    @property
    def passed(self) -> bool:
        return not self.reasons


def check_body_part(body_part: str | None) -> GateResult:
    """Refuse a DICOM ``BodyPartExamined`` that names a region without hips; absent/empty passes."""
    value = (body_part or "").strip().upper()
    if not value or value in HIP_BODY_PARTS:
        return GateResult()
    return GateResult((f"DICOM BodyPartExamined is {value!r}, not a region that holds the hips",))


def check_field_of_view(oriented: sitk.Image) -> GateResult:
    """Refuse a scanned volume narrower than :data:`MIN_FOV_LR_MM` (LPS x) or shorter than :data:`MIN_FOV_SI_MM` (LPS z),
    or whose extent is not finite (NaN or infinite spacing, direction or origin)."""
    low, high = image_bounds_lps(oriented)
    with np.errstate(invalid="ignore"):  # inf - inf is NaN, refused below
        lr, si = float(high[0] - low[0]), float(high[2] - low[2])
    reasons = []
    if not np.isfinite(lr) or not np.isfinite(si):  # NaN compares False with everything: fail closed
        return GateResult(
            (
                f"field of view is not finite ({lr} mm left-right, {si} mm head-foot): "
                "non-finite voxel spacing, direction or origin",
            )
        )
    if lr < MIN_FOV_LR_MM:
        reasons.append(
            f"field of view {lr:.0f} mm left-right is too narrow to hold both femoral heads "
            f"(needs >= {MIN_FOV_LR_MM:.0f} mm)"
        )
    if si < MIN_FOV_SI_MM:
        reasons.append(
            f"field of view {si:.0f} mm head-foot is too short to hold a femoral head (needs >= {MIN_FOV_SI_MM:.0f} mm)"
        )
    return GateResult(tuple(reasons))


def check_finite_voxels(oriented: sitk.Image) -> GateResult:
    """Refuse a study with any non-finite voxel (NaN or infinity): the networks' outputs, and every
    comparison against a gate threshold, would be meaningless (NaN compares False with everything)."""
    if np.all(np.isfinite(sitk.GetArrayViewFromImage(oriented))):
        return GateResult()
    return GateResult(("the study has non-finite voxel values (NaN or infinity)",))


def _centre(box: npt.ArrayLike) -> np.ndarray:
    b = np.asarray(box, dtype=np.float64).reshape(6)
    return (b[:3] + b[3:]) / 2.0


def check_pair(boxes_lps_mm: Mapping[str, npt.ArrayLike], oriented: sitk.Image) -> GateResult:
    """Two heads, right (``"R"``, LPS -x) and left, one each side of the midline, centres within
    :data:`INTER_HEAD_MM` of each other.

    Args:
        boxes_lps_mm: side -> ``(x0, y0, z0, x1, y1, z1)`` mm.
        oriented: the study in LPS (for the midline).
    """
    if set(boxes_lps_mm) != {"R", "L"}:
        return GateResult((f"expected a right and a left head, got {sorted(boxes_lps_mm)}",))
    mid = midline_x_mm(oriented)
    right, left = _centre(boxes_lps_mm["R"]), _centre(boxes_lps_mm["L"])
    reasons = []
    if not (right[0] < mid < left[0]):
        reasons.append("the two boxes are not one each side of the midline")
    dist = float(np.linalg.norm(left - right))
    lo, hi = INTER_HEAD_MM
    if not (lo <= dist <= hi):
        reasons.append(f"the box centres are {dist:.0f} mm apart; adult femoral heads are {lo:.0f}-{hi:.0f} mm apart")
    return GateResult(tuple(reasons))


def check_head(box_lps_mm: npt.ArrayLike, oriented: sitk.Image) -> GateResult:
    """Box edges within :data:`HEAD_BOX_MM`; box not touching the edge of the scanned volume."""
    b = np.asarray(box_lps_mm, dtype=np.float64).reshape(6)
    size = b[3:] - b[:3]
    lo, hi = HEAD_BOX_MM
    reasons = []
    if size.min() < lo or size.max() > hi:
        reasons.append(
            f"box {size[0]:.0f} x {size[1]:.0f} x {size[2]:.0f} mm is not the size of a femoral head "
            f"({lo:.0f}-{hi:.0f} mm per edge)"
        )
    low, high = image_bounds_lps(oriented)
    margin = np.maximum(EDGE_MARGIN_MM, np.asarray(oriented.GetSpacing(), dtype=np.float64))  # LPS-oriented axes
    if np.any(b[:3] - low < margin) or np.any(high - b[3:] < margin):
        reasons.append("box touches the edge of the scanned volume (head cut by the field of view)")
    return GateResult(tuple(reasons))
