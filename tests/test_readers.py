"""Tests for sim.reports.readers (``onfh report readers``)."""

from __future__ import annotations

import argparse
import io
import json
import math

import numpy as np
import pytest
from rich.console import Console

from shared_models.clinical_stats import mcnemar_test
from sim.cli import report_commands
from sim.reports.readers import (
    cmd_readers,
    compare_with_readers,
    load_predictions_csv,
    load_reader_csv,
    simulate_readers,
    write_reader_csv,
)


def _truth(n_heads: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    stages = rng.integers(0, 3, size=n_heads)
    predicted = np.where(rng.random(n_heads) < 0.85, stages, (stages + 1) % 3)
    return [
        {"patient_id": f"P{i // 2:03d}", "side": "RL"[i % 2], "stage": int(s), "predicted_stage": int(p)}
        for i, (s, p) in enumerate(zip(stages, predicted))
    ]


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- simulate


def test_perfect_simulated_reader_agrees_with_truth():
    truth = _truth(50)
    calls = simulate_readers(truth, {"senior": 1.0}, seed=1)
    assert [(c["patient_id"], c["side"], c["stage"]) for c in calls] == [
        (t["patient_id"], t["side"], t["stage"]) for t in truth
    ]
    [row] = compare_with_readers(truth, calls)
    # a perfect reader is never wrong: no "model right, reader wrong" head; every model error is "c"
    model_errors = sum(t["stage"] != t["predicted_stage"] for t in truth)
    assert row["reader_accuracy"] == 1.0 and row["b"] == 0 and row["c"] == model_errors > 0


def test_simulated_reader_accuracy_within_binomial_tolerance():
    truth = _truth(200, seed=2)
    calls = simulate_readers(truth, {"junior": 0.6}, seed=5)
    by_head = {(t["patient_id"], t["side"]): t["stage"] for t in truth}
    right = np.array([c["stage"] == by_head[(c["patient_id"], c["side"])] for c in calls])
    # Binomial(200, 0.6): sd = sqrt(0.6*0.4/200) = 0.0346; 4 sd = 0.139.
    assert abs(right.mean() - 0.6) < 0.139
    # Wrong calls go to a different stage, split between the two others (each ~1/2 of the ~80
    # wrong calls; sd = sqrt(80/4) = 4.5, so 40 +- 25 is > 5 sd).
    shifts = [(c["stage"] - by_head[(c["patient_id"], c["side"])]) % 3 for c in calls]
    wrong = [k for k in shifts if k != 0]
    assert abs(wrong.count(1) - len(wrong) / 2) < 25
    [row] = compare_with_readers(truth, calls)
    assert row["reader_accuracy"] == pytest.approx(right.mean())


def test_reader_of_accuracy_zero_is_always_wrong():
    truth = _truth(60, seed=6)
    calls = simulate_readers(truth, {"z": 0.0}, seed=0)
    assert all(c["stage"] != t["stage"] and c["stage"] in (0, 1, 2) for c, t in zip(calls, truth))


def test_simulate_rejects_bad_accuracy():
    with pytest.raises(ValueError, match="accuracies"):
        simulate_readers(_truth(4), {"x": 1.5})


# --------------------------------------------------------------------------- compare


def test_compare_hand_example():
    # 5 heads, truth (0, I, II, 0, I); model predicts (0, I, 0, 0, II): right on heads 1, 2, 4.
    model = [
        {"patient_id": "a", "side": "R", "stage": "0", "predicted_stage": "0"},
        {"patient_id": "a", "side": "L", "stage": "I", "predicted_stage": "I"},
        {"patient_id": "b", "side": "R", "stage": "II", "predicted_stage": "0"},
        {"patient_id": "c", "side": "R", "stage": "0", "predicted_stage": "0"},
        {"patient_id": "c", "side": "L", "stage": "I", "predicted_stage": "II"},
    ]
    # Reader X grades 4 heads: right on a/R, wrong on a/L, right on b/R, right on c/L.
    # model right/wrong on those: a/R yes, a/L yes, b/R no, c/L no.
    # b (model only) = 1 (a/L); c (reader only) = 2 (b/R, c/L).
    reader = [
        {"patient_id": "a", "side": "R", "reader": "X", "stage": 0},
        {"patient_id": "a", "side": "L", "reader": "X", "stage": 2},
        {"patient_id": "b", "side": "R", "reader": "X", "stage": 2},
        {"patient_id": "c", "side": "L", "reader": "X", "stage": 1},
        {"patient_id": "c", "side": "R", "reader": "Y", "stage": 1},
    ]
    rows = compare_with_readers(model, reader)
    assert [r["reader"] for r in rows] == ["X", "Y"]
    x, y = rows
    assert x["n"] == 4 and x["reader_accuracy"] == 0.75 and x["model_accuracy"] == 0.5
    assert (x["b"], x["c"]) == (1, 2)
    # exact: p = min(1, 2 * P[Bin(3, .5) <= 1]) = 2 * 4/8 = 1.
    assert x["p_value"] == pytest.approx(1.0) and x["method"] == "exact binomial"
    assert y["n"] == 1 and y["reader_accuracy"] == 0.0 and y["model_accuracy"] == 1.0 and (y["b"], y["c"]) == (1, 0)


def test_mcnemar_rows_match_mcnemar_test_on_same_vectors():
    truth = _truth(120, seed=3)
    calls = simulate_readers(truth, {"A": 0.9, "B": 0.55}, seed=9)
    rows = compare_with_readers(truth, calls)
    by_head = {(t["patient_id"], t["side"]): t for t in truth}
    for row in rows:
        mine = [c for c in calls if c["reader"] == row["reader"]]
        model_ok = [
            by_head[(c["patient_id"], c["side"])]["predicted_stage"] == by_head[(c["patient_id"], c["side"])]["stage"]
            for c in mine
        ]
        reader_ok = [c["stage"] == by_head[(c["patient_id"], c["side"])]["stage"] for c in mine]
        expected = mcnemar_test(model_ok, reader_ok)
        for key in ("b", "c", "statistic", "p_value", "method"):
            assert row[key] == expected[key]
        assert row["model_accuracy"] == pytest.approx(np.mean(model_ok))
    # the weak reader B has many discordant pairs: asymptotic test; and the model beats it
    b_row = rows[1]
    assert b_row["b"] + b_row["c"] >= 25 and b_row["method"].startswith("chi-square")
    assert b_row["p_value"] < 0.05


def test_compare_names_reader_row_without_model_prediction(tmp_path):
    preds = _write(tmp_path / "predictions.csv", "patient_id,side,stage,predicted_stage\np1,R,0,0\n")
    readers = _write(tmp_path / "readers.csv", "patient_id,side,reader,stage\np1,R,X,0\np1,L,X,I\n")
    with pytest.raises(ValueError, match=r"readers\.csv line 3: the model has no prediction"):
        compare_with_readers(load_predictions_csv(preds), load_reader_csv(readers))


# --------------------------------------------------------------------------- CSV errors


@pytest.mark.parametrize(
    "text, match",
    [
        ("patient_id,side,reader,stage\np1,R,X,0\np1,L,X,III\n", r"readers\.csv line 3: column stage: .*out of scope"),
        ("patient_id,side,reader,stage\np1,R,X,maybe\n", r"readers\.csv line 2: column stage: unreadable"),
        ("patient_id,side,reader\np1,R,X\n", r"readers\.csv line 1: missing column\(s\) stage"),
        ("patient_id,side,reader,stage\np1,middle,X,0\n", r"readers\.csv line 2: side 'middle'"),
        ("patient_id,side,reader,stage\np1,R,X,0\np2,R,X,0\np1,r,X,I\n", r"readers\.csv line 4: .*twice"),
        ("patient_id,side,reader,stage\np1,R,X\n", r"readers\.csv line 2: .*short"),
        ("patient_id,side,reader,stage\n,R,X,0\n", r"readers\.csv line 2: empty"),
    ],
)
def test_bad_reader_csv_names_file_and_line(tmp_path, text, match):
    path = _write(tmp_path / "readers.csv", text)
    with pytest.raises(ValueError, match=match):
        load_reader_csv(path)


@pytest.mark.parametrize(
    "text, match",
    [
        ("patient_id,side,stage\np1,R,0\n", r"predictions\.csv line 1: missing column\(s\) predicted_stage"),
        ("patient_id,side,stage,predicted_stage\np1,R,0,IV\n", r"predictions\.csv line 2: column predicted_stage"),
        ("patient_id,side,stage,predicted_stage\np1,R,0,0\np1,R,I,I\n", r"predictions\.csv line 3: head listed twice"),
    ],
)
def test_bad_predictions_csv_names_file_and_line(tmp_path, text, match):
    path = _write(tmp_path / "predictions.csv", text)
    with pytest.raises(ValueError, match=match):
        load_predictions_csv(path)


def test_reader_csv_round_trip(tmp_path):
    truth = _truth(10)
    calls = simulate_readers(truth, {"A": 0.7, "B": 0.7}, seed=0)
    loaded = load_reader_csv(write_reader_csv(calls, tmp_path / "readers.csv"))
    assert [{k: r[k] for k in ("patient_id", "side", "reader", "stage")} for r in loaded] == calls
    assert loaded[0]["source"].endswith("readers.csv line 2")


# --------------------------------------------------------------------------- CLI


def _cli(argv):
    parser = argparse.ArgumentParser(prog="onfh report")
    report_commands(parser)
    return parser.parse_args(argv)


def test_cmd_readers_writes_json_and_prints_table(tmp_path):
    truth = _truth(40, seed=4)
    preds = tmp_path / "predictions.csv"
    preds.write_text(
        "patient_id,side,stage,predicted_stage\n"
        + "".join(
            f"{t['patient_id']},{t['side']},{('0', 'I', 'II')[t['stage']]},{('0', 'I', 'II')[t['predicted_stage']]}\n"
            for t in truth
        ),
        encoding="utf-8",
    )
    readers = write_reader_csv(simulate_readers(truth, {"senior": 0.9, "junior": 0.6}, seed=1), tmp_path / "r.csv")
    out = tmp_path / "sub" / "readers.json"
    args = _cli(["readers", "--readers", str(readers), "--predictions", str(preds), "--out", str(out)])
    buf = io.StringIO()
    assert args.func(args, console=Console(file=buf, width=160)) == 0
    data = json.loads(out.read_text())
    assert [r["reader"] for r in data["readers"]] == ["senior", "junior"]
    assert all(r["n"] == 40 and not math.isnan(r["p_value"]) for r in data["readers"])
    text = buf.getvalue()
    assert "senior" in text and "junior" in text and "McNemar" in text


def test_cmd_readers_bad_input_returns_1(tmp_path):
    preds = _write(tmp_path / "predictions.csv", "patient_id,side,stage,predicted_stage\np1,R,0,0\n")
    readers = _write(tmp_path / "readers.csv", "patient_id,side,reader,stage\np1,R,X,V\n")
    args = _cli(["readers", "--readers", str(readers), "--predictions", str(preds)])
    buf = io.StringIO()
    assert cmd_readers(args, console=Console(file=buf, width=300)) == 1
    assert "readers.csv line 2" in buf.getvalue()
