"""DICOM series discovery, T2 series selection and reading, at the site.

A *study* is a folder of DICOM files as exported by a PACS or scanner: any file names,
nested folders, and junk (non-DICOM) files are allowed. :func:`read_study` turns it (or a
NIfTI file) into one float32 SimpleITK image in its native orientation; reorientation to
LPS is :func:`shared_models.preprocessing.orient_lps`'s job.

Modules
    ``records`` (``SeriesError``, ``ReadReport``, ``SeriesInfo``), ``decode`` (size caps
    checked on headers, codestream checks, pixel decoding), ``grouping`` (``find_series``:
    candidate volumes from headers), ``selection`` (``choose_t2_series``), ``read``
    (``read_series``, ``read_study``: ordering, geometry checks, intensities) and ``nifti``.
    Their docstrings give the rules.

Nothing in this package logs patient data: only counts.
"""

from client.dicom_series.decode import MAX_STUDY_VOXELS, check_decoders
from client.dicom_series.grouping import GROUPING_ORIENTATION_TOLERANCE, find_series
from client.dicom_series.read import (
    DUPLICATE_TOLERANCE_MM,
    INTENSITY_CONVENTION,
    ORIENTATION_TOLERANCE,
    STEP_TOLERANCE_FRACTION,
    STEP_TOLERANCE_MM,
    read_series,
    read_study,
)
from client.dicom_series.records import ReadReport, SeriesError, SeriesInfo
from client.dicom_series.selection import (
    T2_MIN_ECHO_TIME_MS,
    T2_MIN_REPETITION_TIME_MS,
    T2_PREFERRED_ECHO_TIME_MS,
    choose_largest_mr_series,
    choose_t2_series,
)

__all__ = [
    "DUPLICATE_TOLERANCE_MM",
    "GROUPING_ORIENTATION_TOLERANCE",
    "INTENSITY_CONVENTION",
    "MAX_STUDY_VOXELS",
    "ORIENTATION_TOLERANCE",
    "STEP_TOLERANCE_FRACTION",
    "STEP_TOLERANCE_MM",
    "T2_MIN_ECHO_TIME_MS",
    "T2_MIN_REPETITION_TIME_MS",
    "T2_PREFERRED_ECHO_TIME_MS",
    "ReadReport",
    "SeriesError",
    "SeriesInfo",
    "check_decoders",
    "choose_largest_mr_series",
    "choose_t2_series",
    "find_series",
    "read_series",
    "read_study",
]
