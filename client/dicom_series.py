"""DICOM series discovery, T2 series selection and reading, at the site.

A *study* is a folder of DICOM files as exported by a PACS or scanner: any file names,
nested folders, and junk (non-DICOM) files are allowed. :func:`read_study` turns it (or a
NIfTI file) into one float32 SimpleITK image in its native orientation; reorientation to
LPS is :func:`shared_models.preprocessing.orient_lps`'s job.

Reading rules (:func:`read_series`):

* Slices are ordered by ``ImagePositionPatient`` projected on the slice normal
  ``row x column`` of ``ImageOrientationPatient``; never by file name or
  ``InstanceNumber``. The third image axis therefore points along the normal.
* The slice step comes from those positions, never from ``SliceThickness`` or
  ``SpacingBetweenSlices``. Image spacing along the normal is the mean step.
* Geometry is checked, and the series refused with a :class:`SeriesError` naming the
  reason, when: any file lacks position/orientation/pixel spacing; orientations differ
  by more than ``ORIENTATION_TOLERANCE`` (1e-3 in direction cosine, about 0.06 degree);
  rows/columns/pixel spacing differ; two slices share a position; a step differs from the
  median step by more than ``max(0.01 mm, 1 % of the median step)`` (a missing slice, or
  a mixed stack); slice positions drift in-plane by more than the same tolerance (a
  sheared stack); fewer than 2 slices; pixel data are missing or cannot be decoded.
* Each slice's ``RescaleSlope``/``RescaleIntercept`` is applied on its own (pydicom's
  ``apply_rescale``) and the volume is float32. Vendor-private scalings (e.g. Philips
  ``MR Scale Slope``) are not applied.
* ``PatientPosition`` (HFS, HFP, FFS, decubitus...) is *not* used: DICOM positions and
  orientations are already in the patient-based LPS frame.
* Enhanced (multi-frame) DICOM is refused for now with an explicit reason.

Nothing in this module logs patient data: only counts.
"""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import nibabel
import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_rescale

logger = logging.getLogger(__name__)

# Largest accepted difference between direction cosines of two slices of one series.
ORIENTATION_TOLERANCE: float = 1e-3
# Slice-step tolerance: the larger of an absolute floor and a fraction of the median step.
STEP_TOLERANCE_MM: float = 0.01
STEP_TOLERANCE_FRACTION: float = 0.01

# T2 selection thresholds (ms): a T2-weighted spin-echo sequence has a long TE and TR.
T2_MIN_ECHO_TIME_MS: float = 60.0
T2_MIN_REPETITION_TIME_MS: float = 1500.0

_NIFTI_SUFFIXES = (".nii", ".nii.gz")

# Series descriptions are matched case-insensitively on word-like tokens.
_LOCALIZER_RE = re.compile(r"(locali[sz]er|scout|survey|pilot|(?<![a-z0-9])loc(?![a-z0-9])|3[\s_-]?pl(ane)?)")
_T2_RE = re.compile(r"(?<![a-z0-9])t2(?:w|wi)?(?![a-z0-9*])(?!_?star)")
_NOT_T2_RE = re.compile(
    r"(?<![a-z0-9])(t1|t1w|t1wi|pd|pdw|pdwi|stir|tirm|flair|dwi|diff\w*|adc|swi|t2\*|t2_?star|trace)(?![a-z0-9])"
)


class SeriesError(Exception):
    """A study or series that cannot be read.

    Attributes:
        study: the study folder or file (may be shown to the site operator; never logged).
        reason: why, without patient data, e.g. ``"non-uniform slice step: 4.00-8.00 mm"``.
    """

    def __init__(self, study: str | os.PathLike, reason: str) -> None:
        self.study = str(study)
        self.reason = reason
        super().__init__(f"{self.study}: {reason}")


