"""One site cannot poison the shipped calibration or crash the calibration step (review F1, F2c)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from server.calibration import (
    StatsError,
    check_calibrated_stats,
    check_validation_stats,
    choose_from_validation,
    gate_problem,
    run_calibration,
    site_weights,
)
from server.server_app import hello_problem
from shared_models import calibration as cal
from shared_models.config import RunConfig
from shared_models.specs import METRICS, SITE, SITE_ID
from tests.conftest import tiny_run_config
from tests.flower_messages import message

pytestmark = pytest.mark.usefixtures("task_identity")  # message() needs the TaskIdentity set

NB, NE, NT = len(cal.SCORE_EDGES) - 1, len(cal.ENERGY_EDGES) - 1, len(cal.TEMPERATURE_GRID)


def _honest(n: int = 20) -> dict:
    sh = [0] * NB
    sh[80] = n  # every good box scores in [0.80, 0.81)
    eh = [0] * NE
    eh[100] = n
    nll = [abs(math.log(t)) * n + 0.5 * n for t in cal.TEMPERATURE_GRID]  # smallest at T = 1
    return {"val-heads": n, "det-heads": n, "det-good": n, "det-score-hist": sh, "energy-hist": eh, "nll": nll}


def _poisoned(n: int = 10**6) -> dict:
    sh = [0] * NB
    sh[0] = n  # every good box scores ~0: the detector threshold would drop to 0
    eh = [0] * NE
    eh[-1] = n  # every energy in the top bin: the OOD threshold would be inf
    nll = [cal.NLL_CAP * n] * NT
    nll[-1] = 0.0  # smallest at the largest T
    return {"val-heads": n, "det-heads": n, "det-good": n, "det-score-hist": sh, "energy-hist": eh, "nll": nll}


def _eval(n: int = 20) -> dict:
    out: dict = {}
    for s in ("val", "test"):
        c = [0] * cal.RELIABILITY_BINS
        c[8] = n
        pos = [0] * NB
        pos[50] = n
        out.update(
            {
                f"{s}-heads": n,
                f"{s}-rel-count-before": c,
                f"{s}-rel-correct-before": c,
                f"{s}-rel-conf-before": [0.85 * x for x in c],
                f"{s}-rel-count-after": c,
                f"{s}-rel-correct-after": c,
                f"{s}-rel-conf-after": [0.85 * x for x in c],
                f"{s}-early-pos": pos,
                f"{s}-early-neg": [0] * NB,
                f"{s}-ood-flagged": 0,
            }
        )
    return out


class _Grid:
    """Answers the calibrate-val query with ``val`` and the calibrate-eval query with ``ev`` (node -> metrics)."""

    def __init__(self, val: dict, ev: dict) -> None:
        self.replies, self.calls = (val, ev), 0

    def send_and_receive(self, messages, timeout=None):
        src = self.replies[min(self.calls, 1)]
        self.calls += 1
        return [
            message(n, RecordDict({} if m is None else {"metrics": MetricRecord(m)}), message_type="query")
            for n, m in src.items()
        ]


NODE_SITES = {1: "A", 2: "B", 3: "C", 4: "D"}


def _declared(d_heads: int = 20) -> dict:
    out = {s: {"heads-train": 20, "heads-val": 20, "heads-test": 20} for s in "ABC"}
    out["D"] = {"heads-train": d_heads, "heads-val": d_heads, "heads-test": d_heads}
    return out


def _run(d_val: dict | None, declared: dict, d_eval: dict | None = None):
    cfg = RunConfig.from_run_config(tiny_run_config())
    st = {"w": torch.zeros(4)}
    val = {1: _honest(), 2: _honest(), 3: _honest(), 4: d_val}
    ev = {n: _eval() for n in (1, 2, 3)} | {4: _eval() if d_eval is None else d_eval}
    return run_calibration(_Grid(val, ev), NODE_SITES, cfg, st, st, "key", declared)


# --- (a) the hello must declare every split's heads ---


@pytest.mark.parametrize("missing", ["heads-train", "heads-val", "heads-test"])
def test_hello_without_a_declared_head_count_is_refused_by_key(missing):
    counts = {"heads-train": 3, "heads-val": 2, "heads-test": 1, "studies-refused": 0}
    del counts[missing]
    reply = message(
        7, RecordDict({SITE: ConfigRecord({SITE_ID: "D"}), METRICS: MetricRecord(counts)}), message_type="query"
    )
    problem = hello_problem(reply)
    assert problem is not None and missing in problem
    full = {"heads-train": 3, "heads-val": 2, "heads-test": 1}
    assert (
        hello_problem(
            message(
                7, RecordDict({SITE: ConfigRecord({SITE_ID: "D"}), METRICS: MetricRecord(full)}), message_type="query"
            )
        )
        is None
    )


# --- (b) no declared count: refused, never capped at an arbitrary bound ---


def test_stats_without_a_declared_count_are_refused():
    with pytest.raises(StatsError, match="declared"):
        check_validation_stats(_honest(), None)
    with pytest.raises(StatsError, match="declared"):
        check_calibrated_stats(_eval(), "test", None)
    assert check_validation_stats(_honest(), 20) is not None


# --- (c) one site's weight is bounded and a gate-off choice is not shipped ---


def test_site_weight_is_capped_at_the_largest_other_site():
    w = site_weights({"A": 20, "B": 30, "D": 10**6})
    assert w == {"A": 1.0, "B": 1.0, "D": pytest.approx(30 / 10**6)}
    assert site_weights({"A": 10, "B": 1000}) == {"A": 1.0, "B": pytest.approx(0.01)}
    assert site_weights({"A": 7}) == {"A": 1.0}


def test_weighted_giant_site_counts_like_the_largest_other_site():
    def d(n):  # D's NLL is smallest at T = 2 (honest sites: T = 1)
        nll = [abs(math.log(t / 2.0)) * n + 0.5 * n for t in cal.TEMPERATURE_GRID]
        return check_validation_stats({**_honest(n), "nll": nll}, n)

    honest = [check_validation_stats(_honest(), 20) for _ in range(3)]
    giant = choose_from_validation(honest + [{**d(10**6), "weight": 20 / 10**6}])
    same_size = choose_from_validation(honest + [d(20)])
    # pooled |log T - log T_i| sums: three sites at T=1, one at T=2 -> the weighted median T = 1
    assert giant.temperature == same_size.temperature == 1.0
    assert giant.val_heads == 80
    assert choose_from_validation(honest + [d(10**6)]).temperature == 2.0  # unweighted, D alone decides


@pytest.mark.parametrize(
    "change, match",
    [
        ({"temperature": 8.0}, "temperature"),
        ({"detector_threshold": 0.0}, "detector"),
        ({"energy_threshold": math.inf}, "energy"),
    ],
)
def test_gate_problem_names_a_choice_that_switches_a_gate_off(change, match):
    ok = cal.Calibration(temperature=1.0, detector_threshold=0.8, energy_threshold=-14.75)
    assert gate_problem(ok) is None
    problem = gate_problem(cal.Calibration(**{**ok.to_dict(), "fallback": None, **change}))
    assert problem is not None and match in problem


@pytest.mark.parametrize("d_heads", [20, 10**6])
def test_poisoned_site_cannot_ship_gate_off_calibration(d_heads):
    clean, clean_report = _run(_honest(), _declared())
    assert (clean.temperature, clean.detector_threshold, clean.fallback) == (1.0, 0.8, None)
    assert clean_report["fallback"] is None
    c, report = _run(_poisoned(d_heads), _declared(d_heads))
    assert c.fallback is not None and report["fallback"] == c.fallback
    assert c.temperature == 1.0 and c.detector_threshold is None and c.energy_threshold is None
    assert report["chosen"]["fallback"] == c.fallback  # what calibration.json carries
    assert cal.Calibration.from_dict(c.to_dict()) == c


def test_undeclared_site_is_rejected_from_calibration():
    declared = _declared()
    declared["D"] = {"studies-refused": 0}
    c, report = _run(_poisoned(), declared)
    assert "declared" in report["rejected"]["D"]
    assert (c.temperature, c.detector_threshold, c.fallback) == (1.0, 0.8, None)


# --- F2c: every malformed reply is a StatsError or a rejection, never a crash ---


@pytest.mark.parametrize(
    "tamper",
    [
        {"val-heads": float("nan")},
        {"val-heads": float("inf")},
        {"val-heads": [20]},
        {"val-suppressed": [1]},
        {"val-suppressed": float("nan")},
        {"val-suppressed": 2},
        {"nll": 3},
        {"nll": "x" * NT},
        {"det-score-hist": "abc"},
        {"energy-hist": 5},
    ],
)
def test_malformed_validation_stats_raise_stats_error(tamper):
    with pytest.raises(StatsError):
        check_validation_stats({**_honest(), **tamper}, 20)


@pytest.mark.parametrize(
    "tamper",
    [
        {"test-heads": float("nan")},
        {"test-suppressed": [1]},
        {"test-rel-conf-after": 3.0},
        {"test-early-pos": [float("inf")] * NB},
        {"test-ood-flagged": [0]},
    ],
)
def test_malformed_eval_stats_raise_stats_error(tamper):
    with pytest.raises(StatsError):
        check_calibrated_stats({**_eval(), **tamper}, "test", 20)


def test_reply_without_metrics_or_malformed_is_rejected_not_raised():
    c, report = _run(None, _declared())
    assert report["rejected"]["D"] == "calibrate-val: reply without metrics"
    assert c.detector_threshold == 0.8
    _, report = _run(_honest(), _declared(), d_eval={**_eval(), "val-suppressed": [1]})
    assert report["rejected"]["D"].startswith("calibrate-eval: ")
    assert np.isfinite(report["validation"]["heads"])


def test_infer_names_a_refused_calibration():
    from client.infer import calibration_warnings

    refused = cal.Calibration(fallback="temperature 8 outside [0.25, 4]")
    (warning,) = calibration_warnings(refused)
    assert "refused the pooled calibration (temperature 8 outside [0.25, 4])" in warning
    assert "detector-score or out-of-distribution" in warning
    assert calibration_warnings(cal.Calibration(temperature=1.0, detector_threshold=0.8, energy_threshold=-3.0)) == []
    assert "no validation aggregates" in calibration_warnings(cal.Calibration())[0]
