"""Reading a NIfTI study: completeness and geometry by nibabel's rule, voxels via SimpleITK.

NIfTI (:func:`read_study` on ``.nii``/``.nii.gz``): nibabel's rule decides the geometry,
the sform when ``sform_code > 0``, else the qform when ``qform_code > 0``, else the base
affine. When qform and sform are both set and disagree (by more than 1e-3 in direction or
0.01 mm in spacing/origin) the sform is used, a warning is logged and a note is added to
the read report. An affine with shear is refused.
"""

from __future__ import annotations

import logging
from pathlib import Path

import nibabel
import numpy as np
import SimpleITK as sitk

from client.dicom_series.decode import MAX_STUDY_VOXELS, _over_cap
from client.dicom_series.records import ReadReport, SeriesError

logger = logging.getLogger(__name__)


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