@dataclass(frozen=True)
class SeriesInfo:
    """One DICOM series of a study, from headers only.

    Attributes:
        series_uid: ``SeriesInstanceUID``.
        files: the series' files, sorted by path (reading order is decided by
            :func:`read_series`, not by this order).
        description: ``SeriesDescription`` ("" if absent).
        orientation: acquisition plane from the slice normal: ``"AX"``, ``"COR"`` or
            ``"SAG"`` (nearest patient axis), ``"MIXED"`` if the files disagree (e.g. a
            3-plane localizer), ``""`` if unknown.
        n_slices: number of image files (frames for multi-frame files).
        modality: ``Modality``, e.g. ``"MR"``.
        image_type: ``ImageType`` values, upper case.
        echo_time_ms: ``EchoTime`` or None.
        repetition_time_ms: ``RepetitionTime`` or None.
    """

    series_uid: str
    files: tuple[Path, ...]
    description: str
    orientation: str
    n_slices: int
    modality: str
    image_type: tuple[str, ...]
    echo_time_ms: float | None
    repetition_time_ms: float | None


def _study_label(files: Iterable[Path]) -> str:
    files = [str(f) for f in files]
    if not files:
        return "<unknown study>"
    try:
        return os.path.commonpath([os.path.dirname(f) for f in files])
    except ValueError:
        return os.path.dirname(files[0])


def _float_or_none(value: object) -> float | None:
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return out if np.isfinite(out) else None


def _plane(iop: object) -> str:
    try:
        cos = np.asarray([float(v) for v in iop], dtype=np.float64)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return ""
    if cos.shape != (6,):
        return ""
    normal = np.cross(cos[:3], cos[3:])
    return ("SAG", "COR", "AX")[int(np.argmax(np.abs(normal)))]


def _iter_files(study_dir: Path) -> list[Path]:
    out: list[Path] = []
    for root, dirs, names in os.walk(study_dir):
        dirs.sort()
        out.extend(Path(root) / n for n in sorted(names))
    return out


def find_series(study_dir: Path) -> list[SeriesInfo]:
    """Find the image series of a study folder, from headers only.

    Walks the folder recursively; every file is tried with
    ``pydicom.dcmread(stop_before_pixels=True, force=False)``. Files that are not DICOM
    (no ``DICM`` preamble) are skipped, and so are DICOM objects that are not images
    (no ``SeriesInstanceUID``/``Rows``/``Columns``, e.g. DICOMDIR or reports).

    Args:
        study_dir: the study folder.

    Returns:
        One :class:`SeriesInfo` per ``SeriesInstanceUID``, sorted by UID.

    Raises:
        SeriesError: the folder does not exist, a file cannot be opened, or a file starts
            like DICOM but its header cannot be parsed (a corrupt export must not be
            half-read).
    """
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise SeriesError(study_dir, "study folder does not exist")
    groups: dict[str, list[tuple[Path, pydicom.Dataset]]] = defaultdict(list)
    n_junk = n_non_image = n_broken = n_unopenable = 0
    for path in _iter_files(study_dir):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=False)
        except InvalidDicomError:
            n_junk += 1
            continue
        except OSError:
            n_unopenable += 1
            continue
        except Exception:  # noqa: BLE001 - pydicom raises many types on corrupt headers
            n_broken += 1
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid or "Rows" not in ds or "Columns" not in ds:
            n_non_image += 1
            continue
        groups[uid].append((path, ds))
    logger.debug(
        "study scan: %d series, %d non-DICOM files, %d non-image DICOM objects, %d corrupt, %d unopenable",
        len(groups), n_junk, n_non_image, n_broken, n_unopenable,
    )
    if n_unopenable:
        raise SeriesError(study_dir, f"{n_unopenable} file(s) cannot be opened (permissions?)")
    if n_broken:
        raise SeriesError(study_dir, f"{n_broken} file(s) start like DICOM but cannot be parsed")
    out = []
    for uid in sorted(groups):
        members = groups[uid]
        first = members[0][1]
        planes = {_plane(ds.get("ImageOrientationPatient")) for _, ds in members}
        orientation = planes.pop() if len(planes) == 1 else "MIXED"
        n_slices = sum(max(1, int(ds.get("NumberOfFrames", 1) or 1)) for _, ds in members)
        out.append(
            SeriesInfo(
                series_uid=uid,
                files=tuple(p for p, _ in members),
                description=str(first.get("SeriesDescription", "") or ""),
                orientation=orientation,
                n_slices=n_slices,
                modality=str(first.get("Modality", "") or ""),
                image_type=tuple(str(v).upper() for v in (first.get("ImageType") or ())),
                echo_time_ms=_float_or_none(first.get("EchoTime")),
                repetition_time_ms=_float_or_none(first.get("RepetitionTime")),
            )
        )
    return out


