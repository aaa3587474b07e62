"""DICOM series discovery, T2 series selection and reading, at the site.

The rules are described in ``client/dicom_series/read.py``; this package re-exports its public names.
"""

from client.dicom_series.read import (
    DUPLICATE_TOLERANCE_MM,
    GROUPING_ORIENTATION_TOLERANCE,
    INTENSITY_CONVENTION,
    MAX_STUDY_VOXELS,
    ORIENTATION_TOLERANCE,
    STEP_TOLERANCE_FRACTION,
    STEP_TOLERANCE_MM,
    T2_MIN_ECHO_TIME_MS,
    T2_MIN_REPETITION_TIME_MS,
    T2_PREFERRED_ECHO_TIME_MS,
    ReadReport,
    SeriesError,
    SeriesInfo,
    check_decoders,
    choose_largest_mr_series,
    choose_t2_series,
    find_series,
    read_series,
    read_study,
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
