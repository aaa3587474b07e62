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
import os
import shlex
import signal
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from shared_models.processes import tied_to_this_process
from shared_models.specs import STRATEGIES, Phase  # torch-free: `onfh -h` stays fast

log = logging.getLogger("onfh")
console = Console()
if not console.is_terminal:  # piped or logged: do not squeeze tables into 80 columns
    console = Console(width=140)

REAL_NIFTI = Path(__file__).resolve().parents[2] / "shared" / "data" / "real" / "prostatex-0000-pelvis-t2-axial.nii.gz"

# Training schedules per phantom profile (run-config overrides). "paper" uses the
# pyproject defaults, sized so the demo fits in 20 minutes on 2 CPU cores.
SCHEDULES: dict[str, dict[str, object]] = {
    # quick phantoms have 1-6 heads per split: at the default min-cell-heads (5) the small-cell rule would
    # withhold nearly every figure of this smoke test (synthetic heads, no patient to protect)
    "quick": {
        "detector-rounds": 2,
        "detector-local-steps": 8,
        "stager-rounds": 2,
        "stager-local-steps": 8,
        "min-cell-heads": 1,
    },
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
            hint = (
                f"; did you mean {', '.join(close)}?"
                if close
                else "; the keys are in [tool.flwr.app.config] of pyproject.toml"
            )
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
            *(_fmt(macro[k]) for k in ("accuracy", "sensitivity", "specificity", "f1", "auc")),
            _fmt(m["weighted"]["auc"]),
            _fmt(m.get("quadratic_kappa")),
            _fmt(base),
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
            _fmt(m["iou_mean"]),
            _fmt(m["center_error_mm"]),
            _fmt(m["recall30"]),
            _fmt(m["recall50"]),
            _fmt(m.get("ap50")),
            str(m["low_confidence"]),
        )
    console.print(det)
    from sim.infer import calibration_table

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
            *(_fmt(cnr.get(k, {}).get("mean")) for k in ("I_oedema", "II_bright_band", "II_dark_band")),
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
    rc.update(_tracking_config(args))
    rc.update(_parse_set(args.set or []))
    return rc


def _tracking_config(args) -> dict[str, object]:
    """``--track`` / ``--tracking-uri`` as run-config keys; a TensorBoard folder made absolute."""
    track, uri = getattr(args, "track", "mlflow"), getattr(args, "tracking_uri", None)
    rc: dict[str, object] = {"track": track}
    if uri:
        rc["tracking-uri"] = str(Path(uri).resolve()) if track == "tensorboard" else uri
    return rc


def tracking_args(p) -> None:
    """``--track`` and ``--tracking-uri`` (issue 21; ``server/tracking.py``)."""
    p.add_argument(
        "--track",
        choices=("mlflow", "tensorboard", "none"),
        default="mlflow",
        help="experiment tracking from the server, per round and site (default mlflow: a SQLite store "
        "OUT/mlflow/mlflow.db, no server needed; tensorboard: OUT/tensorboard)",
    )
    p.add_argument(
        "--tracking-uri",
        metavar="URI",
        help="MLflow tracking server or store (http://127.0.0.1:5000, sqlite:////abs/mlflow.db), or the "
        "TensorBoard log folder (default: under OUT)",
    )


def cmd_run(args) -> int:
    """Splits -> Flower simulation -> report (+ intensity baseline)."""
    from sim.experiment import run_experiment

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
    from sim.compare import grid_variants, parse_variant, print_summary, report_groups_for, run_compare

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
        variants = [parse_variant(v, _parse_set) for v in args.variant]
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
        from sim.compare import outside_interval

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
    from sim.bench import SECTIONS, parse_option, print_table, run_benchmarks

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
        from sim.bench_poisoning import poisoning_markdown

        (out / "poisoning.md").write_text(poisoning_markdown(result["sections"]["poisoning"]) + "\n")
        console.print(f"{out / 'poisoning.md'}: the poisoning table in markdown")
    console.print(
        f"{out / 'bench.json'} (load average {result['environment'].get('load_avg_1min', '?')}: "
        "figures taken under load are not comparable)"
    )
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


