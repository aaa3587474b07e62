"""3D-MulDenseNet: Ficat-Arlet stager (0 / I / II) of a femoral-head crop, with MulPoolFusion.

Source: Yang et al., Front. Surg. 2025 (doi:10.3389/fsurg.2025.1555749), section 2.4 and
Figure 3 ("Architecture of the 3D transition multiPool module in the staging subnet"). The paper
says the MulPoolFusion module does "multi-scale analysis, thereby extracting both local and global
features of the femoral head" and that it is the transition of a 3D DenseNet (Huang et al. 2017,
arXiv:1608.06993). The figure itself is not in our text of the paper, so the module below is our
documented reading (see :class:`MulPoolFusion`).

The network is MONAI's 3D DenseNet (``monai.networks.nets.DenseNet``: same stem, MONAI
``_DenseBlock`` dense blocks, ``norm5``, same classifier and weight initialisation) with every
transition replaced by :class:`MulPoolFusion` (``transition="mulpool"``) or kept as MONAI's
``_Transition`` (``transition="plain"``, the ablation). Module names match MONAI's DenseNet, so
Grad-CAM targets such as ``features.denseblock3.denselayer4.layers.conv2`` read the same.

This network is non-deterministic on CUDA (3D convolutions; see
``torch.use_deterministic_algorithms``).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.networks.layers.factories import Conv, Dropout, Pool
from monai.networks.layers.utils import get_act_layer, get_norm_layer
from monai.networks.nets.densenet import _DenseBlock, _Transition

from shared_models.config_dict import int_tuple
from shared_models.specs.models import FUSION_MODES, StagerConfig  # home: specs; keeps the old path

__all__ = ["StagerConfig", "MulPoolFusion", "MulDenseNet3D"]

logger = logging.getLogger(__name__)


class _AvgPoolExcludePad(nn.Module):
    """Average pooling (kernel ``k``, stride 2, padding ``p``) that averages valid voxels only.

    Same result as ``AvgPool3d(k, 2, p, count_include_pad=False)``, but also for inputs smaller
    than the kernel (PyTorch's average pooling refuses those): the input is zero-padded
    explicitly and the window sum is divided by the number of valid voxels in it.
    """

    def __init__(self, spatial_dims: int, kernel_size: int, padding: int) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.padding = padding
        self.pool = Pool[Pool.AVG, spatial_dims](kernel_size=kernel_size, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad = (self.padding,) * (2 * self.spatial_dims)
        ones = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
        return self.pool(F.pad(x, pad)) / self.pool(F.pad(ones, pad))


class MulPoolFusion(nn.Module):
    """3D transition multi-pool module, our reading of the paper's Figure 3 (section 2.4).

    The paper's transition "multiPool" module replaces DenseNet's transition (BN-ReLU-1x1 conv-
    2x2 average pooling) to analyse several scales. We read it as:

    1. ``norm -> relu -> conv`` (BN-ReLU-1x1x1 conv, ``in_channels -> out_channels``), as in the
       DenseNet transition (channel compression).
    2. For every scale ``s`` in ``pool_scales``, two parallel branches ``max_s{s}`` and
       ``avg_s{s}``: 3D max / average pooling with kernel ``2s + 1``, stride 2, padding ``s``
       (the average counts valid voxels only, also when the input is smaller than the
       kernel), each followed by a 1x1x1 conv ``out_channels -> out_channels``.
       Every window is centred on input voxel ``2j``, so all branches output
       ``ceil(n / 2)`` voxels per axis for an input of ``n`` (also for ``n = 1``) and align
       voxel for voxel. Small ``s`` keeps local detail, large ``s`` gathers wider context
       ("local and global features").
    3. Fusion: ``"concat"`` concatenates the ``2 * len(pool_scales)`` branches and a 1x1x1 conv
       (``fuse``) maps them back to ``out_channels``; ``"sum"`` adds the branch outputs.

    No norm/activation follows the fusion, because the next dense layer starts with BN-ReLU
    (pre-activation DenseNet).

    Args:
        spatial_dims: number of spatial dimensions (3 for MRI; 1-3 work).
        in_channels: input channels.
        out_channels: output channels.
        pool_scales: distinct positive scales ``s`` (kernel ``2s + 1``).
        fusion: ``"concat"`` or ``"sum"``.
        act: activation (MONAI factory name/args). Default ReLU.
        norm: normalisation (MONAI factory name/args). Default batch norm.

    Input ``(B, in_channels, *spatial)`` -> output ``(B, out_channels, *ceil(spatial / 2))``.

    Raises:
        ValueError: bad ``fusion`` or ``pool_scales``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        pool_scales: Sequence[int] = (1, 2, 4),
        fusion: str = "concat",
        act: str | tuple = ("relu", {"inplace": True}),
        norm: str | tuple = "batch",
    ) -> None:
        super().__init__()
        if fusion not in FUSION_MODES:
            raise ValueError(f"fusion: expected one of {FUSION_MODES}, got {fusion!r}")
        scales = int_tuple("pool_scales", pool_scales)
        if len(set(scales)) != len(scales):
            raise ValueError(f"pool_scales: values must be distinct, got {scales}")
        conv_type = Conv[Conv.CONV, spatial_dims]
        max_type = Pool[Pool.MAX, spatial_dims]
        self.fusion = fusion
        self.norm = get_norm_layer(name=norm, spatial_dims=spatial_dims, channels=in_channels)
        self.relu = get_act_layer(name=act)
        self.conv = conv_type(in_channels, out_channels, kernel_size=1, bias=False)
        branches: OrderedDict[str, nn.Module] = OrderedDict()
        for s in scales:
            k = 2 * s + 1
            branches[f"max_s{s}"] = nn.Sequential(
                OrderedDict(
                    [
                        ("pool", max_type(kernel_size=k, stride=2, padding=s)),
                        ("conv", conv_type(out_channels, out_channels, kernel_size=1, bias=False)),
                    ]
                )
            )
            branches[f"avg_s{s}"] = nn.Sequential(
                OrderedDict(
                    [
                        ("pool", _AvgPoolExcludePad(spatial_dims, kernel_size=k, padding=s)),
                        ("conv", conv_type(out_channels, out_channels, kernel_size=1, bias=False)),
                    ]
                )
            )
        self.branches = nn.ModuleDict(branches)
        self.fuse = (
            conv_type(len(branches) * out_channels, out_channels, kernel_size=1, bias=False)
            if fusion == "concat"
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(self.relu(self.norm(x)))
        outs = [branch(y) for branch in self.branches.values()]
        if self.fuse is not None:
            return self.fuse(torch.cat(outs, dim=1))
        return torch.stack(outs, dim=0).sum(dim=0)


def standardise_crop(x: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Per-sample, per-channel standardisation of a ``(B, C, D, H, W)`` batch, ``(x - mean) / std`` over the
    voxels (population std): MONAI ``NormalizeIntensity(channel_wise=True)``'s formula inside the graph, so
    that training, evaluation, inference, Grad-CAM and a MONAI export all apply it. A crop whose std is at
    most ``eps`` (flat: no tissue contrast to standardise, e.g. outside the study) becomes 0 rather than
    amplified rounding noise; windowed crops in [0, 1] have a std near 0.1. Same shape and dtype as ``x``."""
    mean = x.mean(dim=(2, 3, 4), keepdim=True)
    std = x.std(dim=(2, 3, 4), keepdim=True, unbiased=False)
    return torch.where(std > eps, (x - mean) / std.clamp_min(eps), torch.zeros_like(x))


class MulDenseNet3D(nn.Module):
    """3D-MulDenseNet stager (paper section 2.4, Figure 3), logits for Ficat-Arlet 0 / I / II.

    Layout (names as in MONAI ``DenseNet``): ``features.conv0`` (7x7x7, stride 2), ``norm0``,
    ``relu0``, ``pool0`` (3x3x3 max, stride 2; if ``stem_pool``), then ``denseblock{i}`` (MONAI
    ``_DenseBlock``) and ``transition{i}`` (:class:`MulPoolFusion` halving channels and, rounding
    up, every spatial size; or MONAI ``_Transition``), ``norm5``; ``class_layers``: ReLU, global
    average pooling, flatten, dropout (if ``dropout_prob > 0``), linear ``out``.

    Args:
        config: architecture; defaults to the small CPU-trainable :class:`StagerConfig`.

    Input ``(B, in_channels, D, H, W)`` float32 crop (any size with the ``"mulpool"``
    transition; the default 32^3 and 16^3 both work). Output ``(B, out_channels)`` float logits.

    ``gradcam_layer`` names the last 3D convolution (``conv2`` of the last dense layer of the
    last block), the layer the paper's Grad-CAM reads (section 2.4). It depends on
    ``block_config``, so it is a per-instance property, not a class constant.
    """

    def __init__(self, config: StagerConfig = StagerConfig()) -> None:
        super().__init__()
        if not isinstance(config, StagerConfig):
            raise TypeError(f"config must be a StagerConfig, got {type(config).__name__}")
        self.config = config
        sd = 3
        act = ("relu", {"inplace": True})
        norm = "batch"
        conv_type = Conv[Conv.CONV, sd]
        layers: list[tuple[str, nn.Module]] = [
            (
                "conv0",
                conv_type(config.in_channels, config.init_features, kernel_size=7, stride=2, padding=3, bias=False),
            ),
            ("norm0", get_norm_layer(name=norm, spatial_dims=sd, channels=config.init_features)),
            ("relu0", get_act_layer(name=act)),
        ]
        if config.stem_pool:
            layers.append(("pool0", Pool[Pool.MAX, sd](kernel_size=3, stride=2, padding=1)))
        self.features = nn.Sequential(OrderedDict(layers))
        channels = config.init_features
        n_blocks = len(config.block_config)
        for i, n_layers in enumerate(config.block_config):
            self.features.add_module(
                f"denseblock{i + 1}",
                _DenseBlock(
                    spatial_dims=sd,
                    layers=n_layers,
                    in_channels=channels,
                    bn_size=config.bn_size,
                    growth_rate=config.growth_rate,
                    dropout_prob=config.dropout_prob,
                    act=act,
                    norm=norm,
                ),
            )
            channels += n_layers * config.growth_rate
            if i == n_blocks - 1:
                self.features.add_module("norm5", get_norm_layer(name=norm, spatial_dims=sd, channels=channels))
            else:
                out = channels // 2
                if config.transition == "mulpool":
                    trans: nn.Module = MulPoolFusion(
                        sd, channels, out, pool_scales=config.pool_scales, fusion=config.fusion, act=act, norm=norm
                    )
                else:
                    trans = _Transition(sd, in_channels=channels, out_channels=out, act=act, norm=norm)
                self.features.add_module(f"transition{i + 1}", trans)
                channels = out
        head: list[tuple[str, nn.Module]] = [
            ("relu", get_act_layer(name=act)),
            ("pool", Pool[Pool.ADAPTIVEAVG, sd](1)),
            ("flatten", nn.Flatten(1)),
        ]
        if config.dropout_prob > 0:
            head.append(("dropout", Dropout[Dropout.DROPOUT, 1](config.dropout_prob)))
        head.append(("out", nn.Linear(channels, config.out_channels)))
        self.class_layers = nn.Sequential(OrderedDict(head))
        self.num_features = channels

        # Same initialisation as MONAI DenseNet.
        for m in self.modules():
            if isinstance(m, conv_type):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.constant_(m.bias, 0)

    @property
    def gradcam_layer(self) -> str:
        """Module name of the last 3D conv layer, e.g. ``features.denseblock3.denselayer4.layers.conv2``."""
        n = len(self.config.block_config)
        return f"features.denseblock{n}.denselayer{self.config.block_config[-1]}.layers.conv2"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, in_channels, D, H, W)`` -> ``(B, out_channels)`` logits."""
        if x.ndim != 5 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected input (B, {self.config.in_channels}, D, H, W), got {tuple(x.shape)}")
        if self.config.input_norm == "crop":
            x = standardise_crop(x)
        return self.class_layers(self.features(x))
