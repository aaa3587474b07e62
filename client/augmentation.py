"""Training-time augmentation (paper section 2.5: random brightness, random flip, Gaussian noise).

Source: Yang et al., Front. Surg. 2025 (doi:10.3389/fsurg.2025.1555749), section 2.5: "data
augmentation techniques such as random brightness, random flipping, and Gaussian noise were
applied to the training set". The detector additionally gets a small random affine (isotropic zoom
and translation), as in YOLOX's random affine (Ge et al. 2021, arXiv:2107.08430, section 2.2,
"Strong data augmentation"), restricted to zoom and shift so that axis-aligned boxes stay tight.

The transforms are MONAI's, with their parameters drawn by us: intensity changes are those of MONAI
``RandScaleIntensity``, ``RandShiftIntensity``, ``RandAdjustContrast`` and ``RandGaussianNoise``
(:func:`intensity_transform` is the MONAI pipeline that defines them); boxes move with
``monai.apps.detection.transforms.box_ops`` (``flip_boxes``, ``apply_affine_to_boxes``) and are
clipped with ``monai.data.box_utils.clip_boxes_to_image``. MONAI's box-aware dictionary transforms
(``RandFlipBoxd``, ``RandZoomBoxd``) draw one decision for a whole dictionary, have no translation
and no ``RandAffineBoxd`` exists, so we draw the parameters ourselves and call the array ops.

Speed (issue 8, training input pipeline >= 0.9 of in-memory throughput): the image side computes
the same arithmetic as the MONAI array transforms, without their per-call ``MetaTensor`` machinery
and per-sample grids. The zoom/shift is :func:`resample_zoom_shift`, three 1D linear interpolations
equal to MONAI ``Affine``'s trilinear resampling (a scaled, shifted grid is separable) instead of a
dense 3D ``grid_sample``; flips are ``torch.flip`` (what MONAI ``Flip`` calls); intensity is
:func:`_apply_intensity`, MONAI's formulas in place on float32, with float32 noise from torch's CPU
generator instead of numpy float64. ``tests/test_augmentation.py`` checks each against MONAI. On
2 CPU cores this took a default-width detector batch of 4 from about 35 ms to about 10 ms; the
probabilities and ranges are unchanged, so training sees the same distribution as before.

Box convention (``docs/CONVENTIONS.md``): voxel boxes ``(cz, cy, cx, d, h, w)`` along the array
axes ``(D, H, W)``, voxel centres at integer indices, so the volume spans ``[-0.5, n - 0.5]`` per
axis and a flip maps a coordinate ``c`` to ``n - 1 - c`` (``shared_models.preprocessing.
box_voxel_to_lps`` feeds the centre to ITK's ``TransformContinuousIndexToPhysicalPoint``, whose
voxel centres are integer indices). MONAI's box ops put voxel ``i`` at ``[i, i + 1]``
(``flip_boxes`` maps ``c`` to ``n - c``), so boxes are shifted by +0.5 voxel on the way in and
-0.5 on the way out. MONAI ``Affine`` (``normalized=False``) resamples about the volume centre
``(n - 1) / 2`` (index units), which is ``n / 2`` in MONAI box coordinates, so the same matrix moves
image and box.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from monai.apps.detection.transforms.box_ops import apply_affine_to_boxes, flip_boxes
from monai.data.box_utils import clip_boxes_to_image, convert_box_mode
from monai.transforms import (
    Compose,
    RandAdjustContrast,
    RandGaussianNoise,
    RandScaleIntensity,
    RandShiftIntensity,
)

from shared_models.detection.boxes import CENTER_MODE, CORNER_MODE

__all__ = ["augment_detector_batch", "augment_intensity", "intensity_transform", "resample_zoom_shift"]

# Box modes of ``monai.data.box_utils`` for our array axes (D, H, W) fed as MONAI's (x, y, z), as
# the detector reads them (:mod:`shared_models.detection.boxes`): ``(cz, cy, cx, d, h, w)`` is
# "cccwhd" and corners ``(z0, y0, x0, z1, y1, x1)`` are "xyzxyz" (MONAI ``StandardMode``).
#: Our voxel centres are at integer indices, MONAI's box ops put them at ``i + 0.5``.
_TO_MONAI = 0.5
#: Seeds handed to MONAI's ``Randomizable.set_random_state`` (it reduces them modulo 2**32).
_MAX_SEED = 2**31 - 1
#: Smallest box side (voxels) after clipping, so that sizes stay positive for ``detector_loss``.
MIN_BOX_SIZE = 1.0

# Intensity ranges (the paper gives none; ours are mild): brightness scale 1 +/- 0.1 and shift
# +/- 0.05 always, gamma contrast in [0.8, 1.25] and Gaussian noise with sigma ~ U(0, 0.03) each with
# probability 0.5 (windowed intensities are in [0, 1]). The two costly ones (a power and a float64
# numpy draw per voxel) run on half the samples, as nnU-Net also applies them only sometimes.
_SCALE_FACTOR = 0.1
_SHIFT_OFFSET = 0.05
_GAMMA_RANGE = (0.8, 1.25)
_GAMMA_PROB = 0.5
_NOISE_STD = 0.03
_NOISE_PROB = 0.5


def _draw_seed(rng: np.random.Generator | torch.Generator) -> int:
    """One seed from the caller's random stream (advances it), for MONAI and numpy."""
    if isinstance(rng, torch.Generator):
        return int(torch.randint(0, _MAX_SEED, (1,), generator=rng))
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(0, _MAX_SEED))
    raise TypeError(f"rng must be a numpy Generator or a torch.Generator, got {type(rng).__name__}")


