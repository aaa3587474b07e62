"""Benchmark sections of the federation: Flower overhead, memory, scaling, deployment.

Registered in :data:`sim.bench.core.SECTIONS` on import (:func:`sim.bench.core.load_sections`
imports this module).

* ``federated``: the Flower simulation of both phases against the **same local work in one plain
  PyTorch loop** (:func:`plain_federation`: every site's training, FedAvg, every site's
  evaluation, site-local crops, run sequentially in this process, no Flower), side by side; the
  same plain loop with the weights rounded to float16 at every exchange gives the accuracy cost of
  ``transfer-dtype = "float16"``. Also the memory figures of the simulation.
* ``scaling``: simulations with 4, 8 and 16 phantom sites and 1x, 2x and 4x data per site: wall
  time per round, peak memory, and resident memory after round 5 against round 2 (a per-site
  leak across rounds would grow it).
* ``deployment``: the same run with a real SuperLink and SuperNodes on 127.0.0.1 (the issue-7
  commands) against the simulation.

Memory is sampled every ``SAMPLE_S`` seconds with psutil: every process of the run (found by the
run's own ``FLWR_HOME``, as :func:`sim.experiments.runner.stop_run_processes` finds them) plus this process.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil
import torch

from shared_models.processes import ProcessWatchdog
from shared_models.specs import ACCURACY, IOU_MEAN, MACRO_AUC, NUM_EXAMPLES, VAL_NUM_EXAMPLES, VAL_SCORE, Phase
from sim.bench.core import Row, section
from sim.bench.data import DEFAULT_WORK, phantom_sites

__all__ = [
    "RunSampler",
    "deployment_benchmark",
    "federated_benchmark",
    "flwr_cli_cpu_s",
    "plain_federation",
    "scaling_benchmark",
]

logger = logging.getLogger(__name__)

SAMPLE_S = 0.5
GIB = 2.0**30
StateDict = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------- memory sampling


class RunSampler(threading.Thread):
    """Samples the resident memory of a Flower run's processes in the background.

    Processes are those whose environment holds ``FLWR_HOME=<flwr_home>`` (rescanned every
    ``rescan_s``), plus this process. Ray's workers, which run the ClientApps, are the processes
    whose command line starts with ``ray::``. ``progress`` (the server's ``progress.json``) is read
    at each sample: the total resident memory is recorded when a round is first seen finished.

    Attributes:
        peak_total_bytes: peak of the summed RSS (run processes + this one).
        peak_client_bytes: peak RSS of any one Ray worker process (a ClientApp host).
        round_rss: ``{(phase, round): summed RSS when that round's checkpoint appeared}``.
        round_time: ``{(phase, round): time.monotonic() when it appeared}``.
    """

    def __init__(self, flwr_home: Path, progress: Path | None = None, rescan_s: float = 3.0):
        super().__init__(daemon=True)
        self.flwr_home, self.progress, self.rescan_s = str(flwr_home), progress, rescan_s
        self.peak_total_bytes = 0
        self.peak_client_bytes = 0
        self.round_rss: dict[tuple[str, int], int] = {}
        self.round_time: dict[tuple[str, int], float] = {}
        self._halt = threading.Event()
        self._procs: dict[int, tuple[psutil.Process, bool]] = {}

    def _rescan(self) -> None:
        for p in psutil.process_iter():
            if p.pid in self._procs or p.pid == os.getpid():
                continue
            try:
                if p.environ().get("FLWR_HOME") == self.flwr_home:
                    self._procs[p.pid] = (p, " ".join(p.cmdline()).startswith("ray::"))
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, OSError):
                continue

    def _sample(self) -> None:
        total = psutil.Process().memory_info().rss
        for pid, (proc, is_worker) in list(self._procs.items()):
            try:
                rss = proc.memory_info().rss
                if not is_worker:  # Ray renames its worker processes after they start
                    is_worker = " ".join(proc.cmdline()).startswith("ray::")
                    self._procs[pid] = (proc, is_worker)
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                self._procs.pop(pid, None)
                continue
            total += rss
            if is_worker:
                self.peak_client_bytes = max(self.peak_client_bytes, rss)
        self.peak_total_bytes = max(self.peak_total_bytes, total)
        if self.progress is not None and self.progress.exists():
            try:
                p = json.loads(self.progress.read_text())
                key = (str(p["phase"]), int(p["round"]))
            except (OSError, ValueError, KeyError):
                return
            if key not in self.round_rss:
                self.round_rss[key], self.round_time[key] = total, time.monotonic()

    def run(self) -> None:
        last_scan = 0.0
        while not self._halt.is_set():
            if time.monotonic() - last_scan > self.rescan_s:
                self._rescan()
                last_scan = time.monotonic()
            self._sample()
            self._halt.wait(SAMPLE_S)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)


# ----------------------------------------------------------------------------- the plain loop


def fedavg_states(states: Sequence[StateDict], weights: Sequence[float]) -> StateDict:
    """Weighted mean of state dicts as Flower's ``aggregate_arrayrecords`` computes it (float
    entries in their own dtype, integer entries in float64 and rounded back), in plain torch."""
    total = float(sum(weights))
    out = {}
    for key, ref in states[0].items():
        if ref.is_floating_point():
            acc = sum(s[key] * (w / total) for s, w in zip(states, weights))
            out[key] = acc.to(ref.dtype)
        else:
            acc = sum(s[key].double() * (w / total) for s, w in zip(states, weights))
            out[key] = torch.round(acc).to(ref.dtype)
    return out


def fp16_round(state: StateDict) -> StateDict:
    """Floating entries rounded to float16 and back (what ``transfer-dtype = "float16"`` sends)."""
    return {k: (v.half().to(v.dtype) if v.is_floating_point() else v) for k, v in state.items()}


def plain_federation(cfg, sites: dict, *, exchange: Callable[[StateDict], StateDict] | None = None) -> dict[str, Any]:
    """Both phases of the ServerApp's federation as one plain sequential loop, without Flower.

    The same calls a site makes in the simulation (:mod:`client.tasks`), in the same order: per
    round, every training site trains from the global weights, the weights are averaged
    (:func:`fedavg_states`, weighted by ``num-examples``), every site evaluates the new global
    model; the round with the best validation score is kept (as ``server_app.run_phase``); then
    every site crops its heads with the kept detector, and the stager phase runs the same way.

    Args:
        cfg: the run's :class:`~shared_models.config.RunConfig`.
        sites: site id -> opened :class:`~client.site_data.SiteData`.
        exchange: applied to every state dict that would travel (``None``: exact).

    Returns:
        ``{"detector": {"iou-mean": ...}, "stager": {"macro-auc": ..., "accuracy": ...}}``: the kept
        models' test metrics, example-weighted over the sites.
    """
    from client import tasks
    from shared_models.detection import YOLOX3D
    from shared_models.stager import MulDenseNet3D

    send = exchange or (lambda s: s)
    torch.manual_seed(cfg.seed)
    detector = YOLOX3D(cfg.detector).state_dict()
    stager_init = MulDenseNet3D(cfg.stager).state_dict()

    def phase(name: str, state: StateDict, rounds: int, key: str = "") -> tuple[StateDict, dict]:
        best, best_score = None, -float("inf")  # as server_app.run_phase: best validated round, else the last
        for r in range(1, rounds + 1):
            replies = []
            for s in cfg.train_sites:
                train = (
                    tasks.detector_train
                    if name == Phase.DETECTOR
                    else (lambda site, c, st, **kw: tasks.stager_train(site, c, st, key, **kw))
                )
                new, metrics = train(sites[s], cfg, send(state), proximal_mu=0.0, server_round=r)
                replies.append((send(new), metrics[NUM_EXAMPLES]))
            state = fedavg_states([st for st, _ in replies], [n for _, n in replies])
            evals = {s: tasks.evaluate(site, cfg, name, send(state), key) for s, site in sites.items()}
            n_val = sum(e[VAL_NUM_EXAMPLES] for e in evals.values())
            score = sum(e[VAL_SCORE] * e[VAL_NUM_EXAMPLES] for e in evals.values()) / n_val if n_val else None
            if score is not None and score > best_score:
                best, best_score = (state, evals), score
            last = (state, evals)
        return best or last

    detector, det_metrics = phase(Phase.DETECTOR, detector, cfg.phase(Phase.DETECTOR).rounds)
    keys = {tasks.make_crops(site, cfg, send(detector))[0] for site in sites.values()}
    _, stg_metrics = phase(Phase.STAGER, stager_init, cfg.phase(Phase.STAGER).rounds, keys.pop())

    def pooled(metrics: dict, name: str) -> float:
        n = sum(m[NUM_EXAMPLES] for m in metrics.values())
        return sum(float(m[name]) * m[NUM_EXAMPLES] for m in metrics.values()) / n if n else float("nan")

    return {
        "detector": {IOU_MEAN: pooled(det_metrics, IOU_MEAN)},
        "stager": {MACRO_AUC: pooled(stg_metrics, MACRO_AUC), ACCURACY: pooled(stg_metrics, ACCURACY)},
    }


# ----------------------------------------------------------------------------- helpers


def _run_config(
    root: Path,
    site_ids: Sequence[str],
    *,
    rounds: int,
    stager_rounds: int | None,
    local_steps: int | None,
    cache: Path,
    out: Path,
) -> dict[str, Any]:
    overrides: dict[str, Any] = {
        "data-root": str(root),
        "site-ids": ",".join(site_ids),
        "train-sites": ",".join(site_ids),
        "report-groups": ";".join(f"{s}={s}" for s in site_ids),
        "cache-dir": str(cache),
        "out-dir": str(out),
        "detector-rounds": rounds,
        "stager-rounds": rounds if stager_rounds is None else stager_rounds,
        "device": "cpu",
        "node-wait-timeout-s": 600.0,
    }
    if local_steps is not None:
        overrides.update(
            {
                "detector-local-steps": local_steps,
                "stager-local-steps": local_steps,
                "detector-warmup-steps": 0,
                "stager-warmup-steps": 0,
            }
        )
    return overrides


def _open_sites(overrides: dict, site_ids: Sequence[str]) -> tuple[Any, dict]:
    from client import tasks
    from shared_models.config import RunConfig, default_run_config

    cfg = RunConfig.from_run_config({**default_run_config(), **overrides})
    return cfg, {s: tasks.open_site(cfg, s, Path(cfg.data_root) / s) for s in site_ids}


def _clear_crops(cache: Path) -> None:
    for folder in Path(cache).glob("*/crops"):
        shutil.rmtree(folder, ignore_errors=True)


def _simulate(overrides: dict, n_sites: int, work: Path) -> tuple[dict, RunSampler]:
    """One Flower simulation (``sim.experiments.runner.run_simulation``) with a :class:`RunSampler` beside it."""
    from sim.experiments.runner import run_simulation

    out = Path(overrides["out-dir"])
    shutil.rmtree(out, ignore_errors=True)
    flower = work / "flower"
    shutil.rmtree(flower, ignore_errors=True)
    sampler = RunSampler(flower / "flwr-home", out / "checkpoints" / "progress.json")
    sampler.start()
    try:
        stats = run_simulation(overrides, num_sites=n_sites, work_dir=flower, cpus_per_client=1)
    finally:
        sampler.stop()
    return stats, sampler


def flwr_cli_cpu_s(repeats: int = 2) -> float:
    """CPU seconds (user + system) of one ``flwr`` command-line call (``flwr --help``: the import
    cost every ``flwr list`` status poll of ``sim.experiments.runner`` pays), smallest of ``repeats``."""
    import resource
    import subprocess

    from shared_models.flower.env import flower_bin

    best = float("inf")
    for _ in range(repeats):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([flower_bin("flwr"), "--help"], capture_output=True, check=False)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        best = min(best, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return best


# ----------------------------------------------------------------------------- federated


@section("federated", "Federated overhead: 4-site Flower simulation vs the same work in a plain PyTorch loop")
def federated_benchmark(
    *,
    work: Path = DEFAULT_WORK,
    rounds: int = 3,
    local_steps: int | None = None,
    fp16_accuracy: bool = True,
    seed: int = 0,
) -> list[Row]:
    """Flower's overhead, memory and the accuracy cost of float16 transfer, on 4 phantom sites.

    Every site trains (``train-sites = A,B,C,D``), ``rounds`` rounds of each phase (detector, then
    stager on detector crops), default widths, ``local_steps`` optimiser steps per round (``None``:
    the run config's 100), FedAvg. Site caches are warm for both runs (preprocessing is not
    federated work); crops are made in both.

    * ``baseline_s``: :func:`plain_federation` in this process with all CPU threads;
    * ``flower_s``: ``run_simulation`` (SuperLink, ServerApp, Ray with one ClientApp per core and
      one thread each), from SuperLink start to the run's end;
    * ``overhead_ratio`` = flower / baseline (target <= 1.15); ``roundtrip_s_per_round`` =
      (flower - baseline) / (2 * rounds), Flower's cost per federated round of either phase,
      start-up included;
    * ``status_poll_cpu_share``: CPU spent by ``sim.experiments.runner``'s ``flwr list`` status polls (count x
      :func:`flwr_cli_cpu_s`) over the machine's CPU time during the simulation;
    * memory: ``peak_rss_gib`` of the whole simulation (target <= 12) and ``peak_client_rss_gib``
      of the largest ClientApp process (target <= 3);
    * float16 transfer (``fp16_accuracy``): the plain loop again with every exchanged state dict
      rounded to float16; the kept models' pooled test metrics beside the exact run's.

    Returns:
        One row (keys listed above plus the metrics and settings).
    """
    from client.splits import write_splits

    site_ids = ("A", "B", "C", "D")
    root = phantom_sites(work)
    write_splits(root, site_ids, site_ids, seed=seed)
    fed = work / "federated"
    base_cache, sim_cache = fed / "cache-baseline", fed / "cache-sim"
    common = dict(rounds=rounds, stager_rounds=None, local_steps=local_steps)
    base_over = _run_config(root, site_ids, cache=base_cache, out=fed / "baseline-out", **common)
    sim_over = _run_config(root, site_ids, cache=sim_cache, out=fed / "sim-out", **common)
    base_over["seed"] = sim_over["seed"] = seed
    cfg, sites = _open_sites(base_over, site_ids)  # warms the baseline cache
    _open_sites(sim_over, site_ids)  # warms the simulation's cache
    _clear_crops(base_cache)
    _clear_crops(sim_cache)

    t0 = time.perf_counter()
    exact = plain_federation(cfg, sites)
    baseline_s = time.perf_counter() - t0
    base_rss = psutil.Process().memory_info().rss

    stats, sampler = _simulate(sim_over, len(site_ids), fed)
    flower_s = float(stats["wall_time_s"])

    poll_cpu = stats["status_asks"] * flwr_cli_cpu_s()
    row: Row = {
        "section": "federated",
        "sites": len(site_ids),
        "rounds_per_phase": rounds,
        "local_steps": cfg.phase(Phase.DETECTOR).local_steps,
        "baseline_s": baseline_s,
        "flower_s": flower_s,
        "overhead_ratio": flower_s / baseline_s,
        "roundtrip_s_per_round": (flower_s - baseline_s) / (2 * rounds),
        "peak_rss_gib": sampler.peak_total_bytes / GIB,
        "peak_client_rss_gib": sampler.peak_client_bytes / GIB,
        "baseline_process_rss_gib": base_rss / GIB,
        # sim.experiments.runner asks for the run's status with a `flwr list` subprocess (when the executor has
        # exited, or every 30 s); each pays the flwr CLI's imports. Their CPU, as a share of the
        # machine's CPU time during the run:
        "status_polls": stats["status_asks"],
        "status_poll_cpu_s": poll_cpu,
        "status_poll_cpu_share": poll_cpu / (flower_s * (os.cpu_count() or 1)),
        "fp32_iou_mean": exact["detector"][IOU_MEAN],
        "fp32_macro_auc": exact["stager"][MACRO_AUC],
        "fp32_accuracy": exact["stager"][ACCURACY],
    }
    if fp16_accuracy:
        _clear_crops(base_cache)
        half = plain_federation(cfg, sites, exchange=fp16_round)
        row.update(
            {
                "fp16_iou_mean": half["detector"][IOU_MEAN],
                "fp16_macro_auc": half["stager"][MACRO_AUC],
                "fp16_accuracy": half["stager"][ACCURACY],
            }
        )
    else:
        row.update({"fp16_iou_mean": None, "fp16_macro_auc": None, "fp16_accuracy": None})
    row["torch_threads"] = torch.get_num_threads()
    return [row]


# ----------------------------------------------------------------------------- scaling


def make_scaled_sites(source: Path, dest: Path, n_sites: int, copies: int) -> list[str]:
    """``n_sites`` phantom sites ``S01..`` under ``dest``, site ``i`` built from source site
    ``A/B/C/D[i % 4]``; each holds ``copies`` copies of its source's patients (studies are symlinks
    under new names, patient ids get a ``-c<k>`` suffix). Returns the site ids."""
    from client.site_data import read_site_csv
    from client.site_layout import MANIFEST_COLUMNS, MANIFEST_NAME

    sources = sorted(p for p in Path(source).iterdir() if (p / MANIFEST_NAME).is_file() and p.name in "ABCD")
    dest.mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(n_sites):
        src, site = sources[i % len(sources)], f"S{i + 1:02d}"
        folder = dest / site
        if not (folder / MANIFEST_NAME).exists():
            folder.mkdir(parents=True, exist_ok=True)
            rows = [row for _, row in read_site_csv(src / MANIFEST_NAME, MANIFEST_COLUMNS)]
            out = []
            for k in range(copies):
                for r in rows:
                    study = f"{r['study']}-c{k}"
                    if not (folder / study).exists():
                        (folder / study).symlink_to((src / r["study"]).resolve())
                    out.append({**r, "patient_id": f"{r['patient_id']}-c{k}", "study": study})
            with open(folder / MANIFEST_NAME, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(out)
        ids.append(site)
    return ids


@section("scaling", "Scaling: wall time per round and memory with 4/8/16 phantom sites and 1x/2x/4x data")
def scaling_benchmark(
    *,
    work: Path = DEFAULT_WORK,
    site_counts: Sequence[int] = (4, 8, 16),
    data_copies: Sequence[int] = (1, 2, 4),
    rounds: int = 5,
    local_steps: int = 3,
    seed: int = 0,
) -> list[Row]:
    """Flower simulations over phantom sites made of copies of the 4 phantom centres.

    Grid: every ``site_counts`` at 1x data, and 4 sites at every ``data_copies`` (a shared cell
    runs once). Every site trains; ``rounds`` detector rounds (the stager phase has 1 round) of
    ``local_steps`` steps, so that local work per site is fixed (FLamby convention) and the
    per-site cost of Flower dominates. Per cell:

    * ``s_per_round``: mean wall time of detector rounds 2..``rounds`` (round ends are when each
      checkpoint appears); ``per_site_s_per_round`` = that over the number of sites (linear or
      better in sites: it does not grow);
    * ``peak_rss_gib``: peak resident memory of the simulation;
    * ``rss_round5_over_round2``: summed resident memory when round 5 ended over round 2
      (target: within 5 %, i.e. <= 1.05; a per-site leak across rounds would grow it).

    Returns:
        One row per cell.
    """
    from client.splits import write_splits

    if rounds < 5:
        raise ValueError(f"scaling: rounds must be >= 5 (memory after round 5 vs round 2), got {rounds}")
    root = phantom_sites(work)
    cells = [(n, 1) for n in site_counts] + [(min(site_counts), c) for c in data_copies if c != 1]
    rows = []
    for n_sites, copies in cells:
        base = work / "scaling" / f"sites{n_sites}-x{copies}"
        site_ids = make_scaled_sites(root, base / "data", n_sites, copies)
        write_splits(base / "data", site_ids, site_ids, seed=seed)
        over = _run_config(
            base / "data",
            site_ids,
            rounds=rounds,
            stager_rounds=1,
            local_steps=local_steps,
            cache=base / "cache",
            out=base / "out",
        )
        over["seed"] = seed
        _, sites = _open_sites(over, site_ids)  # warm caches: preprocessing is not federated work
        heads = sum(len(s.heads) for s in sites.values())
        del sites
        _clear_crops(base / "cache")
        stats, sampler = _simulate(over, n_sites, base)
        times = [sampler.round_time.get(("detector", r)) for r in range(1, rounds + 1)]
        per_round = (times[-1] - times[0]) / (rounds - 1) if None not in times else float("nan")
        rss2, rss5 = sampler.round_rss.get(("detector", 2)), sampler.round_rss.get(("detector", 5))
        rows.append(
            {
                "section": "scaling",
                "sites": n_sites,
                "data_copies": copies,
                "heads": heads,
                "rounds": rounds,
                "local_steps": local_steps,
                "flower_s": float(stats["wall_time_s"]),
                "s_per_round": per_round,
                "per_site_s_per_round": per_round / n_sites,
                "peak_rss_gib": sampler.peak_total_bytes / GIB,
                "peak_client_rss_gib": sampler.peak_client_bytes / GIB,
                "rss_round5_over_round2": (rss5 / rss2) if rss2 and rss5 else float("nan"),
            }
        )
    return rows


# ----------------------------------------------------------------------------- deployment


@section("deployment", "Deployment overhead: real SuperLink/SuperNodes on 127.0.0.1 vs the simulation (issue 7)")
def deployment_benchmark(
    *,
    work: Path = DEFAULT_WORK,
    rounds: int = 3,
    local_steps: int | None = None,
    seed: int = 0,
    timeout_s: float = 3600.0,
    launcher: str = "fork",
) -> list[Row]:
    """The same run in Flower's simulation and in a real deployment on this machine, side by side.

    Both: 4 phantom sites that all train, ``rounds`` rounds of each phase, ``local_steps`` steps
    (``None``: the run config's), warm site caches, crops made in both.

    * ``simulation_s``: :func:`sim.experiments.runner.run_simulation`, from SuperLink start to the run's end;
    * ``deployment_s``: the issue-7 deployment (``onfh coordinator certs``/``enroll``,
      :func:`server.coordinator.start_superlink` with TLS and SuperNode authentication on
      127.0.0.1, ports 19200-19299, one ``onfh site daemon --launcher LAUNCHER`` per site with one
      thread each), from ``coordinator launch`` to the run's end; the SuperLink and SuperNodes are
      long-lived in a deployment and started before the clock;
    * ``overhead_ratio`` = deployment / simulation (target <= 1.10). Every deployment message
      runs in a process of its own (``FLOWER-1.42-NOTES.md``), which the simulation's Ray actors
      do not: ``launcher="fork"`` (the daemon's default, :mod:`client.clientapp_forkserver`) forks
      it with torch and MONAI imported; ``"subprocess"`` is Flower's fresh ``flwr-clientapp``;
    * where the deployment's time went (:func:`message_waves`, fork launcher only): the gaps
      between message waves (Flower's pacing), the waves' spans and the ClientApps' CPU time.

    Returns:
        One row; ``status`` is ``"pending: ..."`` with the figures ``None`` when the deployment
        commands (``server.coordinator``) are not there.
    """
    try:
        from server import coordinator as co
    except ImportError:
        return [
            {
                "section": "deployment",
                "status": "pending: needs the issue-7 deployment commands",
                "simulation_s": None,
                "deployment_s": None,
                "overhead_ratio": None,
            }
        ]
    import subprocess
    import sys

    from client.splits import write_splits
    from shared_models.cli import main as onfh

    site_ids = ("A", "B", "C", "D")
    root = phantom_sites(work)
    write_splits(root, site_ids, site_ids, seed=seed)
    dep = work / "deployment"
    shutil.rmtree(dep, ignore_errors=True)
    common = dict(rounds=rounds, stager_rounds=None, local_steps=local_steps)
    sim_over = {**_run_config(root, site_ids, cache=dep / "cache-sim", out=dep / "sim-out", **common), "seed": seed}
    dep_over = {**_run_config(root, site_ids, cache=dep / "cache-dep", out=dep / "dep-out", **common), "seed": seed}
    _open_sites(sim_over, site_ids)
    _open_sites(dep_over, site_ids)
    _clear_crops(dep / "cache-sim")
    stats, _ = _simulate(sim_over, len(site_ids), dep)
    simulation_s = float(stats["wall_time_s"])
    _clear_crops(dep / "cache-dep")

    home = dep / "coordinator"
    if onfh(["coordinator", "certs", "--home", str(home)]) != 0:
        raise RuntimeError("deployment benchmark: `onfh coordinator certs` failed")
    certs = co.CertPaths.in_folder(home / "certs")
    flwr_home = home / "flwr-home"
    ports = iter(_free_ports(19200, 19300, 1 + len(site_ids)))
    port = next(ports)
    watchdog = ProcessWatchdog()  # the SuperLink and the daemons die with this process, kill -9 included
    watchdog.start()
    superlink = co.start_superlink(
        certs, flwr_home=flwr_home, database=home / "superlink.db", log_file=home / "superlink.log", port=port
    )
    daemons: list[subprocess.Popen] = []
    try:
        for site in site_ids:
            keys = dep / f"keys-{site}"
            if (
                onfh(["site", "keys", "--out", str(keys)]) != 0
                or onfh(
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
                != 0
            ):
                raise RuntimeError(f"deployment benchmark: could not enroll site {site}")
            with open(dep / f"daemon-{site}.log", "ab") as log_file:
                daemons.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "shared_models.cli",
                            "site",
                            "daemon",
                            "--data",
                            str(root / site),
                            "--superlink",
                            f"127.0.0.1:{port}",
                            "--ca-cert",
                            str(certs.ca_cert),
                            "--key",
                            str(keys / "supernode-key"),
                            "--cache",
                            str(dep / "cache-dep" / site),
                            "--port",
                            str(next(ports)),
                            "--threads",
                            "1",
                            "--launcher",
                            launcher,
                            "--max-retries",
                            "5",
                            "--max-restarts",
                            "3",
                        ],
                        stdout=log_file,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                        cwd=co.APP_DIR,
                    )
                )
        registry = co.load_registry(home / co.REGISTRY_NAME)
        node_ids = [int(registry[s]["node_id"]) for s in site_ids]
        deadline = time.monotonic() + 600
        while not all(co.connected_nodes(flwr_home=flwr_home).get(n) == "online" for n in node_ids):
            if time.monotonic() > deadline:
                raise RuntimeError(f"deployment benchmark: SuperNodes not online after 600 s (logs in {dep})")
            time.sleep(2.0)
        rc = {k: v for k, v in dep_over.items() if k != "out-dir"}
        t0 = time.monotonic()
        run_id = co.launch(
            rc,
            out=dep / "dep-out",
            flwr_home=flwr_home,
            signing_key=certs.signing_key,
            registry=home / co.REGISTRY_NAME,
        )
        status = co.wait_for_run(run_id, flwr_home=flwr_home, timeout_s=timeout_s, poll_s=0.5, out=dep / "dep-out")
        deployment_s = time.monotonic() - t0
    finally:
        for proc in daemons:
            co.stop_process_tree(proc.pid)
        co.stop_process_tree(superlink.pid)
        watchdog.stop()
    if status != "finished:completed":
        raise RuntimeError(f"deployment benchmark: run ended {status!r} (logs in {dep})")
    waves = message_waves({s: dep / "cache-dep" / s / "supernode.log" for s in site_ids})
    return [
        {
            "section": "deployment",
            "status": status,
            "launcher": launcher,
            "sites": len(site_ids),
            "rounds_per_phase": rounds,
            **waves,
            "simulation_s": simulation_s,
            "deployment_s": deployment_s,
            "overhead_ratio": deployment_s / simulation_s,
        }
    ]


_TASK_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) .*ClientApp task \d+ ended with code -?\d+: "
    r"([\d.]+) s, ([\d.]+) CPU-s"
)


def message_waves(logs: dict[str, Path]) -> dict[str, float | int]:
    """Where a deployment run's time went, from the fork launcher's per-task lines in each site's log.

    The ``k``-th ClientApp task of every site belongs to wave ``k`` (all sites get every message
    of a run: query, train, evaluate). Per wave: the *gap* from the end of the previous wave's
    last task to the first start of this one (Flower's message passing: an idle SuperNode asks
    the SuperLink for work every 3 s, the ServerApp aggregates) and the *span* from its first
    start to its last end.

    Returns:
        ``message_waves``, ``wave_gaps_s`` (sum), ``wave_spans_s`` (sum), ``clientapp_cpu_s`` (all
        tasks), ``clientapp_wall_s`` (all tasks); zeros when no log has task lines
        (``--launcher subprocess`` writes none).
    """
    import datetime

    tasks: dict[str, list[tuple[float, float, float]]] = {}
    for site, path in logs.items():
        rows = []
        for line in Path(path).read_text(errors="replace").splitlines() if Path(path).exists() else []:
            m = _TASK_LINE.match(line)
            if m:
                end = datetime.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").timestamp() + int(m.group(2)) / 1e3
                rows.append((end - float(m.group(3)), end, float(m.group(4))))
        tasks[site] = rows
    n = min((len(r) for r in tasks.values()), default=0)
    gaps = spans = 0.0
    prev_end = None
    for k in range(n):
        start, end = min(tasks[s][k][0] for s in tasks), max(tasks[s][k][1] for s in tasks)
        gaps += 0.0 if prev_end is None else max(0.0, start - prev_end)
        spans += end - start
        prev_end = end
    every = [t for rows in tasks.values() for t in rows]
    return {
        "message_waves": n,
        "wave_gaps_s": round(gaps, 2),
        "wave_spans_s": round(spans, 2),
        "clientapp_cpu_s": round(sum(t[2] for t in every), 1),
        "clientapp_wall_s": round(sum(t[1] - t[0] for t in every), 1),
    }


def _free_ports(lo: int, hi: int, n: int) -> list[int]:
    """``n`` ports in ``[lo, hi)`` that nothing listens on and that bind on 127.0.0.1."""
    import socket

    found = []
    for port in range(lo, hi):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        found.append(port)
        if len(found) == n:
            return found
    raise RuntimeError(f"no {n} free ports in {lo}-{hi - 1}")
