"""Attacks found by the outside review of issue 16's defences (after the first round of fixes).

Each test replays one finding against the real code and derives the expected result on its own.
"""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from client.audit import append_entry, line_sha256, verify_audit_anchors
from server.server_app import hello_problem
from shared_models.config import parse_site_nodes
from shared_models.flower.records import record_to_state
from shared_models.safe_files import UnsafeFileError, load_tensors
from shared_models.stager import MulDenseNet3D, StagerConfig
from shared_models.transfer import pack_state_dict
from strategies.site_aware import SiteFedAvg
from strategies.update_checks import normalisation_problems
from tests.flower_messages import message

pytestmark = pytest.mark.usefixtures("task_identity")

SITES = {1: "A", 2: "B", 3: "C", 4: "D"}


def _packed(state: dict) -> ArrayRecord:
    return ArrayRecord({k: Array(v) for k, v in pack_state_dict(state).items()})


def _stager():
    torch.manual_seed(0)
    return MulDenseNet3D(StagerConfig(init_features=4, growth_rate=2, block_config=(1, 1), pool_scales=(1,)))


def _strategy(template: dict) -> SiteFedAvg:
    strategy = SiteFedAvg(
        node_sites=SITES,
        train_sites=set(SITES.values()),
        min_train_nodes=1,
        min_available_nodes=1,
        min_evaluate_nodes=1,
        min_fraction=0.5,
        max_int_delta=10,
        declared={s: {"heads-train": 20} for s in SITES.values()},
        state_problems=lambda arrays: normalisation_problems(record_to_state(arrays, template)),
    )
    strategy._sent = _packed(template)
    return strategy


def test_negative_running_variance_is_rejected_and_the_fedavg_model_stays_finite():
    # Finding: one channel's running_var set to minus the honest sites' sum pulls the FedAvg mean below zero
    # while every value is small and finite, and the global model then outputs NaN.
    model = _stager()
    template = {k: v.clone() for k, v in model.state_dict().items()}
    key = next(k for k in template if k.endswith("running_var"))
    honest = [
        {k: (v + 1 if not v.is_floating_point() else v + 0.001 * (i + 1)) for k, v in template.items()}
        for i in range(3)
    ]
    poisoned = {k: v.clone() for k, v in honest[0].items()}
    poisoned[key] = poisoned[key].clone()
    poisoned[key][0] = -(sum(float(h[key][0]) for h in honest) + 0.01)
    # without the check, the example-weighted mean of that channel is negative: the attack is real
    assert (sum(float(h[key][0]) for h in honest) + float(poisoned[key][0])) / 4 < 0
    strategy = _strategy(template)
    replies = [
        message(i + 1, RecordDict({"arrays": _packed(h), "metrics": MetricRecord({"num-examples": 20})}))
        for i, h in enumerate(honest)
    ]
    replies.append(message(4, RecordDict({"arrays": _packed(poisoned), "metrics": MetricRecord({"num-examples": 20})})))
    arrays, _ = strategy.aggregate_train(1, replies)
    assert "negative running variances" in strategy.rejected_updates[1]["D"][0]
    state = record_to_state(arrays, template)
    assert float(state[key].min()) >= 0
    model.load_state_dict(state)
    model.eval()
    with torch.no_grad():
        assert torch.isfinite(model(torch.rand(1, 1, 16, 16, 16))).all()


def test_normalisation_problems_pass_an_honest_state():
    assert normalisation_problems(_stager().state_dict()) == []


def test_a_site_adding_or_leaving_out_a_train_metric_does_not_end_the_round():
    # Finding: Flower's FedAvg raises InconsistentMessageReplies when metric keys differ between replies.
    template = {k: v.clone() for k, v in _stager().state_dict().items()}
    strategy = _strategy(template)
    same = {k: (v + 1 if not v.is_floating_point() else v) for k, v in template.items()}
    replies = [
        message(
            i + 1,
            RecordDict({"arrays": _packed(same), "metrics": MetricRecord({"num-examples": 20, "train-loss": 0.5})}),
        )
        for i in range(2)
    ]
    replies.append(
        message(
            3,
            RecordDict(
                {"arrays": _packed(same), "metrics": MetricRecord({"num-examples": 20, "train-loss": 0.5, "foo": 1.0})}
            ),
        )
    )
    replies.append(message(4, RecordDict({"arrays": _packed(same), "metrics": MetricRecord({"train-loss": 0.5})})))
    arrays, metrics = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert "no num-examples" in strategy.rejected_updates[1]["D"][0]
    assert set(strategy.train_metrics[1]) == {"A", "B", "C"}
    assert "foo" not in strategy.train_metrics[1]["C"]


@pytest.mark.parametrize(
    "content, reason",
    [
        (RecordDict({"metrics": MetricRecord({"heads-train": 3})}), "without a site-id"),
        (RecordDict({"site": ConfigRecord({"site-id": "A"})}), "without counts"),
        (
            RecordDict(
                {"site": ConfigRecord({"site-id": "A"}), "metrics": MetricRecord({"heads-train": float("nan")})}
            ),
            "heads-train",
        ),
        (RecordDict({"site": ConfigRecord({"site-id": "A"}), "metrics": MetricRecord({"heads-val": -1})}), "heads-val"),
    ],
)
def test_a_malformed_hello_is_refused_not_a_crash(content, reason):
    assert reason in hello_problem(message(99, content, message_type="query"))


