"""``onfh sim compare``: a grid of federated experiments (variants x seeds) on the same splits.

Every cell of the grid is one :func:`sim.experiments.experiment.run_experiment` in its own folder
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
    return [
        Variant("fedavg", {"strategy": "fedavg"}),
        *(Variant(f"fedprox-mu{mu:g}", {"strategy": "fedprox", "proximal-mu": float(mu)}) for mu in mu_grid),
        Variant("fedbn", {"strategy": "fedbn"}),
    ]


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
        out.append(
            Variant(
                f"hold-out-{held}",
                {
                    "train-sites": ",".join(train),
                    "report-groups": f"held-out={held};internal-test={','.join(train)}",
                },
            )
        )
    return out


def baseline_variants(base: Mapping[str, object]) -> list[Variant]:
    """Federated against local-only against pooled, on the same splits and the same compute.

    With training sites ``T`` (``train-sites`` of ``base``; every one split 8:1:1 by patient):

    * ``federated``: the strategy of ``base`` over all of ``T``;
    * ``local-<s>`` for each ``s`` in ``T``: site ``s`` alone, the same optimiser steps per round
      as in the federated run; the other sites only evaluate its model, so these rows with
      ``federated`` and ``pooled`` make the cross-site matrix;
    * ``pooled``: every site's train and val heads in one place (:mod:`sim.experiments.pooled`), with
      ``len(T)`` times the local steps per round, i.e. the federation's total.

    Raises:
        ValueError: fewer than two training sites (then all three arms are one model).
    """
    from sim.experiments.pooled import pooled_overrides

    train = [s.strip() for s in str(base["train-sites"]).split(",") if s.strip()]
    if len(train) < 2:
        raise ValueError(
            f"the baselines grid needs at least two training sites (--train-sites A,B), got {train}: "
            "with one, federated, local-only and pooled are the same model"
        )
    split = {"split-sites": ",".join(train)}
    return [
        Variant("federated", {**split, "train-sites": ",".join(train)}),
        *(Variant(f"local-{s}", {**split, "train-sites": s}) for s in train),
        Variant("pooled", pooled_overrides(base, train)),
    ]


def report_groups_for(train_sites: Sequence[str], groups: Mapping[str, Sequence[str]]) -> str:
    """Report groups when ``train_sites`` train: ``<site>-test`` per training site (its internal test split),
    then each of ``groups`` restricted to the sites that do not train (external), e.g. A,B training
    with the paper's groups gives ``A-test=A;B-test=B;external-2=C,D``."""
    parts = [f"{s}-test={s}" for s in train_sites]
    for name, members in groups.items():
        external = [m for m in members if m not in train_sites]
        if external and name not in {f"{s}-test" for s in train_sites}:
            parts.append(f"{name}={','.join(external)}")
    return ";".join(parts)


GRIDS = ("ablations", "strategies", "leave-one-site-out", "baselines")


def grid_variants(grid: str, site_ids: Sequence[str], base: Mapping[str, object] | None = None) -> list[Variant]:
    """The named grid(s), comma-separated: ``ablations`` (:data:`DEFAULT_VARIANTS`), ``strategies``,
    ``leave-one-site-out`` or ``baselines`` (:func:`baseline_variants`, which needs ``base``).

    Raises:
        ValueError: unknown grid name, or a variant name in two of the grids.
    """
    out: list[Variant] = []
    for name in [g.strip() for g in grid.split(",") if g.strip()]:
        if name == "ablations":
            out += DEFAULT_VARIANTS
        elif name == "strategies":
            out += strategy_variants()
        elif name == "leave-one-site-out":
            out += leave_one_site_out_variants(site_ids)
        elif name == "baselines":
            out += baseline_variants(base or {})
        else:
            raise ValueError(f"unknown grid {name!r}; expected one of {GRIDS}")
    return out


def parse_variant(text: str, parse_set) -> Variant:
    """``"NAME"`` or ``"NAME:KEY=VALUE,KEY=VALUE"`` -> :class:`Variant`.

    ``parse_set`` types the values like the pyproject defaults (:func:`shared_models.cli_common.parse_set`).

    Raises:
        ValueError: an empty or path-like name, or a bad ``KEY=VALUE``.
    """
    name, _, sets = text.partition(":")
    name = name.strip()
    if not name or "/" in name or name.startswith("."):
        raise ValueError(f"--variant {text!r}: expected NAME[:KEY=VALUE,...] with a plain folder name")
    return Variant(name, parse_set([s for s in sets.split(",") if s.strip()]))


