"""Federated calibration of the final models (issue 17 items 2-4): pooled aggregates -> thresholds -> bundle.

After the stager phase the server sends the selected detector and stager to every site twice
(``query`` actions ``calibrate-val`` and ``calibrate-eval``, answered by
``client/calibration_stats.py``):

1. each site returns validation aggregates; the server checks them (:func:`check_validation_stats`),
   sums them over sites and chooses the temperature, the detector threshold and the
   out-of-distribution (energy) threshold (``shared_models.calibration``);
2. with those, each site returns reliability counts and ``P(early)`` histograms for its
   validation and test heads; the server chooses the early-ONFH threshold on the pooled
   validation histograms and reports, per site, ECE before and after temperature scaling and
   early-ONFH sensitivity and specificity at that threshold on the site's test heads.

A site's reply that fails a check (wrong length, negative or non-integer counts, totals that
disagree with each other or with the head counts it declared at ``hello``, NLL beyond
``NLL_CAP`` per head, a reply without metrics, any value of the wrong type) is left out of the
pooling and named in ``report["calibration"]["rejected"]``; a site that declared no head count
for a split at ``hello`` is refused there, so every count is capped by a declared count.

Bound on one site's influence: in the pooled sums a site weighs at most as much as the largest
other contributing site (:func:`site_weights`; with two or more sites, at most half the pool),
and a pooled choice that would switch an inference gate off (temperature outside
:data:`TEMPERATURE_RANGE`, detector threshold 0, non-finite energy threshold; :func:`gate_problem`)
is not shipped: the bundle gets the uncalibrated defaults with ``fallback`` naming the reason
(``calibration.json`` and ``report["calibration"]["fallback"]``).
Per-head values never travel; small splits are suppressed at the site (``min-cell-heads``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from shared_models import calibration as cal
from shared_models.config import RunConfig
from shared_models.flower.records import state_to_record
from shared_models.specs import (
    ACTION,
    CALIBRATION,
    CONFIG,
    CROPS_KEY,
    DET_GOOD,
    DET_HEADS,
    DET_SCORE_HIST,
    ENERGY_HIST,
    METRICS,
    NLL,
    VAL_HEADS,
    VAL_SUPPRESSED,
    Action,
    Phase,
    heads_key,
)

log = logging.getLogger(__name__)


class StatsError(ValueError):
    """A site's calibration aggregate is malformed or out of bounds (the message names the key)."""


def _ints(m: Mapping, key: str, length: int) -> np.ndarray:
    v = m.get(key)
    if v is None:
        raise StatsError(f"{key} missing")
    if not isinstance(v, list) or any(not isinstance(x, (int, float)) or isinstance(x, bool) for x in v):
        raise StatsError(f"{key}: expected a list of {length} non-negative integers")
    a = np.asarray(v, dtype=np.float64)
    if a.shape != (length,) or not np.all(np.isfinite(a)) or np.any(a < 0) or np.any(a != np.round(a)):
        raise StatsError(f"{key}: expected {length} non-negative integers")
    return a.astype(np.int64)


def _floats(m: Mapping, key: str, length: int) -> np.ndarray:
    v = m.get(key)
    if not isinstance(v, list) or any(not isinstance(x, (int, float)) or isinstance(x, bool) for x in v):
        raise StatsError(f"{key}: expected a list of {length} numbers")
    a = np.asarray(v, dtype=np.float64)
    if a.shape != (length,) or not np.all(np.isfinite(a)):
        raise StatsError(f"{key}: expected {length} finite numbers")
    return a


def _count(m: Mapping, key: str, upper: int) -> int:
    v = m.get(key)
    if (
        not isinstance(v, (int, float))
        or isinstance(v, bool)
        or not math.isfinite(v)
        or v != int(v)
        or not (0 <= v <= upper)
    ):
        raise StatsError(f"{key}: expected an integer in [0, {upper}]")
    return int(v)


def _suppressed(m: Mapping, key: str) -> bool:
    """The site's small-cell flag: absent, 0 or 1; anything else is malformed."""
    return bool(_count(m, key, 1)) if key in m else False


def _declared(declared_heads: int | None, key: str) -> int:
    if declared_heads is None:
        raise StatsError(f"{key}: the site declared no head count for this split at hello")
    return int(declared_heads)


