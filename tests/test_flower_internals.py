"""Contract of shared_models.flower.internals: every Flower internal the project uses, as the code uses it.

A Flower upgrade that moves, renames or re-signs one of these fails here, in one place, instead of in a
site daemon at 3 a.m. The expected parameter names are those our call sites pass (client/clientapp_forkserver.py,
client/audit.py, sim/bench/models.py, sim/bench/poisoning.py and the tests' helpers).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import flwr
import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, Metadata, MetricRecord, RecordDict

from client.clientapp_forkserver import ForkExecutor
from shared_models.flower import internals as fi

ROOT = Path(__file__).resolve().parents[1]
#: Flower's public API (import it anywhere); every other ``flwr.*`` module is internal.
PUBLIC_FLOWER = {"flwr", "flwr.app", "flwr.clientapp", "flwr.serverapp", "flwr.serverapp.strategy", "flwr.simulation"}


def _params(fn) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p not in ("self", "cls")]


def test_the_installed_flower_is_the_tested_one():
    fi.check_flower_version(flwr.__version__)  # raises otherwise


@pytest.mark.parametrize("version", ["1.43.0", "1.41.2", "2.42.0", "0.42.0", "nightly"])
def test_an_untested_flower_is_refused_by_name(version):
    with pytest.raises(fi.UntestedFlowerError, match=rf"Flower {version} is installed.*flwr>=1\.42,<1\.43"):
        fi.check_flower_version(version)
    with pytest.warns(RuntimeWarning, match=f"Flower {version}"):
        fi.check_flower_version(version, allow=True)


@pytest.mark.parametrize("version", ["1.42.0", "1.42.3", "1.42.0rc1"])
def test_every_release_of_the_tested_minor_passes(version):
    fi.check_flower_version(version)


def test_every_exposed_name_resolves_to_the_flower_object():
    assert set(fi.INTERNALS) <= set(fi.__all__) and set(fi.INTERNALS) <= set(dir(fi))
    for name, (module, attribute) in fi.INTERNALS.items():
        obj = getattr(fi, name)
        assert obj is getattr(__import__(module, fromlist=[attribute]), attribute), name
        assert module.startswith("flwr.") and module not in PUBLIC_FLOWER, f"{name}: public, import it directly"
    with pytest.raises(AttributeError, match="no_such_name"):
        fi.no_such_name  # noqa: B018


def test_forkserver_internals_keep_the_signatures_it_calls():
    assert _params(fi.run_clientapp)[:6] == [
        "runtime_api_address",
        "token",
        "insecure",
        "certificates",
        "parent_pid",
        "runtime_dependency_install",
    ]
    assert _params(fi.validate_and_resolve_root_certificates) == ["root_cert_path", "insecure"]
    assert fi.validate_and_resolve_root_certificates(None, True) is None
    assert _params(fi.RuntimeHttpClient.from_server_address)[:4] == [
        "server_address",
        "insecure",
        "root_certificates",
        "interceptors",
    ]
    assert _params(fi.RuntimeVersionHttpInterceptor) == ["component_name"]
    plugin = set(_params(fi.AutoExecPlugin))
    assert {
        "runtime_api_address",
        "insecure",
        "root_certificates_path",
        "runtime_dependency_install",
        "executor",
    } <= plugin
    assert fi.TaskType.CLIENT_APP in fi.AutoExecPlugin.supported_task_types
    assert _params(fi.AutoExecPlugin.launch_task) == ["token", "task"]
    assert isinstance(fi.SUPERNODE_UVICORN_DEFAULT_PORT, int)
    # the Runtime API messages and the fields serve() reads and writes
    assert {"supported_task_types", "agentapp_fab_hashes"} <= set(fi.AcquireTaskRequest.DESCRIPTOR.fields_by_name)
    response = fi.AcquireTaskResponse.DESCRIPTOR.fields_by_name
    assert {"task", "token"} <= set(response) and "task_id" in response["task"].message_type.fields_by_name
    # LaunchResult as ForkExecutor builds it, and its status as serve() reads it
    assert str(fi.LaunchResult.accepted().status) == "accepted"
    failed = fi.LaunchResult.failed("why")
    assert str(failed.status) != "accepted" and failed.message == "why"
    spec_fields = {f.name for f in dataclasses.fields(fi.ExecutionSpec)}
    assert {
        "runtime_api_address",
        "token",
        "insecure",
        "root_certificates_path",
        "parent_pid",
        "task_id",
    } <= spec_fields


def test_fork_executor_implements_flowers_executor_protocol():
    wanted = {n for n, v in vars(fi.Executor).items() if callable(v) and not n.startswith("_")}
    assert wanted == {"get_eligible_capacity", "wait_for_capacity", "launch", "reconcile", "close"}
    for name in wanted:
        ours, theirs = inspect.signature(getattr(ForkExecutor, name)), inspect.signature(getattr(fi.Executor, name))
        assert list(ours.parameters) == list(theirs.parameters), name
        assert [p.kind for p in ours.parameters.values()] == [p.kind for p in theirs.parameters.values()], name


def test_record_and_message_internals_behave_as_used(task_identity):
    record = ArrayRecord({"w": Array(np.ones((2, 3), dtype="float32"))})
    content = RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": 3})})
    proto = fi.recorddict_to_proto(content)  # client.audit measures a reply's wire size with it
    assert proto.ByteSize() > 2 * 3 * 4
    objects = fi.get_all_nested_objects(record)  # sim.bench.models counts Flower's transfer objects
    assert len(objects) >= 2 and all(callable(o.deflate) for o in objects.values())
    metadata = Metadata(
        run_id=1,
        message_id="m2",
        src_node_id=2,
        dst_node_id=0,
        reply_to_message_id="x",
        group_id="",
        created_at=0.0,
        ttl=60.0,
        message_type="train",
    )
    reply = fi.make_message(metadata=metadata, content=content)
    assert reply.metadata.src_node_id == 2 and reply.content["metrics"]["num-examples"] == 3
    assert fi.TaskIdentity.run_id == 1  # the fixture set it through the same class
    mean = fi.aggregate_arrayrecords([content, content], "num-examples")
    assert (mean["w"].numpy() == 1).all()
    assert fi.parse_config_args(["num-supernodes=4 client-resources-num-cpus=1"]) == {
        "num-supernodes": 4,
        "client-resources-num-cpus": 1,
    }


def test_simulation_internals_read_a_federation_config():
    parsed = {"num_supernodes": 3, "client_resources_num_cpus": 1}
    num_supernodes, _, backend, _, _ = fi.run_simulation_settings(fi.simulation_config_from_json(parsed))
    assert num_supernodes == 3 and backend["client_resources"]["num_cpus"] == 1
    assert _params(fi.pool_size_from_resources) == ["client_resources"]
    assert "run_id" not in _params(fi.InMemoryGrid)


def _flwr_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
    return [m for m in found if m == "flwr" or m.startswith("flwr.")]


def test_no_module_but_the_door_imports_flower_internals():
    door = ROOT / "shared_models" / "flower" / "internals.py"
    offenders = []
    for folder in ("client", "server", "shared_models", "strategies", "sim", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == door:
                continue
            offenders += [f"{path.relative_to(ROOT)}: {m}" for m in _flwr_imports(path) if m not in PUBLIC_FLOWER]
    assert offenders == []


def test_shared_models_imports_flower_only_in_its_flower_package():
    outside = [
        f"{p.relative_to(ROOT)}: {m}"
        for p in sorted((ROOT / "shared_models").rglob("*.py"))
        if "flower" not in p.relative_to(ROOT / "shared_models").parts[:1]
        for m in _flwr_imports(p)
    ]
    assert outside == []


#: Flower entry points deprecated in the tested release (they warn through Flower's logger, not ``warnings``,
#: so the test suite's warning filters cannot catch them).
DEPRECATED_FLOWER = {("flwr.simulation", "run_simulation")}


def test_no_module_uses_a_deprecated_flower_entry_point():
    used = []
    for folder in ("client", "server", "shared_models", "strategies", "sim"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
                if isinstance(node, ast.ImportFrom) and node.module:
                    used += [
                        f"{path.relative_to(ROOT)}: {node.module}.{a.name}"
                        for a in node.names
                        if (node.module, a.name) in DEPRECATED_FLOWER
                    ]
    assert used == []