# --------------------------------------------------------------------------- infer


def cmd_infer(args) -> int:
    from sim.infer import run_infer

    return run_infer(args, console)


# --------------------------------------------------------------------------- site / coordinator


def cmd_site_check(args) -> int:
    from client.site_data import SITE_CACHE_NAME, SiteData
    from shared_models.preprocessing import PreprocessingSpec

    root = Path(args.data)
    site_id = args.site_id or root.name
    cache = Path(args.cache) if args.cache else root / SITE_CACHE_NAME
    from client.dicom_series import MAX_STUDY_VOXELS

    site = SiteData(
        root,
        site_id,
        cache,
        PreprocessingSpec(),
        progress=True,
        max_study_voxels=args.max_study_voxels or MAX_STUDY_VOXELS,
    )
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
    rows = len(site.row_refusals)
    console.print(
        f"{len(site.verdicts) - bad} studies ok, {bad - rows} refused, {rows} row(s) skipped, "
        f"{len(site.heads)} femoral heads usable"
    )
    _print_skipped_rows(site.row_refusals)
    from client.site_daemon import Check, check_ca_certificate, check_cache_space, check_device, check_superlink

    checks = [
        Check(
            "manifest and studies",
            bad == 0 and bool(site.heads),
            f"{len(site.verdicts) - bad} ok, {bad} refused, {len(site.heads)} heads",
        ),
        check_cache_space(cache, args.min_free_gb),
        check_device(),
    ]
    if args.ca_cert:
        checks.append(check_ca_certificate(Path(args.ca_cert)))
        if args.superlink:
            checks.append(check_superlink(args.superlink, Path(args.ca_cert)))
    elif args.superlink:
        checks.append(Check("SuperLink reachable", False, "--superlink needs --ca-cert to check the TLS certificate"))
    return 0 if _print_checks(checks, f"site {site_id}: preflight") else 1


def cmd_signing_key(args) -> int:
    from shared_models.bundle import generate_signing_key

    path = Path(args.out)
    if path.exists():
        raise ValueError(f"{path} exists; refusing to overwrite a signing key")
    generate_signing_key(path)
    console.print(f"Ed25519 signing key: {path} (keep private); public key: {path}.pub")
    return 0


def _print_skipped_rows(refusals) -> None:
    """A summary of the manifest/split rows a site skipped (file, row, reason; never a value of the row)."""
    if not refusals:
        console.print("every manifest row was read")
        return
    table = Table(title=f"{len(refusals)} row(s) skipped; the site goes on without them")
    for col in ("file", "row", "reason"):
        table.add_column(col)
    for r in refusals:
        table.add_row(r.file, str(r.line), r.reason)
    console.print(table)


def _print_checks(checks, title: str) -> bool:
    table = Table(title=title)
    for col in ("check", "result", "detail"):
        table.add_column(col)
    for c in checks:
        table.add_row(c.name, "[green]ok[/green]" if c.ok else "[red]FAILED[/red]", c.detail)
    console.print(table)
    return all(c.ok for c in checks)


def cmd_site_split(args) -> int:
    """Write DATA/split.csv: 8:1:1 train/val/test by patient, or all test for an evaluate-only site."""
    from sim.splits import write_splits

    data = Path(args.data).resolve()
    if not (data / "manifest.csv").is_file():
        raise FileNotFoundError(f"{data / 'manifest.csv'} does not exist")
    skipped: dict[str, list] = {}
    counts = write_splits(
        data.parent, [data.name], [] if args.evaluate_only else [data.name], seed=args.seed, refusals=skipped
    )
    console.print(f"{data / 'split.csv'}: patients per split {counts.get(data.name, counts)}")
    _print_skipped_rows(skipped.get(data.name, []))
    return 0


def cmd_site_keys(args) -> int:
    from client.site_daemon import make_site_keys

    private, public, text = make_site_keys(Path(args.out))
    console.print(
        f"SuperNode private key: {private} (stays at the site)\npublic key (send to the coordinator): {public}"
    )
    print(text)
    return 0


