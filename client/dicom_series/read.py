"""Reading a study into one float32 SimpleITK image: ``read_study`` and ``read_series``.

:func:`read_study` reads a DICOM study folder (its series found by
:func:`client.dicom_series.grouping.find_series` and chosen by
:func:`client.dicom_series.selection.choose_t2_series`) or a NIfTI file
(:mod:`client.dicom_series.nifti`).

Reading rules (:func:`read_series`):

* Slices are ordered by ``ImagePositionPatient`` projected on the slice normal
  ``row x column`` of ``ImageOrientationPatient``; never by file name or
  ``InstanceNumber``. The third image axis therefore points along the normal.
* The slice step comes from those positions, never from ``SliceThickness`` or
  ``SpacingBetweenSlices``. Image spacing along the normal is the mean step.
* Duplicates: images at the same position (within ``DUPLICATE_TOLERANCE_MM``) with identical
  rescaled pixels are exact duplicates (a file exported twice) and only one is kept;
  different pixels at one position (multi-phase or repeated slices without distinguishing
  tags) refuse the series.
* Geometry is checked, and the series refused with a :class:`SeriesError` naming the
  reason, when: any image lacks position/orientation/pixel spacing; orientations differ
  by more than ``ORIENTATION_TOLERANCE`` (1e-3 in direction cosine, about 0.06 degree);
  rows/columns/pixel spacing differ; a step differs from the median step by more than
  ``max(0.01 mm, 1 % of the median step)`` (a missing slice, or a mixed stack: refused,
  never resampled); slice positions drift in-plane by more than the same tolerance (a
  sheared stack from gantry tilt or a step off the normal: refused with the shear angle,
  never resampled, because a sheared volume cannot be represented by an ITK direction
  matrix and resampling would hide an unusual acquisition); fewer than 2 slices; pixel
  data are missing or cannot be decoded.
* Intensity convention (``INTENSITY_CONVENTION``, the same at every site and recorded in
  each site's cache): *displayed values*. Each image's ``RescaleSlope``/``RescaleIntercept``
  (the modality LUT, per slice; per frame from the Pixel Value Transformation functional
  group for enhanced files) is applied and the volume is float32. Vendor-private scalings
  (Philips ``MR Scale Slope`` (2005,100E), the "floating point" values) are *not* applied:
  they rescale each series by an arbitrary factor, so a fixed window would no longer fit;
  their presence is noted in the read report (dcm2niix ``-p n`` behaviour).
* ``MONOCHROME1`` (minimum is white) is inverted after rescale, over the series' value
  range: ``v' = min + max - v``, so bright stays bright before windowing.
* Compressed transfer syntaxes are decoded by pydicom's plugins (RLE natively; JPEG,
  JPEG-LS and JPEG 2000 via python-gdcm, with pylibjpeg + pylibjpeg-openjpeg for JPEG 2000;
  pylibjpeg-libjpeg is deliberately not used: it is GPL-3.0);
  :func:`check_decoders` reports what is available. A series whose transfer syntax has no
  decoder is refused naming the syntax.
* ``PatientPosition`` (HFS, HFP, FFS, decubitus...) is *not* used: DICOM positions and
  orientations are already in the patient-based LPS frame.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.pixels import apply_rescale

from client.dicom_series.decode import (
    MAX_STUDY_VOXELS,
    _check_decodable,
    _check_deflated,
    _declared_voxels,
    _decode,
    _n_frames,
    _over_cap,
)
from client.dicom_series.grouping import _Image, _images, find_series
from client.dicom_series.nifti import _read_nifti
from client.dicom_series.records import ReadReport, SeriesError, SeriesInfo, _study_label
from client.dicom_series.selection import choose_t2_series

logger = logging.getLogger(__name__)

# Largest accepted difference between direction cosines of two slices of one series.
ORIENTATION_TOLERANCE: float = 1e-3
# Slice-step tolerance: the larger of an absolute floor and a fraction of the median step.
STEP_TOLERANCE_MM: float = 0.01
STEP_TOLERANCE_FRACTION: float = 0.01
# Two images closer than this along the normal are at the same position.
DUPLICATE_TOLERANCE_MM: float = 0.05

INTENSITY_CONVENTION: str = (
    "displayed values: DICOM RescaleSlope/RescaleIntercept per image; "
    "vendor private scale factors (Philips MR Scale Slope) not applied; MONOCHROME1 inverted"
)

_PHILIPS_CREATOR = "Philips MR Imaging DD 001"
_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def _has_philips_scale(ds: pydicom.Dataset) -> bool:
    try:
        block = ds.private_block(0x2005, _PHILIPS_CREATOR)
    except KeyError:
        return False
    return 0x0E in block


def read_series(info: SeriesInfo, report: ReadReport | None = None, max_voxels: int = MAX_STUDY_VOXELS) -> sitk.Image:
    """Read one candidate volume (single-frame files or enhanced frames) into a float32 image.

    See the module rules for ordering, duplicates, geometry checks and intensities.

    Args:
        info: from :func:`find_series` (or built by hand with ``files`` only: then every
            image of those files is used).
        report: if given, receives the series UID and notes (dropped duplicates, vendor
            scaling not applied, MONOCHROME1 inverted).
        max_voxels: the decoded size cap: the images' declared ``Rows x Columns`` summed
            over the series, read from headers before any pixel is decoded.

    Returns:
        A 3D float32 image: index axis ``i`` along the row direction cosine, ``j`` along
        the column cosine, ``k`` along the slice normal (increasing position); spacing
        ``(column spacing, row spacing, mean slice step)`` in mm; origin the position of
        the first slice along the normal.

    Raises:
        SeriesError: with the reason the series cannot be a volume.
    """
    study = _study_label(info.files)
    wanted_frames: dict[Path, int] = defaultdict(int)
    for path, _ in info.frames:
        wanted_frames[path] += 1
    declared = 0
    for path in info.files:  # headers first: the declared size is capped before any decoding
        try:
            _check_deflated(path, max_voxels)
            header = pydicom.dcmread(path, stop_before_pixels=True, force=False)
        except SeriesError as exc:
            raise SeriesError(study, exc.reason) from None
        except Exception as exc:
            raise SeriesError(study, f"cannot read a slice file ({type(exc).__name__})") from exc
        per_image = _declared_voxels(header) // _n_frames(header)
        declared += per_image * (wanted_frames[path] if info.frames else _n_frames(header))
        if declared > max_voxels or _declared_voxels(header) > max_voxels:
            raise SeriesError(study, _over_cap("the series", max(declared, _declared_voxels(header)), max_voxels))
    datasets: dict[Path, pydicom.Dataset] = {}
    for path in info.files:
        try:
            datasets[path] = pydicom.dcmread(path, force=False)
        except Exception as exc:
            raise SeriesError(study, f"cannot read a slice file ({type(exc).__name__})") from exc
    wanted = set(info.frames) if info.frames else None
    images: list[_Image] = []
    for path, ds in datasets.items():
        images.extend(im for im in _images(path, ds) if wanted is None or (im.path, im.frame) in wanted)
    if len(images) < 2:
        raise SeriesError(study, f"series has only {len(images)} image(s)")

    missing = {
        kw: sum(getattr(im, attr) is None for im in images)
        for kw, attr in (
            ("ImageOrientationPatient", "iop"),
            ("ImagePositionPatient", "ipp"),
            ("PixelSpacing", "pixel_spacing"),
        )
    }
    missing = {k: v for k, v in missing.items() if v}
    if missing:
        what = ", ".join(f"{k} in {v} image(s)" for k, v in missing.items())
        raise SeriesError(study, f"missing or invalid {what}")

    iops = np.stack([im.iop for im in images])
    if np.max(np.abs(iops - iops[0])) > ORIENTATION_TOLERANCE:
        raise SeriesError(study, "slices have different orientations")
    row, col = iops[0, :3], iops[0, 3:]
    if abs(np.linalg.norm(row) - 1) > ORIENTATION_TOLERANCE or abs(np.linalg.norm(col) - 1) > ORIENTATION_TOLERANCE:
        raise SeriesError(study, "image orientation cosines are not unit vectors")
    if abs(float(np.dot(row, col))) > ORIENTATION_TOLERANCE:
        raise SeriesError(study, "image orientation cosines are not orthogonal")
    row, col = row / np.linalg.norm(row), col / np.linalg.norm(col)
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)

    shapes = {(int(datasets[im.path].Rows), int(datasets[im.path].Columns)) for im in images}
    if len(shapes) != 1:
        raise SeriesError(study, f"slices have {len(shapes)} different sizes")
    spacings = np.stack([im.pixel_spacing for im in images])
    if not np.all(spacings > 0) or np.max(np.abs(spacings - spacings[0])) > 1e-4 * np.max(spacings[0]):
        raise SeriesError(study, "slices have different or invalid pixel spacing")
    photometric = {str(datasets[p].get("PhotometricInterpretation", "MONOCHROME2")).upper() for p in datasets}
    if len(photometric) != 1 or photometric.pop() not in ("MONOCHROME1", "MONOCHROME2"):
        raise SeriesError(
            study, "photometric interpretation is not one of MONOCHROME1/MONOCHROME2 for the whole series"
        )
    monochrome1 = str(next(iter(datasets.values())).get("PhotometricInterpretation", "")).upper() == "MONOCHROME1"

    # Decode every file once, and rescale each image on its own (float64 until the end). A
    # file's raw and decoded pixels are freed as soon as its images are rescaled.
    of_file: dict[Path, list[int]] = defaultdict(list)
    for index, im in enumerate(images):
        of_file[im.path].append(index)
    values: list[np.ndarray] = [np.empty(0)] * len(images)
    for ds in datasets.values():  # every file (and codestream's declared size) before any is decoded
        _check_decodable(ds, study)
    for path, ds in datasets.items():
        decoded = _decode(ds, study)
        for index in of_file[path]:
            im = images[index]
            pixels = decoded[max(im.frame, 0)]
            if im.rescale is None:
                values[index] = np.asarray(apply_rescale(pixels, ds), dtype=np.float64)
            else:
                values[index] = pixels.astype(np.float64) * im.rescale[0] + im.rescale[1]
        del decoded
        del ds.PixelData  # also drops pydicom's cached pixel_array

    positions = np.stack([im.ipp for im in images])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    values = [values[i] for i in order]

    # Duplicates: same position; identical pixels are dropped, different ones refuse the series.
    keep = [0]
    n_exact = n_conflict = 0
    for i in range(1, len(along)):
        j = keep[-1]
        if along[i] - along[j] <= DUPLICATE_TOLERANCE_MM:
            same_place = np.max(np.abs(positions[i] - positions[j])) <= DUPLICATE_TOLERANCE_MM
            if same_place and np.array_equal(values[i], values[j]):
                n_exact += 1
            else:
                n_conflict += 1
            continue
        keep.append(i)
    if n_conflict:
        raise SeriesError(
            study,
            f"conflicting duplicate slice positions: {len(along)} images at {len(keep)} positions, "
            f"{n_conflict} with different pixels (multi-echo, multi-phase or repeated slices)",
        )
    along, positions, values = along[keep], positions[keep], [values[i] for i in keep]
    if len(along) < 2:
        raise SeriesError(study, "series has only 1 distinct slice position")

    steps = np.diff(along)
    median = float(np.median(steps))
    tol = max(STEP_TOLERANCE_MM, STEP_TOLERANCE_FRACTION * abs(median))
    if np.max(np.abs(steps - median)) > tol:
        raise SeriesError(
            study,
            f"non-uniform slice step: {steps.min():.2f}-{steps.max():.2f} mm "
            f"(median {median:.2f} mm, tolerance {tol:.3f} mm; missing slice?)",
        )
    offsets = positions - positions[0]
    in_plane = np.stack([offsets @ row, offsets @ col], axis=1)
    drift = float(np.max(np.abs(in_plane)))
    if drift > tol:
        shear_deg = float(np.degrees(np.arctan2(np.linalg.norm(in_plane[-1]), along[-1] - along[0])))
        raise SeriesError(
            study,
            f"sheared stack: slice positions drift in-plane by up to {drift:.2f} mm "
            f"(gantry tilt or slice step {shear_deg:.1f} degrees off the normal; refused, not resampled)",
        )

    # Filled slice by slice into float32 (each element computed in float64, then cast: the same
    # values as stacking in float64 and casting the stack, at a third of the peak memory).
    volume = np.empty((len(values), *values[0].shape), dtype=np.float32)
    low = min(float(v.min()) for v in values) if monochrome1 else 0.0
    high = max(float(v.max()) for v in values) if monochrome1 else 0.0
    for k in range(len(values)):
        volume[k] = (low + high - values[k]) if monochrome1 else values[k]
        values[k] = np.empty(0)  # free each float64 slice once copied
    del values
    image = sitk.GetImageFromArray(volume)
    del volume
    step = (along[-1] - along[0]) / (len(along) - 1)
    image.SetSpacing((float(spacings[0, 1]), float(spacings[0, 0]), float(step)))
    image.SetOrigin(tuple(float(v) for v in positions[0]))
    image.SetDirection(tuple(float(v) for v in np.column_stack([row, col, normal]).ravel()))
    if report is not None:
        report.series_uid = info.series_uid
        if n_exact:
            report.notes.append(f"{n_exact} exact duplicate slice(s) dropped")
        if monochrome1:
            report.notes.append("MONOCHROME1 inverted")
        if any(_has_philips_scale(ds) for ds in datasets.values()):
            report.notes.append("Philips private scale slope present, not applied (displayed values used)")
    logger.debug("read a series of %d slices (%d exact duplicates dropped)", len(along), n_exact)
    return image


def read_study(
    path: Path,
    choose: Callable[[list[SeriesInfo]], SeriesInfo] = choose_t2_series,
    report: ReadReport | None = None,
    max_voxels: int = MAX_STUDY_VOXELS,
) -> sitk.Image:
    """Read a study into a float32 3D image in its native orientation.

    Args:
        path: a DICOM study folder (the series is chosen with ``choose`` and read with
            :func:`read_series`), or a ``.nii`` / ``.nii.gz`` file (checked complete and
            given its geometry by nibabel's rule, see :mod:`client.dicom_series.nifti`;
            header metadata are dropped).
        choose: series selection rule for DICOM folders; :func:`choose_t2_series` (the
            default) is what sites use. Another rule (e.g. a given series UID) is for
            tools and tests; it may raise :class:`SeriesError`.
        report: if given, receives the series UID and notes for the operator.
        max_voxels: decoded size cap, checked on headers before decoding
            (:mod:`client.dicom_series.decode`).

    Raises:
        SeriesError: naming the study and the reason, e.g. ``"no DICOM files"``,
            ``"no T2 series among 2 series (...)"``, ``"unreadable NIfTI: ..."``.
    """
    path = Path(path)
    if path.is_file() and path.name.lower().endswith(_NIFTI_SUFFIXES):
        return _read_nifti(path, report, max_voxels)
    if not path.exists():
        raise SeriesError(path, "study does not exist")
    if not path.is_dir():
        raise SeriesError(path, "study must be a DICOM folder or a .nii/.nii.gz file")
    series = find_series(path, max_voxels)
    if not series:
        raise SeriesError(path, "no DICOM files")
    try:
        return sitk.Cast(read_series(choose(series), report, max_voxels), sitk.sitkFloat32)
    except SeriesError as exc:
        raise SeriesError(path, exc.reason) from exc