def intensity_transform(seed: int) -> Compose:
    """The per-sample intensity augmentation as a seeded MONAI ``Compose`` (paper section 2.5): the
    reference definition; :func:`augment_intensity` computes the same transforms batched.

    Random brightness (``RandScaleIntensity`` 1 +/- 0.1, ``RandShiftIntensity`` +/- 0.05), random
    contrast (``RandAdjustContrast`` gamma in [0.8, 1.25], p = 0.5) and Gaussian noise
    (``RandGaussianNoise``, sigma ~ U(0, 0.03), p = 0.5). Applied to one channel-first ``(C, D, H, W)``
    volume per call, each call drawing new parameters. The output is not clipped.
    """
    return Compose(
        [
            RandScaleIntensity(factors=_SCALE_FACTOR, prob=1.0),
            RandShiftIntensity(offsets=_SHIFT_OFFSET, prob=1.0),
            RandAdjustContrast(prob=_GAMMA_PROB, gamma=_GAMMA_RANGE),
            RandGaussianNoise(prob=_NOISE_PROB, mean=0.0, std=_NOISE_STD, sample_std=True),
        ]
    ).set_random_state(seed=seed)


def _check_volumes(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 5 or x.shape[1] < 1:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name}: expected a (B, C, D, H, W) float tensor, got {shape}")
    if not x.dtype.is_floating_point:
        raise ValueError(f"{name}: expected a float tensor, got {x.dtype}")


def _intensity_parameters(n: int, seed: int) -> dict[str, np.ndarray]:
    """Per-sample parameters of :func:`intensity_transform`'s four transforms, drawn from ``seed``:
    ``factor`` (scale ``1 + factor``), ``offset``, ``gamma`` (1 where the contrast change is not
    applied), ``noise_std`` (0 where no noise is added) and ``noise_seed``."""
    draw = np.random.default_rng(seed)
    do_gamma, do_noise = draw.random(n) < _GAMMA_PROB, draw.random(n) < _NOISE_PROB
    return {
        "factor": draw.uniform(-_SCALE_FACTOR, _SCALE_FACTOR, n),
        "offset": draw.uniform(-_SHIFT_OFFSET, _SHIFT_OFFSET, n),
        "gamma": np.where(do_gamma, draw.uniform(*_GAMMA_RANGE, n), 1.0),
        "noise_std": np.where(do_noise, draw.uniform(0.0, _NOISE_STD, n), 0.0),
        "noise_seed": draw.integers(0, _MAX_SEED, n),
    }