def cmd_site_daemon(args) -> int:
    """Preflight, then flower-supernode with TLS and the site key, restarted with backoff."""
    from client.site_daemon import preflight, run_daemon, supernode_command, supernode_env
    from client.site_data import SITE_CACHE_NAME

    data = Path(args.data).resolve()
    site_id = args.site_id or data.name
    cache = Path(args.cache) if args.cache else data / SITE_CACHE_NAME
    if not args.skip_checks:
        checks, _ = preflight(data, site_id, cache=cache, ca_cert=Path(args.ca_cert), superlink=args.superlink)
        if not _print_checks(checks, f"site {site_id}: preflight"):
            raise RuntimeError("preflight failed; fix the checks above (or --skip-checks to connect anyway)")
    cmd = supernode_command(
        superlink=args.superlink,
        ca_cert=Path(args.ca_cert),
        private_key=Path(args.key),
        site_id=site_id,
        data=data,
        port=args.port,
        max_retries=args.max_retries,
        launcher=args.launcher,
        threads=args.threads,
        min_cell_heads=args.min_cell_heads,
        cache=cache if args.cache else None,
    )
    home = Path(args.flwr_home) if args.flwr_home else cache / "flwr-home"
    log_file = Path(args.log) if args.log else cache / "supernode.log"
    console.print(f"site {site_id}: SuperNode connecting to {args.superlink} (log: {log_file}; Ctrl-C stops it)")
    with tied_to_this_process():  # the SuperNode and its ClientApps die with this command, kill -9 included
        code = run_daemon(cmd, env=supernode_env(home, args.threads), log_file=log_file, max_restarts=args.max_restarts)
    return 0 if code == 0 else 1


def cmd_site_verify(args) -> int:
    from shared_models.bundle import load_bundle

    bundle = load_bundle(Path(args.bundle), Path(args.public_key))
    console.print(
        f"[green]bundle {args.bundle} verifies[/green] against {args.public_key} "
        f"(detector + stager, trusted={bundle.trusted})"
    )
    return 0


def cmd_site_verify_audit(args) -> int:
    """The audit log's hash chain and, with --anchors, the coordinator's anchors (issue 16)."""
    from client.audit import verify_audit_anchors, verify_audit_log
    from client.site_data import SITE_CACHE_NAME
    from server.audit_anchors import load_anchors

    if not args.log and not args.data:
        raise ValueError("give --log AUDIT_LOG or --data SITE_FOLDER")
    path = Path(args.log) if args.log else Path(args.data) / SITE_CACHE_NAME / "audit.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no audit log")
    if not args.anchors:
        console.print(
            f"[green]{path}: chain intact[/green] ({verify_audit_log(path)} entries); without --anchors "
            "an edited, removed or appended last line cannot be seen"
        )
        return 0
    site = args.site or (Path(args.data).resolve().name if args.data else None)
    anchors = load_anchors(Path(args.anchors))
    if not Path(args.anchors).is_file() or site not in anchors:
        raise ValueError(f"{args.anchors}: no audit anchors for site {site!r} (sites: {sorted(anchors)}; use --site)")
    summary = verify_audit_anchors(path, anchors[site])
    console.print(
        f"[green]{path}: chain intact and every one of {summary['anchors']} anchors of site {site} found"
        f"[/green] (runs {summary['runs']}; {summary['entries']} entries, "
        f"{summary['unanchored_other_runs']} of other runs not covered by {args.anchors})"
    )
    return 0


def _coordinator_paths(args):
    from server.coordinator import REGISTRY_NAME, CertPaths

    home = Path(args.home).resolve()
    return home, CertPaths.in_folder(home / "certs"), home / "flwr-home", home / REGISTRY_NAME


