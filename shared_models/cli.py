"""``onfh``: the one console script, a thin dispatcher with a command group per kind of user.

* ``onfh sim ...``          researchers: phantoms, the four-center simulation, compare, bench, medmnist, demo
* ``onfh report ...``       researchers: the model against reader diagnoses (McNemar)
* ``onfh site ...``         hospital sites: keys, check, split, daemon, verify, verify-audit
* ``onfh infer ...``        anyone: the two-stage pipeline on one study
* ``onfh bundle ...``       anyone: convert a signed bundle for other tools (MONAI Bundle)
* ``onfh coordinator ...``  coordinators: certificates, SuperLink, enrolment, launch, status, pull

Each group's commands live with their role: :data:`ROLES` maps a group to the module that defines it
(``client.cli``, ``server.cli``, ``sim.cli``). **This table is the one place where the lowest layer
(``shared_models``) names the upper layers, and it does so by string only**, resolved with
:func:`importlib.import_module` for the group on the command line and no other. So ``onfh site ...``
never imports ``sim`` (a hospital's daemon needs no phantom generator or benchmark), and ``onfh --help``
imports no role module at all (no torch, MONAI or Flower; ``tests/test_cli.py`` checks ``sys.modules``).

A role module provides ``add_group(name, parser)``, which fills the group's parser with its commands
(each sets ``func``; ``sim`` commands may also set ``on_interrupt``), and may provide
``handled_errors()``, the error classes of its libraries that mean bad input (exit 1, one line).

Library code raises; :func:`main` maps errors to exit codes (:mod:`shared_models.cli_common`).
``python -m shared_models.cli`` is ``onfh`` (``python -m sim.cli`` too, kept for the researchers' scripts).
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import signal
import sys
from collections.abc import Sequence

#: group -> (module that defines its commands, one-line help). Order = order in ``onfh --help``.
ROLES: dict[str, tuple[str, str]] = {
    "sim": ("sim.cli", "researchers: phantoms and the four-center simulation"),
    "infer": ("client.cli", "two-stage pipeline on one study (DICOM folder or NIfTI)"),
    "bundle": ("client.cli", "convert a signed model bundle for other tools"),
    "report": ("sim.cli", "statistics on a finished run's predictions"),
    "site": ("client.cli", "hospital sites"),
    "coordinator": ("server.cli", "federation coordinators"),
}


def chosen_group(argv: Sequence[str]) -> str | None:
    """The command group named on the command line: its first word that is not an option."""
    return next((word for word in argv if not word.startswith("-")), None)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``onfh`` parser with every group listed and the commands of the groups that ``argv`` needs.

    Args:
        argv: the command line (without the program name). With it, only the module of the group it
            names is imported (none for ``onfh --help``); with None, every role module (for tests
            and documentation, which parse several groups with one parser).
    """
    parser = argparse.ArgumentParser(
        prog="onfh", description="ONFH-FL: federated early-ONFH diagnosis from 3D hip MRI."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    groups = parser.add_subparsers(dest="group", required=True)
    wanted = set(ROLES) if argv is None else {chosen_group(argv)}
    for name, (module, help_text) in ROLES.items():
        group = groups.add_parser(name, help=help_text)
        if name in wanted:
            importlib.import_module(module).add_group(name, group)
    return parser


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def _handled_errors(args: argparse.Namespace) -> tuple[type[BaseException], ...]:
    from shared_models.cli_common import HANDLED_ERRORS

    module = ROLES.get(getattr(args, "group", None) or "", ("", ""))[0]
    extra = getattr(sys.modules.get(module), "handled_errors", None)
    return HANDLED_ERRORS + (tuple(extra()) if extra else ())


def main(argv: list[str] | None = None) -> int:
    """Run one ``onfh`` command; returns its exit code (0 ok, 1 error, 2 usage, 3 refused study, 130 interrupted).

    SIGTERM (CI, systemd, kill) and SIGINT (also when started in the background) stop a run
    cleanly: the runner stops the Flower run and every process it started.
    """
    words = sys.argv[1:] if argv is None else list(argv)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    args = build_parser(words).parse_args(words)
    from shared_models.cli_common import EXIT_ERROR, EXIT_INTERRUPTED, console, setup_logging

    setup_logging(args.verbose)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: every process of the run was stopped")
        if (on_interrupt := getattr(args, "on_interrupt", None)) is not None:
            on_interrupt(args)
        console.print("resume with the same command: " + shlex.join(["onfh", *words]), soft_wrap=True)
        if argv is None:  # the command line, not a caller: leave now. The run's processes are stopped and its
            # checkpoints written; the interpreter's own shutdown (module finalisers) took 5-7 s on a loaded machine
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(EXIT_INTERRUPTED)
        return EXIT_INTERRUPTED
    except Exception as err:
        if not isinstance(err, _handled_errors(args)):
            raise
        console.print(f"[red]error:[/red] {err}")
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
