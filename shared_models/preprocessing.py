"""Geometry and intensity preprocessing shared by sites and inference.

Everything here is pure: SimpleITK images and numpy arrays in, arrays and grids out.
No Flower import, no file I/O, no logging of patient data.

Conventions (see ``docs/CONVENTIONS.md``):

* Physical space is DICOM/ITK **LPS** in mm: +x patient Left, +y Posterior, +z Superior.
* A numpy array from SimpleITK is indexed ``[k, j, i]``; we call the axes ``(D, H, W)``.
  Sizes and spacings in this module are given in that array-axis order (``size_dhw``,
  ``spacing_dhw_mm``). Origins are LPS points ``(x, y, z)``; directions are ITK's 3x3
  matrix flattened row-major, whose *columns* are the physical directions of the
  index axes ``i`` (W), ``j`` (H), ``k`` (D).
* **Hemi grid** (detector input, our reading of the paper's 32 x 112 x 64): the study is
  split at the patient midline, the x-centre of its physical extent. Each side gets
  its own grid of ``hemi_shape`` voxels covering ``hemi_fov_mm``:

  - D runs inferior -> superior (+z), H anterior -> posterior (+y), both centred on the
    centre of the study's physical extent;
  - W runs medial -> lateral and its first voxel *edge* lies on the midline:
    +x for the left head ``"L"``, -x for the right head ``"R"`` (a mirrored grid, so both
    heads look alike to the network).

* **Crop grid** (stager input): the femoral head box plus ``crop_margin_mm`` on every
  side, same axis directions and mirroring as the hemi grid, ``crop_shape`` voxels
  (the spacing follows from the box size, so it may be anisotropic).
* **Voxel boxes** ``(cz, cy, cx, d, h, w)`` are in continuous index units of a grid with
  voxel centres at integer indices: a box covering voxels ``0..n-1`` spans
  ``[-0.5, n - 0.5]``.
* Resampling is linear; points outside the study read as intensity 0 (no MR signal,
  like the air around the patient), which the window then maps like any other 0.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from shared_models.config_dict import finite_number, positive_triple
from shared_models.specs.models import PreprocessingSpec  # its home is specs; this import keeps the old path

logger = logging.getLogger(__name__)

SIDES: tuple[str, str] = ("L", "R")

# Intensity used for points outside the study when resampling (before windowing).
OUTSIDE_VALUE: float = 0.0


def _check_side(side: str) -> str:
    if side not in SIDES:
        raise ValueError(f"side must be 'L' or 'R', got {side!r}")
    return side


@dataclass(frozen=True)
class GridGeometry:
    """A resampling grid, JSON-serialisable.

    Attributes:
        size_dhw: voxels along ``(D, H, W)`` (ITK size reversed).
        origin_lps_mm: LPS position of the centre of voxel ``[0, 0, 0]``.
        spacing_dhw_mm: voxel spacing along ``(D, H, W)`` in mm.
        direction: 9 numbers, ITK direction matrix row-major; column ``c`` is the unit
            LPS direction of index axis ``c`` (``i``=W, ``j``=H, ``k``=D).
    """

    size_dhw: tuple[int, int, int]
    origin_lps_mm: tuple[float, float, float]
    spacing_dhw_mm: tuple[float, float, float]
    direction: tuple[float, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "size_dhw", positive_triple(self.size_dhw, "size_dhw", int))
        object.__setattr__(self, "spacing_dhw_mm", positive_triple(self.spacing_dhw_mm, "spacing_dhw_mm", float))
        origin = self.origin_lps_mm
        if isinstance(origin, (str, bytes)) or not isinstance(origin, Sequence) or len(origin) != 3:
            raise ValueError(f"origin_lps_mm must be 3 numbers, got {origin!r}")
        object.__setattr__(self, "origin_lps_mm", tuple(finite_number(v, "origin_lps_mm") for v in origin))
        direction = self.direction
        if isinstance(direction, (str, bytes)) or not isinstance(direction, Sequence) or len(direction) != 9:
            raise ValueError(f"direction must be 9 numbers, got {direction!r}")
        object.__setattr__(self, "direction", tuple(finite_number(v, "direction") for v in direction))

    def reference_image(self) -> sitk.Image:
        """An empty float32 image with this geometry (a resampling target)."""
        return self._image(sitk.sitkFloat32)

    def _image(self, pixel_type: int) -> sitk.Image:
        image = sitk.Image([int(n) for n in self.size_dhw[::-1]], pixel_type)
        image.SetSpacing(self.spacing_dhw_mm[::-1])
        image.SetOrigin(self.origin_lps_mm)
        image.SetDirection(self.direction)
        return image

    @classmethod
    def of(cls, image: sitk.Image) -> GridGeometry:
        """The grid of a 3D SimpleITK image."""
        if image.GetDimension() != 3:
            raise ValueError(f"expected a 3D image, got {image.GetDimension()}D")
        return cls(
            size_dhw=tuple(image.GetSize()[::-1]),
            origin_lps_mm=tuple(image.GetOrigin()),
            spacing_dhw_mm=tuple(image.GetSpacing()[::-1]),
            direction=tuple(image.GetDirection()),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples become lists)."""
        return {k: list(v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GridGeometry:
        """Inverse of :meth:`to_dict`; ``ValueError`` naming a missing/unknown/bad key."""
        names = [f.name for f in dataclasses.fields(cls)]
        for key in d:
            if key not in names:
                raise ValueError(f"unknown grid geometry key {key!r}")
        for key in names:
            if key not in d:
                raise ValueError(f"grid geometry key {key!r} is missing")
        return cls(**{k: tuple(v) for k, v in d.items()})


def orient_lps(image: sitk.Image) -> sitk.Image:
    """Reorient a 3D study to the LPS patient frame (``sitk.DICOMOrient(image, "LPS")``).

    Axes are permuted/flipped so that index axes ``i, j, k`` point as close as possible to
    +x (L), +y (P), +z (S); the physical position of every voxel is unchanged, and so is
    the pixel type. Oblique acquisitions stay oblique (no resampling happens here).
    """
    if image.GetDimension() != 3:
        raise ValueError(f"expected a 3D image, got {image.GetDimension()}D")
    return sitk.DICOMOrient(image, "LPS")


def window(array: np.ndarray, spec: PreprocessingSpec) -> np.ndarray:
    """Clip to ``[level - width/2, level + width/2]`` and scale to ``[0, 1]``; float32, same shape."""
    low = spec.window_level - spec.window_width / 2.0
    out = (np.asarray(array, dtype=np.float32) - np.float32(low)) / np.float32(spec.window_width)
    return np.clip(out, 0.0, 1.0).astype(np.float32, copy=False)


def _extent_lps(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned LPS bounding box ``(min_xyz, max_xyz)`` of the image's voxel extent.

    The extent runs over voxel *edges* (index -0.5 .. n-0.5) and is the min/max over its
    8 transformed corners, so it is correct for oblique and mirrored images alike.
    """
    if image.GetDimension() != 3:
        raise ValueError(f"expected a 3D image, got {image.GetDimension()}D")
    size = image.GetSize()
    corners = np.array(
        [
            image.TransformContinuousIndexToPhysicalPoint([c[a] for a in range(3)])
            for c in itertools.product(*[(-0.5, n - 0.5) for n in size])
        ]
    )
    return corners.min(axis=0), corners.max(axis=0)


def midline_x_mm(image: sitk.Image) -> float:
    """Patient midline: LPS x (mm) at the centre of the image's physical extent."""
    low, high = _extent_lps(image)
    return float((low[0] + high[0]) / 2.0)


def _side_grid(
    low_xyz: npt.ArrayLike,
    high_xyz: npt.ArrayLike,
    side: str,
    shape_dhw: Sequence[int],
) -> GridGeometry:
    """Grid of ``shape_dhw`` voxels exactly filling the LPS box ``[low, high]``.

    D runs along +z, H along +y, W along +x for ``"L"`` and -x for ``"R"``; for ``"R"`` the
    grid starts at ``high_x``.
    """
    _check_side(side)
    low = np.asarray(low_xyz, dtype=np.float64)
    high = np.asarray(high_xyz, dtype=np.float64)
    n_d, n_h, n_w = (int(n) for n in shape_dhw)
    sx, sy, sz = (high - low) / np.array([n_w, n_h, n_d], dtype=np.float64)
    sign = 1.0 if side == "L" else -1.0
    start_x = low[0] if side == "L" else high[0]
    origin = (float(start_x + sign * sx / 2.0), float(low[1] + sy / 2.0), float(low[2] + sz / 2.0))
    direction = (sign, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    return GridGeometry(
        size_dhw=(n_d, n_h, n_w),
        origin_lps_mm=origin,
        spacing_dhw_mm=(float(sz), float(sy), float(sx)),
        direction=direction,
    )


def hemi_grid(image: sitk.Image, side: str, spec: PreprocessingSpec) -> GridGeometry:
    """The hemi grid of one side of a study (see the module docstring).

    Args:
        image: the study (any orientation; its physical extent is what counts).
        side: ``"L"`` (patient left, +x of the midline) or ``"R"``.
        spec: supplies ``hemi_shape`` and ``hemi_fov_mm``.

    Returns:
        A grid of ``spec.hemi_shape`` voxels with spacing ``spec.hemi_spacing_mm``.
    """
    _check_side(side)
    low, high = _extent_lps(image)
    centre = (low + high) / 2.0
    fov_d, fov_h, fov_w = spec.hemi_fov_mm
    mid = centre[0]
    x_low, x_high = (mid, mid + fov_w) if side == "L" else (mid - fov_w, mid)
    box_low = (x_low, centre[1] - fov_h / 2.0, centre[2] - fov_d / 2.0)
    box_high = (x_high, centre[1] + fov_h / 2.0, centre[2] + fov_d / 2.0)
    return _side_grid(box_low, box_high, side, spec.hemi_shape)


def _resample(image: sitk.Image, grid: GridGeometry) -> np.ndarray:
    if image.GetDimension() != 3:
        raise ValueError(f"expected a 3D image, got {image.GetDimension()}D")
    out = sitk.Resample(
        image,
        grid.reference_image(),
        sitk.Transform(),
        sitk.sitkLinear,
        OUTSIDE_VALUE,
        sitk.sitkFloat32,
    )
    return sitk.GetArrayFromImage(out)


def resample_hemi(image: sitk.Image, side: str, spec: PreprocessingSpec) -> tuple[np.ndarray, GridGeometry]:
    """Resample one side of a study onto its hemi grid and window it.

    Returns:
        ``(array, grid)``: ``array`` is float32 ``(D, H, W)`` = ``spec.hemi_shape`` in
        ``[0, 1]``; ``grid`` is the hemi grid it lives on.
    """
    grid = hemi_grid(image, side, spec)
    return window(_resample(image, grid), spec), grid


def _box_corners(box_lps_mm: npt.ArrayLike) -> np.ndarray:
    box = np.asarray(box_lps_mm, dtype=np.float64).reshape(-1)
    if box.shape != (6,) or not np.all(np.isfinite(box)):
        raise ValueError(f"box must be 6 finite numbers (x0, y0, z0, x1, y1, z1), got {box_lps_mm!r}")
    low, high = box[:3], box[3:]
    if np.any(high <= low):
        raise ValueError(f"box must have x0<x1, y0<y1, z0<z1, got {box.tolist()}")
    return np.array(list(itertools.product(*zip(low, high))), dtype=np.float64)


def box_lps_to_voxel(box_lps_mm: npt.ArrayLike, grid: GridGeometry) -> np.ndarray:
    """Femoral head box in LPS mm -> voxel box on ``grid``.

    Args:
        box_lps_mm: ``(x0, y0, z0, x1, y1, z1)``.
        grid: e.g. a hemi grid (possibly mirrored).

    Returns:
        float32 ``(6,)`` ``(cz, cy, cx, d, h, w)`` in continuous voxel units (voxel
        centres at integers), the axis-aligned hull of the 8 transformed corners.
    """
    ref = grid._image(sitk.sitkUInt8)
    idx = np.array([ref.TransformPhysicalPointToContinuousIndex(tuple(c)) for c in _box_corners(box_lps_mm)])
    low, high = idx.min(axis=0)[::-1], idx.max(axis=0)[::-1]  # (k, j, i) = (z, y, x)
    return np.concatenate([(low + high) / 2.0, high - low]).astype(np.float32)


def box_voxel_to_lps(box_czyxdhw: npt.ArrayLike, grid: GridGeometry) -> np.ndarray:
    """Voxel box ``(cz, cy, cx, d, h, w)`` on ``grid`` -> LPS box; inverse of :func:`box_lps_to_voxel`.

    Returns:
        float64 ``(6,)`` ``(x0, y0, z0, x1, y1, z1)`` in mm, the axis-aligned hull of the 8
        transformed corners.
    """
    box = np.asarray(box_czyxdhw, dtype=np.float64).reshape(-1)
    if box.shape != (6,) or not np.all(np.isfinite(box)):
        raise ValueError(f"voxel box must be 6 finite numbers (cz, cy, cx, d, h, w), got {box_czyxdhw!r}")
    centre_ijk, size_ijk = box[:3][::-1], box[3:][::-1]
    if np.any(size_ijk < 0):
        raise ValueError(f"voxel box sizes must be >= 0, got {box.tolist()}")
    ref = grid._image(sitk.sitkUInt8)
    corners = itertools.product(*[(c - s / 2.0, c + s / 2.0) for c, s in zip(centre_ijk, size_ijk)])
    pts = np.array([ref.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in c)) for c in corners])
    return np.concatenate([pts.min(axis=0), pts.max(axis=0)])


def crop_grid(box_lps_mm: npt.ArrayLike, side: str, spec: PreprocessingSpec) -> GridGeometry:
    """Stager crop grid: the box plus ``spec.crop_margin_mm`` per side, ``spec.crop_shape`` voxels.

    Same axis directions and mirroring as the hemi grid of ``side``.
    """
    corners = _box_corners(box_lps_mm)
    margin = spec.crop_margin_mm
    return _side_grid(corners.min(axis=0) - margin, corners.max(axis=0) + margin, side, spec.crop_shape)


def image_bounds_lps(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned LPS hull of a 3D image's voxel extent.

    Args:
        image: 3D image, any direction.

    Returns:
        ``(low_xyz, high_xyz)``, float64 ``(3,)`` each, mm: min/max over the 8 corners of the
        voxel *edges* (continuous index -0.5 .. n-0.5), so oblique images are covered.

    Raises:
        ValueError: if the image is not 3D.
    """
    if image.GetDimension() != 3:
        raise ValueError(f"expected a 3D image, got {image.GetDimension()}D")
    corners = np.array(
        [
            image.TransformContinuousIndexToPhysicalPoint(c)
            for c in itertools.product(*[(-0.5, n - 0.5) for n in image.GetSize()])
        ]
    )
    return corners.min(axis=0), corners.max(axis=0)


def clip_box_to_image(box_lps_mm: npt.ArrayLike, image: sitk.Image) -> np.ndarray:
    """Clip an LPS box ``(x0, y0, z0, x1, y1, z1)`` mm to the image's LPS hull (:func:`image_bounds_lps`).

    A box wholly outside collapses onto the nearest face (zero size along that axis).

    Returns:
        float64 ``(6,)`` box in mm.
    """
    low, high = image_bounds_lps(image)
    box = np.asarray(box_lps_mm, dtype=np.float64).reshape(6)
    lo = np.clip(box[:3], low, high)
    hi = np.clip(box[3:], low, high)
    return np.concatenate([lo, np.maximum(hi, lo)])


def field_of_view_mask(image: sitk.Image, grid: GridGeometry) -> np.ndarray:
    """Which voxels of ``grid`` lie inside the scanned volume of ``image``.

    A voxel counts as inside when its centre falls within the image's voxel extent
    (nearest-neighbour lookup, SimpleITK ``Resample`` with default value 0).

    Returns:
        bool array of ``grid.size_dhw``.
    """
    ones = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(image)
    mask = sitk.Resample(
        ones, grid._image(sitk.sitkUInt8), sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8
    )
    return sitk.GetArrayFromImage(mask).astype(bool)


def resample_crop(
    image: sitk.Image, box_lps_mm: npt.ArrayLike, side: str, spec: PreprocessingSpec
) -> tuple[np.ndarray, GridGeometry]:
    """Resample the crop around a femoral head box and window it.

    Returns:
        ``(array, grid)``: float32 ``(D, H, W)`` = ``spec.crop_shape`` in ``[0, 1]``, and the
        crop grid.
    """
    grid = crop_grid(box_lps_mm, side, spec)
    return window(_resample(image, grid), spec), grid


def to_grid(array_dhw: np.ndarray, src: GridGeometry, dst_like: sitk.Image) -> sitk.Image:
    """Resample an array living on ``src`` into the geometry of ``dst_like``.

    Typical use: a Grad-CAM map on a crop grid -> the study's geometry, for overlay.
    Linear interpolation, 0 outside ``src``.

    Args:
        array_dhw: ``(D, H, W)`` array with ``src.size_dhw``.
        src: the grid the array lives on.
        dst_like: target; only its geometry is used.

    Returns:
        float32 image with exactly the size, spacing, origin and direction of ``dst_like``.
    """
    array = np.asarray(array_dhw, dtype=np.float32)
    if array.shape != tuple(src.size_dhw):
        raise ValueError(f"array shape {array.shape} does not match grid size {src.size_dhw}")
    moving = sitk.GetImageFromArray(array)
    moving.SetSpacing(src.spacing_dhw_mm[::-1])
    moving.SetOrigin(src.origin_lps_mm)
    moving.SetDirection(src.direction)
    return sitk.Resample(moving, dst_like, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
