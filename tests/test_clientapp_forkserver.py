"""The fork launcher of site daemons (client/clientapp_forkserver.py): warm imports, one child per task."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from client import clientapp_forkserver as fs
from client import site_daemon as sd
from shared_models.flower import internals as flower_internals

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="fork and /proc are Linux")


def _spec(task_id: int = 1, token: str = "ab" * 8):
    return flower_internals.ExecutionSpec(
        task_type=flower_internals.TaskType.CLIENT_APP,
        runtime_api_address="127.0.0.1:1",
        token=token,
        insecure=True,
        root_certificates_path=None,
        runtime_dependency_install=False,
        parent_pid=os.getpid(),
        suppress_output=False,
        task_id=task_id,
    )


def _wait_children(executor: fs.ForkExecutor, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while executor.children and time.monotonic() < deadline:
        executor.reconcile()
        time.sleep(0.05)
    assert not executor.children, "ClientApp children still running"


def test_fork_launcher_wraps_the_supernode_in_process_isolation(tmp_path):
    key, _, _ = sd.make_site_keys(tmp_path / "keys")
    ca = tmp_path / "ca.crt"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    common = dict(superlink="127.0.0.1:19199", ca_cert=ca, private_key=key, site_id="A", data=tmp_path, port=19198)
    fork = sd.supernode_command(**common, threads=2)  # the default launcher
    assert fork[:6] == [sys.executable, "-m", "client.clientapp_forkserver", "--threads", "2", "--"]
    node = fork[6:]
    assert Path(node[0]).name == "flower-supernode" and node[-2:] == ["--isolation", "process"]
    plain = sd.supernode_command(**common, launcher="subprocess")
    assert Path(plain[0]).name == "flower-supernode" and "--isolation" not in plain
    assert node[:-2] == plain
    assert fs._runtime_address(node) == "127.0.0.1:19198"
    with pytest.raises(ValueError, match="launcher"):
        sd.supernode_command(**common, launcher="thread")


def _import_from_fab(fab: Path) -> dict:
    """In a fresh interpreter: warm up, then import the ClientApp as Flower does from a FAB folder."""
    script = textwrap.dedent(f"""
        import json, sys, time
        from client.clientapp_forkserver import PROJECT_PACKAGES, warm_imports
        warm_imports()
        left = sorted(n for n in sys.modules if n.split('.')[0] in PROJECT_PACKAGES)
        warm = all(m in sys.modules for m in ('torch', 'monai', 'flwr', 'SimpleITK', 'pydicom', 'torch._dynamo'))
        finder = sys.meta_path[0]
        sys.path.insert(0, {str(fab)!r})  # what flwr's load_app does with the FAB's project dir
        t0 = time.perf_counter()
        import client.client_app as app
        from client import tasks
        print(json.dumps({{"left": left, "warm": warm, "where": getattr(app, 'WHERE', 'repo'),
                          "reused": app is finder.modules['client.client_app'][0],
                          "file": app.__file__, "tasks_file": tasks.__file__,
                          "import_s": time.perf_counter() - t0}}))
    """)
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=Path(fs.__file__).parents[1]
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_warm_imports_keep_torch_and_monai_but_the_clientapp_comes_from_the_fab(tmp_path):
    import shutil

    repo = Path(fs.__file__).parents[1]
    # a FAB as `flwr` installs it under FLWR_HOME: byte-identical copies of the project's packages
    same = tmp_path / "same"
    for pkg in fs.PROJECT_PACKAGES:
        shutil.copytree(repo / pkg, same / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    got = _import_from_fab(same)
    assert got["left"] == [] and got["warm"] and got["where"] == "repo"
    # identical bytes: the warm module objects are served, located in the FAB
    assert got["reused"] and got["file"] == str(same / "client" / "client_app.py")
    assert got["tasks_file"] == str(same / "client" / "tasks.py")

    # one module differs (a comment): the FAB's code is imported afresh, all of it
    changed = tmp_path / "changed"
    shutil.copytree(same, changed)
    with open(changed / "shared_models" / "config.py", "a") as fh:
        fh.write("# a later release\n")
    got = _import_from_fab(changed)
    assert not got["reused"] and got["file"] == str(changed / "client" / "client_app.py")

    # a FAB with other code altogether
    other = tmp_path / "other"
    (other / "client").mkdir(parents=True)
    (other / "client" / "__init__.py").write_text("")
    (other / "client" / "client_app.py").write_text("WHERE = 'fab'\n")
    got = _import_from_fab(other)
    assert got["where"] == "fab" and not got["reused"]


def test_each_task_runs_flowers_clientapp_in_its_own_named_child(tmp_path, monkeypatch):
    def fake_run_clientapp(
        *, runtime_api_address, token, insecure, certificates, parent_pid, runtime_dependency_install
    ):
        record = {
            "pid": os.getpid(),
            "comm": Path("/proc/self/comm").read_text().strip(),
            "threads": torch.get_num_threads(),
            "token": token,
            "parent": parent_pid,
            "insecure": insecure,
            "install": runtime_dependency_install,
        }
        (tmp_path / f"{os.getpid()}.json").write_text(json.dumps(record))
        raise SystemExit(5 if token.startswith("ee") else 0)  # Flower ends every task with flwr_exit

    monkeypatch.setattr(flower_internals, "run_clientapp", fake_run_clientapp)
    executor = fs.ForkExecutor(threads=2, max_parallel=4)
    for task_id in (1, 2):
        assert str(executor.launch(_spec(task_id)).status) == "accepted"
    _wait_children(executor)
    records = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]
    assert (
        len(records) == 2 and len({r["pid"] for r in records}) == 2 and os.getpid() not in {r["pid"] for r in records}
    )
    for r in records:
        assert r == {
            **r,
            "comm": "flwr-clientapp",
            "threads": 2,
            "token": "ab" * 8,
            "parent": os.getpid(),
            "insecure": True,
            "install": False,
        }
    assert executor.failures == 0
    executor.launch(_spec(3, token="ee" * 8))
    _wait_children(executor)
    assert executor.failures == 1


def test_capacity_is_held_while_max_parallel_clientapps_run(tmp_path, monkeypatch):
    TaskType = flower_internals.TaskType

    go = tmp_path / "go"

    def slow(**_):
        while not go.exists():
            time.sleep(0.02)
        raise SystemExit(0)

    monkeypatch.setattr(flower_internals, "run_clientapp", slow)
    executor = fs.ForkExecutor(threads=1, max_parallel=1)
    every = set(TaskType)
    assert executor.get_eligible_capacity(every) == ({TaskType.CLIENT_APP}, set())
    executor.launch(_spec())
    assert executor.get_eligible_capacity(every) == (set(), set())
    go.write_text("1")
    _wait_children(executor)
    assert executor.get_eligible_capacity(every) == ({TaskType.CLIENT_APP}, set())


def test_serve_polls_a_real_supernode_runtime_api(tmp_path):
    """Flower's SuperNode in process isolation answers our AcquireTask calls (no SuperLink: no tasks)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    exe = Path(sys.executable).parent / "flower-supernode"
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "home"), "FLWR_TELEMETRY_ENABLED": "0"}
    node = subprocess.Popen(
        [
            str(exe),
            "--insecure",
            "--superlink",
            "127.0.0.1:9",
            "--isolation",
            "process",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--max-retries",
            "1000",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
            assert time.monotonic() < deadline and node.poll() is None, "SuperNode Runtime API did not start"
            time.sleep(0.2)
        loops = iter(range(5))
        executor = fs.ForkExecutor()
        answered = fs.serve(
            f"127.0.0.1:{port}",
            executor=executor,
            min_poll_s=0.01,
            max_poll_s=0.02,
            should_stop=lambda: next(loops, None) is None,
        )
        assert answered == 5 and not executor.children
        # nothing listens: every call fails, none is counted, and serve still returns
        node.kill()
        node.wait()
        loops = iter(range(3))
        assert (
            fs.serve(
                f"127.0.0.1:{port}",
                executor=executor,
                min_poll_s=0.01,
                max_poll_s=0.02,
                should_stop=lambda: next(loops, None) is None,
            )
            == 0
        )
    finally:
        node.kill()


def test_task_lines_give_the_deployment_benchmark_its_message_waves(tmp_path):
    """The per-task log line, as the fork server writes it, parsed into waves by the benchmark."""
    import logging

    from sim.bench.federation import message_waves

    formatter = logging.Formatter(fs.LOG_FORMAT)
    t0 = 1_780_000_000.0  # seconds since the epoch; the log keeps milliseconds

    def line(end: float, wall: float, cpu: float) -> str:
        record = logging.LogRecord(
            "onfh.forkserver",
            logging.INFO,
            __file__,
            1,
            "ClientApp task %d ended with code %s: %.1f s, %.1f CPU-s",
            (7, 0, wall, cpu),
            None,
        )
        record.created, record.msecs = end, (end % 1) * 1000
        return formatter.format(record)

    # wave 1: A 0-2 s, B 1-4 s; wave 2: A 7-8 s, B 6-9 s (gap 4-6 s = 2 s); B has one extra, unmatched line
    logs = {
        "A": [line(t0 + 2, 2.0, 1.5), line(t0 + 8, 1.0, 0.5)],
        "B": [line(t0 + 4, 3.0, 2.0), line(t0 + 9, 3.0, 2.5), line(t0 + 20, 1.0, 1.0)],
    }
    paths = {}
    for site, lines in logs.items():
        paths[site] = tmp_path / f"{site}.log"
        paths[site].write_text("noise\n" + "\n".join(lines) + "\n")
    got = message_waves(paths)
    assert got["message_waves"] == 2
    assert got["wave_gaps_s"] == pytest.approx(2.0, abs=0.01)
    assert got["wave_spans_s"] == pytest.approx(4.0 + 3.0, abs=0.01)
    assert got["clientapp_cpu_s"] == pytest.approx(1.5 + 0.5 + 2.0 + 2.5 + 1.0)
    assert message_waves({"A": tmp_path / "missing.log"})["message_waves"] == 0


@pytest.mark.parametrize(
    "behaviour, expect", [("exits", "no signal"), ("waits", "one SIGTERM"), ("ignores", "SIGKILL")]
)
def test_the_supernode_gets_at_most_one_sigterm_then_a_kill(tmp_path, behaviour, expect):
    """A SuperNode already stopping on its own is left alone; one that is not gets one SIGTERM; a stuck one is killed."""
    got = tmp_path / "sigterms"
    script = textwrap.dedent(f"""
        import pathlib, signal, sys, time
        f = pathlib.Path({str(got)!r})
        def on_term(*_):
            f.write_text(f.read_text() + "x" if f.exists() else "x")
            if {behaviour!r} == "waits":
                sys.exit(0)
        signal.signal(signal.SIGTERM, on_term)
        print("ready", flush=True)
        time.sleep(0.3 if {behaviour!r} == "exits" else 60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    t0 = time.monotonic()
    fs.end_supernode(proc, grace_s=1.0, timeout_s=1.0)
    sigterms = got.read_text() if got.exists() else ""
    if expect == "no signal":
        assert proc.returncode == 0 and sigterms == "" and time.monotonic() - t0 < 1.0
    elif expect == "one SIGTERM":
        assert proc.returncode == 0 and sigterms == "x"
    else:
        assert proc.returncode == -9 and sigterms == "x"
