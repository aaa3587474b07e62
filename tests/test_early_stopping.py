"""Early stopping on the pooled validation score: the patience rule, resume, and the curve figure."""

from __future__ import annotations

import pytest

from server.early_stopping import stop_round


def test_patience_counts_rounds_since_the_last_improvement():
    scores = {1: 0.60, 2: 0.70, 3: 0.69, 4: 0.71, 5: 0.70, 6: 0.70}
    # with min_delta 0.02 the rise to 0.71 at round 4 is no improvement (0.71 - 0.70 <= 0.02): stop after 2 + 3
    assert stop_round(scores, patience=3, min_delta=0.02) == 5
    # any rise counts with min_delta 0: the last improvement is round 4, round 7 would be the stop
    assert stop_round(scores, patience=3, min_delta=0.0) is None
    assert stop_round({**scores, 7: 0.5}, patience=3) == 7
    assert stop_round(scores, patience=0) is None  # switched off


def test_rounds_without_a_score_count_only_after_the_first_score():
    assert stop_round({1: None, 2: None, 3: None}, patience=2) is None  # no validation heads: never stops
    assert stop_round({1: None, 2: 0.5, 3: None, 4: None}, patience=2) == 4
    with pytest.raises(ValueError):
        stop_round({1: 0.5}, patience=-1)


def test_phase_finished_when_all_rounds_ran_or_the_rule_stopped_it():
    import torch

    from server.checkpoint import PhaseCheckpoint
    from server.server_app import phase_finished
    from shared_models.config import RunConfig
    from tests.conftest import tiny_run_config

    cfg = RunConfig.from_run_config(
        tiny_run_config(early_stopping_patience=2, early_stopping_min_delta=0.0, early_stopping_min_rounds=0)
    )
    metrics = {r: {"A": {"val-num-examples": 4, "val-score": v}} for r, v in {1: 0.5, 2: 0.8, 3: 0.7, 4: 0.8}.items()}
    ckpt = PhaseCheckpoint(round=4, state_dict={"w": torch.zeros(1)}, site_metrics=metrics)
    assert phase_finished(ckpt, rounds=20, cfg=cfg)  # best at round 2, rounds 3 and 4 without improvement
    ckpt3 = PhaseCheckpoint(round=3, state_dict={"w": torch.zeros(1)}, site_metrics={r: metrics[r] for r in (1, 2, 3)})
    assert not phase_finished(ckpt3, rounds=20, cfg=cfg)
    assert phase_finished(ckpt3, rounds=3, cfg=cfg)
    assert not phase_finished(None, rounds=3, cfg=cfg)


def test_training_curves_mark_the_chosen_round_and_the_early_stop(tmp_path, monkeypatch):
    import matplotlib.axes

    from server.report_plots import plot_training_curves

    drawn = []
    original = matplotlib.axes.Axes.plot

    def spy(self, *args, **kwargs):
        drawn.append((self, kwargs.get("label"), [list(map(float, a)) for a in args[:2]]))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    report = {
        "strategy": "fedavg",
        "selected_rounds": {"detector": 2, "stager": 3},
        "history": {"stager_val_macro_auc": {"1": {"A": 0.6}, "2": {"A": 0.7}, "3": {"A": 0.9}}},
        "early_stopping": {
            "max_rounds": {"detector": 2, "stager": 20},
            "rounds_run": {"detector": 2, "stager": 8},
            "validation_score": {"stager": {"1": 0.6, "2": 0.7, "3": 0.9, "4": 0.85}},
        },
    }
    path = plot_training_curves(report, tmp_path / "c.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    drawn = [(ax.get_title(), label, xy) for ax, label, xy in drawn]  # titles are set after the curves
    pooled = [d for d in drawn if d[1] == "pooled (selection score)"]
    assert pooled == [
        ("stager: validation macro AUC", "pooled (selection score)", [[1, 2, 3, 4], [0.6, 0.7, 0.9, 0.85]])
    ]
    assert ("stager: validation macro AUC", "chosen round 3", [[3.0], [0.9]]) in drawn


def test_no_early_stop_before_min_rounds():
    # issue 18's seed 2: a spike at round 3, nothing better up to round 8
    scores = {1: 0.50, 2: 0.38, 3: 0.65, 4: 0.53, 5: 0.53, 6: 0.46, 7: 0.50, 8: 0.54}
    assert stop_round(scores, patience=5, min_delta=0.005) == 8
    assert stop_round(scores, patience=5, min_delta=0.005, min_rounds=10) is None
    assert stop_round({**scores, 9: 0.6, 10: 0.6}, patience=5, min_delta=0.005, min_rounds=10) == 10
