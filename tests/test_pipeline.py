"""Two-stage inference: one result per femoral head, Grad-CAM in the input's exact geometry."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import SimpleITK as sitk

from shared_models.bundle import generate_signing_key, write_bundle
from shared_models.cli import main
from shared_models.detection import YOLOX3D
from shared_models.pipeline import analyse_study
from shared_models.preprocessing import PreprocessingSpec, field_of_view_mask, midline_x_mm, orient_lps
from shared_models.specs import DetectorConfig
from shared_models.stager import MulDenseNet3D, StagerConfig
from tests.conftest import real_data_or_skip

DCFG = DetectorConfig(widths=(4, 8, 8, 16), depths=(1, 1, 1), head_width=8)
SCFG = StagerConfig(init_features=8, growth_rate=4, block_config=(1, 1), pool_scales=(1, 2))


def _oblique_image() -> sitk.Image:
    rng = np.random.default_rng(0)
    img = sitk.GetImageFromArray(rng.uniform(0, 900, size=(20, 60, 80)).astype(np.float32))
    img.SetSpacing((4.5, 3.0, 5.0))
    img.SetOrigin((-170.0, -90.0, -60.0))
    angle = np.deg2rad(12)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    img.SetDirection(tuple(rot.ravel()))
    return img


def _same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-6)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-9)


def test_analyse_study_returns_both_heads_in_input_geometry():
    image = _oblique_image()
    # gates off: an untrained detector's boxes are no femoral heads (the gates are tested in test_gates.py)
    results = analyse_study(image, YOLOX3D(DCFG), MulDenseNet3D(SCFG), PreprocessingSpec(), gates=False)
    assert [r.side for r in results] == ["R", "L"]
    for r in results:
        _same_geometry(r.gradcam, image)
        cam = sitk.GetArrayFromImage(r.gradcam)
        assert cam.min() >= 0.0 and cam.max() <= 1.0 + 1e-6
        assert sum(r.stage_probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert r.predicted_stage == max(r.stage_probabilities, key=r.stage_probabilities.get)
        x0, y0, z0, x1, y1, z1 = r.box_lps_mm
        assert x0 < x1 and y0 < y1 and z0 < z1
        # inside the scanned volume's LPS hull (corners of the voxel edges, computed here with ITK)
        corners = np.array(
            [
                image.TransformContinuousIndexToPhysicalPoint(c)
                for c in itertools.product(*[(-0.5, n - 0.5) for n in image.GetSize()])
            ]
        )
        assert np.all(np.array([x0, y0, z0]) >= corners.min(axis=0) - 1e-6)
        assert np.all(np.array([x1, y1, z1]) <= corners.max(axis=0) + 1e-6)
    # each box lies on its own side of the midline: patient right is -x in LPS
    mid = midline_x_mm(orient_lps(image))
    centre_x = [(r.box_lps_mm[0] + r.box_lps_mm[3]) / 2 for r in results]
    assert centre_x[0] < mid < centre_x[1]


def test_head_result_keeps_the_crop_grid_map_that_the_volume_measures():
    spec = PreprocessingSpec()
    image = _oblique_image()
    results = analyse_study(image, YOLOX3D(DCFG), MulDenseNet3D(SCFG), spec, gates=False)
    for r in results:
        grid, cam = r.crop_grid, r.gradcam_crop
        assert grid.size_dhw == spec.crop_shape and cam.shape == spec.crop_shape and cam.dtype == np.float32
        # the crop grid's voxel edges are the box plus the margin on every side (LPS mm)
        ref = grid.reference_image()
        corners = np.array(
            [
                ref.TransformContinuousIndexToPhysicalPoint(c)
                for c in itertools.product(*[(-0.5, n - 0.5) for n in ref.GetSize()])
            ]
        )
        box = np.asarray(r.box_lps_mm)
        np.testing.assert_allclose(corners.min(axis=0), box[:3] - spec.crop_margin_mm, atol=1e-6)
        np.testing.assert_allclose(corners.max(axis=0), box[3:] + spec.crop_margin_mm, atol=1e-6)
        # mirrored like the hemi grid: W runs medial -> lateral (-x for R, +x for L)
        assert np.sign(grid.direction[0]) == (-1.0 if r.side == "R" else 1.0)
        # no evidence outside the scanned volume (the crop's zero-filled part at the edge of the FOV)
        outside = ~field_of_view_mask(orient_lps(sitk.Cast(image, sitk.sitkFloat32)), grid)
        assert not cam[outside].any()
        voxel_mm3 = float(np.prod(grid.spacing_dhw_mm))
        assert r.gradcam_volume_mm3 == pytest.approx(np.count_nonzero(cam >= 0.5) * voxel_mm3)
        # the map in the study's geometry is this map resampled linearly, so it cannot exceed its maximum
        assert float(sitk.GetArrayViewFromImage(r.gradcam).max()) <= float(cam.max()) + 1e-6
        assert set(r.summary()) == {
            "side",
            "box_lps_mm",
            "detector_score",
            "low_confidence",
            "stage_probabilities",
            "predicted_stage",
            "gradcam_volume_mm3",
            "assessed",
            "not_assessed",
            "flags",
            "early_onfh_probability",
            "energy",
        }


def signed_tiny_bundle(root, calibration=None):
    """A signed bundle of freshly initialised DCFG/SCFG models under ``root``: ``(bundle, public key)``."""
    key = generate_signing_key(root / "key.pem")
    bundle = write_bundle(
        root / "bundle",
        detector_state=YOLOX3D(DCFG).state_dict(),
        stager_state=MulDenseNet3D(SCFG).state_dict(),
        detector_config=DCFG,
        stager_config=SCFG,
        spec=PreprocessingSpec(),
        metrics={},
        run_config={},
        signing_key=key,
        calibration=calibration,
    )
    return bundle, root / "key.pem.pub"


@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    return signed_tiny_bundle(tmp_path_factory.mktemp("bundle"))


def _check_infer_output(out, study_image: sitk.Image):
    result = json.loads((out / "result.json").read_text())
    assert [h["side"] for h in result["heads"]] == ["R", "L"]
    assert result["bundle_trusted"] is True
    for side in ("R", "L"):
        _same_geometry(sitk.ReadImage(str(out / f"gradcam_{side}.nii.gz")), study_image)
    for name in ("overview.png", "gradcam_R.png", "gradcam_L.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    return result


def test_infer_on_real_pelvic_nifti_is_refused_for_its_narrow_field_of_view(tiny_bundle, tmp_path):
    nifti = real_data_or_skip("prostatex-0000-pelvis-t2-axial.nii.gz")
    bundle, pub = tiny_bundle
    args = ["infer", "--bundle", str(bundle), "--public-key", str(pub), "--study", str(nifti), "--out", str(tmp_path)]
    assert main(args) == 3
    result = _check_infer_output(tmp_path, sitk.ReadImage(str(nifti)))
    assert result["series"]["source"] == "NIfTI file" and result["series"]["n_slices"] == 19
    # ProstateX: 384 x 0.5 mm = 192 mm left-right, narrower than two femoral heads need
    assert result["verdict"] == "refused" and "192 mm left-right" in result["reasons"][0]
    assert all(h["predicted_stage"] is None and h["stage_probabilities"] == {} for h in result["heads"])
    assert main([*args, "--allow-refused"]) == 0


def test_infer_refuses_a_brain_dicom(tiny_bundle, tmp_path):
    folder = real_data_or_skip("siemens-brain-t1-sag-hfs")
    bundle, pub = tiny_bundle
    assert (
        main(
            ["infer", "--bundle", str(bundle), "--public-key", str(pub), "--study", str(folder), "--out", str(tmp_path)]
        )
        == 3
    )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
    result = _check_infer_output(tmp_path, reader.Execute())
    assert "no T2 series" in result["series"]["why"]
    assert result["series"]["description"] == "t1_fl2d_sag" and result["series"]["n_slices"] == 35
    assert result["verdict"] == "refused" and result["body_part_examined"] == "BRAIN"
    assert any("BRAIN" in r for r in result["reasons"]) and any("left-right" in r for r in result["reasons"])
    assert all(not h["assessed"] and h["predicted_stage"] is None for h in result["heads"])
    # the tiny bundle has no calibration, and the result says so
    assert any("no validation calibration" in w for w in result["warnings"])


def test_infer_refuses_a_tampered_bundle(tiny_bundle, tmp_path):
    import shutil

    bundle, pub = tiny_bundle
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    (copy / "spec.json").write_text((copy / "spec.json").read_text().replace("300", "301"))
    nifti = tmp_path / "x.nii.gz"
    sitk.WriteImage(_oblique_image(), str(nifti))
    assert (
        main(
            [
                "infer",
                "--bundle",
                str(copy),
                "--public-key",
                str(pub),
                "--study",
                str(nifti),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 1
    )
    assert not (tmp_path / "o" / "result.json").exists()
