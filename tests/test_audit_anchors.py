"""Issue 16, row 11: the ServerApp records every reply's audit anchor per site and round, and
``onfh site verify-audit --anchors`` checks a site's log against them."""

from __future__ import annotations

import hashlib
import json
import time

import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from client.audit import audited
from server.audit_anchors import AnchorRecordingGrid, load_anchors
from shared_models.cli import main
from tests.flower_messages import message

pytestmark = pytest.mark.usefixtures("task_identity")


def _message(src: int, dst: int, message_type: str, content: RecordDict, run_id: int = 3) -> Message:
    message_id = f"m{src}-{dst}-{time.monotonic_ns()}"
    return message(src, content, message_type=message_type, dst=dst, run_id=run_id, message_id=message_id, reply_to="")


class SiteGrid:
    """Nodes that answer every message through the real audited handler, each with its own log."""

    def __init__(self, logs: dict[int, object]):
        self.logs = logs

    def get_node_ids(self):
        return list(self.logs)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for m in messages:
            node = m.metadata.dst_node_id
            request = _message(0, node, m.metadata.message_type, m.content)
            ctx = Context(run_id=3, node_id=node, node_config={}, state=RecordDict(), run_config={})

            @audited(lambda _ctx, node=node: self.logs[node])
            def handler(msg, _ctx):
                return Message(content=RecordDict({"metrics": MetricRecord({"num-examples": 2})}), reply_to=msg)

            reply = handler(request, ctx)
            replies.append(_message(node, 0, m.metadata.message_type, reply.content))
        return replies


def _round(grid, nodes, r: int):
    msgs = [
        _message(0, n, "train", RecordDict({"config": ConfigRecord({"phase": "detector", "server-round": r})}))
        for n in nodes
    ]
    return grid.send_and_receive(msgs, timeout=5)


def test_anchors_are_recorded_per_site_and_round_and_a_resumed_run_appends(tmp_path):
    logs = {11: tmp_path / "A.jsonl", 22: tmp_path / "B.jsonl"}
    path = tmp_path / "run" / "audit-anchors.json"
    grid = AnchorRecordingGrid(SiteGrid(logs), path)
    grid.node_sites = {11: "A", 22: "B"}
    for r in (1, 2):
        _round(grid, [11, 22], r)
    saved = load_anchors(path)
    assert set(saved) == {"A", "B"} and [a["round"] for a in saved["A"]] == [1, 2]
    assert saved["A"][0]["message_type"] == "train" and saved["A"][0]["phase"] == "detector"
    for site, node in (("A", 11), ("B", 22)):  # each anchor is the hash of that site's own line
        lines = logs[node].read_bytes().splitlines()
        assert [a["sha256"] for a in saved[site]] == [hashlib.sha256(x).hexdigest() for x in lines]
    # a resumed run (new grid on the same folder) keeps the earlier anchors
    again = AnchorRecordingGrid(SiteGrid(logs), path)
    again.node_sites = {11: "A", 22: "B"}
    _round(again, [11], 3)
    assert [a["round"] for a in load_anchors(path)["A"]] == [1, 2, 3] and len(load_anchors(path)["B"]) == 2


def test_verify_audit_cli_passes_an_intact_log_and_names_a_deleted_tail(tmp_path, capsys):
    logs = {11: tmp_path / "A.jsonl"}
    grid = AnchorRecordingGrid(SiteGrid(logs), tmp_path / "audit-anchors.json")
    grid.node_sites = {11: "A"}
    for r in (1, 2, 3):
        _round(grid, [11], r)
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"strategy": "fedavg", "audit_anchors": grid.anchors()}))
    assert main(["site", "verify-audit", "--log", str(logs[11]), "--anchors", str(report), "--site", "A"]) == 0
    assert "every one of 3 anchors" in capsys.readouterr().out
    lines = logs[11].read_bytes().splitlines()
    logs[11].write_bytes(b"\n".join(lines[:-1]) + b"\n")  # the last line deleted: the chain still holds
    assert main(["site", "verify-audit", "--log", str(logs[11])]) == 0
    assert main(["site", "verify-audit", "--log", str(logs[11]), "--anchors", str(report), "--site", "A"]) == 1
    assert "train detector round 3" in capsys.readouterr().out.replace("\n", "")
    assert main(["site", "verify-audit", "--log", str(logs[11]), "--anchors", str(report), "--site", "Z"]) == 1


def test_replies_without_a_well_formed_anchor_are_not_recorded(tmp_path):
    class Plain(SiteGrid):
        def send_and_receive(self, messages, *, timeout=None):
            return [
                _message(
                    m.metadata.dst_node_id,
                    0,
                    "train",
                    RecordDict(
                        {
                            "audit": ConfigRecord({"head-sha256": "not-a-hash"}),
                            "metrics": MetricRecord({"num-examples": 1}),
                        }
                    ),
                )
                for m in messages
            ]

    grid = AnchorRecordingGrid(Plain({11: None}), tmp_path / "a.json")
    _round(grid, [11], 1)
    assert grid.anchors() == {}
