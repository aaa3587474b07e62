"""Validation-calibrated decisions: detector threshold, out-of-distribution threshold, temperature, early-ONFH threshold.

Everything here is chosen on the validation split from *aggregates* that a site can send
without any per-head value leaving it (binned histograms and sums), so the same code serves
one site and a federation (the server sums the sites' aggregates, then chooses):

* **Detector threshold** (issue 17 item 3): the histogram of the detector scores of the
  validation heads whose best box has 3D IoU >= 0.5 with the ground truth; the threshold is
  the highest bin edge that keeps at least ``1 - detector_miss`` (default 99 %) of them. A
  box scoring below it is flagged at inference and its stage withheld.
* **Out-of-distribution threshold** (item 2): the energy score ``E(x) = -logsumexp(f(x))`` of
  the stager's logits (Liu, Wang, Owens and Li, "Energy-based Out-of-distribution
  Detection", NeurIPS 2020, eq. 1 with T = 1): higher energy = less like the training data.
  The threshold is the lowest bin edge above which at most ``ood_false_alarm`` (default 5 %)
  of the validation heads fall, so the stated false-alarm rate holds on in-distribution
  validation heads (up to the bin width: it is never exceeded on the pooled histogram).
* **Temperature** (item 4): temperature scaling (Guo, Pleiss, Sun and Weinberger, "On
  Calibration of Modern Neural Networks", ICML 2017): ``softmax(z / T)``. Each site sends the
  summed validation negative log-likelihood at every temperature of the fixed grid
  :data:`TEMPERATURE_GRID` (a sufficient statistic for choosing T on that grid); the server
  sums over sites and takes the arg-min.
* **Early-ONFH threshold** (item 4): on ``P(stage I) + P(stage II)`` after temperature
  scaling, the bin edge that maximises Youden's J (sensitivity + specificity - 1) on the pooled
  validation histograms of positives (stage I/II) and negatives (stage 0).
* **Expected calibration error** (Naeini, Cooper and Hauskrecht, AAAI 2015; Guo et al. 2017
  eq. 3) from binned reliability counts (heads, correct arg-max and summed confidence per
  confidence bin), before and after temperature scaling.

Binning is by ``np.searchsorted(edges, v, side="right") - 1`` clipped to the bins: bin ``i``
holds ``edges[i] <= v < edges[i + 1]``; values beyond the range fall into the end bins. A
threshold at edge ``k`` then counts exactly the values of bins ``>= k`` as ``v >= edges[k]``.

Hand-written because no maintained library offers federated (histogram-level) threshold and
temperature selection; the per-head arithmetic is numpy/torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

TEMPERATURE_GRID: tuple[float, ...] = tuple(float(round(t, 4)) for t in np.geomspace(0.25, 8.0, 31))
SCORE_EDGES = np.linspace(0.0, 1.0, 101)  # detector scores and P(early): 100 bins on [0, 1]
ENERGY_EDGES = np.linspace(-40.0, 10.0, 201)  # energy scores: 200 bins of 0.25 on [-40, 10]
RELIABILITY_BINS = 10  # confidence bins of the expected calibration error
NLL_CAP = 50.0  # per-head NLL cap, so one head (or a hostile site) cannot dominate the sum
DEFAULT_DETECTOR_MISS = 0.01
DEFAULT_OOD_FALSE_ALARM = 0.05


def histogram(values: Sequence[float] | np.ndarray, edges: np.ndarray) -> list[int]:
    """Counts of ``values`` per bin of ``edges`` (see the module note), ints, ``len(edges) - 1`` long."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    idx = np.clip(np.searchsorted(edges, v, side="right") - 1, 0, len(edges) - 2)
    return [int(c) for c in np.bincount(idx, minlength=len(edges) - 1)]


def energy_scores(logits: np.ndarray) -> np.ndarray:
    """Energy score ``-logsumexp(z)`` per row of ``logits`` ``(N, K)``; float64 ``(N,)`` (Liu et al. 2020)."""
    z = np.asarray(logits, dtype=np.float64)
    return -torch.logsumexp(torch.from_numpy(z), dim=1).numpy()


