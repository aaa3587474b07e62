"""Issue 16: one site cannot move the federation beyond a stated bound (rows 3, 4, 5, 6 and 9).

Each test plays the attack of its row against the real strategy classes (or the real site
functions for row 9) and derives the expected result independently of the code under test.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

from server.server_app import validation_score
from shared_models.config import RunConfig
from shared_models.flower.records import state_to_record
from shared_models.transfer import pack_state_dict
from strategies.site_aware import SiteFedAvg, SiteFedMedian, SiteFedTrimmedAvg, SiteKrum, build_strategy
from strategies.update_checks import MAX_ABS_WEIGHT, bound_update_norms
from tests.conftest import tiny_run_config
from tests.flower_messages import message, reply

pytestmark = pytest.mark.usefixtures("task_identity")

SITES = {1: "A", 2: "B", 3: "C", 4: "D"}
RNG = np.random.default_rng(0)
GLOBAL_W = RNG.normal(0, 0.1, 200).astype(np.float32)
GLOBAL_N = np.array([7, 7], np.int64)  # two BatchNorm num_batches_tracked, packed
STEPS = 10  # local steps per round: the most an integer buffer can move
U = RNG.normal(0, 0.01, 200).astype(np.float32)  # the honest direction of this round


def _record(w: np.ndarray, n: np.ndarray = GLOBAL_N + STEPS) -> ArrayRecord:
    return ArrayRecord(
        {
            "packed:float": Array(np.ascontiguousarray(w, np.float32)),
            "packed:int64": Array(np.ascontiguousarray(n, np.int64)),
        }
    )


def _honest(i: int) -> np.ndarray:
    return GLOBAL_W + U * (1.0 + 0.1 * i) + np.random.default_rng(i).normal(0, 0.001, 200).astype(np.float32)


DECLARED = {s: {"heads-train": 20, "heads-val": 6, "heads-test": 6} for s in SITES.values()}


def _strategy(cls=SiteFedAvg, **kwargs):
    kwargs.setdefault("max_int_delta", STEPS)
    strategy = cls(
        node_sites=SITES,
        train_sites=set(SITES.values()),
        min_train_nodes=1,
        min_available_nodes=1,
        min_evaluate_nodes=1,
        min_fraction=0.5,
        declared=DECLARED,
        **kwargs,
    )
    strategy._sent = _record(GLOBAL_W, GLOBAL_N)
    return strategy


def _round(strategy, attack: ArrayRecord | None, attack_metrics: dict | None = None):
    replies = [reply(i + 1, _record(_honest(i)), {"num-examples": 20, "train-loss": 0.5}) for i in range(3)]
    if attack is not None:
        replies.append(reply(4, attack, attack_metrics or {"num-examples": 20, "train-loss": 0.5}))
    arrays, _ = strategy.aggregate_train(1, replies)
    return arrays["packed:float"].numpy(), arrays["packed:int64"].numpy()


def _honest_mean() -> np.ndarray:
    return np.mean([_honest(i) for i in range(3)], axis=0)


# ----------------------------------------------------------------------------- row 3: poisoned updates

ATTACKS = {
    "huge-1e30": lambda: _record(np.full(200, 1e30, np.float32)),
    "sign-flip-x10": lambda: _record(GLOBAL_W - 10 * (_honest(3) - GLOBAL_W)),
    "random-weights": lambda: _record(np.random.default_rng(9).normal(0, 1, 200).astype(np.float32)),
    "int-buffer-2^62": lambda: _record(_honest(3), np.array([2**62, 7 + STEPS], np.int64)),
}


@pytest.mark.parametrize("attack", sorted(ATTACKS))
@pytest.mark.parametrize("cls", [SiteFedAvg, SiteFedMedian, SiteFedTrimmedAvg], ids=["fedavg", "fedmedian", "trimmed"])
def test_row3_poisoned_update_is_rejected_and_the_model_is_the_honest_mean(attack, cls, caplog):
    kwargs = {"beta": 0.25} if cls is SiteFedTrimmedAvg else {}
    strategy = _strategy(cls, **kwargs)
    with caplog.at_level("WARNING", logger="strategies.site_aware"):
        w, n = _round(strategy, ATTACKS[attack]())
    assert list(strategy.rejected_updates[1]) == ["D"]
    assert "rejected the update of site D" in caplog.text
    honest = np.stack([_honest(i) for i in range(3)])
    expected = {SiteFedAvg: honest.mean(0), SiteFedMedian: np.median(honest, 0), SiteFedTrimmedAvg: honest.mean(0)}[
        cls
    ]  # 3 left: int(0.25 x 3) = 0 trimmed
    np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(n, GLOBAL_N + STEPS)


def test_row3_each_attack_names_its_reason():
    reasons = {}
    for name, make in ATTACKS.items():
        strategy = _strategy()
        _round(strategy, make())
        reasons[name] = " ".join(strategy.rejected_updates[1]["D"])
    assert f"values above {MAX_ABS_WEIGHT:g} in: packed:float" in reasons["huge-1e30"]
    assert (
        "integer entries moved by more than 10: packed:int64 (moved 4611686018427387897)" in reasons["int-buffer-2^62"]
    )
    for name in ("sign-flip-x10", "random-weights"):
        assert "update norm" in reasons[name] and "x the round's median" in reasons[name]


def test_row3_update_between_clip_and_reject_is_clipped_to_the_bound():
    attack = GLOBAL_W + 3.0 * (_honest(3) - GLOBAL_W)  # 3x an honest update: above 2x, below 4x the median
    norms = [float(np.linalg.norm((_honest(i) - GLOBAL_W).astype(np.float64))) for i in range(3)]
    attack_norm = float(np.linalg.norm((attack - GLOBAL_W).astype(np.float64)))
    bound = 2.0 * float(np.median(norms + [attack_norm]))
    assert 2.0 * bound / 2.0 < attack_norm < 4.0 * bound / 2.0
    clipped = GLOBAL_W.astype(np.float64) + (attack - GLOBAL_W).astype(np.float64) * (bound / attack_norm)
    expected = (sum(_honest(i).astype(np.float64) for i in range(3)) + clipped) / 4
    strategy = _strategy()
    w, _ = _round(strategy, _record(attack))
    np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-6)
    assert strategy.rejected_updates == {}


def test_norm_rule_keeps_clips_and_rejects_by_the_median():
    # median of (1, 1, 3, 10) = 2: bound 4 (clip), 8 (reject)
    assert bound_update_norms([1, 1, 3, 10], clip_factor=2, reject_factor=4) == [
        ("keep", 1.0),
        ("keep", 1.0),
        ("keep", 1.0),
        ("reject", 0.0),
    ]
    assert bound_update_norms([1, 1, 3, 1], clip_factor=2, reject_factor=4) == [  # median 1
        ("keep", 1.0),
        ("keep", 1.0),
        ("clip", 2 / 3),
        ("keep", 1.0),
    ]
    assert bound_update_norms([0, 0, 0], clip_factor=2, reject_factor=4) == [("keep", 1.0)] * 3
    with pytest.raises(ValueError, match="clip_factor <= reject_factor"):
        bound_update_norms([1], clip_factor=3, reject_factor=2)


def test_row3_real_model_int_buffer_is_bounded_by_the_local_steps():
    from shared_models.stager import MulDenseNet3D, StagerConfig

    model = MulDenseNet3D(StagerConfig(init_features=4, growth_rate=2, block_config=(1, 1), pool_scales=(1,)))
    state = model.state_dict()
    sent = {k: Array(v) for k, v in pack_state_dict(state).items()}
    strategy = _strategy(max_int_delta=STEPS)
    strategy._sent = ArrayRecord(sent)
    honest = {k: (v + STEPS if not v.is_floating_point() else v + 0.01) for k, v in state.items()}
    poisoned = dict(honest)
    key = next(k for k in state if k.endswith("num_batches_tracked"))
    poisoned[key] = torch.tensor(2**62)
    replies = [
        reply(i + 1, ArrayRecord({k: Array(v) for k, v in pack_state_dict(honest).items()}), {"num-examples": 20})
        for i in range(3)
    ]
    replies.append(
        reply(4, ArrayRecord({k: Array(v) for k, v in pack_state_dict(poisoned).items()}), {"num-examples": 20})
    )
    arrays, _ = strategy.aggregate_train(1, replies)
    assert "integer entries moved" in strategy.rejected_updates[1]["D"][0]
    assert int(arrays["packed:int64"].numpy().max()) == STEPS


# ----------------------------------------------------------------------------- row 4: num-examples


def test_row4_num_examples_is_capped_at_the_declared_training_heads(caplog):
    # D's update is honest-sized (3x U would be clipped, so use an honest one) but it claims 1e9 examples
    other = GLOBAL_W + U * 1.2
    with caplog.at_level("WARNING", logger="strategies.site_aware"):
        w, _ = _round(_strategy(), _record(other), {"num-examples": 10**9, "train-loss": 0.5})
    # capped at heads-train = 20: an equal-weight mean of the four
    expected = (sum(_honest(i).astype(np.float64) for i in range(3)) + other) / 4
    np.testing.assert_allclose(w, expected, rtol=1e-5, atol=1e-6)
    assert (
        "site D reported more heads than it declared: num-examples 1000000000 capped at the declared 20" in caplog.text
    )


def test_row4_non_integer_or_negative_counts_are_rejected():
    for bad in (1e9, -5):
        strategy = _strategy()
        _round(strategy, _record(GLOBAL_W + U), {"num-examples": bad})
        assert (
            "num-examples" in strategy.rejected_updates[1]["D"][0]
            and "is not a count" in strategy.rejected_updates[1]["D"][0]
        )


# ----------------------------------------------------------------------------- row 5: scores


def _eval(src: int, **m) -> Message:
    base = {"num-examples": 6, "iou-mean": 0.5, "val-num-examples": 6, "val-score": 0.5}
    return reply(src, None, {**base, **m}, message_type="evaluate")


def test_row5_out_of_range_val_score_is_rejected_and_cannot_pick_the_round(caplog):
    strategy = _strategy()
    with caplog.at_level("WARNING", logger="strategies.site_aware"):
        strategy.aggregate_evaluate(
            1, [_eval(1, **{"val-score": 0.4}), _eval(2, **{"val-score": 0.6}), _eval(4, **{"val-score": 1e6})]
        )
    assert set(strategy.site_metrics[1]) == {"A", "B"}
    assert "rejected the evaluate reply of site D: val-score = 1e+06 outside [0, 1]" in caplog.text
    assert strategy.rejected_updates[1]["D"] == ["evaluate: val-score = 1e+06 outside [0, 1]"]
    assert validation_score(strategy.site_metrics[1]) == pytest.approx(0.5)


def test_row5_validation_count_is_capped_so_one_site_cannot_outweigh_the_others():
    strategy = _strategy()
    strategy.aggregate_evaluate(
        1,
        [
            _eval(1, **{"val-score": 0.2}),
            _eval(2, **{"val-score": 0.2}),
            _eval(4, **{"val-score": 0.9, "val-num-examples": 10**9}),
        ],
    )
    assert strategy.site_metrics[1]["D"]["val-num-examples"] == 6  # heads-val declared
    assert validation_score(strategy.site_metrics[1]) == pytest.approx((0.2 + 0.2 + 0.9) / 3)


@pytest.mark.parametrize(
    "metrics, reason",
    [
        ({"iou-mean": 1.5}, "iou-mean = 1.5 outside [0, 1]"),
        ({"macro-auc": -0.1}, "macro-auc = -0.1 outside [0, 1]"),
        ({"center-error-mm": -3.0}, "center-error-mm = -3 is negative"),
        (
            {"num-examples": 10**9, "confusion": [10**9, 0, 0, 0, 0, 0, 0, 0, 0]},
            "confusion matrix holds 1000000000 heads, num-examples says 6",
        ),
        (
            {"confusion": [6, 0, 0, 0, 0, 0, 0, 0, 0], "hist-pos-0": [-1, 7]},
            "negative or non-integer values: hist-pos-0",
        ),
        ({"iou-hist": [5, 5]}, "iou-hist holds 10 heads, more than num-examples 6"),
        ({"hist-pos-0": [1, 1], "hist-neg-0": [1, 1]}, "hist-pos-0 and hist-neg-0 hold 4 heads, num-examples says 6"),
    ],
    ids=["iou", "auc", "mm", "count-vs-declared", "negative-hist", "hist-sum", "pos-neg"],
)
def test_row5_metrics_out_of_range_reject_the_reply(metrics, reason):
    strategy = _strategy()
    strategy.aggregate_evaluate(1, [_eval(1), _eval(4, **metrics)])
    assert "D" not in strategy.site_metrics[1]
    assert reason in " ".join(strategy.rejected_updates[1]["D"])


# ----------------------------------------------------------------------------- row 6: robust strategies


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"strategy": "fedtrimmedavg", "trimmed-beta": 0.2, "train-sites": "A,B,C,D"}, "trims int(0.2 x 4) = 0"),
        ({"strategy": "fedtrimmedavg", "trimmed-beta": 0.5, "train-sites": "A,B,C,D"}, "must be in [0, 0.5)"),
        ({"strategy": "krum", "krum-byzantine": 1, "train-sites": "A,B,C,D"}, r"only with more than 4 training sites"),
        ({"strategy": "fedmedian", "train-sites": "A,B"}, "fedmedian needs at least 3 training sites"),
        ({"strategy": "krum", "krum-byzantine": 0, "train-sites": "A,B"}, r"more than 2 training sites"),
    ],
    ids=["trimmed-4", "trimmed-beta", "krum-4", "median-2", "krum-2"],
)
def test_row6_too_small_federation_is_refused_before_the_run(overrides, message):
    with pytest.raises(
        ValueError,
        match=r"run config 'strategy': .*" + message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\["),
    ):
        RunConfig.from_run_config(tiny_run_config(**overrides))


def test_row6_parameters_come_from_the_run_config():
    from server.server_app import influence_bounds

    cfg = RunConfig.from_run_config(
        tiny_run_config(
            **{"strategy": "fedtrimmedavg", "trimmed-beta": 0.3, "train-sites": "A,B,C,D", "detector-local-steps": 7}
        )
    )
    strategy = build_strategy(
        cfg.strategy,
        proximal_mu=0.0,
        node_sites=SITES,
        train_sites=cfg.train_sites,
        **influence_bounds(cfg, "detector", DECLARED),
    )
    assert isinstance(strategy, SiteFedTrimmedAvg) and strategy.beta == 0.3 and strategy.max_int_delta == 7
    cfg = RunConfig.from_run_config(
        tiny_run_config(
            **{"strategy": "krum", "krum-byzantine": 1, "site-ids": "A,B,C,D,E", "train-sites": "A,B,C,D,E"}
        )
    )
    strategy = build_strategy(
        cfg.strategy,
        proximal_mu=0.0,
        node_sites={**SITES, 5: "E"},
        train_sites=cfg.train_sites,
        **influence_bounds(cfg, "stager", None),
    )
    assert isinstance(strategy, SiteKrum) and strategy.num_malicious_nodes == 1
    with pytest.raises(ValueError, match="fedmedian needs at least 3"):
        build_strategy("fedmedian", proximal_mu=0.0, node_sites={1: "A", 2: "B"}, train_sites=["A", "B"])


def test_row6_trimmed_mean_at_four_sites_trims_the_outlier_coordinate():
    strategy = _strategy(SiteFedTrimmedAvg, beta=0.25, clip_factor=1e9, reject_factor=1e9)  # aggregation alone
    attack = GLOBAL_W + 1.5 * U  # passes the norm rule anyway; trimmed mean drops the extremes per coordinate
    w, _ = _round(strategy, _record(attack))
    stack = np.sort(np.stack([_honest(i) for i in range(3)] + [attack]), axis=0)
    np.testing.assert_allclose(w, stack[1:3].mean(0), rtol=1e-6)


# ----------------------------------------------------------------------------- row 9: small cells


@pytest.fixture(scope="module")
def one_patient_test_split(tmp_path_factory):
    """Phantom sites A (a test split of exactly one patient) and B (6 test heads), ground-truth crops."""
    import csv
    import dataclasses

    from sim.phantoms import PROFILES, generate_phantoms

    quick = PROFILES["quick"]
    profile = dataclasses.replace(
        quick,
        name="micro-cell",
        heads_per_site={"A": 6, "B": 6},
        patients_per_site={"A": 4, "B": 4},
        scanners={s: quick.scanners[s] for s in ("A", "B")},
        external_groups={"external-1": ("B",)},
    )
    root = tmp_path_factory.mktemp("cells")
    generate_phantoms(root, profile, seed=5, workers=1)
    with open(root / "A" / "manifest.csv") as fh:
        patients = sorted({row["patient_id"] for row in csv.DictReader(fh)})
    with open(root / "A" / "split.csv", "w", newline="") as fh:  # one patient each in test and val
        fh.write("patient_id,split\n")
        for i, p in enumerate(patients):
            fh.write(f"{p},{'test' if i == 0 else 'val' if i == 1 else 'train'}\n")
    return root, patients[0]


def test_row9_one_patient_test_split_leaves_nothing_of_that_patient_in_report_or_bundle(
    one_patient_test_split, tmp_path
):
    import json

    from client import tasks
    from server.report import build_report
    from server.report_html import write_report_html
    from shared_models.bundle import generate_signing_key, write_bundle
    from shared_models.detection import YOLOX3D
    from shared_models.stager import MulDenseNet3D

    root, patient = one_patient_test_split
    cfg = RunConfig.from_run_config(
        tiny_run_config(
            **{
                "data-root": str(root),
                "site-ids": "A,B",
                "train-sites": "A",
                "report-groups": "A-test=A;all=A,B",
                "cache-dir": str(tmp_path / "cache"),
                "crop-source": "ground-truth",
                "min-cell-heads": 5,
            }
        )
    )
    assert cfg.min_cell_heads == 5
    sites = {s: tasks.open_site(cfg, s, root / s) for s in ("A", "B")}
    a_test = sites["A"].heads_in("test")
    assert 1 <= len(a_test) <= 2 and {h.patient_id for h in a_test} == {patient}  # the precondition: one patient
    torch.manual_seed(0)
    detector, stager = YOLOX3D(cfg.detector).state_dict(), MulDenseNet3D(cfg.stager).state_dict()
    key = {tasks.make_crops(site, cfg, None)[0] for site in sites.values()}.pop()

    # what each site sends (client side), through the real strategy (server side)
    sent, raw = {}, {}
    for phase, state in (("detector", detector), ("stager", stager)):
        raw[phase] = {s: tasks.evaluate(site, cfg, phase, state, key) for s, site in sites.items()}
        sent[phase] = {s: tasks.suppress_small_cells(m, cfg.min_cell_heads) for s, m in raw[phase].items()}
    assert sent["stager"]["A"] == {
        "num-examples": len(a_test),
        "suppressed": 1,
        "val-num-examples": raw["stager"]["A"]["val-num-examples"],
        "val-suppressed": 1,
    }
    assert sent["stager"]["B"] == raw["stager"]["B"]  # 6 heads: sent whole
    history = {}
    for phase in ("detector", "stager"):
        strategy = _strategy()
        strategy.node_sites = {1: "A", 2: "B"}
        strategy.declared = {}
        strategy.aggregate_evaluate(
            1, [reply(i + 1, None, sent[phase][s], message_type="evaluate") for i, s in enumerate("AB")]
        )
        history[phase] = strategy.site_metrics
    assert set(history["detector"][1]) == set(history["stager"][1]) == {"A", "B"}  # real replies pass the checks
    assert validation_score(history["stager"][1]) is None  # A's validation score was withheld as well
    report = build_report(
        strategy="fedavg",
        proximal_mu=0.0,
        rounds={"detector": 1, "stager": 1},
        stager_history=history["stager"],
        detector_history=history["detector"],
        selected_rounds={"detector": 1, "stager": 1},
        stager_train={},
        detector_train={},
        groups=cfg.report_groups,
        train_sites=cfg.train_sites,
        crop_source=cfg.crop_source,
        wall_time_s=1.0,
        min_cell_heads=cfg.min_cell_heads,
    )
    bundle = write_bundle(
        tmp_path / "bundle",
        detector_state=detector,
        stager_state=stager,
        detector_config=cfg.detector,
        stager_config=cfg.stager,
        spec=cfg.spec,
        metrics=report,
        run_config={},
        signing_key=generate_signing_key(tmp_path / "key.pem"),
    )
    html = write_report_html(report, tmp_path / "html").read_text()

    # nothing of A's test patient: no confusion matrix, histogram, score or figure for A
    assert report["sites"]["A-test"] == {"n": 0, "sites": ["A"], "missing": [], "suppressed": {"A": len(a_test)}}
    assert "A" not in report["per_site"]
    assert report["detector"]["A"] == {"n": len(a_test), "suppressed": True}
    for name in ("detector_iou_mean", "stager_macro_auc", "detector_val_iou", "stager_val_macro_auc"):
        assert report["history"][name].get(1, {}).get("A") is None
    assert bundle == tmp_path / "bundle"
    metrics_json = json.loads((tmp_path / "bundle" / "metrics.json").read_text())
    assert metrics_json["sites"]["A-test"]["suppressed"] == {"A": len(a_test)}
    assert "counts" not in metrics_json["sites"]["A-test"] and "A" not in metrics_json["per_site"]
    assert "suppressed (&lt; 5 heads)" in html or "suppressed (< 5 heads)" in html

    # the pooled group "all" = A (suppressed) + B is exactly B's own figures: exact for what was sent
    from server.report import group_stage_metrics

    b_alone = group_stage_metrics(history["stager"][1], {"b": ("B",)})["b"]
    pooled = report["sites"]["all"]
    assert pooled["n"] == raw["stager"]["B"]["num-examples"] == b_alone["n"]
    assert pooled["suppressed"] == {"A": len(a_test)}
    assert pooled["counts"]["confusion"] == [list(map(int, r)) for r in np.asarray(b_alone["counts"]["confusion"])]
    assert pooled["macro"] == pytest.approx(json.loads(json.dumps(b_alone["macro"], default=float)), nan_ok=True)


def _site_message(message_type: str, content: RecordDict) -> Message:
    return message(1, content, message_type=message_type, dst=5, message_id=f"m-{time.monotonic_ns()}", reply_to="")


def test_row9_deployed_site_keeps_its_own_floor_cache_and_audit_log(one_patient_test_split, tmp_path, caplog):
    """A deployed site (node config ``data-path``) through the real handlers: the coordinator's run
    config says ``min-cell-heads = 1`` and ``cache-dir = <its choice>``; the one-patient test split is
    still suppressed at the site's floor (default 5), and the cache and audit log stay under the data."""
    from flwr.app import ConfigRecord, Context

    from client import client_app
    from client.audit import verify_audit_log
    from shared_models.stager import MulDenseNet3D

    root, _ = one_patient_test_split
    coordinator_cache = tmp_path / "coordinator-chosen"
    run_config = tiny_run_config(
        **{
            "data-root": str(root),
            "site-ids": "A,B",
            "train-sites": "A",
            "report-groups": "A-test=A;all=A,B",
            "cache-dir": str(coordinator_cache),
            "crop-source": "ground-truth",
            "min-cell-heads": 1,
        }
    )
    context = Context(
        run_id=1,
        node_id=5,
        node_config={"site-id": "A", "data-path": str(root / "A")},
        state=RecordDict(),
        run_config=run_config,
    )
    cfg = RunConfig.from_run_config(run_config)
    assert cfg.min_cell_heads == 1  # what the coordinator asked for

    with caplog.at_level("WARNING", logger="client.client_app"):
        crops = client_app.query(
            _site_message("query", RecordDict({"config": ConfigRecord({"action": "crops"})})), context
        )
    key = str(crops.content["site"]["crops-key"])
    torch.manual_seed(0)
    stager = state_to_record(MulDenseNet3D(cfg.stager).state_dict(), cfg)
    reply = client_app.evaluate(
        _site_message(
            "evaluate",
            RecordDict(
                {"arrays": stager, "config": ConfigRecord({"phase": "stager", "crops-key": key, "server-round": 1})}
            ),
        ),
        context,
    )
    metrics = dict(reply.content["metrics"])
    # the test split (one patient) and the validation split (one patient) are both below the floor of 5
    assert metrics["suppressed"] == 1 and metrics["val-suppressed"] == 1
    assert set(metrics) == {"num-examples", "suppressed", "val-num-examples", "val-suppressed"}
    assert 1 <= metrics["num-examples"] < 5
    # the same handler in simulation trusts the run config (1): nothing is suppressed there
    sim = Context(
        run_id=1,
        node_id=5,
        node_config={"partition-id": 0, "num-partitions": 2},
        state=RecordDict(),
        run_config=run_config,
    )
    client_app.query(_site_message("query", RecordDict({"config": ConfigRecord({"action": "crops"})})), sim)
    sim_reply = client_app.evaluate(
        _site_message(
            "evaluate",
            RecordDict(
                {"arrays": stager, "config": ConfigRecord({"phase": "stager", "crops-key": key, "server-round": 1})}
            ),
        ),
        sim,
    )
    assert "suppressed" not in sim_reply.content["metrics"] and "confusion" in sim_reply.content["metrics"]
    assert (coordinator_cache / "A" / "audit.jsonl").is_file()  # the simulated site used the run config's cache

    # deployment: crops, audit log and nothing else where the coordinator pointed
    site_cache = root / "A" / ".onfh-cache"
    assert (site_cache / "crops" / f"{key}.npz").is_file()
    assert verify_audit_log(site_cache / "audit.jsonl") == 2
    assert sorted(p.name for p in coordinator_cache.iterdir()) == ["A"]  # only the simulated run's folder
    assert sum("cache-dir is ignored" in r.getMessage() for r in caplog.records) == 1

    # a crops-key that leaves the crops folder is refused by name, without a crash of the round
    for bad in ("../x", "/etc/passwd", "a" * 65, "x.npz"):
        with pytest.raises(client_app.SiteStepError, match="InvalidCropsKey") as info:
            client_app.evaluate(
                _site_message(
                    "evaluate",
                    RecordDict(
                        {
                            "arrays": stager,
                            "config": ConfigRecord({"phase": "stager", "crops-key": bad, "server-round": 1}),
                        }
                    ),
                ),
                context,
            )
        assert bad not in str(info.value)  # the server learns the problem's name, not the path
    assert "crops-key '../x' refused" in (site_cache / "site-errors.log").read_text()
    assert verify_audit_log(site_cache / "audit.jsonl") == 6  # the refusals are recorded too


