"""3DC-YOLOX: anchor-free 3D detector of the femoral head core area.

Source: Yang et al., Front. Surg. 2025 (doi:10.3389/fsurg.2025.1555749), section 2.4 ("3DC-YOLOX
locates the core area of the femoral head from the three-dimensional MRI volumetric data"). The
paper gives no architecture details beyond the name, so this module is a 3D reading of YOLOX
(Ge et al. 2021, "YOLOX: Exceeding YOLO Series in 2021", arXiv:2107.08430):

* **Backbone**: a small CSP-Darknet in 3D. Conv-BN-SiLU stem (stride 2), then one stage per entry
  of ``depths``: a strided 3x3x3 Conv-BN-SiLU (stride 2) followed by a CSP layer of ``depths[i]``
  bottlenecks (YOLOX ``CSPLayer``). Stage ``i`` (0-based) has output stride ``2 ** (i + 2)``.
  YOLOX's Focus stem and SPP are left out (the hemi-volume is only 32 voxels deep).
* **Neck**: YOLOX PAFPN generalised to ``len(strides)`` levels: top-down path (1x1x1 lateral conv,
  nearest upsampling, concat, CSP) then bottom-up path (3x3x3 stride-2 conv, concat, CSP).
* **Head**: YOLOX decoupled head per level: 1x1x1 stem, a classification branch (2x Conv 3x3x3 ->
  class logit) and a regression branch (2x Conv 3x3x3 -> 6 box numbers and the objectness logit).
  Anchor-free, one prediction per grid cell.

Box convention (``docs/CONVENTIONS.md``): voxel boxes ``(cz, cy, cx, d, h, w)`` in continuous
voxel-index units of the model input, voxel centres at integer indices. A grid cell ``i`` at
stride ``s`` covers input voxels ``i*s .. (i+1)*s-1``; its centre is ``(i + 0.5) * s - 0.5``.
Raw regression outputs ``t`` decode as::

    centre = (i + 0.5 + t_c) * s - 0.5          (YOLOX: (grid + t) * s, shifted to our voxel grid)
    size   = exp(clamp(t_s, -8, 8)) * s         (clamped so that exp never overflows, also under AMP)

Label assignment (training): YOLOX SimOTA (arXiv:2107.08430, section 2.2 "SimOTA") for the one
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

Loss (``detector_loss``), normalised by the number of positives as in YOLOX:
``5 * GIoU + BCE(obj, all cells) + BCE(cls, positives; target = IoU of the prediction, YOLOX's
IoU-aware class target) + l1_weight * L1`` (L1 on the raw-parameter scale: centre offset in
strides and log-size). GIoU is MONAI ``BoxGIoULoss`` on corner boxes.

Post-processing (``decode_best_box``): ``score = sigmoid(obj) * sigmoid(cls)``, score threshold,
3D NMS (MONAI ``non_max_suppression``), and exactly one box per hemi-volume (each half holds one
femoral head): the top box; when nothing passes the threshold (default 0: only the validation-
calibrated threshold of ``shared_models.calibration`` means anything) the best box is returned
anyway and flagged ``low_confidence``. Non-finite predictions (e.g. from a NaN input) are sanitised rather
than raised: such a box sits at the origin with sizes 1e-3 and is flagged ``low_confidence``.

Initialisation: objectness and class biases at YOLOX's prior ``-log((1 - 0.01) / 0.01)``; the
regression layer is ``N(0, 0.01)`` with zero bias (a deviation from YOLOX's default init) so that
every cell starts as a stride-sized cube at its own centre and SimOTA's IoU cost is informative
from the first step (one GT per image leaves few candidates; in our one-sample overfit check the
loss fell about twice as far in 30 steps with this init).

This network is non-deterministic on CUDA (3D convolutions; see
``torch.use_deterministic_algorithms``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.data.box_utils import box_iou, convert_box_mode, non_max_suppression
from monai.losses import BoxGIoULoss
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Conv

from shared_models.specs.models import DetectorConfig  # its home is specs; this import keeps the old path

__all__ = [
    "DetectorConfig",
    "YOLOX3D",
    "box_iou_3d",
    "center_prior",
    "simota_assign",
    "detector_loss",
    "decode_best_box",
]

logger = logging.getLogger(__name__)

#: Box mode strings for ``monai.data.box_utils``. MONAI names the axes x, y, z; we feed our array
#: axes (D, H, W) in that order, so ``(cz, cy, cx, d, h, w)`` is MONAI's "cccwhd" and the corner
#: form is ``(z0, y0, x0, z1, y1, x1)`` ("xyzxyz"). IoU/GIoU do not depend on axis names.
_CENTER_MODE = "cccwhd"
_CORNER_MODE = "xyzxyz"
#: Raw log-size clamp (size = exp(t) * stride); exp(8) * 32 ~ 95k voxels, volume < 1e15 (float32-safe).
_MAX_LOG_SIZE = 8.0
#: YOLOX centre-prior radius in strides.
CENTER_RADIUS = 2.5
#: YOLOX prior probability used to initialise the objectness and class biases.
_PRIOR_PROB = 0.01
#: Number of predicted channels per cell: 6 box numbers, objectness logit, class logit.
PRED_CHANNELS = 8


# ----------------------------------------------------------------------------------------------
# Building blocks (MONAI Convolution = Conv-BN-SiLU)
# ----------------------------------------------------------------------------------------------
def _cbs(in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1) -> Convolution:
    """Conv3d-BatchNorm-SiLU (YOLOX ``BaseConv``) from MONAI's ``Convolution`` block."""
    return Convolution(
        spatial_dims=3,
        in_channels=in_ch,
        out_channels=out_ch,
        strides=stride,
        kernel_size=kernel_size,
        act=(nn.SiLU, {}),
        norm="batch",
        bias=False,
    )