def _num(value) -> float:
    """A report value as float; ``None`` (an undefined metric, NaN in report.json) -> NaN."""
    return math.nan if value is None else float(value)


def rows_from_report(variant: str, seed: int, report: Mapping) -> list[dict]:
    """One row per report group: macro metrics, detector IoU over the group's sites, wall time in s."""
    rows = []
    for group, m in report["sites"].items():
        row = {"variant": variant, "seed": seed, "group": group, "n": m.get("n", 0)}
        for key in METRICS:
            row[f"macro_{key}"] = _num(m.get("macro", {}).get(key)) if m.get("n") else math.nan
        ious = [
            report["detector"][s]["iou_mean"]
            for s in m.get("sites", [])
            if report.get("detector", {}).get(s, {}).get("iou_mean") is not None
        ]  # None: no test heads
        row["detector_iou_mean"] = statistics.fmean(ious) if ious else math.nan
        base = ((report.get("baseline_intensity_logreg") or {}).get(group) or {}).get("macro") or {}
        row["baseline_auc"] = _num(base.get("auc"))
        row["unreliable"] = bool((m.get("small_n") or {}).get("unreliable"))
        row["wall_time_s"] = report.get("simulation", {}).get("wall_time_s", math.nan)
        rows.append(row)
    return rows


def cross_site_rows(variant: str, seed: int, report: Mapping) -> list[dict]:
    """One row per site that evaluated the run's model on its own test heads (``per_site`` of the report):
    the cross-site matrix, the model of ``variant`` (a row) against every site's test data (a column).
    Evaluation ran at the sites through Flower evaluate messages; only counts came back."""
    return [
        {
            "variant": variant,
            "seed": seed,
            "site": site,
            "n": m.get("n", 0),
            "macro_auc": _num(m.get("macro", {}).get("auc")),
            "macro_accuracy": _num(m.get("macro", {}).get("accuracy")),
        }
        for site, m in sorted(report.get("per_site", {}).items())
    ]


def cross_site_matrix(rows: Sequence[Mapping], key: str = "macro_auc") -> dict[str, dict[str, float]]:
    """``{variant: {site: mean over seeds of key}}`` from :func:`cross_site_rows` rows (NaN-free means)."""
    cells: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        value = r.get(key)
        if value is not None and not math.isnan(float(value)):
            cells.setdefault(r["variant"], {}).setdefault(r["site"], []).append(float(value))
    return {v: {site: statistics.fmean(vals) for site, vals in sites.items()} for v, sites in cells.items()}


def seed_interval(
    values: Sequence[float], confidence: float = 0.95, bounds: tuple[float, float] = (0.0, 1.0)
) -> tuple[float, float]:
    """Student-t confidence interval of the mean over seeds (scipy.stats.t), clipped to ``bounds`` (every
    metric here is a proportion or an AUC); ``(nan, nan)`` for fewer than 2 values."""
    from scipy import stats

    if len(values) < 2:
        return math.nan, math.nan
    mean, sem = statistics.fmean(values), statistics.stdev(values) / math.sqrt(len(values))
    if sem == 0:
        return mean, mean
    low, high = stats.t.interval(confidence, len(values) - 1, loc=mean, scale=sem)
    return max(float(low), bounds[0]), min(float(high), bounds[1])


def seed_prediction_interval(
    values: Sequence[float], confidence: float = 0.95, bounds: tuple[float, float] = (0.0, 1.0)
) -> tuple[float, float]:
    """Where the figure of one more seed lands: the Student-t prediction interval
    ``mean ± t(confidence, n - 1) · sd · sqrt(1 + 1/n)`` (normal model; e.g. Hahn & Meeker, *Statistical
    Intervals*, 1991, section 4.5), clipped to ``bounds``; ``(nan, nan)`` for fewer than 2 values.
    Wider than :func:`seed_interval` (the mean's interval) by ``sqrt(n + 1)``."""
    from scipy import stats

    if len(values) < 2:
        return math.nan, math.nan
    n, mean, sd = len(values), statistics.fmean(values), statistics.stdev(values)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd * math.sqrt(1 + 1 / n)
    return max(mean - half, bounds[0]), min(mean + half, bounds[1])


SUMMARY_KEYS = (*(f"macro_{k}" for k in METRICS), "detector_iou_mean", "baseline_auc")