def _is_localizer(info: SeriesInfo) -> bool:
    return (
        "LOCALIZER" in info.image_type
        or bool(_LOCALIZER_RE.search(info.description.lower()))
        or info.orientation == "MIXED"
    )


def _t2_by_description(info: SeriesInfo) -> bool | None:
    """True: says T2; False: says another contrast (T1, PD, STIR, DWI, T2*...); None: silent."""
    text = info.description.lower()
    if _NOT_T2_RE.search(text):
        return False
    if _T2_RE.search(text):
        return True
    return None


def _t2_by_timing(info: SeriesInfo) -> bool:
    return (
        info.echo_time_ms is not None
        and info.repetition_time_ms is not None
        and info.echo_time_ms >= T2_MIN_ECHO_TIME_MS
        and info.repetition_time_ms >= T2_MIN_REPETITION_TIME_MS
    )


def choose_t2_series(series: list[SeriesInfo]) -> SeriesInfo:
    """Choose the T2-weighted series of a study.

    Rule, in order:

    1. Keep ``Modality == "MR"`` series with at least 2 slices.
    2. Drop localizers: ``LOCALIZER`` in ``ImageType``, a description naming a
       localizer/scout/survey/pilot/3-plane, or slices in more than one plane.
    3. Drop series whose description names another contrast (T1, PD, STIR/TIRM, FLAIR,
       DWI/ADC/trace, SWI, T2*). A remaining series is T2 if its description says
       ``T2`` (``T2``, ``T2W``, ``T2WI`` as a token) or if ``TE >= 60 ms`` and
       ``TR >= 1500 ms``.
    4. Rank: description says T2, then TE/TR say T2, then ``ORIGINAL`` before
       ``DERIVED`` image type, then most slices; ties by series UID (deterministic).

    Raises:
        SeriesError: no series qualifies; the reason counts the series and why they fell
            out (never their descriptions).
    """
    study = _study_label(f for s in series for f in s.files)
    if not series:
        raise SeriesError(study, "no DICOM image series")
    counts = {"not MR": 0, "single slice": 0, "localizer": 0, "other contrast": 0, "no T2 evidence": 0}
    candidates = []
    for info in series:
        if info.modality.upper() != "MR":
            counts["not MR"] += 1
        elif info.n_slices < 2:
            counts["single slice"] += 1
        elif _is_localizer(info):
            counts["localizer"] += 1
        else:
            by_desc = _t2_by_description(info)
            by_timing = _t2_by_timing(info)
            if by_desc is False:
                counts["other contrast"] += 1
            elif by_desc or by_timing:
                key = (bool(by_desc), by_timing, "DERIVED" not in info.image_type, info.n_slices)
                candidates.append((key, info))
            else:
                counts["no T2 evidence"] += 1
    if not candidates:
        why = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
        raise SeriesError(study, f"no T2 series among {len(series)} series ({why})")
    # Highest key wins; among equal keys the smallest UID, for determinism.
    candidates.sort(key=lambda kv: kv[1].series_uid)
    best = max(candidates, key=lambda kv: kv[0])
    logger.debug("chose a T2 series among %d candidates of %d series", len(candidates), len(series))
    return best[1]


def choose_largest_mr_series(series: list[SeriesInfo]) -> SeriesInfo:
    """Fallback rule for single-study inference when no T2 series exists.

    Keeps MR series with at least 2 slices that are not localizers (as in
    :func:`choose_t2_series`) and takes the one with the most slices (ties by series UID).
    Sites never train on it; ``onfh infer`` uses it only after the T2 rule refused and
    says so in its result.

    Raises:
        SeriesError: if no series qualifies.
    """
    candidates = [s for s in series if s.modality.upper() == "MR" and s.n_slices >= 2 and not _is_localizer(s)]
    if not candidates:
        study = _study_label(f for s in series for f in s.files)
        raise SeriesError(study, f"no usable MR series among {len(series)} series")
    return max(sorted(candidates, key=lambda s: s.series_uid, reverse=True), key=lambda s: s.n_slices)


