"""Coordinator and site building blocks of a deployment, without Flower processes (issue 7)."""

from __future__ import annotations

import ipaddress
import json
import socket
import ssl
import sys
import threading
import time

import pytest
import torch
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from client import site_daemon as sd
from server import coordinator as co
from server.checkpoint import CheckpointStore, PhaseCheckpoint, verify_chain


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return co.make_certs(tmp_path_factory.mktemp("certs") / "certs")


def test_certs_ca_signs_a_server_certificate_with_the_sans_flower_needs(certs):
    ca = x509.load_pem_x509_certificate(certs.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    server.verify_directly_issued_by(ca)
    sans = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["localhost"]
    assert set(sans.get_values_for_type(x509.IPAddress)) == {
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    }
    assert isinstance(
        serialization.load_pem_private_key(certs.signing_key.read_bytes(), None), ed25519.Ed25519PrivateKey
    )
    assert certs.ca_key.stat().st_mode & 0o077 == 0 and certs.server_key.stat().st_mode & 0o077 == 0
    with pytest.raises(FileExistsError, match="refusing to overwrite"):
        co.make_certs(certs.ca_cert.parent)


def test_tls_handshake_with_the_server_certificate_is_checked_by_the_site(certs):
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.server_cert, certs.server_key)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]

    def serve():
        conn, _ = listener.accept()
        try:
            context.wrap_socket(conn, server_side=True).close()
        except (ssl.SSLError, OSError):
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    check = sd.check_superlink(f"127.0.0.1:{port}", certs.ca_cert)
    thread.join(5)
    listener.close()
    assert check.ok, check.detail
    closed = sd.check_superlink(f"127.0.0.1:{port}", certs.ca_cert, timeout_s=1)
    assert not closed.ok and "127.0.0.1" in closed.detail


def test_ca_certificate_check(certs, tmp_path):
    assert sd.check_ca_certificate(certs.ca_cert).ok
    assert not sd.check_ca_certificate(tmp_path / "missing.crt").ok
    assert "not a CA" in sd.check_ca_certificate(certs.server_cert).detail
    (tmp_path / "junk.crt").write_text("hello")
    assert "not a PEM certificate" in sd.check_ca_certificate(tmp_path / "junk.crt").detail


def test_site_keys_are_p384_openssh_and_fingerprinted_like_ssh_keygen(tmp_path):
    private, public, text = sd.make_site_keys(tmp_path / "keys")
    key = serialization.load_ssh_private_key(private.read_bytes(), password=None)  # what flower-supernode loads
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert text.startswith("ecdsa-sha2-nistp384 ") and public.read_text().strip() == text
    assert private.stat().st_mode & 0o077 == 0
    fp = co.key_fingerprint(public)
    assert fp.startswith("SHA256:") and len(fp) == 7 + 43
    with pytest.raises(FileExistsError):
        sd.make_site_keys(tmp_path / "keys")
    other = ec.generate_private_key(ec.SECP256R1()).public_key()
    (tmp_path / "p256.pub").write_bytes(
        other.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    )
    with pytest.raises(ValueError, match="P-384"):
        co.key_fingerprint(tmp_path / "p256.pub")
    (tmp_path / "junk.pub").write_text("not a key")
    with pytest.raises(ValueError, match="junk.pub"):
        co.key_fingerprint(tmp_path / "junk.pub")


def test_enroll_refuses_a_reused_key_or_site_before_calling_flower(tmp_path):
    _, pub_a, _ = sd.make_site_keys(tmp_path / "a")
    _, pub_b, _ = sd.make_site_keys(tmp_path / "b")
    registry = tmp_path / co.REGISTRY_NAME
    registry.write_text(json.dumps({"A": {"fingerprint": co.key_fingerprint(pub_a), "node_id": 1, "enrolled_at": ""}}))
    with pytest.raises(ValueError, match="already enrolled as site 'A'"):
        co.enroll("B", pub_a, flwr_home=tmp_path / "home", registry=registry)
    with pytest.raises(ValueError, match="already enrolled with another key"):
        co.enroll("A", pub_b, flwr_home=tmp_path / "home", registry=registry)
    with pytest.raises(ValueError, match="site name"):
        co.enroll("A B", pub_b, flwr_home=tmp_path / "home", registry=registry)
    registry.write_text("[1, 2]")
    with pytest.raises(ValueError, match=co.REGISTRY_NAME):
        co.load_registry(registry)


