"""Issue 21: ``onfh infer --dicom-out`` writes a TID 1500 SR and a Grad-CAM Segmentation on the source geometry."""

from __future__ import annotations

import json
import subprocess
import sys

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
import torch
from pydicom.uid import generate_uid

from shared_models.calibration import Calibration
from shared_models.cli import main
from shared_models.dicom_output import SCHEME, code
from tests.dicom_factory import new_mr_dataset
from tests.test_pipeline import signed_tiny_bundle

ROW = np.array([np.cos(0.2), np.sin(0.2), 0.0])  # oblique axial
COL = np.array([-np.sin(0.2), np.cos(0.2), 0.0])


def write_hip_series(folder, shape=(14, 24, 32), spacing=(11.0, 9.0, 8.0), seed=0) -> list:
    """Single-frame MR slices (k, rows, columns) with the patient/study/series attributes a PACS export has.
    ``spacing`` = (column spacing, row spacing, slice step) mm. Returns the datasets in slice order."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    normal = np.cross(ROW, COL)
    origin = np.array([-(shape[2] - 1) * spacing[0] / 2, -(shape[1] - 1) * spacing[1] / 2, -50.0])
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    datasets = []
    for k in rng.permutation(shape[0]):
        ds = new_mr_dataset()
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Hip", "PH-1", "19700101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", "A1"
        ds.ReferringPhysicianName, ds.Manufacturer, ds.SeriesNumber = "", "phantom", 3
        ds.Modality, ds.SeriesDescription, ds.BodyPartExamined = "MR", "t2_tse_ax", "HIP"
        ds.ImageType, ds.EchoTime, ds.RepetitionTime = ["ORIGINAL", "PRIMARY", "M"], 90.0, 4000.0
        ds.InstanceNumber = int(k + 1)
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*ROW, *COL)]
        ds.ImagePositionPatient = [f"{v:.4f}" for v in origin + k * spacing[2] * normal]
        ds.PixelSpacing = [spacing[1], spacing[0]]
        ds.SliceThickness = spacing[2]
        ds.Rows, ds.Columns = shape[1], shape[2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, 0
        ds.PixelData = rng.integers(0, 900, size=shape[1:], dtype=np.uint16).tobytes()
        ds.save_as(folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        datasets.append((k, ds))
    return [ds for _, ds in sorted(datasets, key=lambda t: t[0])]


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    torch.manual_seed(5)
    return signed_tiny_bundle(tmp_path_factory.mktemp("dicom-out"), Calibration(temperature=1.5))


def _infer(signed, study, out, *extra):
    bundle, pub = signed
    return main(
        [
            "infer",
            "--bundle",
            str(bundle),
            "--public-key",
            str(pub),
            "--study",
            str(study),
            "--out",
            str(out / "res"),
            "--device",
            "cpu",
            "--dicom-out",
            str(out / "dicom"),
            *extra,
        ]
    )


def _groups(sr_path):
    sr = hd.sr.srread(sr_path)
    return sr, sr.content.get_volumetric_roi_measurement_groups()


def _code_value(group, name):
    values = [e.value for e in group.get_qualitative_evaluations(name=code(name))]
    return [(v.value, v.scheme_designator) for v in values]


def test_assessed_study_sr_and_seg_match_result_json_and_source_geometry(signed, tmp_path, monkeypatch):
    import shared_models.pipeline as pipeline
    from shared_models.gates import GateResult

    # an untrained tiny detector finds no femoral heads: open the anatomy gates (tested in test_gates.py)
    for gate in ("check_pair", "check_head", "check_field_of_view"):
        monkeypatch.setattr(pipeline, gate, lambda *a, **k: GateResult(()))
    source = write_hip_series(tmp_path / "study", shape=(32, 56, 80), spacing=(4.0, 4.0, 4.0))
    assert _infer(signed, tmp_path / "study", tmp_path) == 0
    result = json.loads((tmp_path / "res" / "result.json").read_text())
    assert result["verdict"] == "assessed"

    sr, groups = _groups(tmp_path / "dicom" / "sr.dcm")
    assert sr.StudyInstanceUID == source[0].StudyInstanceUID and sr.PatientID == "PH-1"
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    assert evidence.SeriesInstanceUID == source[0].SeriesInstanceUID
    assert {i.ReferencedSOPInstanceUID for i in evidence.ReferencedSOPSequence} == {d.SOPInstanceUID for d in source}
    assert len(groups) == 2
    for group, head in zip(groups, result["heads"], strict=True):
        laterality = group.finding_sites[0].laterality
        assert laterality.value == ("24028007" if head["side"] == "R" else "7771000")
        assert group.finding_sites[0].value.value == "2812003"  # SCT femoral head
        assert _code_value(group, "ASSESSMENT") == [("ASSESSED", SCHEME)]
        assert _code_value(group, "FA_STAGE") == [(f"FA_{head['predicted_stage']}", SCHEME)]
        for k, p in head["stage_probabilities"].items():
            (m,) = group.get_measurements(name=code(f"P_{k}"))
            assert m.value == pytest.approx(p, abs=1e-9)
        box = [
            group.get_measurements(name=code(k))[0].value
            for k in ("BOX_X0", "BOX_Y0", "BOX_Z0", "BOX_X1", "BOX_Y1", "BOX_Z1")
        ]
        np.testing.assert_allclose(box, head["box_lps_mm"], atol=1e-9)
        # the box as a closed surface in the source series' frame of reference (TID 1411)
        surface = group.roi
        assert surface.frame_of_reference_uid == source[0].FrameOfReferenceUID
        assert surface.source_series_for_segmentation.value == source[0].SeriesInstanceUID
        corners = np.concatenate(surface.graphic_data)
        np.testing.assert_allclose([*corners.min(axis=0), *corners.max(axis=0)], head["box_lps_mm"], atol=1e-4)
        (vol,) = group.get_measurements(name=code("GRADCAM_VOLUME"))
        assert vol.value == pytest.approx(head["gradcam_volume_mm3"]) and vol.unit.value == "mm3"

    seg = hd.seg.segread(tmp_path / "dicom" / "seg.dcm")
    assert seg.FrameOfReferenceUID == source[0].FrameOfReferenceUID
    assert seg.StudyInstanceUID == source[0].StudyInstanceUID
    shared = seg.SharedFunctionalGroupsSequence[0]
    np.testing.assert_allclose(
        [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing], [float(v) for v in source[0].PixelSpacing]
    )
    np.testing.assert_allclose(
        [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
        [float(v) for v in source[0].ImageOrientationPatient],
        atol=1e-6,
    )
    positions = {
        tuple(np.round([float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient], 3))
        for f in seg.PerFrameFunctionalGroupsSequence
    }
    assert positions == {tuple(np.round([float(v) for v in d.ImagePositionPatient], 3)) for d in source}
    # each segment is the head's Grad-CAM map in the study geometry (gradcam_<side>.nii.gz) at >= 0.5
    uids = [d.SOPInstanceUID for d in source]
    labels = {d.SegmentLabel: int(d.SegmentNumber) for d in seg.SegmentSequence}
    assert labels, "no assessed head reached the Grad-CAM threshold: the Segmentation test checks nothing"
    for head in result["heads"]:
        label = f"Grad-CAM {'right' if head['side'] == 'R' else 'left'} femoral head"
        expected = (
            sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "res" / f"gradcam_{head['side']}.nii.gz"))) >= 0.5
        )
        if label not in labels:
            assert not expected.any()
            continue
        got = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[labels[label]])[..., 0]
        np.testing.assert_array_equal(got.astype(bool), expected)


def test_refused_study_gets_an_sr_with_the_refusal_and_no_stage(signed, tmp_path):
    write_hip_series(tmp_path / "study", shape=(14, 24, 12))  # 12 x 11 mm = 132 mm left-right: too narrow
    assert _infer(signed, tmp_path / "study", tmp_path) == 3
    result = json.loads((tmp_path / "res" / "result.json").read_text())
    assert result["verdict"] == "refused"
    _, groups = _groups(tmp_path / "dicom" / "sr.dcm")
    for group, head in zip(groups, result["heads"], strict=True):
        assert _code_value(group, "ASSESSMENT") == [("REFUSED", SCHEME)]
        assert _code_value(group, "FA_STAGE") == [] and not group.get_measurements(name=code("P_0"))
        assert ("refused", SCHEME) in _code_value(group, "FLAG") and "refused" in head["flags"]
    assert not (tmp_path / "dicom" / "seg.dcm").exists()


def test_dicom_out_refuses_a_nifti_study(signed, tmp_path, capsys):
    image = sitk.Image(8, 8, 8, sitk.sitkFloat32)
    sitk.WriteImage(image, str(tmp_path / "x.nii.gz"))
    assert _infer(signed, tmp_path / "x.nii.gz", tmp_path) == 1
    assert "needs a DICOM study folder" in capsys.readouterr().out
    assert not (tmp_path / "res").exists() and not (tmp_path / "dicom").exists()


def test_cli_help_does_not_import_highdicom():
    code_ = (
        "import sys\nfrom shared_models.cli import main\ntry:\n    main(['infer', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'highdicom' not in sys.modules, 'highdicom imported'\nprint('ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code_], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-1500:]
    assert pydicom  # the reader used above
