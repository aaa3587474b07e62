"""The environment of every Flower process this project starts, and where Flower's scripts are.

One definition for the simulation runner (:mod:`sim.experiments.runner`), the coordinator
(:mod:`server.coordinator`), the site daemon (:mod:`client.site_daemon`) and the in-process MedMNIST
simulation, following ``FLOWER-1.42-NOTES.md`` ("Offline and reproducible runs"):

* ``FLWR_HOME``: a project-local folder (otherwise state goes to ``~/.flwr``);
* ``FLWR_DISABLE_UPDATE_CHECK=1`` and ``FLWR_TELEMETRY_ENABLED=0``: no phone-home;
* ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``: **essential**, otherwise the SuperLink
  ``uv sync``\\ s the app's dependencies per run (exit code 608 offline; with a warm uv cache a
  different torch ahead of the venv on ``sys.path``);
* with Ray (simulation only): a project-local ``RAY_TMPDIR`` and Ray kept on loopback.

Imports neither torch nor Flower (rule 4 of :mod:`shared_models.flower`).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

__all__ = ["FLOWER_SWITCHES", "RAY_SWITCHES", "flower_bin", "flower_env", "flower_variables"]

#: Set for every Flower process: no update check, no telemetry, no runtime dependency installation.
FLOWER_SWITCHES: dict[str, str] = {
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
}
#: Set for a simulation (Ray backend) besides ``RAY_TMPDIR``.
RAY_SWITCHES: dict[str, str] = {
    "RAY_DEDUP_LOGS": "0",
    "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    # local Ray only: its node address is 127.0.0.1, so GCS, raylet and workers listen on loopback
    # (Ray's services.get_node_ip_address; otherwise they listen on every interface) (issue 16)
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
}


def flower_variables(flwr_home: Path, ray_tmp: Path | None = None) -> dict[str, str]:
    """The Flower (and, with ``ray_tmp``, Ray) variables of a run, without the rest of the environment.

    Args:
        flwr_home: the run's ``FLWR_HOME`` folder.
        ray_tmp: the run's ``RAY_TMPDIR`` for a simulation; None when no Ray runs (deployment).

    Returns:
        Variable name -> value, strings only.
    """
    variables = {"FLWR_HOME": str(flwr_home), **FLOWER_SWITCHES}
    if ray_tmp is not None:
        variables.update({"RAY_TMPDIR": str(ray_tmp), **RAY_SWITCHES})
    return variables


def flower_env(
    flwr_home: Path,
    *,
    ray_tmp: Path | None = None,
    threads: int | None = None,
    local_superlink_port: int | None = None,
    base: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The full environment of a Flower process started by this project.

    ``base`` (default ``os.environ``) plus :func:`flower_variables`, this interpreter's scripts first on
    ``PATH`` (the SuperLink and SuperNode start ``flower-superexec``, ``flwr-serverapp`` and
    ``flwr-clientapp`` by name, and Ray its workers, even when the venv was not activated) and
    ``PYTHONUNBUFFERED=1`` (logs reach their files as they happen).

    Args:
        flwr_home: the run's ``FLWR_HOME``.
        ray_tmp: ``RAY_TMPDIR`` of a simulation (adds :data:`RAY_SWITCHES`); None in deployment.
        threads: if given, ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` (torch threads of each ClientApp;
            Flower starts one process per message, and torch otherwise takes every core).
        local_superlink_port: if given, ``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``, so a local SuperLink that
            ``flwr`` may start never collides with someone else's.
        base: the environment to extend (not modified); default the current process's.

    Returns:
        A new dict, ready for ``subprocess.Popen(env=...)``.
    """
    env = dict(os.environ if base is None else base)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(flower_variables(flwr_home, ray_tmp))
    env["PYTHONUNBUFFERED"] = "1"
    if threads:
        env.update({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)})
    if local_superlink_port is not None:
        env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(local_superlink_port)
    return env


def flower_bin(name: str) -> str:
    """The path of Flower's console script ``name`` (``flwr``, ``flower-superlink``, ...) in this interpreter's
    environment; the bare name (found on ``PATH``) when it is not there."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name