def _apply_intensity(
    x: torch.Tensor,
    factor: float,
    offset: float,
    gamma: float,
    noise_std: float = 0.0,
    noise_seed: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The arithmetic of MONAI ``ScaleIntensity(factor=factor)``, ``ShiftIntensity(offset)``,
    ``AdjustContrast(gamma)`` and additive Gaussian noise ``N(0, noise_std)`` on one sample
    ``(C, D, H, W)``, float32, not clipped, written into ``out`` when given (``tests/test_augmentation.py``
    checks it against MONAI). The noise is drawn in float32 by torch's CPU generator seeded with
    ``noise_seed`` (MONAI's ``RandGaussianNoise`` draws float64 with numpy: 4x the work for noise
    whose scale, <= 0.03, is far above float32 resolution), on ``x``'s device with a generator there:
    on a GPU neither the noise nor its copy goes through the host (the same seed gives the same noise
    on the same kind of device; the CPU and CUDA generators give different streams)."""
    out = torch.mul(x, 1.0 + float(factor), out=out) if out is not None else x.to(torch.float32) * (1.0 + float(factor))
    out.add_(float(offset))
    if gamma != 1.0:  # AdjustContrast: ((x - min) / (range + 1e-7)) ** gamma * range + min
        lo, hi = torch.aminmax(out)
        rng = hi - lo
        out.sub_(lo).div_(rng + 1e-7).pow_(float(gamma)).mul_(rng).add_(lo)
    if noise_std > 0.0:
        gen = torch.Generator(device=out.device).manual_seed(int(noise_seed))
        noise = torch.randn(out.shape, generator=gen, dtype=torch.float32, device=out.device)
        out.add_(noise.mul_(float(noise_std)))
    return out


def _intensity_into(out: torch.Tensor, x: torch.Tensor, seed: int) -> torch.Tensor:
    """Intensity augmentation of the batch ``x`` into ``out`` (may be ``x`` itself), clipped to [0, 1]."""
    p = _intensity_parameters(x.shape[0], seed)
    for b in range(x.shape[0]):
        _apply_intensity(
            x[b], p["factor"][b], p["offset"][b], p["gamma"][b], p["noise_std"][b], p["noise_seed"][b], out=out[b]
        )
    return out.clamp_(0.0, 1.0)


def _intensity(x: torch.Tensor, seed: int) -> torch.Tensor:
    return _intensity_into(torch.empty(x.shape, dtype=torch.float32, device=x.device), x, seed)


def augment_intensity(x: torch.Tensor, gen: torch.Generator | np.random.Generator) -> torch.Tensor:
    """Random brightness, contrast and Gaussian noise per sample, clipped to [0, 1] (paper 2.5).

    See :func:`intensity_transform` for the MONAI transforms and their ranges. Each sample of the
    batch gets its own parameters; the whole call is determined by one seed drawn from ``gen``.

    Args:
        x: ``(B, C, D, H, W)`` float tensor, intensities in ``[0, 1]``; not modified.
        gen: the caller's random stream (``torch.Generator`` or ``numpy.random.Generator``);
            advanced by one draw.

    Returns:
        ``(B, C, D, H, W)`` float32 in ``[0, 1]`` on ``x``'s device.

    Raises:
        ValueError: if ``x`` is not a 5-D float tensor.
        TypeError: if ``gen`` is neither generator type.
    """
    _check_volumes(x, "x")
    return _intensity(x, _draw_seed(gen))


def _interpolation_matrix(n: int, zoom: float, shift: float, flip: bool = False) -> torch.Tensor:
    """``(n, n)`` float32 matrix of 1D linear interpolation along an axis of ``n`` voxels.

    Output voxel ``i`` reads input position ``(i - c - shift) / zoom + c`` with ``c = (n - 1) / 2``:
    row ``i`` holds the two neighbours' weights, and none for a neighbour outside the volume (zero
    padding). With ``flip``, the axis is reversed first (``index -> n - 1 - index``, MONAI ``Flip``):
    the columns are reversed, so flip and resampling cost one product.
    """
    c = (n - 1) / 2.0
    pos = (torch.arange(n, dtype=torch.float64) - c - shift) / zoom + c
    i0 = torch.floor(pos)
    w1 = pos - i0
    i0 = i0.long()
    m = torch.zeros(n, n + 2, dtype=torch.float64)  # columns 0 and n + 1 collect the padding
    rows = torch.arange(n)
    m.index_put_((rows, (i0 + 1).clamp(0, n + 1)), 1.0 - w1, accumulate=True)
    m.index_put_((rows, (i0 + 2).clamp(0, n + 1)), w1, accumulate=True)
    m = m[:, 1 : n + 1]
    return (m.flip(1) if flip else m).to(torch.float32)


def resample_zoom_shift(
    img: torch.Tensor, zoom: float, shift: Sequence[float], flip_axes: Sequence[int] = ()
) -> torch.Tensor:
    """Trilinear resampling with zero padding for an isotropic zoom about the volume centre and a shift.

    Content at index ``p`` moves to ``zoom * (p - c) + c + shift`` with ``c = (n - 1) / 2`` per axis:
    the same result as MONAI ``Affine(affine=inv(forward), padding_mode="zeros")`` with bilinear
    interpolation (``tests/test_augmentation.py`` compares the two), computed as three 1D linear
    interpolations, one per axis, each a product with a sparse-banded ``(n, n)`` matrix
    (:func:`_interpolation_matrix`). Trilinear interpolation of a scaled and shifted grid *is* the
    product of three 1D interpolations, so this is exact up to float32 rounding, not an
    approximation. It builds no dense 3D grid: for a 32 x 112 x 64 hemi-volume it is about 10x
    faster on CPU than sampling one, and the three matrix products take 1.2 ms against 2.3 ms for
    gathering the neighbours with ``index_select`` at 2 threads (1.8 against 2.1 ms at one; side
    by side on this 2-core machine). ``onfh sim bench --only detector`` reports the augmentation's
    share of a training step.

    Args:
        img: ``(C, D, H, W)`` float tensor.
        zoom: isotropic scale factor (> 0).
        shift: ``(t_D, t_H, t_W)`` in voxels.
        flip_axes: spatial axes (0 = D, 1 = H, 2 = W) reversed *before* the zoom and shift, as
            MONAI ``Flip(spatial_axis=flip_axes)`` followed by the resampling, at no extra cost.

    Returns:
        ``(C, D, H, W)`` float32 on ``img``'s device.
    """
    out = img.to(torch.float32)
    c, d, h, w = out.shape
    mats = [
        _interpolation_matrix(n, float(zoom), float(t), axis in flip_axes)
        for axis, (n, t) in enumerate(zip((d, h, w), shift))
    ]
    if out.device.type == "cuda":  # pinned, non-blocking: the host queues the copy without waiting for the GPU
        mats = [m.pin_memory().to(out.device, non_blocking=True) for m in mats]
    out = out @ mats[2].T  # W: (C, D, H, W) x (W, W)
    out = mats[1] @ out  # H: (H, H) x (C, D, H, W), batched over C and D
    return (mats[0] @ out.reshape(c, d, h * w)).reshape(c, d, h, w)  # D


def _zoom_shift(zoom: float, shift: np.ndarray) -> np.ndarray:
    """4x4 map of positions relative to the volume centre: ``p -> zoom * p + shift`` (input -> output)."""
    m = np.eye(4)
    m[:3, :3] *= zoom
    m[:3, 3] = shift
    return m


def _about(matrix: np.ndarray, centre: np.ndarray) -> np.ndarray:
    """``matrix`` (centred coordinates) conjugated to absolute coordinates with origin ``centre``."""
    to_centre, back = np.eye(4), np.eye(4)
    to_centre[:3, 3] = -centre
    back[:3, 3] = centre
    return back @ matrix @ to_centre


def augment_detector_batch(
    x: torch.Tensor,
    boxes: torch.Tensor,
    rng: np.random.Generator | torch.Generator,
    *,
    flip_prob: float = 0.5,
    affine_prob: float = 0.5,
    max_zoom: float = 0.1,
    max_translate_voxels: float = 3.0,
    intensity: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Box-aware 3D augmentation of a detector batch: flips, zoom/shift, intensity and noise.

    Per sample, in this order:

    1. **Flips** along each of D, H, W independently with probability ``flip_prob`` (MONAI
       ``Flip``; boxes by ``flip_boxes``: ``c -> n - 1 - c`` in our convention).
    2. **Affine** with probability ``affine_prob``: isotropic zoom ``z ~ U(1 - max_zoom,
       1 + max_zoom)`` about the volume centre, then a shift ``t ~ U(-max_translate_voxels,
       max_translate_voxels)`` voxels per axis, i.e. content at ``p`` moves to
       ``z * (p - centre) + centre + t``. The image is resampled by :func:`resample_zoom_shift`
       (trilinear, equal to MONAI ``Affine``; zero padding: nothing is mirrored in, so no second
       femoral head can appear) and the box by ``apply_affine_to_boxes`` with the same matrix.
       Without the affine no resampling happens (bilinear resampling slightly blurs, so not every
       sample pays it). No rotation: the box of a rotated box is looser than the rotated object.
    3. **Intensity** (``intensity=True``): the transforms of :func:`intensity_transform`, then clipped to
       ``[0, 1]``.

    Boxes are finally clipped to the volume (``clip_boxes_to_image``) and every side is kept at
    least ``MIN_BOX_SIZE`` = 1 voxel, so the result is always a valid ``detector_loss`` target.

    Args:
        x: ``(B, 1, D, H, W)`` float tensor in ``[0, 1]`` (hemi-volumes, e.g. D, H, W = 32, 112, 64);
            not modified.
        boxes: ``(B, 6)`` float ``(cz, cy, cx, d, h, w)`` GT boxes in voxels of the array axes
            (voxel centres at integer indices); not modified.
        rng: the caller's random stream (``numpy.random.Generator`` or ``torch.Generator``),
            advanced by one draw; the output is a function of the inputs and that draw only.
        flip_prob: per-axis flip probability in ``[0, 1]``.
        affine_prob: probability of the zoom/shift in ``[0, 1]``.
        max_zoom: half-width of the zoom range, in ``[0, 1)`` (0.1 = +/- 10 %).
        max_translate_voxels: largest shift per axis, voxels, ``>= 0``.
        intensity: apply the intensity transforms.

    Returns:
        ``(x, boxes)``: ``(B, 1, D, H, W)`` float32 in ``[0, 1]`` and ``(B, 6)`` float32 boxes inside
        ``[-0.5, n - 0.5]`` on every axis with sides ``>= 1``, both on the inputs' devices.

    Raises:
        ValueError: bad shapes, non-finite boxes or non-positive box sizes, or an argument out of
            range.
        TypeError: if ``rng`` is neither generator type.
    """
    _check_volumes(x, "x")
    if not isinstance(boxes, torch.Tensor) or boxes.shape != (x.shape[0], 6):
        shape = tuple(boxes.shape) if isinstance(boxes, torch.Tensor) else type(boxes).__name__
        raise ValueError(f"boxes: expected ({x.shape[0]}, 6) voxel boxes (cz, cy, cx, d, h, w), got {shape}")
    if not torch.isfinite(boxes).all() or (boxes[:, 3:] <= 0).any():
        raise ValueError("boxes: must be finite with positive sizes (d, h, w)")
    for name, p in (("flip_prob", flip_prob), ("affine_prob", affine_prob)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name}: must be in [0, 1], got {p}")
    if not 0.0 <= max_zoom < 1.0:
        raise ValueError(f"max_zoom: must be in [0, 1), got {max_zoom}")
    if not max_translate_voxels >= 0.0:
        raise ValueError(f"max_translate_voxels: must be >= 0, got {max_translate_voxels}")

    n, size = x.shape[0], tuple(int(s) for s in x.shape[2:])
    if n == 0:
        return x.to(torch.float32).clone(), boxes.to(torch.float32).clone()
    draw = np.random.default_rng(_draw_seed(rng))
    flips = draw.random((n, 3)) < flip_prob
    do_affine = draw.random(n) < affine_prob
    zooms = draw.uniform(1.0 - max_zoom, 1.0 + max_zoom, n)
    shifts = draw.uniform(-max_translate_voxels, max_translate_voxels, (n, 3))
    intensity_seed = int(draw.integers(0, _MAX_SEED))
    centre_monai = np.asarray(size, dtype=np.float64) / 2.0

    corners = convert_box_mode(boxes.detach().float().cpu(), src_mode=CENTER_MODE, dst_mode=CORNER_MODE)
    corners = corners + _TO_MONAI
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    out_b = []
    for b in range(n):
        img, box = x[b], corners[b : b + 1]
        axes = tuple(int(a) for a in np.flatnonzero(flips[b]))
        if axes:
            box = flip_boxes(box, spatial_size=size, flip_axes=axes)
        if do_affine[b]:  # the flips folded into the resampling
            img = resample_zoom_shift(img, zooms[b], shifts[b], flip_axes=axes)
            box = apply_affine_to_boxes(box, _about(_zoom_shift(zooms[b], shifts[b]), centre_monai))
        elif axes:
            img = torch.flip(img, dims=[a + 1 for a in axes])  # = MONAI Flip(spatial_axis=axes)
        out[b] = img
        out_b.append(box)

    corners, _ = clip_boxes_to_image(torch.cat(out_b), size, remove_empty=False)
    extent = torch.tensor(size, dtype=corners.dtype)
    lo = torch.minimum(corners[:, :3], extent - MIN_BOX_SIZE)
    hi = torch.minimum(torch.maximum(corners[:, 3:], lo + MIN_BOX_SIZE), extent)
    corners = torch.cat([lo, hi], dim=1) - _TO_MONAI
    new_boxes = convert_box_mode(corners, src_mode=CORNER_MODE, dst_mode=CENTER_MODE)

    out = _intensity_into(out, out, intensity_seed) if intensity else out.clamp_(0.0, 1.0)
    return out.to(x.device), new_boxes.to(device=boxes.device, dtype=torch.float32)
