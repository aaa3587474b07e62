"""Tests for the DICOM hip phantom generator (``sim.phantoms``).

Expected geometry is derived here from the ``ScannerProfile`` numbers and the documented FOV
convention (centred on ``FOV_CENTRE_LPS_MM``, ``fov / spacing`` voxels per axis), not from
the generator's internals.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from sim.phantoms import (
    FOV_CENTRE_LPS_MM,
    PROFILES,
    PhantomProfile,
    ScannerProfile,
    generate_phantoms,
    read_ground_truth,
)

MANIFEST_HEADER = ["patient_id", "study", "side", "ficat_stage", "box_lps_mm", "scanner"]


# ----------------------------------------------------------------------------- helpers


def _micro(stage_counts: dict[str, tuple[int, int, int]], patients: dict[str, int], scanners=None) -> PhantomProfile:
    scanners = scanners or {s: PROFILES["quick"].scanners[s] for s in stage_counts}
    return PhantomProfile(
        name="micro",
        heads_per_site={s: sum(c) for s, c in stage_counts.items()},
        patients_per_site=patients,
        stage_fractions=PROFILES["paper"].stage_fractions,
        scanners=scanners,
        external_groups={},
        stage_counts_per_site=stage_counts,
    )


def _read_manifest(site_dir: Path) -> list[dict[str, str]]:
    with open(site_dir / "manifest.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == MANIFEST_HEADER
        return list(reader)


def _is_dicom(path: Path) -> bool:
    if not path.is_file():
        return False
    with open(path, "rb") as fh:
        return fh.read(132)[128:] == b"DICM"


def _series_files(study_dir: Path) -> list[str]:
    """The DICOM series files under a study folder, sorted by GDCM (any nesting)."""
    for folder in [study_dir, *sorted(p for p in study_dir.rglob("*") if p.is_dir())]:
        if not any(_is_dicom(f) for f in folder.iterdir()):
            continue
        names = sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder))
        if names:
            return list(names)
    raise AssertionError(f"no DICOM series under {study_dir}")


def _read_series(study_dir: Path) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(_series_files(study_dir))
    return reader.Execute()


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name not in ("phantoms.json",)
    }


def _expected_geometry(sc: ScannerProfile):
    """(size, spacing, origin, direction) SimpleITK should report, from the profile alone."""
    row, col = sc.pixel_spacing_mm
    thk = sc.slice_thickness_mm
    fx, fy, fz = sc.fov_lps_mm
    cx, cy, cz = FOV_CENTRE_LPS_MM
    if sc.slice_orientation == "axial":
        sx, sy, sz = col, row, thk
    else:
        sx, sy, sz = col, thk, row
    nx, ny, nz = round(fx / sx), round(fy / sy), round(fz / sz)
    x0, y0, z0 = cx - (nx - 1) / 2 * sx, cy - (ny - 1) / 2 * sy, cz - (nz - 1) / 2 * sz
    if sc.slice_orientation == "axial":
        # rows +y, columns +x, slices +z
        return (nx, ny, nz), (col, row, thk), (x0, y0, z0), (1, 0, 0, 0, 1, 0, 0, 0, 1)
    # rows -z (first row superior), columns +x, slices +y (normal = row x col)
    z_top = cz + (nz - 1) / 2 * sz
    return (nx, nz, ny), (col, row, thk), (x0, y0, z_top), (1, 0, 0, 0, 0, 1, 0, -1, 0)


def _head_score(image: sitk.Image, centre: np.ndarray, radius: float) -> float:
    """Marrow-core mean minus the mean of the surrounding ring (cortex, cartilage, muscle)."""
    a = sitk.GetArrayFromImage(image).astype(np.float64)  # LPS-oriented: [z, y, x]
    origin, spacing = np.array(image.GetOrigin()), np.array(image.GetSpacing())
    axes = [origin[i] + spacing[i] * np.arange(image.GetSize()[i]) for i in range(3)]
    dz, dy, dx = np.meshgrid(axes[2] - centre[2], axes[1] - centre[1], axes[0] - centre[0], indexing="ij")
    d = np.sqrt(dx**2 + dy**2 + dz**2)
    inner, ring = d < radius - 5, (d > radius + 1) & (d < radius + 5)
    return float(a[inner].mean() - a[ring].mean())


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def quick(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("quick")
    summary = generate_phantoms(out, "quick", seed=0, workers=1)
    return out, summary


# ----------------------------------------------------------------------------- profiles


def test_paper_profile_counts_follow_the_paper():
    p = PROFILES["paper"]
    assert p.total_patients == 209
    assert p.total_heads == 381
    counts = p.stage_counts()
    per_stage = tuple(sum(c[k] for c in counts.values()) for k in range(3))
    assert per_stage == (142, 89, 150)  # abstract: 142 non-ONFH, 239 early ONFH; I is the rarer
    assert sum(per_stage[1:]) == 239
    for site, c in counts.items():
        assert sum(c) == p.heads_per_site[site]
        assert p.patients_per_site[site] <= p.heads_per_site[site] <= 2 * p.patients_per_site[site]
    assert max(p.heads_per_site, key=p.heads_per_site.get) == "A"
    assert p.external_groups == {"external-1": ("B",), "external-2": ("C", "D")}
    # Table 2: external set 1 has 49 heads (17/7/25), external set 2 has 43 (16/5/22)
    ext = {g: tuple(sum(counts[s][k] for s in sites) for k in range(3)) for g, sites in p.external_groups.items()}
    assert ext == {"external-1": (17, 7, 25), "external-2": (16, 5, 22)}
    assert p.scanners["A"].model == "Prisma" and p.scanners["A"].field_strength_t == 3.0
    assert {p.scanners[s].model for s in "CD"} == {"Ingenia"} and p.scanners["C"].field_strength_t == 1.5


def test_paper_volumes_stay_small():
    for site, sc in PROFILES["paper"].scanners.items():
        assert int(np.prod(sc.grid_shape)) <= 1_500_000, site
        assert all(f >= need for f, need in zip(sc.fov_lps_mm, (320.0, 224.0, 128.0))), site


def test_quick_profile_rounding_keeps_every_stage():
    p = PROFILES["quick"]
    counts = p.stage_counts()
    assert {s: sum(c) for s, c in counts.items()} == p.heads_per_site
    assert all(min(c) >= 1 for c in counts.values())
    totals = np.sum(list(counts.values()), axis=0)
    expected = np.asarray(p.stage_fractions) * p.total_heads
    assert np.all(np.abs(totals - expected) < 1.0)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"patients_per_site": {"A": 1}}, "patients"),
        ({"stage_fractions": (0.5, 0.5, 0.5)}, "sum to 1"),
        ({"external_groups": {"x": ("Z",)}}, "unknown sites"),
        ({"stage_counts_per_site": {"A": (2, 1, 1)}}, "summing"),
    ],
)
def test_profile_validation(change, match):
    base = dict(
        name="bad",
        heads_per_site={"A": 3},
        patients_per_site={"A": 2},
        stage_fractions=(0.4, 0.2, 0.4),
        scanners={"A": PROFILES["quick"].scanners["A"]},
        external_groups={},
    )
    base.update(change)
    with pytest.raises(ValueError, match=match):
        PhantomProfile(**base)


def test_scanner_validation():
    sc = PROFILES["quick"].scanners["A"]
    with pytest.raises(ValueError, match="slice_orientation"):
        dataclasses.replace(sc, slice_orientation="sagittal")
    with pytest.raises(ValueError, match="whole number"):
        dataclasses.replace(sc, pixel_spacing_mm=(1.7, 1.7))


# ----------------------------------------------------------------------------- site folders


def test_summary_and_manifests(quick):
    out, summary = quick
    profile = PROFILES["quick"]
    assert json.loads((out / "phantoms.json").read_text())["seed"] == 0
    assert summary["profile"] == "quick" and summary["seed"] == 0
    assert summary["totals"]["heads"] == profile.total_heads
    assert summary["totals"]["patients"] == profile.total_patients
    for site, counts in profile.stage_counts().items():
        info = summary["sites"][site]
        assert info["heads_per_stage"] == dict(zip(("0", "I", "II"), counts))
        assert info["scanner"]["vendor"] == profile.scanners[site].vendor
        rows = _read_manifest(out / site)
        assert len(rows) == profile.heads_per_site[site]
        assert len({r["patient_id"] for r in rows}) == profile.patients_per_site[site]
        for r in rows:
            assert re.fullmatch(rf"{site}-\d{{4}}", r["patient_id"])
            assert r["patient_id"] not in r["study"] and (out / site / r["study"]).is_dir()
            assert r["side"] in ("L", "R") and r["ficat_stage"] in ("0", "I", "II")
            assert r["scanner"] == profile.scanners[site].label
            assert re.fullmatch(r"(-?\d+\.\d{3} ){5}-?\d+\.\d{3}", r["box_lps_mm"])
    junk = [p for p in out.rglob("*") if p.is_file() and p.name in ("README.txt", ".DS_Store", "Thumbs.db")]
    assert junk, "some studies should carry a non-DICOM junk file"


@pytest.mark.parametrize("site", ["A", "B", "C", "D"])
def test_dicom_round_trip_geometry(quick, site):
    """Every study lies on the scanner's voxel lattice: the full field of view or a crop of it."""
    out, _ = quick
    sc = PROFILES["quick"].scanners[site]
    size, spacing, origin, direction = _expected_geometry(sc)
    full_shape = np.array(sc.grid_shape)
    full_low = np.array(FOV_CENTRE_LPS_MM) - np.array(sc.fov_lps_mm) / 2 + np.array(sc.lps_spacing_mm) / 2
    for study in sorted({r["study"] for r in _read_manifest(out / site)}):
        image = _read_series(out / site / study)
        np.testing.assert_allclose(image.GetSpacing(), spacing, atol=1e-3)
        np.testing.assert_allclose(image.GetDirection(), direction, atol=1e-6)
        if image.GetSize() == size:
            np.testing.assert_allclose(image.GetOrigin(), origin, atol=1e-3)

        lps = sitk.DICOMOrient(image, "LPS")
        np.testing.assert_allclose(lps.GetDirection(), np.eye(3).ravel(), atol=1e-6)
        np.testing.assert_allclose(lps.GetSpacing(), sc.lps_spacing_mm, atol=1e-3)
        shape = np.array(sitk.GetArrayViewFromImage(lps).shape)
        assert np.all(shape <= full_shape) and np.all(shape >= 2)
        # the crop starts a whole number of voxels into the scanner's lattice, and ends inside it
        steps = (np.array(lps.GetOrigin()) - full_low) / np.array(sc.lps_spacing_mm)
        np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)
        assert np.all(np.round(steps) >= 0) and np.all(np.round(steps)[::-1] + shape <= full_shape)


