"""Flower messages built outside a running Flower process, for tests: one place for the metadata.

A running SuperLink stamps each message's :class:`flwr.app.Metadata`; a test that feeds a strategy or a
server handler replies directly must build them itself, through Flower's non-public ``make_message``
(taken, like every Flower internal, only from :mod:`shared_models.flower.internals`). Building a
message needs ``TaskIdentity`` set: use the ``task_identity`` fixture of ``tests/conftest.py``.
"""

from __future__ import annotations

import time

from flwr.app import ArrayRecord, Error, Message, Metadata, MetricRecord, RecordDict

from shared_models.flower.internals import make_message


def message(
    src: int,
    content: RecordDict | None = None,
    *,
    message_type: str = "train",
    dst: int = 0,
    run_id: int = 1,
    message_id: str | None = None,
    reply_to: str = "q",
    ttl: float = 60.0,
    error: str | None = None,
) -> Message:
    """A message from node ``src`` to node ``dst`` (default: a site's reply to the server's message ``"q"``).

    ``message_id`` defaults to ``f"m{src}"``; ``created_at`` is now. With ``error`` the message carries a
    Flower :class:`~flwr.app.Error` (code 0, that reason) instead of ``content``.
    """
    metadata = Metadata(
        run_id=run_id,
        message_id=f"m{src}" if message_id is None else message_id,
        src_node_id=src,
        dst_node_id=dst,
        reply_to_message_id=reply_to,
        group_id="",
        created_at=time.time(),
        ttl=ttl,
        message_type=message_type,
    )
    if error is not None:
        return make_message(metadata=metadata, error=Error(code=0, reason=error))
    return make_message(metadata=metadata, content=content)


def reply(src: int, arrays: ArrayRecord | None, metrics: dict, *, message_type: str = "train") -> Message:
    """A site's reply carrying ``metrics`` (a ``"metrics"`` :class:`~flwr.app.MetricRecord`) and, unless
    ``arrays`` is None, those ``"arrays"``."""
    content = RecordDict({"metrics": MetricRecord(metrics)})
    if arrays is not None:
        content["arrays"] = arrays
    return message(src, content, message_type=message_type)
