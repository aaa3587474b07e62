"""Box-aware detector augmentation and intensity augmentation (client/augmentation.py).

Right values come from the image itself: a bright cuboid is drawn, the batch is augmented, and the
cuboid's voxel extent is brute-forced from the output image (voxels above 0.5). By the voxel-box
convention (docs/CONVENTIONS.md: voxel centres at integer indices) voxels ``a..b`` span
``[a - 0.5, b + 0.5]``. Flips are exact; after bilinear resampling a thresholded step edge can
move by at most half a voxel, so affine results are compared with a 0.5-voxel tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from client.augmentation import MIN_BOX_SIZE, augment_detector_batch, augment_intensity

SHAPE = (32, 112, 64)  # D, H, W of a hemi-volume


def _extent(vol: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Brute-force ``(cz, cy, cx, d, h, w)`` of the voxels above ``threshold`` in a (D, H, W) array."""
    lo, hi = [], []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hits = np.flatnonzero((vol > threshold).any(axis=other))
        lo.append(hits[0] - 0.5)
        hi.append(hits[-1] + 0.5)
    lo, hi = np.array(lo), np.array(hi)
    return np.concatenate([(lo + hi) / 2, hi - lo])


def _cuboids(n: int, seed: int, margin: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` volumes, each with one bright cuboid (value 1 on 0) away from the borders."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 1) + SHAPE, np.float32)
    boxes = []
    for i in range(n):
        size = rng.integers([4, 8, 6], [12, 40, 24])
        start = [rng.integers(margin, s - margin - k) for s, k in zip(SHAPE, size)]
        x[i, 0, start[0] : start[0] + size[0], start[1] : start[1] + size[1], start[2] : start[2] + size[2]] = 1.0
        boxes.append(_extent(x[i, 0]))
    return torch.from_numpy(x), torch.tensor(np.array(boxes), dtype=torch.float32)


def _corners(box: np.ndarray) -> np.ndarray:
    return np.concatenate([box[:3] - box[3:] / 2, box[:3] + box[3:] / 2])


def test_cuboid_helper_matches_known_box():
    vol = np.zeros(SHAPE, np.float32)
    vol[2:5, 10:20, 0:64] = 1.0  # voxels 2..4, 10..19, 0..63
    np.testing.assert_allclose(_extent(vol), [3.0, 14.5, 31.5, 3.0, 10.0, 64.0])


def test_flips_move_boxes_exactly_with_the_cuboid():
    x, boxes = _cuboids(8, seed=0)
    out, new = augment_detector_batch(x, boxes, np.random.default_rng(1), affine_prob=0.0, intensity=False)
    flipped = np.zeros(3, int)
    for i in range(len(x)):
        np.testing.assert_allclose(new[i].numpy(), _extent(out[i, 0].numpy()), atol=1e-5)
        np.testing.assert_allclose(new[i, 3:].numpy(), boxes[i, 3:].numpy(), atol=1e-5)  # sizes unchanged
        # Our convention: a flip maps c -> n - 1 - c; anything else leaves the centre alone.
        for axis, n in enumerate(SHAPE):
            c, c_new = float(boxes[i, axis]), float(new[i, axis])
            assert c_new == pytest.approx(c, abs=1e-5) or c_new == pytest.approx(n - 1 - c, abs=1e-5)
            flipped[axis] += abs(c_new - c) > 1e-3
    # Not vacuous: with p = 0.5 every axis was flipped in some of the 8 samples and kept in others.
    assert np.all(flipped > 0) and np.all(flipped < len(x))


def test_all_axes_flipped_with_probability_one():
    x, boxes = _cuboids(2, seed=3)
    out, new = augment_detector_batch(
        x, boxes, np.random.default_rng(0), flip_prob=1.0, affine_prob=0.0, intensity=False
    )
    assert torch.equal(out, torch.flip(x, dims=[2, 3, 4]))
    expected = boxes.clone()
    expected[:, :3] = torch.tensor(SHAPE, dtype=torch.float32) - 1 - boxes[:, :3]
    torch.testing.assert_close(new, expected)


def test_zoom_and_shift_move_boxes_with_the_cuboid():
    x, boxes = _cuboids(8, seed=1, margin=10)
    out, new = augment_detector_batch(
        x,
        boxes,
        np.random.default_rng(2),
        flip_prob=0.0,
        affine_prob=1.0,
        max_zoom=0.1,
        max_translate_voxels=3.0,
        intensity=False,
    )
    for i in range(len(x)):
        truth = _corners(_extent(out[i, 0].numpy()))
        np.testing.assert_allclose(_corners(new[i].numpy()), truth, atol=0.5 + 1e-4)
    # Not vacuous: the boxes really moved/resized by more than the tolerance somewhere.
    assert (new - boxes).abs().max() > 1.0
    # Isotropic zoom: the three size ratios of a sample agree (up to float error).
    ratio = new[:, 3:] / boxes[:, 3:]
    assert (ratio.max(dim=1).values - ratio.min(dim=1).values).max() < 1e-4
    assert ((ratio >= 0.9 - 1e-4) & (ratio <= 1.1 + 1e-4)).all()


def test_flips_and_affine_together_track_the_cuboid():
    x, boxes = _cuboids(12, seed=2, margin=10)
    out, new = augment_detector_batch(
        x, boxes, torch.Generator().manual_seed(5), flip_prob=0.5, affine_prob=0.5, intensity=False
    )
    for i in range(len(x)):
        truth = _corners(_extent(out[i, 0].numpy()))
        np.testing.assert_allclose(_corners(new[i].numpy()), truth, atol=0.5 + 1e-4)


def test_boxes_are_clipped_inside_the_volume():
    # Cuboids touching a corner; strong shifts push them partly out of the volume.
    x = torch.zeros((6, 1) + SHAPE)
    x[:, 0, :6, :10, :8] = 1.0
    boxes = torch.tensor([[2.5, 4.5, 3.5, 6.0, 10.0, 8.0]] * 6)
    out, new = augment_detector_batch(
        x, boxes, np.random.default_rng(0), flip_prob=0.5, affine_prob=1.0, max_translate_voxels=8.0, intensity=False
    )
    corners = np.stack([_corners(b) for b in new.numpy()])
    size = np.array(SHAPE, float)
    assert np.all(corners[:, :3] >= -0.5 - 1e-5) and np.all(corners[:, 3:] <= size - 0.5 + 1e-5)
    assert np.all(new[:, 3:].numpy() >= MIN_BOX_SIZE - 1e-5)
    clipped = 0
    for i in range(len(x)):
        vol = out[i, 0].numpy()
        if (vol > 0.5).any():  # the visible part of the cuboid still matches the clipped box
            np.testing.assert_allclose(corners[i], _corners(_extent(vol)), atol=0.5 + 1e-4)
        clipped += np.any(np.isclose(corners[i, :3], -0.5)) or np.any(np.isclose(corners[i, 3:], size - 0.5))
    assert clipped > 0  # some box really needed clipping


def test_box_entirely_outside_keeps_a_positive_size_inside():
    x = torch.zeros((1, 1) + SHAPE)
    boxes = torch.tensor([[-20.0, -30.0, 100.0, 2.0, 2.0, 2.0]])  # not in the volume at all
    _, new = augment_detector_batch(x, boxes, np.random.default_rng(0), flip_prob=0.0, affine_prob=0.0, intensity=False)
    c = _corners(new[0].numpy())
    assert np.all(new[0, 3:].numpy() >= MIN_BOX_SIZE - 1e-5)
    assert np.all(c[:3] >= -0.5 - 1e-5) and np.all(c[3:] <= np.array(SHAPE) - 0.5 + 1e-5)


def test_same_seed_same_output_and_inputs_untouched():
    x, boxes = _cuboids(4, seed=4)
    x_copy, boxes_copy = x.clone(), boxes.clone()
    a = augment_detector_batch(x, boxes, np.random.default_rng(7))
    b = augment_detector_batch(x, boxes, np.random.default_rng(7))
    c = augment_detector_batch(x, boxes, np.random.default_rng(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert torch.equal(x, x_copy) and torch.equal(boxes, boxes_copy)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(augment_detector_batch(x, boxes, g1)[0], augment_detector_batch(x, boxes, g2)[0])


def test_detector_output_dtype_range_and_shape():
    x, boxes = _cuboids(3, seed=5)
    out, new = augment_detector_batch(x, boxes, np.random.default_rng(0))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert new.shape == (3, 6) and new.dtype == torch.float32
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_intensity_stays_in_unit_range_and_varies_per_sample():
    # Saturated input: without clipping, noise and brightness would leave [0, 1].
    x = torch.zeros((4, 1, 8, 16, 16))
    x[:, :, :, :8] = 1.0
    out = augment_intensity(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.dtype == torch.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert not torch.equal(out, x)
    assert not torch.equal(out[0], out[1])  # per-sample parameters


def test_intensity_is_seeded():
    x = torch.rand((3, 1, 8, 16, 16))
    a = augment_intensity(x, torch.Generator().manual_seed(1))
    b = augment_intensity(x, torch.Generator().manual_seed(1))
    c = augment_intensity(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(augment_intensity(x, np.random.default_rng(4)), augment_intensity(x, np.random.default_rng(4)))


@pytest.mark.parametrize(
    "boxes, kwargs",
    [
        (torch.zeros(2, 6), {}),  # wrong batch size
        (torch.tensor([[10.0, 10, 10, 0, 4, 4]]), {}),  # zero size
        (torch.tensor([[float("nan"), 10, 10, 4, 4, 4]]), {}),
        (torch.tensor([[10.0, 10, 10, 4, 4, 4]]), {"flip_prob": 1.5}),
        (torch.tensor([[10.0, 10, 10, 4, 4, 4]]), {"max_zoom": 1.0}),
        (torch.tensor([[10.0, 10, 10, 4, 4, 4]]), {"max_translate_voxels": -1.0}),
    ],
)
def test_detector_augmentation_rejects_bad_input(boxes, kwargs):
    with pytest.raises(ValueError):
        augment_detector_batch(torch.zeros((1, 1) + SHAPE), boxes, np.random.default_rng(0), **kwargs)


def test_empty_batch_passes_through():
    out, new = augment_detector_batch(torch.zeros((0, 1) + SHAPE), torch.zeros(0, 6), np.random.default_rng(0))
    assert out.shape == (0, 1) + SHAPE and new.shape == (0, 6)


def test_bad_inputs_of_intensity_and_rng():
    with pytest.raises(ValueError):
        augment_intensity(torch.zeros(1, 8, 8, 8), torch.Generator())
    with pytest.raises(TypeError):
        augment_intensity(torch.zeros(1, 1, 8, 8, 8), 42)


# ---------------------------------------------------------------- the fast paths equal MONAI's transforms


@pytest.mark.parametrize(
    "zoom, shift",
    [(1.0, (0.0, 0.0, 0.0)), (0.9, (2.5, -3.0, 1.25)), (1.1, (-1.7, 0.4, -3.0)), (1.05, (40.0, 0.0, 0.0))],
)
def test_separable_resampling_equals_monai_affine(zoom, shift):
    from monai.transforms import Affine

    from client.augmentation import _zoom_shift, resample_zoom_shift

    img = torch.rand((1,) + SHAPE, generator=torch.Generator().manual_seed(0))
    forward = _zoom_shift(zoom, np.asarray(shift))
    ref = Affine(affine=np.linalg.inv(forward), padding_mode="zeros", image_only=True)(img)
    ours = resample_zoom_shift(img, zoom, shift)
    torch.testing.assert_close(ours, torch.as_tensor(ref).as_tensor(), atol=2e-5, rtol=0)
    if shift[0] > 32:  # moved entirely out of the volume: zero padding, nothing mirrored in
        assert float(ours.abs().max()) == 0.0


@pytest.mark.parametrize("axes", [(0,), (1, 2), (0, 1, 2)])
def test_flips_folded_into_the_resampling_equal_monai_flip_then_affine(axes):
    from monai.transforms import Affine, Flip

    from client.augmentation import _zoom_shift, resample_zoom_shift

    img = torch.rand((1,) + SHAPE, generator=torch.Generator().manual_seed(2))
    zoom, shift = 0.93, (1.5, -2.25, 0.75)
    flipped = torch.as_tensor(Flip(spatial_axis=axes)(img)).as_tensor()
    ref = Affine(affine=np.linalg.inv(_zoom_shift(zoom, np.asarray(shift))), padding_mode="zeros", image_only=True)(
        flipped
    )
    ours = resample_zoom_shift(img, zoom, shift, flip_axes=axes)
    torch.testing.assert_close(ours, torch.as_tensor(ref).as_tensor(), atol=2e-5, rtol=0)


@pytest.mark.parametrize("factor, offset, gamma", [(0.07, -0.03, 1.0), (-0.09, 0.04, 0.83), (0.0, 0.0, 1.21)])
def test_intensity_arithmetic_equals_monai_transforms(factor, offset, gamma):
    from monai.transforms import AdjustContrast, ScaleIntensity, ShiftIntensity

    from client.augmentation import _apply_intensity

    img = torch.rand((1, 8, 16, 16), generator=torch.Generator().manual_seed(1))
    ref = ShiftIntensity(offset)(ScaleIntensity(minv=None, maxv=None, factor=factor)(img))
    if gamma != 1.0:
        ref = AdjustContrast(gamma)(ref)
    torch.testing.assert_close(
        _apply_intensity(img, factor, offset, gamma), torch.as_tensor(ref).as_tensor(), atol=1e-6, rtol=1e-5
    )
    # the noise: N(0, std) in float32, seeded
    a = _apply_intensity(img, 0.0, 0.0, 1.0, noise_std=0.02, noise_seed=5) - img
    b = _apply_intensity(img, 0.0, 0.0, 1.0, noise_std=0.02, noise_seed=5) - img
    assert torch.equal(a, b) and abs(float(a.mean())) < 0.002 and abs(float(a.std()) - 0.02) < 0.002