def test_fields_of_view_are_cut_at_random_edges(quick):
    """About half the studies are cropped (half of those to an oblique slab), at edges that differ
    between studies; heads stay in view."""
    out, _ = quick
    truth = read_ground_truth(out)
    shapes, cropped, studies, oblique = set(), 0, 0, 0
    for site, sc in PROFILES["quick"].scanners.items():
        for study in sorted({g["study"] for g in truth if g["site"] == site}):
            lps = sitk.DICOMOrient(_read_series(out / site / study), "LPS")
            shape = sitk.GetArrayViewFromImage(lps).shape
            studies += 1
            cropped += shape != sc.grid_shape
            shapes.add((site, shape))
            low = np.array(lps.GetOrigin()) - np.array(sc.lps_spacing_mm) / 2
            high = low + np.array(shape[::-1]) * np.array(sc.lps_spacing_mm)
            for g in truth:
                if g["site"] == site and g["study"] == study:
                    centre, radius = np.array(g["head_centre_lps_mm"]), g["head_radius_mm"]
                    # every head centre is in view, or at most a quarter radius (+ one voxel) outside
                    slack = 0.25 * radius + np.array(sc.lps_spacing_mm)
                    assert np.all(centre > low - slack) and np.all(centre < high + slack), (site, study)
                    # ... and not cut away by an oblique slab: the head's centre shows marrow
                    index = lps.TransformPhysicalPointToIndex(np.clip(centre, low + 1e-3, high - 1e-3).tolist())
                    value = lps[index] * 1.0 * sc.rescale_slope + sc.rescale_intercept
                    assert value > 150, (site, study, value)
            values = sitk.GetArrayViewFromImage(lps) * sc.rescale_slope + sc.rescale_intercept
            oblique += float(np.mean(np.abs(values) < 1.0)) > 0.05  # zero-filled wedges of an oblique slab
    assert 0.2 * studies <= cropped <= 0.8 * studies, (cropped, studies)
    assert 1 <= oblique <= cropped, (oblique, cropped)
    assert len(shapes) > len(PROFILES["quick"].scanners) + 2  # the crops differ between studies


