"""Federated calibration (issue 17 items 2-4): what sites send, what the server accepts and chooses."""

from __future__ import annotations

import csv
import dataclasses
import math

import numpy as np
import pytest
import torch

from server.calibration import (
    StatsError,
    check_calibrated_stats,
    check_validation_stats,
    choose_from_validation,
    summarise,
)
from shared_models import calibration as cal
from shared_models.config import RunConfig
from tests.conftest import tiny_run_config


def _val_stats(rng, n, shift=0.0):
    """A site's calibrate-val reply built from raw values, and those values."""
    scores = rng.beta(6, 2, n)
    good = rng.random(n) < 0.8
    energy = rng.normal(-6.0 + shift, 1.5, n)
    logits = rng.normal(0, 3, (n, 3))
    labels = rng.integers(0, 3, n)
    reply = {
        "val-heads": n,
        "val-suppressed": 0,
        "det-heads": n,
        "det-good": int(good.sum()),
        "det-score-hist": cal.histogram(scores[good], cal.SCORE_EDGES),
        "energy-hist": cal.histogram(energy, cal.ENERGY_EDGES),
        "nll": cal.nll_sums(logits, labels),
    }
    return reply, (scores[good], energy, logits, labels)


def test_server_pools_sites_like_one_site_with_all_the_heads():
    rng = np.random.default_rng(0)
    (ra, va), (rb, vb) = _val_stats(rng, 60), _val_stats(rng, 40, shift=1.0)
    chosen = choose_from_validation([check_validation_stats(ra, 60), check_validation_stats(rb, 40)])
    scores, energy = np.concatenate([va[0], vb[0]]), np.concatenate([va[1], vb[1]])
    logits, labels = np.concatenate([va[2], vb[2]]), np.concatenate([va[3], vb[3]])
    assert chosen.val_heads == 100
    assert chosen.temperature == cal.choose_temperature(cal.nll_sums(logits, labels))
    assert np.mean(scores < chosen.detector_threshold) <= 0.01
    assert np.mean(energy >= chosen.energy_threshold) <= 0.05
    assert chosen.energy_threshold == cal.upper_threshold(
        cal.histogram(energy, cal.ENERGY_EDGES), cal.ENERGY_EDGES, 0.05
    )


def test_no_good_validation_box_flags_every_box():
    reply, _ = _val_stats(np.random.default_rng(3), 20)
    reply.update({"det-good": 0, "det-score-hist": [0] * 100})
    chosen = choose_from_validation([check_validation_stats(reply, 20)])
    assert chosen.detector_threshold == 1.0  # fails closed: every score is below 1
    nothing = choose_from_validation([])
    assert nothing.detector_threshold is None and nothing.energy_threshold is None and nothing.temperature == 1.0


@pytest.mark.parametrize(
    "tamper, match",
    [
        (lambda r: r.update({"val-heads": 500}), "val-heads"),  # more than the site declared at hello
        (lambda r: r.update({"energy-hist": r["energy-hist"][:-1]}), "energy-hist"),
        (lambda r: r.update({"det-score-hist": [-1] + r["det-score-hist"][1:]}), "det-score-hist"),
        (lambda r: r.update({"det-good": r["det-good"] + 1}), "det-score-hist"),
        (lambda r: r.update({"nll": [1e9] * len(cal.TEMPERATURE_GRID)}), "nll"),
        (lambda r: r.update({"nll": [math.nan] * len(cal.TEMPERATURE_GRID)}), "nll"),
    ],
)
def test_server_rejects_malformed_or_unbounded_validation_aggregates(tamper, match):
    reply, _ = _val_stats(np.random.default_rng(1), 30)
    assert check_validation_stats(reply, 30) is not None
    tamper(reply)
    with pytest.raises(StatsError, match=match):
        check_validation_stats(reply, 30)


def test_suppressed_split_is_skipped_and_reported_as_such():
    assert check_validation_stats({"val-heads": 3, "val-suppressed": 1}, 3) is None
    assert check_calibrated_stats({"test-heads": 2, "test-suppressed": 1}, "test", 2) is None
    calibration, report = summarise(cal.Calibration(), {"B": {"val": None, "test": None}}, train_sites=("A",))
    assert calibration.early_threshold is None and report["sites"]["B"] == {
        "external": True,
        "test_heads": None,
        "suppressed": True,
    }


def _eval_split(probs_before, probs_after, labels, split="test"):
    out = {f"{split}-heads": len(labels), f"{split}-suppressed": 0}
    for when, p in (("before", probs_before), ("after", probs_after)):
        for k, v in cal.reliability_counts(p, labels).items():
            out[f"{split}-rel-{k}-{when}"] = v
    early = cal.early_probability(probs_after)
    out[f"{split}-early-pos"] = cal.histogram(early[labels > 0], cal.SCORE_EDGES)
    out[f"{split}-early-neg"] = cal.histogram(early[labels == 0], cal.SCORE_EDGES)
    out[f"{split}-ood-flagged"] = 2
    return out


