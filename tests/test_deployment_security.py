"""Issue 16 with real processes: a TLS SuperLink with SuperNode authentication on 127.0.0.1, two
enrolled hospitals, and the attacks of rows 1 and 15.

* Row 1: hospital B starts its daemon with ``--site-id A`` (next to the real A). The ServerApp
  refuses B's node by name (its authenticated node id is bound to B, ``site-nodes``) and the run
  ends with that reason; nothing trains.
* Row 15: ``kill -9`` of the ``onfh site daemon`` and ``onfh coordinator start-superlink``
  commands leaves none of their processes (SuperNode, fork server, SuperLink, SuperExec) behind;
  every service listens on 127.0.0.1.

About 3 minutes on 2 CPU cores. Ports 19200-19239 on 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from client.splits import write_splits
from server import coordinator as co
from shared_models.cli import main
from sim.phantoms import PROFILES, generate_phantoms
from tests.conftest import TINY
from tests.test_deployment import _free_port, _wait

pytestmark = [pytest.mark.deployment, pytest.mark.slow]

LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def _cli(*args: str, log: Path) -> subprocess.Popen:
    fh = open(log, "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "shared_models.cli", *args],
        stdout=fh,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=co.APP_DIR,
    )


def _tree(pid: int) -> dict[int, str]:
    try:
        root = psutil.Process(pid)
        return {p.pid: p.name() for p in (root, *root.children(recursive=True))}
    except psutil.NoSuchProcess:
        return {}


def _alive(pids) -> list[int]:
    out = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                out.append(pid)
        except psutil.NoSuchProcess:
            pass
    return out


def _listening(pids) -> set[str]:
    ips = set()
    for pid in pids:
        try:
            ips |= {
                c.laddr.ip for c in psutil.Process(pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN
            }
        except (psutil.Error, OSError):
            continue
    return ips


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """A SuperLink, hospitals A and B enrolled; A's daemon honest, B's daemon claims to be A."""
    root = tmp_path_factory.mktemp("deployment-security")
    data = root / "data"
    quick = PROFILES["quick"]
    profile = dataclasses.replace(
        quick,
        name="micro2",
        heads_per_site={"A": 6, "B": 6},
        patients_per_site={"A": 4, "B": 4},
        scanners={s: quick.scanners[s] for s in "AB"},
        external_groups={},
    )
    generate_phantoms(data, profile, seed=5)
    write_splits(data, ("A", "B"), ("A", "B"), seed=5)
    home = root / "coordinator"
    assert main(["coordinator", "certs", "--home", str(home)]) == 0
    certs = co.CertPaths.in_folder(home / "certs")
    flwr_home = home / "flwr-home"
    port = _free_port(19200, 19210)
    superlink = co.start_superlink(
        certs, flwr_home=flwr_home, database=home / "superlink.db", log_file=home / "superlink.log", port=port
    )
    daemons: dict[str, subprocess.Popen] = {}
    try:
        for i, site in enumerate("AB"):
            keys = root / f"keys-{site}"
            assert main(["site", "keys", "--out", str(keys)]) == 0
            assert (
                main(
                    [
                        "coordinator",
                        "enroll",
                        "--home",
                        str(home),
                        "--site",
                        site,
                        "--public-key",
                        str(keys / "supernode-key.pub"),
                    ]
                )
                == 0
            )
            # hospital B, enrolled as B, starts its daemon claiming to be A (row 1)
            daemons[site] = _cli(
                "site",
                "daemon",
                "--data",
                str(data / site),
                "--site-id",
                "A",
                "--superlink",
                f"127.0.0.1:{port}",
                "--ca-cert",
                str(certs.ca_cert),
                "--key",
                str(keys / "supernode-key"),
                "--port",
                str(_free_port(19210 + 5 * i, 19215 + 5 * i)),
                "--threads",
                "1",
                "--max-retries",
                "3",
                log=root / f"daemon-{site}.log",
            )
        registry = co.load_registry(home / co.REGISTRY_NAME)
        _wait(
            lambda: all(
                co.connected_nodes(flwr_home=flwr_home).get(int(registry[s]["node_id"])) == "online" for s in "AB"
            ),
            300,
            "two SuperNodes online",
            poll_s=3,
        )
        yield {
            "root": root,
            "home": home,
            "certs": certs,
            "flwr_home": flwr_home,
            "registry": registry,
            "daemons": daemons,
            "superlink": superlink,
            "data": data,
        }
    finally:
        for proc in daemons.values():
            co.stop_process_tree(proc.pid)
        co.stop_process_tree(superlink.pid)


def test_enrolled_hospital_claiming_another_sites_name_is_refused_by_name(federation, capsys):
    home, registry = federation["home"], federation["registry"]
    out = federation["root"] / "run-impostor"
    argv = [
        "coordinator",
        "launch",
        "--home",
        str(home),
        "--out",
        str(out),
        "--sites",
        "A,B",
        "--profile",
        "quick",
        "--wait",
        "--timeout",
        "600",
        "--set",
        "node-wait-timeout-s=240",
        "--set",
        "device=cpu",
    ]
    for k, v in TINY.items():
        argv += ["--set", f"{k}={v}"]
    t0 = time.monotonic()
    assert main(argv) == 1
    text = capsys.readouterr().out
    b_node = int(registry["B"]["node_id"])
    assert "finished:failed" in text and "SiteIdentityError" in text
    assert f"node {b_node}, enrolled as site 'B', claims site 'A'" in text.replace("\n", "")
    assert time.monotonic() - t0 < 400  # refused at the hello, not after node-wait-timeout-s
    rc = json.loads((out / co.LAUNCH_NAME).read_text())["run_config"]
    assert rc["site-nodes"] == f"A={registry['A']['node_id']},B={b_node}"
    assert not (out / "checkpoints").exists() and not (out / "bundle").exists()  # nothing trained, nothing signed


def test_services_listen_on_loopback_only(federation):
    pids = [*_tree(federation["superlink"].pid)]
    for daemon in federation["daemons"].values():
        pids += [*_tree(daemon.pid)]
    ips = _listening(pids)
    assert ips and ips <= set(LOOPBACK), ips


def test_kill_9_of_the_site_daemon_stops_its_supernode(federation):
    daemon = federation["daemons"].pop("B")
    tree = _tree(daemon.pid)
    assert any("flower-superno" in name or "python" in name for pid, name in tree.items() if pid != daemon.pid), tree
    daemon.send_signal(signal.SIGKILL)
    daemon.wait()
    deadline = time.monotonic() + 15
    while _alive(tree) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _alive(tree) == [], {p: tree[p] for p in _alive(tree)}


def test_kill_9_of_start_superlink_stops_the_superlink(federation, tmp_path):
    home = tmp_path / "coordinator-2"
    assert main(["coordinator", "certs", "--home", str(home)]) == 0
    port = _free_port(19230, 19240)
    cli = _cli("coordinator", "start-superlink", "--home", str(home), "--port", str(port), log=tmp_path / "sl.log")
    try:
        co.wait_for_port("127.0.0.1", port, 60, cli, what="onfh coordinator start-superlink")
        time.sleep(1.0)
        tree = _tree(cli.pid)
        assert any(name.startswith("flower-superlin") for name in tree.values()), tree
        cli.send_signal(signal.SIGKILL)
        cli.wait()
        deadline = time.monotonic() + 15
        while _alive(tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert _alive(tree) == [], {p: tree[p] for p in _alive(tree)}
    finally:
        co.stop_process_tree(cli.pid)
