"""The site's append-only audit log of every message that leaves the site (issue 7)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)

from client.audit import (
    append_entry,
    audited,
    describe_message,
    read_audit_log,
    verify_audit_log,
)
from shared_models.flower.internals import recorddict_to_proto
from tests.flower_messages import message

pytestmark = pytest.mark.usefixtures("task_identity")


def _request(message_type: str, config: dict, arrays: ArrayRecord | None = None) -> Message:
    content = RecordDict({"config": ConfigRecord(config)})
    if arrays is not None:
        content["arrays"] = arrays
    return message(0, content, message_type=message_type, dst=5, run_id=7, message_id="q1", reply_to="", ttl=600.0)


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
    reply = Message(
        content=RecordDict(
            {"site": ConfigRecord({"site-id": "St-Elsewhere"}), "metrics": MetricRecord({"heads-train": 4})}
        ),
        reply_to=request,
    )
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
    ctx = Context(
        run_id=1,
        node_id=1,
        node_config={"site-id": "A", "data-path": str(tmp_path / "A")},
        state=RecordDict(),
        run_config=rc,
    )
    assert audit_log_path(ctx) == tmp_path / "A" / ".onfh-cache" / "audit.jsonl"
    ctx = Context(
        run_id=1,
        node_id=1,
        node_config={"site-id": "A", "data-path": str(tmp_path), "audit-log": str(tmp_path / "x.jsonl")},
        state=RecordDict(),
        run_config=rc,
    )
    assert audit_log_path(ctx) == tmp_path / "x.jsonl"


def test_deployed_site_audit_log_is_not_moved_by_the_run_config(tmp_path):
    """The coordinator's run config cannot move a deployed site's log away from where
    ``onfh site verify-audit --data`` looks; the site's own node config can."""
    from client.client_app import audit_log_path
    from tests.conftest import tiny_run_config

    rc = tiny_run_config(**{"cache-dir": str(tmp_path / "coordinator-chosen"), "data-root": str(tmp_path)})
    ctx = Context(
        run_id=1,
        node_id=1,
        node_config={"site-id": "A", "data-path": str(tmp_path / "A")},
        state=RecordDict(),
        run_config=rc,
    )
    assert audit_log_path(ctx) == tmp_path / "A" / ".onfh-cache" / "audit.jsonl"
    ctx = Context(
        run_id=1,
        node_id=1,
        node_config={"site-id": "A", "data-path": str(tmp_path / "A"), "cache-dir": str(tmp_path / "site-cache")},
        state=RecordDict(),
        run_config=rc,
    )
    assert audit_log_path(ctx) == tmp_path / "site-cache" / "audit.jsonl"
    sim = Context(
        run_id=1, node_id=1, node_config={"partition-id": 0, "num-partitions": 4}, state=RecordDict(), run_config=rc
    )  # simulation: the run config's cache, per site
    assert audit_log_path(sim) == tmp_path / "coordinator-chosen" / "A" / "audit.jsonl"


# --------------------------------------------------------------------------- anchors (issue 16, row 11)


def _anchored_log(tmp_path, rounds: int = 4):
    """A site log written by the audited handlers, and the anchors its replies carried."""
    from client.audit import ANCHOR_KEY, ANCHOR_RECORD

    path = tmp_path / "audit.jsonl"
    context = Context(run_id=7, node_id=5, node_config={}, state=RecordDict(), run_config={})

    @audited(lambda ctx: path)
    def train(msg, ctx):
        return _train_reply(msg)

    anchors = []
    for r in range(1, rounds + 1):
        reply = train(_request("train", {"phase": "detector", "server-round": r}), context)
        anchors.append(
            {
                "run_id": 7,
                "message_type": "train",
                "round": r,
                "phase": "detector",
                "action": None,
                "sha256": reply.content[ANCHOR_RECORD][ANCHOR_KEY],
            }
        )
    return path, anchors


def test_reply_carries_the_hash_of_its_own_log_line_and_bytes_stay_exact(tmp_path):
    import hashlib

    from client.audit import ANCHOR_KEY, ANCHOR_RECORD

    path, anchors = _anchored_log(tmp_path, rounds=2)
    lines = path.read_bytes().splitlines()
    assert [a["sha256"] for a in anchors] == [hashlib.sha256(line).hexdigest() for line in lines]
    reply = _train_reply(_request("train", {"phase": "detector", "server-round": 3}))
    reply.content[ANCHOR_RECORD] = ConfigRecord({ANCHOR_KEY: anchors[0]["sha256"]})
    assert read_audit_log(path)[0]["bytes"] == recorddict_to_proto(reply.content).ByteSize()
    assert {"record": "audit", "names": ["head-sha256"]} in read_audit_log(path)[0]["configs"]


def test_untouched_log_verifies_against_its_anchors(tmp_path):
    from client.audit import verify_audit_anchors

    path, anchors = _anchored_log(tmp_path)
    append_entry(path, {"run_id": 8, "round": 1, "error": None})  # a later run the anchors do not cover
    summary = verify_audit_anchors(path, anchors)
    assert summary == {"entries": 5, "anchors": 4, "runs": [7], "unanchored_other_runs": 1}


def _rechain(lines: list[bytes]) -> list[bytes]:
    """Recompute every prev_sha256, as an attacker who rewrites the log would."""
    import hashlib

    out, prev = [], None
    for line in lines:
        entry = json.loads(line)
        entry["prev_sha256"] = hashlib.sha256(prev).hexdigest() if prev is not None else None
        prev = json.dumps(entry, sort_keys=True).encode()
        out.append(prev)
    return out


@pytest.mark.parametrize("attack", ["edit-last-line", "delete-last-lines", "append-forged-line", "rewrite-chain"])
def test_every_tail_tampering_of_row_11_is_detected(tmp_path, attack):
    from client.audit import verify_audit_anchors

    path, anchors = _anchored_log(tmp_path)
    lines = path.read_bytes().splitlines()
    if attack == "edit-last-line":  # the chain stays valid: nothing follows the last line
        entry = json.loads(lines[-1])
        entry["bytes"] = 10
        lines[-1] = json.dumps(entry, sort_keys=True).encode()
    elif attack == "delete-last-lines":
        lines = lines[:-2]
    elif attack == "append-forged-line":  # well chained, same run, same shape as a real entry
        forged = {**json.loads(lines[-1]), "round": 5}
        import hashlib

        forged["prev_sha256"] = hashlib.sha256(lines[-1]).hexdigest()
        lines.append(json.dumps(forged, sort_keys=True).encode())
    else:  # every line changed and re-chained
        lines = _rechain([json.dumps({**json.loads(x), "bytes": 1}, sort_keys=True).encode() for x in lines])
    path.write_bytes(b"\n".join(lines) + b"\n")
    assert verify_audit_log(path) == len(lines)  # the chain alone sees nothing wrong
    expected = "line 5 .*follows the coordinator's last anchor" if attack == "append-forged-line" else "no line matches"
    with pytest.raises(ValueError, match=expected):
        verify_audit_anchors(path, anchors)


def test_error_entries_after_the_last_anchor_are_allowed(tmp_path):
    from client.audit import verify_audit_anchors

    path, anchors = _anchored_log(tmp_path, rounds=1)
    append_entry(path, {"run_id": 7, "round": 2, "error": "SiteStepError: train/detector failed"})  # no reply anchor
    assert verify_audit_anchors(path, anchors)["entries"] == 2
