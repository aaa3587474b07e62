"""3DC-YOLOX, the femoral-head detector (Yang et al., Front. Surg. 2025, section 2.4), read as a 3D
YOLOX (Ge et al. 2021, arXiv:2107.08430), one module per concern as in MONAI's detection app
(``monai.apps.detection``: networks, box utilities, matching, losses, inference):

* :mod:`~shared_models.detection.network`: the network :class:`YOLOX3D` (backbone, PAFPN neck,
  decoupled head, box decoding of each grid cell); its constructor arguments are
  :class:`shared_models.specs.DetectorConfig`.
* :mod:`~shared_models.detection.boxes`: the ``(cz, cy, cx, d, h, w)`` voxel box convention,
  :func:`box_iou_3d` and :func:`nms_3d` (MONAI ``box_utils``).
* :mod:`~shared_models.detection.simota`: SimOTA label assignment (:func:`center_prior`,
  :func:`simota_assign`).
* :mod:`~shared_models.detection.loss`: the training loss :func:`detector_loss`.
* :mod:`~shared_models.detection.decode`: post-processing to one box per hemi-volume,
  :func:`decode_best_box`.

Import the public names from this package. Inside it, imports go one way only (an import-linter
contract in ``pyproject.toml`` checks it): ``boxes`` and ``network`` import no sibling, ``simota``
imports ``boxes``, and ``loss`` and ``decode`` import the modules below them.
"""

from __future__ import annotations

from shared_models.detection.boxes import box_iou_3d, nms_3d
from shared_models.detection.decode import decode_best_box
from shared_models.detection.loss import detector_loss
from shared_models.detection.network import PRED_CHANNELS, YOLOX3D
from shared_models.detection.simota import CENTER_RADIUS, center_prior, simota_assign

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
