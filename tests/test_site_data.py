"""Site manifest, split, per-study verdicts and the preprocessing cache, on a tiny synthetic site."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from pydicom.uid import generate_uid

import client.site_data as site_data
from client.site_data import SiteData, read_manifest
from shared_models.preprocessing import PreprocessingSpec, box_lps_to_voxel, window
from tests.dicom_factory import new_mr_dataset

SPEC = PreprocessingSpec()
PATIENTS = ("ANON-7731", "ANON-8842", "ANON-9953", "ANON-1064")

# Study phantom: coronal slices (rows along +x, columns along -z, slices along +y),
# 40 columns x 16 rows x 12 slices of 8 x 8 x 16 mm; extent x [-160, 160], y [-96, 96],
# z [-64, 64], so midline x = 0 and the hemi grids are centred on y = 0, z = 0.
ROW, COL = np.array([1.0, 0.0, 0.0]), np.array([0.0, 0.0, -1.0])
NORMAL = np.cross(ROW, COL)  # +y
FIRST = np.array([-156.0, -88.0, 60.0])  # centre of the first stored voxel
DX, DY_ROW, DSLICE = 8.0, 8.0, 16.0
BOX_L = (60.0, -24.0, -24.0, 100.0, 24.0, 24.0)
BOX_R = (-100.0, -24.0, -24.0, -60.0, 24.0, 24.0)
# Hand-derived hemi voxel boxes (cz, cy, cx, d, h, w): D from z = -64 (4 mm), H from y = -112
# (2 mm), W from the midline outwards (2.5 mm); index = distance / spacing - 0.5.
VOXEL_BOX = (15.5, 55.5, 31.5, 12.0, 24.0, 16.0)
BLOB, BACKGROUND = 1000.0, 200.0


def study_volume() -> np.ndarray:
    """Stored (slice, row, column) volume with bright blobs inside BOX_L and BOX_R."""
    k, j, i = np.indices((12, 16, 40))
    x = FIRST[0] + DX * i
    y = FIRST[1] + DSLICE * k
    z = FIRST[2] - DY_ROW * j
    vol = np.full((12, 16, 40), BACKGROUND)
    for b in (BOX_L, BOX_R):
        vol[(x > b[0]) & (x < b[3]) & (y > b[1]) & (y < b[4]) & (z > b[2]) & (z < b[5])] = BLOB
    return vol


def write_dicom_study(folder: Path, volume: np.ndarray, description: str = "t2_tse_fs_cor") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    uid = generate_uid()
    paths = []
    for k in range(volume.shape[0]):
        ds = new_mr_dataset()
        ds.SeriesInstanceUID, ds.Modality, ds.SeriesDescription = uid, "MR", description
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.EchoTime, ds.RepetitionTime = 80.0, 3500.0
        ds.ImageOrientationPatient = [*ROW, *COL]
        ds.ImagePositionPatient = list(FIRST + k * DSLICE * NORMAL)
        ds.PixelSpacing = [DY_ROW, DX]
        ds.Rows, ds.Columns = volume.shape[1:]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, 0
        ds.PixelData = volume[k].astype(np.uint16).tobytes()
        path = folder / f"{(k * 7919) % 1000:03d}"  # names unrelated to slice order
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    (folder / "export.log").write_text("junk")
    return paths


def write_nifti_study(path: Path, volume: np.ndarray) -> None:
    image = sitk.GetImageFromArray(volume.astype(np.int16))
    image.SetSpacing((DX, DY_ROW, DSLICE))
    image.SetOrigin(tuple(FIRST))
    image.SetDirection(tuple(np.column_stack([ROW, COL, NORMAL]).ravel()))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def box_text(box) -> str:
    return " ".join(f"{v:g}" for v in box)


def write_manifest(root: Path, rows: list[str], header: str = "patient_id,study,side,ficat_stage,box_lps_mm,scanner"):
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.csv").write_text("\n".join([header, *rows]) + "\n")


@pytest.fixture()
def site(tmp_path) -> Path:
    """2 good studies (DICOM, NIfTI) and 2 broken ones (empty folder, truncated DICOM)."""
    root = tmp_path / "site"
    vol = study_volume()
    write_dicom_study(root / "studies" / "p1", vol)
    write_nifti_study(root / "p2" / "t2.nii.gz", vol)
    (root / "p3").mkdir(parents=True)
    broken = write_dicom_study(root / "p4", vol)
    data = broken[5].read_bytes()
    broken[5].write_bytes(data[: len(data) - 100])
    a, b, c, d = PATIENTS
    write_manifest(
        root,
        [
            f"{a},studies/p1,L,0,{box_text(BOX_L)},Siemens Aera 1.5T",
            f"{a},studies/p1,R,II,{box_text(BOX_R)},Siemens Aera 1.5T",
            f"{b},p2/t2.nii.gz,L,I,{box_text(BOX_L)},GE 3T",
            f"{c},p3,R,,,GE 3T",
            f"{d},p4,L,0,,GE 3T",
        ],
    )
    return root


# -- loading ----------------------------------------------------------------------------------


def test_good_studies_load_and_broken_ones_are_refused(site, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    data = SiteData(site, "site-A", tmp_path / "cache", SPEC)
    verdicts = {v.study: v for v in data.verdicts}
    assert list(verdicts) == ["studies/p1", "p2/t2.nii.gz", "p3", "p4"]
    assert verdicts["studies/p1"].status == verdicts["p2/t2.nii.gz"].status == "ok"
    assert verdicts["studies/p1"].shape == (16, 12, 40)  # LPS (D=z, H=y, W=x)
    assert verdicts["studies/p1"].spacing_mm == pytest.approx((8.0, 16.0, 8.0))
    assert verdicts["p3"].status == "refused" and verdicts["p3"].reason == "no DICOM files"
    assert verdicts["p4"].status == "refused" and "pixel data" in verdicts["p4"].reason
    assert [(h.study, h.side) for h in data.heads] == [("studies/p1", "L"), ("studies/p1", "R"), ("p2/t2.nii.gz", "L")]
    assert data.heads[1].stage == 2 and data.heads[0].site_id == "site-A"
    # Nothing identifying in the logs: no patient ids, study names or paths.
    for record in caplog.records:
        message = record.getMessage()
        assert not any(p in message for p in PATIENTS)
        assert "p1" not in message and "p4" not in message and str(tmp_path) not in message


def test_hemi_volumes_boxes_study_and_crops(site, tmp_path):
    data = SiteData(site, "site-A", tmp_path / "cache", SPEC)
    bright = window(np.array([BLOB]), SPEC)[0]
    for head in data.heads:
        volume, grid = data.hemi_volume(head)
        assert volume.shape == (1, 32, 112, 64) and volume.dtype == np.float32
        voxel_box = data.gt_box_voxels(head)
        np.testing.assert_allclose(voxel_box, VOXEL_BOX, atol=1e-3)
        np.testing.assert_allclose(voxel_box, box_lps_to_voxel(head.box_lps_mm, grid))
        cz, cy, cx = (int(round(v)) for v in voxel_box[:3])
        assert volume[0, cz, cy, cx] == pytest.approx(bright, abs=1e-3)
        crop = data.crop(head, head.box_lps_mm)
        assert crop.shape == (1, 32, 32, 32) and crop.dtype == np.float32
        assert crop[0, 16, 16, 16] == pytest.approx(bright, abs=1e-3)
    image = data.study_image(data.heads[0])
    assert image.GetPixelID() == sitk.sitkFloat32
    np.testing.assert_allclose(image.GetDirection(), np.eye(3).ravel(), atol=1e-6)
    assert image.GetSize() == (40, 12, 16)
    # DICOM and NIfTI copies of the same phantom give the same hemi volume.
    np.testing.assert_allclose(data.hemi_volume(data.heads[0])[0], data.hemi_volume(data.heads[2])[0], atol=1e-5)


def test_cache_hit_reads_no_dicom(site, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = SiteData(site, "site-A", cache, SPEC, progress=True)
    calls: list[str] = []
    real_read = site_data.read_study

    def counting(path, *args, **kwargs):
        calls.append(Path(path).name)
        return real_read(path, *args, **kwargs)

    monkeypatch.setattr(site_data, "read_study", counting)
    second = SiteData(site, "site-A", cache, SPEC)
    assert calls == ["p3", "p4"]  # only the refused studies are retried (refusals are not cached)
    assert [v.reason for v in second.verdicts[:2]] == ["ok (cached)", "ok (cached)"]
    assert [v.status for v in second.verdicts] == [v.status for v in first.verdicts]
    for a, b in zip(first.heads, second.heads):
        np.testing.assert_array_equal(first.hemi_volume(a)[0], second.hemi_volume(b)[0])
        assert first.hemi_volume(a)[1] == second.hemi_volume(b)[1]
    # Cache folder names are hashes: no study names or patient ids.
    names = [p.name for p in cache.rglob("*")]
    assert not any(n in ("p1", "p2", *PATIENTS) for n in names)
    assert not any(n.startswith(".tmp-") for n in names)

    # The key is the content: a touched file (same bytes) is still a hit...
    calls.clear()
    some_file = next(p for p in sorted((site / "studies" / "p1").iterdir()) if p.suffix != ".log")
    os.utime(some_file, ns=(some_file.stat().st_atime_ns, some_file.stat().st_mtime_ns + 10**9))
    SiteData(site, "site-A", cache, SPEC)
    assert sorted(calls) == ["p3", "p4"]
    # ... and changed bytes with the same size and the same mtime are a miss (never stale).
    calls.clear()
    stat = some_file.stat()
    data = bytearray(some_file.read_bytes())
    data[-1] ^= 0x01  # last pixel byte
    some_file.write_bytes(bytes(data))
    os.utime(some_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert some_file.stat().st_size == stat.st_size and some_file.stat().st_mtime_ns == stat.st_mtime_ns
    SiteData(site, "site-A", cache, SPEC)
    assert sorted(calls) == ["p1", "p3", "p4"]
    # A new spec invalidates every entry.
    calls.clear()
    SiteData(site, "site-A", cache, PreprocessingSpec(crop_margin_mm=4.0))
    assert sorted(calls) == ["p1", "p3", "p4", "t2.nii.gz"]


def test_box_on_the_wrong_side_refuses_the_study(tmp_path):
    root = tmp_path / "site"
    write_nifti_study(root / "s.nii.gz", study_volume())
    write_manifest(root, [f"{PATIENTS[0]},s.nii.gz,L,0,{box_text(BOX_R)},GE"])
    data = SiteData(root, "site-B", tmp_path / "cache", SPEC)
    assert data.heads == []
    [verdict] = data.verdicts
    assert verdict.status == "refused"
    assert "box of the L head (manifest row 2) is outside its hemi field of view" in verdict.reason


def test_split_file_and_heads_in(site, tmp_path):
    a, b, c, d = PATIENTS
    (site / "split.csv").write_text(f"patient_id,split\n{a},train\n{b},val\n{c},test\n{d},train\n")
    data = SiteData(site, "site-A", tmp_path / "cache", SPEC)
    assert [(h.study, h.side) for h in data.heads_in("train")] == [("studies/p1", "L"), ("studies/p1", "R")]
    assert [h.study for h in data.heads_in("val")] == ["p2/t2.nii.gz"]
    assert data.heads_in("test") == []
    with pytest.raises(ValueError, match="split"):
        data.heads_in("training")
    with pytest.raises(ValueError, match="no box_lps_mm"):
        SiteData(site, "site-A", tmp_path / "cache", SPEC).gt_box_voxels(
            site_data.HeadRecord("site-A", c, "studies/p1", "R", None, None, "x", "test")
        )


def test_without_split_file_every_head_is_test(site):
    assert {h.split for h in read_manifest(site, "site-A")} == {"test"}


# -- manifest validation ---------------------------------------------------------------------------


GOOD = f"{PATIENTS[0]},s1,L,0,{box_text(BOX_L)},GE"


@pytest.mark.parametrize(
    "rows, message",
    [
        ([GOOD, f"{PATIENTS[1]},s2,X,0,,GE"], r"row 3: side must be L or R"),
        ([f"{PATIENTS[0]},s1,L,III,,GE"], r"row 2: Ficat-Arlet stage III is out of scope"),
        ([f"{PATIENTS[0]},s1,L,IV,,GE"], r"row 2: Ficat-Arlet stage IV is out of scope"),
        ([f"{PATIENTS[0]},s1,L,2b,,GE"], r"row 2: unreadable Ficat-Arlet stage"),
        ([f"{PATIENTS[0]},s1,L,0,1 2 3 4 5,GE"], r"row 2: box_lps_mm must be 6 numbers"),
        ([f'{PATIENTS[0]},s1,L,0,"1,5 2 3 4 5 6",GE'], r"row 2: box_lps_mm must be 6 numbers"),
        ([f"{PATIENTS[0]},s1,L,0,10 0 0 5 1 1,GE"], r"row 2: box_lps_mm must satisfy x0<x1"),
        ([f"{PATIENTS[0]},s1,L,0,1 2 3 nan 5 6,GE"], r"row 2: box_lps_mm must be finite"),
        ([GOOD, "", GOOD], r"row 4: the same patient and side already appear in row 2"),
        ([GOOD, f"{PATIENTS[1]},s1,R,0,,GE"], r"row 3: study also belongs to another patient in row 2"),
        ([f"{PATIENTS[0]},/abs/s1,L,0,,GE"], r"row 2: study must be a path relative"),
        ([f"{PATIENTS[0]},../s1,L,0,,GE"], r"row 2: study must be a path relative"),
        ([",s1,L,0,,GE"], r"row 2: patient_id is empty"),
        ([f"{PATIENTS[0]},s1,L,0,,GE,extra"], r"row 2: more fields than columns"),
        ([], r"manifest has no rows"),
    ],
)
def test_manifest_errors_name_file_and_row(tmp_path, rows, message):
    write_manifest(tmp_path, rows)
    with pytest.raises(ValueError, match=message) as err:
        read_manifest(tmp_path, "site-A")
    assert str(tmp_path / "manifest.csv") in str(err.value)
    assert not any(p in str(err.value) for p in PATIENTS)


def test_manifest_missing_column(tmp_path):
    write_manifest(tmp_path, [f"{PATIENTS[0]},s1,L,0,"], header="patient_id,study,side,ficat_stage,box_lps_mm")
    with pytest.raises(ValueError, match=r"missing column\(s\) scanner"):
        read_manifest(tmp_path, "site-A")
    with pytest.raises(ValueError, match="manifest not found"):
        read_manifest(tmp_path / "nowhere", "site-A")


def test_manifest_parses_values(tmp_path):
    write_manifest(
        tmp_path, [f"{PATIENTS[0]}, sub/s1 ,l,ii,{box_text(BOX_L)},GE 3T", f"{PATIENTS[0]},sub/s1,R,,,GE 3T"]
    )
    left, right = read_manifest(tmp_path, "site-Z")
    assert (left.study, left.side, left.stage, left.box_lps_mm, left.scanner) == ("sub/s1", "L", 2, BOX_L, "GE 3T")
    assert (right.stage, right.box_lps_mm, right.split) == (None, None, "test")


@pytest.mark.parametrize(
    "split_text, message",
    [
        (f"patient_id,split\n{PATIENTS[1]},train\n", r"manifest.csv: row 2: patient has no row in split.csv"),
        (f"patient_id,split\n{PATIENTS[0]},holdout\n", r"split.csv: row 2: split must be one of"),
        (f"patient_id,split\n{PATIENTS[0]},train\n{PATIENTS[0]},test\n", r"split.csv: row 3: patient already assigned"),
        ("patient,split\n", r"split.csv: missing column\(s\) patient_id"),
    ],
)
def test_split_errors(tmp_path, split_text, message):
    write_manifest(tmp_path, [GOOD])
    (tmp_path / "split.csv").write_text(split_text)
    with pytest.raises(ValueError, match=message) as err:
        read_manifest(tmp_path, "site-A")
    assert not any(p in str(err.value) for p in PATIENTS)
