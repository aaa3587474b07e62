"""The model and preprocessing configurations: plain frozen dataclasses, no torch, MONAI or SimpleITK.

:class:`DetectorConfig` builds :class:`shared_models.detection.YOLOX3D`, :class:`StagerConfig` builds
:class:`shared_models.stager.MulDenseNet3D`, and :class:`PreprocessingSpec` holds every number of
:mod:`shared_models.preprocessing`. All three are recorded in every model bundle and validated on
construction (a bad value raises ``ValueError`` naming the key), so reading a run config or a bundle
needs none of the heavy libraries.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from shared_models.config_dict import DictConfig, finite_number, int_tuple, positive_int, positive_triple

__all__ = ["FUSION_MODES", "INPUT_NORMS", "TRANSITIONS", "DetectorConfig", "PreprocessingSpec", "StagerConfig"]


@dataclass(frozen=True)
class PreprocessingSpec:
    """Every number of the preprocessing; saved inside every model bundle.

    Attributes:
        version: preprocessing version; bump it when the meaning of any step changes
            (it is part of the site cache key).
        orientation: patient frame every study is reoriented to; only ``"LPS"``.
        hemi_shape: detector input size ``(D, H, W)`` in voxels.
        hemi_fov_mm: physical extent of the hemi grid ``(D, H, W)`` in mm
            (= ``(z, y, x)`` extents).
        window_level: window centre in scanner intensity units.
        window_width: window width; intensities are clipped to
            ``[level - width/2, level + width/2]`` and scaled to ``[0, 1]``.
        crop_shape: stager input size ``(D, H, W)`` in voxels.
        crop_margin_mm: margin added on every side of the femoral head box before cropping.

    Direct construction and :meth:`from_dict` validate every field and raise
    ``ValueError`` naming the bad key.
    """

    version: int = 1
    orientation: str = "LPS"
    hemi_shape: tuple[int, int, int] = (32, 112, 64)
    hemi_fov_mm: tuple[float, float, float] = (128.0, 224.0, 160.0)
    window_level: float = 300.0
    window_width: float = 1500.0
    crop_shape: tuple[int, int, int] = (32, 32, 32)
    crop_margin_mm: float = 8.0

    def __post_init__(self) -> None:
        if isinstance(self.version, bool) or not isinstance(self.version, (int, np.integer)) or self.version < 1:
            raise ValueError(f"version must be an integer >= 1, got {self.version!r}")
        if self.orientation != "LPS":
            raise ValueError(f"orientation must be 'LPS', got {self.orientation!r}")
        object.__setattr__(self, "version", int(self.version))
        object.__setattr__(self, "hemi_shape", positive_triple(self.hemi_shape, "hemi_shape", int))
        object.__setattr__(self, "hemi_fov_mm", positive_triple(self.hemi_fov_mm, "hemi_fov_mm", float))
        object.__setattr__(self, "window_level", finite_number(self.window_level, "window_level"))
        width = finite_number(self.window_width, "window_width")
        if width <= 0:
            raise ValueError(f"window_width must be > 0, got {self.window_width!r}")
        object.__setattr__(self, "window_width", width)
        object.__setattr__(self, "crop_shape", positive_triple(self.crop_shape, "crop_shape", int))
        margin = finite_number(self.crop_margin_mm, "crop_margin_mm")
        if margin < 0:
            raise ValueError(f"crop_margin_mm must be >= 0, got {self.crop_margin_mm!r}")
        object.__setattr__(self, "crop_margin_mm", margin)

    @property
    def hemi_spacing_mm(self) -> tuple[float, float, float]:
        """Hemi grid voxel spacing ``(D, H, W)`` in mm (default ``(4.0, 2.0, 2.5)``)."""
        (fov_d, fov_h, fov_w), (n_d, n_h, n_w) = self.hemi_fov_mm, self.hemi_shape
        return fov_d / n_d, fov_h / n_h, fov_w / n_w

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessingSpec:
        """Build and validate a spec from :meth:`to_dict` output.

        Every field must be present (a bundle must not silently fall back to defaults)
        and no unknown key is accepted.

        Raises:
            ValueError: naming the missing, unknown or invalid key.
        """
        if not isinstance(d, dict):
            raise ValueError(f"preprocessing spec must be a dict, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in names:
                raise ValueError(f"unknown preprocessing spec key {key!r}")
        for key in names:
            if key not in d:
                raise ValueError(f"preprocessing spec key {key!r} is missing")
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(**values)  # __post_init__ checks each value's type


@dataclass(frozen=True)
class DetectorConfig(DictConfig):
    """Constructor arguments of :class:`YOLOX3D` (recorded in every model bundle).

    Attributes:
        in_channels: input channels (1: windowed T2 MRI).
        widths: channels of the stem followed by one entry per backbone stage
            (``len(widths) == len(depths) + 1``); every value >= 2.
        depths: CSP bottlenecks per backbone stage. Stage ``i`` has output stride ``2 ** (i + 2)``.
        strides: output strides of the FPN/PAN levels used by the head. Must be the last
            ``len(strides)`` stage strides (e.g. ``(8, 16)`` for three stages, i.e. the deepest
            stage is always used); 1 to 3 levels.
        head_width: channels of the decoupled head.

    ``PAPER`` is a YOLOX-s-like preset (YOLOX-s: width 0.50, depth 0.33, three levels 8/16/32);
    the paper does not publish its widths, so this is our documented reading.

    Raises:
        ValueError: on construction or ``from_dict`` with a bad value; the message names the key.
    """

    in_channels: int = 1
    widths: tuple[int, ...] = (8, 16, 32, 64)
    depths: tuple[int, ...] = (1, 1, 1)
    strides: tuple[int, ...] = (8, 16)
    head_width: int = 32

    PAPER: ClassVar[DetectorConfig]

    def __post_init__(self) -> None:
        object.__setattr__(self, "in_channels", positive_int("in_channels", self.in_channels))
        widths = int_tuple("widths", self.widths, min_value=2)
        depths = int_tuple("depths", self.depths, min_value=1)
        strides = int_tuple("strides", self.strides, min_value=1)
        if len(widths) != len(depths) + 1:
            raise ValueError(
                f"widths: expected len(depths) + 1 = {len(depths) + 1} values (stem + one per stage), got {len(widths)}"
            )
        stage_strides = tuple(2 ** (i + 2) for i in range(len(depths)))
        if not 1 <= len(strides) <= 3 or strides != stage_strides[-len(strides) :]:
            raise ValueError(
                f"strides: must be the last 1-3 backbone stage strides {stage_strides} in increasing "
                f"order (e.g. {stage_strides[-2:]}), got {strides}"
            )
        object.__setattr__(self, "widths", widths)
        object.__setattr__(self, "depths", depths)
        object.__setattr__(self, "strides", strides)
        object.__setattr__(self, "head_width", positive_int("head_width", self.head_width))

    @property
    def level_channels(self) -> tuple[int, ...]:
        """Channels of the backbone stages feeding the neck, one per level."""
        return self.widths[-len(self.strides) :]


DetectorConfig.PAPER = DetectorConfig(
    in_channels=1, widths=(32, 64, 128, 256, 512), depths=(1, 3, 3, 1), strides=(8, 16, 32), head_width=128
)


FUSION_MODES = ("concat", "sum")
TRANSITIONS = ("mulpool", "plain")
INPUT_NORMS = ("none", "crop")


@dataclass(frozen=True)
class StagerConfig(DictConfig):
    """Constructor arguments of :class:`MulDenseNet3D` (recorded in every model bundle).

    Attributes:
        in_channels: input channels (1: windowed T2 MRI crop).
        out_channels: number of classes (3: Ficat-Arlet 0, I, II).
        init_features: channels of the stem convolution.
        growth_rate: channels added per dense layer (k in DenseNet).
        block_config: dense layers per dense block; a transition follows every block but the last.
        bn_size: bottleneck factor (``bn_size * growth_rate`` channels in each 1x1x1 bottleneck).
        pool_scales: MulPoolFusion scales ``s``; each gives a max and an average pooling branch
            with kernel ``2s + 1`` (see :class:`MulPoolFusion`). Distinct positive integers.
        fusion: ``"concat"`` (concatenate branches, then 1x1x1 conv) or ``"sum"``.
        transition: ``"mulpool"`` (MulPoolFusion) or ``"plain"`` (MONAI DenseNet transition: BN-ReLU-
            1x1x1 conv-AvgPool 2, the ablation; rounds sizes down, so every spatial size must be
            >= 2 before each transition).
        dropout_prob: dropout after each dense layer and before the classifier, in ``[0, 1)``.
        input_norm: ``"crop"`` standardises each crop before the stem, ``(x - mean) / std`` over its
            voxels (per sample and channel; MONAI ``NormalizeIntensity(channel_wise=True)``'s formula), so
            that a study's overall gain (phantom generator 7 draws 0.5-1.3 per study; real scanners differ
            as much) does not reach the network; ``"none"`` feeds the windowed crop as it is (what bundles
            made before issue 18's change did; ``from_dict`` gives it to a bundle without the key).
        stem_pool: keep the stem's 3x3x3 stride-2 max pooling (MONAI DenseNet). With it a 32^3 crop
            reaches the last dense block at ``32 / 2**(1 + len(block_config))`` voxels per side;
            set False for a finer Grad-CAM map (twice the resolution, more compute).

    ``PAPER`` is the DenseNet121-like preset (init 64, growth 32, blocks (6, 12, 24, 16)); the
    paper names DenseNet but not its size, so this is our reading.

    Raises:
        ValueError: on construction or ``from_dict`` with a bad value; the message names the key.
    """

    in_channels: int = 1
    out_channels: int = 3
    init_features: int = 16
    growth_rate: int = 8
    block_config: tuple[int, ...] = (2, 3, 4)
    bn_size: int = 4
    pool_scales: tuple[int, ...] = (1, 2, 4)
    fusion: str = "concat"
    transition: str = "mulpool"
    dropout_prob: float = 0.0
    stem_pool: bool = True
    input_norm: str = "none"

    PAPER: ClassVar[StagerConfig]

    def __post_init__(self) -> None:
        for key in ("in_channels", "init_features", "growth_rate", "bn_size"):
            object.__setattr__(self, key, positive_int(key, getattr(self, key)))
        object.__setattr__(self, "out_channels", positive_int("out_channels", self.out_channels, 2))
        object.__setattr__(self, "block_config", int_tuple("block_config", self.block_config))
        scales = int_tuple("pool_scales", self.pool_scales)
        if len(set(scales)) != len(scales):
            raise ValueError(f"pool_scales: values must be distinct, got {scales}")
        object.__setattr__(self, "pool_scales", scales)
        if self.fusion not in FUSION_MODES:
            raise ValueError(f"fusion: expected one of {FUSION_MODES}, got {self.fusion!r}")
        if self.transition not in TRANSITIONS:
            raise ValueError(f"transition: expected one of {TRANSITIONS}, got {self.transition!r}")
        p = self.dropout_prob
        if isinstance(p, bool) or not isinstance(p, (int, float, np.floating)) or not 0.0 <= float(p) < 1.0:
            raise ValueError(f"dropout_prob: expected a float in [0, 1), got {p!r}")
        object.__setattr__(self, "dropout_prob", float(p))
        if self.input_norm not in INPUT_NORMS:
            raise ValueError(f"input_norm: expected one of {INPUT_NORMS}, got {self.input_norm!r}")
        if not isinstance(self.stem_pool, (bool, np.bool_)):
            raise ValueError(f"stem_pool: expected a bool, got {self.stem_pool!r}")
        object.__setattr__(self, "stem_pool", bool(self.stem_pool))


StagerConfig.PAPER = StagerConfig(init_features=64, growth_rate=32, block_config=(6, 12, 24, 16), bn_size=4)
