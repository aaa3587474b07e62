"""The coordinator's side of a real Flower deployment: certificates, enrolment, SuperLink, runs.

Plain functions behind ``onfh coordinator ...`` (``server/cli.py`` is a thin shell over them).
Everything follows ``FLOWER-1.42-NOTES.md`` (shared/):

* one SuperLink port serves the CLI (Control), the SuperNodes (Fleet) and the ServerApp;
* TLS with a private CA made with ``cryptography``; the server certificate carries SANs for
  ``localhost``, ``127.0.0.1`` and ``::1`` because the SuperLink's own executor dials back;
* SuperNode authentication (``--enable-supernode-auth``): every hospital's EC P-384 public
  key (OpenSSH encoding) is registered with Flower's own ``flwr supernode register``;
* SuperLink state in a ``--database`` file, so a restarted SuperLink keeps runs and keys;
* runtime dependency installation off (``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION``);
* ``flwr run`` exits 0 even when the run failed: the status comes from ``flwr list``.

Files written by :func:`make_certs` (``certs/``)::

    ca.crt / ca.key                    the federation's CA (EC P-384), ca.crt goes to every site
    server.crt / server.key            the SuperLink's TLS certificate, signed by the CA
    bundle-signing-key.pem(.pub)       Ed25519 key that signs model bundles; .pub goes to every site

The enrolment registry (``enrolled-sites.json``, coordinator side) maps site name to the
SHA-256 fingerprint of its SuperNode public key and the node id Flower assigned.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import json
import logging
import math
import shutil
import socket
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from shared_models.flower.env import flower_bin, flower_env
from shared_models.processes import stop_process_tree, toml_value
from shared_models.safe_files import read_regular_file
from shared_models.specs import PHASES

log = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parents[1]
CONNECTION = "onfh-federation"
REGISTRY_NAME = "enrolled-sites.json"
LAUNCH_NAME = "launch.json"
# Caps checked before reading (issue 16): an OpenSSH P-384 public key line is about 250 bytes; the
# registry holds one short entry per enrolled site.
MAX_PUBLIC_KEY_BYTES = 16 << 10
MAX_REGISTRY_BYTES = 16 << 20
SERVER_SANS = ("localhost", "127.0.0.1", "::1")


class CoordinatorError(RuntimeError):
    """A coordinator step failed; the message names the file, command or run involved."""


# --------------------------------------------------------------------------- environment


def _flwr(args: list[str], flwr_home: Path, timeout: float = 120) -> str:
    """Run ``flwr ARGS`` in the app folder; return stdout.

    Raises:
        CoordinatorError: on a non-zero exit (the message holds Flower's own text).
    """
    proc = subprocess.run(
        [flower_bin("flwr"), *args],
        env=flower_env(flwr_home),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=APP_DIR,
    )
    if proc.returncode != 0:
        text = (proc.stdout.strip() + "\n" + proc.stderr.strip()).strip()
        raise CoordinatorError(f"flwr {' '.join(args[:2])} failed (exit {proc.returncode}): {text[-800:]}")
    return proc.stdout


def _json_tail(text: str) -> dict:
    """The JSON object Flower prints last on stdout (after any progress lines)."""
    start = text.find("{")
    if start < 0:
        raise CoordinatorError(f"expected JSON from flwr, got: {text.strip()[-300:]}")
    return json.loads(text[start:])


# --------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class CertPaths:
    """The files of a coordinator's ``certs/`` folder (see module docstring)."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    signing_key: Path
    signing_public_key: Path

    @classmethod
    def in_folder(cls, folder: Path) -> CertPaths:
        folder = Path(folder).resolve()
        return cls(
            folder / "ca.crt",
            folder / "ca.key",
            folder / "server.crt",
            folder / "server.key",
            folder / "bundle-signing-key.pem",
            folder / "bundle-signing-key.pem.pub",
        )


def _write_private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o600)


