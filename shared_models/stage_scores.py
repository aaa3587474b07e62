"""Checks of per-stage class probabilities and the binned score histograms a site sends.

The leaf shared by :mod:`shared_models.metrics` (per-site and pooled staging metrics) and
:mod:`shared_models.clinical_stats` (the paper's comparison statistics): both check their inputs and
bin their scores here, so neither imports the other's internals. Only ``numpy``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shared_models.stages import NUM_STAGES

__all__ = ["check_stage_probs", "score_histograms"]


def check_stage_probs(y_true: Any, probs: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate Ficat-Arlet class indices and class probabilities.

    Args:
        y_true: ``(N,)`` integer class indices 0, 1, 2 (integral floats are accepted).
        probs: ``(N, 3)`` class probabilities (any real dtype).

    Returns:
        ``(y, p)``: ``(N,)`` int64 and ``(N, 3)`` float64 arrays.

    Raises:
        ValueError: wrong shapes, non-integer or out-of-range labels, or non-finite probabilities.
    """
    y = np.asarray(y_true)
    p = np.asarray(probs, dtype=np.float64)
    if y.ndim != 1:
        raise ValueError(f"y_true: expected shape (N,), got {y.shape}")
    if p.ndim != 2 or p.shape != (y.shape[0], NUM_STAGES):
        raise ValueError(f"probs: expected shape ({y.shape[0]}, {NUM_STAGES}), got {p.shape}")
    if y.size and (not np.issubdtype(y.dtype, np.integer) and not np.all(np.mod(y, 1) == 0)):
        raise ValueError("y_true: expected integer class indices 0, 1, 2")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= NUM_STAGES):
        raise ValueError(f"y_true: class indices must be in 0..{NUM_STAGES - 1}")
    if not np.all(np.isfinite(p)):
        raise ValueError("probs: values must be finite")
    return y, p


def score_histograms(is_positive: np.ndarray, scores: np.ndarray, n_bins: int = 100) -> tuple[list[int], list[int]]:
    """Counts of ``scores`` (clipped to [0, 1]) in ``n_bins`` equal bins on [0, 1] (the last bin
    includes 1.0), for the positive and for the negative cases: what a site sends instead of its
    per-case scores.

    Args:
        is_positive: ``(N,)`` bool.
        scores: ``(N,)`` float scores.
        n_bins: number of equal-width bins.

    Returns:
        ``(pos, neg)``, two lists of ``n_bins`` ints.
    """
    edges = np.linspace(0.0, 1.0, int(n_bins) + 1)
    s = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
    mask = np.asarray(is_positive, dtype=bool)
    return (
        [int(c) for c in np.histogram(s[mask], bins=edges)[0]],
        [int(c) for c in np.histogram(s[~mask], bins=edges)[0]],
    )
