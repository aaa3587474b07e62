"""``onfh sim compare``: variant parsing, per-group rows, mean ± sd over seeds, the grid's folders."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from shared_models.cli_common import parse_set as _parse_set
from sim.experiments import compare


def _report(auc_a: float, auc_ext: float, iou: float = 0.8) -> dict:
    def group(sites, auc, n):
        return {
            "sites": sites,
            "n": n,
            "macro": {"auc": auc, "accuracy": auc - 0.1, "sensitivity": 0.5, "specificity": 0.7, "f1": 0.6},
        }

    return {
        "sites": {
            "A-test": group(["A"], auc_a, 10),
            "external-2": group(["C", "D"], auc_ext, 8),
            "empty": {"sites": ["E"], "n": 0},
        },
        "detector": {
            "A": {"iou_mean": iou},
            "C": {"iou_mean": iou - 0.1},
            "D": {"iou_mean": iou - 0.2},
            "E": {"n": 0, "iou_mean": None},
        },  # a site without test heads
        "simulation": {"wall_time_s": 12.5},
    }


def test_parse_variant_types_values_like_the_pyproject_defaults():
    v = compare.parse_variant("gt:crop-source=ground-truth,stager-rounds=3", _parse_set)
    assert v.name == "gt" and v.overrides == {"crop-source": "ground-truth", "stager-rounds": 3}
    assert compare.parse_variant("plain", _parse_set).overrides == {}
    for bad in ("", ":x=1", "../up", "a/b"):
        with pytest.raises(ValueError):
            compare.parse_variant(bad, _parse_set)
    with pytest.raises(ValueError, match="no-such-key"):
        compare.parse_variant("x:no-such-key=1", _parse_set)


def test_rows_carry_macro_metrics_and_the_groups_detector_iou():
    rows = {r["group"]: r for r in compare.rows_from_report("v", 3, _report(0.9, 0.7))}
    assert rows["A-test"]["macro_auc"] == 0.9 and rows["A-test"]["seed"] == 3 and rows["A-test"]["n"] == 10
    assert rows["external-2"]["detector_iou_mean"] == pytest.approx((0.7 + 0.6) / 2)  # C and D
    assert math.isnan(rows["empty"]["macro_auc"]) and math.isnan(rows["empty"]["detector_iou_mean"])
    assert rows["A-test"]["wall_time_s"] == 12.5


def test_summary_is_mean_and_sample_sd_over_seeds():
    aucs = [0.91, 0.85, 0.88]
    rows = [r for s, a in enumerate(aucs) for r in compare.rows_from_report("v", s, _report(a, 0.5))]
    summary = {s["group"]: s for s in compare.summarise(rows)}
    assert summary["A-test"]["seeds"] == 3
    assert summary["A-test"]["macro_auc"] == pytest.approx(np.mean(aucs))
    assert summary["A-test"]["macro_auc_sd"] == pytest.approx(np.std(aucs, ddof=1))
    assert summary["external-2"]["macro_auc_sd"] == pytest.approx(0.0)
    table = compare.markdown_table(compare.summarise(rows))
    assert f"{np.mean(aucs):.3f} ± {np.std(aucs, ddof=1):.3f}" in table
    half = 4.302652729749464 * np.std(aucs, ddof=1) / np.sqrt(3)  # t(0.975, 2 df) x standard error
    assert f"{np.mean(aucs) - half:.3f} to {np.mean(aucs) + half:.3f}" in table


def test_grid_runs_each_cell_in_its_own_folder_and_writes_the_table(tmp_path, monkeypatch):
    seen = []

    def fake_experiment(overrides, console=None):
        seen.append(overrides)
        return _report(0.8 + 0.01 * overrides["seed"], 0.6)

    monkeypatch.setattr("sim.experiments.experiment.run_experiment", fake_experiment)
    variants = [compare.Variant("default"), compare.Variant("gt", {"crop-source": "ground-truth", "stager-rounds": 2})]
    summary = compare.run_compare({"data-root": "/d", "stager-rounds": 5}, tmp_path / "grid", variants, [0, 1])
    assert [(o["out-dir"].split("/")[-2:], o["seed"]) for o in seen] == [
        (["default", "seed-0"], 0),
        (["gt", "seed-0"], 0),
        (["default", "seed-1"], 1),
        (["gt", "seed-1"], 1),
    ]
    assert seen[0]["stager-rounds"] == 5 and seen[1]["stager-rounds"] == 2  # the variant wins over the base
    assert seen[1]["crop-source"] == "ground-truth" and "crop-source" not in seen[0]
    saved = json.loads((tmp_path / "grid" / "compare.json").read_text())
    assert len(saved["rows"]) == 4 * 3 and len(saved["summary"]) == len(summary) == 2 * 3
    assert "| gt | A-test | 2 |" in (tmp_path / "grid" / "compare.md").read_text()


def test_grid_refuses_duplicate_names_and_no_seeds(tmp_path):
    with pytest.raises(ValueError, match="distinct"):
        compare.run_compare({}, tmp_path, [compare.Variant("a"), compare.Variant("a")], [0])
    with pytest.raises(ValueError, match="seed"):
        compare.run_compare({}, tmp_path, [compare.Variant("a")], [])


def test_named_grids():
    from shared_models.config import RunConfig
    from tests.conftest import tiny_run_config

    loso = compare.grid_variants("leave-one-site-out", ["A", "B", "C", "D"])
    assert [v.name for v in loso] == ["hold-out-A", "hold-out-B", "hold-out-C", "hold-out-D"]
    for v, held in zip(loso, "ABCD"):
        cfg = RunConfig.from_run_config(tiny_run_config(**v.overrides))  # a valid run config
        assert held not in cfg.train_sites and set(cfg.train_sites) | {held} == {"A", "B", "C", "D"}
        assert cfg.report_groups["held-out"] == (held,) and set(cfg.report_groups["internal-test"]) == set(
            cfg.train_sites
        )
    strategies = compare.grid_variants("strategies", ["A"])
    assert [v.overrides["strategy"] for v in strategies] == ["fedavg", "fedprox", "fedprox", "fedprox", "fedbn"]
    assert [v.overrides.get("proximal-mu") for v in strategies[1:4]] == [0.001, 0.01, 0.1]
    assert compare.grid_variants("ablations", ["A"]) == list(compare.DEFAULT_VARIANTS)
    with pytest.raises(ValueError, match="grid"):
        compare.grid_variants("nosuch", ["A"])
    with pytest.raises(ValueError, match="two sites"):
        compare.leave_one_site_out_variants(["A"])


def test_prediction_interval_of_one_more_seed_matches_the_textbook_formula():
    # t(0.975, 2) = 4.3027 (tables); mean 0.6, sd 0.1, n 3: half-width 4.3027 * 0.1 * sqrt(4/3) = 0.4968
    low, high = compare.seed_prediction_interval([0.5, 0.6, 0.7])
    assert low == pytest.approx(0.6 - 0.49683, abs=1e-4) and high == pytest.approx(1.0)  # clipped to 1
    low, high = compare.seed_prediction_interval([0.50, 0.52, 0.54], bounds=(-1, 2))
    assert (low, high) == pytest.approx((0.52 - 0.099366, 0.52 + 0.099366), abs=1e-5)
    assert all(math.isnan(v) for v in compare.seed_prediction_interval([0.5]))


def test_headline_table_and_check_of_a_new_seed_against_the_stated_interval():
    rows = [
        r
        for seed, auc in ((0, 0.80), (1, 0.84), (2, 0.82))
        for r in compare.rows_from_report("default", seed, _report(auc, auc - 0.1))
    ]
    summary = compare.summarise(rows)
    table = compare.headline_table(summary)
    assert "| A-test | 10 | 0.720 ± 0.020 |" in table  # accuracy = auc - 0.1: mean 0.72, sd 0.02
    inside = compare.rows_from_report("default", 3, _report(0.83, 0.72))
    assert compare.outside_interval(summary, [r for r in inside if r["group"] != "empty"]) == []
    far = compare.rows_from_report("default", 4, _report(0.99, 0.72))
    problems = compare.outside_interval(summary, [r for r in far if r["group"] != "empty"])
    # A-test macro AUC 0.99 > 0.82 + 4.3027 * 0.02 * sqrt(4/3) = 0.919; accuracy 0.89 > 0.819 likewise
    assert len(problems) == 2 and all(p.startswith("default / A-test seed 4") for p in problems)
    with pytest.raises(ValueError, match="no other"):
        compare.outside_interval(summary, [{**far[0], "variant": "other"}])
