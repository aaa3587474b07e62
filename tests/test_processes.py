"""Issue 16, row 15: every process a run starts dies with it, ``kill -9`` of the CLI included, and
the simulation's services listen on 127.0.0.1 only (Ray's too).

The fast tests use a launcher script that starts a grandchild in a session of its own (re-parented
to PID 1 when its parent exits, as Flower's SuperExec and Ray's agents are). The slow test kills
``onfh sim run`` with SIGKILL in the middle of a real Flower simulation. Processes are found by
``FLWR_HOME`` and by the process tree, never by the watchdog's own tag, so the check does not
depend on the mechanism it checks.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from shared_models.processes import TAG_VARIABLE, tied_to_this_process

ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def _alive(pids) -> list[int]:
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


def _wait_gone(pids, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while _alive(pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    return _alive(pids)


LAUNCHER = textwrap.dedent("""
    import subprocess, sys, time
    from shared_models.processes import tied_to_this_process
    with tied_to_this_process():
        child = subprocess.Popen(["bash", "-c", "setsid sleep 300 & echo $!; sleep 300"], stdout=subprocess.PIPE,
                                 start_new_session=True, text=True)
        print(child.pid, child.stdout.readline().strip(), flush=True)
        time.sleep(float(sys.argv[1]))
""")


def _launch(tmp_path: Path, seconds: float) -> tuple[subprocess.Popen, list[int]]:
    script = tmp_path / "launcher.py"
    script.write_text(LAUNCHER)
    env = {k: v for k, v in os.environ.items() if k != TAG_VARIABLE}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(seconds)], stdout=subprocess.PIPE, text=True, cwd=ROOT, env=env
    )
    pids = [int(p) for p in proc.stdout.readline().split()]
    assert len(pids) == 2 and _alive(pids) == pids, "launcher did not start its children"
    return proc, pids


def test_kill_9_of_the_launcher_stops_its_children_and_orphaned_grandchildren(tmp_path):
    proc, pids = _launch(tmp_path, 300)
    grandchild = psutil.Process(pids[1])
    assert grandchild.ppid() != proc.pid and os.getsid(pids[1]) != os.getsid(proc.pid)  # not in its tree's session
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _wait_gone(pids, 8.0) == []


def test_processes_stop_when_the_block_ends(tmp_path):
    proc, pids = _launch(tmp_path, 0.5)
    assert proc.wait(timeout=30) == 0
    assert _wait_gone(pids, 3.0) == []


def test_block_restores_the_environment_and_leaves_untagged_processes_alone():
    env = {"X": "1"}
    other = subprocess.Popen(["sleep", "30"])
    try:
        with tied_to_this_process(env) as tag:
            assert env[TAG_VARIABLE] == tag and len(tag) == 16
        assert env == {"X": "1"}
        assert _alive([other.pid]) == [other.pid]
    finally:
        other.kill()
        other.wait()


@pytest.mark.slow
def test_kill_9_of_sim_run_leaves_no_process_and_every_service_listens_on_loopback(tmp_path):
    from sim.phantoms import PROFILES, generate_phantoms
    from tests.conftest import TINY

    quick = PROFILES["quick"]
    profile = dataclasses.replace(
        quick,
        name="micro",
        heads_per_site={"A": 6, "B": 3},
        patients_per_site={"A": 4, "B": 2},
        scanners={s: quick.scanners[s] for s in ("A", "B")},
        external_groups={"external-1": ("B",)},
    )
    generate_phantoms(tmp_path / "data", profile, seed=1)
    out = tmp_path / "run"
    sets = {
        **TINY,
        "site-ids": "A,B",
        "report-groups": "A-test=A;external-1=B",
        "detector-rounds": 50,
        "detector-local-steps": 2,
        "stager-rounds": 1,
        "stager-local-steps": 1,
    }
    argv = [
        sys.executable,
        "-m",
        "shared_models.cli",
        "sim",
        "run",
        "--data",
        str(tmp_path / "data"),
        "--out",
        str(out),
        "--profile",
        "quick",
    ]
    for k, v in sets.items():
        argv += ["--set", f"{k}={v}"]
    env = {k: v for k, v in os.environ.items() if k != TAG_VARIABLE}
    with open(tmp_path / "cli.log", "wb") as log:
        cli = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    flwr_home = str(out / "flower" / "flwr-home")
    seen: dict[int, str] = {}
    listening: dict[str, set] = {}
    try:
        deadline = time.monotonic() + 420
        while time.monotonic() < deadline:
            procs = {p.pid: p for p in psutil.Process(cli.pid).children(recursive=True)}
            for p in psutil.process_iter():
                try:
                    if p.environ().get("FLWR_HOME") == flwr_home:
                        procs[p.pid] = p
                except (psutil.Error, OSError):
                    continue
            for pid, p in procs.items():
                try:
                    seen[pid] = p.name()
                    for c in p.net_connections(kind="inet"):
                        if c.status == psutil.CONN_LISTEN:
                            listening.setdefault(c.laddr.ip, set()).add(p.name())
                except (psutil.Error, OSError):
                    continue
            # Ray's workers run the ClientApps: the whole process zoo is up
            if sum("ClientAppActor" in name for name in seen.values()) >= 1 and "raylet" in seen.values():
                break
            assert cli.poll() is None, (tmp_path / "cli.log").read_text()[-2000:]
            time.sleep(1.0)
        else:
            pytest.fail(f"the simulation did not start Ray's workers; seen {sorted(set(seen.values()))}")
        time.sleep(2.0)  # a last look at the sockets once every worker is up
        for pid in list(seen):
            try:
                for c in psutil.Process(pid).net_connections(kind="inet"):
                    if c.status == psutil.CONN_LISTEN:
                        listening.setdefault(c.laddr.ip, set()).add(seen[pid])
            except (psutil.Error, OSError):
                continue
        cli.send_signal(signal.SIGKILL)
        cli.wait()
        survivors = _wait_gone(list(seen), 15.0)
        assert survivors == [], f"still running after kill -9 of the CLI: {[(p, seen[p]) for p in survivors]}"
        assert listening and set(listening) <= set(LOOPBACK), f"services listening beyond loopback: {listening}"
        names = {n for ns in listening.values() for n in ns}
        assert {"gcs_server", "raylet"} <= names and any(n.startswith("flower-superlin") for n in names), names
    finally:
        for pid in _alive(list(seen)):
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass
