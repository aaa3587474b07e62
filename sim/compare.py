"""``onfh sim compare``: a grid of federated experiments (variants x seeds) on the same splits.

Every cell of the grid is one :func:`sim.experiment.run_experiment` in its own folder
``OUT/<variant>/seed-<n>``, so an interrupted grid resumes where it stopped: finished
cells are only re-read and the interrupted one continues after its last round. All
cells use the same data and splits (``split.csv`` depends on the seed only), so the
variants differ only in what their overrides change.

Named grids (``--grid``): ``strategies`` (FedAvg, FedProx over a ``mu`` grid, FedBN),
``leave-one-site-out`` (issue 6's site-held-out evaluation) and, the default, the paper's two
ablations on top of the default run:

* ``gt-crops``: phase 2 trains and tests on crops from the ground-truth boxes instead
  of the phase-1 detector's boxes (what the detector costs the stager; issue 4);
* ``plain-transition``: 3D-MulDenseNet with DenseNet's plain transition instead of
  MulPoolFusion (what MulPoolFusion adds; Yang et al. 2025, section 2.4).

``OUT/compare.json`` holds one row per (variant, seed, report group) and
``OUT/compare.md`` the table of means ± sample standard deviations over seeds.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table


@dataclass(frozen=True)
class Variant:
    """One named set of run-config overrides (kebab-case keys of ``[tool.flwr.app.config]``)."""

    name: str
    overrides: Mapping[str, object] = field(default_factory=dict)


DEFAULT_VARIANTS: tuple[Variant, ...] = (
    Variant("default"),
    Variant("gt-crops", {"crop-source": "ground-truth"}),
    Variant("plain-transition", {"stager-transition": "plain"}),
)

METRICS = ("auc", "accuracy", "sensitivity", "specificity", "f1")

PROXIMAL_MU_GRID = (0.001, 0.01, 0.1)


def strategy_variants(mu_grid: Sequence[float] = PROXIMAL_MU_GRID) -> list[Variant]:
    """FedAvg, FedProx over a grid of proximal terms ``mu`` and FedBN, on the same splits."""
    return [Variant("fedavg", {"strategy": "fedavg"}),
            *(Variant(f"fedprox-mu{mu:g}", {"strategy": "fedprox", "proximal-mu": float(mu)}) for mu in mu_grid),
            Variant("fedbn", {"strategy": "fedbn"})]


def leave_one_site_out_variants(site_ids: Sequence[str]) -> list[Variant]:
    """Site-held-out evaluation: for each site ``h``, federate over the others and test on ``h``.

    Variant ``hold-out-<h>`` trains at every other site (each split 8:1:1 by patient) and reports
    ``held-out`` (all of ``h``'s heads, never trained on) and ``internal-test`` (the test split of
    the training sites).

    Raises:
        ValueError: fewer than two sites.
    """
    if len(site_ids) < 2:
        raise ValueError(f"leave-one-site-out needs at least two sites, got {list(site_ids)}")
    out = []
    for held in site_ids:
        train = [s for s in site_ids if s != held]
        out.append(Variant(f"hold-out-{held}", {
            "train-sites": ",".join(train),
            "report-groups": f"held-out={held};internal-test={','.join(train)}",
        }))
    return out


GRIDS = ("ablations", "strategies", "leave-one-site-out")


def grid_variants(grid: str, site_ids: Sequence[str]) -> list[Variant]:
    """The named grid: ``ablations`` (:data:`DEFAULT_VARIANTS`), ``strategies`` or ``leave-one-site-out``.

    Raises:
        ValueError: unknown grid name.
    """
    if grid == "ablations":
        return list(DEFAULT_VARIANTS)
    if grid == "strategies":
        return strategy_variants()
    if grid == "leave-one-site-out":
        return leave_one_site_out_variants(site_ids)
    raise ValueError(f"unknown grid {grid!r}; expected one of {GRIDS}")


def parse_variant(text: str, parse_set) -> Variant:
    """``"NAME"`` or ``"NAME:KEY=VALUE,KEY=VALUE"`` -> :class:`Variant`.

    ``parse_set`` types the values like the pyproject defaults (``sim.cli._parse_set``).

    Raises:
        ValueError: an empty or path-like name, or a bad ``KEY=VALUE``.
    """
    name, _, sets = text.partition(":")
    name = name.strip()
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"--variant {text!r}: expected NAME[:KEY=VALUE,...] with a plain folder name")
    return Variant(name, parse_set([s for s in sets.split(",") if s.strip()]))


def rows_from_report(variant: str, seed: int, report: Mapping) -> list[dict]:
    """One row per report group: macro metrics, detector IoU over the group's sites, wall time in s."""
    rows = []
    for group, m in report["sites"].items():
        row = {"variant": variant, "seed": seed, "group": group, "n": m.get("n", 0)}
        for key in METRICS:
            row[f"macro_{key}"] = m.get("macro", {}).get(key, math.nan) if m.get("n") else math.nan
        ious = [report["detector"][s]["iou_mean"] for s in m.get("sites", [])
                if report.get("detector", {}).get(s, {}).get("iou_mean") is not None]  # None: no test heads
        row["detector_iou_mean"] = statistics.fmean(ious) if ious else math.nan
        row["wall_time_s"] = report.get("simulation", {}).get("wall_time_s", math.nan)
        rows.append(row)
    return rows


def summarise(rows: Sequence[Mapping]) -> list[dict]:
    """Mean and sample standard deviation (n-1; 0 for one seed) per (variant, group) over seeds."""
    cells: dict[tuple[str, str], list[Mapping]] = {}
    for r in rows:
        cells.setdefault((r["variant"], r["group"]), []).append(r)
    out = []
    for (variant, group), rs in cells.items():
        s = {"variant": variant, "group": group, "seeds": len(rs)}
        for key in [f"macro_{k}" for k in METRICS] + ["detector_iou_mean"]:
            values = [float(r[key]) for r in rs if not math.isnan(float(r[key]))]
            s[key] = statistics.fmean(values) if values else math.nan
            s[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(s)
    return out


def _pm(mean: float, sd: float, seeds: int) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.3f} ± {sd:.3f}" if seeds > 1 else f"{mean:.3f}"


def markdown_table(summary: Sequence[Mapping]) -> str:
    """The summary as a Markdown table (macro AUC, accuracy, F1, detector IoU)."""
    lines = ["| variant | report group | seeds | macro AUC | macro accuracy | macro F1 | detector IoU |",
             "|---|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['variant']} | {s['group']} | {s['seeds']} | "
                     + " | ".join(_pm(s[k], s[f"{k}_sd"], s["seeds"])
                                  for k in ("macro_auc", "macro_accuracy", "macro_f1", "detector_iou_mean")) + " |")
    return "\n".join(lines) + "\n"


def run_compare(base: Mapping[str, object], out: Path, variants: Sequence[Variant], seeds: Sequence[int], *,
                console: Console | None = None) -> list[dict]:
    """Run every (variant, seed) cell, write ``compare.json`` and ``compare.md``, return the summary.

    Args:
        base: run-config overrides shared by every cell (``data-root``, profile schedule, strategy ...).
        out: the grid's folder; cell ``OUT/<variant>/seed-<seed>``.
        variants: distinct names; later keys win over ``base``.
        seeds: run seeds (model init, local sampling, splits).

    Raises:
        ValueError: duplicate variant names, no seeds, or any error of
            :func:`sim.experiment.run_experiment` (the grid stops; finished cells are kept).
    """
    from server.report import json_safe
    from sim.experiment import run_experiment

    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"variant names must be distinct, got {names}")
    if not seeds:
        raise ValueError("at least one seed is needed")
    console = console or Console()
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    total = len(variants) * len(seeds)
    for i, (variant, seed) in enumerate(((v, s) for v in variants for s in seeds), start=1):
        cell = out / variant.name / f"seed-{seed}"
        console.rule(f"[bold]{i}/{total}[/bold] {variant.name}, seed {seed}")
        overrides = {**base, **variant.overrides, "seed": seed, "out-dir": str(cell.resolve())}
        rows.extend(rows_from_report(variant.name, seed, run_experiment(overrides, console=console)))
        (out / "compare.json").write_text(json.dumps(json_safe({"rows": rows, "summary": summarise(rows)}), indent=2))
    summary = summarise(rows)
    (out / "compare.json").write_text(json.dumps(json_safe({"rows": rows, "summary": summary}), indent=2))
    (out / "compare.md").write_text(markdown_table(summary))
    return summary


def print_summary(summary: Sequence[Mapping], console: Console) -> None:
    """Print the summary as a rich table."""
    table = Table(title="onfh sim compare: macro metrics per report group (mean ± sd over seeds)")
    for col in ("variant", "report group", "seeds", "macro AUC", "macro accuracy", "macro F1", "detector IoU"):
        table.add_column(col)
    for s in summary:
        table.add_row(s["variant"], s["group"], str(s["seeds"]),
                      *(_pm(s[k], s[f"{k}_sd"], s["seeds"]) for k in ("macro_auc", "macro_accuracy", "macro_f1",
                                                                        "detector_iou_mean")))
    console.print(table)