def summarise(rows: Sequence[Mapping]) -> list[dict]:
    """Per (variant, group) over seeds: mean, sample standard deviation (n-1; 0 for one seed), the
    95 % Student-t interval of the mean (``*_ci``; NaN for one seed), the 95 % prediction interval of one
    more seed (``*_pi``, :func:`seed_prediction_interval`), the range of ``n`` heads and whether any seed's
    figures were marked unreliable for small n (``unreliable``)."""
    cells: dict[tuple[str, str], list[Mapping]] = {}
    for r in rows:
        cells.setdefault((r["variant"], r["group"]), []).append(r)
    out = []
    for (variant, group), rs in cells.items():
        s = {
            "variant": variant,
            "group": group,
            "seeds": len(rs),
            "n_heads": [min(r["n"] for r in rs), max(r["n"] for r in rs)],
            "unreliable": any(r.get("unreliable") for r in rs),
        }
        for key in SUMMARY_KEYS:
            values = [float(r[key]) for r in rs if key in r and not math.isnan(float(r[key]))]
            s[key] = statistics.fmean(values) if values else math.nan
            s[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
            s[f"{key}_ci"] = list(seed_interval(values))
            s[f"{key}_pi"] = list(seed_prediction_interval(values))
        out.append(s)
    return out


def _pm(mean: float, sd: float, seeds: int) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.3f} ± {sd:.3f}" if seeds > 1 else f"{mean:.3f}"


