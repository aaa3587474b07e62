"""Reproducibility: per-(seed, site, phase, round) streams, fixed aggregation order, and two whole
federated runs that must give bit-identical weights and metrics."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg

from server.checkpoint import CheckpointStore
from shared_models.determinism import stream_seed
from strategies.site_aware import SiteFedAvg
from tests.flower_messages import message


def test_stream_seeds_differ_by_site_phase_round_and_seed():
    tuples = [
        (s, site, phase, r)
        for s in (0, 1)
        for site in ("A", "B", "C", "D")
        for phase in ("detector", "stager")
        for r in range(1, 11)
    ]
    seeds = [stream_seed(*t) for t in tuples]
    assert len(set(seeds)) == len(tuples)
    assert all(0 <= s < 2**63 for s in seeds)
    assert stream_seed(0, "A", "stager", 3) == stream_seed(0, "A", "stager", 3)
    with pytest.raises(ValueError):
        stream_seed(-1, "A", "stager", 1)


def test_stream_seed_does_not_depend_on_the_python_hash_seed():
    code = "from shared_models.determinism import stream_seed; print(stream_seed(7, 'B', 'detector', 4))"
    outs = {
        subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": h, "PATH": ""},
        ).stdout.strip()
        for h in ("1", "2")
    }
    assert outs == {str(stream_seed(7, "B", "detector", 4))}


def _reply(src: int, arrays: ArrayRecord, n: int) -> Message:
    return message(src, RecordDict({"arrays": arrays, "metrics": MetricRecord({"num-examples": n})}))


@pytest.mark.usefixtures("task_identity")
def test_aggregation_does_not_depend_on_reply_order():
    rng = np.random.default_rng(0)
    # float32 values over many magnitudes: their weighted float32 sum depends on the order of the terms
    states = {
        site: (rng.standard_normal(4096) * 10.0 ** rng.integers(-4, 5, 4096)).astype(np.float32)
        for site in ("A", "B", "C")
    }
    node_sites = {11: "A", 12: "B", 13: "C"}
    sizes = {"A": 230, "B": 37, "C": 11}

    def replies(order):
        return [
            _reply(n, ArrayRecord({"w": torch.from_numpy(states[node_sites[n]])}), sizes[node_sites[n]]) for n in order
        ]

    orders = [(11, 12, 13), (13, 11, 12), (12, 13, 11)]
    # the test can fail: Flower's own FedAvg sums in arrival order and gives different bits
    plain = [FedAvg().aggregate_train(1, replies(o))[0]["w"].numpy() for o in orders]
    assert any(not np.array_equal(plain[0], p) for p in plain[1:])
    ours = [
        SiteFedAvg(node_sites=node_sites, train_sites=["A", "B", "C"]).aggregate_train(1, replies(o))[0]["w"].numpy()
        for o in orders
    ]
    for other in ours[1:]:
        assert np.array_equal(ours[0], other)
    np.testing.assert_array_equal(ours[0], plain[0])  # = the sum in site-id order


@pytest.fixture(scope="module")
def two_training_sites(tmp_path_factory):
    from sim.phantoms import PROFILES, generate_phantoms

    quick = PROFILES["quick"]
    profile = dataclasses.replace(
        quick,
        name="micro",
        heads_per_site={"A": 20, "B": 20},
        patients_per_site={"A": 10, "B": 10},
        scanners={s: quick.scanners[s] for s in ("A", "B")},
        external_groups={"external-1": ("B",)},
    )
    root = tmp_path_factory.mktemp("phantoms")
    generate_phantoms(root, profile, seed=3)
    # patient ids are local to a hospital: B numbers its patients like A (issue 18: this made `sim run` exit 1)
    manifest = root / "B" / "manifest.csv"
    manifest.write_text(re.sub(r"^B-", "A-", manifest.read_text(), flags=re.M))
    return root


def _run(data, out) -> dict:
    from shared_models.cli import main
    from tests.conftest import TINY

    sets = {
        **TINY,
        "site-ids": "A,B",
        "train-sites": "A,B",
        "report-groups": "A-test=A;B-test=B",
        "detector-rounds": 2,
        "stager-rounds": 2,
        "detector-local-steps": 3,
        "stager-local-steps": 3,
        "stager-batch-size": 4,
    }
    argv = ["sim", "run", "--data", str(data), "--out", str(out), "--profile", "quick", "--seed", "5"]
    for k, v in sets.items():
        argv += ["--set", f"{k}={v}"]
    assert main(argv) == 0
    return json.loads((out / "report.json").read_text())


def _metrics(report: dict) -> dict:
    """report.json without what differs from run to run by nature: wall times, and the audit anchors
    (the Flower run id and digests of the sites' audit logs, whose entries carry timestamps)."""
    return {k: v for k, v in report.items() if k not in ("wall_time_s", "simulation", "audit_anchors")}


def _differences(a, b, path: str = "") -> list[str]:
    """Paths where two JSON values differ (NaN equals NaN)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            d
            for k in sorted(set(a) | set(b), key=str)
            for d in (_differences(a[k], b[k], f"{path}/{k}") if k in a and k in b else [f"{path}/{k}: missing"])
        ]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in _differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"]


@pytest.mark.slow
def test_two_federated_runs_are_bit_identical(two_training_sites, tmp_path):
    """Two training sites, so the aggregation order matters; Ray schedules the two sites' ClientApps
    concurrently, so which one replies first varies between the runs. The two sites share patient ids."""
    reports = [_run(two_training_sites, tmp_path / f"run-{i}") for i in (1, 2)]
    assert set(reports[0]["history"]["stager_train_loss"]["2"]) == {"A", "B"}  # both sites trained
    differing = _differences(_metrics(reports[0]), _metrics(reports[1]))
    assert not differing, differing[:10]
    runs = [tmp_path / f"run-{i}" for i in (1, 2)]
    for name in ("detector.pt", "stager.pt"):
        # the bundle's weights (the selected rounds) ...
        states = [torch.load(run / "bundle" / name, weights_only=True) for run in runs]
        assert list(states[0]) == list(states[1])
        for key, value in states[0].items():
            assert torch.equal(value, states[1][key]), f"bundle {name} {key} differs between the two runs"
        # ... and the last round's global weights
        last = [CheckpointStore(run / "checkpoints", "", {}).path(name.removesuffix(".pt")) for run in runs]
        finals = [torch.load(p, weights_only=False)["state_dict"] for p in last]  # our own checkpoint files
        for key, value in finals[0].items():
            assert torch.equal(value, finals[1][key]), f"last-round {name} {key} differs between the two runs"
