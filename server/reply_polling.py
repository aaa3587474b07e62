"""A Flower ``Grid`` that waits for replies with short polls that back off, instead of a fixed 3 s.

Flower 1.42's deployment grid (``flwr.superlink.grid.http_grid``) pushes a round's messages, then
asks the SuperLink for the replies and sleeps 3 s between asks. A round therefore waits on
average 1.5 s (at most 3 s) after its last reply before it aggregates, twice a round (train, then
evaluate). :class:`ReplyPollingGrid` wraps any ``Grid`` and replaces only
:meth:`send_and_receive`, built on the grid's own public ``push_messages`` and ``pull_messages``:
it asks after ``min_poll_s`` and doubles the wait while no reply comes, up to ``max_poll_s``, and
starts short again after every reply. Everything else is the wrapped grid's. (Issue 8,
"deployment overhead".)
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

from server.grid_wrapper import WrappedGrid


class ReplyPollingGrid(WrappedGrid):
    """``grid`` with :meth:`send_and_receive` polling every ``min_poll_s``..``max_poll_s`` seconds.

    Args:
        grid: the ServerApp's grid (deployment or simulation).
        min_poll_s: first wait after a push or a reply, seconds (> 0).
        max_poll_s: longest wait between two asks, seconds (>= ``min_poll_s``).

    Raises:
        ValueError: a poll interval out of range.
    """

    def __init__(self, grid: Grid, *, min_poll_s: float = 0.05, max_poll_s: float = 0.5) -> None:
        if not 0 < min_poll_s <= max_poll_s:
            raise ValueError(f"need 0 < min_poll_s <= max_poll_s, got {min_poll_s} and {max_poll_s}")
        self.grid, self.min_poll_s, self.max_poll_s = grid, float(min_poll_s), float(max_poll_s)

    # ------------------------------------------------------------------ the one change
    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``, then pull their replies until all came or ``timeout`` seconds passed.

        Same contract as Flower's ``Grid.send_and_receive``: returns the replies that arrived (a
        node that never answers is simply missing); ``timeout=None`` waits for all.
        """
        pending = set(self.grid.push_messages(messages))
        end = None if timeout is None else time.monotonic() + float(timeout)
        replies: list[Message] = []
        wait = self.min_poll_s
        while pending:
            got = list(self.grid.pull_messages(pending))
            replies.extend(got)
            pending -= {m.metadata.reply_to_message_id for m in got}
            if not pending:
                break
            wait = self.min_poll_s if got else min(self.max_poll_s, wait * 2)
            if end is not None:
                left = end - time.monotonic()
                if left <= 0:
                    break
                wait = min(wait, left)
            time.sleep(wait)
        return replies


def with_reply_polling(grid: Grid) -> Grid:
    """``grid`` wrapped in :class:`ReplyPollingGrid`, except Flower's simulation grid
    (``InMemoryGrid``), which already polls its in-process state every 0.1 s."""
    return (
        grid if type(grid).__name__ == "InMemoryGrid" or isinstance(grid, ReplyPollingGrid) else ReplyPollingGrid(grid)
    )
