"""Run the federation in Flower's simulation engine: own SuperLink, ``flwr run``, wait, report.

Follows ``FLOWER-1.42-NOTES.md`` (shared/): every Flower process gets a
project-local ``FLWR_HOME``, no update check or telemetry, **no runtime dependency
installation**, its own ``RAY_TMPDIR``; the simulation SuperLink is started by us
on 127.0.0.1 and stopped by its PID at the end (``flwr run . local`` would leave a
detached one behind); and because ``flwr run`` exits 0 even when the run failed,
the final status is read from ``flwr list --format json``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path

import psutil

from shared_models.flower.env import flower_bin, flower_env
from shared_models.processes import ProcessWatchdog, toml_value

log = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parents[2]
CONNECTION = "onfh-sim"


class SimulationError(RuntimeError):
    """The Flower run failed or did not finish; the message says where to look."""


def free_port() -> int:
    """An unused TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


#: GPU share of one simulated site's ClientApp when CUDA is present and ``--gpus-per-site`` is not
#: given: Ray schedules at most ``1 / share`` ClientApps per GPU (Flower's ``client-resources-num-gpus``),
#: so four sites train at once on one GPU. It is raised on small cards by :data:`SITE_GPU_MEMORY_GIB`.
DEFAULT_GPUS_PER_SITE = 0.25
#: Upper estimate of one paper-size ClientApp's GPU memory (GiB): weights, Adam state, activations at the
#: default batches and the site's resident training volumes (a few hundred MB). Not yet measured on a GPU
#: (``onfh sim bench --only gpu`` reports the peak per model size and batch as ``peak_mem_gib``).
SITE_GPU_MEMORY_GIB = 8.0


def gpus_per_site(requested: float | None = None) -> float:
    """The GPU share (Ray ``num_gpus``) each simulated ClientApp asks for.

    Without CUDA this is 0: the run is the CPU run it always was (a share given anyway is ignored with
    a warning, since Ray would then find no GPU and start no ClientApp at all). With CUDA, ``requested``
    when given, else ``max(DEFAULT_GPUS_PER_SITE, SITE_GPU_MEMORY_GIB / memory of GPU 0)``, so that
    the ClientApps Ray places on one GPU together stay within its memory (a 16 GiB card gets 0.5: two
    sites at once; an 80 GiB card 0.25: four).

    Raises:
        ValueError: ``requested`` outside ``[0, 1]``.
    """
    import torch

    if requested is not None and not 0.0 <= float(requested) <= 1.0:
        raise ValueError(f"--gpus-per-site: expected a GPU share in [0, 1], got {requested}")
    if not torch.cuda.is_available():
        if requested:
            log.warning("--gpus-per-site %g ignored: no CUDA device, the sites train on the CPU", requested)
        return 0.0
    if requested is not None:
        return float(requested)
    total_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    return round(min(1.0, max(DEFAULT_GPUS_PER_SITE, SITE_GPU_MEMORY_GIB / total_gib)), 3)


def federation_config(
    num_sites: int, cpus_per_client: int, gpus_per_client: float = 0.0, ray_cpus: int | None = None
) -> str:
    """The ``flwr run --federation-config`` value: one virtual SuperNode per site and each ClientApp's
    Ray resources. ``client-resources-num-gpus`` is passed only when positive; Flower's Ray backend
    then runs ``min(CPUs / cpus_per_client, GPUs / gpus_per_client)`` ClientApps at once
    (``flwr.simulation.ray_transport.ray_actor.pool_size_from_resources``) and Ray hands each one its
    GPU through ``CUDA_VISIBLE_DEVICES``. ``ray_cpus``, when given, is the CPUs Ray may use
    (``init-args-num-cpus``; default every core), so at most ``ray_cpus / cpus_per_client`` ClientApps
    run at once; never above the real core count (``FLOWER-1.42-NOTES.md``)."""
    text = f"num-supernodes={num_sites} client-resources-num-cpus={cpus_per_client}"
    text += f" client-resources-num-gpus={gpus_per_client:g}" if gpus_per_client > 0 else ""
    return text + (f" init-args-num-cpus={ray_cpus}" if ray_cpus else "")


@contextmanager
def simulation_superlink(work: Path, env: dict[str, str]):
    """Start ``flower-superlink --simulation`` on 127.0.0.1 and stop it (whole process group) on exit.

    Yields:
        ``(address, pid)``: the connection address ``127.0.0.1:PORT`` and the SuperLink's PID
        (its process tree holds the ServerApp, Ray and every simulated ClientApp).
    """
    port = free_port()
    log_path = work / "superlink.log"
    cmd = [
        flower_bin("flower-superlink"),
        "--insecure",
        "--simulation",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ]
    with open(log_path, "ab") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SimulationError(f"flower-superlink exited with code {proc.returncode}; see {log_path}")
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.5)
        else:
            raise SimulationError(f"flower-superlink did not open port {port} within 60 s; see {log_path}")
        yield f"127.0.0.1:{port}", proc.pid
    except KeyboardInterrupt:
        # Ctrl-C: stop within 2 s (issue 18), SIGKILL after a short grace, no wait for the killed processes
        # to finish dying. Checkpoints are written atomically and chained, so the last one stays whole.
        stop_run_processes(proc.pid, env["FLWR_HOME"], timeout_s=INTERRUPT_GRACE_S)
        raise
    except BaseException:
        stop_run_processes(proc.pid, env["FLWR_HOME"])
        raise
    else:
        stop_run_processes(proc.pid, env["FLWR_HOME"])


