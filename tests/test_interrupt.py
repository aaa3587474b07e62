"""Ctrl-C during ``onfh sim run`` (issue 18): the run stops within 2 s, every Flower process is gone, the last
checkpoint verifies, and the command that resumes is printed."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from server.checkpoint import read_chain, verify_chain
from tests.conftest import TINY

pytestmark = pytest.mark.slow


def _flower_processes(flwr_home: str) -> list[int]:
    found = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("FLWR_HOME") == flwr_home and p.status() != psutil.STATUS_ZOMBIE:
                found.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    return found


def test_ctrl_c_stops_within_2_s_keeps_the_checkpoint_and_prints_the_resume_command(tmp_path):
    from sim.phantoms import PROFILES, generate_phantoms

    quick = PROFILES["quick"]
    profile = dataclasses.replace(
        quick,
        name="micro",
        heads_per_site={"A": 10, "B": 4},
        patients_per_site={"A": 6, "B": 2},
        scanners={s: quick.scanners[s] for s in ("A", "B")},
        external_groups={"external-1": ("B",)},
    )
    data, out = tmp_path / "data", tmp_path / "run"
    generate_phantoms(data, profile, seed=2)
    sets = {
        **TINY,
        "site-ids": "A,B",
        "report-groups": "A-test=A;external-1=B",
        "detector-rounds": 30,
        "stager-rounds": 2,
        "detector-local-steps": 2,
        "stager-local-steps": 2,
    }
    argv = ["sim", "run", "--data", str(data), "--out", str(out), "--profile", "quick"]
    for k, v in sets.items():
        argv += ["--set", f"{k}={v}"]
    log = open(tmp_path / "console.txt", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "shared_models.cli", *argv],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "COLUMNS": "400"},
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 600
        while len(read_chain(out / "checkpoints")) < 2:  # two detector rounds done: the run is well under way
            assert proc.poll() is None, (tmp_path / "console.txt").read_text()[-3000:]
            assert time.monotonic() < deadline, "the run did not reach round 2 in 10 minutes"
            time.sleep(0.5)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
        elapsed = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    text = (tmp_path / "console.txt").read_text()
    assert proc.returncode == 130, text[-3000:]
    assert elapsed <= 2.0, f"Ctrl-C took {elapsed:.1f} s"
    # every process of the run got SIGKILL at most 0.5 s after SIGTERM; give the kernel a moment to reap them
    flwr_home, gone_by = str(out / "flower" / "flwr-home"), time.monotonic() + 10
    while _flower_processes(flwr_home) and time.monotonic() < gone_by:
        time.sleep(0.2)
    assert _flower_processes(flwr_home) == []
    chain = read_chain(out / "checkpoints")
    verify_chain(chain, out / "checkpoints")  # the last checkpoint is whole and matches its chain entry
    assert f"last verified checkpoint: detector round {chain[-1]['round']}" in text
    assert "resume with the same command: onfh sim run --data " + str(data) in " ".join(text.split())
    assert chain[-1]["round"] < 30  # it did stop early
