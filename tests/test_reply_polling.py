"""ReplyPollingGrid (server/reply_polling.py): Flower's send_and_receive contract with short, backing-off polls."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from flwr.serverapp import Grid

from server.reply_polling import ReplyPollingGrid, with_reply_polling


class FakeGrid(Grid):
    """Replies to message ``i`` become available ``delays[i]`` seconds after the push (None: never)."""

    def __init__(self, delays):
        self.delays, self.pulls, self.pushed_at = delays, [], None

    def set_run(self, run):
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return SimpleNamespace(content=content, message_type=message_type, dst=dst_node_id, group=group_id, ttl=ttl)

    def get_node_ids(self):
        return [11, 12]

    def push_messages(self, messages):
        self.pushed_at = time.monotonic()
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, message_ids):
        now = time.monotonic() - self.pushed_at
        self.pulls.append(now)
        ready = [m for m in message_ids if self.delays[int(m[1:])] is not None and self.delays[int(m[1:])] <= now]
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=m)) for m in ready]

    def send_and_receive(self, messages, *, timeout=None):  # Flower's: a 3 s sleep between pulls
        raise AssertionError("the wrapper must not call the wrapped send_and_receive")


def test_replies_are_collected_soon_after_they_arrive():
    fake = FakeGrid([0.0, 0.3, 0.6])
    grid = ReplyPollingGrid(fake, min_poll_s=0.02, max_poll_s=0.1)
    t0 = time.monotonic()
    replies = grid.send_and_receive([object()] * 3, timeout=None)
    took = time.monotonic() - t0
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["m0", "m1", "m2"]
    # the last reply is ready at 0.6 s and is asked for within one max_poll_s (+ scheduling slack)
    assert 0.6 <= took < 0.6 + 0.1 + 0.15
    # backoff: far fewer asks than polling every min_poll_s for 0.6 s (30), more than one per max_poll_s
    assert 6 <= len(fake.pulls) < 30


def test_a_silent_node_is_missing_after_the_timeout():
    fake = FakeGrid([0.0, None])
    grid = ReplyPollingGrid(fake, min_poll_s=0.02, max_poll_s=0.1)
    t0 = time.monotonic()
    replies = grid.send_and_receive([object()] * 2, timeout=0.4)
    took = time.monotonic() - t0
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0"]
    assert 0.4 <= took < 0.4 + 0.15


def test_everything_but_send_and_receive_is_the_wrapped_grids():
    fake = FakeGrid([0.0])
    grid = with_reply_polling(fake)
    assert isinstance(grid, ReplyPollingGrid) and with_reply_polling(grid) is grid
    grid.set_run("run-7")
    assert grid.run == "run-7" and list(grid.get_node_ids()) == [11, 12] and grid.delays == [0.0]
    msg = grid.create_message({"k": 1}, "train", 12, "3", ttl=5.0)
    assert (msg.message_type, msg.dst, msg.group, msg.ttl) == ("train", 12, "3", 5.0)
    with pytest.raises(ValueError, match="min_poll_s"):
        ReplyPollingGrid(fake, min_poll_s=0.5, max_poll_s=0.1)


def test_the_simulation_grid_is_left_alone():
    from shared_models.flower.internals import InMemoryGrid

    sim_grid = InMemoryGrid.__new__(InMemoryGrid)  # Flower's own class; its state is not needed here
    assert with_reply_polling(sim_grid) is sim_grid