def cmd_coordinator_certs(args) -> int:
    from server.coordinator import SERVER_SANS, make_certs

    home, _, _, _ = _coordinator_paths(args)
    hosts = tuple(dict.fromkeys([*SERVER_SANS, *(args.host or [])]))
    paths = make_certs(Path(args.out) if args.out else home / "certs", hosts=hosts, days=args.days)
    console.print(
        f"CA: {paths.ca_cert} (send to every site; keep {paths.ca_key.name} private)\n"
        f"SuperLink TLS: {paths.server_cert}, {paths.server_key} (SANs: {', '.join(hosts)})\n"
        f"bundle signing key: {paths.signing_key} (private); public key for sites: {paths.signing_public_key}"
    )
    return 0


def cmd_coordinator_start_superlink(args) -> int:
    """Start flower-superlink (TLS, SuperNode auth, database) and keep it in the foreground."""
    from server.coordinator import start_superlink, stop_process_tree

    home, certs, flwr_home, _ = _coordinator_paths(args)
    database = Path(args.database) if args.database else home / "superlink.db"
    log_file = home / "superlink.log"
    with tied_to_this_process():  # the SuperLink and its ServerApps die with this command, kill -9 included
        proc = start_superlink(
            certs, flwr_home=flwr_home, database=database, log_file=log_file, host=args.host, port=args.port
        )
        console.print(
            f"SuperLink on {args.host}:{args.port} (TLS, SuperNode authentication, state in {database}); "
            f"log: {log_file}; Ctrl-C stops it"
        )
        try:
            return 0 if proc.wait() == 0 else 1
        finally:
            stop_process_tree(proc.pid)


def cmd_coordinator_enroll(args) -> int:
    from server.coordinator import enroll

    _, _, flwr_home, registry = _coordinator_paths(args)
    if not (flwr_home / "config.toml").exists():
        raise RuntimeError(f"no SuperLink connection in {flwr_home}: run `onfh coordinator start-superlink` first")
    entry = enroll(args.site, Path(args.public_key), flwr_home=flwr_home, registry=registry)
    console.print(
        f"site {args.site} enrolled: node {entry['node_id']}, key {entry['fingerprint']} (registry: {registry})"
    )
    return 0


def cmd_coordinator_launch(args) -> int:
    from server.coordinator import launch, resume, wait_for_run

    home, certs, flwr_home, registry = _coordinator_paths(args)
    if args.resume:
        out = Path(args.resume)
        run_id = resume(out, flwr_home=flwr_home)
    else:
        if not args.out:
            raise ValueError("launch needs --out RUN_OUT (or --resume RUN_OUT)")
        out = Path(args.out)
        from server.coordinator import load_registry

        sites = args.sites or ",".join(sorted(load_registry(registry)))
        if not sites:
            raise ValueError(f"no --sites given and no site enrolled in {registry}")
        rc: dict[str, object] = {
            **SCHEDULES[args.profile],
            "site-ids": sites,
            "strategy": args.strategy,
            "seed": args.seed,
            "min-site-fraction": args.min_site_fraction,
        }
        rc["train-sites"] = args.train_sites or sites
        rc["report-groups"] = ";".join(f"{s}={s}" for s in sites.split(","))  # one report group per site
        rc.update(_tracking_config(args))
        rc.update(_parse_set(args.set or []))
        run_id = launch(rc, out=out, flwr_home=flwr_home, signing_key=certs.signing_key, registry=registry)
    console.print(f"run {run_id} started; checkpoints, report and bundle in {out}")
    if args.wait:
        status = wait_for_run(run_id, flwr_home=flwr_home, timeout_s=args.timeout, out=out)
        console.print(f"run {run_id}: {status}")
        if status != "finished:completed":
            from server.coordinator import run_error

            console.print(f"[red]{run_error(run_id, flwr_home=flwr_home) or 'see `flwr log`'}[/red]")
            return 1
        return 0
    return 0