def _pem_key(key) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_certs(out: Path, *, hosts: tuple[str, ...] = SERVER_SANS, days: int = 365) -> CertPaths:
    """Create the federation's CA, the SuperLink's TLS certificate and the bundle signing key.

    Keys are EC P-384 (CA and server) and Ed25519 (bundle signing), all from ``cryptography``.
    The server certificate is valid for ``days`` days with SANs for every entry of ``hosts``
    (DNS names or IP addresses; the defaults are needed even for a public host name, because
    the SuperLink dials itself on ``localhost``).

    Args:
        out: folder to create (or an empty one).
        hosts: SAN entries of the server certificate.
        days: validity of both certificates, in days.

    Returns:
        The paths written.

    Raises:
        FileExistsError: if ``out`` already holds a CA key (never overwrite a federation's keys).
    """
    from shared_models.bundle import generate_signing_key

    paths = CertPaths.in_folder(out)
    if paths.ca_key.exists() or paths.signing_key.exists():
        raise FileExistsError(f"{paths.ca_key.parent}: already holds a CA or signing key; refusing to overwrite it")
    paths.ca_key.parent.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ONFH-FL federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, "ONFH-FL federation CA"),
        ]
    )
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0] if hosts else "localhost")]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    _write_private(paths.ca_key, _pem_key(ca_key))
    paths.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(paths.server_key, _pem_key(server_key))
    paths.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    generate_signing_key(paths.signing_key)
    return paths


# --------------------------------------------------------------------------- connection and enrolment


def write_connection(flwr_home: Path, address: str, ca_cert: Path, name: str = CONNECTION) -> Path:
    """Write ``$FLWR_HOME/config.toml`` with one TLS connection ``name`` to the SuperLink at ``address``.

    Returns:
        The config file written.

    Raises:
        FileNotFoundError: if ``ca_cert`` does not exist.
    """
    ca_cert = Path(ca_cert).resolve()
    if not ca_cert.is_file():
        raise FileNotFoundError(f"CA certificate {ca_cert} does not exist (create it with `onfh coordinator certs`)")
    flwr_home = Path(flwr_home)
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    path.write_text(
        f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n'
        f'root-certificates = "{ca_cert}"\n'
    )
    return path


def key_fingerprint(public_key_file: Path) -> str:
    """``SHA256:<base64>`` of an OpenSSH public key, as ``ssh-keygen -l`` prints it.

    The file is read once, at most ``MAX_PUBLIC_KEY_BYTES`` (refused unread if larger, a symlink or
    not a regular file).

    Raises:
        ValueError: if the file is not an EC P-384 public key in OpenSSH encoding, too large or not
            a regular file (names the file).
    """
    path = Path(public_key_file)
    try:
        text = read_regular_file(path, MAX_PUBLIC_KEY_BYTES)  # capped before reading: a site sent it
        key = serialization.load_ssh_public_key(text)
    except (OSError, ValueError, UnsupportedAlgorithm) as err:
        raise ValueError(f"{path}: not an OpenSSH public key ({err})") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        raise ValueError(f"{path}: expected an EC P-384 key (make one with `onfh site keys`)")
    blob = base64.b64decode(text.split()[1])
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def load_registry(path: Path) -> dict[str, dict]:
    """The enrolment registry: ``{site: {"fingerprint", "node_id", "enrolled_at"}}`` ({} if absent).

    Raises:
        ValueError: if the file is not a JSON object, is larger than ``MAX_REGISTRY_BYTES`` or is
            not a regular file (names the file).
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return {}
    raw = read_regular_file(path, MAX_REGISTRY_BYTES)  # UnsafeFileError (a ValueError) names the file
    try:
        data = json.loads(raw)
    except ValueError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object of site -> key fingerprint")
    return data


def enroll(site: str, public_key: Path, *, flwr_home: Path, registry: Path, connection: str = CONNECTION) -> dict:
    """Register a hospital's SuperNode public key with the SuperLink (``flwr supernode register``).

    The site name and key fingerprint are recorded in ``registry`` (coordinator side).

    Returns:
        The registry entry: ``{"fingerprint", "node_id", "enrolled_at"}``.

    Raises:
        ValueError: bad key file, or the site or the key is already enrolled under another name.
        CoordinatorError: Flower refused the registration (its message is included).
    """
    if not site or any(c in site for c in " ,;='\"/"):
        raise ValueError(f"site name {site!r}: use letters, digits, '-' or '_'")
    fingerprint = key_fingerprint(public_key)
    entries = load_registry(registry)
    for other, entry in entries.items():
        if entry["fingerprint"] == fingerprint and other != site:
            raise ValueError(f"{public_key}: this key is already enrolled as site {other!r}")
    if site in entries and entries[site]["fingerprint"] != fingerprint:
        raise ValueError(f"site {site!r} is already enrolled with another key ({entries[site]['fingerprint']})")
    out = _flwr(
        ["supernode", "register", str(Path(public_key).resolve()), connection, "--name", site, "--format", "json"],
        flwr_home,
    )
    node_id = int(_json_tail(out)["node-id"])
    entries[site] = {
        "fingerprint": fingerprint,
        "node_id": node_id,
        "enrolled_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    Path(registry).parent.mkdir(parents=True, exist_ok=True)
    Path(registry).write_text(json.dumps(entries, indent=2, sort_keys=True))
    return entries[site]


# --------------------------------------------------------------------------- SuperLink


def superlink_command(certs: CertPaths, *, host: str = "127.0.0.1", port: int = 9093, database: Path) -> list[str]:
    """The ``flower-superlink`` command line: TLS, SuperNode authentication, a database file,
    no runtime dependency installation.

    Raises:
        FileNotFoundError: if a certificate file is missing (names it).
    """
    for path in (certs.ca_cert, certs.server_cert, certs.server_key):
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist (create the folder with `onfh coordinator certs`)")
    return [
        flower_bin("flower-superlink"),
        "--ssl-ca-certfile",
        str(certs.ca_cert),
        "--ssl-certfile",
        str(certs.server_cert),
        "--ssl-keyfile",
        str(certs.server_key),
        "--enable-supernode-auth",
        "--database",
        str(Path(database).resolve()),
        "--disable-runtime-dependency-installation",
        "--host",
        host,
        "--port",
        str(port),
    ]


def wait_for_port(host: str, port: int, timeout_s: float, proc: subprocess.Popen | None = None, what: str = "") -> None:
    """Wait until ``host:port`` accepts TCP connections.

    Raises:
        CoordinatorError: the process exited first, or the port stayed closed for ``timeout_s`` seconds.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise CoordinatorError(
                f"{what or 'process'} exited with code {proc.returncode} before opening {host}:{port}"
            )
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.settimeout(1.0)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.3)
    raise CoordinatorError(f"{what or 'process'} did not open {host}:{port} within {timeout_s:.0f} s")