def _vector(ds: pydicom.Dataset, keyword: str, n: int) -> np.ndarray | None:
    value = ds.get(keyword)
    if value is None:
        return None
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return out if out.shape == (n,) and np.all(np.isfinite(out)) else None


def read_series(info: SeriesInfo) -> sitk.Image:
    """Read one single-frame DICOM series into a float32 volume (see the module rules).

    Returns:
        A 3D float32 image: index axis ``i`` along the row direction cosine, ``j`` along
        the column cosine, ``k`` along the slice normal (increasing position); spacing
        ``(column spacing, row spacing, mean slice step)`` in mm; origin the position of
        the first slice along the normal.

    Raises:
        SeriesError: with the reason the series cannot be a volume.
    """
    study = _study_label(info.files)
    if len(info.files) < 2:
        raise SeriesError(study, f"series has only {len(info.files)} slice file(s)")
    datasets = []
    for path in info.files:
        try:
            datasets.append(pydicom.dcmread(path, force=False))
        except Exception as exc:  # noqa: BLE001
            raise SeriesError(study, f"cannot read a slice file ({type(exc).__name__})") from exc

    if any(int(ds.get("NumberOfFrames", 1) or 1) > 1 for ds in datasets):
        raise SeriesError(study, "enhanced multi-frame DICOM is not supported")
    missing = {
        kw: sum(_vector(ds, kw, n) is None for ds in datasets)
        for kw, n in (("ImageOrientationPatient", 6), ("ImagePositionPatient", 3), ("PixelSpacing", 2))
    }
    missing = {k: v for k, v in missing.items() if v}
    if missing:
        what = ", ".join(f"{k} in {v} file(s)" for k, v in missing.items())
        raise SeriesError(study, f"missing or invalid {what}")

    iops = np.stack([_vector(ds, "ImageOrientationPatient", 6) for ds in datasets])
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

    shapes = {(int(ds.Rows), int(ds.Columns)) for ds in datasets}
    if len(shapes) != 1:
        raise SeriesError(study, f"slices have {len(shapes)} different sizes")
    spacings = np.stack([_vector(ds, "PixelSpacing", 2) for ds in datasets])
    if np.any(spacings <= 0) or np.max(np.abs(spacings - spacings[0])) > 1e-4 * np.max(spacings[0]):
        raise SeriesError(study, "slices have different or invalid pixel spacing")

    positions = np.stack([_vector(ds, "ImagePositionPatient", 3) for ds in datasets])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    along, positions = along[order], positions[order]
    datasets = [datasets[i] for i in order]
    steps = np.diff(along)
    median = float(np.median(steps))
    tol = max(STEP_TOLERANCE_MM, STEP_TOLERANCE_FRACTION * abs(median))
    n_dup = int(np.sum(steps <= tol))
    if n_dup:
        raise SeriesError(
            study,
            f"duplicate slice positions: {len(datasets)} slices at {len(datasets) - n_dup} positions "
            "(multi-echo, multi-phase or repeated slices)",
        )
    if np.max(np.abs(steps - median)) > tol:
        raise SeriesError(
            study,
            f"non-uniform slice step: {steps.min():.2f}-{steps.max():.2f} mm "
            f"(median {median:.2f} mm, tolerance {tol:.3f} mm; missing slice?)",
        )
    offsets = positions - positions[0]
    drift = float(np.max(np.abs(np.stack([offsets @ row, offsets @ col]))))
    if drift > tol:
        raise SeriesError(study, f"slice positions drift in-plane by up to {drift:.2f} mm (sheared stack)")

    slices = []
    for ds in datasets:
        if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
            raise SeriesError(study, "colour (multi-sample) images are not supported")
        if "PixelData" not in ds:
            raise SeriesError(study, "pixel data missing in a slice file (truncated file?)")
        try:
            pixels = ds.pixel_array
        except Exception as exc:  # noqa: BLE001 - decoders raise many types
            raise SeriesError(study, f"cannot decode pixel data ({type(exc).__name__}: {exc})") from exc
        slices.append(np.asarray(apply_rescale(pixels, ds), dtype=np.float32))
    volume = np.stack(slices)

    image = sitk.GetImageFromArray(volume)
    step = (along[-1] - along[0]) / (len(along) - 1)
    image.SetSpacing((float(spacings[0, 1]), float(spacings[0, 0]), float(step)))
    image.SetOrigin(tuple(float(v) for v in positions[0]))
    image.SetDirection(tuple(float(v) for v in np.column_stack([row, col, normal]).ravel()))
    logger.debug("read a series of %d slices", len(datasets))
    return image