def status_cell(metrics: dict, key: str) -> tuple[str, str]:
    """A site's latest metric for ``onfh coordinator status`` and why it is missing or weak.

    Returns:
        ``(value, note)``: "–" with the reason when the site evaluated no heads (a site sends 0.0 for a
        metric it could not compute) or sent no value; the value with a small-n note below 10 heads.
    """
    n = metrics.get("num-examples")
    if n is not None and int(n) == 0:
        return "–", "no test heads at this site (n = 0): the metric is undefined"
    if metrics.get(key) is None:
        return "–", f"the site sent no {key}"
    note = f"only {int(n)} heads: unreliable" if n is not None and int(n) < 10 else ""
    return _fmt(float(metrics[key])), note


def _status_tables(progress: dict, nodes: dict[int, str] | None, registry: dict) -> None:
    if nodes is not None:
        table = Table(title="sites")
        for col in ("site", "node id", "key fingerprint", "status"):
            table.add_column(col)
        for site, entry in sorted(registry.items()):
            table.add_row(
                site, str(entry["node_id"]), entry["fingerprint"], nodes.get(int(entry["node_id"]), "unknown")
            )
        console.print(table)
    for phase, latest in progress["latest"].items():
        if not latest:
            continue
        table = Table(title=f"{phase}: latest per-site metrics (round {latest['round']})")
        key = Phase.parse(phase).score_key
        for col in ("site", "n", key, "note"):
            table.add_column(col)
        for site, m in sorted(latest["sites"].items()):
            table.add_row(site, str(m.get("num-examples", "")), *status_cell(m, key))
        console.print(table)
    for phase, rounds in progress["missing_sites"].items():
        for rnd, kinds in sorted(rounds.items()):
            for kind, sites in sorted(kinds.items()):
                console.print(f"[yellow]{phase} round {rnd} ({kind}): missing {', '.join(sites)}[/yellow]")


def cmd_coordinator_status(args) -> int:
    """Rounds (progress bars), connected sites and the latest per-site metrics of a run."""
    from rich.progress import BarColumn, Progress, TextColumn

    from server.coordinator import CoordinatorError, connected_nodes, load_registry, run_progress

    _, _, flwr_home, registry_path = _coordinator_paths(args)
    out = Path(args.out)

    def snapshot():
        try:
            nodes = connected_nodes(flwr_home=flwr_home)
        except (CoordinatorError, OSError) as err:
            console.print(f"[yellow]SuperLink not reachable: {err}[/yellow]")
            nodes = None
        return run_progress(out), nodes

    progress, nodes = snapshot()
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} rounds"),
        console=console,
    ) as bar:
        tasks = {
            phase: bar.add_task(phase, total=r["total"], completed=r["done"]) for phase, r in progress["rounds"].items()
        }
        while args.watch and not progress["finished"]:
            time.sleep(args.interval)
            progress, nodes = snapshot()
            for phase, r in progress["rounds"].items():
                bar.update(tasks[phase], completed=r["done"])
    _status_tables(progress, nodes, load_registry(registry_path))
    console.print(
        f"run ids {progress['run_ids']}; "
        + ("finished: signed bundle ready (`onfh coordinator pull`)" if progress["finished"] else "not finished")
    )
    return 0


