"""The site's audit log: one JSON line for every message that leaves the site.

A hospital must be able to show what its node sent. Every reply the ClientApp returns (and
every error reply, whose text :func:`client.client_app._contained` already strips to the step
and exception type) is described in an append-only JSON-lines file at the site:

``{"time", "run_id", "message_type", "round", "phase", "action", "arrays": [{"record", "name",
"shape", "dtype"}], "metrics": [{"record", "names"}], "configs": [{"record", "names"}],
"bytes", "error", "prev_sha256"}``

* ``bytes`` is the size of the reply's content serialised by Flower (protobuf), in bytes;
* metric and config **names** only, never their values; array **names, shapes and dtypes**,
  never their values; no site path, study, patient id or DICOM tag ever enters an entry;
* ``prev_sha256`` is the SHA-256 of the previous line, so a deleted or edited line breaks the
  chain (:func:`verify_audit_log`); lines are appended under an exclusive ``flock``, because
  each message runs in its own ``flwr-clientapp`` process.

**Anchors (issue 16).** A chain alone cannot show that its *tail* is intact: the last line can be
edited, the last lines deleted, a well-chained line appended, or the whole chain rewritten. So
every reply carries the SHA-256 of its own log line (ConfigRecord ``audit``, key ``head-sha256``;
the line holds names, shapes and times only, so its hash identifies no one), and the ServerApp
keeps these anchors per site and round in the run folder (``audit-anchors.json``) and in
``report.json`` (:mod:`server.audit_anchors`). :func:`verify_audit_anchors` (``onfh site
verify-audit --anchors``) then finds each anchored line in the log, and refuses lines of an
anchored run written after that run's last anchor. Because each line holds its predecessor's
hash, one anchored line vouches for every line before it.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message

from shared_models.specs import ACTION, ANCHOR_KEY, ANCHOR_RECORD, CONFIG, PHASE, SERVER_ROUND

log = logging.getLogger(__name__)

AUDIT_NAME = "audit.jsonl"


def line_sha256(entry: dict) -> str:
    """Hex SHA-256 of the line :func:`append_entry` writes for ``entry`` (without its newline)."""
    return hashlib.sha256(json.dumps(entry, sort_keys=True).encode()).hexdigest()


def _header(request: Message) -> dict:
    config = request.content.config_records.get(CONFIG, {}) if request.has_content() else {}
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run_id": int(request.metadata.run_id),
        "message_type": str(request.metadata.message_type),
        "round": int(config[SERVER_ROUND]) if SERVER_ROUND in config else None,
        "phase": str(config[PHASE]) if PHASE in config else None,
        "action": str(config[ACTION]) if ACTION in config else None,
        "arrays": [],
        "metrics": [],
        "configs": [],
        "bytes": 0,
        "error": None,
    }


def describe_message(reply: Message, request: Message) -> dict:
    """What a reply carries, without any values: arrays (names, shapes, dtypes), metric and config names, bytes.

    Args:
        reply: the message leaving the site.
        request: the message it answers (for the round, phase or action).
    """
    from shared_models.flower.internals import recorddict_to_proto

    entry = _header(request)
    if reply.has_error():
        entry["error"] = reply.error.reason
        return entry
    content = reply.content
    for rname, record in content.array_records.items():
        for name, array in record.items():
            entry["arrays"].append(
                {"record": rname, "name": name, "shape": list(array.shape), "dtype": str(array.dtype)}
            )
    entry["metrics"] = [{"record": r, "names": sorted(rec.keys())} for r, rec in content.metric_records.items()]
    entry["configs"] = [{"record": r, "names": sorted(rec.keys())} for r, rec in content.config_records.items()]
    entry["bytes"] = int(recorddict_to_proto(content).ByteSize())
    return entry


def append_entry(path: Path, entry: dict) -> dict:
    """Append ``entry`` as one JSON line, chained to the previous line by ``prev_sha256``.

    Returns:
        The entry as written.

    Raises:
        OSError: the log cannot be written (the caller decides whether the reply may still go).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o640)
    with os.fdopen(fd, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 65536))
            tail = fh.read().splitlines()
            entry = {**entry, "prev_sha256": hashlib.sha256(tail[-1]).hexdigest() if tail else None}
            fh.write(json.dumps(entry, sort_keys=True).encode() + b"\n")
            fh.flush()
            os.fsync(fh.fileno())
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
    return entry


def read_audit_log(path: Path) -> list[dict]:
    """All entries of an audit log, oldest first.

    Raises:
        ValueError: a line is not JSON (names the file and line number).
    """
    entries = []
    for number, line in enumerate(Path(path).read_bytes().splitlines(), start=1):
        try:
            entries.append(json.loads(line))
        except ValueError:
            raise ValueError(f"{path}: line {number} is not a JSON audit entry") from None
    return entries


