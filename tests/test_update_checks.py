"""Updates checked before aggregation; robust strategies; the minimum fraction of sites (issue 7)."""

from __future__ import annotations

import time

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
)

from strategies.site_aware import (
    RoundIncompleteError,
    SiteFedAvg,
    SiteFedMedian,
    SiteFedTrimmedAvg,
    SiteKrum,
    build_strategy,
)
from strategies.update_checks import reply_problems, update_problems
from tests.flower_messages import message, reply

pytestmark = pytest.mark.usefixtures("task_identity")

GLOBAL = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(3, np.float32), "n": np.array(7, np.int64)}


def _record(**arrays) -> ArrayRecord:
    return ArrayRecord({k: Array(np.ascontiguousarray(v)) for k, v in arrays.items()})


def _update(value: float, **changes) -> ArrayRecord:
    arrays = {"w": np.full((2, 3), value, np.float32), "b": np.full(3, value, np.float32), "n": np.array(8, np.int64)}
    arrays.update(changes)
    return _record(**{k: v for k, v in arrays.items() if v is not None})


def _reply(src: int, arrays: ArrayRecord | None, metrics: dict | None = None, error: str | None = None) -> Message:
    if error:
        return message(src, error=error)
    return reply(src, arrays, metrics or {"num-examples": 10, "loss": 0.5})


@pytest.mark.parametrize(
    "update, expected",
    [
        (_update(1.0), []),
        (_update(1.0, w=np.array([[1.0, np.nan, 0], [0, 0, 0]], np.float32)), ["non-finite values in: w"]),
        (_update(1.0, b=np.array([np.inf, 0, 0], np.float32)), ["non-finite values in: b"]),
        (_update(1.0, w=np.ones((3, 2), np.float32)), ["wrong shapes: w (3, 2) != (2, 3)"]),
        (_update(1.0, w=np.ones((2, 3), np.float64)), ["wrong dtypes: w float64 != float32"]),
        (_update(1.0, n=np.array(8.0, np.float32)), ["wrong dtypes: n float32 != int64"]),
        (_update(1.0, b=None), ["missing entries: b"]),
        (_update(1.0, extra=np.ones(1, np.float32)), ["unexpected entries: extra"]),
    ],
    ids=["ok", "nan", "inf", "shape", "dtype-float", "dtype-int", "missing", "unexpected"],
)
def test_update_problems_names_the_entry_and_the_problem(update, expected):
    assert update_problems(update, _record(**GLOBAL)) == expected


def test_reply_problems_rejects_non_finite_metrics_and_missing_arrays():
    ref = _record(**GLOBAL)
    assert reply_problems(_reply(1, _update(1.0), {"num-examples": 3, "loss": float("nan")}), ref) == [
        "non-finite metrics: loss"
    ]
    assert "expected one ArrayRecord" in reply_problems(_reply(1, None), ref)[0]


def _strategy(cls=SiteFedAvg, sites=None, train=("A", "B", "C"), **kwargs):
    sites = sites or {1: "A", 2: "B", 3: "C"}
    kwargs.setdefault("min_fraction", 0.5)
    strategy = cls(
        node_sites=sites, train_sites=train, min_train_nodes=1, min_available_nodes=1, min_evaluate_nodes=1, **kwargs
    )
    strategy._sent = _record(**GLOBAL)  # what configure_train sent this round
    return strategy


def test_bad_updates_are_rejected_logged_and_the_round_goes_on(caplog):
    strategy = _strategy()
    replies = [
        _reply(1, _update(1.0)),
        _reply(2, _update(3.0)),
        _reply(3, _update(1.0, w=np.full((2, 3), np.nan, np.float32))),
    ]
    with caplog.at_level("WARNING", logger="strategies.site_aware"):
        arrays, _ = strategy.aggregate_train(1, replies)
    # C's NaN update is dropped: the mean of A (1.0) and B (3.0), both with 10 examples
    np.testing.assert_array_equal(arrays["w"].numpy(), np.full((2, 3), 2.0, np.float32))
    assert arrays["n"].numpy().dtype == np.int64
    assert strategy.rejected_updates == {1: {"C": ["non-finite values in: w"]}}
    assert strategy.missing_sites == {1: {"train": ["C"]}}
    assert "rejected the update of site C" in caplog.text
    assert set(strategy.train_metrics[1]) == {"A", "B"}


