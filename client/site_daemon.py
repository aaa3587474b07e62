"""A hospital site's side of a real Flower deployment: node keys, preflight, the SuperNode daemon.

Plain functions behind ``onfh site keys | check | daemon | verify`` (``client/cli.py``).

* :func:`make_site_keys` makes the SuperNode's EC P-384 key pair in OpenSSH encoding (what
  ``flower-supernode --auth-supernode-private-key`` loads and ``flwr supernode register``
  accepts); the public key goes to the coordinator, the private key never leaves the site.
* :func:`preflight` checks, before anything connects: the manifest and every study, free
  space for the preprocessing cache, GPU or CPU, the coordinator's CA certificate, and that
  the SuperLink answers a TLS handshake with a certificate that CA signed.
* :func:`run_daemon` runs ``flower-supernode`` with TLS, the site's private key and a node
  config holding ``site-id``, ``data-path``, ``min-cell-heads`` and ``cache-dir`` (site-local
  settings the coordinator cannot change); ClientApps run in this environment (no runtime installs); when the SuperNode dies it is restarted with exponential backoff.

Nothing here logs patient data: checks report counts, never study names or paths of studies.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from shared_models.flower.env import flower_env
from shared_models.processes import stop_process_tree
from shared_models.specs import NODE_CACHE_DIR, NODE_DATA_PATH, NODE_MIN_CELL_HEADS, NODE_SITE_ID

#: A deployed site's small-cell floor (``onfh site daemon --min-cell-heads``): a split with fewer heads
#: sends only its count, whatever ``min-cell-heads`` the coordinator's run config says (it can only raise it).
SITE_MIN_CELL_HEADS = 5

log = logging.getLogger(__name__)

PRIVATE_KEY_NAME = "supernode-key"
#: How a SuperNode starts its ClientApp processes (:func:`supernode_command`).
LAUNCHERS = ("fork", "subprocess")
PUBLIC_KEY_NAME = "supernode-key.pub"


# --------------------------------------------------------------------------- keys


def make_site_keys(out: Path) -> tuple[Path, Path, str]:
    """Create the SuperNode key pair: EC P-384, OpenSSH encoding.

    Writes ``out/supernode-key`` (private, mode 0600) and ``out/supernode-key.pub``.

    Returns:
        ``(private_key_path, public_key_path, public_key_text)``.

    Raises:
        FileExistsError: if ``out`` already holds a SuperNode key.
    """
    out = Path(out)
    private, public = out / PRIVATE_KEY_NAME, out / PUBLIC_KEY_NAME
    if private.exists() or public.exists():
        raise FileExistsError(f"{private}: a SuperNode key exists already; refusing to overwrite it")
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    private.chmod(0o600)
    text = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    public.write_text(text + "\n")
    return private, public, text


# --------------------------------------------------------------------------- preflight


@dataclass(frozen=True)
class Check:
    """One preflight line: ``name``, ``ok`` and a short ``detail`` without patient data."""

    name: str
    ok: bool
    detail: str


def check_ca_certificate(path: Path) -> Check:
    """The CA certificate exists, parses as PEM X.509, is a CA and is valid now."""
    path = Path(path)
    if not path.is_file():
        return Check("CA certificate", False, f"{path} does not exist (ask the coordinator for ca.crt)")
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError as err:
        return Check("CA certificate", False, f"{path}: not a PEM certificate ({err})")
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        return Check(
            "CA certificate",
            False,
            f"{path}: not valid now (valid {cert.not_valid_before_utc:%Y-%m-%d} "
            f"to {cert.not_valid_after_utc:%Y-%m-%d})",
        )
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    if not is_ca:
        return Check("CA certificate", False, f"{path}: not a CA certificate")
    return Check("CA certificate", True, f"valid until {cert.not_valid_after_utc:%Y-%m-%d}")


def split_address(address: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[IPv6]:PORT`` -> ``(host, port)``.

    Raises:
        ValueError: if the port is missing or not a number.
    """
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"SuperLink address {address!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def check_superlink(address: str, ca_cert: Path, timeout_s: float = 5.0) -> Check:
    """The SuperLink accepts a TLS handshake whose certificate chains to ``ca_cert`` and names the host."""
    try:
        host, port = split_address(address)
    except ValueError as err:
        return Check("SuperLink reachable", False, str(err))
    try:
        context = ssl.create_default_context(cafile=str(ca_cert))
        with socket.create_connection((host, port), timeout=timeout_s) as raw:
            with context.wrap_socket(raw, server_hostname=host):
                pass
    except (OSError, ssl.SSLError) as err:
        return Check("SuperLink reachable", False, f"{address}: {type(err).__name__}: {err}")
    return Check("SuperLink reachable", True, f"{address}: TLS handshake ok, certificate signed by the CA")