def test_a_well_formed_hello_passes():
    content = RecordDict(
        {
            "site": ConfigRecord({"site-id": "A"}),
            "metrics": MetricRecord({"heads-train": 3, "heads-val": 1, "heads-test": 1, "studies-refused": 0}),
        }
    )
    assert hello_problem(message(1, content, message_type="query")) is None


def test_a_node_sending_a_malformed_hello_is_refused_and_the_run_goes_on():
    # Finding: a node of no site of the run answering hello without a site record crashed site discovery.
    from server.server_app import discover_sites
    from shared_models.config import RunConfig
    from tests.conftest import tiny_run_config

    class Grid:
        def get_node_ids(self):
            return [11, 12, 99]

        def send_and_receive(self, messages, timeout=None):
            out = []
            for m in messages:
                node = m.metadata.dst_node_id
                content = (
                    RecordDict({"metrics": MetricRecord({"heads-train": 1})})
                    if node == 99
                    else RecordDict(
                        {
                            "site": ConfigRecord({"site-id": {11: "A", 12: "B"}[node]}),
                            "metrics": MetricRecord({"heads-train": 3, "heads-val": 1, "heads-test": 1}),
                        }
                    )
                )
                out.append(message(node, content, message_type="query"))
            return out

    cfg = RunConfig.from_run_config(
        tiny_run_config(
            **{
                "site-ids": "A,B",
                "train-sites": "A",
                "report-groups": "A-test=A;B=B",
                "site-nodes": "A=11,B=12",
                "node-wait-timeout-s": 5.0,
            }
        )
    )
    refused: list[str] = []
    node_sites, _ = discover_sites(Grid(), cfg, poll_s=0.01, refused=refused)
    assert node_sites == {11: "A", 12: "B"}
    assert refused == ["refused: node 99: hello reply without a site-id"]


def test_a_site_bound_twice_in_site_nodes_is_refused():
    with pytest.raises(ValueError, match="bound twice"):
        parse_site_nodes("A=1,A=2,B=3", ("A", "B"))


def _deflated_tensor_file(numel: int) -> bytes:
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(numel)}, buffer)
    stored = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as packed:
        for info in stored.infolist():
            packed.writestr(info.filename, stored.read(info.filename))
    return out.getvalue()


def test_a_deflated_tensor_file_is_refused_before_it_is_inflated():
    data = _deflated_tensor_file(1_000_000)  # 4 MB of zeros deflate to a few KB
    assert len(data) < 100_000
    with pytest.raises(UnsafeFileError, match="compressed entries"):
        load_tensors(data, "weights.pt")


def test_a_plain_tensor_file_still_loads():
    buffer = io.BytesIO()
    torch.save({"w": torch.arange(5.0)}, buffer)
    assert torch.equal(load_tensors(buffer.getvalue(), "weights.pt")["w"], torch.arange(5.0))


def _anchored_log(log_path):
    """One honest stager-train entry of run 7 in ``log_path``, and the coordinator's anchor for it."""
    base = {
        "time": "t",
        "run_id": 7,
        "message_type": "train",
        "round": 1,
        "phase": "stager",
        "action": None,
        "arrays": [],
        "metrics": ["num-examples"],
        "configs": [],
        "bytes": 100,
        "error": None,
    }
    anchors = [
        {"run_id": 7, "sha256": line_sha256(append_entry(log_path, dict(base))), "message_type": "train", "round": 1}
    ]
    return base, anchors


def test_a_forged_line_with_an_empty_error_after_the_last_anchor_is_detected(tmp_path):
    log_path = tmp_path / "audit.jsonl"
    base, anchors = _anchored_log(log_path)
    verify_audit_anchors(log_path, anchors)  # the honest log passes
    append_entry(log_path, {**base, "round": 2, "arrays": ["packed:float"], "bytes": 5000, "error": ""})
    with pytest.raises(ValueError, match="follows the coordinator's last anchor"):
        verify_audit_anchors(log_path, anchors)


def test_a_genuine_error_entry_after_the_last_anchor_passes(tmp_path):
    log_path = tmp_path / "audit.jsonl"
    base, anchors = _anchored_log(log_path)
    append_entry(log_path, {**base, "round": 2, "metrics": [], "bytes": 0, "error": "RuntimeError: out of memory"})
    verify_audit_anchors(log_path, anchors)


def test_a_box_outside_the_scan_is_not_staged_even_with_the_gates_off(monkeypatch):
    # Found by the quick benchmark: an untrained detector's box beyond the scan clipped to zero extent and
    # the crop step raised; such a head is now "not assessed" (off target) and the study goes on.
    import SimpleITK as sitk

    import shared_models.pipeline as pipeline
    from shared_models.detection import YOLOX3D
    from shared_models.preprocessing import PreprocessingSpec
    from tests.test_pipeline import DCFG

    image = sitk.GetImageFromArray(np.random.default_rng(0).random((24, 48, 64)).astype(np.float32))
    image.SetSpacing((6.0, 6.0, 6.0))
    far = np.array([-1e4, -1e4, -1e4, -9e3, -9e3, -9e3])  # LPS mm, far outside the scan
    monkeypatch.setattr(pipeline, "box_voxel_to_lps", lambda box, grid: far)
    torch.manual_seed(0)
    heads = pipeline.analyse_study(image, YOLOX3D(DCFG), _stager(), PreprocessingSpec(), gates=False)
    assert [h.predicted_stage for h in heads] == [None, None]
    assert all("off_target" in h.flags for h in heads)
