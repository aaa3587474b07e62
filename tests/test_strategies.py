"""Site-aware strategies: dtype-preserving FedAvg/FedProx aggregation, train-site filtering, metric capture."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from shared_models.detection import YOLOX3D
from shared_models.stager import MulDenseNet3D
from strategies.site_aware import SiteFedAvg, SiteFedProx, build_strategy, restore_dtypes
from tests.flower_messages import reply

pytestmark = pytest.mark.usefixtures("task_identity")


def _tiny_models():
    from shared_models.specs import DetectorConfig
    from shared_models.stager import StagerConfig

    return [
        YOLOX3D(DetectorConfig(widths=(4, 8, 8, 16), depths=(1, 1, 1), head_width=8)),
        MulDenseNet3D(StagerConfig(init_features=8, growth_rate=4, block_config=(1, 1), pool_scales=(1, 2))),
    ]


@pytest.mark.parametrize("model", _tiny_models(), ids=["detector", "stager"])
def test_arrayrecord_round_trip_keeps_every_entry_and_dtype(model):
    # make integer buffers non-trivial
    model.train()
    with torch.no_grad():
        model(torch.rand(2, 1, 32, 112, 64) if isinstance(model, YOLOX3D) else torch.rand(2, 1, 16, 16, 16))
    state = model.state_dict()
    back = ArrayRecord(state).to_torch_state_dict()
    assert list(back) == list(state)
    for key, value in state.items():
        assert back[key].dtype == value.dtype, key
        assert torch.equal(back[key], value), key
    assert any(v.dtype == torch.int64 for v in state.values())  # BatchNorm num_batches_tracked travels


def test_restore_dtypes_rounds_integer_buffers():
    ref = ArrayRecord({"w": torch.zeros(2), "n": torch.tensor(3, dtype=torch.int64)})
    agg = ArrayRecord(
        {"w": torch.tensor([0.5, 1.5], dtype=torch.float64), "n": torch.tensor([4.6], dtype=torch.float64)}
    )
    out = restore_dtypes(agg, ref).to_torch_state_dict()
    assert out["w"].dtype == torch.float32 and out["n"].dtype == torch.int64
    assert int(out["n"]) == 5
    assert out["n"].shape == () and out["w"].shape == (2,)  # the weighted mean's (1,) is back to 0-d


def _state(w: float, n: int):
    return {"w": torch.full((3,), w), "bn.num_batches_tracked": torch.tensor(n, dtype=torch.int64)}


@pytest.mark.parametrize("cls", [SiteFedAvg, SiteFedProx])
def test_weighted_mean_with_dtypes_intact(cls):
    node_sites = {11: "A", 12: "B"}
    strategy = cls(node_sites=node_sites, train_sites=["A", "B"])
    replies = [
        reply(11, ArrayRecord(_state(1.0, 10)), {"num-examples": 3, "train-loss": 1.0}),
        reply(12, ArrayRecord(_state(5.0, 20)), {"num-examples": 1, "train-loss": 3.0}),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    out = arrays.to_torch_state_dict()
    # independent value: (3*1 + 1*5) / 4 = 2.0 ; (3*10 + 1*20) / 4 = 12.5 -> rounds to 12 (banker's) or 13
    assert out["w"].dtype == torch.float32
    np.testing.assert_allclose(out["w"].numpy(), 2.0, rtol=1e-6)
    assert out["bn.num_batches_tracked"].dtype == torch.int64
    assert int(out["bn.num_batches_tracked"]) == int(np.rint(12.5))
    assert strategy.train_metrics[1]["A"]["train-loss"] == 1.0


def test_fedprox_with_mu_zero_aggregates_exactly_like_fedavg():
    node_sites = {1: "A", 2: "B"}
    rng = np.random.default_rng(0)
    states = [{"w": torch.from_numpy(rng.normal(size=(4, 4)).astype(np.float32))} for _ in range(2)]

    def replies():
        return [
            reply(1, ArrayRecord(states[0]), {"num-examples": 7}),
            reply(2, ArrayRecord(states[1]), {"num-examples": 2}),
        ]

    a, _ = SiteFedAvg(node_sites=node_sites, train_sites=["A", "B"]).aggregate_train(1, replies())
    p, _ = SiteFedProx(proximal_mu=0.0, node_sites=node_sites, train_sites=["A", "B"]).aggregate_train(1, replies())
    assert torch.equal(a.to_torch_state_dict()["w"], p.to_torch_state_dict()["w"])


def test_evaluate_metrics_captured_per_site_and_failures_tolerated():
    strategy = SiteFedAvg(node_sites={1: "A", 2: "B"}, train_sites=["A"])
    ok = reply(1, None, {"num-examples": 4, "iou-mean": 0.5})
    ok2 = reply(2, None, {"num-examples": 0, "iou-mean": 0.0})
    agg = strategy.aggregate_evaluate(2, [ok, ok2])
    assert strategy.site_metrics[2]["A"]["iou-mean"] == 0.5
    assert strategy.site_metrics[2]["B"]["num-examples"] == 0
    assert agg["iou-mean"] == pytest.approx(0.5)  # weighted by examples: B has none


def test_round_offset_and_train_site_filter():
    class FakeGrid:
        def get_node_ids(self):
            return [1, 2, 3]

    strategy = build_strategy(
        "fedprox", proximal_mu=0.1, node_sites={1: "A", 2: "B", 3: "C"}, train_sites=["A", "C"], round_offset=5
    )
    from flwr.app import ConfigRecord

    msgs = list(
        strategy.configure_train(1, ArrayRecord({"w": torch.zeros(1)}), ConfigRecord({"phase": "stager"}), FakeGrid())
    )
    assert sorted(m.metadata.dst_node_id for m in msgs) == [1, 3]
    assert msgs[0].content["config"]["server-round"] == 6
    assert msgs[0].content["config"]["proximal-mu"] == pytest.approx(0.1)
    evals = list(
        strategy.configure_evaluate(
            1, ArrayRecord({"w": torch.zeros(1)}), ConfigRecord({"phase": "stager"}), FakeGrid()
        )
    )
    assert sorted(m.metadata.dst_node_id for m in evals) == [1, 2, 3]


def test_every_run_config_strategy_builds():
    from shared_models.config import STRATEGIES

    expected = {
        "fedavg": "SiteFedAvg",
        "fedprox": "SiteFedProx",
        "fedbn": "SiteFedAvg",  # FedAvg on the server; the norms stay local at the sites
        "fedmedian": "SiteFedMedian",
        "fedtrimmedavg": "SiteFedTrimmedAvg",
        "krum": "SiteKrum",
    }
    assert set(STRATEGIES) == set(expected)
    sites = {i: s for i, s in enumerate("ABCDE", start=1)}  # 5 training sites: Krum with f = 1 needs n > 4
    for name in STRATEGIES:
        strategy = build_strategy(name, proximal_mu=0.1, node_sites=sites, train_sites=list(sites.values()))
        assert type(strategy).__name__ == expected[name], name


def test_unknown_strategy_is_an_error():
    with pytest.raises(ValueError, match="fedsgd"):
        build_strategy("fedsgd", proximal_mu=0.0, node_sites={1: "A"}, train_sites=["A"])
