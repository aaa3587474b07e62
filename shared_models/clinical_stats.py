"""Statistics for the paper's comparisons: early-ONFH binary figures, kappa, patient-level
bootstrap confidence intervals, the McNemar test against readers, and the error bound of an AUC
computed from binned score histograms.

Sources:

* Yang et al., Front. Surg. 2025, section 2.7: "The McNemar test was used to compare performance
  differences between the predictions of the 3D-ONFHNet framework and the diagnoses made by
  orthopedic surgeons"; section 1: stages I and II are early ONFH.
* McNemar Q., Psychometrika 1947;12(2):153-7 (the test); Edwards A.L., Psychometrika 1948;13:185-7
  (continuity correction). The computation is statsmodels'
  ``statsmodels.stats.contingency_tables.mcnemar``.
* Cluster (patient-level) percentile bootstrap: Efron B., Tibshirani R., *An Introduction to the
  Bootstrap*, 1993, ch. 13 (percentile interval); Field C.A., Welsh A.H., J. R. Stat. Soc. B
  2007;69(3):369-90 (resampling clusters, not units, when units within a cluster are correlated:
  the two femoral heads of one patient).
* Mann-Whitney form of the AUC with half-counted ties: Hanley J.A., McNeil B.J., Radiology
  1982;143(1):29-36.
* Quadratic weighted kappa: Cohen J., Psychol. Bull. 1968;70(4):213-20, via scikit-learn's
  ``cohen_kappa_score(weights="quadratic")``.

Only ``numpy``, ``scipy``/``statsmodels`` and scikit-learn; no Flower.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.metrics import cohen_kappa_score, recall_score, roc_auc_score

from shared_models.stage_scores import check_stage_probs, score_histograms
from shared_models.stages import NUM_STAGES

__all__ = [
    "MCNEMAR_EXACT_BELOW",
    "BootstrapCI",
    "auc_bin_error_bound",
    "auc_from_histograms",
    "bootstrap_ci",
    "early_onfh_binary",
    "histogram_auc_bound",
    "mcnemar_test",
    "quadratic_weighted_kappa",
]

logger = logging.getLogger(__name__)

#: Discordant-pair count below which :func:`mcnemar_test` uses the exact binomial test
#: (the usual rule, e.g. statsmodels' documentation and Fagerland et al., BMC Med Res Methodol
#: 2013;13:91, who recommend the exact or mid-p test for small samples).
MCNEMAR_EXACT_BELOW = 25


# --------------------------------------------------------------------------- early ONFH, kappa


def early_onfh_binary(y_true: Sequence[int] | np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Binary early ONFH (stage I or II) versus non-ONFH (stage 0).

    The score is ``P(I) + P(II) = 1 - P(0)`` for softmax outputs; the decision is the arg-max of the
    three-class probabilities (early ONFH when the predicted stage is not 0), so the sensitivity and
    specificity agree with the three-class confusion matrix. Computed with scikit-learn
    (``roc_auc_score``, ``recall_score``).

    Args:
        y_true: ``(N,)`` integer Ficat-Arlet class indices (0, 1, 2).
        probs: ``(N, 3)`` float class probabilities.

    Returns:
        ``{"auc", "sensitivity", "specificity", "n", "n_early"}``: floats in ``[0, 1]`` and ints.
        AUC is NaN when only one of the two groups is present; sensitivity is NaN with no early
        case, specificity NaN with no stage-0 case.

    Raises:
        ValueError: wrong shapes, labels outside 0..2 or non-finite probabilities.
    """
    y, p = check_stage_probs(y_true, probs)
    early = y != 0
    score = p[:, 1] + p[:, 2]
    pred_early = p.argmax(axis=1) != 0
    n_early = int(early.sum())
    both = 0 < n_early < y.size
    return {
        "auc": float(roc_auc_score(early, score)) if both else math.nan,
        "sensitivity": float(recall_score(early, pred_early)) if n_early else math.nan,
        "specificity": float(recall_score(~early, ~pred_early)) if n_early < y.size else math.nan,
        "n": int(y.size),
        "n_early": n_early,
    }


def quadratic_weighted_kappa(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray) -> float:
    """Cohen's kappa with quadratic weights on the ordinal stages 0 < I < II.

    scikit-learn ``cohen_kappa_score(y_true, y_pred, labels=[0, 1, 2], weights="quadratic")``
    (Cohen 1968).

    Args:
        y_true: ``(N,)`` integer class indices 0..2.
        y_pred: ``(N,)`` integer class indices 0..2.

    Returns:
        Kappa in ``[-1, 1]``; NaN when it is undefined (e.g. both raters give one single stage).

    Raises:
        ValueError: different lengths, empty input or labels outside 0..2.
    """
    a = np.asarray(y_true)
    b = np.asarray(y_pred)
    if a.ndim != 1 or a.shape != b.shape or a.size == 0:
        raise ValueError(f"y_true/y_pred: expected two non-empty (N,) arrays, got {a.shape} and {b.shape}")
    for name, v in (("y_true", a), ("y_pred", b)):
        if not np.all(np.isin(v, np.arange(NUM_STAGES))):
            raise ValueError(f"{name}: class indices must be in 0..{NUM_STAGES - 1}")
    with np.errstate(invalid="ignore", divide="ignore"):
        return float(
            cohen_kappa_score(a.astype(int), b.astype(int), labels=list(range(NUM_STAGES)), weights="quadratic")
        )


