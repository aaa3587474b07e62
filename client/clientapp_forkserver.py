"""A SuperNode whose ClientApp processes start warm: forked from a process that has imported torch and MONAI.

Flower 1.42's deployment runtime runs every message in a fresh ``flwr-clientapp`` process
(``FLOWER-1.42-NOTES.md``, "No Ray in deployment"), and each one pays the import of torch,
MONAI and this project (about 10 CPU-seconds on this machine, measured with
``python -X importtime -c "import client.client_app"``) before it trains for a second or two.
With 4 sites and 2 messages a round (train, evaluate) that import cost dominated a deployment
round (issue 8, "deployment overhead").

This module keeps Flower's own pieces and changes only *how* a ClientApp process starts:

* the SuperNode runs with ``--isolation process``, so it launches no SuperExec of its own
  (https://flower.ai/docs/framework/docker/run-as-subprocess.html, "process" mode);
* :func:`serve` is that SuperExec. It imports the ClientApp's third-party modules once, then
  asks the SuperNode's Runtime API for tasks exactly as ``flower-superexec`` does
  (``AcquireTask``, then Flower's :class:`~flwr.supercore.superexec.plugin.AutoExecPlugin`);
* :class:`ForkExecutor` launches each task by ``os.fork()`` and runs Flower's
  :func:`flwr.supernode.runtime.run_clientapp.run_clientapp` in the child: the same code
  ``flwr-clientapp --token`` runs, with the same token, FAB installation and app loading.

The child is still one process per message: a crash, a leak or a ``SIGKILL`` of one ClientApp
touches no other, as with Flower's subprocess executor. The project's own modules are imported in
the warm-up too (about 0.7 CPU-seconds a task otherwise), but a task gets them only if the FAB the
coordinator signed holds byte-identical files (:class:`WarmProjectFinder`); otherwise the FAB's
code is imported afresh. Children name themselves ``flwr-clientapp`` (``/proc/PID/comm``) so
``ps`` and ``top`` show them as Flower's would be.

Run as ``python -m client.clientapp_forkserver [--threads N] -- flower-supernode ...``: it starts
the SuperNode (adding ``--isolation process``), serves its tasks, and exits with the SuperNode's
exit code, so :func:`client.site_daemon.run_daemon` supervises both as one process.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import hashlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from shared_models.flower import internals as flower_internals

log = logging.getLogger("onfh.forkserver")

#: The ClientApp reference of ``pyproject.toml`` (``[tool.flwr.app.components]``).
CLIENTAPP_MODULE = "client.client_app"
#: This project's top-level packages (served to tasks only when the FAB's files are identical).
PROJECT_PACKAGES = ("client", "server", "shared_models", "strategies", "sim")
#: Imported lazily by torch on first use, so not by the ClientApp's import: ``torch._dynamo`` on the
#: first model built on the ``meta`` device (the ClientApp's state-dict templates), 1.4 CPU-seconds
#: a task when it is not warm (found with ``py-spy record --subprocesses`` on a site daemon).
ALSO_WARM = ("torch._dynamo",)
#: Wait between ``AcquireTask`` calls: ``MIN_POLL_S`` after a task started or a ClientApp ended (the
#: next message of a round follows within a second or two), doubling while nothing comes, up to
#: ``MAX_POLL_S`` (``flower-superexec`` polls every 1 s).
MIN_POLL_S, MAX_POLL_S = 0.05, 0.5
#: Log line format (the SuperNode log; ``sim.bench.federation.message_waves`` parses the task lines).
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"


class WarmProjectFinder(importlib.abc.MetaPathFinder):
    """Serves the project's already-imported modules to a FAB whose files are byte-identical.

    :func:`warm_imports` takes the project's modules out of ``sys.modules`` and hands them to this
    finder with the SHA-256 of each module's source. When a ClientApp task imports a project
    module, Flower has put the FAB's folder first on ``sys.path``; the finder locates the FAB's
    copy of the top-level package there and compares **every** warm module's file with the FAB's
    file at the same relative path. Only if all are identical does it return the warm module
    objects (their ``__file__`` and ``__path__`` pointing at the FAB); one differing or missing
    file and it steps aside for the whole task, and Flower imports the FAB's code as it would in
    a fresh process. FAB modules the warm-up did not import are imported from the FAB as usual. So the code that runs is always byte for byte the FAB's: a
    site whose installed release differs from the coordinator's FAB runs the FAB, only slower.
    """

    def __init__(self, modules: dict[str, tuple[object, str, str]], project_packages: tuple[str, ...]):
        self.modules = modules  # name -> (module, path relative to its sys.path root, sha256)
        self.project_packages = project_packages
        self.fab_root: Path | None = None
        self.identical: bool | None = None  # decided once per process (task) ...
        self.decided_in: int | None = None  # ... in this pid

    def _decide(self, root: Path) -> bool:
        for _module, rel, digest in self.modules.values():
            try:
                if hashlib.sha256((root / rel).read_bytes()).hexdigest() != digest:
                    return False
            except OSError:
                return False
        return True

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in self.project_packages:
            return None
        if self.decided_in != os.getpid():
            self.decided_in, self.identical = os.getpid(), None
        if self.identical is False:
            return None
        if self.identical is None:
            top = importlib.machinery.PathFinder.find_spec(name.split(".")[0])
            if top is None or not top.submodule_search_locations:
                return None
            self.fab_root = Path(list(top.submodule_search_locations)[0]).parent
            self.identical = self._decide(self.fab_root)
            log.debug("project modules %s the FAB's: %s", "are" if self.identical else "differ from", self.fab_root)
            if not self.identical:
                return None
            self._adopt_all()
        warm = self.modules.get(name)
        return None if warm is None else warm[0].__spec__  # None: not in the warm-up, the FAB's normally

    def _adopt_all(self) -> None:
        """Point every warm module at its FAB file and put it back in ``sys.modules`` (they are one
        consistent set: a package's attributes already hold its warm submodules)."""
        for name, (module, rel, _) in self.modules.items():
            origin = str(self.fab_root / rel)
            package = rel.endswith("__init__.py")
            spec = importlib.util.spec_from_loader(name, _WarmLoader(module), origin=origin, is_package=package)
            spec.has_location = True
            module.__spec__, module.__file__, module.__loader__ = spec, origin, spec.loader
            if package:
                spec.submodule_search_locations[:] = [str(Path(origin).parent)]
                module.__path__ = list(spec.submodule_search_locations)
            sys.modules.setdefault(name, module)


class _WarmLoader(importlib.abc.Loader):
    """Loader of a module executed in the warm-up: creating it returns that module, executing it is a no-op."""

    def __init__(self, module):
        self.module = module

    def create_module(self, spec):
        return self.module

    def exec_module(self, module) -> None:
        pass


def warm_imports(module: str = CLIENTAPP_MODULE, project_packages: tuple[str, ...] = PROJECT_PACKAGES) -> int:
    """Import ``module`` (and so everything it imports), then hand the project's own modules to a
    :class:`WarmProjectFinder` (first on ``sys.meta_path``) instead of ``sys.modules``.

    Returns:
        The number of modules kept imported (third-party and project, for the log line).

    CUDA stays untouched: a parent that has initialised CUDA cannot fork a child that uses it, so
    ``PYTORCH_NVML_BASED_CUDA_CHECK=1`` makes any ``torch.cuda.is_available()`` during the imports ask
    NVML (fork-safe) instead of the CUDA driver, and :func:`assert_cuda_untouched` checks afterwards.
    Each forked ClientApp initialises CUDA itself, on first use.

    Raises:
        ImportError: ``module`` cannot be imported (the site's install is broken; names the module).
        RuntimeError: an import initialised CUDA (every child would fail on the GPU).
    """
    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    for name in (module, *ALSO_WARM):
        importlib.import_module(name)
    assert_cuda_untouched()
    project = {}
    for name in [n for n in sys.modules if n.split(".")[0] in project_packages]:
        mod = sys.modules.pop(name)
        file = getattr(mod, "__file__", None)
        if not file:
            continue
        depth = name.count(".") + (1 if Path(file).name == "__init__.py" else 0)
        root = Path(file).parents[depth]
        project[name] = (
            mod,
            Path(file).relative_to(root).as_posix(),
            hashlib.sha256(Path(file).read_bytes()).hexdigest(),
        )
    sys.meta_path.insert(0, WarmProjectFinder(project, project_packages))
    importlib.invalidate_caches()
    # Objects made so far are shared copy-on-write with every child; keep the collector from
    # touching (and so copying) them (https://docs.python.org/3/library/gc.html#gc.freeze).
    gc.collect()
    gc.freeze()
    return len(sys.modules) + len(project)


def assert_cuda_untouched() -> None:
    """Raise unless this process is still free to fork ClientApps that use CUDA.

    Raises:
        RuntimeError: ``torch.cuda.is_initialized()`` (CUDA's state does not survive ``fork``; PyTorch
            refuses CUDA in such a child: "Cannot re-initialize CUDA in forked subprocess").
    """
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():
        raise RuntimeError(
            "CUDA was initialised in the fork launcher's warm parent, so no forked ClientApp "
            "could use the GPU; use --launcher subprocess, or find the import that touches CUDA"
        )


def _name_process(name: str) -> None:
    """Set ``/proc/self/comm`` (Linux, at most 15 bytes); a no-op elsewhere."""
    try:
        ctypes.CDLL(None).prctl(15, name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):
        pass


@dataclass
class ForkExecutor:
    """A Flower SuperExec executor (``flwr.supercore.superexec.executor.Executor``) that forks.

    Args:
        threads: torch intra-op threads in each ClientApp (``OMP_NUM_THREADS`` of the site daemon).
        max_parallel: at most this many ClientApps at once; further tasks wait in the SuperNode.
    """

    threads: int = 1
    max_parallel: int = 4
    children: set[int] = field(default_factory=set)
    #: ClientApp processes that exited with a non-zero code (Flower has already reported them as failed).
    failures: int = 0

    def get_eligible_capacity(
        self, supported_task_types, *, insecure: bool = False, root_certificates_path: str | None = None
    ):
        """ClientApp tasks only, while fewer than ``max_parallel`` children run."""
        del insecure, root_certificates_path
        self.reconcile()
        if len(self.children) >= self.max_parallel:
            return set(), set()
        return set(supported_task_types) & {flower_internals.TaskType.CLIENT_APP}, set()

    def wait_for_capacity(self, task_type=None, *, fab_hash=None, insecure=False, root_certificates_path=None) -> None:
        """Capacity is checked in :meth:`get_eligible_capacity`; nothing to wait for here."""
        del task_type, fab_hash, insecure, root_certificates_path

    def launch(self, spec):
        """Fork; the child runs Flower's ``run_clientapp`` for ``spec.token`` and exits with its code."""
        try:
            pid = os.fork()
        except OSError as exc:
            return flower_internals.LaunchResult.failed(f"fork failed: {exc}")
        if pid == 0:  # the ClientApp process
            os._exit(_run_task(spec, self.threads))
        self.children.add(pid)
        return flower_internals.LaunchResult.accepted()

    def reconcile(self) -> None:
        """Reap finished children (no zombies)."""
        for pid in list(self.children):
            try:
                done, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done, status = pid, 0
            if done:
                self.children.discard(pid)
                code = os.waitstatus_to_exitcode(status)
                if code != 0:
                    self.failures += 1
                    log.warning("ClientApp process %d exited with code %d", pid, code)

    def close(self) -> None:
        """Ask running ClientApps to stop (``SIGTERM``: Flower's handlers push their status)."""
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        self.reconcile()


def _run_task(spec, threads: int) -> int:
    """Body of a forked ClientApp process; returns its exit code (never raises)."""
    code, t0 = 1, time.monotonic()
    try:
        _name_process("flwr-clientapp")
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        import torch

        torch.set_num_threads(threads)
        flower_internals.run_clientapp(
            runtime_api_address=spec.runtime_api_address,
            token=spec.token,
            insecure=spec.insecure,
            certificates=flower_internals.validate_and_resolve_root_certificates(
                spec.root_certificates_path, spec.insecure
            ),
            parent_pid=spec.parent_pid,
            runtime_dependency_install=False,
        )
        code = 0
    except SystemExit as exc:  # flwr_exit ends every task this way
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        log.exception("ClientApp task failed before Flower could report it")
    finally:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        log.info(
            "ClientApp task %d ended with code %s: %.1f s, %.1f CPU-s",
            spec.task_id,
            code,
            time.monotonic() - t0,
            usage.ru_utime + usage.ru_stime,
        )
        sys.stdout.flush()
        sys.stderr.flush()
    return code


def serve(
    runtime_api_address: str,
    *,
    executor: ForkExecutor,
    min_poll_s: float = MIN_POLL_S,
    max_poll_s: float = MAX_POLL_S,
    should_stop=lambda: False,
) -> int:
    """Acquire ClientApp tasks from the SuperNode's Runtime API and launch each with ``executor``.

    The loop of ``flower-superexec`` (``flwr.supercore.superexec.run_superexec``) with a
    :class:`ForkExecutor`; the Runtime API is the SuperNode's own, on 127.0.0.1, without TLS.
    It polls every ``min_poll_s`` seconds right after a launch or a ClientApp's end and backs off
    to ``max_poll_s`` while idle. Connection errors while the SuperNode starts are retried.

    Args:
        should_stop: called every loop; ``True`` ends :func:`serve` (the SuperNode exited).

    Returns:
        How many ``AcquireTask`` calls the Runtime API answered.
    """
    client = flower_internals.RuntimeHttpClient.from_server_address(
        server_address=runtime_api_address,
        insecure=True,
        root_certificates=None,
        interceptors=[flower_internals.RuntimeVersionHttpInterceptor(component_name="SuperExec")],
    )
    plugin = flower_internals.AutoExecPlugin(
        runtime_api_address=runtime_api_address,
        insecure=True,
        root_certificates_path=None,
        runtime_dependency_install=False,
        executor=executor,
    )
    answered, wait = 0, min_poll_s
    try:
        while not should_stop():
            running = len(executor.children)
            types, _ = executor.get_eligible_capacity(set(plugin.supported_task_types))
            wait = min_poll_s if len(executor.children) < running else min(max_poll_s, wait * 2)
            if types:
                try:
                    res = client.AcquireTask(
                        flower_internals.AcquireTaskRequest(supported_task_types=types, agentapp_fab_hashes=[])
                    )
                except Exception as exc:
                    log.debug("Runtime API not reachable yet: %s", exc)
                    res = None
                answered += res is not None
                if res is not None and res.HasField("task") and res.token:
                    result = plugin.launch_task(token=res.token, task=res.task)
                    if str(result.status) != "accepted":
                        log.error("task %d not launched: %s", res.task.task_id, result.message)
                    wait = min_poll_s
            time.sleep(wait)
    finally:
        executor.close()
        client.close()
    return answered


def _runtime_address(supernode_cmd: list[str]) -> str:
    """``HOST:PORT`` of the SuperNode's Runtime API from its ``--host``/``--port`` (Flower's defaults otherwise)."""

    def opt(name: str, default: str) -> str:
        return supernode_cmd[supernode_cmd.index(name) + 1] if name in supernode_cmd else default

    return f"{opt('--host', '127.0.0.1')}:{opt('--port', str(flower_internals.SUPERNODE_UVICORN_DEFAULT_PORT))}"


def main(argv: list[str] | None = None) -> int:
    """``python -m client.clientapp_forkserver [--threads N] -- flower-supernode ARGS``; returns its exit code."""
    parser = argparse.ArgumentParser(prog="python -m client.clientapp_forkserver", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--threads",
        type=int,
        default=int(os.environ.get("OMP_NUM_THREADS", "1")),
        help="torch threads in each ClientApp (default: $OMP_NUM_THREADS or 1)",
    )
    parser.add_argument("--max-parallel", type=int, default=4, help="ClientApps at once (default 4)")
    parser.add_argument("supernode", nargs=argparse.REMAINDER, help="-- then the flower-supernode command line")
    args = parser.parse_args(argv)
    cmd = [a for a in args.supernode if a != "--"] if args.supernode[:1] == ["--"] else list(args.supernode)
    if not cmd:
        parser.error("give the flower-supernode command after --")
    if "--isolation" not in cmd:
        cmd += ["--isolation", "process"]
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per Runtime API call otherwise
    supernode = subprocess.Popen(cmd)  # same process group: the daemon's stop_process_tree ends both

    def _stop(signum, _frame):
        raise SystemExit(128 + signum)  # the finally below ends the SuperNode

    signal.signal(signal.SIGTERM, _stop)
    try:
        t0 = time.monotonic()
        kept = warm_imports()
        log.info(
            "ClientApp imports warm (%d modules, %.1f s); serving %s",
            kept,
            time.monotonic() - t0,
            _runtime_address(cmd),
        )
        serve(
            _runtime_address(cmd),
            executor=ForkExecutor(threads=args.threads, max_parallel=args.max_parallel),
            should_stop=lambda: supernode.poll() is not None,
        )
    except KeyboardInterrupt:
        pass
    finally:  # whatever ends this process ends its SuperNode too: the daemon restarts both
        end_supernode(supernode)
    return supernode.wait()


def end_supernode(proc: subprocess.Popen, *, grace_s: float = 5.0, timeout_s: float = 10.0) -> None:
    """Let the SuperNode leave the SuperLink cleanly, then make sure it is gone.

    A daemon stops the whole process tree with one SIGTERM each, so the SuperNode usually has its
    own signal already and is deregistering: it gets ``grace_s`` seconds to exit before it is sent
    one SIGTERM (a second signal during Flower's shutdown would cut it short, and the SuperLink
    would then hold the node's session, refusing a restart for about a minute with code 2004),
    then ``timeout_s`` seconds before SIGKILL.
    """
    for signal_it, wait_s in ((None, grace_s), (proc.terminate, timeout_s), (proc.kill, None)):
        if proc.poll() is not None:
            return
        if signal_it is not None:
            signal_it()
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


if __name__ == "__main__":
    sys.exit(main())
