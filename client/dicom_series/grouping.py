"""Finding a study's candidate volumes from DICOM headers only (``find_series``).

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
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from client.dicom_series.decode import MAX_STUDY_VOXELS, _check_deflated, _declared_voxels, _n_frames, _over_cap
from client.dicom_series.records import SeriesError, SeriesInfo

logger = logging.getLogger(__name__)

# Images whose direction cosines differ by more than this are put in different groups.
GROUPING_ORIENTATION_TOLERANCE: float = 0.05


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


def find_series(study_dir: Path, max_voxels: int = MAX_STUDY_VOXELS) -> list[SeriesInfo]:
    """Find the candidate volumes of a study folder, from headers only (see the module rules).

    Walks the folder recursively; every file is tried with
    ``pydicom.dcmread(stop_before_pixels=True, force=False)``. Files that are not DICOM
    (no ``DICM`` preamble) are skipped, and so are DICOM objects that are not images
    (no ``SeriesInstanceUID``/``Rows``/``Columns``, e.g. DICOMDIR or reports). Images are
    grouped by series UID, plane, echo and image type.

    Args:
        study_dir: the study folder.
        max_voxels: the decoded size cap (see :mod:`client.dicom_series.decode`): a file
            that declares more, or a deflated file that inflates beyond it, refuses the study.

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
