"""``onfh coordinator ...``: the commands of a federation's coordinator.

Thin shells over :mod:`server.coordinator` (certificates, the SuperLink, enrolment, launch, status,
pull) and :func:`shared_models.bundle.generate_signing_key`; found by the dispatcher
:mod:`shared_models.cli`. Nothing at import time loads torch, MONAI or Flower: every command imports
its library when it runs.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.table import Table

from shared_models.cli_common import (
    SCHEDULES,
    console,
    fmt,
    parse_set,
    tracking_args,
    tracking_config,
)
from shared_models.processes import tied_to_this_process
from shared_models.specs import NUM_EXAMPLES, STRATEGIES, Phase  # torch-free: `onfh -h` stays fast


def handled_errors() -> tuple[type[BaseException], ...]:
    """Error classes of the coordinator's libraries that mean bad input (the dispatcher prints them, exit 1):
    a bundle that fails verification (``onfh coordinator pull``)."""
    from shared_models.bundle import BundleError

    return (BundleError,)


def cmd_signing_key(args) -> int:
    from shared_models.bundle import generate_signing_key

    path = Path(args.out)
    if path.exists():
        raise ValueError(f"{path} exists; refusing to overwrite a signing key")
    generate_signing_key(path)
    console.print(f"Ed25519 signing key: {path} (keep private); public key: {path}.pub")
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
        rc.update(tracking_config(args))
        rc.update(parse_set(args.set or []))
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
    n = metrics.get(NUM_EXAMPLES)
    if n is not None and int(n) == 0:
        return "–", "no test heads at this site (n = 0): the metric is undefined"
    if metrics.get(key) is None:
        return "–", f"the site sent no {key}"
    note = f"only {int(n)} heads: unreliable" if n is not None and int(n) < 10 else ""
    return fmt(float(metrics[key])), note


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
            table.add_row(site, str(m.get(NUM_EXAMPLES, "")), *status_cell(m, key))
        console.print(table)
    for phase, rounds in progress["missing_sites"].items():
        for rnd, kinds in sorted(rounds.items()):
            for kind, sites in sorted(kinds.items()):
                console.print(f"[yellow]{phase} round {rnd} ({kind}): missing {', '.join(sites)}[/yellow]")


def cmd_coordinator_status(args) -> int:
    """Rounds (progress bars), connected sites and the latest per-site metrics of a run."""
    from rich.progress import BarColumn, Progress, TextColumn

    from server.coordinator import CoordinatorError, connected_nodes, load_registry, run_progress

    home, _, flwr_home, registry_path = _coordinator_paths(args)
    out = Path(args.out)
    if not out.is_dir():
        raise CoordinatorError(f"{out}: no such run folder (give the --out of `onfh coordinator launch`)")

    def snapshot():
        if not flwr_home.is_dir():  # a read-only command: never create a coordinator home
            console.print(f"[yellow]no coordinator home at {home}: site connections unknown (--home)[/yellow]")
            return run_progress(out), None
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


def add_group(name: str, parser: argparse.ArgumentParser) -> None:
    """Fill the ``onfh coordinator`` parser; called by :mod:`shared_models.cli`."""
    coord = parser.add_subparsers(dest="cmd", required=True)
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
