"""Issue 16, row 1: a site is who its enrolled key says it is (``site-nodes``, ``discover_sites``).

A fake grid stands in for Flower's: every node answers ``hello`` with the site it claims, and
the reply carries the node id that the SuperLink authenticated (``metadata.src_node_id``).
The same attack with real SuperLink/SuperNode processes is in ``tests/test_deployment_security.py``.
"""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from server.coordinator import site_nodes
from server.server_app import SiteIdentityError, SitesMissingError, discover_sites, identity_problem
from shared_models.config import RunConfig, parse_site_nodes
from tests.conftest import tiny_run_config
from tests.flower_messages import message

pytestmark = pytest.mark.usefixtures("task_identity")


class ClaimingGrid:
    """Nodes ``{node_id: claimed site}``; records which nodes were asked what."""

    def __init__(self, claims: dict[int, str]):
        self.claims = claims
        self.asked: list[int] = []

    def get_node_ids(self):
        return list(self.claims)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for m in messages:
            node = m.metadata.dst_node_id
            self.asked.append(node)
            content = RecordDict(
                {
                    "site": ConfigRecord({"site-id": self.claims[node]}),
                    "metrics": MetricRecord({"heads-train": 4, "heads-val": 1, "heads-test": 1}),
                }
            )
            replies.append(message(node, content, message_type="query", message_id=f"r{node}"))
        return replies


def _cfg(site_ids="A,B", nodes="", wait=2.0, identity="enrolled") -> RunConfig:
    return RunConfig.from_run_config(
        tiny_run_config(
            site_ids=site_ids,
            train_sites="A",
            report_groups="g=A,B",
            site_nodes=nodes,
            node_wait_timeout_s=wait,
            identity=identity,
        )
    )


def test_site_nodes_parse_and_refuse_malformed_bindings():
    assert parse_site_nodes("A=11, B=22", ("A", "B")) == {"A": 11, "B": 22}
    assert parse_site_nodes("", ("A", "B")) == {}
    with pytest.raises(ValueError, match="'C'"):
        parse_site_nodes("A=11,B=22,C=33", ("A", "B"))
    with pytest.raises(ValueError, match=r"\['B'\] have no enrolled node"):
        parse_site_nodes("A=11", ("A", "B"))
    with pytest.raises(ValueError, match="two sites"):
        parse_site_nodes("A=11,B=11", ("A", "B"))
    with pytest.raises(ValueError, match="SITE=NODE_ID"):
        parse_site_nodes("A:11", ("A",))


def test_enrolled_site_claiming_another_sites_name_ends_the_run_naming_both(caplog):
    # row 1: hospital B (node 22) starts its daemon with --site-id A, next to the real A (node 11)
    grid = ClaimingGrid({11: "A", 22: "A"})
    refused: list[str] = []
    with pytest.raises(SiteIdentityError, match=r"node 22, enrolled as site 'B', claims site 'A'"):
        discover_sites(grid, _cfg(nodes="A=11,B=22"), poll_s=0.01, refused=refused)
    assert refused == ["refused: node 22, enrolled as site 'B', claims site 'A'"]
    assert "enrolled as site 'B', claims site 'A'" in caplog.text


def test_impostor_alone_is_refused_even_when_the_real_site_is_absent():
    # the attack of row 1 as it happened: A is not connected at all, B claims to be A
    with pytest.raises(SiteIdentityError, match="enrolled as site 'B'"):
        discover_sites(ClaimingGrid({22: "A"}), _cfg(nodes="A=11,B=22"), poll_s=0.01)


def test_node_of_no_site_of_the_run_claiming_a_run_site_is_left_out_and_the_run_goes_on():
    grid = ClaimingGrid({11: "A", 22: "B", 33: "A", 44: "C"})  # 33 (enrolled elsewhere) claims A; 44 is a bystander
    refused: list[str] = []
    node_sites, site_data = discover_sites(grid, _cfg(nodes="A=11,B=22"), poll_s=0.01, refused=refused)
    assert node_sites == {11: "A", 22: "B"} and set(site_data) == {"A", "B"}
    assert refused == ["refused: node 33 is not enrolled for any site of this run but claims site 'A'"]