def check_validation_stats(m: Mapping, declared_val_heads: int | None) -> dict | None:
    """Validate a ``calibrate-val`` reply; None when the site suppressed it (small cell).

    Every count is capped by the validation heads the site declared at ``hello``; a reply from a
    site that declared none is refused (never capped at an arbitrary bound).

    Raises:
        StatsError: naming the offending key, for every malformed input (wrong type, NaN/inf,
            wrong length, negative, totals that disagree, no declared count).
    """
    cap = _declared(declared_val_heads, VAL_HEADS)
    n = _count(m, VAL_HEADS, cap)
    if _suppressed(m, VAL_SUPPRESSED):
        return None
    det_heads = _count(m, DET_HEADS, cap)
    det_good = _count(m, DET_GOOD, det_heads)
    score_hist = _ints(m, DET_SCORE_HIST, len(cal.SCORE_EDGES) - 1)
    if score_hist.sum() != det_good:
        raise StatsError("det-score-hist does not sum to det-good")
    energy_hist = _ints(m, ENERGY_HIST, len(cal.ENERGY_EDGES) - 1)
    if energy_hist.sum() != n:
        raise StatsError("energy-hist does not sum to val-heads")
    nll = _floats(m, NLL, len(cal.TEMPERATURE_GRID))
    if np.any(nll < 0) or np.any(nll > cal.NLL_CAP * n + 1e-6):
        raise StatsError(f"nll: expected {len(cal.TEMPERATURE_GRID)} sums in [0, {cal.NLL_CAP:g} x val-heads]")
    return {"n": n, "score_hist": score_hist, "energy_hist": energy_hist, "nll": nll}


def check_calibrated_stats(m: Mapping, split: str, declared_heads: int | None) -> dict | None:
    """Validate one split of a ``calibrate-eval`` reply; None when suppressed.

    Raises:
        StatsError: naming the offending key, for every malformed input (as
            :func:`check_validation_stats`).
    """
    cap = _declared(declared_heads, f"{split}-heads")
    n = _count(m, f"{split}-heads", cap)
    if _suppressed(m, f"{split}-suppressed"):
        return None
    out: dict = {"n": n}
    for when in ("before", "after"):
        count = _ints(m, f"{split}-rel-count-{when}", cal.RELIABILITY_BINS)
        correct = _ints(m, f"{split}-rel-correct-{when}", cal.RELIABILITY_BINS)
        conf = _floats(m, f"{split}-rel-conf-{when}", cal.RELIABILITY_BINS)
        if count.sum() != n or np.any(correct > count) or np.any(conf < 0) or np.any(conf > count + 1e-6):
            raise StatsError(f"{split} reliability counts ({when}) are inconsistent")
        out[when] = (count, correct, conf)
    pos = _ints(m, f"{split}-early-pos", len(cal.SCORE_EDGES) - 1)
    neg = _ints(m, f"{split}-early-neg", len(cal.SCORE_EDGES) - 1)
    if pos.sum() + neg.sum() != n:
        raise StatsError(f"{split}-early-pos/neg do not sum to {split}-heads")
    out.update(pos=pos, neg=neg, ood_flagged=_count(m, f"{split}-ood-flagged", n))
    if f"{split}-det-heads" in m:
        out["det_heads"] = _count(m, f"{split}-det-heads", cap)
        out["det_flagged"] = _count(m, f"{split}-det-flagged", out["det_heads"])
    return out


def _query(
    grid: Grid, node_sites: dict[int, str], cfg: RunConfig, config: dict, arrays: dict
) -> dict[str, dict | None]:
    content = RecordDict({CONFIG: ConfigRecord(config), **arrays})
    messages = [Message(content=content, dst_node_id=n, message_type=MessageType.QUERY) for n in node_sites]
    replies = {}
    for reply in grid.send_and_receive(messages, timeout=cfg.round_timeout_s):
        site = node_sites.get(reply.metadata.src_node_id, "?")
        if reply.has_error():
            log.warning("site %s failed %s: %s", site, config[ACTION], reply.error.reason)
            continue
        metrics = reply.content.metric_records.get(METRICS)
        replies[site] = None if metrics is None else dict(metrics)
    return replies


def _round(v: float | None, nd: int = 4) -> float | None:
    return None if v is None or not math.isfinite(v) else round(float(v), nd)


TEMPERATURE_RANGE = (0.25, 4.0)  # a chosen T outside this is refused (gate_problem)


def site_weights(heads: Mapping[str, int]) -> dict[str, float]:
    """Each site's weight in the pooled calibration sums: 1, or less so that its weighted heads do not
    exceed the largest head count among the other contributing sites.

    So no site outweighs the largest other site (with two or more sites one site is at most half the
    pool), however many heads it declared. A single contributing site keeps weight 1 (it is the pool).
    Hand-written: the cap is this project's bound on one site's influence (README "Security model").
    """
    out = {}
    for site, n in heads.items():
        others = [m for s, m in heads.items() if s != site]
        cap = max(others, default=0)
        out[site] = 1.0 if not others or n <= cap or n == 0 else (cap / n)
    return out


