"""Real Flower deployment on 127.0.0.1: a TLS SuperLink with SuperNode authentication, three
authenticated SuperNodes (``onfh site daemon``) on phantom sites, two-phase runs started with
``onfh coordinator launch``.

One module fixture runs the federation; two runs carry every check:

* run 1 (``faults``): site C's SuperNode is killed while it evaluates round 1 of the detector.
  The round completes with A and B and the report names C; C's daemon restarts the node,
  which takes part in a later round (detector round 2, or a stager round on a fast machine). Its signed bundle verifies (``onfh site verify``, ``pull``),
  a tampered copy and an unverified use are refused by ``onfh infer``, and every site's audit
  log describes what left the site.
* run 2 (``resume``): the ServerApp is killed after detector round 1, then the SuperLink is
  restarted on its database (runs and keys survive; the daemons reconnect their nodes);
  ``launch --resume`` continues from the checkpoint, and the final weights equal run 1's exactly (C only
  evaluates, so its fault does not touch the weights; local training is seeded per round
  and FedAvg of two updates is order-independent).

An unenrolled SuperNode is refused (Flower code 2004) and its daemon gives up; a run whose
configured site never connects fails after ``node-wait-timeout-s``, naming the site.

The daemons use Flower's stock ``--launcher subprocess`` here. C's restart is held back by the
SuperLink for about a minute (its dead session's heartbeat), so which later round C joins depends on
the machine's speed; the tests accept any, and require C back by the last stager round. With the
default fork launcher the tiny rounds of this test would finish before C could make its crops. The fork launcher's own end-to-end run (TLS
SuperLink, authenticated SuperNodes, 4 sites) is the deployment section of
``tests/test_bench.py``; its parts are tested in ``tests/test_clientapp_forkserver.py``.
Needs about 15 minutes on 2 CPU cores. Ports 19140-19199 on 127.0.0.1.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from client.audit import read_audit_log, verify_audit_anchors, verify_audit_log
from client.splits import write_splits
from server import coordinator as co
from server.audit_anchors import load_anchors
from server.checkpoint import verify_chain
from shared_models.bundle import BundleError, load_bundle
from shared_models.cli import main
from sim.phantoms import PROFILES, generate_phantoms
from tests.conftest import TINY

pytestmark = [pytest.mark.deployment, pytest.mark.slow]

SITES = ("A", "B", "C")
TRAIN = ("A", "B")
RUN_SETTINGS = {
    **TINY,
    "site-ids": ",".join(SITES),
    "train-sites": ",".join(TRAIN),
    "report-groups": "A-test=A;B-test=B;external-1=C",
    "detector-rounds": 2,
    "stager-rounds": 2,
    "detector-local-steps": 2,
    "stager-local-steps": 2,
    "stager-batch-size": 4,
    "detector-l1-rounds": 0,
    "round-timeout-s": 75.0,
    "node-wait-timeout-s": 240.0,
    "min-site-fraction": 0.5,
    "device": "cpu",
    "amp": False,
}


def _free_port(lo: int, hi: int) -> int:
    for port in range(lo, hi):
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) != 0:
                try:
                    sock2 = socket.socket()
                    sock2.bind(("127.0.0.1", port))
                    sock2.close()
                    return port
                except OSError:
                    continue
    raise RuntimeError(f"no free port in {lo}-{hi}")


def _onfh(*args: str, log: Path) -> subprocess.Popen:
    fh = open(log, "ab")
    return subprocess.Popen(
        [sys.executable, "-m", "shared_models.cli", *args],
        stdout=fh,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=co.APP_DIR,
    )


def _supernode_pid(daemon: subprocess.Popen) -> int | None:
    try:
        children = psutil.Process(daemon.pid).children()
    except psutil.NoSuchProcess:
        return None
    for child in children:  # the daemon's process watchdog is a child too
        try:
            if "flower-supernode" in " ".join(child.cmdline()):
                return child.pid
        except psutil.NoSuchProcess:  # gone, or a zombie
            continue
    return None


def _has_clientapp(supernode_pid: int) -> bool:
    """A ClientApp runs under the node: Flower's `flwr-clientapp` process, or one forked by
    client.clientapp_forkserver (the daemon's default), which names itself so."""
    try:
        return any(
            "flwr-clientapp" in p.name() or "flwr-clientapp" in " ".join(p.cmdline())
            for p in psutil.Process(supernode_pid).children(recursive=True)
        )
    except psutil.NoSuchProcess:
        return False


def _wait(predicate, timeout_s: float, what: str, poll_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _progress(out: Path) -> dict:
    try:
        return json.loads((out / "checkpoints" / "progress.json").read_text())
    except (OSError, ValueError):
        return {}


def _launch_argv(home: Path, out: Path) -> list[str]:
    argv = [
        "coordinator",
        "launch",
        "--home",
        str(home),
        "--out",
        str(out),
        "--sites",
        ",".join(SITES),
        "--train-sites",
        ",".join(TRAIN),
        "--seed",
        "3",
    ]
    for k, v in RUN_SETTINGS.items():
        argv += ["--set", f"{k}={v}"]
    return argv


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    """Phantom sites, certificates, a SuperLink, three enrolled SuperNodes (daemons), and run 1 with a node fault."""
    root = tmp_path_factory.mktemp("deployment")
    data = root / "data"
    quick = PROFILES["quick"]
    profile = dataclasses.replace(
        quick,
        name="micro3",
        heads_per_site={"A": 10, "B": 8, "C": 3},
        patients_per_site={"A": 6, "B": 5, "C": 2},
        scanners={s: quick.scanners[s] for s in SITES},
        external_groups={"external-1": ("C",)},
    )
    generate_phantoms(data, profile, seed=2)
    write_splits(data, SITES, TRAIN, seed=3)
    home = root / "coordinator"
    assert main(["coordinator", "certs", "--home", str(home)]) == 0
    certs = co.CertPaths.in_folder(home / "certs")
    flwr_home = home / "flwr-home"
    port = _free_port(19140, 19150)
    superlink = co.start_superlink(
        certs, flwr_home=flwr_home, database=home / "superlink.db", log_file=home / "superlink.log", port=port
    )
    address = f"127.0.0.1:{port}"
    daemons: dict[str, subprocess.Popen] = {}
    state = {
        "root": root,
        "data": data,
        "home": home,
        "certs": certs,
        "flwr_home": flwr_home,
        "address": address,
        "daemons": daemons,
        "superlink": superlink,
    }
    try:
        for i, site in enumerate(SITES):
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
            daemons[site] = _onfh(
                "site",
                "daemon",
                "--data",
                str(data / site),
                "--superlink",
                address,
                "--ca-cert",
                str(certs.ca_cert),
                "--key",
                str(keys / "supernode-key"),
                "--port",
                str(_free_port(19150 + 3 * i, 19153 + 3 * i)),
                "--threads",
                "1",
                "--launcher",
                "subprocess",
                "--max-retries",
                "5",
                "--max-restarts",
                "12",
                log=root / f"daemon-{site}.log",
            )
        # every node online (the daemons ran their preflight, building the site caches, first)
        registry = co.load_registry(home / co.REGISTRY_NAME)
        _wait(
            lambda: all(
                co.connected_nodes(flwr_home=flwr_home).get(int(registry[s]["node_id"])) == "online" for s in SITES
            ),
            300,
            "three SuperNodes online",
            poll_s=3,
        )

        # run 1: launch, then kill C's SuperNode while it evaluates round 1
        out = root / "run-faults"
        t0 = time.monotonic()
        assert main(_launch_argv(home, out)) == 0
        run_id = json.loads((out / co.LAUNCH_NAME).read_text())["run_ids"][-1]

        def trained_round_1(site):
            path = data / site / ".onfh-cache" / "audit.jsonl"
            return path.exists() and any(e["message_type"] == "train" and e["round"] == 1 for e in read_audit_log(path))

        # A and B have sent their round-1 updates: C's next ClientApp is its round-1 evaluation
        _wait(lambda: all(trained_round_1(s) for s in TRAIN), 600, "round-1 updates of A and B", poll_s=0.5)
        victim = _wait(lambda: _supernode_pid(daemons["C"]), 30, "C's SuperNode process")
        _wait(lambda: _has_clientapp(victim), 300, "C's round-1 evaluate ClientApp", poll_s=0.2)
        killed_at = _progress(out)
        clientapps = psutil.Process(victim).children(recursive=True)  # a node crash: the SuperNode and its ClientApps
        psutil.Process(victim).kill()
        for child in clientapps:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        state["killed_at"] = killed_at
        state["victim"] = victim
        status = co.wait_for_run(run_id, flwr_home=flwr_home, timeout_s=1500, out=out)
        state["faults"] = {"out": out, "status": status, "wall_s": time.monotonic() - t0}
        yield state
    finally:
        for proc in daemons.values():
            co.stop_process_tree(proc.pid)
        co.stop_process_tree(state["superlink"].pid)


def test_run_with_killed_supernode_completes_and_names_the_missing_site(federation):
    run = federation["faults"]
    out = run["out"]
    assert run["status"] == "finished:completed", (out / "report.json").exists()
    assert federation["killed_at"] == {}  # C died in detector round 1, before any checkpoint
    report = json.loads((out / "report.json").read_text())
    # round 1 of the detector completed without C (its evaluate reply never came) ...
    assert report["missing_sites"]["detector"]["1"] == {"evaluate": ["C"]}
    # ... and the restarted node took part again in a later round. Which one depends on how fast the
    # rounds run against the SuperLink's hold-back of C's dead session (about a minute): detector
    # round 2 on a slow machine, a stager round on a fast one.
    ckpt = torch.load(out / "checkpoints" / "detector.pt", weights_only=True)
    stager = torch.load(out / "checkpoints" / "stager.pt", weights_only=True)
    assert "C" not in ckpt["site_metrics"][1]
    later = [ckpt["site_metrics"][2], *(stager["site_metrics"][r] for r in (1, 2))]
    assert any("C" in metrics for metrics in later)
    assert "C" in stager["site_metrics"][2]  # the last round: C is back by then on any machine
    assert set(ckpt["train_metrics"][1]) == set(TRAIN) == set(ckpt["train_metrics"][2])
    assert report["rounds"] == {"detector": 2, "stager": 2}
    # the daemon restarted the SuperNode (a new process)
    assert _supernode_pid(federation["daemons"]["C"]) not in (None, federation["victim"])


def test_deployment_run_writes_report_html_like_a_simulation(federation):
    out = federation["faults"]["out"]
    page = (out / "report.html").read_text(encoding="utf-8")
    report = json.loads((out / "report.json").read_text())
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for group in report["sites"]:
        assert f"<h3>{group} " in page
    assert 'src="training_curves.png"' in page or "training_curves.png" in page


def test_signed_bundle_verifies_and_records_the_checkpoint_chain(federation, tmp_path):
    out, certs = federation["faults"]["out"], federation["certs"]
    assert main(["site", "verify", "--bundle", str(out / "bundle"), "--public-key", str(certs.signing_public_key)]) == 0
    dest = tmp_path / "pulled"
    assert main(["coordinator", "pull", "--home", str(federation["home"]), "--out", str(out), "--dest", str(dest)]) == 0
    assert load_bundle(dest, certs.signing_public_key).trusted
    manifest = json.loads((dest / "MANIFEST.json").read_text())
    chain = manifest["checkpoint_chain"]
    assert [(e["phase"], e["round"]) for e in chain] == [("detector", 1), ("detector", 2), ("stager", 1), ("stager", 2)]
    verify_chain(chain, out / "checkpoints")
    # a key that did not sign it is refused
    other = tmp_path / "other.pem"
    assert main(["coordinator", "signing-key", "--out", str(other)]) == 0
    assert main(["site", "verify", "--bundle", str(dest), "--public-key", f"{other}.pub"]) == 1


def test_infer_refuses_tampered_or_unverified_bundles(federation, tmp_path):
    out, certs = federation["faults"]["out"], federation["certs"]
    study = next(p for p in (federation["data"] / "A").iterdir() if p.is_dir() and not p.name.startswith("."))
    tampered = tmp_path / "tampered"
    shutil.copytree(out / "bundle", tampered)
    state = torch.load(tampered / "stager.pt", weights_only=True)
    key = next(k for k, v in state.items() if v.is_floating_point())
    state[key] = state[key] + 0.01
    torch.save(state, tampered / "stager.pt")
    with pytest.raises(BundleError, match="stager.pt"):
        load_bundle(tampered, certs.signing_public_key)
    common = ["infer", "--study", str(study), "--out", str(tmp_path / "infer")]
    assert main([*common, "--bundle", str(tampered), "--public-key", str(certs.signing_public_key)]) == 1
    assert main([*common, "--bundle", str(tampered), "--allow-unsigned"]) == 1  # still refused: hash mismatch
    assert main([*common, "--bundle", str(out / "bundle")]) == 1  # no key and no --allow-unsigned
    assert not (tmp_path / "infer" / "result.json").exists()


def test_audit_logs_describe_every_reply_without_patient_data(federation):
    data = federation["data"]
    anchors = load_anchors(federation["faults"]["out"] / "audit-anchors.json")
    report = json.loads((federation["faults"]["out"] / "report.json").read_text())
    assert report["audit_anchors"] == anchors and report["refused_nodes"] == []
    for site in SITES:
        path = data / site / ".onfh-cache" / "audit.jsonl"
        assert verify_audit_log(path) > 0
        # issue 16: every reply's anchor is in the site's log, and nothing of run 1 follows the last one
        summary = verify_audit_anchors(path, anchors[site])
        assert summary["anchors"] >= 4 + 4 * (site in TRAIN) and len(summary["runs"]) == 1
        entries = read_audit_log(path)
        text = path.read_text()
        assert str(data) not in text and "study-" not in text and f"{site}-0" not in text  # no paths, studies, patients
        kinds = {(e["message_type"], e["phase"] or e["action"]) for e in entries}
        # C's only detector evaluation before the kill never replied; after its restart it evaluates
        # detector round 2 or, on a fast machine, only stager rounds (see the test above)
        evaluated = {"detector"} if site in TRAIN else {"detector", "stager"}
        assert ("query", "hello") in kinds and any(("evaluate", p) in kinds for p in evaluated)
        if site in TRAIN:
            train = [e for e in entries if e["message_type"] == "train"]
            assert {e["round"] for e in train if e["phase"] == "detector"} >= {1, 2}
            assert all(e["arrays"] and e["bytes"] > sum(1 for _ in e["arrays"]) for e in train)
            assert any("num-examples" in m["names"] for m in train[0]["metrics"])
        else:
            assert not any(e["message_type"] == "train" for e in entries)


def test_status_shows_rounds_sites_and_metrics(federation, capsys):
    out = federation["faults"]["out"]
    progress = co.run_progress(out)
    assert progress["rounds"] == {"detector": {"done": 2, "total": 2}, "stager": {"done": 2, "total": 2}}
    assert progress["finished"] and set(progress["latest"]["stager"]["sites"]) == set(SITES)
    assert main(["coordinator", "status", "--home", str(federation["home"]), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "online" in text and "detector round 1 (evaluate): missing C" in text


def test_unenrolled_supernode_is_refused(federation, tmp_path):
    keys = tmp_path / "keys-X"
    assert main(["site", "keys", "--out", str(keys)]) == 0
    daemon = _onfh(
        "site",
        "daemon",
        "--data",
        str(federation["data"] / "A"),
        "--site-id",
        "X",
        "--skip-checks",
        "--superlink",
        federation["address"],
        "--ca-cert",
        str(federation["certs"].ca_cert),
        "--key",
        str(keys / "supernode-key"),
        "--port",
        str(_free_port(19170, 19180)),
        "--max-retries",
        "1",
        "--max-restarts",
        "3",
        "--log",
        str(tmp_path / "sn.log"),
        log=tmp_path / "daemon.log",
    )
    try:
        assert daemon.wait(timeout=120) == 1
    finally:
        co.stop_process_tree(daemon.pid)
    assert "[code: 2004]" in (tmp_path / "sn.log").read_text()
    assert (tmp_path / "sn.log").read_text().count("Starting Flower SuperNode") == 1  # refused: not restarted
    assert "not restarting" in (tmp_path / "daemon.log").read_text()


def test_a_site_that_never_connects_fails_the_run_fast_naming_it(federation, capsys, tmp_path):
    out = federation["root"] / "run-missing"
    argv = _launch_argv(federation["home"], out)
    argv[argv.index("--sites") + 1] = "A,B,C,D"
    argv += [
        "--set",
        "site-ids=A,B,C,D",
        "--set",
        "report-groups=A-test=A;B-test=B;external-1=C,D",
        "--set",
        "node-wait-timeout-s=60",
    ]
    # a site that is not enrolled is refused before anything starts (issue 16: site-nodes from the registry) ...
    assert main(argv) == 1
    assert "['D'] are not enrolled" in capsys.readouterr().out and not (out / co.LAUNCH_NAME).exists()
    # ... and one enrolled whose node never connects fails the run after node-wait-timeout-s
    assert main(["site", "keys", "--out", str(tmp_path / "keys-D")]) == 0
    assert (
        main(
            [
                "coordinator",
                "enroll",
                "--home",
                str(federation["home"]),
                "--site",
                "D",
                "--public-key",
                str(tmp_path / "keys-D" / "supernode-key.pub"),
            ]
        )
        == 0
    )
    argv += ["--wait"]
    t0 = time.monotonic()
    assert main(argv) == 1
    text = capsys.readouterr().out
    assert "finished:failed" in text and "SitesMissingError" in text and "['D']" in text
    assert time.monotonic() - t0 < 240
    assert not (out / "checkpoints").exists()


def test_resume_after_serverapp_killed_gives_the_same_weights(federation):
    home, flwr_home = federation["home"], federation["flwr_home"]
    out = federation["root"] / "run-resume"
    assert main(_launch_argv(home, out)) == 0
    first = json.loads((out / co.LAUNCH_NAME).read_text())["run_ids"][-1]
    _wait(lambda: _progress(out).get("round", 0) >= 1, 900, "detector round 1 checkpoint", poll_s=0.5)
    serverapps = [
        p
        for p in psutil.process_iter(["cmdline"])
        if "flwr-serverapp" in " ".join(p.info["cmdline"] or []) and _env(p).get("FLWR_HOME") == str(flwr_home)
    ]
    assert serverapps, "no ServerApp process found"
    for p in serverapps:
        p.kill()
    try:  # what an operator would do; the SuperLink may already have marked the run failed
        co._flwr(["stop", str(first), co.CONNECTION], flwr_home)
    except co.CoordinatorError:
        pass
    assert _progress(out) == {"phase": "detector", "round": 1}
    # the SuperLink goes down too and comes back on its database: runs and enrolled keys survive,
    # and the daemons bring their nodes back without a new enrolment
    co.stop_process_tree(federation["superlink"].pid)
    certs = federation["certs"]
    federation["superlink"] = co.start_superlink(
        certs,
        flwr_home=flwr_home,
        database=home / "superlink.db",
        log_file=home / "superlink.log",
        port=int(federation["address"].rsplit(":", 1)[1]),
    )
    assert co.run_status(first, flwr_home=flwr_home) != ""  # the interrupted run is still listed
    registry = co.load_registry(home / co.REGISTRY_NAME)
    _wait(
        lambda: all(
            co.connected_nodes(flwr_home=flwr_home).get(int(registry[s]["node_id"])) == "online" for s in SITES
        ),
        400,
        "three SuperNodes back online after the SuperLink restart",
        poll_s=3,
    )
    assert (
        main(["coordinator", "launch", "--home", str(home), "--resume", str(out), "--wait", "--timeout", "1500"]) == 0
    )
    report = json.loads((out / "report.json").read_text())
    assert report["rounds"] == {"detector": 2, "stager": 2}
    chain = json.loads((out / "bundle" / "MANIFEST.json").read_text())["checkpoint_chain"]
    assert [(e["phase"], e["round"]) for e in chain][:2] == [("detector", 1), ("detector", 2)]
    reference = federation["faults"]["out"] / "bundle"
    for name in ("detector.pt", "stager.pt"):
        a = torch.load(out / "bundle" / name, weights_only=True)
        b = torch.load(reference / name, weights_only=True)
        assert a.keys() == b.keys()
        diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a)
        assert diff == 0.0, f"{name}: resumed run differs from the uninterrupted weights by up to {diff}"


def _env(proc: psutil.Process) -> dict:
    try:
        return proc.environ()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return {}