def markdown_table(summary: Sequence[Mapping]) -> str:
    """The summary as a Markdown table (macro AUC, accuracy, F1, detector IoU)."""
    lines = [
        "| variant | report group | seeds | macro AUC | macro AUC 95 % CI (seeds) | macro accuracy | macro F1 "
        "| detector IoU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        low, high = s.get("macro_auc_ci") or (math.nan, math.nan)
        ci = "–" if low is None or math.isnan(low) else f"{low:.3f} to {high:.3f}"
        lines.append(
            f"| {s['variant']} | {s['group']} | {s['seeds']} | {_pm(s['macro_auc'], s['macro_auc_sd'], s['seeds'])}"
            f" | {ci} | "
            + " | ".join(
                _pm(s[k], s[f"{k}_sd"], s["seeds"]) for k in ("macro_accuracy", "macro_f1", "detector_iou_mean")
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def headline_table(summary: Sequence[Mapping], variant: str = "default") -> str:
    """The README's headline table for one variant: per report group, mean ± sd over seeds of the macro
    figures, the 95 % prediction interval of one more seed's macro AUC, and the intensity baseline's AUC."""
    lines = [
        "| report site | n heads | macro accuracy | macro sensitivity | macro specificity | macro F1 | macro AUC "
        "| macro AUC, one more seed (95 %) | baseline AUC |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        if s["variant"] != variant:
            continue
        low, high = s.get("macro_auc_pi") or (math.nan, math.nan)
        pi = "–" if low is None or math.isnan(low) else f"{low:.2f} to {high:.2f}"
        lo, hi = s.get("n_heads") or (0, 0)
        group = s["group"] + (" *" if s.get("unreliable") else "")
        lines.append(
            f"| {group} | {lo if lo == hi else f'{lo}-{hi}'} | "
            + " | ".join(
                _pm(s[f"macro_{k}"], s[f"macro_{k}_sd"], s["seeds"])
                for k in ("accuracy", "sensitivity", "specificity", "f1", "auc")
            )
            + f" | {pi} | {_pm(s['baseline_auc'], s['baseline_auc_sd'], s['seeds'])} |"
        )
    return "\n".join(lines) + "\n"


def outside_interval(
    reference: Sequence[Mapping],
    rows: Sequence[Mapping],
    keys: Sequence[str] = ("macro_auc", "macro_accuracy", "macro_f1", "detector_iou_mean"),
) -> list[str]:
    """Figures of new runs (:func:`rows_from_report` rows) outside the reference grid's 95 % prediction interval
    of one more seed (``*_pi`` of :func:`summarise`), matched on (variant, report group); one line each.

    Raises:
        ValueError: a row whose (variant, group) the reference does not hold, or a reference without intervals
            (fewer than 2 seeds).
    """
    ref = {(s["variant"], s["group"]): s for s in reference}
    problems = []
    for r in rows:
        s = ref.get((r["variant"], r["group"]))
        if s is None:
            raise ValueError(f"the reference has no {r['variant']} / {r['group']}: run the same variants and groups")
        for key in keys:
            value, (low, high) = float(r[key]), s.get(f"{key}_pi") or (None, None)
            if low is None or high is None or math.isnan(low):
                raise ValueError(
                    f"the reference's {r['variant']} / {r['group']} has no interval for {key} "
                    "(it needs at least 2 seeds)"
                )
            if not math.isnan(value) and not low - 1e-12 <= value <= high + 1e-12:
                problems.append(
                    f"{r['variant']} / {r['group']} seed {r['seed']}: {key} {value:.3f} outside [{low:.3f}, {high:.3f}]"
                )
    return problems


def run_compare(
    base: Mapping[str, object],
    out: Path,
    variants: Sequence[Variant],
    seeds: Sequence[int],
    *,
    console: Console | None = None,
) -> list[dict]:
    """Run every (variant, seed) cell, write ``compare.json`` and ``compare.md``, return the summary.

    Args:
        base: run-config overrides shared by every cell (``data-root``, profile schedule, strategy ...).
        out: the grid's folder; cell ``OUT/<variant>/seed-<seed>``.
        variants: distinct names; later keys win over ``base``.
        seeds: run seeds (model init, local sampling, splits).

    Raises:
        ValueError: duplicate variant names, no seeds, or any error of
            :func:`sim.experiments.experiment.run_experiment` (the grid stops; finished cells are kept).
    """
    from server.report import json_safe
    from server.report_html import write_compare_html
    from sim.experiments.experiment import run_experiment

    names = [v.name for v in variants]
    if not variants:
        raise ValueError("the grid has no variants (check --grid / --variant)")
    if len(set(names)) != len(names):
        raise ValueError(f"variant names must be distinct, got {names}")
    if not seeds:
        raise ValueError("at least one seed is needed")
    if "data-root" in base:  # a real grid: every cell's config is checked before the first one runs
        from shared_models.config import RunConfig, default_run_config

        for variant in variants:
            try:
                RunConfig.from_run_config({**default_run_config(), **base, **variant.overrides, "seed": seeds[0]})
            except ValueError as err:
                raise ValueError(f"variant {variant.name}: {err}") from None
    console = console or Console()
    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    site_rows: list[dict] = []
    cells: dict[str, str] = {}
    total = len(variants) * len(seeds)

    def write() -> dict:
        result = {
            "rows": rows,
            "summary": summarise(rows),
            "cross_site": {"rows": site_rows, "macro_auc": cross_site_matrix(site_rows)},
            "cells": cells,
            "seeds": list(seeds),
            "variants": {v.name: dict(v.overrides) for v in variants},
        }
        (out / "compare.json").write_text(json.dumps(json_safe(result), indent=2))
        variants_run = [v.name for v in variants]
        (out / "compare.md").write_text(
            markdown_table(result["summary"])
            + "".join(f"\n{name}:\n\n{headline_table(result['summary'], name)}" for name in variants_run)
        )
        write_compare_html(json_safe(result), out)  # after every cell: a stopped grid still has its page
        return result

    # seed-major: a grid stopped early has every variant for the seeds it finished
    for i, (seed, variant) in enumerate(((s, v) for s in seeds for v in variants), start=1):
        cell = out / variant.name / f"seed-{seed}"
        console.rule(f"[bold]{i}/{total}[/bold] {variant.name}, seed {seed}")
        overrides = {**base, **variant.overrides, "seed": seed, "out-dir": str(cell.resolve())}
        report = run_experiment(overrides, console=console)
        rows.extend(rows_from_report(variant.name, seed, report))
        site_rows.extend(cross_site_rows(variant.name, seed, report))
        cells[f"{variant.name}/seed-{seed}"] = f"{variant.name}/seed-{seed}"
        write()
    return write()["summary"]


def print_summary(summary: Sequence[Mapping], console: Console) -> None:
    """Print the summary as a rich table."""
    table = Table(title="onfh sim compare: macro metrics per report group (mean ± sd over seeds)")
    for col in ("variant", "report group", "seeds", "macro AUC", "macro accuracy", "macro F1", "detector IoU"):
        table.add_column(col)
    for s in summary:
        table.add_row(
            s["variant"],
            s["group"],
            str(s["seeds"]),
            *(
                _pm(s[k], s[f"{k}_sd"], s["seeds"])
                for k in ("macro_auc", "macro_accuracy", "macro_f1", "detector_iou_mean")
            ),
        )
    console.print(table)
