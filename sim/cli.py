"""``onfh sim ...`` and ``onfh report ...``: the researchers' commands.

* ``onfh sim phantoms | run | compare | bench | medmnist | demo``: phantoms, the four-center Flower
  simulation, grids of variants x seeds, benchmarks, the AdrenalMNIST3D benchmark, the whole demo;
* ``onfh report readers``: the model against reader diagnoses (McNemar).

Found by the dispatcher :mod:`shared_models.cli` (``onfh``), which maps errors to exit codes; the
console, logging and the run-config arguments are in :mod:`shared_models.cli_common`.
``python -m sim.cli ...`` is ``onfh ...`` (any group), kept for scripts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rich.table import Table

from client.cli import cmd_infer
from client.cli import handled_errors as site_errors
from shared_models.cli import main
from shared_models.cli_common import (
    SCHEDULES,
    console,
    fmt,
    parse_set,
    tracking_args,
    tracking_config,
)
from shared_models.specs import STRATEGIES  # torch-free: `onfh sim -h` stays fast
from sim.experiments.medmnist_runs import DEFAULT_RUNS, RUNS, SIZES, parse_runs, parse_seeds  # torch-free too

__all__ = ["add_group", "add_medmnist_parser", "main"]

REAL_NIFTI = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "prostatex-0000-pelvis-t2-axial.nii.gz"


def handled_errors() -> tuple[type[BaseException], ...]:
    """Error classes that mean bad input (the dispatcher prints them, exit 1): the site's, since a simulation
    reads DICOM series and ``sim demo`` verifies and runs a bundle."""
    return site_errors()


def print_report(report: dict, baseline: dict | None = None) -> None:
    """Print the per-site report (and the intensity baseline) as tables."""
    rounds = ", ".join(f"{k} {v}" for k, v in report["rounds"].items())
    table = Table(
        title=f"Ficat-Arlet staging — {report['strategy']}, rounds: {rounds}, trained at {', '.join(report['train_sites'])}"
    )
    for col in (
        "site",
        "n",
        "accuracy",
        "sensitivity",
        "specificity",
        "F1",
        "AUC",
        "weighted AUC",
        "kappa (quadratic)",
        "baseline AUC",
    ):
        table.add_column(col, justify="right" if col != "site" else "left")
    notes = []
    for name, m in report["sites"].items():
        if not m.get("n"):
            table.add_row(name, "0", *["–"] * 8)
            continue
        macro = m["macro"]
        base = (baseline or {}).get(name, {}).get("macro", {}).get("auc")
        flag = (m.get("small_n") or {}).get("reasons") or []
        notes += [f"{name}: {r}" for r in flag]
        table.add_row(
            name + (" *" if flag else ""),
            str(m["n"]),
            *(fmt(macro[k]) for k in ("accuracy", "sensitivity", "specificity", "f1", "auc")),
            fmt(m["weighted"]["auc"]),
            fmt(m.get("quadratic_kappa")),
            fmt(base),
        )
    console.print(table)
    for note in notes:
        console.print(f"[yellow]* unreliable, too few heads:[/yellow] {note}")
    det = Table(title="3DC-YOLOX femoral head detection (test heads)")
    for col in (
        "site",
        "n",
        "IoU mean",
        "centre error mm (median)",
        "recall@0.3",
        "recall@0.5",
        "AP50",
        "low confidence",
    ):
        det.add_column(col, justify="right" if col != "site" else "left")
    for site, m in report["detector"].items():
        det.add_row(
            site,
            str(m["n"]),
            fmt(m["iou_mean"]),
            fmt(m["center_error_mm"]),
            fmt(m["recall30"]),
            fmt(m["recall50"]),
            fmt(m.get("ap50")),
            str(m["low_confidence"]),
        )
    console.print(det)
    from client.infer import calibration_table

    if (calibration := calibration_table(report)) is not None:
        console.print(calibration)


# --------------------------------------------------------------------------- sim


def cmd_phantoms(args) -> int:
    from sim.phantoms import generate_phantoms

    t0 = time.monotonic()
    summary = generate_phantoms(
        Path(args.out), args.profile, seed=args.seed, progress=True, replace=getattr(args, "replace", False)
    )
    table = Table(title=f"phantoms ({args.profile}, seed {args.seed}) in {args.out} [{time.monotonic() - t0:.1f} s]")
    for col in ("site", "scanner", "heads 0/I/II", "CNR I oedema", "CNR II bright band", "CNR II dark band"):
        table.add_column(col)
    for site, info in summary.get("sites", {}).items():
        cnr = info.get("cnr", {})
        stages = info.get("heads_per_stage", {})
        table.add_row(
            site,
            str(info.get("scanner_label", "")),
            "/".join(str(stages.get(k, 0)) for k in ("0", "I", "II")),
            *(fmt(cnr.get(k, {}).get("mean")) for k in ("I_oedema", "II_bright_band", "II_dark_band")),
        )
    console.print(table)
    return 0


def _run_config_for(args) -> dict[str, object]:
    out = Path(args.out).resolve()
    rc: dict[str, object] = {
        **SCHEDULES[args.profile],
        "data-root": str(Path(args.data).resolve()),
        "out-dir": str(out),
        "strategy": args.strategy,
        "seed": args.seed,
    }
    if args.train_sites:
        rc["train-sites"] = args.train_sites
    rc.update(tracking_config(args))
    rc.update(parse_set(args.set or []))
    return rc


def cmd_run(args) -> int:
    """Splits -> Flower simulation -> report (+ intensity baseline)."""
    from sim.experiments.experiment import run_experiment

    report = run_experiment(_run_config_for(args), console=console, gpus_per_site=getattr(args, "gpus_per_site", None))
    print_report(report, report.get("baseline_intensity_logreg"))
    if args.profile == "quick":
        console.print(
            "[yellow]quick profile: a smoke test of the whole pipeline; its figures are not meaningful "
            "(use --profile paper)[/yellow]"
        )
    out = Path(args.out)
    sim_stats = report.get("simulation", {})
    if sim_stats:
        console.print(f"training curves: {out / 'training_curves.png'}")
        console.print(
            f"wall time {sim_stats['wall_time_s']:.0f} s, peak memory of the simulation "
            f"{sim_stats['peak_rss_bytes'] / 2**30:.2f} GiB"
        )
    console.print(f"report: {out / 'report.json'} and {out / 'report.html'}\nsigned bundle: {out / 'bundle'}")
    if args.track != "none" and not args.tracking_uri:
        console.print(
            "experiment tracking: "
            + (
                f"mlflow ui --host 127.0.0.1 --backend-store-uri sqlite:///{out.resolve() / 'mlflow' / 'mlflow.db'}"
                if args.track == "mlflow"
                else f"tensorboard --host 127.0.0.1 --logdir {out / 'tensorboard'}"
            )
        )
    return 0


def cmd_compare(args) -> int:
    """A grid of variants x seeds on the same data; resumable; ``compare.json`` + ``compare.md``."""
    from shared_models.config import default_run_config, parse_report_groups
    from sim.experiments.compare import grid_variants, parse_variant, print_summary, report_groups_for, run_compare

    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2") from None
    args.seed = seeds[0] if seeds else 0
    base = {k: v for k, v in _run_config_for(args).items() if k not in ("out-dir", "seed")}
    if base.get("track") == "mlflow" and not base.get("tracking-uri"):  # one MLflow store for the whole grid
        base["tracking-uri"] = f"sqlite:///{(Path(args.out) / 'mlflow' / 'mlflow.db').resolve()}"
    full = {**default_run_config(), **base}
    if args.train_sites:  # every training site split 8:1:1 in every cell; its test split reported on its own
        train = [s.strip() for s in args.train_sites.split(",") if s.strip()]
        base.setdefault("split-sites", ",".join(train))
        if "report-groups" not in base:
            base["report-groups"] = report_groups_for(train, parse_report_groups(str(full["report-groups"])))
        full = {**default_run_config(), **base}
    if args.variant:
        variants = [parse_variant(v, parse_set) for v in args.variant]
    else:
        sites = [s.strip() for s in str(full["site-ids"]).split(",") if s.strip()]
        variants = grid_variants(args.grid, sites, full)
    reference = None
    if args.check_against:  # read first: a missing or broken reference fails before hours of runs
        reference = json.loads(Path(args.check_against).read_text())["summary"]
    summary = run_compare(base, Path(args.out), variants, seeds, console=console)
    print_summary(summary, console)
    console.print(f"grid: {Path(args.out) / 'report.html'} (open in a browser), compare.json and compare.md")
    if reference is not None:
        from sim.experiments.compare import outside_interval

        rows = json.loads((Path(args.out) / "compare.json").read_text())["rows"]
        problems = outside_interval(reference, [r for r in rows if r["seed"] in seeds])
        for line in problems:
            console.print(f"[red]outside the stated interval:[/red] {line}")
        if problems:
            return 1
        console.print(
            f"every figure of seeds {seeds} lies inside the 95 % one-more-seed interval of {args.check_against}"
        )
    return 0


def cmd_bench(args) -> int:
    """Benchmarks that print measured figures and write ``bench.json``."""
    from sim.bench.core import SECTIONS, parse_option, print_table, run_benchmarks

    names = args.only.split(",") if args.only else None
    options: dict = {}
    for text in args.option or []:
        name, key, value = parse_option(text)
        options.setdefault(name, {})[key] = value
    out = Path(args.out).resolve()  # Flower runs in the app's folder: relative paths would point there
    out.mkdir(parents=True, exist_ok=True)

    def write(result: dict) -> None:  # after every section: a late interruption keeps what was measured
        (out / "bench.json").write_text(json.dumps(result, indent=2))

    result = run_benchmarks(names, quick=args.quick, work=out / "work", on_section=write, **options)
    for name, rows in result["sections"].items():
        print_table(rows, title=SECTIONS[name].title, console=console)
    write(result)
    if result["sections"].get("poisoning"):
        from sim.bench.poisoning import poisoning_markdown

        (out / "poisoning.md").write_text(poisoning_markdown(result["sections"]["poisoning"]) + "\n")
        console.print(f"{out / 'poisoning.md'}: the poisoning table in markdown")
    console.print(
        f"{out / 'bench.json'} (load average {result['environment'].get('load_avg_1min', '?')}: "
        "figures taken under load are not comparable)"
    )
    return 0


def cmd_medmnist(args) -> int:
    """The AdrenalMNIST3D benchmark: run, write ``medmnist.json``, print the table. Bad input raises
    ``ValueError``/``FileNotFoundError``, which ``onfh`` prints as a one-line error (exit 1)."""
    from sim.experiments.medmnist import print_table, run_medmnist

    out = Path(args.out)
    rows = run_medmnist(Path(args.data), args.size, out, seeds=args.seeds, settings=args.settings, quick=args.quick)
    print_table(json.loads((out / "medmnist.json").read_text()) if rows else rows)
    return 0


def cmd_demo(args) -> int:
    """Phantoms -> simulation -> report -> inference on the real pelvic MRI."""
    out = Path(args.out)
    data = out / "data"
    args_ph = argparse.Namespace(out=str(data), profile=args.profile, seed=args.seed)
    cmd_phantoms(args_ph)
    args_run = argparse.Namespace(
        data=str(data),
        out=str(out / "run"),
        profile=args.profile,
        strategy=args.strategy,
        seed=args.seed,
        train_sites=None,
        set=args.set,
        gpus_per_site=args.gpus_per_site,
        track=args.track,
        tracking_uri=args.tracking_uri,
    )
    cmd_run(args_run)
    if REAL_NIFTI.exists():
        key = out / "run" / "keys" / "bundle-signing-key.pem.pub"
        cmd_infer(
            argparse.Namespace(
                bundle=str(out / "run" / "bundle"),
                study=str(REAL_NIFTI),
                out=str(out / "infer-prostatex"),
                public_key=str(key) if key.exists() else None,
                device="auto",
                allow_refused=True,
            )
        )
    else:
        console.print(f"[yellow]real pelvic MRI not found at {REAL_NIFTI}: skipping the inference step[/yellow]")
    return 0


def sim_commands(parser: argparse.ArgumentParser) -> None:
    """The ``onfh sim`` commands."""
    sim = parser.add_subparsers(dest="cmd", required=True)
    p = sim.add_parser("phantoms", help="generate phantom hip MRI (DICOM) for sites A-D")
    p.add_argument("--out", required=True, help="output folder (one sub-folder per site)")
    p.add_argument(
        "--profile",
        choices=("quick", "paper"),
        default="quick",
        help="quick: tiny, for tests; paper: 209 patients / 381 heads",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--replace",
        action="store_true",
        help="overwrite phantoms of another profile or seed in --out (and their splits and site caches)",
    )
    p.set_defaults(func=cmd_phantoms)

    def run_args(p, data_required=True, seed=True):
        if data_required:
            p.add_argument("--data", required=True, help="folder holding one sub-folder per site (A, B, C, D)")
        p.add_argument(
            "--out", required=True, help="output folder: report.json, bundle/, checkpoints/ (re-run to resume)"
        )
        p.add_argument(
            "--strategy",
            choices=STRATEGIES,
            default="fedavg",
            help="aggregation (fedmedian, fedtrimmedavg and krum are Flower's robust strategies)",
        )
        p.add_argument(
            "--profile",
            choices=("quick", "paper"),
            default="paper",
            help="training schedule matching the phantom profile",
        )
        if seed:
            p.add_argument("--seed", type=int, default=0)
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any run-config key (repeatable)")
        tracking_args(p)

    def gpus_arg(p):
        p.add_argument(
            "--gpus-per-site",
            type=float,
            metavar="SHARE",
            help="GPU share of each site's ClientApp when CUDA is present (Ray schedules 1/SHARE sites per "
            "GPU); default 0.25, more on GPUs under 32 GiB (8 GiB a site); ignored without CUDA",
        )

    p = sim.add_parser("run", help="federated simulation (Flower, one SuperNode per site) ending with a report")
    run_args(p)
    p.add_argument("--train-sites", help="comma-separated training sites (default from pyproject: A)")
    gpus_arg(p)
    p.set_defaults(func=cmd_run, on_interrupt=_last_checkpoint)
    p = sim.add_parser(
        "compare",
        help="a grid of variants x seeds (default: the detector-crop and MulPoolFusion "
        "ablations), resumable, one table",
    )
    run_args(p, seed=False)
    for action in p._actions:
        if action.dest == "out":
            action.help = (
                "grid folder: OUT/<variant>/seed-<n> per run, report.html, compare.json, compare.md (re-run to resume)"
            )
    p.add_argument(
        "--train-sites",
        help="comma-separated training sites (default from pyproject: A); each is split "
        "8:1:1 by patient in every cell and its test split reported as <site>-test",
    )
    p.add_argument(
        "--variant",
        action="append",
        metavar="NAME[:KEY=VALUE,...]",
        help="a named set of run-config overrides (repeatable); default: default, "
        "gt-crops:crop-source=ground-truth, plain-transition:stager-transition=plain",
    )
    p.add_argument(
        "--grid",
        default="ablations",
        metavar="NAME[,NAME]",
        help="named grid(s) when no --variant is given; default ablations (default run, gt-crops, plain-transition), "
        "strategies (FedAvg, FedProx mu 0.001/0.01/0.1, FedBN), leave-one-site-out, or baselines "
        "(federated vs local-only per site vs pooled; needs --train-sites with two or more sites)",
    )
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0); mean ± sd over seeds")
    p.add_argument(
        "--check-against",
        metavar="COMPARE_JSON",
        help="after the runs, check every figure lies inside the 95 %% interval for one more seed that this "
        "earlier grid's compare.json states (exit 1 if not); run it with new seeds",
    )
    p.set_defaults(func=cmd_compare)
    p = sim.add_parser("bench", help="benchmarks: measured throughput and latency, written to OUT/bench.json")
    p.add_argument("--out", default="runs/bench", help="output folder for bench.json (default runs/bench)")
    p.add_argument(
        "--only",
        help="comma-separated sections (default: all; known: detector, transfer, ingestion, "
        "input_pipeline, inference, federated, scaling, deployment, gpu, poisoning)",
    )
    p.add_argument("--quick", action="store_true", help="a smoke run: few steps, default widths only")
    p.add_argument(
        "--option",
        action="append",
        metavar="SECTION.KEY=VALUE",
        help="a section's keyword argument, e.g. federated.local_steps=10 (repeatable; JSON values)",
    )
    p.set_defaults(func=cmd_bench)
    add_medmnist_parser(sim)
    p = sim.add_parser("demo", help="phantoms + simulation + report + inference on the real pelvic MRI")
    run_args(p, data_required=False)
    gpus_arg(p)
    p.set_defaults(func=cmd_demo, on_interrupt=_last_checkpoint)


def add_medmnist_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``medmnist`` on an argparse subparsers object (``onfh sim medmnist ...``); the protocol is
    in :mod:`sim.experiments.medmnist`, which only :func:`cmd_medmnist` imports (it needs torch)."""
    p = subparsers.add_parser(
        "medmnist",
        help="AdrenalMNIST3D benchmark: central and federated 3D-MulDenseNet",
        description="AdrenalMNIST3D benchmark: 3D-MulDenseNet on real 3D data, central and federated (Flower).",
    )
    p.add_argument("--data", required=True, help="adrenalmnist3d_64.npz (MedMNIST v2, 64^3 release)")
    p.add_argument("--size", type=int, choices=SIZES, default=28, help="volume edge in voxels (28: published rows)")
    p.add_argument("--out", required=True, help="output folder (medmnist.json)")
    p.add_argument("--seeds", type=parse_seeds, default=(0,), help="comma-separated seeds, e.g. 0,1,2")
    p.add_argument(
        "--settings",
        type=parse_runs,
        default=DEFAULT_RUNS,
        help=f"comma-separated runs from {', '.join(RUNS)} (default: {','.join(DEFAULT_RUNS)})",
    )
    p.add_argument("--quick", action="store_true", help="tiny network and a few steps (smoke test)")
    p.set_defaults(func=cmd_medmnist)
    return p


