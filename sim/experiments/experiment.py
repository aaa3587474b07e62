"""One federated experiment: splits -> site caches -> Flower simulation -> report.

``onfh sim run`` runs one; ``onfh sim compare`` runs a grid of them. An experiment
lives in its own output folder and resumes there: a finished one is only re-read, an
interrupted one continues after its last checkpointed round (``server/checkpoint.py``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from shared_models.specs import PHASES, Phase


def run_complete(out: Path, run_config: dict, cfg) -> bool:
    """True when ``out`` holds a finished run of this very config.

    Raises:
        ValueError: if ``out`` holds checkpoints of a different configuration (checked
            here, before Flower starts, so the message is not buried in a run log).
    """
    from server.checkpoint import CheckpointStore, config_fingerprint
    from server.server_app import phase_finished

    store = CheckpointStore(out / "checkpoints", config_fingerprint(run_config), run_config)
    detector, stager = store.load(Phase.DETECTOR), store.load(Phase.STAGER)
    return bool(
        phase_finished(detector, cfg.phase(Phase.DETECTOR).rounds, cfg)
        and phase_finished(stager, cfg.phase(Phase.STAGER).rounds, cfg)
        and (out / "report.json").exists()
        and (out / "bundle" / "MANIFEST.sig").exists()
        and "simulation" in json.loads((out / "report.json").read_text())
    )


def last_verified_checkpoint(folder: Path) -> str:
    """One line on the last checkpoint in ``folder`` whose hash chain verifies (what a resume starts from).

    A checkpoint file that does not match the chain (a save cut short) is named; the run then resumes
    from the previous verified round (``server/checkpoint.py``).
    """
    from server.checkpoint import CheckpointError, read_chain, verify_chain

    try:
        entries = read_chain(Path(folder))
    except CheckpointError as err:
        return f"checkpoints in {folder} do not verify: {err}"
    if not entries:
        return f"no checkpoint yet in {folder}: a resume starts from round 1"
    last = entries[-1]
    try:
        verify_chain(entries, Path(folder))
    except ValueError as err:
        return f"the last checkpoint does not verify ({err}); a resume falls back to the previous verified round"
    return f"last verified checkpoint: {last['phase']} round {last['round']} ({folder})"


def prepare_splits(cfg) -> None:
    """Write every site's ``split.csv`` for this run, and the pooled site when ``pooled-sites`` is set.

    ``split-sites`` are split 8:1:1 by patient, the other real sites are all test; the pooled
    baseline's site (:mod:`sim.experiments.pooled`) then takes the pooled sites' train and val patients.

    Raises:
        ValueError: a training site without a train split, or ``pooled-sites`` without the
            pooled site among ``site-ids``.
    """
    from client.splits import write_splits
    from sim.experiments.pooled import POOLED_SITE, write_pooled_site

    real = [s for s in cfg.site_ids if not (cfg.pooled_sites and s == POOLED_SITE)]
    if cfg.pooled_sites and POOLED_SITE not in cfg.site_ids:
        raise ValueError(f"run config 'pooled-sites' is set but site-ids {list(cfg.site_ids)} lacks {POOLED_SITE}")
    unsplit = [s for s in cfg.train_sites if s in real and s not in cfg.split_sites]
    if unsplit:
        raise ValueError(
            f"training sites {unsplit} are not in 'split-sites' {list(cfg.split_sites)}: they would have no train split"
        )
    write_splits(Path(cfg.data_root), real, cfg.split_sites, seed=cfg.seed)
    if cfg.pooled_sites:
        write_pooled_site(Path(cfg.data_root), cfg.pooled_sites)


def run_experiment(
    overrides: dict[str, object], *, console: Console | None = None, gpus_per_site: float | None = None
) -> dict:
    """Run (or resume, or just re-read) one federated simulation and return its report.

    Args:
        overrides: run-config keys over the ``pyproject.toml`` defaults; must include
            ``data-root`` (the phantom or site folders) and ``out-dir``.
        console: where progress goes (default: a new rich console).
        gpus_per_site: GPU share of each site's ClientApp (:func:`sim.experiments.runner.gpus_per_site`;
            ``None``: the default share when CUDA is present, 0 on CPU).

    Returns:
        The ``report.json`` dict (also rendered as ``report.html`` with PNG figures), with
        ``baseline_intensity_logreg`` (the intensity baseline on the same splits), ``simulation``
        (wall time in s, peak RSS in bytes) and ``exact_check`` (:func:`sim.experiments.exact_check.exact_check`:
        exact against histogram AUC, patient-bootstrap CIs).

    Raises:
        ValueError: a bad run config, or ``out-dir`` holding checkpoints of another config.
        FileNotFoundError: ``data-root`` does not exist.
        FileExistsError: ``out-dir`` exists and is not a folder.
        sim.experiments.runner.SimulationError: the Flower run failed.
    """
    from client import tasks
    from server.report import json_safe
    from server.report_html import write_report_html
    from server.report_plots import plot_training_curves
    from server.tracking import log_run_outputs
    from shared_models.config import RunConfig, default_run_config
    from sim.experiments.baseline import intensity_baseline
    from sim.experiments.exact_check import exact_check
    from sim.experiments.runner import gpus_per_site as resolve_gpus
    from sim.experiments.runner import run_simulation

    console = console or Console()
    gpu_share = resolve_gpus(gpus_per_site)  # a bad share fails here, before any work
    full = {**default_run_config(), **overrides}
    cfg = RunConfig.from_run_config(full)
    if not Path(cfg.data_root).is_dir():
        raise FileNotFoundError(f"data folder {cfg.data_root}: no such folder")
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {out}: exists and is not a folder")
    if run_complete(out, full, cfg):
        console.print(
            f"run in {out} is already complete for this configuration: re-reading its report "
            "(use a new output folder to train again)"
        )
        report = json.loads((out / "report.json").read_text())
        if "exact_check" not in report:  # a run finished before the check existed
            prepare_splits(cfg)
            sites = {s: tasks.open_site(cfg, s, Path(cfg.data_root) / s) for s in cfg.site_ids}
            report["exact_check"] = json_safe(exact_check(cfg, out, sites, report))
            (out / "report.json").write_text(json.dumps(report, indent=2))
            write_report_html(report, out)
        return report
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    prepare_splits(cfg)
    if gpu_share:
        console.print(f"each site's ClientApp gets {gpu_share:g} of a GPU (--gpus-per-site)")
    console.print(f"[bold]preparing site caches[/bold] for {', '.join(cfg.site_ids)} …")
    sites = {s: tasks.open_site(cfg, s, Path(cfg.data_root) / s) for s in cfg.site_ids}
    refused = sum(v.status != "ok" for site in sites.values() for v in site.verdicts)
    console.print(
        f"  {sum(len(s.heads) for s in sites.values())} heads ready, {refused} studies refused "
        f"[{time.monotonic() - t0:.1f} s]"
    )

    total_rounds = sum(cfg.phase(p).rounds for p in PHASES)
    progress_file = out / "checkpoints" / "progress.json"
    with Progress(
        TextColumn("[bold]federated rounds[/bold] {task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task("", total=total_rounds)

        def poll():
            if progress_file.exists():
                try:
                    p = json.loads(progress_file.read_text())
                except (OSError, ValueError):
                    return
                done = p["round"] + (cfg.phase(Phase.DETECTOR).rounds if p["phase"] == Phase.STAGER else 0)
                bar.update(task, completed=done, description=f"({p['phase']} round {p['round']})")

        stats = run_simulation(
            overrides,
            num_sites=len(cfg.site_ids),
            work_dir=out / "flower",
            cpus_per_client=1,
            gpus_per_client=gpu_share,
            on_poll=poll,
        )
        poll()

    report = json.loads((out / "report.json").read_text())
    baseline = intensity_baseline(sites, cfg.train_sites, cfg.report_groups, seed=cfg.seed)
    report["baseline_intensity_logreg"] = json_safe(
        {g: {"n": m["n"], "macro": m["macro"], "weighted": m["weighted"]} for g, m in baseline.items()}
    )
    report["simulation"] = {
        "wall_time_s": round(time.monotonic() - t0, 1),
        "flower_wall_time_s": stats["wall_time_s"],
        "peak_rss_bytes": stats["peak_rss_bytes"],
    }
    report["exact_check"] = json_safe(exact_check(cfg, out, sites, report))
    (out / "report.json").write_text(json.dumps(report, indent=2))
    plot_training_curves(report, out / "training_curves.png")
    write_report_html(report, out)
    # the ServerApp tracked the rounds, report.json and the bundle; add what the harness wrote after it (issue 21)
    log_run_outputs(
        cfg.track,
        out,
        cfg.tracking_uri,
        [out / "report.json", out / "report.html", out / "training_curves.png", out / "figures"],
    )
    return report
