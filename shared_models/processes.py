"""Process helpers shared by the simulation runner, the coordinator and the site daemon.

Neither of these is federated learning: stopping a Flower process tree (psutil) and writing a
run-config override file (TOML values).
"""

from __future__ import annotations

import json


def stop_process_tree(pid: int, timeout_s: float = 15.0) -> None:
    """SIGTERM a process and its descendants, SIGKILL what is left after ``timeout_s`` seconds."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass


def toml_value(value) -> str:
    """A run-config value as TOML (str, int, float or bool only).

    Raises:
        TypeError: for any other type.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    raise TypeError(f"run-config values must be str, int, float or bool, got {type(value).__name__}")
