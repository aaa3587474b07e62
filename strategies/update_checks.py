"""Checks on a site's model update before it reaches aggregation.

A train reply is accepted only if its ``ArrayRecord`` holds exactly the entries of the
global model that was sent, each with the same shape and dtype, and every floating-point
value is finite. A rejected reply is dropped from the round (logged with its reasons, which
name array entries, never data); the round goes on with the other sites.

Robust aggregation (FedMedian, FedTrimmedAvg, Krum) protects against updates that pass these
checks but are still off; these checks catch the updates that would break aggregation or
silently poison every weight (one NaN makes a FedAvg mean NaN).
"""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, Message


def update_problems(arrays: ArrayRecord, reference: ArrayRecord, max_listed: int = 5) -> list[str]:
    """Why ``arrays`` cannot be aggregated against the global ``reference``; empty when it can.

    Args:
        arrays: a site's returned weights.
        reference: the global weights sent to the site this round.
        max_listed: at most this many entry names are listed per kind of problem.

    Returns:
        One string per kind of problem: missing or unexpected entries, shape or dtype
        mismatches, non-finite values (each names up to ``max_listed`` entries).
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
    shape_bad, dtype_bad, nonfinite = [], [], []
    for key in sorted(got & want):
        a, r = arrays[key], reference[key]
        if tuple(a.shape) != tuple(r.shape):
            shape_bad.append(f"{key} {tuple(a.shape)} != {tuple(r.shape)}")
            continue
        if a.dtype != r.dtype:
            dtype_bad.append(f"{key} {a.dtype} != {r.dtype}")
            continue
        value = a.numpy()
        if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
            nonfinite.append(key)
    if shape_bad:
        problems.append(f"wrong shapes: {listed(shape_bad)}")
    if dtype_bad:
        problems.append(f"wrong dtypes: {listed(dtype_bad)}")
    if nonfinite:
        problems.append(f"non-finite values in: {listed(nonfinite)}")
    return problems


def reply_problems(reply: Message, reference: ArrayRecord, arrays_key: str = "arrays") -> list[str]:
    """:func:`update_problems` for a train reply; also rejects a reply without exactly one ArrayRecord
    under ``arrays_key`` or with a non-finite metric."""
    content = reply.content
    if arrays_key not in content.array_records or len(content.array_records) != 1:
        return [f"expected one ArrayRecord named {arrays_key!r}, got {sorted(content.array_records)}"]
    problems = update_problems(content.array_records[arrays_key], reference)
    bad_metrics = []
    for record in content.metric_records.values():
        for key, value in record.items():
            values = value if isinstance(value, list) else [value]
            if any(isinstance(v, float) and not np.isfinite(v) for v in values):
                bad_metrics.append(key)
    if bad_metrics:
        problems.append(f"non-finite metrics: {', '.join(sorted(bad_metrics))}")
    return problems
