"""Preprocessing geometry and intensity: expected values derived by hand from the conventions."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from shared_models.preprocessing import (
    GridGeometry,
    PreprocessingSpec,
    box_lps_to_voxel,
    box_voxel_to_lps,
    clip_box_to_image,
    crop_grid,
    field_of_view_mask,
    hemi_grid,
    midline_x_mm,
    orient_lps,
    resample_crop,
    resample_hemi,
    to_grid,
    window,
)

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"
PROSTATEX = REAL / "prostatex-0000-pelvis-t2-axial.nii.gz"

SPEC = PreprocessingSpec()

# Phantom geometry (LPS, identity direction): 120 x 100 x 50 voxels of 2 x 2 x 3 mm.
# Voxel edges: x at -113 + 2n (extent [-113, 127], midline 7), y at -81 + 2n (extent
# [-81, 119], centre 19), z at -61.5 + 3n (extent [-61.5, 88.5], centre 13.5).
ORIGIN = (-112.0, -80.0, -60.0)
SPACING = (2.0, 2.0, 3.0)
SIZE = (120, 100, 50)
MIDLINE = 7.0
# Blobs on voxel edges: 50..70 mm lateral of the midline on each side, at different y/z.
BOX_L = (57.0, 9.0, 4.5, 77.0, 29.0, 28.5)
BOX_R = (-63.0, -21.0, -22.5, -43.0, -1.0, 1.5)
# Hand-derived hemi-grid voxel boxes (cz, cy, cx, d, h, w): hemi spacing (4, 2, 2.5) mm,
# D from z = 13.5 - 64 = -50.5, H from y = 19 - 112 = -93, W from the midline outwards;
# index = distance / spacing - 0.5.
VOXEL_BOX_L = (16.25, 55.5, 23.5, 6.0, 10.0, 8.0)
VOXEL_BOX_R = (9.5, 40.5, 23.5, 6.0, 10.0, 8.0)


def phantom(blob_value: float = 1000.0) -> sitk.Image:
    """Zero background, ``blob_value`` in every voxel whose centre lies in BOX_L or BOX_R."""
    x = ORIGIN[0] + SPACING[0] * np.arange(SIZE[0])
    y = ORIGIN[1] + SPACING[1] * np.arange(SIZE[1])
    z = ORIGIN[2] + SPACING[2] * np.arange(SIZE[2])
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    array = np.zeros(SIZE[::-1], dtype=np.float32)
    for b in (BOX_L, BOX_R):
        inside = (xx > b[0]) & (xx < b[3]) & (yy > b[1]) & (yy < b[4]) & (zz > b[2]) & (zz < b[5])
        array[inside] = blob_value
    image = sitk.GetImageFromArray(array)
    image.SetOrigin(ORIGIN)
    image.SetSpacing(SPACING)
    return image


def centroid(array: np.ndarray, background: float) -> np.ndarray:
    weights = np.clip(array - background, 0, None).astype(np.float64)
    idx = np.indices(array.shape).reshape(3, -1)
    return (idx * weights.ravel()).sum(axis=1) / weights.sum()


# -- spec --------------------------------------------------------------------------------------


def test_spec_defaults_and_json_round_trip():
    spec = PreprocessingSpec()
    assert spec.hemi_shape == (32, 112, 64)
    assert spec.hemi_spacing_mm == (4.0, 2.0, 2.5)
    again = PreprocessingSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec and isinstance(again.hemi_shape, tuple)
    custom = PreprocessingSpec(crop_shape=(16, 24, 24), crop_margin_mm=4.0, window_level=100.0)
    assert PreprocessingSpec.from_dict(json.loads(json.dumps(custom.to_dict()))) == custom


@pytest.mark.parametrize(
    "key, value",
    [
        ("hemi_shape", [32, 0, 64]),
        ("hemi_shape", [32, 112]),
        ("hemi_shape", [32.5, 112, 64]),
        ("hemi_fov_mm", [128, -1, 160]),
        ("window_width", 0),
        ("window_level", "300"),
        ("crop_shape", "32"),
        ("crop_margin_mm", -1),
        ("orientation", "RAS"),
        ("version", 0),
    ],
)
def test_spec_validation_names_the_key(key, value):
    d = PreprocessingSpec().to_dict()
    d[key] = value
    with pytest.raises(ValueError, match=key):
        PreprocessingSpec.from_dict(d)


def test_spec_missing_and_unknown_keys():
    d = PreprocessingSpec().to_dict()
    del d["window_width"]
    with pytest.raises(ValueError, match="window_width"):
        PreprocessingSpec.from_dict(d)
    d = PreprocessingSpec().to_dict()
    d["gamma"] = 1
    with pytest.raises(ValueError, match="gamma"):
        PreprocessingSpec.from_dict(d)


def test_grid_geometry_round_trip():
    grid = hemi_grid(phantom(), "R", SPEC)
    assert GridGeometry.from_dict(json.loads(json.dumps(grid.to_dict()))) == grid
    assert GridGeometry.of(grid.reference_image()) == grid
    with pytest.raises(ValueError, match="direction"):
        GridGeometry.from_dict({**grid.to_dict(), "direction": [1, 0, 0]})


# -- intensity -----------------------------------------------------------------------------------


def test_window_values():
    out = window(np.array([-1000.0, -450.0, 300.0, 1050.0, 5000.0, 675.0]), SPEC)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 1.0, 1.0, 0.75], atol=1e-7)


# -- hemi grid -----------------------------------------------------------------------------------


def test_midline_and_hemi_grids():
    image = phantom()
    assert midline_x_mm(image) == pytest.approx(MIDLINE)
    left, right = hemi_grid(image, "L", SPEC), hemi_grid(image, "R", SPEC)
    for grid in (left, right):
        assert grid.size_dhw == (32, 112, 64)
        assert grid.spacing_dhw_mm == pytest.approx((4.0, 2.0, 2.5))
    # First W voxel centre half a voxel from the midline, D/H centred on the extent.
    assert left.origin_lps_mm == pytest.approx((MIDLINE + 1.25, 19.0 - 112 + 1.0, 13.5 - 64 + 2.0))
    assert right.origin_lps_mm == pytest.approx((MIDLINE - 1.25, 19.0 - 112 + 1.0, 13.5 - 64 + 2.0))
    assert left.direction == (1, 0, 0, 0, 1, 0, 0, 0, 1)
    assert right.direction == (-1, 0, 0, 0, 1, 0, 0, 0, 1)


@pytest.mark.parametrize("bad", ["l", "left", "", None])
def test_bad_side_is_refused(bad):
    with pytest.raises(ValueError, match="side"):
        resample_hemi(phantom(), bad, SPEC)
    with pytest.raises(ValueError, match="side"):
        crop_grid(BOX_L, bad, SPEC)


@pytest.mark.parametrize("side, box, expected", [("L", BOX_L, VOXEL_BOX_L), ("R", BOX_R, VOXEL_BOX_R)])
def test_blob_lands_where_the_box_says(side, box, expected):
    array, grid = resample_hemi(phantom(), side, SPEC)
    assert array.shape == (32, 112, 64) and array.dtype == np.float32
    assert 0.0 <= array.min() and array.max() <= 1.0
    voxel_box = box_lps_to_voxel(box, grid)
    assert voxel_box.dtype == np.float32
    np.testing.assert_allclose(voxel_box, expected, atol=1e-4)
    # The resampled blob's centre of mass is the box centre (0 maps to 0.3 in the window).
    np.testing.assert_allclose(centroid(array, window(np.zeros(1), SPEC)[0]), expected[:3], atol=0.3)


def test_hemi_does_not_depend_on_storage_orientation():
    image = phantom()
    for code in ("RAI", "PIR"):
        other = sitk.DICOMOrient(image, code)
        assert other.GetDirection() != image.GetDirection()
        for side in "LR":
            a, grid_a = resample_hemi(image, side, SPEC)
            b, grid_b = resample_hemi(other, side, SPEC)
            np.testing.assert_allclose(b, a, atol=1e-5)
            assert grid_b.origin_lps_mm == pytest.approx(grid_a.origin_lps_mm)
        back = orient_lps(other)
        np.testing.assert_allclose(back.GetDirection(), np.eye(3).ravel())
        np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


# -- boxes ------------------------------------------------------------------------------------------


def test_full_fov_box_spans_the_whole_grid():
    for side in "LR":
        grid = hemi_grid(phantom(), side, SPEC)
        x0, x1 = (MIDLINE, MIDLINE + 160) if side == "L" else (MIDLINE - 160, MIDLINE)
        box = (x0, 19 - 112, 13.5 - 64, x1, 19 + 112, 13.5 + 64)
        np.testing.assert_allclose(box_lps_to_voxel(box, grid), (15.5, 55.5, 31.5, 32, 112, 64), atol=1e-4)


def test_box_round_trip_on_hemi_and_crop_grids():
    rng = np.random.default_rng(3)
    image = phantom()
    grids = [hemi_grid(image, s, SPEC) for s in "LR"] + [crop_grid(BOX_L, "L", SPEC), crop_grid(BOX_R, "R", SPEC)]
    for grid in grids:
        for _ in range(20):
            low = rng.uniform(-100, 100, 3)
            box = np.concatenate([low, low + rng.uniform(1, 60, 3)])
            voxel = box_lps_to_voxel(box, grid)
            np.testing.assert_allclose(box_voxel_to_lps(voxel, grid), box, atol=1e-3)
            # voxel -> LPS -> voxel too (float32 voxel boxes).
            np.testing.assert_allclose(box_lps_to_voxel(box_voxel_to_lps(voxel, grid), grid), voxel, atol=1e-3)


def test_box_hull_on_a_rotated_grid_contains_the_box():
    angle = np.deg2rad(30)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    grid = GridGeometry((10, 20, 30), (0.0, 0.0, 0.0), (2.0, 1.0, 1.0), tuple(rot.ravel()))
    box = (5.0, 5.0, 4.0, 15.0, 9.0, 10.0)
    back = box_voxel_to_lps(box_lps_to_voxel(box, grid), grid)
    assert np.all(back[:3] <= np.array(box[:3]) + 1e-6) and np.all(back[3:] >= np.array(box[3:]) - 1e-6)


def test_bad_boxes_are_refused():
    grid = hemi_grid(phantom(), "L", SPEC)
    with pytest.raises(ValueError, match="x0<x1"):
        box_lps_to_voxel((10, 0, 0, 5, 1, 1), grid)
    with pytest.raises(ValueError, match="6 finite numbers"):
        box_lps_to_voxel((1, 2, 3), grid)


# -- crops ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("side, box", [("L", BOX_L), ("R", BOX_R)])
def test_crop_is_centred_on_the_box(side, box):
    array, grid = resample_crop(phantom(), box, side, SPEC)
    assert array.shape == (32, 32, 32) and array.dtype == np.float32
    extent = np.array(box[3:]) - np.array(box[:3]) + 2 * SPEC.crop_margin_mm  # (x, y, z)
    np.testing.assert_allclose(grid.spacing_dhw_mm, extent[::-1] / 32)
    np.testing.assert_allclose(box_lps_to_voxel(box, grid)[:3], (15.5, 15.5, 15.5), atol=1e-4)
    np.testing.assert_allclose(centroid(array, window(np.zeros(1), SPEC)[0]), (15.5, 15.5, 15.5), atol=0.3)


def test_crop_w_runs_medial_to_lateral_on_both_sides():
    # A marker on the lateral face of each blob must appear at high W in both crops.
    image = phantom(blob_value=500.0)
    array = sitk.GetArrayFromImage(image)
    for box in (BOX_L, BOX_R):
        lateral_x = box[3] - 1.0 if box is BOX_L else box[0] + 1.0
        i, j, k = image.TransformPhysicalPointToIndex((lateral_x, (box[1] + box[4]) / 2, (box[2] + box[5]) / 2))
        array[k - 1 : k + 2, j - 1 : j + 2, i] = 1000.0
    marked = sitk.GetImageFromArray(array)
    marked.CopyInformation(image)
    for side, box in (("L", BOX_L), ("R", BOX_R)):
        crop, _ = resample_crop(marked, box, side, SPEC)
        w_profile = crop.max(axis=(0, 1))
        assert int(np.argmax(w_profile)) > 16


# -- back to the study grid -----------------------------------------------------------------------


def test_to_grid_matches_target_geometry_and_values():
    angle = np.deg2rad(20)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    target = sitk.Image(30, 40, 20, sitk.sitkInt16)
    target.SetSpacing((1.5, 1.5, 2.5))
    target.SetOrigin((-10.0, -20.0, -5.0))
    target.SetDirection(tuple(rot.ravel()))
    box = (0.0, 0.0, 10.0, 12.0, 14.0, 20.0)
    for side in "LR":
        src = crop_grid(box, side, SPEC)
        # A map equal to its own D index: linear interpolation reproduces it exactly inside.
        cam = np.broadcast_to(np.arange(32, dtype=np.float32)[:, None, None], (32, 32, 32)).copy()
        out = to_grid(cam, src, target)
        assert out.GetSize() == target.GetSize()
        assert out.GetSpacing() == target.GetSpacing()
        assert out.GetOrigin() == target.GetOrigin()
        assert out.GetDirection() == target.GetDirection()
        assert out.GetPixelID() == sitk.sitkFloat32
        values = sitk.GetArrayFromImage(out)
        # At a target voxel near the box centre the map reads the crop's continuous D index
        # there: the crop spans z in [10 - 8, 20 + 8] mm with 32 voxels of 26/32 mm.
        ijk = target.TransformPhysicalPointToIndex((6.0, 7.0, 15.0))
        z = target.TransformIndexToPhysicalPoint(ijk)[2]
        assert values[ijk[::-1]] == pytest.approx((z - 2.0) / (26.0 / 32) - 0.5, abs=1e-3)
        assert values[0, 0, 0] == 0.0  # far outside the crop
    with pytest.raises(ValueError, match="shape"):
        to_grid(np.zeros((4, 4, 4)), crop_grid(box, "L", SPEC), target)


def test_to_grid_value_at_exact_point():
    src = crop_grid(BOX_L, "L", SPEC)
    cam = np.broadcast_to(np.arange(32, dtype=np.float32)[:, None, None], (32, 32, 32)).copy()
    # Target: a single voxel placed exactly at the box centre (continuous D index 15.5).
    target = sitk.Image(1, 1, 1, sitk.sitkFloat32)
    target.SetOrigin(tuple((np.array(BOX_L[:3]) + np.array(BOX_L[3:])) / 2))
    assert sitk.GetArrayFromImage(to_grid(cam, src, target))[0, 0, 0] == pytest.approx(15.5, abs=1e-4)


# -- real data ----------------------------------------------------------------------------------


@pytest.mark.skipif(not PROSTATEX.is_file(), reason=f"real test data {PROSTATEX} is missing")
def test_real_prostatex_hemi_both_sides():
    image = orient_lps(sitk.ReadImage(str(PROSTATEX), sitk.sitkFloat32))
    assert image.GetSize() == (384, 384, 19)
    for side in "LR":
        array, grid = resample_hemi(image, side, SPEC)
        assert array.shape == (32, 112, 64) and array.dtype == np.float32
        assert np.isfinite(array).all() and 0 <= array.min() and array.max() <= 1
        # Real anatomy inside: the windowed field is far from constant.
        assert array.std() > 0.05
    # The two sides mirror each other around the midline: their W=0 planes are adjacent.
    left, right = hemi_grid(image, "L", SPEC), hemi_grid(image, "R", SPEC)
    assert left.origin_lps_mm[0] - right.origin_lps_mm[0] == pytest.approx(2.5)


def test_box_decoding_to_lps_and_back_on_an_oblique_study():
    """An oblique acquisition (rotated 12° about S and 8° about L): a ball placed at a known LPS
    point shows up in the LPS-aligned hemi-volume where the voxel -> LPS decoding says it is."""
    a, b = np.deg2rad(12.0), np.deg2rad(8.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    direction = rz @ rx
    size, spacing = np.array([160, 120, 40]), np.array([1.5, 1.5, 4.0])  # (i, j, k)
    origin = -direction @ (spacing * (size - 1) / 2)  # image centre at the LPS origin
    centre_lps, radius = np.array([62.0, 10.0, -6.0]), 9.0  # patient left of the midline
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in size], indexing="ij"), axis=-1).reshape(-1, 3)
    pts = origin + (ijk * spacing) @ direction.T
    inside = np.linalg.norm(pts - centre_lps, axis=1) <= radius
    array = np.where(inside, 1500.0, 0.0).reshape(*size).transpose(2, 1, 0).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetOrigin(tuple(origin))
    image.SetSpacing(tuple(spacing))
    image.SetDirection(tuple(direction.ravel()))

    hemi, grid = resample_hemi(orient_lps(image), "L", SPEC)
    found = centroid(hemi, window(np.zeros(1), SPEC)[0])  # (d, h, w) voxel centre of the ball
    voxel_box = np.concatenate([found, [6.0, 8.0, 6.0]]).astype(np.float32)
    lps = box_voxel_to_lps(voxel_box, grid)
    # the decoded box is centred on the ball (within one hemi voxel, 4 x 2 x 2.5 mm) ...
    np.testing.assert_allclose((lps[:3] + lps[3:]) / 2, centre_lps, atol=2.5)
    # ... has the voxel size times the hemi spacing in mm (x: W, y: H, z: D) ...
    np.testing.assert_allclose(lps[3:] - lps[:3], [6.0 * 2.5, 8.0 * 2.0, 6.0 * 4.0], atol=1e-6)
    # ... and goes back to the same voxel box exactly (the hemi grid is LPS-aligned)
    np.testing.assert_allclose(box_lps_to_voxel(lps, grid), voxel_box, atol=1e-4)


def test_field_of_view_mask_marks_voxels_inside_the_scan():
    # the phantom's voxel centres run x = -112 .. 126 mm (edges -113 .. 127); this grid's x
    # centres are 120, 122, ... 138 mm: the first four (120 .. 126) are inside
    grid = GridGeometry((3, 4, 10), (120.0, 0.0, 0.0), (3.0, 2.0, 2.0), tuple(np.eye(3).ravel()))
    mask = field_of_view_mask(phantom(), grid)
    assert mask.shape == (3, 4, 10) and mask.dtype == bool
    assert mask[..., :4].all() and not mask[..., 4:].any()


def test_clip_box_to_image_keeps_boxes_inside_the_scan():
    # the phantom's voxel edges: x -113 .. 127, y -81 .. 119, z -61.5 .. 88.5 mm
    inside = (0.0, 0.0, 0.0, 10.0, 10.0, 10.0)
    np.testing.assert_array_equal(clip_box_to_image(inside, phantom()), inside)
    np.testing.assert_allclose(
        clip_box_to_image((100.0, -90.0, 80.0, 140.0, -70.0, 95.0), phantom()), (100.0, -81.0, 80.0, 127.0, -70.0, 88.5)
    )
    outside = clip_box_to_image((200.0, 0.0, 0.0, 220.0, 10.0, 10.0), phantom())
    assert outside[0] == outside[3] == 127.0  # collapsed onto the nearest face