# --------------------------------------------------------------------------- patient bootstrap


class BootstrapCI(tuple):
    """``(point, low, high)``, unpackable as a 3-tuple, with the bootstrap bookkeeping as attributes.

    Attributes:
        point: the metric on the original data (NaN when undefined there).
        low, high: the percentile interval bounds (NaN when every resample was skipped).
        n_boot: resamples drawn.
        n_skipped: resamples where the metric was undefined (NaN/inf or ``ValueError``) and that
            were left out of the interval.
        n_patients: clusters resampled.
    """

    n_boot: int
    n_skipped: int
    n_patients: int

    def __new__(cls, point: float, low: float, high: float, n_boot: int, n_skipped: int, n_patients: int):
        self = super().__new__(cls, (float(point), float(low), float(high)))
        self.n_boot, self.n_skipped, self.n_patients = int(n_boot), int(n_skipped), int(n_patients)
        return self

    point = property(lambda self: self[0])
    low = property(lambda self: self[1])
    high = property(lambda self: self[2])

    def __repr__(self) -> str:
        return (
            f"BootstrapCI(point={self[0]!r}, low={self[1]!r}, high={self[2]!r}, n_boot={self.n_boot}, "
            f"n_skipped={self.n_skipped}, n_patients={self.n_patients})"
        )


def _evaluate(metric_fn: Callable[[np.ndarray, np.ndarray], float], y: np.ndarray, p: np.ndarray) -> float:
    try:  # undefined resamples are counted, not warned about one by one
        with np.errstate(invalid="ignore", divide="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", UndefinedMetricWarning)
            value = float(metric_fn(y, p))
    except ValueError:
        return math.nan
    return value