def start_superlink(
    certs: CertPaths,
    *,
    flwr_home: Path,
    database: Path,
    log_file: Path,
    host: str = "127.0.0.1",
    port: int = 9093,
    timeout_s: float = 60,
) -> subprocess.Popen:
    """Start ``flower-superlink`` (see :func:`superlink_command`) in its own session and wait for its port.

    Also writes the ``onfh-federation`` TLS connection into ``$FLWR_HOME/config.toml``.

    Returns:
        The running process (stop it with :func:`stop_process_tree`).

    Raises:
        CoordinatorError: if it exits or does not open the port within ``timeout_s`` s (see ``log_file``).
    """
    cmd = superlink_command(certs, host=host, port=port, database=database)
    write_connection(flwr_home, f"{'[' + host + ']' if ':' in host else host}:{port}", certs.ca_cert)
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as fh:
        proc = subprocess.Popen(
            cmd, env=flower_env(flwr_home), stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, cwd=APP_DIR
        )
    try:
        wait_for_port(host, port, timeout_s, proc, what=f"flower-superlink (log: {log_file})")
    except CoordinatorError:
        stop_process_tree(proc.pid)
        raise
    return proc


# --------------------------------------------------------------------------- runs


def site_nodes(site_ids: list[str], registry: Path) -> str:
    """The ``site-nodes`` run-config value ``"A=<node id>,B=<node id>"`` for ``site_ids``, from the
    enrolment registry: the node id Flower assigned to each site's enrolled key. The ServerApp
    refuses a node that claims a site not bound to it (``server.server_app.identity_problem``).

    Raises:
        ValueError: a site is not enrolled (names it and the registry).
    """
    entries = load_registry(registry)
    missing = [s for s in site_ids if s not in entries]
    if missing:
        raise ValueError(f"sites {missing} are not enrolled in {registry} (enrol each with `onfh coordinator enroll`)")
    return ",".join(f"{s}={int(entries[s]['node_id'])}" for s in site_ids)


