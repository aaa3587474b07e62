"""DICOM series discovery, T2 choice and reading, on tiny synthetic series and on real data."""

from __future__ import annotations

import gzip
import shutil
import uuid
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

from client.dicom_series import (
    SeriesError,
    SeriesInfo,
    choose_t2_series,
    find_series,
    read_series,
    read_study,
)
from shared_models.preprocessing import orient_lps
from tests.dicom_factory import new_mr_dataset

REAL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason=f"real test data folder {REAL} is missing")

# An oblique frame: rows along +y rotated about x, columns along -z rotated; normal follows.
_A = np.deg2rad(12.0)
OBLIQUE_ROW = np.array([0.0, np.cos(_A), np.sin(_A)])
OBLIQUE_COL = np.array([0.0, np.sin(_A), -np.cos(_A)])


def write_series(
    folder: Path,
    volume: np.ndarray,
    *,
    origin=(-20.0, 30.0, 40.0),
    row=(1.0, 0.0, 0.0),
    col=(0.0, 1.0, 0.0),
    spacing=(0.9, 1.1, 3.0),
    positions: list | None = None,
    description: str = "t2_tse_ax",
    te: float | None = 90.0,
    tr: float | None = 4000.0,
    image_type=("ORIGINAL", "PRIMARY", "M"),
    modality: str = "MR",
    rescale: list[tuple[float, float]] | None = None,
    random_names: bool = False,
    rng: np.random.Generator | None = None,
    series_uid: str | None = None,
) -> list[Path]:
    """Write ``volume`` ``(k, j, i)`` as single-frame DICOM slices; slice k at origin + k*dz*normal.

    ``spacing`` is ``(column spacing dx, row spacing dy, slice step dz)`` in mm; stored pixels
    are uint16 ``(value - intercept) / slope`` when ``rescale`` gives per-slice (slope, intercept).
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = rng or np.random.default_rng(0)
    row, col = np.asarray(row, float), np.asarray(col, float)
    normal = np.cross(row, col)
    series_uid = series_uid or generate_uid()
    n = volume.shape[0]
    order = rng.permutation(n) if random_names else np.arange(n)
    paths = []
    for write_idx, k in enumerate(order):
        pos = positions[k] if positions is not None else np.asarray(origin) + k * spacing[2] * normal
        ds = new_mr_dataset()
        ds.StudyInstanceUID = "1.2.3"
        ds.SeriesInstanceUID = series_uid
        ds.Modality = modality
        ds.SeriesDescription = description
        ds.ImageType = list(image_type)
        if te is not None:
            ds.EchoTime = te
        if tr is not None:
            ds.RepetitionTime = tr
        ds.InstanceNumber = int(n - k) if random_names else int(k + 1)  # deliberately misleading
        ds.ImageOrientationPatient = [f"{v:.6f}" for v in (*row, *col)]
        ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
        ds.PixelSpacing = [spacing[1], spacing[0]]
        ds.SliceThickness = 99.0  # must never be used as the step
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[2]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        values = volume[k].astype(np.float64)
        if rescale is not None:
            slope, intercept = rescale[k]
            ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
            values = (values - intercept) / slope
        ds.PixelData = np.round(values).astype(np.uint16).tobytes()
        name = uuid.UUID(int=int(rng.integers(2**63))).hex if random_names else f"IM{write_idx:04d}.dcm"
        path = folder / name
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def ramp(shape=(6, 7, 8)) -> np.ndarray:
    """A volume whose every voxel value is unique, so misordering shows."""
    return np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape) + 10.0


def info(**kw) -> SeriesInfo:
    base = dict(
        series_uid="1",
        files=(Path("a"),),
        description="",
        orientation="AX",
        n_slices=20,
        modality="MR",
        image_type=("ORIGINAL", "PRIMARY"),
        echo_time_ms=None,
        repetition_time_ms=None,
    )
    base.update(kw)
    return SeriesInfo(**base)


# -- reading ---------------------------------------------------------------------------------


def test_shuffled_random_names_give_identical_arrays_and_geometry(tmp_path):
    vol = ramp()
    kw = dict(origin=(-12.5, 40.0, 7.25), row=OBLIQUE_ROW, col=OBLIQUE_COL, spacing=(0.8, 1.2, 2.5))
    write_series(tmp_path / "ordered", vol, **kw)
    write_series(tmp_path / "shuffled", vol, random_names=True, rng=np.random.default_rng(7), **kw)
    a = read_study(tmp_path / "ordered")
    b = read_study(tmp_path / "shuffled")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a), vol.astype(np.float32))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(b), vol.astype(np.float32))
    assert a.GetPixelID() == sitk.sitkFloat32
    # Geometry round trip, derived from what was written.
    normal = np.cross(OBLIQUE_ROW, OBLIQUE_COL)
    np.testing.assert_allclose(b.GetOrigin(), (-12.5, 40.0, 7.25), atol=1e-3)
    np.testing.assert_allclose(b.GetSpacing(), (0.8, 1.2, 2.5), atol=1e-3)
    np.testing.assert_allclose(
        np.reshape(b.GetDirection(), (3, 3)), np.column_stack([OBLIQUE_ROW, OBLIQUE_COL, normal]), atol=1e-5
    )
    # Last voxel centre lands where the writer put it.
    last = np.array([-12.5, 40.0, 7.25]) + 7 * 0.8 * OBLIQUE_ROW + 6 * 1.2 * OBLIQUE_COL + 5 * 2.5 * normal
    np.testing.assert_allclose(b.TransformIndexToPhysicalPoint((7, 6, 5)), last, atol=1e-3)


def test_matches_simpleitk_gdcm_reader(tmp_path):
    vol = ramp((5, 6, 7))
    write_series(tmp_path / "s", vol, row=OBLIQUE_ROW, col=OBLIQUE_COL, random_names=True)
    ours = read_study(tmp_path / "s")
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(tmp_path / "s")))
    ref = reader.Execute()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(ref).astype(np.float32))
    np.testing.assert_allclose(ours.GetOrigin(), ref.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(ours.GetSpacing(), ref.GetSpacing(), atol=1e-3)
    np.testing.assert_allclose(ours.GetDirection(), ref.GetDirection(), atol=1e-5)


def test_descending_positions_are_sorted_along_the_normal(tmp_path):
    vol = ramp((4, 3, 5))
    # Slices written with decreasing position: slice k sits at z = 30 - 4k.
    positions = [np.array([0.0, 0.0, 30.0 - 4.0 * k]) for k in range(4)]
    write_series(tmp_path / "s", vol, positions=positions)
    image = read_study(tmp_path / "s")
    # Ascending along the normal (+z): array slice 0 is the written slice 3.
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), vol[::-1].astype(np.float32))
    np.testing.assert_allclose(image.GetOrigin(), (0.0, 0.0, 18.0), atol=1e-6)
    assert image.GetSpacing()[2] == pytest.approx(4.0)


def test_per_slice_rescale_is_applied(tmp_path):
    rng = np.random.default_rng(1)
    vol = rng.integers(0, 400, size=(4, 5, 6)).astype(np.float64)
    rescale = [(0.5, -100.0), (2.0, 3.0), (1.0, 0.0), (0.25, 10.0)]
    # Make every stored value exact: value = stored * slope + intercept.
    stored = rng.integers(0, 400, size=vol.shape)
    vol = np.stack([stored[k] * s + b for k, (s, b) in enumerate(rescale)])
    write_series(tmp_path / "s", vol, rescale=rescale)
    np.testing.assert_allclose(sitk.GetArrayFromImage(read_study(tmp_path / "s")), vol, rtol=0, atol=1e-4)


def test_junk_files_are_skipped(tmp_path):
    vol = ramp((4, 3, 3))
    study = tmp_path / "study"
    write_series(study / "nested" / "deeper", vol, random_names=True)
    (study / "README.txt").write_text("exported by PACS\n")
    (study / "empty").write_bytes(b"")
    (study / "nested" / "blob.bin").write_bytes(np.random.default_rng(2).bytes(3000))
    (study / "nested" / "fake.dcm").write_bytes(b"\0" * 128 + b"NOPE" + b"\1" * 64)
    series = find_series(study)
    assert len(series) == 1 and series[0].n_slices == 4
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_study(study)), vol.astype(np.float32))


def test_gap_in_slice_positions_is_refused(tmp_path):
    vol = ramp((5, 3, 3))
    positions = [np.array([0.0, 0.0, z]) for z in (0.0, 4.0, 8.0, 16.0, 20.0)]
    write_series(tmp_path / "s", vol, positions=positions)
    with pytest.raises(SeriesError, match=r"non-uniform slice step: 4\.00-8\.00 mm") as err:
        read_study(tmp_path / "s")
    assert err.value.study == str(tmp_path / "s")


def test_small_position_jitter_is_accepted(tmp_path):
    vol = ramp((4, 3, 3))
    positions = [np.array([0.0, 0.0, z]) for z in (0.0, 3.004, 6.0, 8.997)]
    write_series(tmp_path / "s", vol, positions=positions)
    assert read_study(tmp_path / "s").GetSpacing()[2] == pytest.approx(2.999, abs=1e-3)


def test_duplicate_positions_are_refused(tmp_path):
    vol = ramp((4, 3, 3))
    positions = [np.array([0.0, 0.0, z]) for z in (0.0, 0.0, 5.0, 5.0)]
    write_series(tmp_path / "s", vol, positions=positions)
    with pytest.raises(SeriesError, match="duplicate slice positions"):
        read_study(tmp_path / "s")


def test_sheared_stack_is_refused(tmp_path):
    vol = ramp((4, 3, 3))
    positions = [np.array([1.5 * k, 0.0, 3.0 * k]) for k in range(4)]
    write_series(tmp_path / "s", vol, positions=positions)
    with pytest.raises(SeriesError, match="drift in-plane"):
        read_study(tmp_path / "s")


def test_mixed_orientations_in_one_series_are_refused(tmp_path):
    uid = generate_uid()
    write_series(tmp_path / "s" / "a", ramp((3, 4, 4)), series_uid=uid)
    write_series(
        tmp_path / "s" / "b", ramp((3, 4, 4)), series_uid=uid, row=(0, 1, 0), col=(0, 0, -1), origin=(50, 0, 0)
    )
    series = find_series(tmp_path / "s")
    # Two planes of equal size in one series UID: neither is the acquisition, both are localizers.
    assert len(series) == 2 and all(s.stray_orientation for s in series)
    with pytest.raises(SeriesError, match=r"no T2 series among 2 series \(2 localizer\)"):
        read_study(tmp_path / "s")
    # Forced to read both planes as one volume, the reader still refuses.
    both = SeriesInfo(**{**series[0].__dict__, "files": series[0].files + series[1].files, "frames": ()})
    with pytest.raises(SeriesError, match="different orientations"):
        read_series(both)


def test_truncated_slice_is_refused(tmp_path):
    paths = write_series(tmp_path / "s", ramp((4, 16, 16)))
    data = paths[2].read_bytes()
    paths[2].write_bytes(data[: len(data) - 200])
    with pytest.raises(SeriesError, match="pixel data"):
        read_study(tmp_path / "s")


def test_empty_folder_and_missing_study(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("nothing here")
    with pytest.raises(SeriesError, match="no DICOM files"):
        read_study(tmp_path / "empty")
    with pytest.raises(SeriesError, match="does not exist"):
        read_study(tmp_path / "nope")


def test_unreadable_nifti(tmp_path):
    bad = tmp_path / "broken.nii.gz"
    bad.write_bytes(gzip.compress(b"not a nifti header at all" * 4)[:40])
    with pytest.raises(SeriesError, match="unreadable NIfTI"):
        read_study(bad)


@pytest.mark.parametrize("name", ["v.nii", "v.nii.gz"])
def test_truncated_nifti_is_refused(tmp_path, name):
    # SimpleITK alone would zero-fill the missing half silently.
    sitk.WriteImage(sitk.GetImageFromArray(ramp((10, 20, 30)).astype(np.float32)), str(tmp_path / name))
    data = (tmp_path / name).read_bytes()
    (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(SeriesError, match="unreadable NIfTI") as err:
        read_study(tmp_path / name)
    assert str(tmp_path) not in err.value.reason


def test_nifti_round_trip(tmp_path):
    image = sitk.GetImageFromArray(ramp((4, 5, 6)).astype(np.int16))
    image.SetSpacing((0.5, 0.6, 3.0))
    image.SetOrigin((10.0, -20.0, 30.0))
    sitk.WriteImage(image, str(tmp_path / "v.nii.gz"))
    out = read_study(tmp_path / "v.nii.gz")
    assert out.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), ramp((4, 5, 6)).astype(np.float32))
    np.testing.assert_allclose(out.GetOrigin(), (10.0, -20.0, 30.0), atol=1e-4)


# -- choosing the T2 series --------------------------------------------------------------------


def test_localizer_is_not_chosen(tmp_path):
    study = tmp_path / "study"
    # A localizer with many slices and T2-like timing, and a smaller true T2 series.
    write_series(
        study / "loc", ramp((9, 4, 4)), description="localizer", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")
    )
    write_series(study / "scout", ramp((12, 4, 4)), description="AAHead_Scout t2")
    write_series(study / "t2", ramp((5, 4, 4)) * 2, description="t2_tse_fs_ax")
    chosen = choose_t2_series(find_series(study))
    assert chosen.n_slices == 5
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_study(study)), (ramp((5, 4, 4)) * 2).astype(np.float32))


def test_three_plane_localizer_is_not_chosen(tmp_path):
    uid = generate_uid()
    study = tmp_path / "study"
    write_series(study / "a", ramp((3, 4, 4)), series_uid=uid, description="pelvis", image_type=("ORIGINAL", "PRIMARY"))
    write_series(study / "b", ramp((3, 4, 4)), series_uid=uid, description="pelvis", row=(0, 1, 0), col=(0, 0, -1))
    with pytest.raises(SeriesError, match=r"no T2 series among 2 series \(2 localizer\)"):
        read_study(study)


def test_t2_chosen_over_t1_by_description(tmp_path):
    study = tmp_path / "study"
    write_series(study / "t1", ramp((8, 4, 4)), description="t1_tse_cor", te=90.0, tr=4000.0)  # lying timing
    write_series(study / "t2", ramp((4, 4, 4)) + 5, description="T2W_TSE", te=None, tr=None)
    write_series(study / "stir", ramp((9, 4, 4)), description="cor STIR", te=70.0, tr=5000.0)
    chosen = choose_t2_series(find_series(study))
    assert chosen.description == "T2W_TSE"


def test_t2_chosen_over_t1_by_timing(tmp_path):
    study = tmp_path / "study"
    write_series(study / "a", ramp((8, 4, 4)), description="cor_tse", te=12.0, tr=600.0)
    write_series(study / "b", ramp((4, 4, 4)), description="cor_tse_fs", te=85.0, tr=3500.0)
    assert choose_t2_series(find_series(study)).echo_time_ms == pytest.approx(85.0)


def test_only_t1_is_refused_with_counts(tmp_path):
    study = tmp_path / "study"
    write_series(study / "a", ramp((8, 4, 4)), description="t1_tse_cor", te=12.0, tr=600.0)
    write_series(study / "b", ramp((8, 4, 4)), description="ax", te=12.0, tr=600.0)
    with pytest.raises(SeriesError, match=r"no T2 series among 2 series \(1 other contrast, 1 no T2 evidence\)"):
        read_study(study)


@pytest.mark.parametrize(
    "kw, expected",
    [
        (dict(description="t2_tse_cor"), True),
        (dict(description="T2 FS AX"), True),
        (dict(description="t2w_spair"), True),
        (dict(description="t2*_gre"), False),
        (dict(description="t2star_me"), False),
        (dict(description="PD_T2_dual"), False),
        (dict(description="t1_vibe"), False),
        (dict(description="cor_tirm"), False),
        (dict(description="cor", echo_time_ms=100.0, repetition_time_ms=3000.0), True),
        (dict(description="cor", echo_time_ms=100.0, repetition_time_ms=800.0), False),
        (dict(description="t2_tse", modality="CT"), False),
        (dict(description="t2_tse", image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")), False),
        (dict(description="t2_tse", orientation="MIXED"), False),
        (dict(description="t2_tse", n_slices=1), False),
    ],
)
def test_t2_rule_table(kw, expected):
    candidate = info(**kw)
    if expected:
        assert choose_t2_series([candidate]) is candidate
    else:
        with pytest.raises(SeriesError, match="no T2 series among 1 series"):
            choose_t2_series([candidate])


def test_t2_ranking_prefers_description_then_timing_then_original_then_slices():
    by_timing = info(series_uid="1", description="cor", echo_time_ms=90.0, repetition_time_ms=4000.0, n_slices=60)
    by_desc = info(series_uid="2", description="t2_cor", n_slices=20)
    by_both = info(series_uid="3", description="t2_cor", echo_time_ms=90.0, repetition_time_ms=4000.0, n_slices=10)
    derived = info(
        series_uid="4",
        description="t2_cor",
        echo_time_ms=90.0,
        repetition_time_ms=4000.0,
        n_slices=80,
        image_type=("DERIVED", "SECONDARY"),
    )
    bigger = info(series_uid="5", description="t2_ax", echo_time_ms=90.0, repetition_time_ms=4000.0, n_slices=30)
    assert choose_t2_series([by_timing, by_desc]) is by_desc
    assert choose_t2_series([by_timing, by_desc, by_both]) is by_both
    assert choose_t2_series([by_both, derived]) is by_both
    assert choose_t2_series([by_both, derived, bigger]) is bigger
    with pytest.raises(SeriesError, match="no DICOM image series"):
        choose_t2_series([])


# -- real data ---------------------------------------------------------------------------------


def _only_series(series):
    assert len(series) == 1
    return series[0]


def _normalised_xcorr_peak(a: np.ndarray, b: np.ndarray) -> float:
    """Max over all translations of the normalised cross-correlation of two arrays (FFT)."""
    a = a - a.mean()
    b = b - b.mean()
    shape = [2 * s for s in a.shape]
    axes = list(range(a.ndim))
    corr = np.fft.irfftn(
        np.fft.rfftn(a, shape, axes=axes) * np.conj(np.fft.rfftn(b, shape, axes=axes)), shape, axes=axes
    )
    return float(corr.max() / (np.linalg.norm(a) * np.linalg.norm(b)))


@needs_real
def test_real_siemens_t1_is_not_taken_for_t2():
    # Both real series are sagittal T1 FLASH (TE 2.46 ms): the site rule must refuse them.
    with pytest.raises(SeriesError, match=r"no T2 series among 1 series \(1 other contrast\)"):
        read_study(REAL / "siemens-brain-t1-sag-hfs")


@needs_real
def test_real_siemens_hfs_hfp_read_and_agree():
    images = {}
    for pos in ("hfs", "hfp"):
        folder = REAL / f"siemens-brain-t1-sag-{pos}"
        image = read_study(folder, choose=_only_series)
        # Independent reader: SimpleITK/GDCM on the same files.
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(folder)))
        ref = reader.Execute()
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(ref).astype(np.float32))
        np.testing.assert_allclose(image.GetOrigin(), ref.GetOrigin(), atol=1e-3)
        np.testing.assert_allclose(image.GetSpacing(), ref.GetSpacing(), atol=1e-3)
        np.testing.assert_allclose(image.GetDirection(), ref.GetDirection(), atol=1e-6)
        images[pos] = orient_lps(image)
    hfs, hfp = images["hfs"], images["hfp"]
    assert hfs.GetSize() == hfp.GetSize() == (35, 256, 256)
    np.testing.assert_allclose(hfs.GetSpacing(), hfp.GetSpacing(), atol=1e-3)
    np.testing.assert_allclose(hfs.GetDirection(), np.eye(3).ravel(), atol=1e-6)
    np.testing.assert_allclose(hfp.GetDirection(), np.eye(3).ravel(), atol=1e-6)
    # The subject lies elsewhere in the scanner when prone (the head is ~45 mm more posterior
    # in LPS), so voxel-wise correlation is low (0.41) and centres of mass differ by ~40 mm.
    # What must hold: after reorientation the anatomy has the same orientation, i.e. the best
    # translation-only match (~0.71) beats any anterior-posterior or superior-inferior flip
    # (<= 0.58). Left-right flips cannot be told apart on a near-symmetric brain.
    a = sitk.GetArrayFromImage(hfs)[::2, ::2, :].astype(np.float64)  # (z, y, x), half in-plane res
    b = sitk.GetArrayFromImage(hfp)[::2, ::2, :].astype(np.float64)
    same = _normalised_xcorr_peak(a, b)
    flipped_ap = _normalised_xcorr_peak(a, b[:, ::-1, :])
    flipped_si = _normalised_xcorr_peak(a, b[::-1, :, :])
    assert same > 0.65
    assert same > flipped_ap + 0.08
    assert same > flipped_si + 0.15


@needs_real
def test_real_prostatex_nifti():
    image = read_study(REAL / "prostatex-0000-pelvis-t2-axial.nii.gz")
    assert image.GetSize() == (384, 384, 19)
    np.testing.assert_allclose(image.GetSpacing(), (0.5, 0.5, 3.0), atol=1e-4)
    assert image.GetPixelID() == sitk.sitkFloat32


def test_write_helper_is_valid_dicom(tmp_path):
    """The test writer itself produces files pydicom reads back with the intended tags."""
    [path] = write_series(tmp_path / "s", ramp((1, 2, 3)))
    ds = pydicom.dcmread(path)
    assert ds.Modality == "MR" and ds.pixel_array.shape == (2, 3)
    shutil.rmtree(tmp_path / "s")