def test_superlink_and_supernode_command_lines(certs, tmp_path):
    cmd = co.superlink_command(certs, port=19199, database=tmp_path / "state.db")
    assert (
        "--insecure" not in cmd
        and "--enable-supernode-auth" in cmd
        and "--disable-runtime-dependency-installation" in cmd
    )
    assert cmd[cmd.index("--database") + 1] == str(tmp_path / "state.db")
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    key, _, _ = sd.make_site_keys(tmp_path / "keys")
    node = sd.supernode_command(
        superlink="127.0.0.1:19199",
        ca_cert=certs.ca_cert,
        private_key=key,
        site_id="A",
        data=tmp_path / "site A",
        port=19198,
        max_retries=3,
    )
    assert (
        node[node.index("--node-config") + 1]
        == f"site-id='A' data-path='{(tmp_path / 'site A').resolve()}' min-cell-heads=5"
    )
    # the site's own settings reach the ClientApp through Flower's own parser of --node-config
    from shared_models.flower.internals import parse_config_args

    own = sd.supernode_command(
        superlink="127.0.0.1:19199",
        ca_cert=certs.ca_cert,
        private_key=key,
        site_id="A",
        data=tmp_path / "site A",
        min_cell_heads=8,
        cache=tmp_path / "my cache",
    )
    assert parse_config_args([own[own.index("--node-config") + 1]]) == {
        "site-id": "A",
        "data-path": str((tmp_path / "site A").resolve()),
        "min-cell-heads": 8,
        "cache-dir": str((tmp_path / "my cache").resolve()),
    }
    with pytest.raises(ValueError, match="min-cell-heads"):
        sd.supernode_command(
            superlink="x:1", ca_cert=certs.ca_cert, private_key=key, site_id="A", data=tmp_path, min_cell_heads=0
        )
    assert node[node.index("--max-retries") + 1] == "3" and "--insecure" not in node
    with pytest.raises(FileNotFoundError, match="private key"):
        sd.supernode_command(
            superlink="x:1", ca_cert=certs.ca_cert, private_key=tmp_path / "nope", site_id="A", data=tmp_path
        )
    env = sd.supernode_env(tmp_path / "home", 2)
    assert env["OMP_NUM_THREADS"] == "2" and env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"


def test_connection_file_points_at_the_ca(certs, tmp_path):
    path = co.write_connection(tmp_path / "home", "127.0.0.1:19199", certs.ca_cert)
    text = path.read_text()
    assert 'address = "127.0.0.1:19199"' in text and f'root-certificates = "{certs.ca_cert}"' in text
    assert "insecure" not in text


def test_daemon_restarts_a_dying_supernode_with_backoff(tmp_path):
    starts = []
    cmd = [sys.executable, "-c", "import sys; sys.exit(3)"]
    code = sd.run_daemon(
        cmd,
        env={},
        log_file=tmp_path / "sn.log",
        max_restarts=2,
        backoff_s=0.05,
        on_start=lambda attempt, pid: starts.append(attempt),
    )
    assert code == 3 and starts == [1, 2, 3]


def test_daemon_gives_up_when_the_first_start_is_refused_but_retries_after_a_crash(tmp_path):
    refused = [sys.executable, "-c", "print('[code: 2004] Failed to activate SuperNode.'); raise SystemExit(1)"]
    starts = []
    assert (
        sd.run_daemon(
            refused,
            env={},
            log_file=tmp_path / "a.log",
            max_restarts=5,
            backoff_s=0.05,
            on_start=lambda a, p: starts.append(a),
        )
        == 1
    )
    assert starts == [1]
    # a node that ran, died, then is refused while its old session is held: keeps retrying
    flag = tmp_path / "ran"
    script = (
        f"import pathlib, sys; f = pathlib.Path({str(flag)!r})\n"
        "if not f.exists(): f.write_text('1'); sys.exit(9)\n"
        "print('[code: 2004] Failed to activate SuperNode.'); sys.exit(1)"
    )
    starts.clear()
    assert (
        sd.run_daemon(
            [sys.executable, "-c", script],
            env={},
            log_file=tmp_path / "b.log",
            max_restarts=2,
            backoff_s=0.05,
            held_retry_s=0.05,
            on_start=lambda a, p: starts.append(a),
        )
        == 1
    )
    assert starts == [1, 2, 3]


def test_checkpoint_hash_chain_detects_a_replaced_checkpoint(tmp_path):
    store = CheckpointStore(tmp_path / "checkpoints", "fp")
    for phase, rnd in (("detector", 1), ("detector", 2), ("stager", 1)):
        store.save(phase, PhaseCheckpoint(round=rnd, state_dict={"w": torch.full((2,), float(rnd))}))
    chain = store.chain()
    assert [(e["phase"], e["round"]) for e in chain] == [("detector", 1), ("detector", 2), ("stager", 1)]
    verify_chain(chain, store.folder)
    forged = [dict(e) for e in chain]
    forged[1]["sha256"] = "0" * 64
    with pytest.raises(ValueError, match="detector round 2"):
        verify_chain(forged)
    store2 = CheckpointStore(tmp_path / "checkpoints", "fp")
    torch.save({"round": 2, "state_dict": {"w": torch.zeros(2)}}, store2.path("detector"))
    with pytest.raises(ValueError, match="detector.pt"):
        verify_chain(chain, store.folder)


