"""Checks on a site's model update before it reaches aggregation.

A train reply is accepted only if its ``ArrayRecord`` holds exactly the entries of the
global model that was sent, each with the same shape and dtype (declared, and of the decoded
payload, whose byte length is checked before decoding: :func:`decoded`), and every floating-point
value is finite. A metric of the wrong type (a list or string where a number belongs) is a
rejection reason like any other; a check that raises anyway rejects that reply only
(``strategies/site_aware.py``), naming the site and the exception type. A rejected reply is dropped from the round (logged with its reasons, which
name array entries, never data); the round goes on with the other sites.

Bounded influence of one site (issue 16). A site's reply is hostile until checked:

* **Absurd values** — a floating value above :data:`MAX_ABS_WEIGHT` in magnitude (finite but
  huge, e.g. 1e30) rejects the update; so does an integer entry (BatchNorm's
  ``num_batches_tracked``) that moved from the global value by more than ``max_int_delta``
  (the local optimiser steps of a round: one forward pass in training mode adds one).
* **Norm bound against the round's global model** (:func:`bound_update_norms`). The update of
  site *i* is ``delta_i = w_i - w_global`` over every floating entry, its size the L2 norm
  ``||delta_i||`` (float64). With ``m`` the median of the round's norms (accepted updates only),
  an update with ``||delta_i|| > reject_factor * m`` is rejected, and one with
  ``||delta_i|| > clip_factor * m`` is scaled back to ``clip_factor * m`` (same direction).
  Norm clipping is the defence of Sun et al. 2019, "Can you really backdoor federated
  learning?" (arXiv:1911.07963); the round's median norm as the bound is FLAME's
  (Nguyen et al. 2022, USENIX Security, arXiv:2101.02281), which makes the rule scale-free.
  The median is only robust with at least 3 training sites: with 2, it is their mean and one
  site can still double its influence (use 3 sites or more, or a robust strategy).
* **Counts and scores** (:func:`metrics_problems`, :func:`cap_counts`): ``num-examples`` and every
  validation count are capped by the heads the site declared for that split when the run started
  (the ``hello`` query); scores (AUC, IoU, accuracy, recall, AP, ``val-score``) must lie in
  [0, 1]; count vectors (confusion matrix, histograms) must be non-negative integers that add up
  to no more than the reported count. A reply that breaks a range is rejected with a logged
  reason that names the site, never a patient.

Robust aggregation (FedMedian, FedTrimmedAvg, Krum) protects against updates that pass these
checks but are still off; these checks catch the updates that would break aggregation or
silently poison every weight (one NaN makes a FedAvg mean NaN).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, Message

from shared_models.specs import (
    ACCURACY,
    AP50,
    ARRAYS,
    CENTER_ERROR_MM,
    IOU_MEAN,
    LOW_CONFIDENCE,
    MACRO_AUC,
    NUM_EXAMPLES,
    RECALL30,
    RECALL50,
    TRAIN_LOSS,
    VAL_NUM_EXAMPLES,
    VAL_SCORE,
)

#: Largest magnitude a floating weight or buffer may have (no weight of these networks comes near;
#: float16 transfer cannot even hold more than 65504). Above it the update is rejected.
MAX_ABS_WEIGHT = 1e6

#: Metrics that are fractions (AUC, IoU, accuracy, recall, AP, the validation score): [0, 1].
UNIT_SCORES = (VAL_SCORE, MACRO_AUC, ACCURACY, IOU_MEAN, RECALL30, RECALL50, AP50)
#: Metrics that are non-negative (millimetres, losses).
NON_NEGATIVE = (CENTER_ERROR_MM, TRAIN_LOSS)


def update_problems(
    arrays: ArrayRecord, reference: ArrayRecord, max_listed: int = 5, max_int_delta: int | None = None
) -> list[str]:
    """Why ``arrays`` cannot be aggregated against the global ``reference``; empty when it can.

    Args:
        arrays: a site's returned weights.
        reference: the global weights sent to the site this round.
        max_listed: at most this many entry names are listed per kind of problem.

        max_int_delta: largest allowed ``|update - global|`` of an integer entry (``None``: not checked).

    Returns:
        One string per kind of problem: missing or unexpected entries, shape or dtype
        mismatches (declared, or of the decoded payload: :func:`decoded`), non-finite values, values above :data:`MAX_ABS_WEIGHT`, integer entries
        moved by more than ``max_int_delta`` (each names up to ``max_listed`` entries).
    """
    problems: list[str] = []
    got, want = set(arrays.keys()), set(reference.keys())

    def listed(names) -> str:
        names = sorted(names)
        more = f" (+{len(names) - max_listed} more)" if len(names) > max_listed else ""
        return ", ".join(names[:max_listed]) + more

    if want - got:
        problems.append(f"missing entries: {listed(want - got)}")
    if got - want:
        problems.append(f"unexpected entries: {listed(got - want)}")
    shape_bad, dtype_bad, payload_bad, nonfinite, huge, int_moved = [], [], [], [], [], []
    for key in sorted(got & want):
        a, r = arrays[key], reference[key]
        if tuple(a.shape) != tuple(r.shape):
            shape_bad.append(f"{key} {tuple(a.shape)} != {tuple(r.shape)}")
            continue
        if a.dtype != r.dtype:
            dtype_bad.append(f"{key} {a.dtype} != {r.dtype}")
            continue
        value, why = decoded(a, r)
        if value is None:
            payload_bad.append(f"{key} ({why})")
            continue
        if np.issubdtype(value.dtype, np.floating):
            if not np.isfinite(value).all():
                nonfinite.append(key)
            elif value.size and float(np.abs(value).max()) > MAX_ABS_WEIGHT:
                huge.append(key)
        elif max_int_delta is not None and np.issubdtype(value.dtype, np.integer) and value.size:
            # Python ints: no int64 overflow in the difference (2**62 - (-2**62))
            moved = max(abs(int(a) - int(b)) for a, b in zip(value.ravel().tolist(), r.numpy().ravel().tolist()))
            if moved > max_int_delta:
                int_moved.append(f"{key} (moved {moved})")
    if shape_bad:
        problems.append(f"wrong shapes: {listed(shape_bad)}")
    if dtype_bad:
        problems.append(f"wrong dtypes: {listed(dtype_bad)}")
    if payload_bad:
        problems.append(f"payloads that do not match their declared shape and dtype: {listed(payload_bad)}")
    if nonfinite:
        problems.append(f"non-finite values in: {listed(nonfinite)}")
    if huge:
        problems.append(f"values above {MAX_ABS_WEIGHT:g} in: {listed(huge)}")
    if int_moved:
        problems.append(f"integer entries moved by more than {max_int_delta}: {listed(int_moved)}")
    return problems


#: Room for the ``np.save`` header around an Array's payload (the header is padded to 64 bytes;
#: it holds only the dtype, the shape and the order).
NPY_HEADER_MAX = 4096


def decoded(array: Array, reference: Array) -> tuple[np.ndarray | None, str]:
    """``array``'s values, or ``(None, why)`` when its bytes do not hold what its metadata says.

    Flower's ``Array`` carries ``shape`` and ``dtype`` beside the ``np.save`` bytes, and nothing
    makes the two agree: a site can declare ``float32 (200,)`` and send ten thousand elements, one
    element (which numpy would broadcast), or another dtype. The byte length is checked against the
    reference's shape and dtype before decoding (no oversized payload is parsed), and the decoded
    array's shape and dtype after it.
    """
    dtype = np.dtype(reference.dtype)
    expected = int(np.prod(reference.shape, dtype=np.int64)) * dtype.itemsize
    if len(array.data) > expected + NPY_HEADER_MAX:
        return None, f"{len(array.data)} bytes for {expected} bytes of values"
    try:
        value = array.numpy()
    except Exception as err:  # the bytes are not an np.save array: any parse error means unreadable
        return None, f"unreadable ({type(err).__name__})"
    if value.shape != tuple(reference.shape) or value.dtype != dtype:
        return None, f"holds {value.dtype} {value.shape}"
    return value, ""


def normalisation_problems(state: Mapping[str, object], max_listed: int = 5) -> list[str]:
    """Entries no normalisation layer can hold: a negative ``running_var``.

    A BatchNorm running variance is a mean of squares, so it is never negative; a site that sends
    one below zero can pull the FedAvg mean of that channel below zero while every value stays finite
    and small, and the global model then outputs NaN (``sqrt(var + eps)`` of a negative number).
    Checked on the unpacked state dict, since packed transfer hides the entry names.

    Args:
        state: a site's state dict (name -> tensor or array), unpacked.

    Returns:
        One problem naming up to ``max_listed`` entries, or nothing.
    """
    negative = sorted(
        k for k, v in state.items() if k.endswith("running_var") and float(np.asarray(v).min(initial=0.0)) < 0.0
    )
    if not negative:
        return []
    more = f" (+{len(negative) - max_listed} more)" if len(negative) > max_listed else ""
    return [f"negative running variances in: {', '.join(negative[:max_listed])}{more}"]


def reply_problems(
    reply: Message, reference: ArrayRecord, arrays_key: str = ARRAYS, max_int_delta: int | None = None
) -> list[str]:
    """:func:`update_problems` for a train reply; also rejects a reply without exactly one ArrayRecord
    under ``arrays_key`` or with a non-finite metric."""
    content = reply.content
    if arrays_key not in content.array_records or len(content.array_records) != 1:
        return [f"expected one ArrayRecord named {arrays_key!r}, got {sorted(content.array_records)}"]
    problems = update_problems(content.array_records[arrays_key], reference, max_int_delta=max_int_delta)
    bad_metrics = []
    for record in content.metric_records.values():
        for key, value in record.items():
            values = value if isinstance(value, list) else [value]
            if any(isinstance(v, float) and not np.isfinite(v) for v in values):
                bad_metrics.append(key)
    if bad_metrics:
        problems.append(f"non-finite metrics: {', '.join(sorted(bad_metrics))}")
    return problems


def update_norm(arrays: ArrayRecord, reference: ArrayRecord) -> float:
    """L2 norm of ``arrays - reference`` over every floating entry, computed in float64 (no overflow
    for values up to :data:`MAX_ABS_WEIGHT`). Integer entries are left out (checked by delta)."""
    total = 0.0
    for key in reference.keys():
        ref = reference[key].numpy()
        if np.issubdtype(ref.dtype, np.floating):
            delta = arrays[key].numpy().astype(np.float64) - ref.astype(np.float64)
            total += float(np.dot(delta.ravel(), delta.ravel()))
    return math.sqrt(total)


def clip_update(arrays: ArrayRecord, reference: ArrayRecord, scale: float) -> ArrayRecord:
    """``reference + scale * (arrays - reference)`` for floating entries (in float64, cast back to
    each entry's dtype); integer entries unchanged."""
    out = {}
    for key in reference.keys():
        ref, value = reference[key].numpy(), arrays[key].numpy()
        if np.issubdtype(ref.dtype, np.floating):
            ref64 = ref.astype(np.float64)
            value = (ref64 + scale * (value.astype(np.float64) - ref64)).astype(ref.dtype)
        out[key] = Array(np.ascontiguousarray(value))
    return ArrayRecord(out)


def bound_update_norms(norms: Sequence[float], *, clip_factor: float, reject_factor: float) -> list[tuple[str, float]]:
    """The norm rule (module notes): what to do with each update of a round, given the norms.

    Args:
        norms: ``||w_i - w_global||`` of the round's accepted updates.
        clip_factor: updates above ``clip_factor`` x the median norm are scaled back to it (> 0).
        reject_factor: updates above ``reject_factor`` x the median norm are rejected (>= clip_factor).

    Returns:
        One ``(action, scale)`` per update: ``("keep", 1.0)``, ``("clip", bound / norm)`` or
        ``("reject", 0.0)``. With a median of 0 (no site moved) every update is kept.

    Raises:
        ValueError: for ``clip_factor <= 0`` or ``reject_factor < clip_factor``.
    """
    if clip_factor <= 0 or reject_factor < clip_factor:
        raise ValueError(f"need 0 < clip_factor <= reject_factor, got {clip_factor} and {reject_factor}")
    if not norms:
        return []
    median = float(np.median(np.asarray(norms, np.float64)))
    out = []
    for norm in norms:
        if median <= 0 or norm <= clip_factor * median:
            out.append(("keep", 1.0))
        elif norm > reject_factor * median:
            out.append(("reject", 0.0))
        else:
            out.append(("clip", clip_factor * median / norm))
    return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def metrics_problems(metrics: Mapping, *, count_key: str = NUM_EXAMPLES) -> list[str]:
    """Range checks of a reply's metrics (module notes); empty when they hold.

    Every value checked must have the right type first (a list or string where a number belongs is
    a problem, not an exception). Scores in :data:`UNIT_SCORES` must be in [0, 1], :data:`NON_NEGATIVE` ones >= 0; ``count_key``,
    ``val-num-examples`` and ``low-confidence`` non-negative integers; every list metric
    (confusion matrix, histograms) non-negative integers; the confusion matrix adds up to
    ``count_key``, every other list to at most it, and ``hist-pos-k`` + ``hist-neg-k`` to exactly it.
    """
    problems = [
        f"{key} is not a number ({type(metrics[key]).__name__})"
        for key in (*UNIT_SCORES, *NON_NEGATIVE)
        if key in metrics and not _is_number(metrics[key])
    ]
    if problems:
        return problems
    for key in UNIT_SCORES:
        if key in metrics and not 0.0 <= float(metrics[key]) <= 1.0:
            problems.append(f"{key} = {float(metrics[key]):g} outside [0, 1]")
    for key in NON_NEGATIVE:
        if key in metrics and not float(metrics[key]) >= 0.0:
            problems.append(f"{key} = {float(metrics[key]):g} is negative")
    for key in (count_key, VAL_NUM_EXAMPLES, LOW_CONFIDENCE):
        if key in metrics and not _is_count(metrics[key]):
            problems.append(f"{key} = {metrics[key]!r} is not a count")
    if problems:
        return problems
    n = int(metrics.get(count_key, 0))
    lists = {k: v for k, v in metrics.items() if isinstance(v, list)}
    bad = sorted(k for k, v in lists.items() if not all(_is_count(x) for x in v))
    if bad:
        return [f"count lists with negative or non-integer values: {', '.join(bad)}"]
    if "confusion" in lists and sum(lists["confusion"]) != n:
        problems.append(f"confusion matrix holds {sum(lists['confusion'])} heads, {count_key} says {n}")
    for key in sorted(k for k in lists if k != "confusion"):
        if sum(lists[key]) > n:
            problems.append(f"{key} holds {sum(lists[key])} heads, more than {count_key} {n}")
    for key in sorted(k for k in lists if k.startswith("hist-pos-")):
        neg = "hist-neg-" + key.removeprefix("hist-pos-")
        if neg in lists and sum(lists[key]) + sum(lists[neg]) != n:  # every head is positive or negative for a stage
            problems.append(f"{key} and {neg} hold {sum(lists[key]) + sum(lists[neg])} heads, {count_key} says {n}")
    if int(metrics.get(LOW_CONFIDENCE, 0)) > n:
        problems.append(f"{LOW_CONFIDENCE} {metrics[LOW_CONFIDENCE]} is more than {count_key} {n}")
    return problems


def cap_counts(metrics: dict, caps: Mapping[str, int]) -> list[str]:
    """Cap count metrics in place at what the site declared; return a note per capped count.

    Args:
        metrics: a reply's metrics (modified in place).
        caps: metric name -> largest allowed value (e.g. ``{"num-examples": heads-train}``).
    """
    notes = []
    for key, cap in caps.items():
        if key in metrics and _is_count(metrics[key]) and metrics[key] > cap:
            notes.append(f"{key} {metrics[key]} capped at the declared {cap}")
            metrics[key] = int(cap)
    return notes