def cmd_coordinator_pull(args) -> int:
    from server.coordinator import pull

    _, certs, _, _ = _coordinator_paths(args)
    key = Path(args.public_key) if args.public_key else certs.signing_public_key
    dest = pull(Path(args.out), Path(args.dest), key)
    console.print(f"[green]signed bundle copied to {dest} and verified[/green] against {key}")
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    from client.site_daemon import SITE_MIN_CELL_HEADS  # light: stdlib and cryptography only

    parser = argparse.ArgumentParser(
        prog="onfh", description="ONFH-FL: federated early-ONFH diagnosis from 3D hip MRI."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    groups = parser.add_subparsers(dest="group", required=True)

    sim = groups.add_parser("sim", help="researchers: phantoms and the four-center simulation").add_subparsers(
        dest="cmd", required=True
    )
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
    p.set_defaults(func=cmd_run)
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
    from sim.medmnist import add_medmnist_parser

    add_medmnist_parser(sim)
    p = sim.add_parser("demo", help="phantoms + simulation + report + inference on the real pelvic MRI")
    run_args(p, data_required=False)
    gpus_arg(p)
    p.set_defaults(func=cmd_demo)

    p = groups.add_parser("infer", help="two-stage pipeline on one study (DICOM folder or NIfTI)")
    p.add_argument("--bundle", required=True, help="signed model bundle folder")
    p.add_argument("--study", required=True, help="DICOM folder or .nii/.nii.gz file")
    p.add_argument("--out", required=True, help="output folder: result.json, gradcam_<side>.nii.gz")
    p.add_argument(
        "--public-key",
        help="coordinator's Ed25519 public key (PEM) to verify the bundle against (required unless --allow-unsigned)",
    )
    p.add_argument(
        "--allow-unsigned",
        action="store_true",
        help="run without the coordinator's key: the bundle is checked only against its embedded signer "
        "key and marked untrusted (a tampered bundle is still refused)",
    )
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--allow-refused",
        action="store_true",
        help="exit 0 when the study is refused (wrong body part, field of view or anatomy); without it a "
        "refused study exits 3. A refused study is never staged either way",
    )
    p.add_argument(
        "--dicom-out",
        help="also write a DICOM SR (TID 1500) and Grad-CAM Segmentation referencing the "
        "source series here (DICOM studies only)",
    )
    p.set_defaults(func=cmd_infer)

    from sim.bundle_cli import add_bundle_parser

    add_bundle_parser(groups)

    report = groups.add_parser("report", help="statistics on a finished run's predictions").add_subparsers(
        dest="cmd", required=True
    )
    from sim.readers import add_readers_parser

    add_readers_parser(report)

    site = groups.add_parser("site", help="hospital sites").add_subparsers(dest="cmd", required=True)
    p = site.add_parser("check", help="check a site data folder: one verdict per study")
    p.add_argument("--data", required=True, help="site folder with manifest.csv")
    p.add_argument("--site-id", help="site id (default: folder name)")
    p.add_argument("--cache", help="preprocessing cache folder (default: DATA/.onfh-cache)")
    p.add_argument("--json", help="also write the verdicts as JSON to this file")
    p.add_argument("--ca-cert", help="also check the coordinator's CA certificate (present, a CA, valid now)")
    p.add_argument(
        "--superlink",
        metavar="HOST:PORT",
        help="also check that the SuperLink answers TLS with a certificate signed by --ca-cert",
    )
    p.add_argument("--min-free-gb", type=float, default=1.0, help="free space needed for the cache, GB (default 1)")
    p.add_argument(
        "--max-study-voxels",
        type=int,
        default=None,
        metavar="N",
        help="refuse a study whose headers declare more voxels, before decoding it "
        "(default 67108864 = 512 x 512 x 256)",
    )
    p.set_defaults(func=cmd_site_check)
    p = site.add_parser("split", help="write the site's split.csv (8:1:1 by patient; --evaluate-only: all test)")
    p.add_argument("--data", required=True, help="site folder with manifest.csv")
    p.add_argument("--evaluate-only", action="store_true", help="the site only evaluates (every patient in test)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_site_split)
    p = site.add_parser("keys", help="make the SuperNode key pair (EC P-384, OpenSSH) and print the public key")
    p.add_argument(
        "--out", default="site-keys", help="folder for supernode-key and supernode-key.pub (default site-keys)"
    )
    p.set_defaults(func=cmd_site_keys)
    p = site.add_parser(
        "daemon",
        help="check the site, then run flower-supernode (TLS, site key) and restart it with backoff if it dies",
    )
    p.add_argument("--data", required=True, help="site folder with manifest.csv and split.csv")
    p.add_argument("--superlink", required=True, metavar="HOST:PORT", help="the coordinator's SuperLink")
    p.add_argument("--ca-cert", required=True, help="the coordinator's CA certificate (ca.crt)")
    p.add_argument(
        "--key", default="site-keys/supernode-key", help="SuperNode private key (default site-keys/supernode-key)"
    )
    p.add_argument("--site-id", help="site id as enrolled by the coordinator (default: folder name)")
    p.add_argument(
        "--cache", help="preprocessing cache folder (default: DATA/.onfh-cache; the audit log is kept there)"
    )
    p.add_argument(
        "--min-cell-heads",
        type=int,
        default=SITE_MIN_CELL_HEADS,
        help="this site's small-cell floor: a split with fewer heads sends only its count; the "
        f"coordinator's run config can raise it, never lower it (default {SITE_MIN_CELL_HEADS})",
    )
    p.add_argument(
        "--port", type=int, default=9094, help="the SuperNode's local API port (default 9094; one per node on a host)"
    )
    p.add_argument(
        "--threads",
        type=int,
        default=max(1, (os.cpu_count() or 2) // 2),
        help="OMP_NUM_THREADS for the ClientApps (default: half the cores)",
    )
    p.add_argument(
        "--launcher",
        choices=("fork", "subprocess"),
        default="fork",
        help="how each ClientApp process starts: fork (default) from a process with torch and MONAI "
        "already imported; subprocess: Flower's own fresh flwr-clientapp per message (slower)",
    )
    p.add_argument(
        "--max-retries", type=int, default=10, help="SuperNode reconnection attempts before it exits (default 10)"
    )
    p.add_argument(
        "--max-restarts", type=int, default=20, help="restarts of a dead SuperNode before giving up (default 20)"
    )
    p.add_argument("--flwr-home", help="FLWR_HOME of the SuperNode (default: CACHE/flwr-home)")
    p.add_argument("--log", help="SuperNode log file (default: CACHE/supernode.log)")
    p.add_argument("--skip-checks", action="store_true", help="connect without the preflight checks")
    p.set_defaults(func=cmd_site_daemon)
    p = site.add_parser("verify", help="check a model bundle's signature against the coordinator's public key")
    p.add_argument("--bundle", required=True, help="bundle folder")
    p.add_argument("--public-key", required=True, help="coordinator's Ed25519 public key (bundle-signing-key.pem.pub)")
    p.set_defaults(func=cmd_site_verify)

    p = site.add_parser(
        "verify-audit",
        help="check the site's audit log: hash chain, and with --anchors the heads the "
        "coordinator recorded (detects an edited, deleted or appended tail, or a rewritten log)",
    )
    p.add_argument("--data", help="site folder (the log is DATA/.onfh-cache/audit.jsonl; the site id is its name)")
    p.add_argument("--log", help="audit log file (instead of --data)")
    p.add_argument("--anchors", help="the run's audit-anchors.json or report.json, or a bundle's metrics.json")
    p.add_argument("--site", help="site id in the anchors file (default: the --data folder's name)")
    p.set_defaults(func=cmd_site_verify_audit)

    coord = groups.add_parser("coordinator", help="federation coordinators").add_subparsers(dest="cmd", required=True)
    p = coord.add_parser("signing-key", help="create the Ed25519 key that signs model bundles")
    p.add_argument("--out", required=True, help="private key file (PEM); the public key goes to FILE.pub")
    p.set_defaults(func=cmd_signing_key)

    def home_arg(p):
        p.add_argument(
            "--home",
            default="coordinator",
            help="coordinator folder: certs/, flwr-home/, enrolled-sites.json, superlink.db (default ./coordinator)",
        )

    p = coord.add_parser("certs", help="create the CA, the SuperLink TLS certificate and the bundle signing key")
    home_arg(p)
    p.add_argument("--out", help="certificate folder (default HOME/certs)")
    p.add_argument(
        "--host",
        action="append",
        default=None,
        metavar="NAME_OR_IP",
        help="extra SAN of the SuperLink certificate, e.g. its public host name (repeatable; "
        "localhost, 127.0.0.1 and ::1 are always included)",
    )
    p.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    p.set_defaults(func=cmd_coordinator_certs)
    p = coord.add_parser(
        "start-superlink",
        help="run flower-superlink: TLS, SuperNode authentication, --database, no runtime installs (foreground)",
    )
    home_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=9093, help="the SuperLink's one port (default 9093)")
    p.add_argument("--database", help="SuperLink state file (default HOME/superlink.db); a restart keeps runs and keys")
    p.set_defaults(func=cmd_coordinator_start_superlink)
    p = coord.add_parser("enroll", help="register a site's SuperNode public key (flwr supernode register)")
    home_arg(p)
    p.add_argument("--site", required=True, help="site id, as the site passes it to `onfh site daemon`")
    p.add_argument("--public-key", required=True, help="the site's supernode-key.pub (EC P-384, OpenSSH)")
    p.set_defaults(func=cmd_coordinator_enroll)
    p = coord.add_parser("launch", help="start a federated run on the enrolled sites (flwr run), or resume one")
    home_arg(p)
    p.add_argument("--out", help="run folder on this machine: checkpoints, report.json, bundle/")
    p.add_argument(
        "--resume", metavar="RUN_OUT", help="start the run in RUN_OUT again, after its last checkpointed round"
    )
    p.add_argument("--sites", help="comma-separated site ids (default: every enrolled site)")
    p.add_argument("--train-sites", help="comma-separated training sites (default: all --sites)")
    p.add_argument("--strategy", choices=STRATEGIES, default="fedavg")
    p.add_argument("--profile", choices=("quick", "paper"), default="paper", help="training schedule (rounds, steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--min-site-fraction",
        type=float,
        default=0.5,
        help="a round completes if at least this fraction of training sites trained (default 0.5)",
    )
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override any run-config key (repeatable)")
    tracking_args(p)
    p.add_argument("--wait", action="store_true", help="wait for the run to finish; exit 1 unless it completed")
    p.add_argument("--timeout", type=float, default=6 * 3600, help="with --wait: limit in seconds")
    p.set_defaults(func=cmd_coordinator_launch)
    p = coord.add_parser("status", help="rounds, connected sites and latest per-site metrics of a run")
    home_arg(p)
    p.add_argument("--out", required=True, help="the run folder given to launch")
    p.add_argument("--watch", action="store_true", help="keep the progress bars updating until the run finishes")
    p.add_argument("--interval", type=float, default=5.0, help="with --watch: seconds between updates")
    p.set_defaults(func=cmd_coordinator_status)
    p = coord.add_parser("pull", help="copy the run's final signed bundle and verify the copy")
    home_arg(p)
    p.add_argument("--out", required=True, help="the run folder given to launch")
    p.add_argument("--dest", required=True, help="new folder for the bundle")
    p.add_argument(
        "--public-key", help="Ed25519 public key to verify against (default HOME/certs/bundle-signing-key.pem.pub)"
    )
    p.set_defaults(func=cmd_coordinator_pull)
    return parser


def _run_folder(args) -> Path | None:
    """The federated run folder of a ``sim run`` or ``sim demo`` command (None for other commands)."""
    func = getattr(args, "func", None)
    if func is cmd_run:
        return Path(args.out)
    if func is cmd_demo:
        return Path(args.out) / "run"
    return None


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
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    # MONAI warns on every PydicomReader it makes that NVIDIA's GPU JPEG decoder is absent (irrelevant on CPU)
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    try:
        return args.func(args)
    except (ValueError, OSError, RuntimeError, SeriesError, BundleError) as err:
        console.print(f"[red]error:[/red] {err}")
        return 1
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: every process of the run was stopped")
        run_out = _run_folder(args)
        if run_out is not None:
            from sim.experiment import last_verified_checkpoint

            console.print(last_verified_checkpoint(run_out / "checkpoints"))
        words = sys.argv[1:] if argv is None else list(argv)
        console.print("resume with the same command: " + shlex.join(["onfh", *words]), soft_wrap=True)
        if argv is None:  # the command line, not a caller: leave now. The run's processes are stopped and its
            # checkpoints written; the interpreter's own shutdown (module finalisers) took 5-7 s on a loaded machine
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(130)
        return 130


if __name__ == "__main__":
    sys.exit(main())