def test_site_min_cell_heads_can_be_raised_by_the_run_never_lowered(tmp_path):
    from flwr.app import Context

    from client.client_app import site_min_cell_heads

    def floor(run_value, node_config):
        rc = tiny_run_config(**{"min-cell-heads": run_value, "data-root": str(tmp_path)})
        ctx = Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config=rc)
        return site_min_cell_heads(ctx, RunConfig.from_run_config(rc))

    deployed = {"site-id": "H", "data-path": str(tmp_path)}
    assert floor(1, deployed) == 5  # the default floor of a deployed site
    assert floor(1, {**deployed, "min-cell-heads": 3}) == 3
    assert floor(8, {**deployed, "min-cell-heads": 3}) == 8  # the run raises it
    assert floor(1, {"partition-id": 0, "num-partitions": 4}) == 1  # simulation: the run config
    for bad in (0, -2, "five", True, 2.5):
        with pytest.raises(ValueError, match="node config min-cell-heads"):
            floor(1, {**deployed, "min-cell-heads": bad})


def test_row9_suppression_is_an_allow_list():
    metrics = {
        "num-examples": 3,
        "confusion": [1, 0, 0, 0, 1, 0, 0, 0, 1],
        "macro-auc": 0.9,
        "ece": 0.1,
        "calibration-bins": [1, 2],
        "val-num-examples": 8,
        "val-score": 0.7,
    }
    assert tasks_suppress(metrics, 5) == {"num-examples": 3, "suppressed": 1, "val-num-examples": 8, "val-score": 0.7}
    assert tasks_suppress(metrics, 3) == metrics  # 3 heads >= 3: sent whole
    assert (
        tasks_suppress({**metrics, "num-examples": 0, "confusion": [0] * 9}, 5)["confusion"] == [0] * 9
    )  # no heads: nothing to hide
    assert tasks_suppress({"num-examples": 9, "val-num-examples": 2, "val-score": 0.5}, 5) == {
        "num-examples": 9,
        "val-num-examples": 2,
        "val-suppressed": 1,
    }