def check_device() -> Check:
    """The training device: the GPU's name, memory, driver, CUDA and torch versions and bf16 support
    (:func:`client.gpu.gpu_summary`), or "no CUDA device" and the CPU cores; never fails."""
    from client.gpu import describe_gpu, gpu_summary

    info = describe_gpu()
    if info["cuda"]:
        return Check("GPU or CPU", True, f"CUDA: {gpu_summary(info)}")
    return Check("GPU or CPU", True, f"{gpu_summary(info)}: CPU only ({os.cpu_count()} cores); training is slower")


def check_cache_space(cache: Path, min_free_gb: float) -> Check:
    folder = Path(cache)
    probe = folder
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    free_gb = shutil.disk_usage(probe).free / 1e9
    return Check(
        "cache space", free_gb >= min_free_gb, f"{free_gb:.1f} GB free for the cache (need {min_free_gb:g} GB)"
    )


def check_site_data(data: Path, site_id: str, cache: Path) -> tuple[Check, list]:
    """Read the manifest and every study (building the preprocessing cache); one verdict per study.

    Returns:
        ``(summary check, verdicts)``; the check fails when the manifest is unreadable, a
        study is refused, or no head is usable.
    """
    from client.site_data import SiteData
    from shared_models.preprocessing import PreprocessingSpec

    try:
        site = SiteData(Path(data), site_id, Path(cache), PreprocessingSpec(), progress=False)
    except (OSError, ValueError) as err:
        return Check("manifest and studies", False, str(err)), []
    bad = sum(v.status != "ok" for v in site.verdicts)
    ok = bad == 0 and len(site.heads) > 0
    return Check(
        "manifest and studies",
        ok,
        f"{len(site.verdicts) - bad} studies ok, {bad} refused, {len(site.heads)} femoral heads usable",
    ), list(site.verdicts)


def preflight(
    data: Path,
    site_id: str,
    *,
    cache: Path,
    ca_cert: Path | None = None,
    superlink: str | None = None,
    min_free_gb: float = 1.0,
) -> tuple[list[Check], list]:
    """All site checks. The certificate and SuperLink checks run only when those are given.

    Returns:
        ``(checks, verdicts)``: the checks in order, and the per-study verdicts.
    """
    data_check, verdicts = check_site_data(data, site_id, cache)
    checks = [data_check, check_cache_space(cache, min_free_gb), check_device()]
    if ca_cert is not None:
        checks.append(check_ca_certificate(ca_cert))
        if superlink is not None:
            checks.append(check_superlink(superlink, ca_cert))
    return checks, verdicts


# --------------------------------------------------------------------------- SuperNode


def _quote(value: str) -> str:
    if "'" in value:
        raise ValueError(f"node config value {value!r} must not contain a single quote")
    return f"'{value}'"


