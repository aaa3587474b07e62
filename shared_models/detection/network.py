"""3DC-YOLOX network: anchor-free 3D detector of the femoral head core area.

Source: Yang et al., Front. Surg. 2025 (doi:10.3389/fsurg.2025.1555749), section 2.4 ("3DC-YOLOX
locates the core area of the femoral head from the three-dimensional MRI volumetric data"). The
paper gives no architecture details beyond the name, so this package is a 3D reading of YOLOX
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

Box convention (``docs/CONVENTIONS.md``, :mod:`shared_models.detection.boxes`): voxel boxes ``(cz, cy, cx, d, h, w)`` in continuous
voxel-index units of the model input, voxel centres at integer indices. A grid cell ``i`` at
stride ``s`` covers input voxels ``i*s .. (i+1)*s-1``; its centre is ``(i + 0.5) * s - 0.5``.
Raw regression outputs ``t`` decode as::

    centre = (i + 0.5 + t_c) * s - 0.5          (YOLOX: (grid + t) * s, shifted to our voxel grid)
    size   = exp(clamp(t_s, -8, 8)) * s         (clamped so that exp never overflows, also under AMP)

Label assignment, loss and post-processing are the sibling modules
:mod:`~shared_models.detection.simota`, :mod:`~shared_models.detection.loss` and
:mod:`~shared_models.detection.decode`.

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

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.blocks import Convolution
from monai.networks.layers.factories import Conv

from shared_models.specs.models import DetectorConfig

__all__ = ["PRED_CHANNELS", "YOLOX3D"]

logger = logging.getLogger(__name__)

#: Raw log-size clamp (size = exp(t) * stride); exp(8) * 32 ~ 95k voxels, volume < 1e15 (float32-safe).
_MAX_LOG_SIZE = 8.0
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
    def _make_cells(level_shapes: Sequence[tuple[int, ...]], strides: Sequence[int]) -> torch.Tensor:
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

    def _update_cells(self, level_shapes: Sequence[tuple[int, ...]], device: torch.device) -> None:
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
        p = list(feats)  # p[-1] is the top level as it is; the others are replaced top-down
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
