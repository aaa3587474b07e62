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
``NLL_CAP`` per head) is left out of the pooling and named in ``report["calibration"]["rejected"]``;
so a site can move a threshold only as far as its own declared validation heads allow.
Per-head values never travel; small splits are suppressed at the site (``min-cell-heads``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Mapping, Sequence

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
    a = np.asarray(list(v) if not isinstance(v, (int, float)) else [v], dtype=np.float64)
    if a.shape != (length,) or not np.all(np.isfinite(a)) or np.any(a < 0) or np.any(a != np.round(a)):
        raise StatsError(f"{key}: expected {length} non-negative integers")
    return a.astype(np.int64)


def _count(m: Mapping, key: str, upper: int) -> int:
    v = m.get(key)
    if not isinstance(v, (int, float)) or isinstance(v, bool) or v != int(v) or not (0 <= v <= upper):
        raise StatsError(f"{key}: expected an integer in [0, {upper}]")
    return int(v)


def check_validation_stats(m: Mapping, declared_val_heads: int | None) -> dict | None:
    """Validate a ``calibrate-val`` reply; None when the site suppressed it (small cell).

    Raises:
        StatsError: naming the offending key.
    """
    cap = 10**6 if declared_val_heads is None else int(declared_val_heads)
    n = _count(m, VAL_HEADS, cap)
    if int(m.get(VAL_SUPPRESSED, 0)):
        return None
    det_heads = _count(m, DET_HEADS, cap)
    det_good = _count(m, DET_GOOD, det_heads)
    score_hist = _ints(m, DET_SCORE_HIST, len(cal.SCORE_EDGES) - 1)
    if score_hist.sum() != det_good:
        raise StatsError("det-score-hist does not sum to det-good")
    energy_hist = _ints(m, ENERGY_HIST, len(cal.ENERGY_EDGES) - 1)
    if energy_hist.sum() != n:
        raise StatsError("energy-hist does not sum to val-heads")
    nll = np.asarray(list(m.get(NLL, [])), dtype=np.float64)
    if (
        nll.shape != (len(cal.TEMPERATURE_GRID),)
        or not np.all(np.isfinite(nll))
        or np.any(nll < 0)
        or np.any(nll > cal.NLL_CAP * n + 1e-6)
    ):
        raise StatsError(f"nll: expected {len(cal.TEMPERATURE_GRID)} sums in [0, {cal.NLL_CAP:g} x val-heads]")
    return {"n": n, "score_hist": score_hist, "energy_hist": energy_hist, "nll": nll}


def check_calibrated_stats(m: Mapping, split: str, declared_heads: int | None) -> dict | None:
    """Validate one split of a ``calibrate-eval`` reply; None when suppressed.

    Raises:
        StatsError: naming the offending key.
    """
    cap = 10**6 if declared_heads is None else int(declared_heads)
    n = _count(m, f"{split}-heads", cap)
    if int(m.get(f"{split}-suppressed", 0)):
        return None
    out: dict = {"n": n}
    for when in ("before", "after"):
        count = _ints(m, f"{split}-rel-count-{when}", cal.RELIABILITY_BINS)
        correct = _ints(m, f"{split}-rel-correct-{when}", cal.RELIABILITY_BINS)
        conf = np.asarray(list(m.get(f"{split}-rel-conf-{when}", [])), dtype=np.float64)
        if (
            count.sum() != n
            or np.any(correct > count)
            or conf.shape != count.shape
            or not np.all(np.isfinite(conf))
            or np.any(conf < 0)
            or np.any(conf > count + 1e-6)
        ):
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


def _query(grid: Grid, node_sites: dict[int, str], cfg: RunConfig, config: dict, arrays: dict) -> dict[str, dict]:
    content = RecordDict({CONFIG: ConfigRecord(config), **arrays})
    messages = [Message(content=content, dst_node_id=n, message_type=MessageType.QUERY) for n in node_sites]
    replies = {}
    for reply in grid.send_and_receive(messages, timeout=cfg.round_timeout_s):
        site = node_sites.get(reply.metadata.src_node_id, "?")
        if reply.has_error():
            log.warning("site %s failed %s: %s", site, config[ACTION], reply.error.reason)
            continue
        replies[site] = dict(reply.content[METRICS])
    return replies


def _round(v: float | None, nd: int = 4) -> float | None:
    return None if v is None or not math.isfinite(v) else round(float(v), nd)


def choose_from_validation(
    stats: Sequence[dict],
    detector_miss: float = cal.DEFAULT_DETECTOR_MISS,
    ood_false_alarm: float = cal.DEFAULT_OOD_FALSE_ALARM,
) -> cal.Calibration:
    """Temperature, detector and energy thresholds from checked, pooled ``calibrate-val`` aggregates.

    Fails closed: when no validation box reached IoU 0.5 the detector threshold is 1.0 (every box
    flagged). With no aggregates at all (every site suppressed or rejected) nothing is chosen: the
    thresholds stay None and ``onfh infer`` warns that those gates are off.
    """
    if not stats:
        return cal.Calibration(detector_miss=detector_miss, ood_false_alarm=ood_false_alarm)
    nll = np.sum([s["nll"] for s in stats], axis=0)
    score_hist = np.sum([s["score_hist"] for s in stats], axis=0)
    energy_hist = np.sum([s["energy_hist"] for s in stats], axis=0)
    # no validation box reached IoU 0.5: no score can be trusted, so every box is flagged (1.0), not none
    detector_threshold = cal.lower_threshold(score_hist, cal.SCORE_EDGES, detector_miss)
    return cal.Calibration(
        temperature=cal.choose_temperature(nll),
        detector_threshold=1.0 if detector_threshold is None else detector_threshold,
        energy_threshold=cal.upper_threshold(energy_hist, cal.ENERGY_EDGES, ood_false_alarm),
        detector_miss=detector_miss,
        ood_false_alarm=ood_false_alarm,
        val_heads=int(sum(s["n"] for s in stats)),
    )


def summarise(
    calibration: cal.Calibration, per_site: dict[str, dict[str, dict | None]], train_sites: Sequence[str]
) -> tuple[cal.Calibration, dict]:
    """Early-ONFH threshold from the pooled validation histograms, and the per-site report.

    Args:
        per_site: site -> {"val": checked stats or None, "test": checked stats or None}.

    Returns:
        The calibration with ``early_threshold`` set, and ``{"sites": {site: {...}}, "validation": {...}}``
        where each site has ``test_heads``, ``external``, ``ece_before`` / ``ece_after`` (test heads),
        ``sensitivity`` / ``specificity`` (early ONFH at the threshold, test heads, with the counts),
        ``ood_flagged`` and ``detector_flagged`` (fractions of its test heads).
    """
    vals: list[dict] = [val for v in per_site.values() if (val := v.get("val"))]
    pos = np.sum([v["pos"] for v in vals], axis=0) if vals else np.zeros(100, np.int64)
    neg = np.sum([v["neg"] for v in vals], axis=0) if vals else np.zeros(100, np.int64)
    threshold = cal.choose_early_threshold(pos, neg)
    calibration = dataclasses.replace(calibration, early_threshold=threshold)

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

    val_stats = []
    for site, m in sorted(
        _query(grid, node_sites, cfg, {ACTION: Action.CALIBRATE_VAL.value, CROPS_KEY: crops_key}, arrays).items()
    ):
        try:
            checked = check_validation_stats(m, declared(site, "val"))
        except StatsError as err:
            rejected[site] = f"calibrate-val: {err}"
            log.warning("site %s: calibration aggregate rejected (%s)", site, err)
            continue
        if checked is not None:
            val_stats.append(checked)
    calibration = choose_from_validation(val_stats)
    config = {ACTION: Action.CALIBRATE_EVAL.value, CROPS_KEY: crops_key, CALIBRATION: json.dumps(calibration.to_dict())}
    per_site: dict[str, dict] = {}
    for site, m in sorted(_query(grid, node_sites, cfg, config, arrays).items()):
        try:
            per_site[site] = {
                split: check_calibrated_stats(m, split, declared(site, split)) for split in ("val", "test")
            }
        except StatsError as err:
            rejected[site] = f"calibrate-eval: {err}"
            log.warning("site %s: calibration aggregate rejected (%s)", site, err)
    calibration, report = summarise(calibration, per_site, cfg.train_sites)
    report["chosen"] = calibration.to_dict()
    report["rejected"] = rejected
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