def test_round_below_the_minimum_fraction_fails_and_names_the_missing_sites():
    strategy = _strategy(min_fraction=0.75)  # needs ceil(0.75 * 3) = 3 sites
    replies = [_reply(1, _update(1.0)), _reply(2, _update(1.0)), _reply(3, None, error="SiteStepError: train/detector")]
    with pytest.raises(RoundIncompleteError, match=r"2 of 3 sites replied.*minimum 3.*missing: \['C'\]"):
        strategy.aggregate_train(1, replies)
    ok = _strategy(min_fraction=0.5)  # needs 2
    arrays, _ = ok.aggregate_train(1, replies)
    assert arrays is not None and ok.missing_sites == {1: {"train": ["C"]}}


def test_evaluation_records_missing_sites_without_failing():
    strategy = _strategy(min_fraction=1.0)
    replies = [_reply(1, None, {"num-examples": 4, "acc": 0.5}), _reply(2, None, error="node unavailable")]
    strategy.aggregate_evaluate(2, replies)
    assert strategy.missing_sites == {2: {"evaluate": ["B", "C"]}}
    assert set(strategy.site_metrics[2]) == {"A"}


class _Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


def test_the_wait_for_nodes_before_a_round_is_bounded():
    strategy = _strategy(min_fraction=1.0, node_wait_timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(RoundIncompleteError, match=r"only 2 of 3 sites connected.*missing: \['B'\]"):
        strategy.configure_train(1, _record(**GLOBAL), ConfigRecord({}), _Grid([1, 3]))
    assert time.monotonic() - t0 < 5
    ok = _strategy(min_fraction=0.5, node_wait_timeout_s=0.5)
    messages = ok.configure_train(1, _record(**GLOBAL), ConfigRecord({}), _Grid([1, 3]))
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 3]


@pytest.mark.parametrize(
    "name, cls", [("fedmedian", SiteFedMedian), ("fedtrimmedavg", SiteFedTrimmedAvg), ("krum", SiteKrum)]
)
def test_robust_strategies_are_built_by_name(name, cls):
    strategy = build_strategy(
        name,
        proximal_mu=0.0,
        node_sites={1: "A", 2: "B", 3: "C", 4: "D"},
        train_sites=["A", "B", "C", "D"],
        min_fraction=0.5,
        krum_byzantine=0,
    )
    assert isinstance(strategy, cls)
    assert strategy.min_train_nodes == 2 and strategy.min_available_nodes == 2


def test_fedmedian_ignores_one_outlier_that_fedavg_follows():
    def replies():  # fresh records for each strategy (Flower's aggregation consumes them)
        return [_reply(i + 1, _update(v)) for i, v in enumerate((1.0, 2.0, 1000.0))]

    no_norm_rule = dict(clip_factor=1e9, reject_factor=1e9)  # the aggregation alone (the norm rule would drop it)
    med_arrays, _ = _strategy(SiteFedMedian, **no_norm_rule).aggregate_train(1, replies())
    avg_arrays, _ = _strategy(SiteFedAvg, **no_norm_rule).aggregate_train(1, replies())
    np.testing.assert_allclose(med_arrays["w"].numpy(), 2.0)
    assert float(avg_arrays["w"].numpy().max()) > 300


def test_krum_selects_an_update_from_the_cluster():
    updates = [_update(1.0), _update(1.1), _update(0.9), _update(500.0)]
    strategy = _strategy(
        SiteKrum, sites={1: "A", 2: "B", 3: "C", 4: "D"}, train=("A", "B", "C", "D"), num_malicious_nodes=1
    )
    arrays, _ = strategy.aggregate_train(1, [_reply(i + 1, u) for i, u in enumerate(updates)])
    assert 0.9 <= float(arrays["w"].numpy().max()) <= 1.1


def test_unknown_strategy_lists_the_robust_ones():
    with pytest.raises(ValueError, match="fedmedian, fedtrimmedavg, krum"):
        build_strategy("bulyan", proximal_mu=0.0, node_sites={1: "A"}, train_sites=["A"])
