"""The coordinator's record of every site's audit-log head (issue 16, "audit log anchored").

Every reply a site sends carries the SHA-256 of the audit-log line that describes it
(:mod:`client.audit`, ConfigRecord ``audit``). :class:`AnchorRecordingGrid` wraps the ServerApp's
grid and keeps those anchors, per site, with the run id, message type, round, phase or action
of the request they answer, in ``audit-anchors.json`` of the run folder (rewritten after every
exchange; a resumed run appends) and, at the end, in ``report.json``::

    {"audit_anchors": {"A": [{"run_id", "message_type", "round", "phase", "action", "sha256"}, ...]}}

A site checks its log against them with ``onfh site verify-audit --anchors`` (:func:`client.audit.
verify_audit_anchors`). A reply without an anchor (an error reply, or a site on an older release)
is simply not recorded.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from server.grid_wrapper import WrappedGrid
from shared_models.anchors import load_anchors
from shared_models.specs import ACTION, ANCHOR_KEY, ANCHOR_RECORD, CONFIG, PHASE, SERVER_ROUND

ANCHORS_NAME = "audit-anchors.json"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class AnchorRecordingGrid(WrappedGrid):
    """``grid`` whose :meth:`send_and_receive` records the audit anchor of every reply.

    Args:
        grid: the ServerApp's grid (deployment or simulation, possibly wrapped).
        path: the run folder's ``audit-anchors.json``; anchors already there are kept.

    Attributes:
        node_sites: node id -> site id; set after site discovery. Anchors of nodes not in it
            (e.g. a refused node) are filed under ``node-<id>``.
    """

    def __init__(self, grid: Grid, path: Path) -> None:
        self.grid, self.path = grid, Path(path)
        self.node_sites: dict[int, str] = {}
        self._saved = load_anchors(self.path)
        self._new: list[tuple[int, dict]] = []

    # ------------------------------------------------------------------ the one change
    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """The wrapped grid's ``send_and_receive``; then every reply's anchor is recorded and saved."""
        messages = list(messages)
        sent = {m.metadata.dst_node_id: m for m in messages}
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        for reply in replies:
            request = sent.get(reply.metadata.src_node_id)
            if reply.has_error() or request is None or ANCHOR_RECORD not in reply.content.config_records:
                continue
            head = str(reply.content.config_records[ANCHOR_RECORD].get(ANCHOR_KEY, ""))
            if not _HEX64.match(head):
                continue
            # the server's own config of the request (values it wrote: ints and strings)
            config: Mapping[str, Any] = request.content.config_records.get(CONFIG, {}) if request.has_content() else {}
            self._new.append(
                (
                    reply.metadata.src_node_id,
                    {
                        "run_id": int(reply.metadata.run_id),
                        "message_type": str(request.metadata.message_type),
                        "round": int(config[SERVER_ROUND]) if SERVER_ROUND in config else None,
                        "phase": str(config[PHASE]) if PHASE in config else None,
                        "action": str(config[ACTION]) if ACTION in config else None,
                        "sha256": head,
                    },
                )
            )
        if replies:
            self.save()
        return replies

    def anchors(self) -> dict[str, list[dict]]:
        """Every site's anchors, oldest first (earlier runs of this folder first)."""
        out = {site: list(entries) for site, entries in self._saved.items()}
        for node, anchor in self._new:
            out.setdefault(self.node_sites.get(node, f"node-{node}"), []).append(anchor)
        return out

    def save(self) -> None:
        """Rewrite ``audit-anchors.json`` atomically (write, then rename)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"audit_anchors": self.anchors()}, indent=1))
        os.replace(tmp, self.path)