def test_refused_node_is_not_asked_again_and_missing_site_error_names_the_refusal():
    grid = ClaimingGrid({11: "A", 33: "B"})  # the real B never connects; node 33 (of no site) claims B
    with pytest.raises(SitesMissingError, match=r"\['B'\].*node 33 is not enrolled"):
        discover_sites(grid, _cfg(nodes="A=11,B=22", wait=0.3), poll_s=0.05)
    assert grid.asked.count(33) == 1 and grid.asked.count(11) == 1


def test_simulation_names_sites_by_claim_but_refuses_a_site_claimed_twice():
    node_sites, _ = discover_sites(ClaimingGrid({5: "A", 6: "B"}), _cfg(identity="simulation"), poll_s=0.01)
    assert node_sites == {5: "A", 6: "B"}
    assert identity_problem(7, "A", {}, node_sites) == "node 7 claims site 'A', which another node already is"


def test_launch_binding_comes_from_the_registry_and_names_unenrolled_sites(tmp_path):
    registry = tmp_path / "enrolled-sites.json"
    registry.write_text('{"A": {"fingerprint": "x", "node_id": 11}, "B": {"fingerprint": "y", "node_id": 22}}')
    assert site_nodes(["B", "A"], registry) == "B=22,A=11"
    with pytest.raises(ValueError, match=r"\['D'\] are not enrolled"):
        site_nodes(["A", "D"], registry)


def test_nodes_outside_the_run_get_no_evaluate_message():
    import torch
    from flwr.app import ArrayRecord

    from strategies.site_aware import build_strategy

    class Grid:  # node 9 was refused at discovery (or belongs to no site of this run)
        def get_node_ids(self):
            return [1, 2, 9]

    strategy = build_strategy("fedavg", proximal_mu=0.0, node_sites={1: "A", 2: "B"}, train_sites=["A"])
    config = ConfigRecord({"phase": "stager"})
    evals = strategy.configure_evaluate(1, ArrayRecord({"w": torch.zeros(1)}), config, Grid())
    trains = strategy.configure_train(1, ArrayRecord({"w": torch.zeros(1)}), config, Grid())
    assert sorted(m.metadata.dst_node_id for m in evals) == [1, 2]
    assert [m.metadata.dst_node_id for m in trains] == [1]


def test_plain_flwr_run_without_site_nodes_is_refused_not_trusted(caplog):
    # review F7: a deployment started with `flwr run` (no `onfh coordinator launch`) has no site-nodes
    grid = ClaimingGrid({5: "A", 6: "B"})
    with pytest.raises(SiteIdentityError, match="site-nodes' is empty"):
        discover_sites(grid, _cfg(), poll_s=0.01)
    # the simulation says so explicitly, and that is logged loudly
    with caplog.at_level("WARNING"):
        node_sites, _ = discover_sites(grid, _cfg(identity="simulation"), poll_s=0.01)
    assert node_sites == {5: "A", 6: "B"}
    assert any("IDENTITY NOT VERIFIED" in r.getMessage() for r in caplog.records)


def test_identity_is_enrolled_by_default_and_checked():
    assert RunConfig.from_run_config(tiny_run_config()).identity == "enrolled"
    with pytest.raises(ValueError, match="identity"):
        RunConfig.from_run_config(tiny_run_config(identity="trust-me"))


def test_launch_refuses_simulation_identity(tmp_path):
    from server import coordinator

    with pytest.raises(ValueError, match="identity"):
        coordinator.launch({"identity": "simulation"}, out=tmp_path / "run", flwr_home=tmp_path / "home")


def test_simulation_runner_declares_simulation_identity(monkeypatch, tmp_path):
    from contextlib import contextmanager

    from sim.experiments import runner

    @contextmanager
    def no_superlink(work, env):
        yield "127.0.0.1:1", 0

    def fake_flwr(args, env, timeout=300):
        raise runner.SimulationError("stop here")

    monkeypatch.setattr(runner, "simulation_superlink", no_superlink)
    monkeypatch.setattr(runner, "_flwr", fake_flwr)
    with pytest.raises(runner.SimulationError, match="stop here"):
        runner.run_simulation({}, num_sites=2, work_dir=tmp_path, cpus_per_client=1)
    assert 'identity = "simulation"' in (tmp_path / "run-config.toml").read_text().splitlines()
