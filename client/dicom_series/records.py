"""The records the site's DICOM and NIfTI readers share: the error, the read report, a candidate series.

``SeriesError`` names a study and a reason without patient data; ``ReadReport`` collects what
``read_study`` did besides returning the image; ``SeriesInfo`` is one candidate volume found
by ``find_series``. Nothing here logs patient data.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path


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


def _study_label(files: Iterable[Path]) -> str:
    files = [str(f) for f in files]
    if not files:
        return "<unknown study>"
    try:
        return os.path.commonpath([os.path.dirname(f) for f in files])
    except ValueError:
        return os.path.dirname(files[0])