def _last_checkpoint(args) -> None:
    """On Ctrl-C of ``sim run`` or ``sim demo``: the last verified checkpoint of the federated run."""
    from sim.experiments.experiment import last_verified_checkpoint

    run_out = Path(args.out) / "run" if args.func is cmd_demo else Path(args.out)
    console.print(last_verified_checkpoint(run_out / "checkpoints"))


def cmd_readers(args, console=None) -> int:
    """``onfh report readers``: :func:`sim.reports.readers.cmd_readers` (imported when run: it needs SciPy)."""
    from sim.reports.readers import cmd_readers as compare_readers

    return compare_readers(args, console)


def report_commands(parser: argparse.ArgumentParser) -> None:
    """The ``onfh report`` commands."""
    report = parser.add_subparsers(dest="cmd", required=True)
    p = report.add_parser(
        "readers",
        help="the model against human readers: accuracy and McNemar test",
        description="onfh report readers: the model against human readers on the same femoral heads.",
    )
    p.add_argument("--readers", required=True, help="readers CSV: patient_id, side, reader, stage (0/I/II)")
    p.add_argument(
        "--predictions", required=True, help="predictions CSV: patient_id, side, stage (reference), predicted_stage"
    )
    p.add_argument("--out", help="also write the rows as JSON to this file")
    p.set_defaults(func=cmd_readers)


def add_group(name: str, parser: argparse.ArgumentParser) -> None:
    """Fill the ``onfh NAME`` parser (``sim`` or ``report``); called by :mod:`shared_models.cli`."""
    {"sim": sim_commands, "report": report_commands}[name](parser)


if __name__ == "__main__":
    sys.exit(main())