def softmax_t(logits: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(z / T)`` per row, float64 ``(N, K)``.

    Raises:
        ValueError: for a non-positive or non-finite temperature.
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    z = torch.from_numpy(np.asarray(logits, dtype=np.float64)) / temperature
    return torch.softmax(z, dim=1).numpy()


def nll_sums(logits: np.ndarray, labels: np.ndarray, grid: Sequence[float] = TEMPERATURE_GRID) -> list[float]:
    """Summed negative log-likelihood of ``labels`` under ``softmax(logits / T)`` for each ``T`` of ``grid``.

    Each head's NLL is capped at :data:`NLL_CAP` nats. Returns ``len(grid)`` floats (nats).
    """
    z = torch.from_numpy(np.asarray(logits, dtype=np.float64))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    out = []
    for t in grid:
        nll = torch.nn.functional.cross_entropy(z / t, y, reduction="none").clamp(max=NLL_CAP)
        out.append(float(nll.sum()))
    return out


def reliability_counts(probs: np.ndarray, labels: np.ndarray, n_bins: int = RELIABILITY_BINS) -> dict[str, list]:
    """Per confidence bin (``n_bins`` equal bins of the arg-max probability on [0, 1]):
    ``count`` (heads), ``correct`` (arg-max == label) and ``conf`` (summed confidence)."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    conf = p.max(axis=1) if len(p) else np.zeros(0)
    idx = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, n_bins - 1)
    correct = (p.argmax(axis=1) == y) if len(p) else np.zeros(0, bool)
    return {
        "count": [int(v) for v in np.bincount(idx, minlength=n_bins)],
        "correct": [int(v) for v in np.bincount(idx, weights=correct.astype(float), minlength=n_bins).round()],
        "conf": [float(v) for v in np.bincount(idx, weights=conf, minlength=n_bins)],
    }


def ece_from_counts(count: npt.ArrayLike, correct: npt.ArrayLike, conf: npt.ArrayLike) -> float | None:
    """Expected calibration error ``sum_b n_b / N * |acc_b - conf_b|``; None when there are no heads."""
    n = np.asarray(count, dtype=np.float64)
    if n.sum() <= 0:
        return None
    gap = np.abs(np.asarray(correct, dtype=np.float64) - np.asarray(conf, dtype=np.float64))  # n_b * |acc_b - conf_b|
    return float(gap.sum() / n.sum())


def early_probability(probs: np.ndarray) -> np.ndarray:
    """``P(stage I) + P(stage II)`` per row of ``(N, 3)`` probabilities."""
    p = np.asarray(probs, dtype=np.float64)
    return p[:, 1] + p[:, 2] if len(p) else np.zeros(0)


def lower_threshold(hist: npt.ArrayLike, edges: np.ndarray, miss: float) -> float | None:
    """Highest edge ``t`` with at most ``miss`` of the counts below it (keeps >= 1 - miss); None if empty."""
    h = np.asarray(hist, dtype=np.float64)
    if h.sum() <= 0:
        return None
    below = np.concatenate([[0.0], np.cumsum(h)])  # below[k] = counts in bins < k
    k = int(np.nonzero(below <= miss * h.sum() + 1e-9)[0].max())
    return float(edges[min(k, len(edges) - 1)])


def upper_threshold(hist: npt.ArrayLike, edges: np.ndarray, false_alarm: float) -> float | None:
    """Lowest edge ``t`` with at most ``false_alarm`` of the counts at or above it; ``inf`` when even the
    top bin holds more; None if empty."""
    h = np.asarray(hist, dtype=np.float64)
    if h.sum() <= 0:
        return None
    at_or_above = np.concatenate([np.cumsum(h[::-1])[::-1], [0.0]])  # at_or_above[k] = counts in bins >= k
    ok = np.nonzero(at_or_above <= false_alarm * h.sum() + 1e-9)[0]
    k = int(ok.min())
    return math.inf if k >= len(h) else float(edges[k])


def choose_temperature(nll: Sequence[float], grid: Sequence[float] = TEMPERATURE_GRID) -> float:
    """The grid temperature with the smallest summed NLL (the smallest T among ties)."""
    values = np.asarray(nll, dtype=np.float64)
    if values.shape != (len(grid),):
        raise ValueError(f"expected {len(grid)} NLL sums, got {values.shape}")
    return float(grid[int(np.argmin(values))])


def choose_early_threshold(pos: npt.ArrayLike, neg: npt.ArrayLike, edges: np.ndarray = SCORE_EDGES) -> float | None:
    """Bin edge of ``P(early)`` maximising Youden's J on the pooled histograms (ties: the edge nearest 0.5).

    Returns None unless both classes have counts.
    """
    p, n = np.asarray(pos, dtype=np.float64), np.asarray(neg, dtype=np.float64)
    if p.sum() <= 0 or n.sum() <= 0:
        return None
    ks = np.arange(1, len(edges) - 1)  # thresholds strictly inside (0, 1)
    sens = np.array([p[k:].sum() / p.sum() for k in ks])
    spec = np.array([n[:k].sum() / n.sum() for k in ks])
    j = sens + spec - 1.0
    best = np.nonzero(j >= j.max() - 1e-12)[0]
    k = ks[best[np.argmin(np.abs(edges[ks[best]] - 0.5))]]
    return float(edges[k])


def sens_spec(
    pos: npt.ArrayLike, neg: npt.ArrayLike, threshold: float, edges: np.ndarray = SCORE_EDGES
) -> dict[str, Any]:
    """Sensitivity and specificity of ``P(early) >= threshold`` (a bin edge) from the histograms."""
    k = int(np.argmin(np.abs(edges - threshold)))
    p, n = np.asarray(pos, dtype=np.int64), np.asarray(neg, dtype=np.int64)
    tp, fn, tn, fp = int(p[k:].sum()), int(p[:k].sum()), int(n[:k].sum()), int(n[k:].sum())
    return {
        "tp": tp,
        "fn": fn,
        "tn": tn,
        "fp": fp,
        "sensitivity": tp / (tp + fn) if tp + fn else None,
        "specificity": tn / (tn + fp) if tn + fp else None,
    }


@dataclass(frozen=True)
class Calibration:
    """Validation-chosen decision thresholds shipped in the bundle (``calibration.json``).

    Attributes:
        temperature: T of ``softmax(z / T)`` for stage probabilities (1.0 = none).
        detector_threshold: minimum detector score in [0, 1]; None = not calibrated.
        energy_threshold: energy score at or above which a head is out of distribution; None =
            not calibrated; ``inf`` = no validation-based flag possible.
        early_threshold: ``P(I) + P(II)`` at or above which a head is called early ONFH; None =
            use the arg-max stage.
        detector_miss: fraction of good validation boxes allowed below ``detector_threshold``.
        ood_false_alarm: fraction of validation heads allowed at or above ``energy_threshold``.
        val_heads: validation heads the thresholds were chosen on (all sites together).
        fallback: None when the thresholds are the pooled validation choice; otherwise why the server
            refused that choice (it would switch an inference gate off) and shipped these uncalibrated
            defaults instead (``server/calibration.py`` :func:`gate_problem`).
    """

    temperature: float = 1.0
    detector_threshold: float | None = None
    energy_threshold: float | None = None
    early_threshold: float | None = None
    detector_miss: float = DEFAULT_DETECTOR_MISS
    ood_false_alarm: float = DEFAULT_OOD_FALSE_ALARM
    val_heads: int = 0
    fallback: str | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and 0 < self.temperature <= 100):
            raise ValueError(f"calibration temperature must be in (0, 100], got {self.temperature}")
        for name in ("detector_threshold", "early_threshold"):
            v = getattr(self, name)
            if v is not None and not (0.0 <= v <= 1.0):
                raise ValueError(f"calibration {name} must be in [0, 1], got {v}")
        if self.energy_threshold is not None and math.isnan(self.energy_threshold):
            raise ValueError("calibration energy_threshold is NaN")
        for name in ("detector_miss", "ood_false_alarm"):
            if not (0.0 <= getattr(self, name) < 1.0):
                raise ValueError(f"calibration {name} must be in [0, 1), got {getattr(self, name)}")

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["energy_threshold"] is not None and math.isinf(d["energy_threshold"]):
            d["energy_threshold"] = "inf"
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Calibration:
        """Raises ValueError on unknown keys or out-of-range values."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown calibration keys {sorted(unknown)}")
        values = dict(d)
        if values.get("energy_threshold") == "inf":
            values["energy_threshold"] = math.inf
        for key in (
            "temperature",
            "detector_threshold",
            "energy_threshold",
            "early_threshold",
            "detector_miss",
            "ood_false_alarm",
        ):
            if values.get(key) is not None:
                values[key] = float(values[key])
        if "val_heads" in values:
            values["val_heads"] = int(values["val_heads"])
        return cls(**values)
