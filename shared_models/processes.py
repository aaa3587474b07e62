"""Process helpers shared by the simulation runner, the coordinator and the site daemon.

None of these is federated learning: stopping a Flower process tree (psutil), writing a
run-config override file (TOML values), and a watchdog that stops every process a launcher
started when the launcher dies, even by ``kill -9`` (issue 16, :func:`tied_to_this_process`).
Hand-written because neither Flower nor Ray ties its processes to the command that started
them: Flower's SuperExec and Ray's agents run in sessions of their own, some re-parented to
PID 1, and Linux's ``PR_SET_PDEATHSIG`` reaches only a direct child.
"""

from __future__ import annotations

import json
import os
import secrets
import select
import signal
import subprocess
import sys
from collections.abc import MutableMapping
from contextlib import contextmanager
from pathlib import Path

import psutil


def _terminate_then_kill(procs: list, timeout_s: float) -> list:
    """SIGTERM every process of ``procs``, wait up to ``timeout_s`` seconds, SIGKILL what is left;
    returns the processes that needed SIGKILL."""
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
    return alive


def stop_process_tree(pid: int, timeout_s: float = 15.0) -> None:
    """SIGTERM a process and its descendants, SIGKILL what is left after ``timeout_s`` seconds."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    _terminate_then_kill(procs, timeout_s)


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


# --------------------------------------------------------------------------- processes die with their launcher

#: Environment variable that marks every process a launcher started, and their descendants (which
#: inherit it: Flower's SuperExec, ServerApp and ClientApps, Ray's GCS, raylet and workers).
TAG_VARIABLE = "ONFH_PROCESS_TAG"


def tagged_processes(tag: str) -> list:
    """The live processes whose environment holds ``ONFH_PROCESS_TAG=tag`` (psutil; this one excluded)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if (
                proc.pid != os.getpid()
                and proc.environ().get(TAG_VARIABLE) == tag
                and proc.status() != psutil.STATUS_ZOMBIE
            ):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


def stop_tagged(tag: str, timeout_s: float = 5.0, rounds: int = 3) -> int:
    """SIGTERM every process tagged ``tag`` and its descendants, SIGKILL what is left after
    ``timeout_s`` seconds; repeat while new ones appear (at most ``rounds`` times).

    Descendants count even without the tag: a process that sets its title (Ray's
    ``ray::DashboardAgent`` and ``ray::RuntimeEnvAgent``) overwrites the memory that
    ``/proc/PID/environ`` shows. They are collected before any signal, while still attached.

    Returns:
        The number of processes stopped.
    """
    stopped = 0
    for _ in range(rounds):
        found = {}
        for p in tagged_processes(tag):
            found[p.pid] = p
            try:
                found.update({c.pid: c for c in p.children(recursive=True)})
            except psutil.NoSuchProcess:
                pass
        procs = list(found.values())
        if not procs:
            break
        stopped += len(procs)
        psutil.wait_procs(_terminate_then_kill(procs, timeout_s), timeout=2.0)
    return stopped


def _watch(parent: int, parent_started: float, tag: str) -> int:
    """The watchdog's loop (``python -m shared_models.processes PARENT STARTED TAG``).

    Waits until the parent writes ``stop`` on stdin, closes it, or is gone (any death, ``kill -9``
    included: the pipe's other end closes with it, and the parent is polled every 0.5 s in case a
    forked child still holds that end), then stops every process tagged ``tag``. SIGTERM to the
    watchdog stops them too; SIGINT (a terminal's Ctrl-C) is left to the parent.
    """

    def parent_alive() -> bool:  # the same process (a reused pid has another start time), not a zombie
        try:
            proc = psutil.Process(parent)
            return abs(proc.create_time() - parent_started) < 1e-3 and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    terminated = []
    signal.signal(signal.SIGTERM, lambda *_: terminated.append(True))
    while not terminated and parent_alive():
        try:
            ready, _, _ = select.select([sys.stdin], [], [], 0.5)
        except InterruptedError:
            continue
        if ready:
            sys.stdin.readline()
            break  # "stop", or end of file: the parent closed the pipe or died
    stop_tagged(tag)
    return 0


class ProcessWatchdog:
    """Ties every process started with ``env`` (and their descendants) to this process's life.

    ``start(env)`` adds ``ONFH_PROCESS_TAG=<random>`` to ``env`` (``os.environ`` when None) and
    starts a small watchdog process in a session of its own. When this process ends by any means,
    ``kill -9`` included, or calls :meth:`stop`, the watchdog SIGTERMs, then SIGKILLs, every
    process that carries the tag: Flower daemons re-parented to PID 1 and Ray's processes too,
    which the launcher's own process tree no longer holds. Linux and macOS (psutil reads other
    processes' environments); a watchdog that is itself ``kill -9``-ed protects nothing.
    """

    def __init__(self) -> None:
        self.proc: subprocess.Popen[bytes] | None = None
        self.tag = ""
        self._env: MutableMapping[str, str] | None = None

    def start(self, env: MutableMapping[str, str] | None = None) -> str:
        """Tag ``env`` and start the watchdog; returns the tag."""
        self.tag = secrets.token_hex(8)
        self._env = os.environ if env is None else env
        self._env[TAG_VARIABLE] = self.tag
        watchdog_env = {k: v for k, v in os.environ.items() if k != TAG_VARIABLE}  # never stops itself
        me = psutil.Process()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shared_models.processes", str(me.pid), repr(me.create_time()), self.tag],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
            env=watchdog_env,
            cwd=str(Path(__file__).resolve().parents[1]),
        )
        return self.tag

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop every tagged process now (the watchdog does it) and wait for the watchdog."""
        if self.proc is None:
            return
        try:
            if self.proc.stdin is not None:  # always: started with stdin=PIPE
                self.proc.stdin.write(b"stop\n")
                self.proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        if self._env is not None and self._env.get(TAG_VARIABLE) == self.tag:
            del self._env[TAG_VARIABLE]
        self.proc = None


@contextmanager
def tied_to_this_process(env: dict | None = None):
    """``with tied_to_this_process(env) as tag:`` every process started with ``env`` (``os.environ``
    when None) inside the block, and its descendants, is stopped when the block ends or this
    process dies, ``kill -9`` included (:class:`ProcessWatchdog`). Yields the tag."""
    dog = ProcessWatchdog()
    tag = dog.start(env)
    try:
        yield tag
    finally:
        dog.stop()


if __name__ == "__main__":
    raise SystemExit(_watch(int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]))