def test_dicom_headers(quick):
    out, _ = quick
    for site, sc in PROFILES["quick"].scanners.items():
        row = _read_manifest(out / site)[0]
        files = _series_files(out / site / row["study"])
        ds = pydicom.dcmread(files[len(files) // 2])
        assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == pydicom.uid.MRImageStorage
        assert ds.Modality == "MR"
        assert ds.Manufacturer == sc.vendor and ds.ManufacturerModelName == sc.model
        assert float(ds.MagneticFieldStrength) == sc.field_strength_t
        assert [float(v) for v in ds.PixelSpacing] == list(sc.pixel_spacing_mm)
        assert float(ds.SliceThickness) == float(ds.SpacingBetweenSlices) == sc.slice_thickness_mm
        assert float(ds.EchoTime) >= 60 and float(ds.RepetitionTime) >= 2000  # T2-weighted
        assert ds.PatientID == row["patient_id"] and ds.PatientPosition == "HFS"
        assert ds.PhotometricInterpretation == "MONOCHROME2" and ds.PixelRepresentation == int(sc.pixel_signed)
        assert float(ds.RescaleSlope) == pytest.approx(sc.rescale_slope)
        assert float(ds.RescaleIntercept) == sc.rescale_intercept
        iop = np.array(ds.ImageOrientationPatient, dtype=float)
        assert np.isclose(np.dot(iop[:3], iop[3:]), 0) and np.allclose(np.linalg.norm(iop.reshape(2, 3), axis=1), 1)
        normal = np.cross(iop[:3], iop[3:])
        assert np.allclose(normal, [0, 0, 1] if sc.slice_orientation == "axial" else [0, 1, 0])
        ipp = np.array(ds.ImagePositionPatient, dtype=float)
        assert np.all(np.abs(ipp) <= np.array(sc.fov_lps_mm) / 2)
        assert float(ds.SliceLocation) == pytest.approx(float(np.dot(ipp, normal)))
        assert ds.StudyInstanceUID != ds.SeriesInstanceUID != ds.SOPInstanceUID


def test_boxes_sit_on_the_heads(quick):
    out, _ = quick
    truth = {(g["site"], g["patient_id"], g["side"]): g for g in read_ground_truth(out)}
    for site, sc in PROFILES["quick"].scanners.items():
        rows = _read_manifest(out / site)
        images = {}
        for r in rows:
            box = np.array([float(v) for v in r["box_lps_mm"].split()])
            assert np.all(box[:3] < box[3:])
            g = truth[(site, r["patient_id"], r["side"])]
            centre, radius = np.array(g["head_centre_lps_mm"]), g["head_radius_mm"]
            assert np.all(np.abs((box[:3] + box[3:]) / 2 - centre) <= np.array(sc.lps_spacing_mm) / 2)
            np.testing.assert_allclose((box[3:] - box[:3]) / 2, radius, atol=2e-3)
            assert 21.2 - 1e-3 <= radius <= 26.8 + 1e-3  # diameter 44-52 mm, +-0.8 mm per side
            # 85-100 mm from the midline (+-1.2 mm per side), midline within 8 mm of the FOV centre,
            # yaw up to 7 deg and roll up to 6 deg: |x| >= 83.8 cos 7 deg - 8 - 9 sin 7 deg = 74
            assert 74.0 <= abs(centre[0]) <= 110.0 and (centre[0] > 0) == (r["side"] == "L")
            if r["study"] not in images:
                images[r["study"]] = sitk.DICOMOrient(_read_series(out / site / r["study"]), "LPS")
            image = images[r["study"]]
            at_box = _head_score(image, centre, radius)
            assert at_box > 100, (site, r["patient_id"], r["side"], at_box)
            for axis in range(3):
                for shift in (-7.0, 7.0):
                    moved = centre.copy()
                    moved[axis] += shift
                    assert _head_score(image, moved, radius) < at_box, (site, r["study"], axis, shift)


def test_intensities_fit_the_project_window(quick):
    """Stage-0 marrow stays inside the project window (level 300, width 1500: -450..1050).

    The per-study gain (0.5-1.3) spreads it on purpose: real T2 marrow sits at about 350 on
    the ProstateX study, phantom marrow at 660 x scanner scale before the gain.
    """
    _, summary = quick
    for site, info in summary["sites"].items():
        assert 250 <= info["stage0_marrow_mean"] <= 1000, site


def test_signs_are_subtle(quick):
    _, summary = quick
    for site, info in summary["sites"].items():
        cnr = info["cnr"]
        assert {"I_oedema", "II_bright_band", "II_dark_band"} <= set(cnr), site
        for key, stats in cnr.items():
            # documented design: per-voxel CNR up to about 4-5.5 at 3T, lower at 1.5T
            assert stats["mean"] < 4.5 and stats["max"] < 6.0, (site, key, stats)
        for key in ("I_oedema", "II_bright_band", "II_dark_band"):
            assert cnr[key]["mean"] > 0.3, (site, key, cnr[key])


# ----------------------------------------------------------------------------- surroundings, domain


def _studies(n: int, seed: int = 5):
    """``n`` rendered studies at 2 x 2 x 4 mm: (values in scanner units [z, y, x], patient, sdf(shape))."""
    from sim.phantoms.scanner import _simulate, _study_axes, _StudyTask

    sc = dataclasses.replace(PROFILES["paper"].scanners["A"], pixel_spacing_mm=(2.0, 2.0), slice_thickness_mm=4.0)
    out = []
    for k in range(n):
        task = _StudyTask(
            site="A",
            scanner=sc,
            patient_number=k + 1,
            patient_id=f"A-{k + 1:04d}",
            study="s",
            sides={"R": 0, "L": 0},
            seed=seed,
            site_dir="unused",
        )
        stored, patient, _ = _simulate(task)
        values = stored.astype(np.float64) * sc.rescale_slope + sc.rescale_intercept
        x, y, z = _study_axes(sc, patient.domain)
        grid = (x[None, None, :], y[None, :, None], z[:, None, None])
        out.append((values, patient, lambda shape, grid=grid, n=values.shape: np.broadcast_to(shape.sdf(*grid), n)))
    return out


@pytest.fixture(scope="module")
def studies():
    return _studies(6)


def _marrow(values, patient, sdf) -> float:
    from sim.phantoms.geometry import _Sphere

    cores = [sdf(_Sphere(h.centre, h.radius - 5.0)) < 0 for h in patient.heads]
    return float(np.median(values[np.logical_or(*cores)]))


def test_bladder_is_fluid_bright_and_bowel_gas_is_a_signal_void(studies):
    seen_gas = 0
    for values, patient, sdf in studies:
        marrow = _marrow(values, patient, sdf)
        bladder = sdf(patient.bladder) < -3.0
        muscle = np.logical_or.reduce([sdf(m) < -3.0 for m in patient.surroundings.muscles])
        if bladder.sum() > 20 and muscle.sum() > 20:
            # T2: urine 1000 units x (0.75..1.3), muscle 270 x (0.55..1.35), marrow 660 (+-5 %)
            assert np.median(values[bladder]) > 1.7 * np.median(values[muscle])
            assert np.median(values[bladder]) > 0.9 * marrow
        for _wall, lumen, content in patient.surroundings.bowel:
            inside = sdf(lumen) < -2.0
            # gas lumens painted later may be covered by bladder or bone; judge the majority
            if content == "gas" and inside.sum() > 20:
                assert np.median(values[inside]) < 0.2 * marrow, "bowel gas must be a signal void"
                seen_gas += 1
    assert seen_gas >= 1


def test_contrast_gain_and_noise_vary_between_studies(studies):
    fat_to_marrow, marrow_level = [], []
    for values, patient, sdf in studies:
        marrow = _marrow(values, patient, sdf)
        fat = sdf(patient.surroundings.visceral_fat[0]) < -3.0
        for _, lumen, _ in patient.surroundings.bowel:  # bowel and bladder sit inside the pelvic fat
            fat &= sdf(lumen) > 3.0
        fat &= sdf(patient.bladder) > 3.0
        fat_to_marrow.append(np.median(values[fat]) / marrow)
        marrow_level.append(marrow)
    # fat is not a fixed multiple of marrow (contrast randomisation), nor marrow a fixed level (gain)
    assert max(fat_to_marrow) / min(fat_to_marrow) > 1.1, fat_to_marrow
    assert max(marrow_level) / min(marrow_level) > 1.2, marrow_level
    gains = [p.domain.gain for _, p, _ in studies]
    assert all(0.5 <= g <= 1.3 for g in gains) and len(set(gains)) == len(gains)


# ----------------------------------------------------------------------------- counterfactual signs


def test_stage_signs_against_the_same_patient_without_them(tmp_path):
    """Same seed and patient with stage 0, I or II on both hips: anatomy and noise are shared."""
    scanner = {"A": PROFILES["paper"].scanners["A"]}
    runs = {}
    for name, counts in {"0": (2, 0, 0), "I": (0, 2, 0), "II": (0, 0, 2)}.items():
        out = tmp_path / name
        summary = generate_phantoms(out, _micro({"A": counts}, {"A": 1}, scanner), seed=11, workers=1)
        study = _read_manifest(out / "A")[0]["study"]
        image = sitk.DICOMOrient(_read_series(out / "A" / study), "LPS")
        runs[name] = (sitk.GetArrayFromImage(image).astype(np.float64), read_ground_truth(out), summary, image)

    normal, _, _, image = runs["0"]
    origin, spacing = np.array(image.GetOrigin()), np.array(image.GetSpacing())
    axes = [origin[i] + spacing[i] * np.arange(image.GetSize()[i]) for i in range(3)]
    Z, Y, X = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    sigma = runs["II"][2]["sites"]["A"]["noise_sigma_measured"]

    def dist(p):
        return np.sqrt((X - p[0]) ** 2 + (Y - p[1]) ** 2 + (Z - p[2]) ** 2)

    far = np.ones(normal.shape, dtype=bool)
    for stage in ("I", "II"):
        volume, truth, summary, _ = runs[stage]
        for g in truth:
            assert g["ficat_stage"] == stage
            centre, radius = np.array(g["head_centre_lps_mm"]), g["head_radius_mm"]
            head_core = dist(centre) < radius - 2.5
            far &= dist(centre) > radius + 14
            sign = np.array(g["sign_centre_lps_mm"])
            if stage == "II":
                to_tip = dist(sign)
                rho = g["sign_radius_mm"]
                assert np.linalg.norm(sign - centre) == pytest.approx(radius, abs=1e-2)  # on the surface
                assert sign[2] > centre[2] and sign[1] < centre[1]  # anterosuperior
                dark = head_core & (to_tip > rho + 0.5) & (to_tip < rho + 3.5)
                bright = head_core & (to_tip > rho - 3.5) & (to_tip < rho - 0.5)
                d_dark = (volume - normal)[dark].mean()
                d_bright = (volume - normal)[bright].mean()
                # double line: the outer band is darker than the inner band, by a modest margin
                # band peaks are at most 220 (bright) and 240 (dark) units, so band means stay well below
                assert 5.0 < d_bright - d_dark < 8.0 * sigma, (d_dark, d_bright)
                assert abs(d_dark) / sigma < 5.0 and abs(d_bright) / sigma < 5.0
                away = head_core & (to_tip > rho + 12)
                assert np.abs((volume - normal)[away]).mean() < np.abs((volume - normal)[dark]).mean()
            else:
                region = head_core & (dist(sign) < g["sign_radius_mm"])
                diff = (volume - normal)[region].mean()
                assert 3.0 < diff and diff / sigma < 3.0, diff
    # far from both heads the images are identical: the signs are local, anatomy and noise shared
    for stage in ("I", "II"):
        assert np.array_equal(runs[stage][0][far], normal[far])


# ----------------------------------------------------------------------------- determinism, reuse


def test_determinism_and_reuse(tmp_path):
    profile = _micro({"A": (1, 1, 1), "D": (1, 1, 1)}, {"A": 2, "D": 2})
    first = tmp_path / "first"
    generate_phantoms(first, profile, seed=3, workers=1)
    same = tmp_path / "same"
    generate_phantoms(same, profile, seed=3, workers=2)  # a process pool: same bytes
    assert _tree_digest(first) == _tree_digest(same)

    other = tmp_path / "other"
    generate_phantoms(other, profile, seed=4, workers=1)
    assert (first / "A" / "manifest.csv").read_text() != (other / "A" / "manifest.csv").read_text()
    first_pixels = sitk.GetArrayFromImage(_read_series(first / "A" / _read_manifest(first / "A")[0]["study"]))
    other_pixels = sitk.GetArrayFromImage(_read_series(other / "A" / _read_manifest(other / "A")[0]["study"]))
    assert first_pixels.shape != other_pixels.shape or not np.array_equal(first_pixels, other_pixels)

    # reuse: same profile and seed returns the recorded summary without rewriting anything
    stamp = {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()}
    again = generate_phantoms(first, profile, seed=3)
    assert again == json.loads((first / "phantoms.json").read_text())
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()} == stamp

    # another seed in the same folder is refused (its splits and caches would go with it) ...
    with pytest.raises(FileExistsError, match="seed 3"):
        generate_phantoms(first, profile, seed=4, workers=1)
    assert {p: p.stat().st_mtime_ns for p in first.rglob("*") if p.is_file()} == stamp
    # ... unless asked: then it is regenerated, leaving no stale studies behind
    generate_phantoms(first, profile, seed=4, workers=1, replace=True)
    assert _tree_digest(first) == _tree_digest(other)


def test_refuses_foreign_site_folder(tmp_path):
    (tmp_path / "A").mkdir()
    (tmp_path / "A" / "precious.txt").write_text("not ours")
    with pytest.raises(FileExistsError):
        generate_phantoms(tmp_path, _micro({"A": (1, 0, 0)}, {"A": 1}), seed=0)
    assert (tmp_path / "A" / "precious.txt").exists()


def test_unknown_profile_name(tmp_path):
    with pytest.raises(ValueError, match="unknown phantom profile"):
        generate_phantoms(tmp_path, "huge")