def tasks_suppress(metrics, min_heads):
    from client.tasks import suppress_small_cells

    return suppress_small_cells(metrics, min_heads)


# ----------------------------------------------------------------------------- the benchmark's attacks


def test_poisoning_benchmark_attacks_are_what_the_issue_names():
    from flwr.app import ConfigRecord

    from sim.bench.poisoning import ATTACKS, attack_reply

    sent, honest = _record(GLOBAL_W, GLOBAL_N), _record(_honest(0))
    msg = Message(RecordDict({"arrays": sent, "config": ConfigRecord({})}), dst_node_id=4, message_type="train")
    msg.metadata.__dict__["_message_id"] = "m"
    reply = Message(RecordDict({"arrays": honest, "metrics": MetricRecord({"num-examples": 20})}), reply_to=msg)
    out = {a: attack_reply(a, msg, reply, np.random.default_rng(0)) for a in ATTACKS}
    w = {a: m.content["arrays"]["packed:float"].numpy() for a, m in out.items()}
    assert np.all(w["huge-1e30"] == np.float32(1e30))
    np.testing.assert_allclose(w["sign-flip-x10"], GLOBAL_W - 10 * (_honest(0) - GLOBAL_W), rtol=1e-5)
    assert abs(float(w["random-weights"].std()) - 1.0) < 0.2 and abs(float(w["random-weights"].mean())) < 0.2
    assert np.all(out["int-buffer-2^62"].content["arrays"]["packed:int64"].numpy() == 2**62)
    assert out["num-examples-1e9"].content["metrics"]["num-examples"] == 10**9
    np.testing.assert_array_equal(w["num-examples-1e9"], _honest(0))
    assert out["val-score-1e6"] is reply  # a train reply: untouched
    ev = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=4, message_type="evaluate")
    ev.metadata.__dict__["_message_id"] = "e"
    ev_reply = Message(RecordDict({"metrics": MetricRecord({"num-examples": 6, "val-score": 0.5})}), reply_to=ev)
    assert attack_reply("val-score-1e6", ev, ev_reply, np.random.default_rng(0)).content["metrics"]["val-score"] == 1e6
    with pytest.raises(ValueError, match="unknown attack"):
        attack_reply("bit-flip", msg, reply, np.random.default_rng(0))