class _Bottleneck(nn.Module):
    """YOLOX ``Bottleneck``: 1x1x1 then 3x3x3 Conv-BN-SiLU, optional residual."""

    def __init__(self, channels: int, shortcut: bool = True) -> None:
        super().__init__()
        self.conv1 = _cbs(channels, channels, 1)
        self.conv2 = _cbs(channels, channels, 3)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(self.conv1(x))
        return x + y if self.shortcut else y


class _CSPLayer(nn.Module):
    """YOLOX ``CSPLayer`` (Cross Stage Partial, Wang et al. 2020, arXiv:1911.11929) in 3D."""

    def __init__(self, in_ch: int, out_ch: int, n: int = 1, shortcut: bool = True) -> None:
        super().__init__()
        hidden = max(out_ch // 2, 1)
        self.conv1 = _cbs(in_ch, hidden, 1)
        self.conv2 = _cbs(in_ch, hidden, 1)
        self.m = nn.Sequential(*[_Bottleneck(hidden, shortcut) for _ in range(n)])
        self.conv3 = _cbs(2 * hidden, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv3(torch.cat([self.m(self.conv1(x)), self.conv2(x)], dim=1))


class _DecoupledHead(nn.Module):
    """YOLOX decoupled head for one level: separate cls and reg(+obj) branches."""

    def __init__(self, in_ch: int, width: int) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, 3]
        self.stem = _cbs(in_ch, width, 1)
        self.cls_convs = nn.Sequential(_cbs(width, width, 3), _cbs(width, width, 3))
        self.reg_convs = nn.Sequential(_cbs(width, width, 3), _cbs(width, width, 3))
        self.cls_pred = conv(width, 1, kernel_size=1)
        self.reg_pred = conv(width, 6, kernel_size=1)
        self.obj_pred = conv(width, 1, kernel_size=1)
        prior_bias = -math.log((1.0 - _PRIOR_PROB) / _PRIOR_PROB)
        for layer in (self.cls_pred, self.obj_pred):
            nn.init.constant_(layer.bias, prior_bias)
        # Start every cell near "stride-sized cube at the cell centre" (raw ~ 0) so that SimOTA's
        # IoU cost is informative from the first step (one GT per image gives few candidates).
        nn.init.normal_(self.reg_pred.weight, std=0.01)
        nn.init.zeros_(self.reg_pred.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return raw ``(B, 8, d, h, w)``: 6 box numbers, objectness logit, class logit."""
        x = self.stem(x)
        cls_feat = self.cls_convs(x)
        reg_feat = self.reg_convs(x)
        return torch.cat([self.reg_pred(reg_feat), self.obj_pred(reg_feat), self.cls_pred(cls_feat)], dim=1)


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------
class YOLOX3D(nn.Module):
    """3DC-YOLOX detector (paper section 2.4; YOLOX arXiv:2107.08430), see the module docstring.

    Args:
        config: architecture; defaults to the small CPU-trainable :class:`DetectorConfig`.

    Input ``x``: ``(B, in_channels, D, H, W)`` float32 (float16 under autocast), the windowed
    hemi-volume in ``[0, 1]``; the paper's ``(B, 1, 32, 112, 64)``, any size works.

    Output: ``(B, N_cells, 8)`` float32 (also under autocast), cells of all levels concatenated from
    the finest stride up, each level in C order over ``(d, h, w)``: ``[cz, cy, cx, d, h, w]``
    decoded in input voxels, objectness logit, class logit. After each forward, the non-persistent
    buffer ``cells`` holds the matching ``(N_cells, 4)`` float32 ``[cz, cy, cx, stride]`` of each
    cell centre (voxels); pass it to :func:`detector_loss`. ``cells`` is not part of the state
    dict, so it never travels with the weights.
    """

    def __init__(self, config: DetectorConfig = DetectorConfig()) -> None:
        super().__init__()
        if not isinstance(config, DetectorConfig):
            raise TypeError(f"config must be a DetectorConfig, got {type(config).__name__}")
        self.config = config
        w, d = config.widths, config.depths
        self.stem = _cbs(config.in_channels, w[0], 3, 2)
        self.stages = nn.ModuleList(
            nn.Sequential(_cbs(w[i], w[i + 1], 3, 2), _CSPLayer(w[i + 1], w[i + 1], d[i], shortcut=True))
            for i in range(len(d))
        )
        c = config.level_channels
        n_levels = len(c)
        # PAFPN: top-down (lateral + CSP) then bottom-up (downsample + CSP).
        self.lateral_convs = nn.ModuleList(_cbs(c[i + 1], c[i], 1) for i in range(n_levels - 1))
        self.td_csps = nn.ModuleList(_CSPLayer(2 * c[i], c[i], 1, shortcut=False) for i in range(n_levels - 1))
        self.downsample_convs = nn.ModuleList(_cbs(c[i - 1], c[i - 1], 3, 2) for i in range(1, n_levels))
        self.bu_csps = nn.ModuleList(_CSPLayer(c[i - 1] + c[i], c[i], 1, shortcut=False) for i in range(1, n_levels))
        self.heads = nn.ModuleList(_DecoupledHead(ch, config.head_width) for ch in c)
        self.register_buffer("cells", torch.zeros(0, 4), persistent=False)
        self._cells_key: tuple | None = None

    # -- geometry -----------------------------------------------------------------------------
    @staticmethod
    def _make_cells(level_shapes: Sequence[tuple[int, int, int]], strides: Sequence[int]) -> torch.Tensor:
        parts = []
        for (fd, fh, fw), s in zip(level_shapes, strides):
            zz, yy, xx = torch.meshgrid(
                torch.arange(fd, dtype=torch.float32),
                torch.arange(fh, dtype=torch.float32),
                torch.arange(fw, dtype=torch.float32),
                indexing="ij",
            )
            centres = (torch.stack([zz, yy, xx], dim=-1).reshape(-1, 3) + 0.5) * s - 0.5
            parts.append(torch.cat([centres, torch.full((centres.shape[0], 1), float(s))], dim=1))
        return torch.cat(parts, dim=0)

    def cell_geometry(self, spatial_shape: Sequence[int]) -> torch.Tensor:
        """Cell centres and strides for an input of ``spatial_shape = (D, H, W)`` voxels.

        Returns:
            ``(N_cells, 4)`` float32 ``[cz, cy, cx, stride]`` in voxels, on the model's device,
            in the order of :meth:`forward`'s cells. Feature size at stride ``2**k`` is ``D``
            halved ``k`` times with rounding up (3x3x3 stride-2 convs with padding 1).
        """
        shapes = []
        for s in self.config.strides:
            size = [int(n) for n in spatial_shape]
            for _ in range(int(math.log2(s))):
                size = [(n + 1) // 2 for n in size]
            shapes.append(tuple(size))
        return self._make_cells(shapes, self.config.strides).to(self.cells.device)

    def _update_cells(self, level_shapes: list[tuple[int, int, int]], device: torch.device) -> None:
        key = (tuple(level_shapes), str(device))
        if key != self._cells_key:
            self.cells = self._make_cells(level_shapes, self.config.strides).to(device)
            self._cells_key = key

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Predict one decoded box per grid cell; see the class docstring for shapes."""
        if x.ndim != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected input (B, {self.config.in_channels}, D, H, W), got {tuple(x.shape)}")
        feats = []
        y = self.stem(x)
        for stage in self.stages:
            y = stage(y)
            feats.append(y)
        feats = feats[-len(self.config.strides) :]
        n_levels = len(feats)
        # top-down
        p: list[torch.Tensor] = [None] * n_levels  # type: ignore[list-item]
        p[-1] = feats[-1]
        for i in range(n_levels - 2, -1, -1):
            up = F.interpolate(self.lateral_convs[i](p[i + 1]), size=feats[i].shape[2:], mode="nearest")
            p[i] = self.td_csps[i](torch.cat([up, feats[i]], dim=1))
        # bottom-up
        outs = [p[0]]
        for i in range(1, n_levels):
            down = self.downsample_convs[i - 1](outs[-1])
            outs.append(self.bu_csps[i - 1](torch.cat([down, p[i]], dim=1)))
        raw = [head(o).float().flatten(2).transpose(1, 2) for head, o in zip(self.heads, outs)]  # (B, n_l, 8)
        self._update_cells([tuple(o.shape[2:]) for o in outs], x.device)
        raw_all = torch.cat(raw, dim=1)
        cells = self.cells
        stride = cells[:, 3:4]
        centre = (cells[:, :3] + 0.5) / stride + raw_all[..., 0:3]  # in strides, i + 0.5 + t
        centre = centre * stride - 0.5
        size = torch.exp(raw_all[..., 3:6].clamp(-_MAX_LOG_SIZE, _MAX_LOG_SIZE)) * stride
        return torch.cat([centre, size, raw_all[..., 6:8]], dim=-1)


# ----------------------------------------------------------------------------------------------
# Boxes
# ----------------------------------------------------------------------------------------------
def _to_corners(boxes: torch.Tensor) -> torch.Tensor:
    """``(N, 6)`` czyxdhw -> MONAI standard corners ``(z0, y0, x0, z1, y1, x1)`` (differentiable)."""
    if boxes.shape[0] == 0:
        return boxes.reshape(0, 6)
    return convert_box_mode(boxes, src_mode=_CENTER_MODE, dst_mode=_CORNER_MODE)


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
        out = box_iou(_to_corners(b1), _to_corners(b2))
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
    return non_max_suppression(_to_corners(boxes), scores, nms_thresh=iou_threshold, max_proposals=max_proposals)


def _pair_iou(pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """IoU of ``(N, 6)`` boxes against one ``(6,)`` box -> ``(N,)`` (no validity checks; float32)."""
    p0, p1 = pred[:, :3] - pred[:, 3:] / 2, pred[:, :3] + pred[:, 3:] / 2
    g0, g1 = gt[:3] - gt[3:] / 2, gt[:3] + gt[3:] / 2
    inter = (torch.minimum(p1, g1) - torch.maximum(p0, g0)).clamp(min=0).prod(dim=1)
    union = pred[:, 3:].prod(dim=1) + gt[3:].prod() - inter
    return inter / union.clamp(min=torch.finfo(torch.float32).eps)


# ----------------------------------------------------------------------------------------------
# Assignment (SimOTA)
# ----------------------------------------------------------------------------------------------
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
        pred: ``(N, 8)`` decoded predictions of one image (see :class:`YOLOX3D`), any float dtype.
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
        ious[idx] = _pair_iou(boxes[idx : idx + 1], gt_box)[0]
        return positive, ious
    cand_idx = candidate.nonzero(as_tuple=True)[0]
    cand_iou = _pair_iou(boxes[cand_idx], gt_box)
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


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------
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
        pred: ``(B, N, 8)`` output of :class:`YOLOX3D`.
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
    giou = _GIOU(_to_corners(pos_pred[:, :6]), _to_corners(gt_rep))
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


# ----------------------------------------------------------------------------------------------
# Post-processing
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def decode_best_box(
    pred: torch.Tensor,
    score_threshold: float = 0.0,
    nms_iou: float = 0.5,
    spatial_shape: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exactly one femoral-head box per hemi-volume from :class:`YOLOX3D` output.

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
        pred: ``(B, N, 8)`` output of :class:`YOLOX3D`.
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
