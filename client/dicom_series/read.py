"""DICOM series discovery, T2 series selection and reading, at the site.

A *study* is a folder of DICOM files as exported by a PACS or scanner: any file names,
nested folders, and junk (non-DICOM) files are allowed. :func:`read_study` turns it (or a
NIfTI file) into one float32 SimpleITK image in its native orientation; reorientation to
LPS is :func:`shared_models.preprocessing.orient_lps`'s job.

Grouping (:func:`find_series`). The unit is the 2D *image*: a single-frame file, or one
frame of an enhanced (multi-frame) file, whose geometry then comes from its per-frame
(else shared) functional groups. Images are grouped by ``SeriesInstanceUID``, slice plane
(direction cosines within ``GROUPING_ORIENTATION_TOLERANCE``), echo (``EchoNumbers`` and
``EchoTime``; ``EffectiveEchoTime`` for enhanced frames) and ``ImageType`` (``FrameType``),
never by file name. So several echoes or contrasts (Dixon water/fat, magnitude/phase) that
share one series UID become separate candidate volumes and are never stacked. When one
series UID holds images in several planes, the plane holding more than half of its images
is the acquisition and the others are localizers (dropped); with no such plane (a
three-plane scout) every plane is a localizer.

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

Decoded size caps, checked on headers before any pixel is decoded or allocated: a study may
declare at most ``max_voxels`` voxels (default ``MAX_STUDY_VOXELS``, 512 x 512 x 256). For
DICOM, every file's ``Rows x Columns x NumberOfFrames`` (:func:`find_series`) and the chosen
series' total (:func:`read_series`) are checked from ``stop_before_pixels`` headers; a file in
the Deflated Explicit VR Little Endian syntax (the whole dataset zlib-compressed, so pydicom
inflates it all even to read the header) is first inflated as a stream, keeping nothing, and
refused when it inflates beyond ``2 x max_voxels`` bytes (16-bit pixels) plus 16 MiB of
header. An encapsulated (JPEG, JPEG-LS, JPEG 2000) frame's own codestream header must declare
the DICOM ``Rows x Columns`` before any file of the series is decoded (a decoder allocates
what the codestream declares; :func:`_check_codestreams`). For NIfTI, the header's dimensions
are checked before nibabel loads a voxel. A study over the cap is refused with a :class:`SeriesError` that gives the declared and allowed sizes.

NIfTI (:func:`read_study` on ``.nii``/``.nii.gz``): nibabel's rule decides the geometry,
the sform when ``sform_code > 0``, else the qform when ``qform_code > 0``, else the base
affine. When qform and sform are both set and disagree (by more than 1e-3 in direction or
0.01 mm in spacing/origin) the sform is used, a warning is logged and a note is added to
the read report. An affine with shear is refused.

Nothing in this module logs patient data: only counts.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import zlib
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel
import numpy as np
import pydicom
import pydicom.encaps
import pydicom.uid
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_rescale

logger = logging.getLogger(__name__)

# Largest accepted difference between direction cosines of two slices of one series.
ORIENTATION_TOLERANCE: float = 1e-3
# Images whose direction cosines differ by more than this are put in different groups.
GROUPING_ORIENTATION_TOLERANCE: float = 0.05
# Slice-step tolerance: the larger of an absolute floor and a fraction of the median step.
STEP_TOLERANCE_MM: float = 0.01
STEP_TOLERANCE_FRACTION: float = 0.01
# Two images closer than this along the normal are at the same position.
DUPLICATE_TOLERANCE_MM: float = 0.05

# T2 selection thresholds (ms): a T2-weighted spin-echo sequence has a long TE and TR.
T2_MIN_ECHO_TIME_MS: float = 60.0
T2_MIN_REPETITION_TIME_MS: float = 1500.0
# Among echoes of one series that are otherwise equal, the TE closest to this wins.
T2_PREFERRED_ECHO_TIME_MS: float = 90.0

INTENSITY_CONVENTION: str = (
    "displayed values: DICOM RescaleSlope/RescaleIntercept per image; "
    "vendor private scale factors (Philips MR Scale Slope) not applied; MONOCHROME1 inverted"
)

# Largest volume a site decodes (voxels): 512 x 512 x 256 = 2^26, about 67 M voxels (268 MB as
# float32). Hip MRI series are about 512 x 512 x 20-60 (2D) and up to 512 x 512 x 200 (3D).
MAX_STUDY_VOXELS: int = 512 * 512 * 256
# Header allowance of a deflated DICOM file on top of its pixel bytes.
_DEFLATED_HEADER_BYTES = 16 << 20

_PHILIPS_CREATOR = "Philips MR Imaging DD 001"
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


@dataclass
class ReadReport:
    """What :func:`read_study` did besides returning the image (filled in by it).

    Attributes:
        series_uid: ``SeriesInstanceUID`` of the series read ("" for NIfTI).
        notes: short remarks for the site operator, without patient data, e.g.
            ``"2 exact duplicate slice(s) dropped"``.
    """

    series_uid: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SeriesInfo:
    """One candidate volume of a study (a series, or one echo/contrast/plane of it), from headers.

    Attributes:
        series_uid: ``SeriesInstanceUID``.
        files: the files holding its images, sorted by path (reading order is decided by
            :func:`read_series`, not by this order).
        description: ``SeriesDescription`` ("" if absent).
        orientation: acquisition plane from the slice normal: ``"AX"``, ``"COR"`` or
            ``"SAG"`` (nearest patient axis), ``"MIXED"`` if the images disagree, ``""`` if
            unknown.
        n_slices: number of images (frames count one by one).
        modality: ``Modality``, e.g. ``"MR"``.
        image_type: ``ImageType`` values (``FrameType`` for enhanced frames), upper case.
        echo_time_ms: ``EchoTime`` (``EffectiveEchoTime``) or None.
        repetition_time_ms: ``RepetitionTime`` or None.
        frames: ``(file, frame index)`` of each image; frame ``-1`` is a single-frame file.
            Empty means every image of ``files``.
        group: grouping label within the series UID (plane, echo, image type), for
            deterministic ordering only; never logged.
        stray_orientation: the images are in a minority plane of their series UID (a
            localizer inside the acquisition, or a three-plane scout).
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
    frames: tuple[tuple[Path, int], ...] = ()
    group: str = ""
    stray_orientation: bool = False


