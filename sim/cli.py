"""``onfh``: the one console script, with a command group per kind of user.

* ``onfh sim ...``          researchers: phantoms, the four-center simulation, the demo
* ``onfh site ...``         hospital sites: check a data folder
* ``onfh coordinator ...``  coordinators: the bundle signing key
* ``onfh infer ...``        anyone: the two-stage pipeline on one study
* ``onfh report ...``       researchers: the model against reader diagnoses (McNemar)

Library code raises; this module maps errors to exit codes (1: bad input or failed
run, 2: usage) and prints human-readable tables with rich.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

log = logging.getLogger("onfh")
console = Console()
if not console.is_terminal:  # piped or logged: do not squeeze tables into 80 columns
    console = Console(width=140)

REAL_NIFTI = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "prostatex-0000-pelvis-t2-axial.nii.gz"

# Training schedules per phantom profile (run-config overrides). "paper" uses the
# pyproject defaults, sized so the demo fits in 20 minutes on 2 CPU cores.
SCHEDULES: dict[str, dict[str, object]] = {
    "quick": {"detector-rounds": 2, "detector-local-steps": 8, "stager-rounds": 2, "stager-local-steps": 8},
    "paper": {},
}


# --------------------------------------------------------------------------- helpers

BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def _parse_set(items: list[str]) -> dict[str, object]:
    """``KEY=VALUE`` pairs -> run-config overrides, VALUE typed like the pyproject default."""
    from shared_models.config import default_run_config

    defaults = default_run_config()
    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            import difflib

            close = difflib.get_close_matches(key, list(defaults), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else "; the keys are in [tool.flwr.app.config] of pyproject.toml"
            raise ValueError(f"--set {item!r}: expected KEY=VALUE with a run-config KEY{hint}")
        kind = type(defaults[key])
        if kind is bool:
            if value.lower() not in BOOLEANS:
                raise ValueError(f"--set {key}={value!r}: expected a boolean ({', '.join(sorted(BOOLEANS))})")
            out[key] = BOOLEANS[value.lower()]
            continue
        try:
            out[key] = kind(value)
        except ValueError:
            raise ValueError(f"--set {key}={value!r}: expected {kind.__name__}") from None
    return out


def _fmt(value) -> str:
    return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def print_report(report: dict, baseline: dict | None = None) -> None:
    """Print the per-site report (and the intensity baseline) as tables."""
    rounds = ", ".join(f"{k} {v}" for k, v in report["rounds"].items())
    table = Table(title=f"Ficat-Arlet staging — {report['strategy']}, rounds: {rounds}, trained at {', '.join(report['train_sites'])}")
    for col in ("site", "n", "accuracy", "sensitivity", "specificity", "F1", "AUC", "weighted AUC", "kappa (quadratic)",
                "baseline AUC"):
        table.add_column(col, justify="right" if col != "site" else "left")
    for name, m in report["sites"].items():
        if not m.get("n"):
            table.add_row(name, "0", *["–"] * 8)
            continue
        macro = m["macro"]
        base = (baseline or {}).get(name, {}).get("macro", {}).get("auc")
        table.add_row(name, str(m["n"]), *(_fmt(macro[k]) for k in ("accuracy", "sensitivity", "specificity", "f1", "auc")),
                      _fmt(m["weighted"]["auc"]), _fmt(m.get("quadratic_kappa")), _fmt(base))
    console.print(table)
    det = Table(title="3DC-YOLOX femoral head detection (test heads)")
    for col in ("site", "n", "IoU mean", "centre error mm (median)", "recall@0.3", "recall@0.5", "AP50", "low confidence"):
        det.add_column(col, justify="right" if col != "site" else "left")
    for site, m in report["detector"].items():
        det.add_row(site, str(m["n"]), _fmt(m["iou_mean"]), _fmt(m["center_error_mm"]), _fmt(m["recall30"]),
                    _fmt(m["recall50"]), _fmt(m.get("ap50")), str(m["low_confidence"]))
    console.print(det)


# --------------------------------------------------------------------------- sim


def cmd_phantoms(args) -> int:
    from sim.phantoms import generate_phantoms

    t0 = time.monotonic()
    summary = generate_phantoms(Path(args.out), args.profile, seed=args.seed, progress=True,
                                replace=getattr(args, "replace", False))
    table = Table(title=f"phantoms ({args.profile}, seed {args.seed}) in {args.out} [{time.monotonic() - t0:.1f} s]")
    for col in ("site", "scanner", "heads 0/I/II", "CNR I oedema", "CNR II bright band", "CNR II dark band"):
        table.add_column(col)
    for site, info in summary.get("sites", {}).items():
        cnr = info.get("cnr", {})
        stages = info.get("heads_per_stage", {})
        table.add_row(site, str(info.get("scanner_label", "")), "/".join(str(stages.get(k, 0)) for k in ("0", "I", "II")),
                      *(_fmt(cnr.get(k, {}).get("mean")) for k in ("I_oedema", "II_bright_band", "II_dark_band")))
    console.print(table)
    return 0


def _run_config_for(args) -> dict[str, object]:
    out = Path(args.out).resolve()
    rc: dict[str, object] = {**SCHEDULES[args.profile], "data-root": str(Path(args.data).resolve()), "out-dir": str(out),
                             "strategy": args.strategy, "seed": args.seed}
    if args.train_sites:
        rc["train-sites"] = args.train_sites
    rc.update(_parse_set(args.set or []))
    return rc


def cmd_run(args) -> int:
    """Splits -> Flower simulation -> report (+ intensity baseline)."""
    from sim.experiment import run_experiment

    report = run_experiment(_run_config_for(args), console=console)
    print_report(report, report.get("baseline_intensity_logreg"))
    if args.profile == "quick":
        console.print("[yellow]quick profile: a smoke test of the whole pipeline; its figures are not meaningful "
                      "(use --profile paper)[/yellow]")
    out = Path(args.out)
    sim_stats = report.get("simulation", {})
    if sim_stats:
        console.print(f"training curves: {out / 'training_curves.png'}")
        console.print(f"wall time {sim_stats['wall_time_s']:.0f} s, peak memory of the simulation "
                      f"{sim_stats['peak_rss_bytes'] / 2**30:.2f} GiB")
    console.print(f"report: {out / 'report.json'} and {out / 'report.html'}\nsigned bundle: {out / 'bundle'}")
    return 0


def cmd_compare(args) -> int:
    """A grid of variants x seeds on the same data; resumable; ``compare.json`` + ``compare.md``."""
    from shared_models.config import default_run_config
    from sim.compare import grid_variants, parse_variant, print_summary, run_compare

    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds {args.seeds!r}: expected comma-separated integers, e.g. 0,1,2") from None
    if args.variant:
        variants = [parse_variant(v, _parse_set) for v in args.variant]
    else:
        sites = str(_parse_set(args.set or []).get("site-ids", default_run_config()["site-ids"])).split(",")
        variants = grid_variants(args.grid, [s.strip() for s in sites if s.strip()])
    args.seed = seeds[0] if seeds else 0
    base = {k: v for k, v in _run_config_for(args).items() if k not in ("out-dir", "seed")}
    summary = run_compare(base, Path(args.out), variants, seeds, console=console)
    print_summary(summary, console)
    console.print(f"grid: {Path(args.out) / 'compare.json'} and compare.md")
    return 0


def cmd_bench(args) -> int:
    """Benchmarks that print measured figures and write ``bench.json``."""
    from sim.bench import SECTIONS, print_table, run_benchmarks

    names = args.only.split(",") if args.only else None
    options = {}
    if args.quick:
        options = {"detector": {"steps": 2, "warmup_steps": 1, "latency_repeats": 3, "latency_warmup": 1,
                                "augment_repeats": 2, "model_sizes": ("default",)},
                   "transfer": {"model_sizes": ("default",), "repeats": 1}}
        options = {k: v for k, v in options.items() if names is None or k in names}
    result = run_benchmarks(names, **options)
    for name, rows in result["sections"].items():
        print_table(rows, title=SECTIONS[name].title, console=console)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(result, indent=2))
    console.print(f"{out / 'bench.json'} (load average {result['environment'].get('load_avg_1min', '?')}: "
                  "figures taken under load are not comparable)")
    return 0


def cmd_demo(args) -> int:
    """Phantoms -> simulation -> report -> inference on the real pelvic MRI."""
    out = Path(args.out)
    data = out / "data"
    args_ph = argparse.Namespace(out=str(data), profile=args.profile, seed=args.seed)
    cmd_phantoms(args_ph)
    args_run = argparse.Namespace(data=str(data), out=str(out / "run"), profile=args.profile, strategy=args.strategy,
                                  seed=args.seed, train_sites=None, set=args.set)
    cmd_run(args_run)
    if REAL_NIFTI.exists():
        key = out / "run" / "keys" / "bundle-signing-key.pem.pub"
        cmd_infer(argparse.Namespace(bundle=str(out / "run" / "bundle"), study=str(REAL_NIFTI), out=str(out / "infer-prostatex"),
                                     public_key=str(key) if key.exists() else None, device="auto"))
    else:
        console.print(f"[yellow]real pelvic MRI not found at {REAL_NIFTI}: skipping the inference step[/yellow]")
    return 0


# --------------------------------------------------------------------------- infer


def cmd_infer(args) -> int:
    import SimpleITK as sitk

    from client.dicom_series import SeriesError, choose_largest_mr_series, read_study
    from client.training import select_device
    from shared_models.bundle import load_bundle
    from shared_models.overlay import write_infer_figures
    from shared_models.pipeline import analyse_study

    bundle = load_bundle(Path(args.bundle), Path(args.public_key) if args.public_key else None)
    series_note = "T2 series (site rule)"
    try:
        image = read_study(Path(args.study))
    except SeriesError as err:
        if "no T2 series" not in err.reason:
            raise
        image = read_study(Path(args.study), choose=choose_largest_mr_series)
        series_note = f"no T2 series ({err.reason}); used the largest MR series instead: interpret with care"
        console.print(f"[yellow]warning:[/yellow] {series_note}")
    t0 = time.monotonic()
    results = analyse_study(image, bundle.detector, bundle.stager, bundle.spec, device=select_device(args.device))
    elapsed = time.monotonic() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for r in results:
        sitk.WriteImage(r.gradcam, str(out / f"gradcam_{r.side}.nii.gz"))
    pngs = write_infer_figures(image, results, out)
    warnings = []
    if results and all(r.low_confidence for r in results):
        warnings.append("no femoral head passed the detector's score threshold on either side: the study may not "
                        "show the hips, or differ too much from the training data; boxes and stages are unreliable")
    payload = {"bundle_trusted": bundle.trusted, "series": series_note, "heads": [r.summary() for r in results],
               "warnings": warnings, "seconds": round(elapsed, 2)}
    (out / "result.json").write_text(json.dumps(payload, indent=2))
    table = Table(title=f"{Path(args.study).name}: two-stage result ({elapsed:.1f} s)")
    for col in ("side", "box LPS mm (x0 y0 z0 x1 y1 z1)", "det. score", "P(0)", "P(I)", "P(II)", "stage"):
        table.add_column(col)
    for r in results:
        p = r.stage_probabilities
        table.add_row(r.side, " ".join(f"{v:.0f}" for v in r.box_lps_mm),
                      f"{r.detector_score:.2f}" + (" (low)" if r.low_confidence else ""),
                      f"{p['0']:.2f}", f"{p['I']:.2f}", f"{p['II']:.2f}", r.predicted_stage)
    console.print(table)
    for warning in warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    console.print(f"wrote {out / 'result.json'}, gradcam_R/L.nii.gz (input geometry) and "
                  f"{', '.join(p.name for p in pngs)} (boxes and Grad-CAM over the MRI)")
    return 0


# --------------------------------------------------------------------------- site / coordinator


def cmd_site_check(args) -> int:
    from client.site_data import SITE_CACHE_NAME, SiteData
    from shared_models.preprocessing import PreprocessingSpec

    root = Path(args.data)
    site_id = args.site_id or root.name
    cache = Path(args.cache) if args.cache else root / SITE_CACHE_NAME
    site = SiteData(root, site_id, cache, PreprocessingSpec(), progress=True)
    table = Table(title=f"site {site_id}: study verdicts")
    for col in ("study", "series UID", "status", "reason", "shape", "spacing mm", "direction"):
        table.add_column(col)
    for v in site.verdicts:
        spacing = " x ".join(f"{s:g}" for s in v.spacing_mm) if v.spacing_mm else ""
        direction = " ".join(f"{d:+.3g}" for d in v.direction) if v.direction else ""
        table.add_row(v.study, v.series_uid or "", v.status, v.reason, str(v.shape or ""), spacing, direction)
    console.print(table)
    if args.json:
        # One object per study: {study, series_uid, status: ok|refused, reason, shape, spacing_mm, direction}.
        Path(args.json).write_text(json.dumps([v.to_dict() for v in site.verdicts], indent=2))
    bad = sum(v.status != "ok" for v in site.verdicts)
    console.print(f"{len(site.verdicts) - bad} studies ok, {bad} refused, {len(site.heads)} femoral heads usable")
    return 1 if bad else 0


def cmd_signing_key(args) -> int:
    from shared_models.bundle import generate_signing_key

    path = Path(args.out)
    if path.exists():
        raise ValueError(f"{path} exists; refusing to overwrite a signing key")
    generate_signing_key(path)
    console.print(f"Ed25519 signing key: {path} (keep private); public key: {path}.pub")
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onfh", description="ONFH-FL: federated early-ONFH diagnosis from 3D hip MRI.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    groups = parser.add_subparsers(dest="group", required=True)

    sim = groups.add_parser("sim", help="researchers: phantoms and the four-center simulation").add_subparsers(dest="cmd", required=True)
    p = sim.add_parser("phantoms", help="generate phantom hip MRI (DICOM) for sites A-D")
    p.add_argument("--out", required=True, help="output folder (one sub-folder per site)")
    p.add_argument("--profile", choices=("quick", "paper"), default="quick", help="quick: tiny, for tests; paper: 209 patients / 381 heads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--replace", action="store_true",
                   help="overwrite phantoms of another profile or seed in --out (and their splits and site caches)")
    p.set_defaults(func=cmd_phantoms)

    def run_args(p, data_required=True, seed=True):
        if data_required:
            p.add_argument("--data", required=True, help="folder holding one sub-folder per site (A, B, C, D)")
        p.add_argument("--out", required=True, help="output folder: report.json, bundle/, checkpoints/ (re-run to resume)")
        p.add_argument("--strategy", choices=("fedavg", "fedprox", "fedbn"), default="fedavg")
        p.add_argument("--profile", choices=("quick", "paper"), default="paper", help="training schedule matching the phantom profile")
        if seed:
            p.add_argument("--seed", type=int, default=0)
        p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any run-config key (repeatable)")

    p = sim.add_parser("run", help="federated simulation (Flower, one SuperNode per site) ending with a report")
    run_args(p)
    p.add_argument("--train-sites", help="comma-separated training sites (default from pyproject: A)")
    p.set_defaults(func=cmd_run)
    p = sim.add_parser("compare", help="a grid of variants x seeds (default: the detector-crop and MulPoolFusion "
                       "ablations), resumable, one table")
    run_args(p, seed=False)
    for action in p._actions:
        if action.dest == "out":
            action.help = "grid folder: OUT/<variant>/seed-<n> per run, compare.json, compare.md (re-run to resume)"
    p.add_argument("--train-sites", help="comma-separated training sites (default from pyproject: A)")
    p.add_argument("--variant", action="append", metavar="NAME[:KEY=VALUE,...]",
                   help="a named set of run-config overrides (repeatable); default: default, "
                        "gt-crops:crop-source=ground-truth, plain-transition:stager-transition=plain")
    p.add_argument("--grid", choices=("ablations", "strategies", "leave-one-site-out"), default="ablations",
                   help="named grid when no --variant is given: ablations (default run, gt-crops, plain-transition), "
                        "strategies (FedAvg, FedProx mu 0.001/0.01/0.1, FedBN) or leave-one-site-out")
    p.add_argument("--seeds", default="0", help="comma-separated seeds (default 0); mean ± sd over seeds")
    p.set_defaults(func=cmd_compare)
    p = sim.add_parser("bench", help="benchmarks: measured throughput and latency, written to OUT/bench.json")
    p.add_argument("--out", default="runs/bench", help="output folder for bench.json (default runs/bench)")
    p.add_argument("--only", help="comma-separated sections (default: all; known: detector, transfer)")
    p.add_argument("--quick", action="store_true", help="a smoke run: few steps, default widths only")
    p.set_defaults(func=cmd_bench)
    from sim.medmnist import add_medmnist_parser

    add_medmnist_parser(sim)
    p = sim.add_parser("demo", help="phantoms + simulation + report + inference on the real pelvic MRI")
    run_args(p, data_required=False)
    p.set_defaults(func=cmd_demo)

    p = groups.add_parser("infer", help="two-stage pipeline on one study (DICOM folder or NIfTI)")
    p.add_argument("--bundle", required=True, help="signed model bundle folder")
    p.add_argument("--study", required=True, help="DICOM folder or .nii/.nii.gz file")
    p.add_argument("--out", required=True, help="output folder: result.json, gradcam_<side>.nii.gz")
    p.add_argument("--public-key", help="coordinator's Ed25519 public key (PEM) to verify the bundle against")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.set_defaults(func=cmd_infer)

    report = groups.add_parser("report", help="statistics on a finished run's predictions").add_subparsers(dest="cmd", required=True)
    from sim.readers import add_readers_parser

    add_readers_parser(report)

    site = groups.add_parser("site", help="hospital sites").add_subparsers(dest="cmd", required=True)
    p = site.add_parser("check", help="check a site data folder: one verdict per study")
    p.add_argument("--data", required=True, help="site folder with manifest.csv")
    p.add_argument("--site-id", help="site id (default: folder name)")
    p.add_argument("--cache", help="preprocessing cache folder (default: DATA/.onfh-cache)")
    p.add_argument("--json", help="also write the verdicts as JSON to this file")
    p.set_defaults(func=cmd_site_check)

    coord = groups.add_parser("coordinator", help="federation coordinators").add_subparsers(dest="cmd", required=True)
    p = coord.add_parser("signing-key", help="create the Ed25519 key that signs model bundles")
    p.add_argument("--out", required=True, help="private key file (PEM); the public key goes to FILE.pub")
    p.set_defaults(func=cmd_signing_key)
    return parser


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    from client.dicom_series import SeriesError
    from shared_models.bundle import BundleError

    # SIGTERM (CI, systemd, kill) and SIGINT (also when started in the background) stop a
    # run cleanly: the runner stops the Flower run and every process it started.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except (ValueError, OSError, RuntimeError, SeriesError, BundleError) as err:
        console.print(f"[red]error:[/red] {err}")
        return 1
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: every process of the run was stopped; re-run the same command to resume")
        return 130


if __name__ == "__main__":
    sys.exit(main())
