"""A Flower ``Grid`` that hands every call to the grid it wraps: the base of the ServerApp's grid wrappers
(:class:`server.reply_polling.ReplyPollingGrid`, :class:`server.audit_anchors.AnchorRecordingGrid`), which
each override one method."""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid


class WrappedGrid(Grid):
    """``grid`` itself, call for call; subclasses override what they change.

    Args:
        grid: the ServerApp's grid (deployment or simulation, possibly wrapped already).
    """

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(
        self,
        content,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self):
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def __getattr__(self, name: str):
        if name == "grid":  # not set yet: no recursion
            raise AttributeError(name)
        return getattr(self.grid, name)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.grid.send_and_receive(messages, timeout=timeout)
