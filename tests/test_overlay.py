"""Inference figures: boxes and Grad-CAM land where the anatomy is, in physical proportions.

The synthetic study is oblique (rotated about z and x) with anisotropic voxels (0.8 x 0.8 x 3 mm).
Two bright axis-aligned LPS cuboids stand in for the femoral heads: "R" at -x (patient right),
"L" at +x, each also displaced along y and z in a different direction, so any flipped or swapped
display axis moves the bright pixels away from the drawn box. Bright voxels are set from the
voxel-centre positions computed here with numpy (origin + direction @ (spacing * index)),
independently of the module's SimpleITK resampling and of its box-to-pixel arithmetic.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk
from matplotlib import image as mpimg

from shared_models.overlay import (
    SliceGrid,
    cam_rgba,
    montage_panels,
    overview_panels,
    write_infer_figures,
)
from shared_models.pipeline import HeadResult
from shared_models.preprocessing import PreprocessingSpec, crop_grid
from tests.conftest import real_data_or_skip

SIZE_IJK = (40, 48, 12)
SPACING = np.array([0.8, 0.8, 3.0])
BACKGROUND, BRIGHT = 100.0, 1000.0
THRESHOLD = (BACKGROUND + BRIGHT) / 2.0
HALF_SIZE = np.array([4.0, 4.0, 4.5])  # cuboid half extents (x, y, z), mm
OFFSETS = {"R": np.array([-7.0, 5.0, -5.0]), "L": np.array([7.0, -6.0, 6.0])}  # from the volume centre, LPS mm


def _rotation() -> np.ndarray:
    a, b = np.deg2rad(20.0), np.deg2rad(10.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return rz @ rx


ROT = _rotation()
ORIGIN = np.array([-12.0, -20.0, -15.0])


def _voxel_centres() -> np.ndarray:
    """LPS mm of every voxel centre, array-ordered ``(k, j, i, 3)``."""
    k, j, i = np.meshgrid(*[np.arange(n) for n in SIZE_IJK[::-1]], indexing="ij")
    idx = np.stack([i, j, k], axis=-1).astype(float)
    return ORIGIN + (idx * SPACING) @ ROT.T


CENTRES = _voxel_centres()
VOLUME_CENTRE = ORIGIN + ROT @ ((np.array(SIZE_IJK) - 1) / 2.0 * SPACING)
BOXES = {s: np.concatenate([VOLUME_CENTRE + o - HALF_SIZE, VOLUME_CENTRE + o + HALF_SIZE]) for s, o in OFFSETS.items()}
# one voxel cell projected on each LPS axis: how far a linearly interpolated edge can move
CELL_MM = np.abs(ROT) @ SPACING


def _inside(points: np.ndarray, box: np.ndarray) -> np.ndarray:
    return np.all((points >= box[:3]) & (points <= box[3:]), axis=-1)


def _image(values_kji: np.ndarray) -> sitk.Image:
    img = sitk.GetImageFromArray(values_kji.astype(np.float32))
    img.SetSpacing(tuple(SPACING))
    img.SetOrigin(tuple(ORIGIN))
    img.SetDirection(tuple(ROT.ravel()))
    return img


@pytest.fixture(scope="module")
def study() -> sitk.Image:
    values = np.full(CENTRES.shape[:3], BACKGROUND)
    for box in BOXES.values():
        # the cuboid, widened by one voxel cell, must lie inside the oblique volume
        corners = np.array(list(itertools.product(*zip(box[:3] - CELL_MM, box[3:] + CELL_MM))))
        idx = (corners - ORIGIN) @ ROT / SPACING
        assert np.all(idx >= 0) and np.all(idx <= np.array(SIZE_IJK) - 1), "fixture cuboid leaves the volume"
        values[_inside(CENTRES, box)] = BRIGHT
    return _image(values)


def _result(side: str, box: np.ndarray, cam: sitk.Image, **kw) -> HeadResult:
    return HeadResult(
        side=side,
        box_lps_mm=tuple(float(v) for v in box),
        detector_score=0.9,
        low_confidence=False,
        stage_probabilities={"0": 0.2, "I": 0.5, "II": 0.3},
        predicted_stage="I",
        gradcam=cam,
        gradcam_volume_mm3=123.0,
        **kw,
    )


def _cam_on(box: np.ndarray) -> sitk.Image:
    return _image(_inside(CENTRES, box).astype(np.float32))


@pytest.fixture(scope="module")
def results() -> list[HeadResult]:
    return [_result(side, BOXES[side], _cam_on(BOXES[side])) for side in ("R", "L")]


def _tolerance_px(grid: SliceGrid) -> tuple[float, float]:
    """Per display axis (cols, rows): one source voxel cell plus half a display pixel, in pixels."""
    col_dir, row_dir, _ = grid.directions
    return tuple(float(np.abs(d) @ CELL_MM) / grid.spacing_mm + 0.5 for d in (col_dir, row_dir))


def _assert_rect_frames_bright(panel_array: np.ndarray, rect, grid: SliceGrid) -> None:
    """Every bright pixel lies within the rectangle (give or take one voxel), and the rectangle's
    interior (shrunk by the same tolerance) is entirely bright."""
    bright = np.nan_to_num(panel_array, nan=0.0) > THRESHOLD
    rows, cols = np.nonzero(bright)
    assert rows.size > 0, "the cuboid is not on the display slice"
    c0, r0, c1, r1 = rect
    tc, tr = _tolerance_px(grid)
    assert cols.min() >= c0 - tc and cols.max() <= c1 + tc
    assert rows.min() >= r0 - tr and rows.max() <= r1 + tr
    rr, cc = np.mgrid[: bright.shape[0], : bright.shape[1]]
    interior = (cc >= c0 + tc) & (cc <= c1 - tc) & (rr >= r0 + tr) & (rr <= r1 - tr)
    assert interior.sum() >= 4
    assert bright[interior].all()


def test_montage_box_sits_on_the_bright_cuboid_in_every_plane(study, results):
    for r in results:
        panels = montage_panels(study, r)
        assert [p.grid.plane for p in panels] == ["axial", "coronal", "sagittal"]
        for p in panels:
            # the plane passes through the box centre
            centre = (BOXES[r.side][:3] + BOXES[r.side][3:]) / 2.0
            assert p.grid.position_mm == pytest.approx(float(centre @ p.grid.directions[2]), abs=1e-6)
            _assert_rect_frames_bright(p.mri, p.boxes[0].rect_px, p.grid)


def test_montage_heatmap_is_where_the_cam_is(study, results):
    for r in results:
        for p in montage_panels(study, r):
            bright = np.nan_to_num(p.mri) > THRESHOLD
            cam = p.cam
            assert cam.shape == p.mri.shape
            # the CAM is 1 on the cuboid's voxels, 0 elsewhere: same support as the bright pixels
            assert np.all(cam[bright] > 0.0)
            c0, r0, c1, r1 = p.boxes[0].rect_px
            tc, tr = _tolerance_px(p.grid)
            rr, cc = np.mgrid[: cam.shape[0], : cam.shape[1]]
            far = (cc < c0 - tc) | (cc > c1 + tc) | (rr < r0 - tr) | (rr > r1 + tr)
            assert far.any() and np.all(cam[far] == 0.0)
            alpha = cam_rgba(cam)[..., 3]
            assert np.all(alpha[bright] > 0.0) and np.all(alpha[cam == 0.0] == 0.0)


def test_overview_shows_each_box_on_its_own_cuboid_in_radiological_orientation(study, results):
    rows = overview_panels(study, results)
    assert len(rows) == 2 and all(len(row) == 3 for row in rows)
    for r, row in zip(results, rows):
        for p in row:
            # the slices through one head's centre miss the other cuboid, so only its own box is drawn
            assert [b.label for b in p.boxes] == [r.side]
            _assert_rect_frames_bright(p.mri, p.boxes[0].rect_px, p.grid)
    # where the bright pixels are on the panel, relative to its centre (independent of the box rectangles):
    # axial: patient left (+x) on image right, anterior (-y) at the top; coronal and sagittal: superior at the top;
    # sagittal: anterior on the left.
    for r, row in zip(results, rows):
        offset = OFFSETS[r.side]
        for p in row:
            rows_px, cols_px = np.nonzero(np.nan_to_num(p.mri) > THRESHOLD)
            drow = rows_px.mean() - (p.grid.shape[0] - 1) / 2.0
            dcol = cols_px.mean() - (p.grid.shape[1] - 1) / 2.0
            expect_col, expect_row = {
                "axial": (offset[0], offset[1]),
                "coronal": (offset[0], -offset[2]),
                "sagittal": (offset[1], -offset[2]),
            }[p.grid.plane]
            assert np.sign(dcol) == np.sign(expect_col) and abs(dcol) * p.grid.spacing_mm > 3.0
            assert np.sign(drow) == np.sign(expect_row) and abs(drow) * p.grid.spacing_mm > 3.0


def test_display_is_isotropic_in_mm_for_anisotropic_voxels(study, results):
    # a 9 mm tall cuboid sampled with 3 mm slices must look 9 mm tall, not 3 voxels tall
    p = montage_panels(study, results[1])[1]  # coronal: rows run along z
    rows_px, cols_px = np.nonzero(np.nan_to_num(p.mri) > THRESHOLD)
    height_mm = (rows_px.max() - rows_px.min() + 1) * p.grid.spacing_mm
    width_mm = (cols_px.max() - cols_px.min() + 1) * p.grid.spacing_mm
    assert height_mm == pytest.approx(2 * HALF_SIZE[2], abs=CELL_MM[2] + p.grid.spacing_mm)
    assert width_mm == pytest.approx(2 * HALF_SIZE[0], abs=CELL_MM[0] + p.grid.spacing_mm)


def test_montage_uses_the_crop_grid_map_and_draws_the_crop(study):
    box = BOXES["L"]
    spec = PreprocessingSpec()
    grid = crop_grid(box, "L", spec)
    ref = grid.reference_image()
    k, j, i = np.meshgrid(*[np.arange(n) for n in grid.size_dhw], indexing="ij")
    idx = np.stack([i, j, k], axis=-1).astype(float)
    direction = np.array(grid.direction).reshape(3, 3)
    centres = np.asarray(grid.origin_lps_mm) + (idx * np.array(grid.spacing_dhw_mm[::-1])) @ direction.T
    cam_crop = _inside(centres, box).astype(np.float32)
    assert ref.GetSize() == tuple(grid.size_dhw[::-1]) and cam_crop.any()
    # the input-geometry map is deliberately empty: the figure must use the crop-grid map
    empty = _image(np.zeros(CENTRES.shape[:3]))
    r = _result("L", box, empty, crop_grid=grid, gradcam_crop=cam_crop)
    for p in montage_panels(study, r):
        labels = [b.label for b in p.boxes]
        assert labels == ["L box", "crop"]
        (bc0, br0, bc1, br1), (cc0, cr0, cc1, cr1) = p.boxes[0].rect_px, p.boxes[1].rect_px
        margin_px = spec.crop_margin_mm / p.grid.spacing_mm
        np.testing.assert_allclose([bc0 - cc0, br0 - cr0, cc1 - bc1, cr1 - br1], margin_px, rtol=1e-6)
        hot_rows, hot_cols = np.nonzero(p.cam >= 0.5)
        assert hot_rows.size > 0
        tol = max(grid.spacing_dhw_mm) / p.grid.spacing_mm + 0.5
        assert hot_cols.min() >= bc0 - tol and hot_cols.max() <= bc1 + tol
        assert hot_rows.min() >= br0 - tol and hot_rows.max() <= br1 + tol


def test_write_infer_figures_writes_readable_pngs(study, results, tmp_path):
    paths = write_infer_figures(study, results, tmp_path / "figs")
    assert [p.name for p in paths] == ["overview.png", "gradcam_R.png", "gradcam_L.png"]
    for path in paths:
        png = mpimg.imread(path)
        assert png.ndim == 3 and png.shape[2] in (3, 4)
        assert 400 <= png.shape[0] <= 3000 and 600 <= png.shape[1] <= 3000
        assert png[..., :3].std() > 0.05  # not a blank canvas


def test_zero_cam_and_box_partly_outside_the_field_of_view_do_not_crash(study, tmp_path):
    low, high = BOXES["L"][:3].copy(), BOXES["L"][3:].copy()
    shift = np.array([12.0, 0.0, 0.0])  # pushes the box across the +x edge of the volume
    box = np.concatenate([low + shift, high + shift])
    zero = _image(np.zeros(CENTRES.shape[:3]))
    r = HeadResult(
        side="L",
        box_lps_mm=tuple(box),
        detector_score=0.01,
        low_confidence=True,
        stage_probabilities={"0": 0.34, "I": 0.33, "II": 0.33},
        predicted_stage="0",
        gradcam=zero,
        gradcam_volume_mm3=0.0,
    )
    paths = write_infer_figures(study, [r], tmp_path)
    assert all(p.is_file() for p in paths)
    for p in montage_panels(study, r):
        assert np.all(p.cam == 0.0) and np.all(cam_rgba(p.cam)[..., 3] == 0.0)
        assert p.boxes[0].dashed  # low-confidence box
    axial = overview_panels(study, [r])[0][0]
    c0, r0, c1, r1 = axial.boxes[0].rect_px
    # the overview widens to the box, whose outer part is outside the scan (NaN, drawn as "not scanned")
    assert c1 <= axial.grid.shape[1] - 0.5 + 1e-6
    inside_rect = axial.mri[int(np.ceil(r0)) : int(r1) + 1, int(np.ceil(c0)) : int(c1) + 1]
    assert np.isnan(inside_rect).any() and np.isfinite(inside_rect).any()


def test_figures_on_the_real_oblique_pelvic_mri(tmp_path):
    nifti = real_data_or_skip("prostatex-0000-pelvis-t2-axial.nii.gz")
    image = sitk.ReadImage(str(nifti))  # int16, oblique, 0.5 x 0.5 x 3 mm
    zero = sitk.Image(image.GetSize(), sitk.sitkFloat32)
    zero.CopyInformation(image)
    # a box on the right femoral head as seen in this study (LPS mm), running off the -x edge of the scan
    r = _result("R", np.array([-65.0, -3.0, -60.0, -29.0, 32.0, -16.0]), zero)
    paths = write_infer_figures(image, [r], tmp_path)
    assert [p.name for p in paths] == ["overview.png", "gradcam_R.png"]
    axial = overview_panels(image, [r])[0][0]
    # isotropic 0.5 mm display of a ~192 mm field of view
    assert axial.grid.spacing_mm == pytest.approx(0.5)
    assert 350 <= axial.grid.shape[1] <= 512


def test_not_assessed_head_titles_say_why_instead_of_a_stage(study, tmp_path):
    zero = _image(np.zeros(CENTRES.shape[:3]))
    r = HeadResult(
        side="R",
        box_lps_mm=tuple(float(v) for v in BOXES["R"]),
        detector_score=0.2,
        low_confidence=True,
        stage_probabilities={},
        predicted_stage=None,
        gradcam=zero,
        gradcam_volume_mm3=0.0,
        not_assessed=("detector score 0.20 is below the validation threshold 0.35",),
        flags=("low_detector_score",),
    )
    from shared_models.overlay import _head_caption, not_assessed_text

    text = not_assessed_text(r)
    assert text == "not assessed: detector score 0.20 is below the validation threshold 0.35"
    assert text in _head_caption(r) and "stage" not in _head_caption(r).split(";")[0].replace("not assessed", "")
    assert not_assessed_text(_result("L", BOXES["L"], zero)) is None
    paths = write_infer_figures(study, [r], tmp_path)
    assert all(p.is_file() for p in paths)


def test_a_box_clipped_to_zero_extent_at_the_scans_edge_still_draws(study, tmp_path):
    # a detector box wholly outside the scan is clipped to the edge (zero extent along one axis); the head is
    # "not assessed" and its figures must still be written (a new user's `onfh infer` crashed here)
    box = BOXES["L"].copy()
    box[4] = box[1]  # y1 == y0
    zero = _image(np.zeros(CENTRES.shape[:3]))
    r = HeadResult(
        side="L",
        box_lps_mm=tuple(float(v) for v in box),
        detector_score=0.01,
        low_confidence=True,
        stage_probabilities={},
        predicted_stage=None,
        gradcam=zero,
        gradcam_volume_mm3=0.0,
        not_assessed=("the detector found no box inside the scanned volume",),
        flags=("off_target",),
    )
    paths = write_infer_figures(study, [r], tmp_path)
    assert paths and all(p.is_file() and p.stat().st_size > 0 for p in paths)