def verify_audit_log(path: Path) -> int:
    """Check the ``prev_sha256`` chain of an audit log; return the number of entries.

    Raises:
        ValueError: naming the first line whose predecessor was removed or changed.
    """
    previous = None
    lines = Path(path).read_bytes().splitlines()
    for number, line in enumerate(lines, start=1):
        entry = json.loads(line)
        expected = hashlib.sha256(previous).hexdigest() if previous is not None else None
        if entry.get("prev_sha256") != expected:
            raise ValueError(f"{path}: line {number} does not follow line {number - 1} (edited or removed lines)")
        previous = line
    return len(lines)


def verify_audit_anchors(path: Path, anchors: list[dict]) -> dict:
    """Check an audit log against the anchors the coordinator recorded for this site.

    Args:
        path: the site's ``audit.jsonl``.
        anchors: this site's anchors, oldest first: dicts with ``sha256`` (and ``run_id``,
            ``message_type``, ``round``, ``phase``, ``action`` to name them), as in the
            ``audit_anchors`` of ``audit-anchors.json``, ``report.json`` or a bundle's ``metrics.json``.

    Returns:
        ``{"entries", "anchors", "runs", "unanchored_other_runs"}``: lines in the log, anchors
        found, the anchored run ids, and lines of other (not anchored) runs, which cannot be judged.

    Raises:
        ValueError: the chain is broken; an anchored line is missing (edited, deleted or the chain
            rewritten); or a line of an anchored run that is not an error entry follows that run's
            last anchor (appended afterwards, or a reply the coordinator never received). The
            message names the file and the line or the anchor.
    """
    count = verify_audit_log(path)
    lines = Path(path).read_bytes().splitlines()
    position = {hashlib.sha256(line).hexdigest(): i for i, line in enumerate(lines)}
    last: dict[int, int] = {}
    for anchor in anchors:
        i = position.get(str(anchor.get("sha256")))
        if i is None:
            what = anchor.get("phase") or anchor.get("action") or "?"
            raise ValueError(
                f"{path}: no line matches the coordinator's anchor for run {anchor.get('run_id')}, "
                f"{anchor.get('message_type')} {what} round {anchor.get('round')}: the line was edited or "
                f"deleted, or the log was rewritten"
            )
        run = int(json.loads(lines[i])["run_id"])
        last[run] = max(last.get(run, -1), i)
    others = 0
    for i, line in enumerate(lines):
        entry = json.loads(line)
        run = int(entry.get("run_id", -1))
        if run not in last:
            others += 1
        elif i > last[run] and not _is_error_entry(entry):
            raise ValueError(
                f"{path}: line {i + 1} (run {run}, {entry.get('message_type')} round {entry.get('round')}) follows the "
                f"coordinator's last anchor for that run: appended afterwards, or a reply the coordinator never received"
            )
    return {"entries": count, "anchors": len(anchors), "runs": sorted(last), "unanchored_other_runs": others}


def _is_error_entry(entry: dict) -> bool:
    """An error reply's line: a non-empty reason and nothing attached (no arrays, metrics, configs or bytes)."""
    error = entry.get("error")
    return (
        isinstance(error, str)
        and bool(error.strip())
        and not entry.get("arrays")
        and not entry.get("metrics")
        and not entry.get("configs")
        and not entry.get("bytes")
    )


def audited(log_path: Callable[[Context], Path]):
    """Decorate a ClientApp handler so that its reply (or its error) is recorded before it leaves.

    Args:
        log_path: ``context -> Path`` of the site's audit log.

    A handler that raises is recorded as an error entry holding only the exception's type
    and the (already stripped) message, then the exception is re-raised for Flower to send.
    If the audit log cannot be written, the reply is not sent (the exception propagates):
    nothing leaves the site unrecorded. A reply carries its entry's anchor (module docstring):
    the entry is made with a placeholder of the same length, so its ``bytes`` stay exact.
    """

    def decorate(handler):
        @functools.wraps(handler)
        def wrapper(msg: Message, context: Context) -> Message:
            path = log_path(context)
            try:
                reply = handler(msg, context)
            except Exception as exc:
                append_entry(path, {**_header(msg), "error": f"{type(exc).__name__}: {exc}"})
                raise
            reply.content[ANCHOR_RECORD] = ConfigRecord({ANCHOR_KEY: "0" * 64})
            written = append_entry(path, describe_message(reply, msg))
            reply.content[ANCHOR_RECORD][ANCHOR_KEY] = line_sha256(written)
            return reply

        return wrapper

    return decorate