@dataclass(frozen=True)
class _Image:
    """One 2D image (a single-frame file or a frame), with what grouping and reading need."""

    path: Path
    frame: int
    iop: np.ndarray | None
    ipp: np.ndarray | None
    pixel_spacing: np.ndarray | None
    rescale: tuple[float, float] | None  # enhanced frames only; single-frame uses apply_rescale
    echo: str
    echo_time_ms: float | None
    repetition_time_ms: float | None
    image_type: tuple[str, ...]


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


def _vector(ds: pydicom.Dataset | None, keyword: str, n: int) -> np.ndarray | None:
    if ds is None:
        return None
    value = ds.get(keyword)
    if value is None:
        return None
    try:
        out = np.asarray([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return out if out.shape == (n,) and np.all(np.isfinite(out)) else None


def _n_frames(ds: pydicom.Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _is_enhanced(ds: pydicom.Dataset) -> bool:
    return _n_frames(ds) > 1 or "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds


def _functional_item(ds: pydicom.Dataset, frame: int, sequence: str) -> pydicom.Dataset | None:
    """First item of functional group ``sequence`` for ``frame``: per-frame first, then shared."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame < len(per_frame) and sequence in per_frame[frame]:
        seq = per_frame[frame][sequence]
        if len(seq.value):
            return seq.value[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared is not None and len(shared) and sequence in shared[0]:
        seq = shared[0][sequence]
        if len(seq.value):
            return seq.value[0]
    return None


def _echo_label(number: object, time_ms: float | None) -> str:
    text = "" if number in (None, "") else str(number)
    return f"{text}/{'' if time_ms is None else f'{time_ms:.3f}'}"


def _images(path: Path, ds: pydicom.Dataset) -> list[_Image]:
    """The 2D images of one DICOM file with their geometry (functional groups for enhanced files)."""
    image_type = tuple(str(v).upper() for v in (ds.get("ImageType") or ()))
    te = _float_or_none(ds.get("EchoTime"))
    tr = _float_or_none(ds.get("RepetitionTime"))
    if not _is_enhanced(ds):
        return [
            _Image(
                path=path,
                frame=-1,
                iop=_vector(ds, "ImageOrientationPatient", 6),
                ipp=_vector(ds, "ImagePositionPatient", 3),
                pixel_spacing=_vector(ds, "PixelSpacing", 2),
                rescale=None,
                echo=_echo_label(ds.get("EchoNumbers"), te),
                echo_time_ms=te,
                repetition_time_ms=tr,
                image_type=image_type,
            )
        ]
    out = []
    for i in range(_n_frames(ds)):
        timing = _functional_item(ds, i, "MRTimingAndRelatedParametersSequence")
        frame_tr = _float_or_none(timing.get("RepetitionTime")) if timing is not None else None
        echo = _functional_item(ds, i, "MREchoSequence")
        frame_te = _float_or_none(echo.get("EffectiveEchoTime")) if echo is not None else None
        frame_type = _functional_item(ds, i, "MRImageFrameTypeSequence")
        ftype = tuple(str(v).upper() for v in (frame_type.get("FrameType") or ())) if frame_type is not None else ()
        transform = _functional_item(ds, i, "PixelValueTransformationSequence")
        if transform is not None:
            slope = _float_or_none(transform.get("RescaleSlope"))
            intercept = _float_or_none(transform.get("RescaleIntercept"))
        else:
            slope = _float_or_none(ds.get("RescaleSlope"))
            intercept = _float_or_none(ds.get("RescaleIntercept"))
        out.append(
            _Image(
                path=path,
                frame=i,
                iop=_vector(_functional_item(ds, i, "PlaneOrientationSequence"), "ImageOrientationPatient", 6)
                if _functional_item(ds, i, "PlaneOrientationSequence") is not None
                else _vector(ds, "ImageOrientationPatient", 6),
                ipp=_vector(_functional_item(ds, i, "PlanePositionSequence"), "ImagePositionPatient", 3)
                if _functional_item(ds, i, "PlanePositionSequence") is not None
                else _vector(ds, "ImagePositionPatient", 3),
                pixel_spacing=_vector(_functional_item(ds, i, "PixelMeasuresSequence"), "PixelSpacing", 2)
                if _functional_item(ds, i, "PixelMeasuresSequence") is not None
                else _vector(ds, "PixelSpacing", 2),
                rescale=(1.0 if slope is None else slope, 0.0 if intercept is None else intercept),
                echo=_echo_label(None, frame_te if frame_te is not None else te),
                echo_time_ms=frame_te if frame_te is not None else te,
                repetition_time_ms=frame_tr if frame_tr is not None else tr,
                image_type=ftype or image_type,
            )
        )
    return out


def _orientation_clusters(images: list[_Image]) -> list[int]:
    """Cluster label per image: images whose direction cosines agree within the grouping tolerance."""
    centres: list[np.ndarray] = []
    labels = []
    for im in images:
        if im.iop is None:
            labels.append(-1)
            continue
        for c, centre in enumerate(centres):
            if np.max(np.abs(im.iop - centre)) <= GROUPING_ORIENTATION_TOLERANCE:
                labels.append(c)
                break
        else:
            centres.append(im.iop)
            labels.append(len(centres) - 1)
    # Relabel by rounded cosines so labels do not depend on file listing order.
    names = {c: ",".join(f"{v:+.2f}" for v in centre) for c, centre in enumerate(centres)}
    names[-1] = "none"
    return [names[c] for c in labels]  # type: ignore[misc]


def _declared_voxels(ds: pydicom.Dataset) -> int:
    """``Rows x Columns x NumberOfFrames`` from a header (0 when absent or unreadable)."""
    try:
        return int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * _n_frames(ds)
    except (TypeError, ValueError):
        return 0


def _over_cap(what: str, declared: int, max_voxels: int) -> str:
    return (
        f"{what} declares {declared:,} voxels, more than the {max_voxels:,} a study may have "
        "(max-study-voxels); refused before decoding"
    )


def _check_deflated(path: Path, max_voxels: int) -> None:
    """Refuse a Deflated Explicit VR file that inflates beyond ``2 * max_voxels`` bytes + 16 MiB.

    pydicom inflates a deflated dataset whole, even for ``stop_before_pixels``, so the size is
    measured first by inflating it as a stream (64 KiB at a time, nothing kept). Files that are
    not DICOM, or not deflated, are left to ``dcmread``.

    Raises:
        SeriesError: the file inflates beyond the cap, or its deflate stream is corrupt.
    """
    from pydicom.filereader import _read_file_meta_info, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    cap = 2 * max_voxels + _DEFLATED_HEADER_BYTES
    with open(path, "rb") as fh:
        try:
            if read_preamble(fh, False) is None:
                return
            meta = _read_file_meta_info(fh)
        except Exception:
            return
        if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            return
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        total = 0
        try:
            while chunk := fh.read(1 << 16):
                while chunk:
                    total += len(inflater.decompress(chunk, 1 << 20))
                    chunk = inflater.unconsumed_tail
                    if total > cap:
                        raise SeriesError(
                            path.parent,
                            f"a deflated DICOM file inflates to more than {cap:,} bytes "
                            f"(max-study-voxels {max_voxels:,} at 16 bits); refused",
                        )
        except zlib.error as exc:
            raise SeriesError(path.parent, f"a deflated DICOM file is corrupt ({exc})") from None


def find_series(study_dir: Path, max_voxels: int = MAX_STUDY_VOXELS) -> list[SeriesInfo]:
    """Find the candidate volumes of a study folder, from headers only (see the module rules).

    Walks the folder recursively; every file is tried with
    ``pydicom.dcmread(stop_before_pixels=True, force=False)``. Files that are not DICOM
    (no ``DICM`` preamble) are skipped, and so are DICOM objects that are not images
    (no ``SeriesInstanceUID``/``Rows``/``Columns``, e.g. DICOMDIR or reports). Images are
    grouped by series UID, plane, echo and image type.

    Args:
        study_dir: the study folder.
        max_voxels: the decoded size cap (see the module notes): a file that declares more,
            or a deflated file that inflates beyond it, refuses the study.

    Returns:
        One :class:`SeriesInfo` per group, sorted by series UID and group label.

    Raises:
        SeriesError: the folder does not exist, a file cannot be opened, a file starts
            like DICOM but its header cannot be parsed (a corrupt export must not be
            half-read), or a file is over the size cap.
    """
    study_dir = Path(study_dir)
    if not study_dir.is_dir():
        raise SeriesError(study_dir, "study folder does not exist")
    by_uid: dict[str, list[tuple[_Image, pydicom.Dataset]]] = defaultdict(list)
    n_junk = n_non_image = n_broken = n_unopenable = 0
    for path in _iter_files(study_dir):
        try:
            _check_deflated(path, max_voxels)
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=False)
        except InvalidDicomError:
            n_junk += 1
            continue
        except OSError:
            n_unopenable += 1
            continue
        except SeriesError as exc:
            raise SeriesError(study_dir, exc.reason) from None
        except Exception:
            n_broken += 1
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid or "Rows" not in ds or "Columns" not in ds:
            n_non_image += 1
            continue
        if _declared_voxels(ds) > max_voxels:
            raise SeriesError(study_dir, _over_cap("a DICOM file", _declared_voxels(ds), max_voxels))
        try:
            images = _images(path, ds)
        except Exception:
            n_broken += 1
            continue
        by_uid[uid].extend((im, ds) for im in images)
    logger.debug(
        "study scan: %d series UIDs, %d non-DICOM files, %d non-image DICOM objects, %d corrupt, %d unopenable",
        len(by_uid),
        n_junk,
        n_non_image,
        n_broken,
        n_unopenable,
    )
    if n_unopenable:
        raise SeriesError(study_dir, f"{n_unopenable} file(s) cannot be opened (permissions?)")
    if n_broken:
        raise SeriesError(study_dir, f"{n_broken} file(s) start like DICOM but cannot be parsed")
    out = []
    for uid in sorted(by_uid):
        members = by_uid[uid]
        planes = _orientation_clusters([im for im, _ in members])
        plane_counts: dict[str, int] = defaultdict(int)
        for p in planes:
            plane_counts[p] += 1
        main_plane = next((p for p, n in plane_counts.items() if 2 * n > len(members)), None)
        groups: dict[tuple[str, str, tuple[str, ...]], list[tuple[_Image, pydicom.Dataset]]] = defaultdict(list)
        for (im, ds), plane in zip(members, planes):
            groups[(plane, im.echo, im.image_type)].append((im, ds))
        for key in sorted(groups):
            group = groups[key]
            first_im, first = group[0]
            plane_names = {_plane(im.iop) if im.iop is not None else "" for im, _ in group}
            out.append(
                SeriesInfo(
                    series_uid=uid,
                    files=tuple(sorted({im.path for im, _ in group})),
                    description=str(first.get("SeriesDescription", "") or ""),
                    orientation=plane_names.pop() if len(plane_names) == 1 else "MIXED",
                    n_slices=len(group),
                    modality=str(first.get("Modality", "") or ""),
                    image_type=first_im.image_type,
                    echo_time_ms=first_im.echo_time_ms,
                    repetition_time_ms=first_im.repetition_time_ms,
                    frames=tuple((im.path, im.frame) for im, _ in group),
                    group="|".join((key[0], key[1], "\\".join(key[2]))),
                    stray_orientation=len(plane_counts) > 1 and key[0] != main_plane,
                )
            )
    return out


def _is_localizer(info: SeriesInfo) -> bool:
    return (
        "LOCALIZER" in info.image_type
        or bool(_LOCALIZER_RE.search(info.description.lower()))
        or info.orientation == "MIXED"
        or info.stray_orientation
    )


def _echo_preference(info: SeriesInfo) -> float:
    if info.echo_time_ms is None:
        return -np.inf
    return -abs(info.echo_time_ms - T2_PREFERRED_ECHO_TIME_MS)


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
       ``DERIVED`` image type, then most slices, then (between echoes of one series) the
       TE closest to ``T2_PREFERRED_ECHO_TIME_MS``; ties by series UID and group label
       (deterministic). Echoes and contrasts sharing a series UID are separate candidates
       (see :func:`find_series`) and are never stacked.

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
                key = (
                    bool(by_desc),
                    by_timing,
                    "DERIVED" not in info.image_type,
                    info.n_slices,
                    _echo_preference(info),
                )
                candidates.append((key, info))
            else:
                counts["no T2 evidence"] += 1
    if not candidates:
        why = ", ".join(f"{n} {k}" for k, n in counts.items() if n)
        raise SeriesError(study, f"no T2 series among {len(series)} series ({why})")
    # Highest key wins; among equal keys the smallest UID, for determinism.
    candidates.sort(key=lambda kv: (kv[1].series_uid, kv[1].group))
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
    return max(sorted(candidates, key=lambda s: (s.series_uid, s.group), reverse=True), key=lambda s: s.n_slices)


def check_decoders() -> dict[str, bool]:
    """Which compressed transfer syntaxes pydicom can decode here, by name.

    Called once when a site starts (:class:`client.site_data.SiteData`); a missing decoder
    is logged as a warning, and a series that needs it is refused naming its syntax.
    """
    from pydicom.pixels import get_decoder
    from pydicom.uid import (
        JPEG2000,
        JPEG2000Lossless,
        JPEGBaseline8Bit,
        JPEGExtended12Bit,
        JPEGLossless,
        JPEGLosslessSV1,
        JPEGLSLossless,
        JPEGLSNearLossless,
        RLELossless,
    )

    out = {}
    for uid in (
        RLELossless,
        JPEGBaseline8Bit,
        JPEGExtended12Bit,
        JPEGLossless,
        JPEGLosslessSV1,
        JPEGLSLossless,
        JPEGLSNearLossless,
        JPEG2000Lossless,
        JPEG2000,
    ):
        try:
            out[uid.name] = bool(get_decoder(uid).is_available)
        except (NotImplementedError, ValueError):
            out[uid.name] = False
    missing = [name for name, ok in out.items() if not ok]
    if missing:
        logger.warning("no pixel decoder for %d transfer syntax(es): %s", len(missing), "; ".join(missing))
    else:
        logger.debug("pixel decoders available for all %d compressed transfer syntaxes", len(out))
    return out


# Codestream headers checked before decoding (see _check_codestreams).
_J2K_SYNTAXES = frozenset(pydicom.uid.JPEG2000TransferSyntaxes)
_JPEG_SYNTAXES = frozenset(pydicom.uid.JPEGTransferSyntaxes) | frozenset(pydicom.uid.JPEGLSTransferSyntaxes)
_RLE_SYNTAXES = frozenset(pydicom.uid.RLETransferSyntaxes)
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
_J2K_SEARCH_BYTES = 4096  # a JP2 box wrapper (signature, ftyp, jp2h) precedes the codestream
_JPEG_HEADER_BYTES = 1 << 20  # tables and APPn segments before the SOF marker
# SOFn markers (ITU-T T.81 B.1.1.3: 0xC0-0xCF except DHT C4, JPG C8, DAC CC) and JPEG-LS SOF55 (T.87).
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}
_JPEG_NO_LENGTH = frozenset(range(0xD0, 0xDA)) | {0x01}  # RSTn, SOI, EOI, TEM: markers without a length


def _j2k_size(head: bytes) -> tuple[int, int] | None:
    """``(rows, columns)`` from a JPEG 2000 SIZ marker segment (ISO/IEC 15444-1 A.5.1), or None."""
    at = head.find(_J2K_SOC_SIZ, 0, _J2K_SEARCH_BYTES)
    if at < 0 or len(head) < at + 4 + 2 + 2 + 16:
        return None
    xsiz, ysiz, xosiz, yosiz = struct.unpack(">IIII", head[at + 8 : at + 24])  # after Lsiz, Rsiz
    return ysiz - yosiz, xsiz - xosiz


def _jpeg_size(head: bytes) -> tuple[int, int] | None:
    """``(rows, columns)`` from the first SOFn (or JPEG-LS SOF55) segment of a JPEG stream, or None."""
    if head[:2] != b"\xff\xd8":
        return None
    i = 2
    while i + 4 <= len(head):
        if head[i] != 0xFF:
            return None
        marker = head[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in _JPEG_NO_LENGTH:
            i += 2
            continue
        if marker == 0xDA:  # start of scan before any frame header
            return None
        length = struct.unpack(">H", head[i + 2 : i + 4])[0]
        if marker in _JPEG_SOF:
            if i + 9 > len(head) or length < 8:
                return None
            rows, columns = struct.unpack(">HH", head[i + 5 : i + 9])  # after length, precision
            return rows, columns
        i += 2 + length
    return None


def _check_codestreams(ds: pydicom.Dataset, syntax: pydicom.uid.UID, study: str) -> None:
    """Refuse encapsulated frames whose codestream declares another size than ``Rows x Columns``.

    The cap (:func:`read_series`) reads the DICOM header, but a decoder allocates what the
    codestream itself declares: a file of a few hundred bytes can declare 65535 x 65535. So
    before anything is decoded, every frame's codestream header is read: the JPEG 2000 SIZ
    segment (ISO/IEC 15444-1 A.5.1; also HTJ2K, 15444-15), or the JPEG / JPEG-LS frame header
    (T.81 B.2.2, T.87 C.2.2). Their dimensions must equal the DICOM ``Rows`` and ``Columns``.
    RLE declares no size of its own (PS3.5 G.3: its segments fill ``Rows x Columns``). A
    codestream that cannot be parsed, or any other encapsulated syntax, is refused as
    unreadable rather than decoded blindly.

    Raises:
        SeriesError: naming the file's study and the mismatch.
    """
    if syntax in _RLE_SYNTAXES:
        return
    if syntax in _J2K_SYNTAXES:
        parse, what = _j2k_size, "JPEG 2000"
    elif syntax in _JPEG_SYNTAXES:
        parse, what = _jpeg_size, "JPEG"
    else:
        raise SeriesError(
            study, f"pixel data in the transfer syntax {syntax.name!r} cannot be checked before decoding; refused"
        )
    expected = (int(ds.Rows), int(ds.Columns))
    n_frames = _n_frames(ds)
    seen = 0
    try:
        for fragments in pydicom.encaps.generate_fragmented_frames(ds.PixelData, number_of_frames=n_frames):
            head = b""
            for fragment in fragments:
                head += fragment[: _JPEG_HEADER_BYTES - len(head)]
                if len(head) >= _JPEG_HEADER_BYTES:
                    break
            size = parse(head)
            if size is None:
                raise SeriesError(study, f"a {what} frame has no readable codestream header; refused before decoding")
            if size != expected:
                raise SeriesError(
                    study,
                    f"a {what} codestream declares {size[0]} x {size[1]} pixels but the DICOM header "
                    f"{expected[0]} x {expected[1]}; refused before decoding",
                )
            seen += 1
            if seen == n_frames:
                break
    except SeriesError:
        raise
    except Exception as exc:
        raise SeriesError(study, f"unreadable encapsulated pixel data ({type(exc).__name__})") from None
    if seen < n_frames:
        raise SeriesError(study, f"encapsulated pixel data holds {seen} frame(s), the header declares {n_frames}")


def _check_decodable(ds: pydicom.Dataset, study: str) -> None:
    """Refuse, before decoding, a file without pixel data, in colour, in a syntax without a decoder,
    or whose codestream declares another size than its header (:func:`_check_codestreams`)."""
    from pydicom.pixels import get_decoder

    if "PixelData" not in ds:
        raise SeriesError(study, "pixel data missing in a slice file (truncated file?)")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise SeriesError(study, "colour (multi-sample) images are not supported")
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is not None and syntax.is_compressed:
        try:
            available = bool(get_decoder(syntax).is_available)
        except (NotImplementedError, ValueError):
            available = False
        if not available:
            raise SeriesError(
                study,
                f"no decoder for the transfer syntax {syntax.name!r} (install python-gdcm, pylibjpeg and pylibjpeg-openjpeg)",
            )
    if syntax is not None and syntax.is_encapsulated:
        _check_codestreams(ds, syntax, study)


def _decode(ds: pydicom.Dataset, study: str) -> np.ndarray:
    """Pixel data of one file as ``(frames, rows, columns)``; refuses undecodable data naming the syntax."""
    _check_decodable(ds, study)
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    try:
        pixels = ds.pixel_array
    except Exception as exc:
        name = syntax.name if syntax is not None else "unknown transfer syntax"
        raise SeriesError(study, f"cannot decode pixel data ({name}; {type(exc).__name__}: {exc})") from exc
    pixels = np.asarray(pixels)
    return pixels[None] if pixels.ndim == 2 else pixels


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


# RAS (NIfTI) to LPS (ITK/DICOM).
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def _affine_geometry(affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """``(direction (3x3, LPS), spacing (3,), origin (3,) LPS)`` of a NIfTI affine; None if sheared, of zero
    scale, or not finite (NaN or infinity anywhere in its 3 x 4 part)."""
    if not np.all(np.isfinite(np.asarray(affine, dtype=np.float64)[:3, :4])):
        return None
    m = _RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)[:3, :3]
    spacing = np.linalg.norm(m, axis=0)
    if not np.all(spacing > 0):
        return None
    direction = m / spacing
    if np.max(np.abs(direction.T @ direction - np.eye(3))) > 1e-4:
        return None
    origin = _RAS_TO_LPS @ np.asarray(affine, dtype=np.float64)[:3, 3]
    return direction, spacing, origin


def _read_nifti(path: Path, report: ReadReport | None = None, max_voxels: int = MAX_STUDY_VOXELS) -> sitk.Image:
    """Read a NIfTI file: data completeness and geometry by nibabel's rule, voxels via SimpleITK.

    SimpleITK 2.5 silently zero-fills a truncated NIfTI (plain or gzipped); nibabel raises.
    The geometry follows nibabel's ``get_best_affine`` (sform if ``sform_code > 0``, else
    qform, else base) and is set on the SimpleITK image, whatever ITK chose. The header's
    dimensions are checked against ``max_voxels`` before any voxel is read.
    """
    try:
        nii = nibabel.load(str(path))  # the header only; voxels stay on disk
        shape = tuple(int(n) for n in nii.header.get_data_shape())
    except Exception as exc:
        raise SeriesError(path, f"unreadable NIfTI: {_exception_reason(exc, path)}") from exc
    declared = int(np.prod(shape, dtype=np.float64)) if shape else 0
    if declared > max_voxels:
        raise SeriesError(path, _over_cap(f"the NIfTI header ({' x '.join(map(str, shape))})", declared, max_voxels))
    try:
        np.asanyarray(nii.dataobj)
    except Exception as exc:
        raise SeriesError(path, f"unreadable NIfTI: {_exception_reason(exc, path)}") from exc
    header = nii.header
    sform, _ = header.get_sform(coded=True)
    qform, _ = header.get_qform(coded=True)
    if sform is not None and qform is not None:
        gs, gq = _affine_geometry(sform), _affine_geometry(qform)
        disagree = (
            gs is None
            or gq is None
            or np.max(np.abs(gs[0] - gq[0])) > 1e-3
            or np.max(np.abs(gs[1] - gq[1])) > 1e-2
            or np.max(np.abs(gs[2] - gq[2])) > 1e-2
        )
        if disagree:
            logger.warning("a NIfTI study has a qform and an sform that disagree; the sform is used")
            if report is not None:
                report.notes.append("NIfTI qform and sform disagree: sform used")
    best = header.get_best_affine()
    if not np.all(np.isfinite(best)):
        raise SeriesError(
            path, "NIfTI affine (voxel spacing, direction or origin) is not finite (NaN or infinity); refused"
        )
    geometry = _affine_geometry(best)
    if geometry is None:
        raise SeriesError(path, "NIfTI affine has shear or zero scale; refused")
    try:
        image = sitk.ReadImage(str(path), sitk.sitkFloat32)
    except RuntimeError as exc:
        raise SeriesError(path, f"unreadable NIfTI: {_exception_reason(exc, path)}") from exc
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() != 3:
        raise SeriesError(path, f"NIfTI is {image.GetDimension()}D, expected a 3D volume")
    direction, spacing, origin = geometry
    image.SetDirection(tuple(float(v) for v in direction.ravel()))
    image.SetSpacing(tuple(float(v) for v in spacing))
    image.SetOrigin(tuple(float(v) for v in origin))
    # Header text fields (descrip, aux_file, ...) may hold anything: keep geometry and voxels only.
    for key in image.GetMetaDataKeys():
        image.EraseMetaData(key)
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
            given its geometry by nibabel's rule, see the module notes; header metadata
            are dropped).
        choose: series selection rule for DICOM folders; :func:`choose_t2_series` (the
            default) is what sites use. Another rule (e.g. a given series UID) is for
            tools and tests; it may raise :class:`SeriesError`.
        report: if given, receives the series UID and notes for the operator.
        max_voxels: decoded size cap, checked on headers before decoding (module notes).

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
