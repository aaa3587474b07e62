"""Choosing a study's T2-weighted series (``choose_t2_series``), and the inference fallback.

The rule is in ``choose_t2_series``'s docstring: MR, at least 2 slices, no localizer, no other
contrast named, T2 by description or by TE/TR; ranked, ties broken deterministically.
``choose_largest_mr_series`` is the fallback that ``onfh infer`` uses (never a site) when no
T2 series exists. Series descriptions are matched, never logged.
"""

from __future__ import annotations

import logging
import re

import numpy as np

from client.dicom_series.records import SeriesError, SeriesInfo, _study_label

logger = logging.getLogger(__name__)

# T2 selection thresholds (ms): a T2-weighted spin-echo sequence has a long TE and TR.
T2_MIN_ECHO_TIME_MS: float = 60.0
T2_MIN_REPETITION_TIME_MS: float = 1500.0
# Among echoes of one series that are otherwise equal, the TE closest to this wins.
T2_PREFERRED_ECHO_TIME_MS: float = 90.0

# Series descriptions are matched case-insensitively on word-like tokens.
_LOCALIZER_RE = re.compile(r"(locali[sz]er|scout|survey|pilot|(?<![a-z0-9])loc(?![a-z0-9])|3[\s_-]?pl(ane)?)")
_T2_RE = re.compile(r"(?<![a-z0-9])t2(?:w|wi)?(?![a-z0-9*])(?!_?star)")
_NOT_T2_RE = re.compile(
    r"(?<![a-z0-9])(t1|t1w|t1wi|pd|pdw|pdwi|stir|tirm|flair|dwi|diff\w*|adc|swi|t2\*|t2_?star|trace)(?![a-z0-9])"
)


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