def test_poisoning_rows_are_judged_against_the_clean_seed_spread():
    from sim.bench.poisoning import finish_rows, poisoning_markdown

    def row(strategy, attack, seed, auc, iou, auc_drop, iou_drop, shift):
        return {
            "strategy": strategy,
            "attack": attack,
            "seed": seed,
            "macro_auc": auc,
            "iou_mean": iou,
            "auc_drop": auc_drop,
            "iou_drop": iou_drop,
            "stager_shift": shift,
            "detector_shift": shift,
            "rejected_replies": 0,
        }

    rows = finish_rows(
        [
            row("fedavg", "none", 0, 0.70, 0.30, 0.0, 0.0, 0.0),
            row("fedavg", "none", 1, 0.64, 0.32, 0.0, 0.0, 3.0),
            row("fedavg", "sign-flip-x10", 0, 0.66, 0.31, 0.0, 0.0, 2.0),
            row("krum", "none", 0, 0.60, 0.31, 0.0, 0.0, 0.0),
            row("krum", "random-weights", 0, 0.50, 0.31, 0.0, 0.0, 9.0),
            row("fedmedian", "sign-flip-x10", 0, 0.50, 0.31, 0.0, 0.0, float("nan")),
        ]
    )
    # drops recomputed against the same strategy's clean seed-0 row
    assert [round(r["auc_drop"], 6) for r in rows[:5]] == [0.0, 0.06, 0.04, 0.0, 0.1]
    assert np.isnan(rows[5]["auc_drop"]) and rows[5]["within_spread"] is None  # no clean fedmedian run to compare
    assert rows[0]["clean_auc_spread"] == pytest.approx(0.06) and rows[0]["clean_iou_spread"] == pytest.approx(0.02)
    assert rows[0]["clean_stager_shift"] == 3.0
    assert [r["within_spread"] for r in rows[:5]] == [True, True, True, True, False]
    table = poisoning_markdown(rows)
    assert "| krum | random-weights | 0 | 0.500 | +0.100 | 0.310 | +0.000 | 9.00 | 9.00 | 0 | **no** |" in table
    assert finish_rows(rows[:1])[0]["within_spread"] is None  # one clean seed: no spread to judge by
