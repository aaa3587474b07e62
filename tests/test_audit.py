"""The site's append-only audit log of every message that leaves the site (issue 7)."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.app.message.message import make_message
from flwr.common.serde import recorddict_to_proto

from client.audit import (
    append_entry,
    audited,
    describe_message,
    read_audit_log,
    verify_audit_log,
)

pytestmark = pytest.mark.usefixtures("task_identity")


def _request(message_type: str, config: dict, arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict({"config": ConfigRecord(config)})
    if arrays is not None:
        content["arrays"] = arrays
    metadata = Metadata(run_id=7, message_id="q1", src_node_id=0, dst_node_id=5, reply_to_message_id="",
                        group_id="", created_at=time.time(), ttl=600.0, message_type=message_type)
    return make_message(metadata=metadata, content=content)


def _train_reply(request: Message) -> Message:
    arrays = ArrayRecord({"packed.float32": Array(np.ones(1000, np.float32)), "packed.int64": Array(np.arange(3))})
    metrics = MetricRecord({"num-examples": 12, "train-loss": 0.25})
    return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=request)


def test_describe_train_reply_lists_arrays_metric_names_and_bytes_but_no_values():
    request = _request("train", {"phase": "detector", "server-round": 3})
    reply = _train_reply(request)
    entry = describe_message(reply, request)
    assert entry["run_id"] == 7 and entry["message_type"] == "train" and entry["round"] == 3
    assert entry["phase"] == "detector" and entry["action"] is None and entry["error"] is None
    assert entry["arrays"] == [
        {"record": "arrays", "name": "packed.float32", "shape": [1000], "dtype": "float32"},
        {"record": "arrays", "name": "packed.int64", "shape": [3], "dtype": "int64"},
    ]
    assert entry["metrics"] == [{"record": "metrics", "names": ["num-examples", "train-loss"]}]
    assert entry["bytes"] == recorddict_to_proto(reply.content).ByteSize() > 4000  # 1000 float32 at least
    assert "0.25" not in json.dumps(entry) and "12" not in json.dumps(entry["metrics"])


def test_hello_reply_records_config_names_only(tmp_path):
    request = _request("query", {"action": "hello"})
    reply = Message(content=RecordDict({"site": ConfigRecord({"site-id": "St-Elsewhere"}),
                                        "metrics": MetricRecord({"heads-train": 4})}), reply_to=request)
    entry = describe_message(reply, request)
    assert entry["action"] == "hello" and entry["configs"] == [{"record": "site", "names": ["site-id"]}]
    assert "St-Elsewhere" not in json.dumps(entry)


def test_log_is_append_only_and_chained(tmp_path):
    path = tmp_path / "audit.jsonl"
    for i in range(3):
        append_entry(path, {"round": i})
    assert [e["round"] for e in read_audit_log(path)] == [0, 1, 2]
    assert read_audit_log(path)[0]["prev_sha256"] is None
    assert verify_audit_log(path) == 3
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], lines[2]]) + "\n")  # a removed line breaks the chain
    with pytest.raises(ValueError, match="line 2"):
        verify_audit_log(path)


def test_audited_handler_records_replies_and_errors(tmp_path):
    path = tmp_path / "site" / "audit.jsonl"
    context = Context(run_id=7, node_id=5, node_config={}, state=RecordDict(), run_config={})

    @audited(lambda ctx: path)
    def train(msg, ctx):
        return _train_reply(msg)

    @audited(lambda ctx: path)
    def failing(msg, ctx):
        raise RuntimeError("train/stager failed at the site with KeyError")

    reply = train(_request("train", {"phase": "stager", "server-round": 1}), context)
    assert reply.content["metrics"]["num-examples"] == 12
    with pytest.raises(RuntimeError):
        failing(_request("train", {"phase": "stager", "server-round": 2}), context)
    first, second = read_audit_log(path)
    assert first["round"] == 1 and len(first["arrays"]) == 2 and first["bytes"] > 0
    assert second["round"] == 2 and second["error"].startswith("RuntimeError") and second["arrays"] == []
    assert verify_audit_log(path) == 2


def test_client_app_audit_path_follows_the_node_config(tmp_path):
    from client.client_app import audit_log_path
    from tests.conftest import tiny_run_config

    rc = tiny_run_config()
    ctx = Context(run_id=1, node_id=1, node_config={"site-id": "A", "data-path": str(tmp_path / "A")},
                  state=RecordDict(), run_config=rc)
    assert audit_log_path(ctx) == tmp_path / "A" / ".onfh-cache" / "audit.jsonl"
    ctx = Context(run_id=1, node_id=1, node_config={"site-id": "A", "data-path": str(tmp_path), "audit-log": str(tmp_path / "x.jsonl")},
                  state=RecordDict(), run_config=rc)
    assert audit_log_path(ctx) == tmp_path / "x.jsonl"