def _exception_reason(exc: Exception, path: Path) -> str:
    """A one-line reason from a reader exception, without ITK source noise or the folder."""
    lines = [
        ln.strip()
        for ln in str(exc).splitlines()
        if ln.strip() and not ln.strip().startswith("Exception thrown in") and ".cxx:" not in ln and ".hxx:" not in ln
    ]
    text = " ".join(lines)
    for prefix in ("sitk::ERROR:", "itk::ERROR:"):
        text = text.replace(prefix, "").strip()
    text = text.replace(str(path), path.name)
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__


def _read_nifti(path: Path) -> sitk.Image:
    """Read a NIfTI file with SimpleITK, after checking with nibabel that its data are complete.

    SimpleITK 2.5 silently zero-fills a truncated NIfTI (plain or gzipped); nibabel raises.
    """
    try:
        np.asanyarray(nibabel.load(str(path)).dataobj)
    except Exception as exc:  # noqa: BLE001 - nibabel raises many types on damaged files
        raise SeriesError(path, f"unreadable NIfTI: {_exception_reason(exc, path)}") from exc
    try:
        image = sitk.ReadImage(str(path), sitk.sitkFloat32)
    except RuntimeError as exc:
        raise SeriesError(path, f"unreadable NIfTI: {_exception_reason(exc, path)}") from exc
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() != 3:
        raise SeriesError(path, f"NIfTI is {image.GetDimension()}D, expected a 3D volume")
    # Header text fields (descrip, aux_file, ...) may hold anything: keep geometry and voxels only.
    for key in image.GetMetaDataKeys():
        image.EraseMetaData(key)
    return image


def read_study(
    path: Path,
    choose: Callable[[list[SeriesInfo]], SeriesInfo] = choose_t2_series,
) -> sitk.Image:
    """Read a study into a float32 3D image in its native orientation.

    Args:
        path: a DICOM study folder (the series is chosen with ``choose`` and read with
            :func:`read_series`), or a ``.nii`` / ``.nii.gz`` file (read with
            ``sitk.ReadImage``; ITK converts NIfTI's RAS to LPS). NIfTI data are first
            checked to be complete with nibabel, because SimpleITK zero-fills truncated files;
            header metadata are dropped.
        choose: series selection rule for DICOM folders; :func:`choose_t2_series` (the
            default) is what sites use. Another rule (e.g. a given series UID) is for
            tools and tests; it may raise :class:`SeriesError`.

    Raises:
        SeriesError: naming the study and the reason, e.g. ``"no DICOM files"``,
            ``"no T2 series among 2 series (...)"``, ``"unreadable NIfTI: ..."``.
    """
    path = Path(path)
    if path.is_file() and path.name.lower().endswith(_NIFTI_SUFFIXES):
        return _read_nifti(path)
    if not path.exists():
        raise SeriesError(path, "study does not exist")
    if not path.is_dir():
        raise SeriesError(path, "study must be a DICOM folder or a .nii/.nii.gz file")
    series = find_series(path)
    if not series:
        raise SeriesError(path, "no DICOM files")
    try:
        return sitk.Cast(read_series(choose(series)), sitk.sitkFloat32)
    except SeriesError as exc:
        raise SeriesError(path, exc.reason) from exc