def bootstrap_ci(
    patient_ids: Sequence[Any] | np.ndarray,
    y_true: Sequence[Any] | np.ndarray,
    probs: Any,
    metric_fn: Callable[[np.ndarray, np.ndarray], float],
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> BootstrapCI:
    """Percentile bootstrap confidence interval, resampling patients (clusters) with replacement.

    Each resample draws as many patients as there are, with replacement, and keeps every row
    (femoral head) of each drawn patient, as often as the patient was drawn: the two heads of a
    patient are never split (cluster bootstrap, Field & Welsh 2007). The interval is the
    ``alpha/2`` and ``1 - alpha/2`` quantiles of the resampled metric (``numpy.quantile``, linear
    interpolation; Efron & Tibshirani 1993, ch. 13). Resamples where the metric is undefined
    (``metric_fn`` returns NaN/inf or raises ``ValueError``, e.g. an AUC with one class only) are
    skipped; their number is ``result.n_skipped`` and is logged.

    Hand-rolled rather than ``scipy.stats.bootstrap`` because scipy resamples observations, not
    clusters, and cannot skip undefined resamples (one NaN turns the interval into NaN).

    Args:
        patient_ids: ``(N,)`` patient identifier of each row (any hashable, sortable values).
        y_true: ``(N, ...)`` array passed to ``metric_fn`` (e.g. integer stages).
        probs: ``(N, ...)`` array passed to ``metric_fn`` (e.g. ``(N, 3)`` float probabilities, or
            ``(N,)`` predicted stages).
        metric_fn: ``metric_fn(y_true_subset, probs_subset) -> float``.
        n_boot: number of resamples (>= 1).
        alpha: two-sided level; 0.05 gives the 95 % interval.
        seed: seed of ``numpy.random.default_rng``.

    Returns:
        :class:`BootstrapCI`: ``(point, low, high)`` with ``n_boot``, ``n_skipped``, ``n_patients``.

    Raises:
        ValueError: lengths differ, no rows, ``n_boot < 1`` or ``alpha`` not in ``(0, 1)``.
    """
    pid = np.asarray(patient_ids)
    y = np.asarray(y_true)
    p = np.asarray(probs)
    if pid.ndim != 1 or pid.size == 0:
        raise ValueError(f"patient_ids: expected a non-empty (N,) array, got shape {pid.shape}")
    if y.shape[:1] != pid.shape or p.shape[:1] != pid.shape:
        raise ValueError(
            f"patient_ids, y_true, probs: expected the same first dimension, got {pid.shape}, {y.shape} and {p.shape}"
        )
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot: expected a positive integer, got {n_boot!r}")
    if not 0.0 < float(alpha) < 1.0:
        raise ValueError(f"alpha: expected a value in (0, 1), got {alpha!r}")

    _, inverse = np.unique(pid, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    sizes = np.bincount(inverse)
    rows_of = np.split(order, np.cumsum(sizes)[:-1])  # row indices of each patient
    n_patients = len(rows_of)

    point = _evaluate(metric_fn, y, p)
    rng = np.random.default_rng(seed)
    values = np.empty(n_boot, dtype=np.float64)
    for i in range(n_boot):
        drawn = rng.integers(0, n_patients, size=n_patients)
        idx = np.concatenate([rows_of[j] for j in drawn])
        values[i] = _evaluate(metric_fn, y[idx], p[idx])
    ok = np.isfinite(values)
    n_skipped = int(n_boot - ok.sum())
    if n_skipped:
        logger.info("bootstrap: %d of %d resamples skipped (metric undefined)", n_skipped, n_boot)
    if ok.any():
        low, high = np.quantile(values[ok], [alpha / 2.0, 1.0 - alpha / 2.0])
    else:
        low = high = math.nan
    return BootstrapCI(point, low, high, n_boot, n_skipped, n_patients)


# --------------------------------------------------------------------------- McNemar


def _as_bool(name: str, v: Any) -> np.ndarray:
    a = np.asarray(v)
    if a.ndim != 1:
        raise ValueError(f"{name}: expected shape (N,), got {a.shape}")
    if a.dtype != bool:
        if not np.all(np.isin(a, (0, 1))):
            raise ValueError(f"{name}: expected booleans or 0/1")
        a = a.astype(bool)
    return a


def mcnemar_test(
    model_correct: Sequence[bool] | np.ndarray,
    reader_correct: Sequence[bool] | np.ndarray,
    exact: bool | None = None,
) -> dict[str, Any]:
    """McNemar test of paired correctness: model versus one reader on the same femoral heads.

    The 2x2 table is ``[[both correct, b], [c, both wrong]]`` with ``b`` = model correct and reader
    wrong, ``c`` = model wrong and reader correct. Computed with statsmodels
    ``statsmodels.stats.contingency_tables.mcnemar``: the exact two-sided binomial test
    (``statistic = min(b, c)``, ``p = min(1, 2 * P[Bin(b + c, 1/2) <= min(b, c)])``) when
    ``exact`` is True or, by default, when ``b + c <`` :data:`MCNEMAR_EXACT_BELOW`; otherwise the
    chi-square test with continuity correction, ``statistic = (|b - c| - 1)^2 / (b + c)`` on 1
    degree of freedom (McNemar 1947; Edwards 1948).

    Args:
        model_correct: ``(N,)`` bool (or 0/1), the model's call on head ``i`` is right.
        reader_correct: ``(N,)`` bool (or 0/1), the reader's call on head ``i`` is right.
        exact: force the exact (True) or asymptotic (False) test; None picks by ``b + c``.

    Returns:
        ``{"b": int, "c": int, "statistic": float, "p_value": float, "method": str}``, method
        ``"exact binomial"`` or ``"chi-square, continuity corrected"``. With ``b + c = 0`` the exact
        test gives p = 1.

    Raises:
        ValueError: shapes differ or are not 1-D, non-boolean values, or the asymptotic test forced
            with no discordant pair (statistic undefined).
    """
    from statsmodels.stats.contingency_tables import mcnemar

    m = _as_bool("model_correct", model_correct)
    r = _as_bool("reader_correct", reader_correct)
    if m.shape != r.shape:
        raise ValueError(f"model_correct/reader_correct: expected the same length, got {m.size} and {r.size}")
    a = int(np.sum(m & r))
    b = int(np.sum(m & ~r))
    c = int(np.sum(~m & r))
    d = int(np.sum(~m & ~r))
    use_exact = (b + c < MCNEMAR_EXACT_BELOW) if exact is None else bool(exact)
    if not use_exact and b + c == 0:
        raise ValueError("mcnemar_test: the asymptotic test is undefined with no discordant pair (b + c = 0)")
    res = mcnemar(np.array([[a, b], [c, d]]), exact=use_exact, correction=True)
    return {
        "b": b,
        "c": c,
        "statistic": float(res.statistic),
        "p_value": float(res.pvalue),
        "method": "exact binomial" if use_exact else "chi-square, continuity corrected",
    }


# --------------------------------------------------------------------------- histogram AUC


def check_histograms(pos_hist: Any, neg_hist: Any) -> tuple[np.ndarray, np.ndarray]:
    """Two per-class score histograms on the same bins as float64 arrays.

    Raises:
        ValueError: shapes differ or are empty, or counts are negative or non-finite.
    """
    hp = np.asarray(pos_hist, dtype=np.float64)
    hn = np.asarray(neg_hist, dtype=np.float64)
    if hp.ndim != 1 or hp.shape != hn.shape or hp.size == 0:
        raise ValueError(f"pos_hist/neg_hist: expected two non-empty (B,) arrays, got {hp.shape} and {hn.shape}")
    if not (np.all(np.isfinite(hp)) and np.all(np.isfinite(hn))) or (hp < 0).any() or (hn < 0).any():
        raise ValueError("pos_hist/neg_hist: counts must be finite and non-negative")
    return hp, hn


def auc_from_histograms(pos_hist: Sequence[int] | np.ndarray, neg_hist: Sequence[int] | np.ndarray) -> float:
    """AUC from per-class score histograms on the same ordered bins (Mann-Whitney, half ties).

    ``AUC = (sum_k p_k * sum_{j<k} n_j + 1/2 * sum_k p_k n_k) / (P N)`` (Hanley & McNeil 1982), with
    ``p_k``/``n_k`` the positive/negative counts in bin ``k`` (bins in increasing score order) and
    ``P``/``N`` their totals: a positive-negative pair in different bins is ordered by its bins, a
    pair in the same bin counts 1/2. Equals scikit-learn's weighted ``roc_auc_score`` on the bin
    centres, which :func:`shared_models.metrics.metrics_from_counts` uses.

    Args:
        pos_hist: ``(B,)`` non-negative counts of positives per bin.
        neg_hist: ``(B,)`` non-negative counts of negatives per bin.

    Returns:
        AUC in ``[0, 1]``; NaN when ``P = 0`` or ``N = 0``.

    Raises:
        ValueError: shapes differ, empty, negative or non-finite counts.
    """
    hp, hn = check_histograms(pos_hist, neg_hist)
    total = hp.sum() * hn.sum()
    if total == 0:
        return math.nan
    below = np.concatenate([[0.0], np.cumsum(hn)[:-1]])  # negatives in strictly lower bins
    return float((np.dot(hp, below) + 0.5 * np.dot(hp, hn)) / total)


def auc_bin_error_bound(pos_hist: Sequence[int] | np.ndarray, neg_hist: Sequence[int] | np.ndarray) -> float:
    """Worst-case ``|AUC_hist - AUC_exact|`` for scores binned into these histograms.

    ``bound = 1/2 * sum_k p_k n_k / (P N)``. Proof: bins are disjoint ordered intervals, so every
    positive-negative pair in different bins is ordered the same way by the exact scores and by the
    bins; only pairs sharing a bin differ, where the exact Mann-Whitney kernel is 0, 1/2 or 1 and
    the histogram counts 1/2, an error of at most 1/2 per pair. The bound is reached when, inside
    every shared bin, all positives score above (or all below) all negatives.

    Args:
        pos_hist: ``(B,)`` non-negative counts of positives per bin.
        neg_hist: ``(B,)`` non-negative counts of negatives per bin.

    Returns:
        Bound in ``[0, 1/2]``; NaN when ``P = 0`` or ``N = 0``.

    Raises:
        ValueError: as :func:`auc_from_histograms`.
    """
    hp, hn = check_histograms(pos_hist, neg_hist)
    total = hp.sum() * hn.sum()
    if total == 0:
        return math.nan
    return float(0.5 * np.dot(hp, hn) / total)


def histogram_auc_bound(
    labels: Sequence[bool] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    n_bins: int = 100,
) -> dict[str, Any]:
    """Bin scores as :func:`shared_models.metrics.stage_counts` does, then the histogram AUC and its bound.

    Args:
        labels: ``(N,)`` bool (or 0/1), True for positives.
        scores: ``(N,)`` float scores, clipped to ``[0, 1]``.
        n_bins: equal-width bins on ``[0, 1]`` (``numpy.histogram``, last bin closed).

    Returns:
        ``{"auc_hist": float, "bound": float, "pos_hist": list[int], "neg_hist": list[int]}``.

    Raises:
        ValueError: shapes differ, non-finite scores, non-boolean labels or ``n_bins < 1``.
    """
    lab = _as_bool("labels", labels)
    s = np.asarray(scores, dtype=np.float64)
    if s.shape != lab.shape:
        raise ValueError(f"labels/scores: expected the same (N,) shape, got {lab.shape} and {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores: values must be finite")
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins: expected a positive integer, got {n_bins!r}")
    hp, hn = score_histograms(lab, s, int(n_bins))
    return {
        "auc_hist": auc_from_histograms(hp, hn),
        "bound": auc_bin_error_bound(hp, hn),
        "pos_hist": hp,
        "neg_hist": hn,
    }