def supernode_command(
    *,
    superlink: str,
    ca_cert: Path,
    private_key: Path,
    site_id: str,
    data: Path,
    port: int = 9094,
    max_retries: int | None = 10,
    max_wait_s: float | None = None,
    launcher: str = "fork",
    threads: int = 1,
    min_cell_heads: int = SITE_MIN_CELL_HEADS,
    cache: Path | None = None,
) -> list[str]:
    """The ``flower-supernode`` command line (TLS, SuperNode authentication, node config).

    The node config holds what the site decides, not the coordinator (``client/client_app.py``):
    ``site-id``, ``data-path``, ``min-cell-heads`` (the site's small-cell floor) and, when ``cache``
    is given, ``cache-dir`` (the site's cache and audit log folder; default ``DATA/.onfh-cache``).

    ``launcher`` says how each ClientApp process starts: ``"fork"`` (default) wraps the SuperNode
    in :mod:`client.clientapp_forkserver`, which forks every ClientApp from a process that has
    imported torch and MONAI once (``threads`` torch threads each); ``"subprocess"`` is Flower's
    own, a fresh ``flwr-clientapp`` interpreter per message (about 10 CPU-seconds of imports each).

    Raises:
        FileNotFoundError: the CA certificate or the private key is missing (names the file).
        ValueError: an unknown ``launcher``, or ``min_cell_heads`` < 1.
    """
    if launcher not in LAUNCHERS:
        raise ValueError(f"launcher must be one of {', '.join(LAUNCHERS)}, not {launcher!r}")
    if isinstance(min_cell_heads, bool) or not isinstance(min_cell_heads, int) or min_cell_heads < 1:
        raise ValueError(f"min-cell-heads must be an integer >= 1, not {min_cell_heads!r}")
    for path, what in ((ca_cert, "CA certificate"), (private_key, "SuperNode private key")):
        if not Path(path).is_file():
            raise FileNotFoundError(f"{what} {path} does not exist")
    node_config = (
        f"{NODE_SITE_ID}={_quote(site_id)} {NODE_DATA_PATH}={_quote(str(Path(data).resolve()))} "
        f"{NODE_MIN_CELL_HEADS}={min_cell_heads}"
    )
    if cache is not None:
        node_config += f" {NODE_CACHE_DIR}={_quote(str(Path(cache).resolve()))}"
    bin_dir = Path(sys.executable).parent
    exe = str(bin_dir / "flower-supernode") if (bin_dir / "flower-supernode").exists() else "flower-supernode"
    cmd = [
        exe,
        "--superlink",
        superlink,
        "--root-certificates",
        str(Path(ca_cert).resolve()),
        "--auth-supernode-private-key",
        str(Path(private_key).resolve()),
        "--node-config",
        node_config,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    if max_retries is not None:
        cmd += ["--max-retries", str(max_retries)]
    if max_wait_s is not None:
        cmd += ["--max-wait-time", str(max_wait_s)]
    if launcher == "fork":
        cmd = [
            sys.executable,
            "-m",
            "client.clientapp_forkserver",
            "--threads",
            str(threads),
            "--",
            *cmd,
            "--isolation",
            "process",
        ]
    return cmd


def supernode_env(flwr_home: Path, threads: int) -> dict[str, str]:
    """Environment of the SuperNode and its ClientApps (:func:`shared_models.flower.env.flower_env`): this
    project's interpreter first on PATH, no runtime dependency installation, no telemetry,
    ``OMP_NUM_THREADS`` and ``MKL_NUM_THREADS`` = ``threads``."""
    return flower_env(flwr_home, threads=threads)


def run_daemon(
    cmd: list[str],
    *,
    env: dict[str, str],
    log_file: Path,
    max_restarts: int = 20,
    backoff_s: float = 2.0,
    max_backoff_s: float = 60.0,
    healthy_after_s: float = 60.0,
    held_retry_s: float = 10.0,
    on_start=None,
) -> int:
    """Run ``cmd`` (a SuperNode) and restart it with exponential backoff whenever it exits.

    The backoff doubles after each quick death (``backoff_s`` up to ``max_backoff_s`` seconds);
    it and the count of restarts (at most ``max_restarts`` in a row) reset after a run that
    lasted ``healthy_after_s`` seconds. A SuperNode that exits 0
    (the SuperLink ended it) is not restarted, nor one refused (code 2004) on its very first
    start (its key is not enrolled). A refusal after a crash is retried every ``held_retry_s``
    seconds: the SuperLink keeps the dead session until its heartbeat expires (about a minute).

    Args:
        on_start: optional callable ``(attempt, pid)`` called after every (re)start.

    Returns:
        The last exit code (0 when the SuperNode ended cleanly).

    Raises:
        KeyboardInterrupt: passed on after stopping the SuperNode.
    """
    Path(log_file).parent.mkdir(parents=True, exist_ok=True)
    delay = backoff_s
    attempt = 0
    restarts = 0  # since the last healthy run
    while True:
        attempt += 1
        started = time.monotonic()
        offset = Path(log_file).stat().st_size if Path(log_file).exists() else 0
        with open(log_file, "ab") as fh:
            proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        log.info("SuperNode started (attempt %d, pid %d)", attempt, proc.pid)
        if on_start:
            on_start(attempt, proc.pid)
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            stop_process_tree(proc.pid, timeout_s=10.0)
            raise
        lasted = time.monotonic() - started
        restarts = 0 if lasted >= healthy_after_s else restarts + 1
        if code == 0:
            log.info("SuperNode ended cleanly")
            return 0
        refused = _refused_activation(log_file, offset)
        if refused and attempt == 1:
            log.error(
                "the SuperLink refused this SuperNode (code 2004): either its key is not enrolled (ask the "
                "coordinator to enrol supernode-key.pub with `onfh coordinator enroll`), or the SuperLink still "
                "holds this node's previous session after an unclean stop (start again in about a minute); "
                "not restarting"
            )
            return code
        if refused:
            # After a crash the SuperLink still holds the old session until its heartbeat expires
            # (Flower: about 2 x 30 s) and refuses the same key with the same code: keep backing off.
            log.warning("the SuperLink still holds this node's previous session; retrying in %.0f s", held_retry_s)
            if restarts > max_restarts:
                return code
            time.sleep(held_retry_s)
            continue
        if restarts > max_restarts:
            log.error(
                "SuperNode exited with code %d; %d restarts in a row used up, giving up (log: %s)",
                code,
                max_restarts,
                log_file,
            )
            return code
        delay = backoff_s if lasted >= healthy_after_s else min(max_backoff_s, delay * (2 if attempt > 1 else 1))
        log.warning("SuperNode exited with code %d after %.0f s; restarting in %.0f s", code, lasted, delay)
        time.sleep(delay)


def _refused_activation(log_file: Path, offset: int = 0) -> bool:
    """True when the SuperNode's output after byte ``offset`` says the SuperLink refused to activate it
    (Flower code 2004): an unenrolled key, or an enrolled one whose previous session is still held."""
    try:
        with open(log_file, "rb") as fh:
            fh.seek(offset)
            return b"[code: 2004]" in fh.read()
    except OSError:
        return False
