"""``onfh report readers``: the model against human readers on the same femoral heads.

Yang et al., Front. Surg. 2025, section 2.7 and Table 3 compare 3D-ONFHNet with three orthopedic
surgeons by the McNemar test. This module reads the readers' Ficat-Arlet calls and the model's
predictions, both keyed by ``(patient_id, side)``, and gives per reader: the reader's accuracy, the
model's accuracy on the heads that reader graded, and the McNemar test on the paired correctness
(:func:`shared_models.clinical_stats.mcnemar_test`). :func:`simulate_readers` makes reader calls of a
chosen accuracy so that the path can be exercised without real readers.

CSV formats (header row first, extra columns ignored):

* readers: ``patient_id, side, reader, stage`` (side ``R``/``L``, stage ``0``/``I``/``II``);
* predictions: ``patient_id, side, stage, predicted_stage`` (``stage`` is the reference stage).

Errors name the file and line (header = line 1); no patient identifier is logged.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from client.site_data import read_site_csv
from shared_models.clinical_stats import mcnemar_test
from shared_models.safe_csv import restore
from shared_models.stages import NUM_STAGES, FicatArletStage

__all__ = [
    "PREDICTION_COLUMNS",
    "READER_COLUMNS",
    "cmd_readers",
    "compare_with_readers",
    "load_predictions_csv",
    "load_reader_csv",
    "print_readers_table",
    "simulate_readers",
    "write_reader_csv",
]

log = logging.getLogger(__name__)

READER_COLUMNS: tuple[str, ...] = ("patient_id", "side", "reader", "stage")
PREDICTION_COLUMNS: tuple[str, ...] = ("patient_id", "side", "stage", "predicted_stage")
_SIDES = {"R": "R", "RIGHT": "R", "L": "L", "LEFT": "L"}


# --------------------------------------------------------------------------- reading


def _parse_side(text: str, where: str) -> str:
    side = _SIDES.get(str(text).strip().upper())
    if side is None:
        raise ValueError(f"{where}: side {text!r} is not R or L")
    return side


def _parse_stage(text: Any, column: str, where: str) -> int:
    try:
        return int(FicatArletStage.parse(text))
    except ValueError as exc:
        raise ValueError(f"{where}: column {column}: {exc}") from exc


def _read_rows(path: str | Path, columns: Sequence[str]) -> Iterable[tuple[str, dict[str, str]]]:
    """Yield ``("FILE line N", row)`` for each data row; check the header first.

    Read with the site's hardened CSV reader (:func:`client.site_data.read_site_csv`): the file
    size, each line and each field are capped before they are parsed, lines must be UTF-8 without
    NUL, so a hostile file gives a ``ValueError`` naming the file and line, never a raw
    ``csv.Error`` or an unbounded read. Every column of ``columns`` must have a value.
    """
    path = Path(path)
    try:
        rows = read_site_csv(path, columns)
    except ValueError as exc:
        if "missing column" in str(exc):
            raise ValueError(f"{path} line 1: {str(exc).split(': ', 1)[1]}") from None
        raise
    for line, row in rows:
        where = f"{path} line {line}"
        empty = [c for c in columns if not row.get(c)]
        if empty:
            raise ValueError(f"{where}: empty {', '.join(empty)} (a short row or an empty field)")
        yield where, {c: row[c] for c in columns}


def load_reader_csv(path: str | Path) -> list[dict[str, Any]]:
    """Read the readers' calls.

    Args:
        path: CSV with columns ``patient_id, side, reader, stage`` (module docstring).

    Returns:
        One dict per row: ``patient_id`` (str), ``side`` (``"R"``/``"L"``), ``reader`` (str),
        ``stage`` (int class index 0..2) and ``source`` (``"FILE line N"``, used in later errors).

    Raises:
        ValueError: missing column, empty patient_id or reader, bad side, a stage other than
            0/I/II (III/IV are out of scope), or a reader grading the same head twice; the message
            names the file and line.
        OSError: the file cannot be read.
    """
    rows: list[dict[str, Any]] = []
    seen: dict[tuple[str, str, str], str] = {}
    for where, raw in _read_rows(path, READER_COLUMNS):
        if not raw["patient_id"] or not raw["reader"]:
            raise ValueError(f"{where}: empty patient_id or reader")
        side = _parse_side(raw["side"], where)
        key = (raw["reader"], raw["patient_id"], side)
        if key in seen:
            raise ValueError(f"{where}: reader {raw['reader']!r} grades this head twice (also at {seen[key]})")
        seen[key] = where
        rows.append(
            {
                "patient_id": raw["patient_id"],
                "side": side,
                "reader": raw["reader"],
                "stage": _parse_stage(raw["stage"], "stage", where),
                "source": where,
            }
        )
    log.info("readers: %d calls by %d readers", len(rows), len({r["reader"] for r in rows}))
    return rows


def load_predictions_csv(path: str | Path) -> list[dict[str, Any]]:
    """Read the model's predictions with the reference stage.

    Args:
        path: CSV with columns ``patient_id, side, stage, predicted_stage`` (module docstring).

    Returns:
        One dict per row: ``patient_id`` (str), ``side`` (``"R"``/``"L"``), ``stage`` and
        ``predicted_stage`` (int class indices 0..2), ``source`` (``"FILE line N"``).

    Raises:
        ValueError: missing column, empty patient_id, bad side or stage, or a head listed twice;
            the message names the file and line.
        OSError: the file cannot be read.
    """
    rows: list[dict[str, Any]] = []
    seen: dict[tuple[str, str], str] = {}
    for where, raw in _read_rows(path, PREDICTION_COLUMNS):
        raw["patient_id"] = restore(raw["patient_id"])  # the project writes it neutralised (shared_models.safe_csv)
        if not raw["patient_id"]:
            raise ValueError(f"{where}: empty patient_id")
        side = _parse_side(raw["side"], where)
        key = (raw["patient_id"], side)
        if key in seen:
            raise ValueError(f"{where}: head listed twice (also at {seen[key]})")
        seen[key] = where
        rows.append(
            {
                "patient_id": raw["patient_id"],
                "side": side,
                "stage": _parse_stage(raw["stage"], "stage", where),
                "predicted_stage": _parse_stage(raw["predicted_stage"], "predicted_stage", where),
                "source": where,
            }
        )
    log.info("predictions: %d heads", len(rows))
    return rows


def write_reader_csv(rows: Iterable[Mapping[str, Any]], path: str | Path) -> Path:
    """Write reader calls (e.g. from :func:`simulate_readers`) in the format :func:`load_reader_csv` reads.

    Stages are written as labels ``0``/``I``/``II``. Returns the path.
    """
    path = Path(path)
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(READER_COLUMNS)
        for r in rows:
            writer.writerow([r["patient_id"], r["side"], r["reader"], FicatArletStage(int(r["stage"])).label])
    return path


# --------------------------------------------------------------------------- comparing


def _stage_of(row: Mapping[str, Any], key: str, where: str) -> int:
    value = row.get(key)
    if value is None:
        raise ValueError(f"{where}: missing {key}")
    return _parse_stage(value, key, where)


def compare_with_readers(
    model_rows: Sequence[Mapping[str, Any]],
    reader_rows: Sequence[Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """Per reader: reader accuracy, model accuracy on the same heads, and the McNemar test.

    Heads are matched on ``(patient_id, side)``. Correct means equal to the model row's reference
    ``stage`` (three-class Ficat-Arlet staging, 0/I/II).

    Args:
        model_rows: dicts with ``patient_id``, ``side``, ``stage`` (reference) and
            ``predicted_stage`` (int index or label), as from :func:`load_predictions_csv`.
        reader_rows: dicts with ``patient_id``, ``side``, ``reader``, ``stage`` (the reader's call),
            as from :func:`load_reader_csv` or :func:`simulate_readers`.

    Returns:
        One dict per reader, in order of first appearance: ``reader`` (str), ``n`` (heads graded),
        ``reader_accuracy``, ``model_accuracy`` (floats in [0, 1], same heads), and McNemar's ``b``
        (model right, reader wrong), ``c`` (model wrong, reader right), ``statistic``,
        ``p_value``, ``method`` (:func:`shared_models.clinical_stats.mcnemar_test`).

    Raises:
        ValueError: a reader row for a head with no model prediction, a duplicate head in
            ``model_rows``, or a bad stage; named by the row's ``source`` (file and line) when it
            has one, else by its index.
    """
    model: dict[tuple[str, str], tuple[int, int]] = {}
    for i, row in enumerate(model_rows):
        where = str(row.get("source", f"model row {i}"))
        key = (str(row["patient_id"]), _parse_side(row["side"], where))
        if key in model:
            raise ValueError(f"{where}: head listed twice in the model predictions")
        model[key] = (_stage_of(row, "stage", where), _stage_of(row, "predicted_stage", where))

    per_reader: dict[str, tuple[list[bool], list[bool]]] = {}
    for i, row in enumerate(reader_rows):
        where = str(row.get("source", f"reader row {i}"))
        key = (str(row["patient_id"]), _parse_side(row["side"], where))
        if key not in model:
            raise ValueError(f"{where}: the model has no prediction for this head (side {key[1]})")
        truth, predicted = model[key]
        model_ok, reader_ok = per_reader.setdefault(str(row["reader"]), ([], []))
        model_ok.append(predicted == truth)
        reader_ok.append(_stage_of(row, "stage", where) == truth)

    out: list[dict[str, Any]] = []
    for reader, (model_ok, reader_ok) in per_reader.items():
        test = mcnemar_test(model_ok, reader_ok)
        out.append(
            {
                "reader": reader,
                "n": len(reader_ok),
                "reader_accuracy": float(np.mean(reader_ok)),
                "model_accuracy": float(np.mean(model_ok)),
                **test,
            }
        )
    return out


def simulate_readers(
    truth_rows: Sequence[Mapping[str, Any]],
    accuracies: Mapping[str, float],
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Reader calls of a chosen accuracy, to exercise the comparison without real readers.

    Each reader grades every head: the call is the reference stage with probability
    ``accuracies[reader]``, otherwise one of the two other stages, uniformly. Draws come from
    ``numpy.random.default_rng(seed)``, readers in the mapping's order.

    Args:
        truth_rows: dicts with ``patient_id``, ``side`` and ``stage`` (int index or label), e.g.
            the rows of :func:`load_predictions_csv`.
        accuracies: ``{reader name: probability of a right call in [0, 1]}``.
        seed: RNG seed.

    Returns:
        Rows like :func:`load_reader_csv` without ``source``: ``patient_id``, ``side``,
        ``reader``, ``stage`` (int 0..2).

    Raises:
        ValueError: an accuracy outside ``[0, 1]`` or a bad stage or side.
    """
    for reader, acc in accuracies.items():
        if not 0.0 <= float(acc) <= 1.0:
            raise ValueError(f"accuracies[{reader!r}]: expected a probability in [0, 1], got {acc!r}")
    heads = []
    for i, row in enumerate(truth_rows):
        where = str(row.get("source", f"truth row {i}"))
        heads.append((str(row["patient_id"]), _parse_side(row["side"], where), _stage_of(row, "stage", where)))
    rng = np.random.default_rng(seed)
    out: list[dict[str, Any]] = []
    for reader, acc in accuracies.items():
        right = rng.random(len(heads)) < float(acc)
        shift = rng.integers(1, NUM_STAGES, size=len(heads))  # 1 or 2: one of the two other stages
        for (pid, side, truth), ok, k in zip(heads, right, shift):
            out.append(
                {
                    "patient_id": pid,
                    "side": side,
                    "reader": reader,
                    "stage": truth if ok else int((truth + k) % NUM_STAGES),
                }
            )
    return out


# --------------------------------------------------------------------------- CLI


def print_readers_table(rows: Sequence[Mapping[str, Any]], console: Any = None) -> None:
    """Print :func:`compare_with_readers` rows as a rich table (a 140-column console by default)."""
    from rich.console import Console
    from rich.table import Table

    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=140)
    table = Table(title="Model versus readers (McNemar test, same heads)")
    for name, justify in (
        ("reader", "left"),
        ("heads", "right"),
        ("reader acc.", "right"),
        ("model acc.", "right"),
        ("b (model only)", "right"),
        ("c (reader only)", "right"),
        ("statistic", "right"),
        ("p", "right"),
        ("test", "left"),
    ):
        table.add_column(name, justify=justify)
    for r in rows:
        table.add_row(
            str(r["reader"]),
            str(r["n"]),
            f"{100 * r['reader_accuracy']:.2f} %",
            f"{100 * r['model_accuracy']:.2f} %",
            str(r["b"]),
            str(r["c"]),
            f"{r['statistic']:.3f}",
            f"{r['p_value']:.4f}",
            str(r["method"]),
        )
    console.print(table)


def cmd_readers(args: argparse.Namespace, console: Any = None) -> int:
    """CLI handler: load both CSVs, compare, print the table, write ``--out``.

    Returns 0, or 1 on bad input; the error (file and line) goes to the console, not to the log,
    which never holds paths.
    """
    from rich.console import Console
    from rich.markup import escape

    try:
        rows = compare_with_readers(load_predictions_csv(args.predictions), load_reader_csv(args.readers))
        if args.out:
            out = Path(args.out)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"readers": rows}, indent=2) + "\n", encoding="utf-8")
    except (ValueError, OSError) as exc:
        (console if console is not None else Console(stderr=True)).print(f"[red]error:[/red] {escape(str(exc))}")
        return 1
    print_readers_table(rows, console)
    return 0
