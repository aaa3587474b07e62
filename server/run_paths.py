"""Coordinator paths kept out of the run config that Flower sends to every site.

In deployment Flower ships a run's config to every SuperNode, so a path in it (the coordinator's
``out-dir`` and ``signing-key``) would travel to every hospital (issue 16, "no local paths leave
the machine"). :func:`hide_coordinator_paths` (called by ``server.coordinator.launch``) replaces
them by a reference, ``coordinator-run:<random token>``, and writes the real values to
``<FLWR_HOME>/onfh-runs/<token>.json`` on the coordinator (mode 0600). The ServerApp runs under
the SuperLink that ``onfh coordinator start-superlink`` started with that ``FLWR_HOME``, and
:func:`resolve_coordinator_paths` reads them back. A run config without a reference (simulation,
where nothing leaves the machine) is returned unchanged.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path

from shared_models.safe_files import read_regular_file

REFERENCE_PREFIX = "coordinator-run:"
HIDDEN_KEYS = ("out-dir", "signing-key", "tracking-uri")  # tracking-uri: a local store or an internal server
FOLDER_NAME = "onfh-runs"
_TOKEN = re.compile(r"[0-9a-f]{32}")


def hide_coordinator_paths(run_config: Mapping[str, object], flwr_home: Path) -> dict[str, object]:
    """The run config to send, with :data:`HIDDEN_KEYS` replaced by one reference; the values are
    written to ``<flwr_home>/onfh-runs/<token>.json``.

    Returns:
        A copy of ``run_config``: ``out-dir`` = ``"coordinator-run:<token>"``, ``signing-key`` and
        ``tracking-uri`` = ``""``.
    """
    token = secrets.token_hex(16)
    folder = Path(flwr_home).resolve() / FOLDER_NAME
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{token}.json"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({k: str(run_config.get(k, "")) for k in HIDDEN_KEYS}, fh)
    return {**run_config, **{k: "" for k in HIDDEN_KEYS}, "out-dir": REFERENCE_PREFIX + token}


def resolve_coordinator_paths(run_config: Mapping[str, object]) -> dict[str, object]:
    """ServerApp side of :func:`hide_coordinator_paths`: a copy of ``run_config`` with the real
    ``out-dir`` and ``signing-key`` when ``out-dir`` is a reference; unchanged otherwise.

    Raises:
        ValueError: a malformed reference, ``FLWR_HOME`` unset, or no record for the token
            (names the file).
    """
    out_dir = str(run_config.get("out-dir", ""))
    if not out_dir.startswith(REFERENCE_PREFIX):
        return dict(run_config)
    token = out_dir[len(REFERENCE_PREFIX) :]
    if not _TOKEN.fullmatch(token):
        raise ValueError(f"run config out-dir {out_dir!r}: not a valid coordinator run reference")
    home = os.environ.get("FLWR_HOME")
    if not home:
        raise ValueError(
            "run config out-dir is a coordinator run reference, but FLWR_HOME is not set here: "
            "start the SuperLink with `onfh coordinator start-superlink`"
        )
    path = Path(home) / FOLDER_NAME / f"{token}.json"
    try:
        values = json.loads(read_regular_file(path, 64 << 10))
    except FileNotFoundError:
        raise ValueError(
            f"{path}: no record of this run's out-dir on this machine (was it launched with another FLWR_HOME?)"
        ) from None
    return {**run_config, **{k: str(values.get(k, "")) for k in HIDDEN_KEYS}}