def launch(
    run_config: Mapping[str, object],
    *,
    out: Path,
    flwr_home: Path,
    connection: str = CONNECTION,
    signing_key: Path | None = None,
    registry: Path | None = None,
) -> int:
    """Start a run on the remote federation (``flwr run APP CONNECTION``); return its run id.

    The run config (overrides of ``[tool.flwr.app.config]``) gets ``out-dir`` = ``out``, if
    given, ``signing-key`` and, from ``registry``, ``site-nodes`` (:func:`site_nodes`: each site
    bound to its enrolled node); it is saved in ``out/launch.json`` with the run id, so that
    :func:`resume` can start the same run again. Checkpoints land in ``out/checkpoints``. What
    Flower sends to the sites carries a reference instead of ``out-dir`` and ``signing-key``
    (``server.run_paths``).

    Raises:
        ValueError: an invalid run config (names the key), or a site that is not enrolled.
        CoordinatorError: ``flwr run`` failed.
    """
    from server.run_paths import hide_coordinator_paths
    from shared_models.config import RunConfig, default_run_config

    out = Path(out).resolve()
    rc = dict(run_config)
    rc["out-dir"] = str(out)
    if signing_key is not None:
        rc["signing-key"] = str(Path(signing_key).resolve())
    if rc.get("identity") == "simulation":
        raise ValueError(
            "run config 'identity' = 'simulation' trusts self-reported site ids; a launch binds every site to its "
            "enrolled key (identity = 'enrolled')"
        )
    if registry is not None:
        ids = [s.strip() for s in str(rc.get("site-ids", default_run_config()["site-ids"])).split(",") if s.strip()]
        rc["site-nodes"] = site_nodes(ids, registry)
    RunConfig.from_run_config({**default_run_config(), **rc})  # fail here, not in the ServerApp's log
    out.mkdir(parents=True, exist_ok=True)
    overrides = out / "run-config.toml"
    sent = hide_coordinator_paths(rc, flwr_home)  # Flower sends the run config to every site: no local paths
    overrides.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in sent.items()))
    text = _flwr(
        ["run", str(APP_DIR), connection, "--run-config", str(overrides), "--format", "json"], flwr_home, timeout=300
    )
    reply = _json_tail(text)
    if "run-id" not in reply:  # e.g. {"success": false, "error-message": "... app does not meet ..."}
        raise CoordinatorError(f"flwr run did not start the run: {reply.get('error-message') or text.strip()[-800:]}")
    run_id = int(reply["run-id"])
    record = json.loads((out / LAUNCH_NAME).read_text()) if (out / LAUNCH_NAME).exists() else {"run_ids": []}
    record.update({"run_config": rc, "connection": connection, "flwr_home": str(Path(flwr_home).resolve())})
    record["run_ids"].append(run_id)
    (out / LAUNCH_NAME).write_text(json.dumps(record, indent=2))
    log.info("run %d started; out-dir %s", run_id, out)
    return run_id


def resume(out: Path, *, flwr_home: Path | None = None) -> int:
    """Start the run saved in ``out/launch.json`` again; the ServerApp continues after the last
    checkpointed round of each phase (``server/checkpoint.py``).

    Raises:
        FileNotFoundError: ``out`` holds no ``launch.json``.
    """
    path = Path(out) / LAUNCH_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: --resume needs the out-dir of a run started with `launch`")
    record = json.loads(path.read_text())
    return launch(
        record["run_config"],
        out=Path(out),
        flwr_home=Path(flwr_home or record["flwr_home"]),
        connection=record["connection"],
    )  # the saved run config keeps its site-nodes binding


def run_status(run_id: int, *, flwr_home: Path, connection: str = CONNECTION) -> str:
    """Flower's status of a run (``"running"``, ``"finished:completed"``, ``"finished:failed"`` ...; "" if unknown)."""
    data = _json_tail(_flwr(["list", connection, "--format", "json"], flwr_home))
    for run in data.get("runs", []):
        if int(run.get("run-id", -1)) == int(run_id):
            return str(run.get("status", ""))
    return ""


def wait_for_run(
    run_id: int,
    *,
    flwr_home: Path,
    connection: str = CONNECTION,
    timeout_s: float = 3600,
    poll_s: float = 3.0,
    on_poll=None,
    out: Path | None = None,
    status_every_s: float = 30.0,
) -> str:
    """Poll :func:`run_status` until the run finishes or stops; return the final status.

    Each :func:`run_status` is a ``flwr list`` process (about 1.2 CPU-seconds of imports), which on
    a small coordinator competes with the run itself. With ``out`` (the run's out-dir), the loop
    checks every ``poll_s`` seconds for the run's signed bundle (``out/bundle/MANIFEST.sig``,
    written last, newer than this call) and asks Flower only when it appears, or every
    ``status_every_s`` seconds (a run that fails writes no bundle). Without ``out``, it asks every
    ``poll_s`` seconds.

    Raises:
        CoordinatorError: the run did not finish within ``timeout_s`` seconds.
    """
    start, deadline = time.time(), time.monotonic() + timeout_s
    sig = Path(out) / "bundle" / "MANIFEST.sig" if out is not None else None
    asked = -float("inf")

    def bundle_written() -> bool:
        try:
            return sig is not None and sig.stat().st_mtime >= start - 1.0
        except OSError:
            return False

    while time.monotonic() < deadline:
        if sig is None or bundle_written() or time.monotonic() - asked >= status_every_s:
            asked = time.monotonic()
            status = run_status(run_id, flwr_home=flwr_home, connection=connection)
            if status.startswith(("finished", "stopped")):
                return status
            if on_poll:
                on_poll(status)
        time.sleep(poll_s)
    raise CoordinatorError(f"run {run_id} did not finish within {timeout_s:.0f} s")