def stop_run_processes(superlink_pid: int, flwr_home: str, timeout_s: float = 15.0) -> int:
    """Stop every process of this run: the SuperLink's tree and anything started with our ``FLWR_HOME``.

    Flower's SuperExec, ``flwr-simulation`` and Ray's agents start in sessions of their own
    (some re-parented to PID 1), so killing the SuperLink's process group is not enough;
    they all inherit this run's unique ``FLWR_HOME`` and are found by it. SIGTERM first,
    SIGKILL after ``timeout_s`` seconds.

    Returns:
        The number of processes that had to be stopped.
    """
    procs: dict[int, psutil.Process] = {}
    try:
        root = psutil.Process(superlink_pid)
        procs.update({p.pid: p for p in (root, *root.children(recursive=True))})
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get("FLWR_HOME") == flwr_home:
                procs[p.pid] = p
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
            continue
    for p in procs.values():
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=timeout_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return len(procs)


def write_connection(flwr_home: Path, address: str) -> None:
    """Write ``$FLWR_HOME/config.toml`` with one insecure connection named ``onfh-sim``."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "{address}"\ninsecure = true\n'
    )


def _flwr(args: list[str], env: dict[str, str], timeout: float = 300) -> str:
    proc = subprocess.run(
        [flower_bin("flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=APP_DIR
    )
    if proc.returncode != 0:
        raise SimulationError(
            f"flwr {args[0]} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}"
        )
    return proc.stdout


def _run_status(env: dict[str, str], run_id: int) -> str:
    out = _flwr(["list", CONNECTION, "--format", "json"], env)
    data = json.loads(out[out.index("{") :])
    for run in data.get("runs", []):
        if int(run.get("run-id", run.get("run_id", -1))) == run_id:
            return str(run.get("status", ""))
    return ""


def tree_rss_bytes(pid: int) -> int:
    """Resident memory (bytes) of a process and all its descendants; 0 if it is gone."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


INTERRUPT_GRACE_S = 0.5  # on Ctrl-C, seconds between SIGTERM and SIGKILL for the run's processes
STATUS_EVERY_S = 30.0  # `flwr list` costs about 1.2 CPU-s a call: ask only when the executor is gone, or this often