def gate_problem(calibration: cal.Calibration) -> str | None:
    """Why a pooled calibration would switch an inference gate off (and must not ship); None when it may ship.

    Refused: a temperature outside :data:`TEMPERATURE_RANGE`, a detector threshold of 0 (every box
    kept), a non-finite energy threshold (no head ever flagged out of distribution).
    """
    lo, hi = TEMPERATURE_RANGE
    if not lo <= calibration.temperature <= hi:
        return f"temperature {calibration.temperature:g} outside [{lo:g}, {hi:g}]"
    if calibration.detector_threshold is not None and calibration.detector_threshold <= 0.0:
        return "detector threshold 0 would keep every box"
    if calibration.energy_threshold is not None and not math.isfinite(calibration.energy_threshold):
        return "energy threshold is not finite: no head would be flagged out of distribution"
    return None


def choose_from_validation(
    stats: Sequence[dict],
    detector_miss: float = cal.DEFAULT_DETECTOR_MISS,
    ood_false_alarm: float = cal.DEFAULT_OOD_FALSE_ALARM,
) -> cal.Calibration:
    """Temperature, detector and energy thresholds from checked, pooled ``calibrate-val`` aggregates.

    Each stats dict may carry a ``weight`` (:func:`site_weights`) that scales its sums.
    Fails closed: when no validation box reached IoU 0.5 the detector threshold is 1.0 (every box
    flagged). With no aggregates at all (every site suppressed or rejected) nothing is chosen: the
    thresholds stay None and ``onfh infer`` warns that those gates are off.
    """
    if not stats:
        return cal.Calibration(detector_miss=detector_miss, ood_false_alarm=ood_false_alarm)
    w = [float(s.get("weight", 1.0)) for s in stats]  # site_weights: one site's share of the pool is bounded
    nll = np.sum([wi * s["nll"] for wi, s in zip(w, stats)], axis=0)
    score_hist = np.sum([wi * s["score_hist"] for wi, s in zip(w, stats)], axis=0)
    energy_hist = np.sum([wi * s["energy_hist"] for wi, s in zip(w, stats)], axis=0)
    # no validation box reached IoU 0.5: no score can be trusted, so every box is flagged (1.0), not none
    detector_threshold = cal.lower_threshold(score_hist, cal.SCORE_EDGES, detector_miss)
    return cal.Calibration(
        temperature=cal.choose_temperature(nll),
        detector_threshold=1.0 if detector_threshold is None else detector_threshold,
        energy_threshold=cal.upper_threshold(energy_hist, cal.ENERGY_EDGES, ood_false_alarm),
        detector_miss=detector_miss,
        ood_false_alarm=ood_false_alarm,
        val_heads=int(round(sum(wi * s["n"] for wi, s in zip(w, stats)))),
    )


def summarise(
    calibration: cal.Calibration, per_site: dict[str, dict[str, dict | None]], train_sites: Sequence[str]
) -> tuple[cal.Calibration, dict]:
    """Early-ONFH threshold from the pooled (:func:`site_weights`-weighted) validation histograms, and the
    per-site report.

    Args:
        per_site: site -> {"val": checked stats or None, "test": checked stats or None}.

    Returns:
        The calibration with ``early_threshold`` set, and ``{"sites": {site: {...}}, "validation": {...}}``
        where each site has ``test_heads``, ``external``, ``ece_before`` / ``ece_after`` (test heads),
        ``sensitivity`` / ``specificity`` (early ONFH at the threshold, test heads, with the counts),
        ``ood_flagged`` and ``detector_flagged`` (fractions of its test heads).
    """
    val_by_site = {site: val for site, v in sorted(per_site.items()) if (val := v.get("val"))}
    vals: list[dict] = list(val_by_site.values())
    weights = site_weights({site: v["n"] for site, v in val_by_site.items()})
    w = [weights[site] for site in val_by_site]
    pos = np.sum([wi * v["pos"] for wi, v in zip(w, vals)], axis=0) if vals else np.zeros(100)
    neg = np.sum([wi * v["neg"] for wi, v in zip(w, vals)], axis=0) if vals else np.zeros(100)
    threshold = cal.choose_early_threshold(pos, neg)
    calibration = dataclasses.replace(calibration, early_threshold=threshold)
    # the report's validation figures count heads as they are (unweighted)
    pos = np.sum([v["pos"] for v in vals], axis=0) if vals else np.zeros(100, np.int64)
    neg = np.sum([v["neg"] for v in vals], axis=0) if vals else np.zeros(100, np.int64)

    def ece(stats: list[dict], when: str) -> float | None:
        if not stats:
            return None
        c, k, f = (np.sum([s[when][i] for s in stats], axis=0) for i in range(3))
        return cal.ece_from_counts(c, k, f)

    report: dict = {
        "sites": {},
        "validation": {
            "heads": int(sum(v["n"] for v in vals)),
            "ece_before": _round(ece(vals, "before")),
            "ece_after": _round(ece(vals, "after")),
            **(
                {k: _round(v) if isinstance(v, float) else v for k, v in cal.sens_spec(pos, neg, threshold).items()}
                if threshold is not None
                else {}
            ),
        },
    }
    for site, splits in sorted(per_site.items()):
        test = splits.get("test")
        row: dict = {"external": site not in train_sites, "test_heads": None if test is None else test["n"]}
        if test is None:
            row["suppressed"] = True
        else:
            row.update(
                ece_before=_round(ece([test], "before")),
                ece_after=_round(ece([test], "after")),
                ood_flagged=_round(test["ood_flagged"] / test["n"]) if test["n"] else None,
            )
            if test.get("det_heads"):
                row["detector_flagged"] = _round(test["det_flagged"] / test["det_heads"])
            if threshold is not None:
                row.update(
                    {
                        k: _round(v) if isinstance(v, float) else v
                        for k, v in cal.sens_spec(test["pos"], test["neg"], threshold).items()
                    }
                )
        report["sites"][site] = row
    return calibration, report


