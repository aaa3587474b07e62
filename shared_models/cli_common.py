"""What every ``onfh`` command module shares: the console, logging, exit codes, run-config arguments.

Used by the dispatcher (:mod:`shared_models.cli`) and the role modules (``client/cli.py``,
``server/cli.py``, ``sim/cli.py``). It lives in the lowest layer that needs it (the dispatcher's), and
imports only the standard library and rich: ``onfh --help`` and ``onfh site --help`` must not pay
for torch, MONAI or Flower (``tests/test_cli.py`` checks ``sys.modules``).

Exit codes: 0 success, 1 bad input or failed run (an expected error, printed in one line), 2 usage
(argparse), 3 a refused study (``onfh infer``), 130 interrupted.
"""

from __future__ import annotations

import argparse
import difflib
import logging
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

console = Console()
if not console.is_terminal:  # piped or logged: do not squeeze tables into 80 columns
    console = Console(width=140)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130

#: The errors a command may raise on bad input or a failed run; printed in one line, exit 1. A role
#: module adds its own library's error classes with ``handled_errors()`` (see :mod:`shared_models.cli`).
HANDLED_ERRORS: tuple[type[BaseException], ...] = (ValueError, OSError, RuntimeError)

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

BOOLEANS = {"1": True, "true": True, "yes": True, "on": True, "0": False, "false": False, "no": False, "off": False}


def setup_logging(verbose: bool) -> None:
    """Log to stderr at INFO (DEBUG with ``-v``); silence MONAI's per-reader GPU-decoder warning."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # MONAI warns on every PydicomReader it makes that NVIDIA's GPU JPEG decoder is absent (irrelevant on CPU)
    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)


def fmt(value) -> str:
    """A table cell: "–" for None, three decimals for a float, ``str`` otherwise."""
    return "–" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def parse_set(items: Sequence[str]) -> dict[str, object]:
    """``KEY=VALUE`` pairs -> run-config overrides, VALUE typed like the pyproject default.

    Raises:
        ValueError: an unknown KEY (with the closest known keys), a missing ``=``, or a VALUE that
            does not parse as the default's type (bool, int, float or str).
    """
    from shared_models.config import default_run_config  # the pyproject defaults (imports torch)

    defaults = default_run_config()
    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
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


def tracking_args(p: argparse.ArgumentParser) -> None:
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


def tracking_config(args: argparse.Namespace) -> dict[str, object]:
    """``--track`` / ``--tracking-uri`` as run-config keys; a TensorBoard folder made absolute."""
    track, uri = getattr(args, "track", "mlflow"), getattr(args, "tracking_uri", None)
    rc: dict[str, object] = {"track": track}
    if uri:
        rc["tracking-uri"] = str(Path(uri).resolve()) if track == "tensorboard" else uri
    return rc
