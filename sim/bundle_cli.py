"""``onfh bundle ...``: convert a signed ONFH-FL bundle for other tools (issue 21)."""

from __future__ import annotations

from pathlib import Path


def add_bundle_parser(groups) -> None:
    """Add the ``bundle`` command group to the CLI's top-level subparsers."""
    bundle = groups.add_parser("bundle", help="convert a signed model bundle for other tools").add_subparsers(
        dest="cmd", required=True
    )
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


def cmd_export_monai(args) -> int:
    from rich.console import Console

    from shared_models.monai_bundle import export_monai_bundle

    if not args.public_key and not args.allow_unsigned:
        raise ValueError(
            f"{args.bundle}: refusing to export a bundle without verifying its signature; pass the "
            "coordinator's --public-key (or --allow-unsigned to check it only against its embedded key)"
        )
    out = export_monai_bundle(
        Path(args.bundle), Path(args.out), Path(args.public_key) if args.public_key else None, version=args.version
    )
    Console().print(
        f"[green]MONAI Bundle written to {out}[/green] (signature verified"
        f"{' against ' + args.public_key if args.public_key else ' against the embedded key only'}); run it "
        f"from that folder: python -m monai.bundle run --config_file configs/inference.json --study STUDY"
    )
    return 0