def run_calibration(
    grid: Grid,
    node_sites: dict[int, str],
    cfg: RunConfig,
    detector_state: dict,
    stager_state: dict,
    crops_key: str,
    site_data: dict[str, dict],
) -> tuple[cal.Calibration, dict]:
    """Both calibration steps against the live sites (see the module docstring).

    Returns:
        ``(calibration, report)``: the :class:`~shared_models.calibration.Calibration` to ship in
        the bundle and ``report["calibration"]`` (chosen values, per-site figures, rejected sites).
    """
    arrays = {
        Phase.DETECTOR.value: state_to_record(detector_state, cfg),
        Phase.STAGER.value: state_to_record(stager_state, cfg),
    }
    rejected: dict[str, str] = {}

    def declared(site: str, split: str) -> int | None:
        v = site_data.get(site, {}).get(heads_key(split))
        return None if v is None else int(v)

    def reject(site: str, step: str, reason: str) -> None:
        rejected[site] = f"{step}: {reason}"
        log.warning("site %s: calibration aggregate rejected (%s)", site, reason)

    def val_check(m: dict, site: str) -> dict | None:
        return check_validation_stats(m, declared(site, "val"))

    def eval_check(m: dict, site: str) -> dict:
        return {split: check_calibrated_stats(m, split, declared(site, split)) for split in ("val", "test")}

    def checked(site: str, step: str, m: dict | None, check: Callable[[dict, str], Any]) -> tuple[bool, Any]:
        if m is None:
            reject(site, step, "reply without metrics")
            return False, None
        try:
            return True, check(m, site)
        except StatsError as err:
            reject(site, step, str(err))
        except Exception as err:  # last line: a malformed reply never ends the run
            reject(site, step, f"unreadable reply ({type(err).__name__})")
        return False, None

    val_stats: dict[str, dict] = {}
    for site, m in sorted(
        _query(grid, node_sites, cfg, {ACTION: Action.CALIBRATE_VAL.value, CROPS_KEY: crops_key}, arrays).items()
    ):
        ok, stats = checked(site, "calibrate-val", m, val_check)
        if ok and stats is not None:
            val_stats[site] = stats
    weights = site_weights({site: s["n"] for site, s in val_stats.items()})
    calibration = choose_from_validation([{**s, "weight": weights[site]} for site, s in val_stats.items()])
    fallback = gate_problem(calibration)
    if fallback:
        log.error("calibration refused (%s): shipping the uncalibrated defaults", fallback)
        calibration = cal.Calibration(
            detector_miss=calibration.detector_miss,
            ood_false_alarm=calibration.ood_false_alarm,
            val_heads=calibration.val_heads,
            fallback=fallback,
        )
    config = {ACTION: Action.CALIBRATE_EVAL.value, CROPS_KEY: crops_key, CALIBRATION: json.dumps(calibration.to_dict())}
    per_site: dict[str, dict] = {}
    for site, m in sorted(_query(grid, node_sites, cfg, config, arrays).items()):
        ok, splits = checked(site, "calibrate-eval", m, eval_check)
        if ok:
            per_site[site] = splits
    calibration, report = summarise(calibration, per_site, cfg.train_sites)
    report["chosen"] = calibration.to_dict()
    report["rejected"] = rejected
    report["site_weights"] = {site: round(w, 6) for site, w in sorted(weights.items())}
    report["fallback"] = calibration.fallback  # None, or why the pooled choice was refused
    log.info(
        "calibration: T = %.3g, detector threshold %s, energy threshold %s, early-ONFH threshold %s "
        "(%d validation heads)",
        calibration.temperature,
        calibration.detector_threshold,
        calibration.energy_threshold,
        calibration.early_threshold,
        calibration.val_heads,
    )
    return calibration, report
