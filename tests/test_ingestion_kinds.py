"""Site ingestion of messy hospital exports (issue 3): one test or more per kind of odd input.

Every input is made here with pydicom (or nibabel), and every right value is derived from
what was written: the array and geometry for inputs that must be read, the specific reason
for inputs that must be refused. Real vendor files come from ``pydicom-data``/pydicom.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    EnhancedMRImageStorage,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from client.dicom_series import (
    INTENSITY_CONVENTION,
    ReadReport,
    SeriesError,
    check_decoders,
    choose_t2_series,
    find_series,
    read_series,
    read_study,
)
from client.site_data import SiteData
from shared_models.preprocessing import PreprocessingSpec
from tests.dicom_factory import new_mr_dataset

ROW, COL = np.array([1.0, 0.0, 0.0]), np.array([0.0, 1.0, 0.0])
NORMAL = np.cross(ROW, COL)
ORIGIN = np.array([-20.0, 30.0, 40.0])
PIXEL = (0.9, 1.1)  # (column spacing dx, row spacing dy)
STEP = 3.0


def ramp(shape=(5, 6, 7), offset=10.0) -> np.ndarray:
    return np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape) + offset


def slice_ds(
    pixels: np.ndarray,
    position,
    *,
    series_uid: str,
    row=ROW,
    col=COL,
    description="t2_tse_ax",
    te: float | None = 90.0,
    tr: float | None = 4000.0,
    echo_number: int | None = None,
    image_type=("ORIGINAL", "PRIMARY", "M"),
    modality="MR",
    photometric="MONOCHROME2",
    rescale: tuple[float, float] | None = None,
) -> Dataset:
    """One single-frame MR slice; ``pixels`` are the stored uint16 values."""
    ds = new_mr_dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3", series_uid
    ds.Modality, ds.SeriesDescription, ds.ImageType = modality, description, list(image_type)
    if te is not None:
        ds.EchoTime = te
    if tr is not None:
        ds.RepetitionTime = tr
    if echo_number is not None:
        ds.EchoNumbers = echo_number
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row, *col)]
    ds.ImagePositionPatient = [f"{v:.6f}" for v in position]
    ds.PixelSpacing = [PIXEL[1], PIXEL[0]]
    ds.SliceThickness = 99.0
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.PixelData = np.asarray(pixels).astype(np.uint16).tobytes()
    return ds


def write_stack(folder: Path, stored: np.ndarray, prefix="IM", positions=None, **kw) -> list[Path]:
    """Write ``stored`` ``(k, j, i)`` as slices at ORIGIN + k*STEP*normal (or ``positions``)."""
    folder.mkdir(parents=True, exist_ok=True)
    kw.setdefault("series_uid", generate_uid())
    paths = []
    for k in range(stored.shape[0]):
        pos = positions[k] if positions is not None else ORIGIN + k * STEP * NORMAL
        path = folder / f"{prefix}{k:03d}"
        slice_ds(stored[k], pos, **kw).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def assert_geometry(image: sitk.Image, origin=ORIGIN, step=STEP) -> None:
    np.testing.assert_allclose(image.GetOrigin(), origin, atol=1e-4)
    np.testing.assert_allclose(image.GetSpacing(), (*PIXEL, step), atol=1e-4)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), np.column_stack([ROW, COL, NORMAL]), atol=1e-6)


def array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


# -- kinds 1 and 12: several echoes / contrasts in one SeriesInstanceUID ------------------------


def test_multi_echo_sharing_a_series_uid_is_split_and_never_stacked(tmp_path):
    uid = generate_uid()
    pd, t2 = ramp((4, 5, 6)), ramp((4, 5, 6), offset=500.0)
    study = tmp_path / "study"
    # Dual-echo TSE: both echoes at the same positions, same description, one UID, names interleaved.
    write_stack(study, pd, prefix="A", series_uid=uid, description="de_tse_ax", te=15.0, tr=3000.0, echo_number=1)
    write_stack(study, t2, prefix="B", series_uid=uid, description="de_tse_ax", te=95.0, tr=3000.0, echo_number=2)
    series = find_series(study)
    assert [s.series_uid for s in series] == [uid, uid]
    assert sorted(s.n_slices for s in series) == [4, 4]
    assert sorted(s.echo_time_ms for s in series) == [15.0, 95.0]
    # The T2 rule picks the long echo by timing; each echo reads as its own volume.
    assert choose_t2_series(series).echo_time_ms == 95.0
    image = read_study(study)
    np.testing.assert_array_equal(array(image), t2.astype(np.float32))
    assert_geometry(image)
    by_te = {s.echo_time_ms: s for s in series}
    np.testing.assert_array_equal(array(read_series(by_te[15.0])), pd.astype(np.float32))


def test_multi_echo_without_echo_numbers_is_split_by_echo_time(tmp_path):
    uid = generate_uid()
    study = tmp_path / "study"
    for i, te in enumerate((70.0, 90.0, 140.0)):
        write_stack(study, ramp((3, 4, 4), offset=100.0 * i), prefix=f"E{i}", series_uid=uid, te=te)
    series = find_series(study)
    assert len(series) == 3 and all(s.n_slices == 3 for s in series)
    # All three qualify as T2; the echo closest to 90 ms wins (documented tie-break).
    np.testing.assert_array_equal(array(read_study(study)), ramp((3, 4, 4), offset=100.0).astype(np.float32))


def test_dixon_contrasts_sharing_a_series_uid_are_split_by_image_type(tmp_path):
    uid = generate_uid()
    water, fat = ramp((3, 4, 5)), ramp((3, 4, 5), offset=1000.0)
    study = tmp_path / "study"
    write_stack(study, water, prefix="W", series_uid=uid, image_type=("DERIVED", "PRIMARY", "DIXON", "WATER"))
    write_stack(study, fat, prefix="F", series_uid=uid, image_type=("DERIVED", "PRIMARY", "DIXON", "FAT"))
    series = find_series(study)
    assert len(series) == 2 and {s.image_type[-1] for s in series} == {"WATER", "FAT"}
    got = {s.image_type[-1]: array(read_series(s)) for s in series}
    np.testing.assert_array_equal(got["WATER"], water.astype(np.float32))
    np.testing.assert_array_equal(got["FAT"], fat.astype(np.float32))
    # Whichever the rule takes, it is one of the two contrasts, never a mix of them.
    chosen = array(read_study(study))
    assert chosen.shape == (3, 4, 5) and (np.array_equal(chosen, got["WATER"]) or np.array_equal(chosen, got["FAT"]))


# -- kind 2: a localizer inside the acquisition series ------------------------------------------


def test_localizer_images_inside_the_acquisition_series_are_dropped(tmp_path):
    uid = generate_uid()
    vol = ramp((6, 4, 5))
    study = tmp_path / "study"
    write_stack(study, vol, series_uid=uid)
    # Same UID: one sagittal scout image and one axial image typed LOCALIZER.
    slice_ds(ramp((4, 5)), (0.0, 0.0, 0.0), series_uid=uid, row=(0, 1, 0), col=(0, 0, -1)).save_as(
        study / "scout1", enforce_file_format=True
    )
    slice_ds(
        ramp((4, 5)), ORIGIN + 1.5 * NORMAL, series_uid=uid, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")
    ).save_as(study / "scout2", enforce_file_format=True)
    image = read_study(study)
    np.testing.assert_array_equal(array(image), vol.astype(np.float32))
    assert_geometry(image)


# -- kind 13: DICOMDIR, files without extension, junk ------------------------------------------


def test_dicomdir_export_with_extensionless_files_and_junk(tmp_path):
    from pydicom.fileset import FileSet

    vol = ramp((4, 5, 6))
    # Patient/study/series tags that a DICOMDIR needs.
    src = write_stack(tmp_path / "src", vol)
    fs = FileSet()
    for p in src:
        ds = pydicom.dcmread(p)
        ds.PatientID, ds.PatientName, ds.StudyDate, ds.StudyTime = "X", "X^Y", "20240101", "120000"
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", 1, 1
        ds.AccessionNumber, ds.ReferringPhysicianName, ds.Manufacturer = "", "", "x"
        fs.add(ds)
    fs.write(tmp_path / "export")
    export = tmp_path / "export"
    (export / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(100))
    (export / "Thumbs.db").write_bytes(bytes(range(256)))
    names = sorted(p.name for p in export.rglob("*") if p.is_file())
    assert "DICOMDIR" in names and not any(n.endswith(".dcm") for n in names)
    [series] = find_series(export)  # DICOMDIR and junk are not series
    assert series.n_slices == 4
    image = read_study(export)
    np.testing.assert_array_equal(array(image), vol.astype(np.float32))
    assert_geometry(image)


# -- kind 16: patient position (synthetic; the real HFS/HFP pair is in test_dicom_series) -------


@pytest.mark.parametrize(
    "position, row, col",
    [
        ("HFS", (1, 0, 0), (0, 1, 0)),
        ("HFP", (-1, 0, 0), (0, -1, 0)),
        ("FFS", (-1, 0, 0), (0, 1, 0)),
        ("HFDR", (0, -1, 0), (1, 0, 0)),
        ("FFDL", (0, 1, 0), (1, 0, 0)),
    ],
)
def test_patient_positions_give_the_same_lps_anatomy(tmp_path, position, row, col):
    from shared_models.preprocessing import orient_lps

    # An object fixed in the patient: obj[z, y, x] on a 2 mm LPS grid from (-10, -8, -6) mm.
    shape_zyx = (5, 4, 6)
    obj = ramp(shape_zyx)
    lps_min, h = np.array([-10.0, -8.0, -6.0]), 2.0
    row, col = np.asarray(row, float), np.asarray(col, float)
    normal = np.cross(row, col)
    n_xyz = np.array(shape_zyx[::-1])
    # Stored size along row, column, normal, and the LPS voxel of stored index (0, 0, 0).
    n_i, n_j, n_k = (int(n_xyz[np.argmax(np.abs(v))]) for v in (row, col, normal))
    base = np.where(row + col + normal < 0, n_xyz - 1, 0)
    stored = np.empty((n_k, n_j, n_i))
    for k in range(n_k):
        for j in range(n_j):
            for i in range(n_i):
                x, y, z = (base + i * row + j * col + k * normal).astype(int)
                stored[k, j, i] = obj[z, y, x]
    folder = tmp_path / position
    folder.mkdir()
    uid = generate_uid()
    for k in range(n_k):
        ds = slice_ds(stored[k], lps_min + h * (base + k * normal), series_uid=uid, row=row, col=col)
        ds.PixelSpacing = [h, h]
        ds.PatientPosition = position
        ds.save_as(folder / f"{k}", enforce_file_format=True)
    image = orient_lps(read_study(folder))
    np.testing.assert_array_equal(array(image), obj.astype(np.float32))
    np.testing.assert_allclose(image.GetOrigin(), lps_min, atol=1e-4)
    np.testing.assert_allclose(image.GetDirection(), np.eye(3).ravel(), atol=1e-6)


# -- kind 5: duplicate slices --------------------------------------------------------------------


def test_exact_duplicate_slices_are_dropped(tmp_path):
    vol = ramp((5, 4, 4))
    paths = write_stack(tmp_path / "s", vol)
    shutil.copy(paths[2], tmp_path / "s" / "copy_of_slice_2")  # the same file exported twice
    dup = pydicom.dcmread(paths[4])
    dup.SOPInstanceUID = generate_uid()  # a re-sent copy with a new instance UID
    dup.save_as(tmp_path / "s" / "resent_slice_4")
    report = ReadReport()
    image = read_study(tmp_path / "s", report=report)
    np.testing.assert_array_equal(array(image), vol.astype(np.float32))
    assert_geometry(image)
    assert "2 exact duplicate slice(s) dropped" in report.notes


def test_conflicting_duplicate_slices_are_refused(tmp_path):
    paths = write_stack(tmp_path / "s", ramp((5, 4, 4)))
    ds = pydicom.dcmread(paths[1])
    ds.SOPInstanceUID = generate_uid()
    ds.PixelData = (ramp((4, 4)) + 7).astype(np.uint16).tobytes()  # same position, other pixels
    ds.save_as(tmp_path / "s" / "other")
    with pytest.raises(SeriesError, match=r"conflicting duplicate slice positions: 6 images at 5 positions, 1 with"):
        read_study(tmp_path / "s")


# -- kind 6: sheared stacks ----------------------------------------------------------------------


def test_gantry_tilted_stack_is_refused_with_its_angle(tmp_path):
    # Gantry tilt of 15 degrees: each slice moves STEP along the normal and STEP*tan(15) along y.
    tilt = np.deg2rad(15.0)
    positions = [ORIGIN + k * STEP * NORMAL + k * STEP * np.tan(tilt) * COL for k in range(5)]
    write_stack(tmp_path / "s", ramp((5, 4, 4)), positions=positions)
    drift = 4 * STEP * np.tan(tilt)
    with pytest.raises(
        SeriesError,
        match=rf"sheared stack: slice positions drift in-plane by up to {drift:.2f} mm "
        r"\(gantry tilt or slice step 15\.0 degrees off the normal; refused, not resampled\)",
    ):
        read_study(tmp_path / "s")


# -- kind 8: vendor private scaling (Philips) ----------------------------------------------------


def test_philips_private_scale_slope_is_not_applied_and_is_recorded(tmp_path):
    stored = ramp((4, 5, 6))
    rs, ri, ss = 2.12454212, -100.0, 0.0123
    study = tmp_path / "philips"
    paths = write_stack(study, stored, rescale=(rs, ri), description="T2W_TSE")
    for p in paths:
        ds = pydicom.dcmread(p)
        block = ds.private_block(0x2005, "Philips MR Imaging DD 001", create=True)
        block.add_new(0x0E, "FL", ss)  # (2005,100E) MR Scale Slope
        ds.save_as(p)
    report = ReadReport()
    image = read_study(study, report=report)
    # Displayed value DV = stored * RS + RI (not the floating point value DV / (RS * SS)).
    np.testing.assert_allclose(array(image), stored * rs + ri, rtol=1e-6, atol=1e-3)
    assert "Philips private scale slope present, not applied (displayed values used)" in report.notes
    assert "Philips MR Scale Slope" in INTENSITY_CONVENTION and "not applied" in INTENSITY_CONVENTION


# -- kind 9: MONOCHROME1 --------------------------------------------------------------------------


def test_monochrome1_is_inverted_before_windowing(tmp_path):
    vol = ramp((4, 5, 6))  # what a MONOCHROME2 export would hold: min 10, max 129
    lo, hi = vol.min(), vol.max()
    write_stack(tmp_path / "m1", lo + hi - vol, photometric="MONOCHROME1")
    report = ReadReport()
    image = read_study(tmp_path / "m1", report=report)
    np.testing.assert_array_equal(array(image), vol.astype(np.float32))
    assert "MONOCHROME1 inverted" in report.notes


# -- kind 11: enhanced (multi-frame) MR ----------------------------------------------------------


def enhanced_ds(frames: list[tuple[np.ndarray, np.ndarray, float, float, float]], series_uid: str) -> Dataset:
    """Enhanced MR file; each frame is (stored pixels, position, slope, intercept, TE)."""
    ds = new_mr_dataset(EnhancedMRImageStorage)
    ds.SeriesInstanceUID, ds.Modality, ds.SeriesDescription = series_uid, "MR", "T2W_TSE"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "T2", "NONE"]
    shared = Dataset()
    orient, measures, timing = Dataset(), Dataset(), Dataset()
    orient.ImageOrientationPatient = [*ROW, *COL]
    measures.PixelSpacing = [PIXEL[1], PIXEL[0]]
    measures.SliceThickness = 99.0
    timing.RepetitionTime = 4000.0
    shared.PlaneOrientationSequence = Sequence([orient])
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.MRTimingAndRelatedParametersSequence = Sequence([timing])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for _pixels, pos, slope, intercept, te in frames:
        item, plane, transform, echo = Dataset(), Dataset(), Dataset(), Dataset()
        plane.ImagePositionPatient = [float(v) for v in pos]
        transform.RescaleSlope, transform.RescaleIntercept, transform.RescaleType = slope, intercept, "US"
        echo.EffectiveEchoTime = te
        item.PlanePositionSequence = Sequence([plane])
        item.PixelValueTransformationSequence = Sequence([transform])
        item.MREchoSequence = Sequence([echo])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.NumberOfFrames = len(frames)
    ds.Rows, ds.Columns = frames[0][0].shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.stack([f[0] for f in frames]).astype(np.uint16).tobytes()
    return ds


def test_enhanced_mr_frames_out_of_order_with_per_frame_rescale(tmp_path):
    stored = ramp((5, 4, 6))
    rescale = [(0.5, -3.0), (2.0, 1.0), (1.0, 0.0), (0.25, 10.0), (3.0, -50.0)]
    order = [3, 0, 4, 1, 2]  # storage order of the frames, unrelated to position
    frames = [(stored[k], ORIGIN + k * STEP * NORMAL, *rescale[k], 90.0) for k in order]
    (tmp_path / "enh").mkdir()
    enhanced_ds(frames, generate_uid()).save_as(tmp_path / "enh" / "MF0001", enforce_file_format=True)
    [series] = find_series(tmp_path / "enh")
    assert series.n_slices == 5
    image = read_study(tmp_path / "enh")
    expected = np.stack([stored[k] * s + b for k, (s, b) in enumerate(rescale)])
    np.testing.assert_allclose(array(image), expected, atol=1e-4)
    assert_geometry(image)


def test_enhanced_mr_with_two_echoes_in_one_file_is_split(tmp_path):
    e1, e2 = ramp((3, 4, 4)), ramp((3, 4, 4), offset=300.0)
    frames = []
    for k in (2, 0, 1):
        frames.append((e1[k], ORIGIN + k * STEP * NORMAL, 1.0, 0.0, 20.0))
        frames.append((e2[k], ORIGIN + k * STEP * NORMAL, 1.0, 0.0, 100.0))
    (tmp_path / "enh").mkdir()
    enhanced_ds(frames, generate_uid()).save_as(tmp_path / "enh" / "MF", enforce_file_format=True)
    series = find_series(tmp_path / "enh")
    assert sorted(s.echo_time_ms for s in series) == [20.0, 100.0] and all(s.n_slices == 3 for s in series)
    np.testing.assert_array_equal(array(read_study(tmp_path / "enh")), e2.astype(np.float32))


# -- kind 10: compressed transfer syntaxes -------------------------------------------------------


def test_decoders_are_available_at_start_up():
    decoders = check_decoders()
    for name in (
        "RLE Lossless",
        "JPEG 2000 Image Compression (Lossless Only)",
        "JPEG-LS Lossless Image Compression",
        "JPEG Lossless, Non-Hierarchical, First-Order Prediction (Process 14 [Selection Value 1])",
    ):
        assert decoders[name], name


@pytest.mark.parametrize("syntax", [RLELossless, JPEG2000Lossless])
def test_compressed_series_read_like_uncompressed(tmp_path, syntax):
    vol = ramp((3, 32, 32))
    paths = write_stack(tmp_path / "s", vol)
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.compress(syntax)  # RLE: pydicom's own encoder; JPEG 2000: pylibjpeg-openjpeg
        ds.save_as(p)
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(array(read_study(tmp_path / "s")), vol.astype(np.float32))


def test_series_without_a_decoder_is_refused_naming_the_syntax(tmp_path):
    paths = write_stack(tmp_path / "s", ramp((3, 4, 4)))
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no pydicom decoder
        ds.PixelData = pydicom.encaps.encapsulate([b"\x00" * 32])
        ds["PixelData"].VR = "OB"
        ds.save_as(p, enforce_file_format=True)
    with pytest.raises(SeriesError, match=r"no decoder for the transfer syntax 'MPEG2 Main Profile / Main Level'"):
        read_study(tmp_path / "s")


# -- kind 15: NIfTI qform / sform disagreement ---------------------------------------------------


def test_nifti_qform_sform_disagreement_uses_sform_and_warns(tmp_path, caplog):
    data = ramp((6, 5, 4)).astype(np.int16)  # nibabel order (i, j, k)
    qform = np.diag([2.0, 2.0, 3.0, 1.0])
    qform[:3, 3] = (10.0, 20.0, 30.0)
    sform = np.diag([-2.0, 2.0, 3.0, 1.0])  # x flipped and shifted: disagrees with the qform
    sform[:3, 3] = (50.0, -20.0, 30.0)
    nii = nibabel.Nifti1Image(data, None)
    nii.set_qform(qform, code=1)
    nii.set_sform(sform, code=2)
    nibabel.save(nii, tmp_path / "v.nii.gz")
    report = ReadReport()
    with caplog.at_level(logging.WARNING, logger="client.dicom_series"):
        image = read_study(tmp_path / "v.nii.gz", report=report)
    # Expected from the sform, RAS -> LPS: negate x and y of origin and of the direction rows.
    np.testing.assert_allclose(image.GetOrigin(), (-50.0, 20.0, 30.0), atol=1e-4)
    np.testing.assert_allclose(image.GetSpacing(), (2.0, 2.0, 3.0), atol=1e-5)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), np.diag([1.0, -1.0, 1.0]), atol=1e-6)
    np.testing.assert_array_equal(array(image), data.transpose(2, 1, 0).astype(np.float32))
    assert report.notes == ["NIfTI qform and sform disagree: sform used"]
    assert "qform and an sform that disagree" in caplog.text and str(tmp_path) not in caplog.text


def test_nifti_with_agreeing_forms_has_no_note(tmp_path):
    affine = np.diag([-0.5, -0.6, 3.0, 1.0])
    affine[:3, 3] = (-10.0, 20.0, 30.0)
    nibabel.save(nibabel.Nifti1Image(ramp((4, 5, 6)).astype(np.int16), affine), tmp_path / "v.nii")
    report = ReadReport()
    image = read_study(tmp_path / "v.nii", report=report)
    np.testing.assert_allclose(image.GetOrigin(), (10.0, -20.0, 30.0), atol=1e-4)
    np.testing.assert_allclose(image.GetSpacing(), (0.5, 0.6, 3.0), atol=1e-5)
    assert report.notes == []


# -- kind 17: real vendor files (pydicom, pydicom-data) -------------------------------------------


def _testdata(name: str) -> Path:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} not available (install pydicom-data)")
    return Path(path)


@pytest.mark.parametrize(
    "name",
    [
        "MR_small_RLE.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
    ],
)
def test_real_mr_small_files_stacked_into_a_series(tmp_path, name):
    """Real MR files (pydicom), copied as three slices along their normal; pixels untouched."""
    ref = pydicom.dcmread(_testdata("MR_small.dcm"))
    expected_slice = np.asarray(ref.pixel_array, dtype=np.float64) * float(ref.get("RescaleSlope", 1)) + float(
        ref.get("RescaleIntercept", 0)
    )
    iop = np.asarray([float(v) for v in ref.ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    origin = np.asarray([float(v) for v in ref.ImagePositionPatient])
    uid = generate_uid()
    (tmp_path / "s").mkdir()
    for k in (2, 0, 1):
        ds = pydicom.dcmread(_testdata(name))
        ds.SeriesInstanceUID, ds.SOPInstanceUID = uid, generate_uid()
        ds.ImagePositionPatient = [f"{v:.4f}" for v in origin + 2.5 * k * normal]
        ds.save_as(tmp_path / "s" / f"f{k}")
    image = read_study(tmp_path / "s", choose=lambda series: series[0])
    np.testing.assert_array_equal(array(image), np.stack([expected_slice] * 3).astype(np.float32))
    np.testing.assert_allclose(image.GetOrigin(), origin, atol=1e-3)
    assert image.GetSpacing()[2] == pytest.approx(2.5, abs=1e-3)


@pytest.mark.parametrize(
    "name",
    [
        "emri_small_RLE.dcm",
        "emri_small_jpeg_2k_lossless.dcm",
        "emri_small_jpeg_ls_lossless.dcm",
        "emri_small_big_endian.dcm",
    ],
)
def test_real_enhanced_mr_files_decode_like_the_uncompressed_one(name):
    from client.dicom_series.decode import _decode

    ref = _decode(pydicom.dcmread(_testdata("emri_small.dcm")), "ref")
    got = _decode(pydicom.dcmread(_testdata(name)), "test")
    assert got.shape == (10, 64, 64)
    np.testing.assert_array_equal(got, ref)


def test_real_enhanced_mr_without_functional_groups_is_refused_for_missing_geometry(tmp_path):
    # pydicom-data's emri_small has its functional groups stripped: no geometry, so refuse.
    (tmp_path / "s").mkdir()
    shutil.copy(_testdata("emri_small_RLE.dcm"), tmp_path / "s" / "IM1")
    with pytest.raises(SeriesError, match=r"missing or invalid ImageOrientationPatient in 10 image\(s\)"):
        read_study(tmp_path / "s", choose=lambda series: series[0])


def test_truncated_real_jpeg2000_is_refused(tmp_path):
    (tmp_path / "s").mkdir()
    shutil.copy(_testdata("emri_small_jpeg_2k_lossless_too_short.dcm"), tmp_path / "s" / "IM1")
    from client.dicom_series.decode import _decode

    with pytest.warns(UserWarning, match="End of file"):
        ds = pydicom.dcmread(tmp_path / "s" / "IM1")
    with pytest.raises(SeriesError, match=r"pixel data missing in a slice file \(truncated file\?\)"):
        _decode(ds, "s")


# -- a site mixing good studies with bad kinds; the site check JSON ------------------------------


SPEC = PreprocessingSpec()


def _hip_stack(folder: Path, **kw) -> list[Path]:
    """A 320 x 192 x 128 mm axial stack (both hemi grids contain the box centres below)."""
    k, j, i = np.indices((8, 12, 20))
    vol = 200.0 + 0 * (i + j + k)
    folder.mkdir(parents=True, exist_ok=True)
    uid = kw.pop("series_uid", generate_uid())
    paths = []
    origin = np.array([-152.0, -88.0, -56.0])
    for kk in range(8):
        ds = slice_ds(vol[kk], origin + kk * 16.0 * NORMAL, series_uid=uid, **kw)
        ds.PixelSpacing = [16.0, 16.0]
        path = folder / f"s{kk}"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def test_mixed_site_keeps_every_good_study_and_names_every_refusal(tmp_path):
    root = tmp_path / "site"
    _hip_stack(root / "good1")
    uid = generate_uid()
    _hip_stack(root / "multiecho" / "e1", series_uid=uid, te=20.0, echo_number=1)
    _hip_stack(root / "multiecho" / "e2", series_uid=uid, te=100.0, echo_number=2)
    _hip_stack(root / "ct", modality="CT")
    paths = _hip_stack(root / "conflict")
    ds = pydicom.dcmread(paths[3])
    ds.SOPInstanceUID = generate_uid()
    ds.PixelData = (np.full((12, 20), 7)).astype(np.uint16).tobytes()
    ds.save_as(root / "conflict" / "extra")
    (root / "empty").mkdir()
    rows = ["patient_id,study,side,ficat_stage,box_lps_mm,scanner"]
    for n, study in enumerate(("good1", "multiecho", "ct", "conflict", "empty")):
        rows.append(f"P{n},{study},L,0,40 -20 -20 80 20 20,X")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    data = SiteData(root, "S", tmp_path / "cache", SPEC)
    verdicts = {v.study: v for v in data.verdicts}
    assert verdicts["good1"].status == "ok" and verdicts["good1"].shape == (8, 12, 20)
    assert verdicts["ct"].reason == "no T2 series among 1 series (1 not MR)"
    assert verdicts["conflict"].reason.startswith("conflicting duplicate slice positions")
    assert verdicts["empty"].reason == "no DICOM files"
    assert {h.study for h in data.heads} == {"good1", "multiecho"}
    assert data.decoders["RLE Lossless"]


def test_too_small_study_and_single_slice_are_refused(tmp_path):
    root = tmp_path / "site"
    # A knee-sized NIfTI: 150 x 150 x 60 mm (LPS x, y, z); the site needs 160 mm left-right.
    small = sitk.GetImageFromArray(np.zeros((20, 50, 50), dtype=np.int16))
    small.SetSpacing((3.0, 3.0, 3.0))
    root.mkdir()
    sitk.WriteImage(small, str(root / "small.nii.gz"))
    one = root / "one"
    one.mkdir()
    slice_ds(ramp((12, 20)), ORIGIN, series_uid=generate_uid()).save_as(one / "only", enforce_file_format=True)
    (root / "manifest.csv").write_text(
        "patient_id,study,side,ficat_stage,box_lps_mm,scanner\nP1,small.nii.gz,L,0,,X\nP2,one,R,,,X\n"
    )
    data = SiteData(root, "S", tmp_path / "cache", SPEC)
    small_v, one_v = data.verdicts
    assert small_v.reason == (
        "field of view too small to hold both hips: 150 x 150 x 60 mm (LR x AP x SI), at least 160 x 60 x 40 mm"
    )
    assert one_v.reason == "no T2 series among 1 series (1 single slice)"
    assert data.heads == []


def test_site_check_json_format(tmp_path):
    from shared_models.cli import main

    root = tmp_path / "site"
    uid = generate_uid()
    _hip_stack(root / "good", series_uid=uid)
    _hip_stack(root / "ct", modality="CT")
    (root / "manifest.csv").write_text(
        "patient_id,study,side,ficat_stage,box_lps_mm,scanner\nP1,good,L,0,40 -20 -20 80 20 20,X\nP2,ct,R,,,X\n"
    )
    out = tmp_path / "verdicts.json"
    assert main(["site", "check", "--data", str(root), "--cache", str(tmp_path / "c"), "--json", str(out)]) == 1
    verdicts = json.loads(out.read_text())
    assert [list(v) for v in verdicts] == [
        ["study", "series_uid", "status", "reason", "shape", "spacing_mm", "direction"]
    ] * 2
    good, ct = verdicts
    assert good == {
        "study": "good",
        "series_uid": uid,
        "status": "ok",
        "reason": "ok",
        "shape": [8, 12, 20],
        "spacing_mm": [16.0, 16.0, 16.0],
        "direction": [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0],
    }
    assert ct == {
        "study": "ct",
        "series_uid": None,
        "status": "refused",
        "reason": "no T2 series among 1 series (1 not MR)",
        "shape": None,
        "spacing_mm": None,
        "direction": None,
    }


def test_out_of_scope_stage_refuses_only_that_head(tmp_path):
    root = tmp_path / "site"
    _hip_stack(root / "s1")
    _hip_stack(root / "s2")
    (root / "manifest.csv").write_text(
        "patient_id,study,side,ficat_stage,box_lps_mm,scanner\n"
        "P1,s1,L,III,40 -20 -20 80 20 20,X\n"  # collapsed head: out of scope, refused alone
        "P1,s1,R,0,,X\n"  # the other head of the same study goes on
        "P2,s2,L,maybe,,X\n"  # unreadable label
        "P3,s2,R,II,1 2 3,X\n"  # malformed box
    )
    data = SiteData(root, "S", tmp_path / "cache", SPEC)
    assert [(h.study, h.side) for h in data.heads] == [("s1", "R")]
    reasons = [v.reason for v in data.verdicts if v.status == "refused"]
    assert len(reasons) == 3
    assert any("manifest.csv row 2" in r and "out of scope" in r for r in reasons)
    assert any("manifest.csv row 4" in r and "unreadable Ficat-Arlet stage" in r for r in reasons)
    assert any("manifest.csv row 5" in r for r in reasons)
    assert all("P1" not in r and "P2" not in r for r in reasons)  # no patient ids in verdict reasons
