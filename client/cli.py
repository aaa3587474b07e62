"""``onfh site ...``, ``onfh infer`` and ``onfh bundle ...``: the commands of a hospital site.

Thin shells over :mod:`client.site_daemon`, :mod:`client.site_data`, :mod:`client.splits`,
:mod:`client.audit` and :mod:`client.infer`; found by the dispatcher :mod:`shared_models.cli`. Nothing
here imports ``sim`` (the site daemon needs no phantom generator or benchmark; ``tests/test_cli.py``),
and nothing at import time loads torch, MONAI or Flower (``onfh site --help`` answers at once): every
command imports its library when it runs.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from rich.table import Table

from client.site_daemon import SITE_MIN_CELL_HEADS  # light: stdlib and cryptography only
from shared_models.cli_common import console
from shared_models.processes import tied_to_this_process


def handled_errors() -> tuple[type[BaseException], ...]:
    """Error classes of the site's libraries that mean bad input (the dispatcher prints them, exit 1)."""
    from client.dicom_series import SeriesError
    from shared_models.bundle import BundleError

    return (SeriesError, BundleError)


# --------------------------------------------------------------------------- infer, bundle


def cmd_infer(args) -> int:
    from client.infer import run_infer

    return run_infer(args, console)


def cmd_export_monai(args) -> int:
    from shared_models.monai_bundle import export_monai_bundle

    if not args.public_key and not args.allow_unsigned:
        raise ValueError(
            f"{args.bundle}: refusing to export a bundle without verifying its signature; pass the "
            "coordinator's --public-key (or --allow-unsigned to check it only against its embedded key)"
        )
    out = export_monai_bundle(
        Path(args.bundle), Path(args.out), Path(args.public_key) if args.public_key else None, version=args.version
    )
    console.print(
        f"[green]MONAI Bundle written to {out}[/green] (signature verified"
        f"{' against ' + args.public_key if args.public_key else ' against the embedded key only'}); run it "
        f"from that folder: python -m monai.bundle run --config_file configs/inference.json --study STUDY"
    )
    return 0


# --------------------------------------------------------------------------- site


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
    from client.splits import write_splits

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
    print(text)  # the public key line, unwrapped (rich would fold it) so it can be copied whole
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
    from shared_models.anchors import load_anchors

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


# --------------------------------------------------------------------------- parsers


def infer_args(p: argparse.ArgumentParser) -> None:
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


def bundle_commands(p: argparse.ArgumentParser) -> None:
    bundle = p.add_subparsers(dest="cmd", required=True)
    p = bundle.add_parser(
        "export-monai",
        help="write a MONAI Bundle (configs/metadata.json, configs/inference.json, "
        "models/, docs/README.md) after verifying the signature",
    )
    p.add_argument("--bundle", required=True, help="signed ONFH-FL bundle folder")
    p.add_argument("--out", required=True, help="new folder for the MONAI Bundle")
    p.add_argument(
        "--public-key",
        help="coordinator's Ed25519 public key (PEM) to verify the bundle against (required unless --allow-unsigned)",
    )
    p.add_argument(
        "--allow-unsigned",
        action="store_true",
        help="verify only against the bundle's embedded signer key (a tampered bundle is still refused)",
    )
    p.add_argument("--version", default="0.1.0", help="the MONAI Bundle's version (default 0.1.0)")
    p.set_defaults(func=cmd_export_monai)


def site_commands(p: argparse.ArgumentParser) -> None:
    site = p.add_subparsers(dest="cmd", required=True)
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


def add_group(name: str, parser: argparse.ArgumentParser) -> None:
    """Fill the ``onfh NAME`` parser (``site``, ``infer`` or ``bundle``); called by :mod:`shared_models.cli`."""
    {"infer": infer_args, "bundle": bundle_commands, "site": site_commands}[name](parser)