def run_error(run_id: int, *, flwr_home: Path, connection: str = CONNECTION) -> str:
    """The last exception line (``SomethingError: message``) of a run's ServerApp log (``flwr log``);
    "" if there is none. This is where, e.g., ``SitesMissingError`` names the sites that never connected."""
    import re

    try:
        text = _flwr(["log", str(run_id), connection, "--show"], flwr_home, timeout=60)
    except (CoordinatorError, subprocess.TimeoutExpired):
        return ""
    pattern = re.compile(r"^\s*[\w.]+(Error|Exception): ")
    hits = [line.strip() for line in text.splitlines() if pattern.match(line)]
    return hits[-1] if hits else ""


def connected_nodes(*, flwr_home: Path, connection: str = CONNECTION) -> dict[int, str]:
    """``{node_id: status}`` of the SuperNodes the SuperLink knows (``flwr supernode list``)."""
    data = _json_tail(_flwr(["supernode", "list", connection, "--format", "json"], flwr_home))
    nodes = data.get("nodes", [])
    return {int(n.get("node-id")): str(n.get("status", "")) for n in nodes}


def run_progress(out: Path) -> dict:
    """Rounds done and the latest per-site metrics, from the run's checkpoints (no Flower call).

    Returns:
        ``{"rounds": {phase: {"done", "total"}}, "latest": {phase: {"round", "sites": {site: metrics}}},
        "missing_sites": {phase: {round: [site, ...]}}, "finished": bool}``.

    Raises:
        server.checkpoint.CheckpointError: a phase has checkpoints but none verifies against
            the chain (nothing is unpickled unless it does).
    """
    from server.checkpoint import read_checkpoint

    out = Path(out)
    record = json.loads((out / LAUNCH_NAME).read_text()) if (out / LAUNCH_NAME).exists() else {}
    rc = record.get("run_config", {})
    from shared_models.config import default_run_config

    defaults = default_run_config()
    result: dict = {
        "rounds": {},
        "latest": {},
        "missing_sites": {},
        "run_ids": record.get("run_ids", []),
        "finished": (out / "bundle" / "MANIFEST.sig").exists(),
    }
    for phase in PHASES:
        total = int(rc.get(f"{phase}-rounds", defaults[f"{phase}-rounds"]))
        done, latest, missing = 0, {}, {}
        ckpt = read_checkpoint(out / "checkpoints", phase)  # verified against the chain, weights_only
        if ckpt is not None:
            done = ckpt.round
            history = ckpt.site_metrics
            if history:
                last = max(history)
                latest = {"round": last, "sites": history[last]}
            missing = ckpt.missing_sites
        result["rounds"][phase] = {"done": done, "total": total}
        result["latest"][phase] = latest
        result["missing_sites"][phase] = missing
    return result


def pull(out: Path, dest: Path, public_key: Path) -> Path:
    """Copy the run's final signed bundle from ``out/bundle`` to ``dest`` and verify the copy.

    Returns:
        ``dest``.

    Raises:
        FileNotFoundError: the run has no bundle yet.
        FileExistsError: ``dest`` exists.
        shared_models.bundle.BundleError: the copy does not verify against ``public_key``
            (``dest`` is removed again).
    """
    from shared_models.bundle import load_bundle

    src = Path(out) / "bundle"
    if not (src / "MANIFEST.sig").is_file():
        raise FileNotFoundError(f"{src}: no signed bundle yet (the run has not finished)")
    dest = Path(dest)
    if dest.exists():
        raise FileExistsError(f"{dest} exists; choose a new folder for the bundle")
    shutil.copytree(src, dest, symlinks=True)  # a symlink stays one, and load_bundle refuses it
    try:
        load_bundle(dest, public_key)
    except Exception:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return dest


def minimum_sites(n_sites: int, fraction: float) -> int:
    """Sites needed for a round: ``ceil(fraction * n_sites)``, at least 1."""
    return max(1, math.ceil(fraction * n_sites - 1e-9))