def test_summary_reports_ece_and_early_onfh_sensitivity_specificity_per_site():
    rng = np.random.default_rng(2)
    logits, labels = rng.normal(0, 3, (80, 3)), rng.integers(0, 3, 80)
    before, after = cal.softmax_t(logits, 1.0), cal.softmax_t(logits, 2.0)
    val = check_calibrated_stats(_eval_split(before, after, labels, "val"), "val", 80)
    t_logits, t_labels = rng.normal(0, 3, (30, 3)), rng.integers(0, 3, 30)
    test = check_calibrated_stats(
        _eval_split(cal.softmax_t(t_logits, 1.0), cal.softmax_t(t_logits, 2.0), t_labels), "test", 30
    )
    calibration, report = summarise(
        cal.Calibration(temperature=2.0), {"A": {"val": val, "test": None}, "B": {"val": None, "test": test}}, ("A",)
    )
    # the threshold maximises Youden's J on A's validation heads, computed here from the raw values
    early = cal.early_probability(after)
    j = lambda t: np.mean(early[labels > 0] >= t) + np.mean(early[labels == 0] < t) - 1  # noqa: E731
    assert j(calibration.early_threshold) == pytest.approx(max(j(e) for e in cal.SCORE_EDGES[1:-1]))
    row = report["sites"]["B"]
    t_early = cal.early_probability(cal.softmax_t(t_logits, 2.0))
    assert row["external"] and row["test_heads"] == 30
    assert row["sensitivity"] == pytest.approx(np.mean(t_early[t_labels > 0] >= calibration.early_threshold), abs=1e-4)
    assert row["specificity"] == pytest.approx(np.mean(t_early[t_labels == 0] < calibration.early_threshold), abs=1e-4)
    c = cal.reliability_counts(cal.softmax_t(t_logits, 1.0), t_labels)
    assert row["ece_before"] == pytest.approx(cal.ece_from_counts(c["count"], c["correct"], c["conf"]), abs=1e-4)
    assert row["ood_flagged"] == pytest.approx(2 / 30, abs=1e-4)
    bad = _eval_split(before, after, labels)
    bad["test-rel-correct-after"] = [c + 100 for c in bad["test-rel-correct-after"]]
    with pytest.raises(StatsError, match="reliability"):
        check_calibrated_stats(bad, "test", 80)


# ----------------------------------------------------------------------------- a real (phantom) site


@pytest.fixture(scope="module")
def phantom_site(tmp_path_factory):
    from sim.phantoms import PROFILES, generate_phantoms

    quick = PROFILES["quick"]
    profile = dataclasses.replace(
        quick,
        name="micro-cal",
        heads_per_site={"A": 10},
        patients_per_site={"A": 6},
        scanners={"A": quick.scanners["A"]},
        external_groups={},
    )
    root = tmp_path_factory.mktemp("cal")
    generate_phantoms(root, profile, seed=7, workers=1)
    with open(root / "A" / "manifest.csv") as fh:
        patients = sorted({row["patient_id"] for row in csv.DictReader(fh)})
    with open(root / "A" / "split.csv", "w", newline="") as fh:  # two patients each in test, val and train
        fh.write("patient_id,split\n")
        for i, p in enumerate(patients):
            fh.write(f"{p},{('test', 'val', 'train')[i % 3]}\n")
    return root


def test_site_sends_consistent_aggregates_and_suppresses_small_splits(phantom_site, tmp_path):
    from client import tasks
    from client.calibration_stats import calibrated_stats, stage_logits, validation_stats
    from shared_models.detection import YOLOX3D
    from shared_models.stager import MulDenseNet3D

    cfg = RunConfig.from_run_config(
        tiny_run_config(
            **{
                "data-root": str(phantom_site),
                "site-ids": "A",
                "train-sites": "A",
                "report-groups": "A-test=A",
                "cache-dir": str(tmp_path / "cache"),
                "crop-source": "ground-truth",
            }
        )
    )
    site = tasks.open_site(cfg, "A", phantom_site / "A")
    torch.manual_seed(0)
    detector, stager = YOLOX3D(cfg.detector).state_dict(), MulDenseNet3D(cfg.stager).state_dict()
    key, _ = tasks.make_crops(site, cfg, None)
    n_val = len(site.heads_in("val"))
    assert n_val >= 1
    m = validation_stats(site, cfg, detector, stager, key)
    checked = check_validation_stats(m, n_val)
    assert checked["n"] == m["val-heads"] == n_val
    # the NLL at T = 1 is the sum over the site's validation crops, recomputed here
    crops, stages = tasks.load_crops(site, key).select("val")
    model = MulDenseNet3D(cfg.stager)
    model.load_state_dict(stager)
    z = torch.from_numpy(stage_logits(model, crops, device=torch.device("cpu")))
    direct = float(torch.nn.functional.cross_entropy(z, torch.from_numpy(stages), reduction="sum"))
    assert m["nll"][cal.TEMPERATURE_GRID.index(1.0)] == pytest.approx(direct, rel=1e-6)
    e = calibrated_stats(
        site,
        cfg,
        detector,
        stager,
        key,
        cal.Calibration(temperature=2.0, energy_threshold=-math.inf, detector_threshold=1.0),
    )
    test = check_calibrated_stats(e, "test", len(site.heads_in("test")))
    if test is not None:
        assert test["ood_flagged"] == test["n"]  # every head at or above -inf
        assert test["det_flagged"] == test["det_heads"]  # every score below 1
    # a split smaller than min-cell-heads sends its count only
    strict = dataclasses.replace(cfg, min_cell_heads=n_val + 1)
    assert validation_stats(site, strict, detector, stager, key) == {"val-heads": n_val, "val-suppressed": 1}