def _simulation_alive(address: str) -> bool:
    """True while a ``flwr-simulation`` executor serves the SuperLink at ``address`` (psutil)."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if any(part.endswith("flwr-simulation") for part in cmd[:2]) and address in " ".join(cmd):
            return True
    return False


def _wait(env: dict[str, str], run_id: int, timeout_s: float, on_poll, pid: int, peak: dict, address: str) -> str:
    """Wait until the run finishes, tracking the peak RSS of the process tree in ``peak``.

    The status comes from ``flwr list`` (a fresh CLI process, about 1.2 CPU-s), asked when the run's
    ``flwr-simulation`` executor is not (or no longer) running and otherwise every
    :data:`STATUS_EVERY_S` seconds, so that polling does not eat into the clients' cores.
    """
    deadline = time.monotonic() + timeout_s
    asked = -math.inf
    while time.monotonic() < deadline:
        peak["rss_bytes"] = max(peak.get("rss_bytes", 0), tree_rss_bytes(pid) + tree_rss_bytes(os.getpid()))
        if not _simulation_alive(address) or time.monotonic() - asked >= STATUS_EVERY_S:
            asked = time.monotonic()
            peak["status_asks"] = peak.get("status_asks", 0) + 1
            status = _run_status(env, run_id)
            if status.startswith(("finished", "stopped")):
                return status
        if on_poll:
            on_poll()
        time.sleep(2.0)
    raise SimulationError(f"run {run_id} did not finish within {timeout_s:.0f} s")


def _last_error(path: Path) -> str:
    """The last exception line of a run log (``SomethingError: message``), for a one-line error."""
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return "no run log"
    pattern = re.compile(r"^\s*[\w.]+(Error|Exception|Missing\w*): ")
    hits = [line.strip() for line in lines if pattern.match(line)]
    return hits[-1] if hits else "see the run log"


PATH_KEYS = ("data-root", "out-dir", "cache-dir", "signing-key")


def absolute_paths(run_config: Mapping[str, object]) -> dict[str, object]:
    """The run config with its non-empty path keys (:data:`PATH_KEYS`) made absolute against the current folder."""
    return {k: str(Path(str(v)).resolve()) if k in PATH_KEYS and v else v for k, v in run_config.items()}


def run_simulation(
    run_config: Mapping[str, object],
    *,
    num_sites: int,
    work_dir: Path,
    cpus_per_client: int = 1,
    gpus_per_client: float | None = None,
    timeout_s: float = 3 * 3600,
    on_poll=None,
    app_dir: Path = APP_DIR,
    ray_cpus: int | None = None,
) -> dict:
    """Run the ONFH-FL app (or another app folder) in Flower's simulation engine, one virtual SuperNode per site.

    Args:
        run_config: overrides of ``[tool.flwr.app.config]`` (keys must exist there).
        num_sites: number of virtual SuperNodes (partition ids 0..num_sites-1 map to
            ``site-ids`` in order).
        work_dir: folder for FLWR_HOME and the SuperLink log.
        cpus_per_client: Ray ``client-resources-num-cpus``; on 2 cores, 1 runs two
            sites at once with one thread each.
        gpus_per_client: Ray ``client-resources-num-gpus``, resolved by :func:`gpus_per_site`
            (``None``: the default share when CUDA is present, 0 on CPU).
        timeout_s: wall-clock limit for the whole run, in seconds.
        on_poll: optional callable invoked about every 2 s while the run is going.
        app_dir: the Flower app folder (its ``pyproject.toml`` names the components and the run-config
            defaults); default this project's (the MedMNIST benchmark passes its own,
            :func:`sim.experiments.medmnist_app.write_app_dir`).
        ray_cpus: CPUs Ray may use (:func:`federation_config`); default every core.

    Returns:
        ``{"run_id", "wall_time_s", "peak_rss_bytes", "status_asks"}``; the peak is the largest
        sampled (every ~2 s) resident memory of this process plus the SuperLink's process tree;
        ``status_asks`` counts the ``flwr list`` calls made to learn the run's status.

    Raises:
        SimulationError: if the run ends ``finished:failed``/``stopped`` or times out; the
            message names the SuperLink log.
    """
    # `flwr run` runs in the app's folder: every path must be absolute to mean the caller's folder
    work_dir = Path(work_dir).resolve()
    run_config = absolute_paths(run_config)
    if Path(app_dir).resolve() == APP_DIR:  # this project's ServerApp: nodes are processes of this run (F7)
        run_config = {"identity": "simulation", **run_config}
    work_dir.mkdir(parents=True, exist_ok=True)
    flwr_home = work_dir / "flwr-home"
    ray_tmp = Path(tempfile.mkdtemp(prefix="onfh-ray-"))
    env = flower_env(flwr_home, ray_tmp=ray_tmp, threads=cpus_per_client, local_superlink_port=free_port())
    federation = federation_config(num_sites, cpus_per_client, gpus_per_site(gpus_per_client), ray_cpus)
    overrides = work_dir / "run-config.toml"
    run_log = work_dir / "run.log"
    overrides.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in run_config.items()))
    watchdog = ProcessWatchdog()  # every process of the run dies with this one, kill -9 included (issue 16)
    watchdog.start(env)
    interrupted = False
    try:
        t0 = time.monotonic()
        peak: dict = {}
        with simulation_superlink(work_dir, env) as (address, pid):
            write_connection(flwr_home, address)
            out = _flwr(
                [
                    "run",
                    str(Path(app_dir).resolve()),
                    CONNECTION,
                    "--run-config",
                    str(overrides),
                    "--federation-config",
                    federation,
                    "--format",
                    "json",
                ],
                env,
            )
            run_id = int(json.loads(out[out.index("{") :])["run-id"])
            log.info("simulation run %d submitted (%s); logs stream to %s", run_id, federation, run_log)
            with open(run_log, "ab") as fh:
                streamer = subprocess.Popen(
                    [flower_bin("flwr"), "log", str(run_id), CONNECTION, "--stream"],
                    env=env,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    cwd=APP_DIR,
                    start_new_session=True,
                )
            try:
                status = _wait(env, run_id, timeout_s, on_poll, pid, peak, address)
            except KeyboardInterrupt:
                # stop at once (issue 18: within 2 s): no `flwr stop` round trip (a CLI process, seconds under
                # load); simulation_superlink stops every process of the run on the way out
                log.warning("interrupted: stopping run %d", run_id)
                streamer.kill()
                interrupted = True
                raise
            finally:
                if streamer.poll() is None:
                    streamer.terminate()
                streamer.wait(timeout=30)
            if status != "finished:completed":
                raise SimulationError(f"run {run_id} ended {status!r}: {_last_error(run_log)}\nfull log: {run_log}")
        return {
            "run_id": run_id,
            "wall_time_s": round(time.monotonic() - t0, 1),
            "peak_rss_bytes": peak.get("rss_bytes", 0),
            "status_asks": peak.get("status_asks", 0),
        }
    finally:
        watchdog.stop(timeout_s=INTERRUPT_GRACE_S if interrupted else 30.0)  # interrupted: the run is already killed
        shutil.rmtree(ray_tmp, ignore_errors=True)