def test_run_progress_reads_rounds_metrics_and_missing_sites(tmp_path):
    out = tmp_path / "run"
    (out).mkdir()
    (out / co.LAUNCH_NAME).write_text(
        json.dumps({"run_config": {"detector-rounds": 3, "stager-rounds": 2}, "run_ids": [5]})
    )
    store = CheckpointStore(out / "checkpoints", "fp")
    store.save(
        "detector",
        PhaseCheckpoint(
            round=2, state_dict={}, site_metrics={2: {"A": {"iou-mean": 0.5}}}, missing_sites={1: {"evaluate": ["C"]}}
        ),
    )
    progress = co.run_progress(out)
    assert progress["rounds"] == {"detector": {"done": 2, "total": 3}, "stager": {"done": 0, "total": 2}}
    assert progress["latest"]["detector"] == {"round": 2, "sites": {"A": {"iou-mean": 0.5}}}
    assert progress["missing_sites"]["detector"] == {1: {"evaluate": ["C"]}} and not progress["finished"]
    assert progress["run_ids"] == [5]


def test_pull_refuses_a_run_without_bundle(tmp_path, certs):
    with pytest.raises(FileNotFoundError, match="no signed bundle"):
        co.pull(tmp_path, tmp_path / "dest", certs.signing_public_key)


def test_launch_checks_the_run_config_before_flower(tmp_path):
    with pytest.raises(ValueError, match="min-site-fraction"):
        co.launch({"min-site-fraction": 1.5}, out=tmp_path / "run", flwr_home=tmp_path / "home")
    with pytest.raises(FileNotFoundError, match="launch.json"):
        co.resume(tmp_path / "nothing")


def test_wait_for_run_asks_flower_only_when_the_bundle_appears(tmp_path, monkeypatch):
    import threading

    calls = []
    sig = tmp_path / "bundle" / "MANIFEST.sig"

    def fake_status(run_id, *, flwr_home, connection=co.CONNECTION):
        calls.append(time.monotonic())
        return "finished:completed" if sig.exists() else "running"

    monkeypatch.setattr(co, "run_status", fake_status)
    (tmp_path / "bundle").mkdir()
    threading.Timer(0.5, lambda: sig.write_text("sig")).start()
    t0 = time.monotonic()
    assert co.wait_for_run(7, flwr_home=tmp_path, poll_s=0.02, out=tmp_path, status_every_s=30) == "finished:completed"
    # one ask at the start, one when the bundle appeared: not one per poll (about 25)
    assert len(calls) == 2 and calls[1] - t0 >= 0.5
    # without out: one ask per poll
    calls.clear()
    assert co.wait_for_run(7, flwr_home=tmp_path, poll_s=0.01) == "finished:completed" and len(calls) == 1
    # a run that fails writes no bundle: still found by the periodic ask
    sig.unlink()
    monkeypatch.setattr(co, "run_status", lambda *a, **k: calls.append(1) or "finished:failed")
    calls.clear()
    assert co.wait_for_run(7, flwr_home=tmp_path, poll_s=0.01, out=tmp_path) == "finished:failed" and calls == [1]


def test_launch_names_flowers_reason_when_flwr_run_starts_nothing(tmp_path, monkeypatch):
    reply = (
        '{"success": false, "error-message": "The Flower App does not meet the project structure requirements: '
        'exceeds the maximum directory depth of 10"}'
    )
    monkeypatch.setattr(co, "_flwr", lambda *a, **k: "Loading project configuration...\n" + reply)
    with pytest.raises(co.CoordinatorError, match="maximum directory depth of 10"):
        co.launch(
            {"site-ids": "A", "train-sites": "A", "report-groups": "A=A"},
            out=tmp_path / "run",
            flwr_home=tmp_path / "home",
        )
    assert not (tmp_path / "run" / co.LAUNCH_NAME).exists()  # nothing recorded for a run that never started


def test_status_prints_a_dash_and_the_reason_for_a_site_without_heads(tmp_path, capsys):
    from server.cli import status_cell
    from shared_models.cli import main

    out = tmp_path / "run"
    metrics = {
        "A": {"num-examples": 12, "macro-auc": 0.8125},
        "B": {"num-examples": 0, "macro-auc": 0.0},
        "C": {"num-examples": 4, "macro-auc": 0.75},
    }
    CheckpointStore(out / "checkpoints", "f", {}).save(
        "stager", PhaseCheckpoint(round=1, state_dict={"w": torch.zeros(1)}, site_metrics={1: metrics})
    )
    assert status_cell(metrics["B"], "macro-auc") == (
        "–",
        "no test heads at this site (n = 0): the metric is undefined",
    )
    assert status_cell(metrics["A"], "macro-auc") == ("0.812", "")
    assert status_cell(metrics["C"], "macro-auc")[1] == "only 4 heads: unreliable"
    assert main(["coordinator", "status", "--home", str(tmp_path / "coord"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    row_b = next(line for line in text.splitlines() if line.strip(" │|").startswith("B "))
    assert "–" in row_b and "0.000" not in row_b and "n = 0" in text


def test_status_is_read_only_and_refuses_a_missing_run_folder(tmp_path, monkeypatch):
    from shared_models.cli import main

    # a read-only command: it must not create a coordinator home (which `flwr run` would ship to the sites)
    monkeypatch.chdir(tmp_path)
    assert main(["coordinator", "status", "--out", str(tmp_path / "nope")]) == 1
    (tmp_path / "run").mkdir()
    assert main(["coordinator", "status", "--out", str(tmp_path / "run")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
