"""A site's forged reply is rejected by name, never crashes the round (review F2a, F2b, last line)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

import tests.test_adversarial_influence as T
from shared_models.flower.records import record_to_state
from strategies.update_checks import metrics_problems, normalisation_problems, update_problems


def _npy(a: np.ndarray) -> bytes:
    b = io.BytesIO()
    np.save(b, a, allow_pickle=False)
    return b.getvalue()


def _forged(data: np.ndarray) -> ArrayRecord:
    """``packed:float`` whose metadata says float32 (200,) like the global model, with other bytes."""
    fl = Array(dtype="float32", shape=(200,), stype="numpy.ndarray", data=_npy(data))
    return ArrayRecord({"packed:float": fl, "packed:int64": Array(np.ascontiguousarray(T.GLOBAL_N + T.STEPS))})


FORGERIES = {
    "one element (broadcast)": np.array([0.5], np.float32),
    "10000 elements": np.zeros(10000, np.float32),
    "float64 payload": np.full(200, 1e5, np.float64),
    "int64 payload": np.full(200, 2**62, np.int64),
    "float16 payload": np.zeros(200, np.float16),
    "structured payload": np.zeros(200, dtype=[("a", "f4")]),
    "complex payload": np.full(200, 1 + 1e5j, np.complex64),
}


@pytest.mark.parametrize("data", FORGERIES.values(), ids=FORGERIES.keys())
def test_payload_that_contradicts_its_metadata_is_rejected(data):
    problems = update_problems(_forged(data), T._record(T.GLOBAL_W), max_int_delta=T.STEPS)
    assert problems and "packed:float" in problems[0] and "declared shape and dtype" in problems[0]
    # the same metadata with honest bytes passes: the payload, not the metadata, is what failed
    assert update_problems(T._record(T._honest(3)), T._record(T.GLOBAL_W), max_int_delta=T.STEPS) == []


def test_oversized_payload_is_refused_before_decoding():
    problems = update_problems(_forged(np.zeros(10000, np.float32)), T._record(T.GLOBAL_W))
    assert "bytes for 800 bytes of values" in problems[0]  # 200 float32 = 800 bytes


@pytest.mark.parametrize("data", FORGERIES.values(), ids=FORGERIES.keys())
def test_forged_payload_leaves_the_round_to_the_honest_sites(data):
    template = {
        "w": torch.zeros(200),
        "n1": torch.zeros((), dtype=torch.int64),
        "n2": torch.zeros((), dtype=torch.int64),
    }
    s = T._strategy(state_problems=lambda a: normalisation_problems(record_to_state(a, template)))
    w, _ = T._round(s, _forged(data))
    assert list(s.rejected_updates[1]) == ["D"]
    np.testing.assert_allclose(w, T._honest_mean(), atol=1e-6)


@pytest.mark.parametrize(
    "metrics, key",
    [
        ({"num-examples": 20, "val-score": [0.5]}, "val-score"),
        ({"num-examples": 20, "val-score": "0.5"}, "val-score"),
        ({"num-examples": 20, "macro-auc": [2.0, 3.0]}, "macro-auc"),
        ({"num-examples": 20, "train-loss": [-1.0]}, "train-loss"),
        ({"num-examples": 20, "center-error-mm": None}, "center-error-mm"),
    ],
)
def test_metric_of_the_wrong_type_is_a_problem_naming_the_key(metrics, key):
    problems = metrics_problems(metrics)
    assert len(problems) == 1 and key in problems[0] and "not a number" in problems[0]


def test_list_valued_metrics_through_the_strategy_are_rejected():
    s = T._strategy()
    out = s.aggregate_evaluate(1, [T._eval(1), T._eval(2, **{"val-score": [0.9]})])
    assert out is not None and out["val-score"] == pytest.approx(0.5)
    assert "val-score" in s.rejected_updates[1]["B"][0]
    s = T._strategy()
    w, _ = T._round(s, T._record(T._honest(3)), {"num-examples": 20, "train-loss": [0.5]})
    assert "train-loss" in s.rejected_updates[1]["D"][0]
    np.testing.assert_allclose(w, T._honest_mean(), atol=1e-6)


def test_a_check_that_raises_rejects_the_reply_not_the_round():
    marker = np.float32(0.123)

    def boom(arrays):  # an unforeseen failure inside a check, for site D's update only
        if arrays["packed:float"].numpy()[0] == marker:
            raise RuntimeError("unforeseen")
        return []

    s = T._strategy(state_problems=boom)
    w, _ = T._round(s, T._record(np.full(200, marker, np.float32)))
    assert s.rejected_updates[1] == {"D": ["unreadable update (RuntimeError in the checks)"]}
    np.testing.assert_allclose(w, T._honest_mean(), atol=1e-6)
