"""A static HTML page of one run's ``report.json``, with PNG figures, for a reader without Python.

:func:`write_report_html` writes ``OUT/report.html`` and ``OUT/figures/*.png`` (relative links, no
JavaScript, no external resources):

- header: strategy, training sites, rounds (selected rounds), crop source, wall time, peak memory;
- per report group, a table in the layout of Yang et al., Front. Surg. 2025, Tables 1-2: one row per
  Ficat-Arlet stage (one-vs-rest) plus macro and weighted averages, columns accuracy, sensitivity,
  specificity, F1 and AUC (percent), then quadratic-weighted kappa, early ONFH (stage I or II vs 0)
  sensitivity/specificity, the AUC binning error bound and the intensity baseline's AUC if present;
- per group, one-vs-rest ROC curves of the three stages (:func:`roc_from_histograms` on the pooled
  score histograms) and the pooled confusion matrix;
- the detector per site (table and a bar chart of mean IoU);
- ``training_curves.png`` (written by :mod:`server.report_plots`) when it sits in ``out_dir``;
- compute used: wall times, rounds, peak RSS.

``report.json`` holds only aggregates (counts, histograms, metrics), never per-case data, and so
does the page. Every string taken from the report is escaped with :func:`html.escape`.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from shared_models.clinical_stats import check_histograms
from shared_models.metrics import METRIC_NAMES
from shared_models.stages import STAGE_LABELS

__all__ = ["format_percent", "roc_from_histograms", "write_compare_html", "write_report_html"]

_METRIC_TITLES = {
    "accuracy": "Accuracy",
    "sensitivity": "Sensitivity",
    "specificity": "Specificity",
    "f1": "F1",
    "auc": "AUC",
}
_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; line-height: 1.4; }
h1 { font-size: 1.5em; } h2 { font-size: 1.25em; border-bottom: 1px solid #ccc; margin-top: 2em; }
h3 { font-size: 1.05em; margin-bottom: 0.3em; }
table { border-collapse: collapse; margin: 0.5em 0 1em 0; }
th, td { border: 1px solid #bbb; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #eef; }
tr.avg td { font-weight: bold; background: #f6f6f6; }
td.empty { text-align: center; font-style: italic; color: #777; }
p.warn { color: #8a4b00; background: #fff4e0; padding: 0.3em 0.6em; }
dl.meta { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; }
dl.meta dt { font-weight: bold; } dl.meta dd { margin: 0; }
.note { color: #555; font-size: 0.9em; }
.figs { display: flex; flex-wrap: wrap; gap: 1em; }
img { max-width: 100%; border: 1px solid #ddd; }
"""


# --------------------------------------------------------------------------- ROC from histograms


def roc_from_histograms(
    pos_hist: Sequence[int] | np.ndarray, neg_hist: Sequence[int] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """One-vs-rest ROC curve from per-class score histograms on the same ordered bins.

    The decision threshold moves down from above the top bin to the lowest bin edge: at each step
    the cases of one more bin (counted from the top) are called positive, so TPR and FPR are the
    cumulative positive and negative counts from the top divided by their totals. Scores inside one
    bin are not ordered, so the curve joins consecutive thresholds with straight segments; its
    trapezoid area then equals the Mann-Whitney AUC with ties counted 1/2
    (:func:`shared_models.clinical_stats.auc_from_histograms`).

    Args:
        pos_hist: ``(B,)`` non-negative counts of the positive class per bin, bins in increasing
            score order (``stage_counts``'s ``hist_pos[k]``).
        neg_hist: ``(B,)`` counts of the negatives in the same bins (``hist_neg[k]``).

    Returns:
        ``(fpr, tpr)``: two ``(B + 1,)`` float arrays, non-decreasing, from ``(0, 0)`` to ``(1, 1)``.

    Raises:
        ValueError: shapes differ or are empty, counts negative or non-finite, or no positive or no
            negative case (the ROC curve is undefined).
    """
    hp, hn = check_histograms(pos_hist, neg_hist)
    n_pos, n_neg = hp.sum(), hn.sum()
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC undefined: {int(n_pos)} positive and {int(n_neg)} negative cases")
    tpr = np.concatenate([[0.0], np.cumsum(hp[::-1]) / n_pos])
    fpr = np.concatenate([[0.0], np.cumsum(hn[::-1]) / n_neg])
    tpr[-1] = fpr[-1] = 1.0  # exact end point despite rounding in the cumulative sum
    return fpr, tpr


def _trapezoid(fpr: np.ndarray, tpr: np.ndarray) -> float:
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2.0))


# --------------------------------------------------------------------------- formatting


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _finite(value: Any) -> bool:
    return (
        isinstance(value, (int, float, np.integer, np.floating))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def format_percent(value: Any) -> str:
    """A metric in ``[0, 1]`` as the page shows it: percent with two decimals (``0.9383 -> "93.83"``).

    ``None``/NaN (undefined, see :mod:`shared_models.metrics`) gives ``"n/a"``.
    """
    return f"{100.0 * float(value):.2f}" if _finite(value) else "n/a"


def _fmt(value: Any, spec: str, unit: str = "") -> str:
    return f"{float(value):{spec}}{unit}" if _finite(value) else "n/a"


def _fmt_bytes(n: Any) -> str:
    return f"{float(n) / 2**30:.2f} GiB" if _finite(n) else "n/a"


def _fmt_seconds(s: Any) -> str:
    if not _finite(s):
        return "n/a"
    s = float(s)
    return f"{s:.1f} s" if s < 120 else f"{s:.0f} s ({s / 60:.1f} min)"


def _slug(index: int, name: str) -> str:
    return f"{index:02d}_" + (re.sub(r"[^A-Za-z0-9_-]+", "_", name)[:40] or "group")


# --------------------------------------------------------------------------- figures


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path


def _roc_figure(group: str, counts: Mapping[str, Any], path: Path) -> Path | None:
    hp = np.asarray(counts.get("hist_pos", []), dtype=np.float64)
    hn = np.asarray(counts.get("hist_neg", []), dtype=np.float64)
    if hp.ndim != 2 or hp.shape != hn.shape or hp.shape[0] != len(STAGE_LABELS):
        return None
    fig = Figure(figsize=(5, 5), layout="constrained")
    ax = fig.add_subplot()
    drawn = 0
    for k, label in enumerate(STAGE_LABELS):
        try:
            fpr, tpr = roc_from_histograms(hp[k], hn[k])
        except ValueError:
            ax.plot([], [], label=f"stage {label}: undefined (one class only)")
            continue
        ax.plot(fpr, tpr, lw=1.8, label=f"stage {label} vs rest: AUC {_trapezoid(fpr, tpr):.3f}")
        drawn += 1
    if not drawn:
        return None
    ax.plot([0, 1], [0, 1], color="grey", ls=":", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_aspect("equal")
    ax.set_xlabel("1 - specificity (false-positive rate)")
    ax.set_ylabel("sensitivity (true-positive rate)")
    ax.set_title(f"{group}: ROC per Ficat-Arlet stage (n={int(hp[0].sum() + hn[0].sum())})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def _confusion_figure(group: str, confusion: Any, path: Path) -> Path | None:
    conf = np.asarray(confusion, dtype=np.int64)
    if conf.shape != (len(STAGE_LABELS), len(STAGE_LABELS)):
        return None
    fig = Figure(figsize=(4.2, 3.8), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(conf, cmap="Blues", vmin=0, vmax=max(int(conf.max()), 1))
    fig.colorbar(im, ax=ax, shrink=0.8, label="heads")
    half = max(int(conf.max()), 1) / 2.0
    for i in range(conf.shape[0]):
        for j in range(conf.shape[1]):
            ax.text(
                j,
                i,
                str(int(conf[i, j])),
                ha="center",
                va="center",
                fontsize=12,
                color="white" if conf[i, j] > half else "black",
            )
    ticks = range(len(STAGE_LABELS))
    ax.set_xticks(ticks, STAGE_LABELS)
    ax.set_yticks(ticks, STAGE_LABELS)
    ax.set_xlabel("predicted stage")
    ax.set_ylabel("true stage")
    ax.set_title(f"{group}: confusion matrix", fontsize=10)
    return _save(fig, path)


def _detector_figure(detector: Mapping[str, Mapping[str, Any]], path: Path) -> Path | None:
    sites = [s for s, m in detector.items() if _finite(m.get("iou_mean"))]
    if not sites:
        return None
    values = [float(detector[s]["iou_mean"]) for s in sites]
    fig = Figure(figsize=(max(4.0, 0.8 * len(sites) + 2), 3.5), layout="constrained")
    ax = fig.add_subplot()
    bars = ax.bar(range(len(sites)), values, color="#4c72b0")
    ax.bar_label(bars, labels=[f"{v:.2f}" for v in values], fontsize=8)
    ax.set_xticks(range(len(sites)), sites)
    ax.set_ylim(0, 1.05)
    ax.axhline(0.5, color="grey", ls="--", lw=1)
    ax.set_ylabel("mean 3D IoU")
    ax.set_title("Detector: mean IoU per site\n(dashed: IoU 0.5)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


# --------------------------------------------------------------------------- HTML sections


def _img(path: Path, out_dir: Path, alt: str) -> str:
    return f'<img src="{_esc(path.relative_to(out_dir).as_posix())}" alt="{_esc(alt)}">'


def _header(report: Mapping[str, Any]) -> str:
    strategy = str(report.get("strategy", "n/a"))
    if report.get("proximal_mu") is not None:
        strategy += f" (proximal mu {report['proximal_mu']})"
    rounds, selected = report.get("rounds") or {}, report.get("selected_rounds") or {}
    round_text = ", ".join(f"{phase} {n} (selected round {selected.get(phase, 'n/a')})" for phase, n in rounds.items())
    sim = report.get("simulation") or {}
    wall = sim.get("wall_time_s", report.get("wall_time_s"))
    rows = [
        ("Strategy", strategy),
        ("Training sites", ", ".join(map(str, report.get("train_sites") or [])) or "n/a"),
        ("Rounds", round_text or "n/a"),
        ("Crop source", report.get("crop_source", "n/a")),
        ("Wall time", _fmt_seconds(wall)),
        ("Peak memory (RSS)", _fmt_bytes(sim.get("peak_rss_bytes"))),
    ]
    items = "\n".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v)}</dd>" for k, v in rows)
    return f'<dl class="meta">\n{items}\n</dl>'


def _metric_row(name: str, metrics: Mapping[str, Any], css: str = "") -> str:
    cls = f' class="{css}"' if css else ""
    cells = "".join(f"<td>{format_percent(metrics.get(m))}</td>" for m in METRIC_NAMES)
    return f"<tr{cls}><td>{_esc(name)}</td>{cells}</tr>"


def suppressed_text(min_heads: Any) -> str:
    """How the report names figures a site withheld as a small cell (``client.tasks.suppress_small_cells``)."""
    return f"suppressed (< {min_heads} heads)"


def _group_section(
    index: int,
    group: str,
    g: Mapping[str, Any],
    baseline: Mapping[str, Any] | None,
    fig_dir: Path,
    out_dir: Path,
    min_heads: Any = 5,
) -> str:
    n = int(g.get("n") or 0)
    sites = ", ".join(map(str, g.get("sites") or []))
    suppressed = g.get("suppressed") or {}
    withheld = (
        "; ".join(f"site {s}: {suppressed_text(min_heads)}, {k} heads not pooled" for s, k in suppressed.items())
        if suppressed
        else ""
    )
    head = "".join(f"<th>{_METRIC_TITLES[m]} (%)</th>" for m in METRIC_NAMES)
    parts = [
        '<section class="group">',
        f"<h3>{_esc(group)} (sites: {_esc(sites or 'none')}; n = {n} femoral heads)</h3>",
        f"<table>\n<thead><tr><th>Ficat-Arlet stage</th>{head}</tr></thead>\n<tbody>",
    ]
    if n == 0:
        missing = g.get("missing") or []
        why = f" (no result from: {', '.join(map(str, missing))})" if missing else ""
        text = withheld if suppressed else f"no test heads{why}"
        parts.append(
            f'<tr><td class="empty" colspan="{len(METRIC_NAMES) + 1}">'
            f"{_esc(text)}</td></tr>\n</tbody></table>\n</section>"
        )
        return "\n".join(parts)
    per_stage = g.get("per_stage") or {}
    small = g.get("small_n") or {}
    weak = set(small.get("unreliable_stages") or [])
    for label in STAGE_LABELS:
        parts.append(
            _metric_row(
                f"Stage {label}" + (" (unreliable: too few heads)" if label in weak else ""), per_stage.get(label) or {}
            )
        )
    parts.append(
        _metric_row("Macro average" + (" (unreliable)" if small.get("unreliable") else ""), g.get("macro") or {}, "avg")
    )
    parts.append(_metric_row("Weighted average", g.get("weighted") or {}, "avg"))
    parts.append("</tbody></table>")
    if withheld:
        parts.append(f'<p class="note">{_esc(withheld)}; the figures above are exact for the other sites.</p>')

    early = g.get("early_onfh") or {}
    if small.get("reasons"):
        parts.append(
            '<p class="warn"><strong>Unreliable, too few heads:</strong> '
            + "; ".join(_esc(r) for r in small["reasons"])
            + ".</p>"
        )
    facts = [
        f"Quadratic-weighted kappa: {_fmt(g.get('quadratic_kappa'), '.3f')}",
        (
            f"Early ONFH (stage I or II vs stage 0): sensitivity {format_percent(early.get('sensitivity'))} %, "
            f"specificity {format_percent(early.get('specificity'))} %"
        ),
    ]
    bounds = g.get("auc_bin_error_bound") or {}
    counts = g.get("counts") or {}
    if bounds:
        n_bins = counts.get("n_bins", "binned")
        per = ", ".join(f"stage {label} {_fmt(bounds.get(label), '.4f')}" for label in STAGE_LABELS)
        finite = [float(bounds[label]) for label in STAGE_LABELS if _finite(bounds.get(label))]
        macro_bound = f"; macro AUC error at most {np.mean(finite):.4f}" if finite else ""
        facts.append(
            f"AUC from {n_bins}-bin score histograms pooled over sites, error at most (in AUC units) {per}{macro_bound}"
        )
    if baseline:
        facts.append(
            "Intensity baseline (logistic regression on intensity statistics of the ground-truth head box, same split): macro AUC "
            f"{format_percent((baseline.get('macro') or {}).get('auc'))} %, weighted AUC "
            f"{format_percent((baseline.get('weighted') or {}).get('auc'))} %"
        )
    parts.append("<ul>" + "".join(f"<li>{_esc(f)}</li>" for f in facts) + "</ul>")

    figs = []
    slug = _slug(index, group)
    if counts:
        roc = _roc_figure(group, counts, fig_dir / f"roc_{slug}.png")
        if roc is not None:
            figs.append(_img(roc, out_dir, f"ROC curves, {group}"))
        if "confusion" in counts:
            cm = _confusion_figure(group, counts["confusion"], fig_dir / f"confusion_{slug}.png")
            if cm is not None:
                figs.append(_img(cm, out_dir, f"confusion matrix, {group}"))
    if figs:
        parts.append('<div class="figs">' + "".join(figs) + "</div>")
    else:
        parts.append('<p class="note">No pooled counts in this report: no ROC or confusion figure.</p>')
    parts.append("</section>")
    return "\n".join(parts)


def _detector_section(
    detector: Mapping[str, Mapping[str, Any]], fig_dir: Path, out_dir: Path, min_heads: Any = 5
) -> str:
    if not detector:
        return "<p>No detector results in this report.</p>"
    head = (
        "<tr><th>Site</th><th>n</th><th>Mean IoU</th><th>Centre error (mm, median)</th><th>AP50</th>"
        "<th>Recall IoU&ge;0.3</th><th>Recall IoU&ge;0.5</th><th>Low-confidence boxes</th></tr>"
    )
    rows = []
    for site, m in detector.items():
        if m.get("suppressed"):
            rows.append(
                f"<tr><td>{_esc(site)}</td><td>{_esc(m.get('n', 0))}</td>"
                f'<td class="empty" colspan="6">{_esc(suppressed_text(min_heads))}</td></tr>'
            )
            continue
        rows.append(
            f"<tr><td>{_esc(site)}</td><td>{_esc(m.get('n', 0))}</td>"
            f"<td>{_fmt(m.get('iou_mean'), '.3f')}</td><td>{_fmt(m.get('center_error_mm'), '.2f')}</td>"
            f"<td>{_fmt(m.get('ap50'), '.3f')}</td><td>{format_percent(m.get('recall30'))} %</td>"
            f"<td>{format_percent(m.get('recall50'))} %</td><td>{_esc(m.get('low_confidence', 'n/a'))}</td></tr>"
        )
    out = f"<table>\n<thead>{head}</thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody></table>"
    bar = _detector_figure(detector, fig_dir / "detector_iou.png")
    if bar is not None:
        out += "\n" + _img(bar, out_dir, "mean detector IoU per site")
    return out


def calibration_section(c: Mapping[str, Any], min_heads: Any = 5) -> str:
    """Issue 17: the validation-chosen calibration, and per site ECE before/after temperature scaling and
    early-ONFH sensitivity/specificity at the validation-chosen threshold (test heads)."""
    if not c:
        return "<p>No calibration in this report (a run from before issue 17).</p>"
    ch = c.get("chosen") or {}
    val = c.get("validation") or {}
    out = (
        f"<p>Chosen on {_esc(ch.get('val_heads', 0))} validation heads of the training sites: temperature "
        f"T = {_fmt(ch.get('temperature'), '.3g')}; detector threshold {_fmt(ch.get('detector_threshold'), '.2f')} "
        f"(keeps {format_percent(1 - float(ch.get('detector_miss', 0.01)))} % of validation boxes with IoU &ge; 0.5); "
        f"out-of-distribution energy threshold {_esc(ch.get('energy_threshold'))} "
        f"(false-alarm rate &le; {format_percent(ch.get('ood_false_alarm', 0.05))} % on validation heads); "
        f"early-ONFH threshold P(I)+P(II) &ge; {_fmt(ch.get('early_threshold'), '.2f')} (Youden's J on validation). "
        f"Validation ECE {_fmt(val.get('ece_before'), '.3f')} before, {_fmt(val.get('ece_after'), '.3f')} after "
        "temperature scaling.</p>"
    )
    if int(ch.get("val_heads") or 0) < 30:
        out += (
            '\n<p class="note">Fewer than 30 validation heads: these thresholds and the temperature rest on '
            "too few heads to be trusted.</p>"
        )
    head = (
        "<tr><th>Site</th><th>External</th><th>Test heads</th><th>ECE before</th><th>ECE after</th>"
        "<th>Early-ONFH sensitivity</th><th>Early-ONFH specificity</th><th>TP / FN / TN / FP</th>"
        "<th>Flagged out of distribution</th><th>Box below detector threshold</th></tr>"
    )
    rows = []
    for site, m in (c.get("sites") or {}).items():
        if m.get("suppressed"):
            rows.append(
                f"<tr><td>{_esc(site)}</td><td>{'yes' if m.get('external') else 'no'}</td><td>n/a</td>"
                f'<td class="empty" colspan="7">{_esc(suppressed_text(min_heads))}</td></tr>'
            )
            continue
        counts = " / ".join(_esc(m.get(k, "n/a")) for k in ("tp", "fn", "tn", "fp"))
        rows.append(
            f"<tr><td>{_esc(site)}</td><td>{'yes' if m.get('external') else 'no'}</td>"
            f"<td>{_esc(m.get('test_heads'))}</td><td>{_fmt(m.get('ece_before'), '.3f')}</td>"
            f"<td>{_fmt(m.get('ece_after'), '.3f')}</td><td>{format_percent(m.get('sensitivity'))} %</td>"
            f"<td>{format_percent(m.get('specificity'))} %</td><td>{counts}</td>"
            f"<td>{format_percent(m.get('ood_flagged'))} %</td><td>{format_percent(m.get('detector_flagged'))} %</td></tr>"
        )
    out += f"\n<table>\n<thead>{head}</thead>\n<tbody>\n" + "\n".join(rows) + "\n</tbody></table>"
    if c.get("rejected"):
        out += (
            "\n<p>Calibration aggregates rejected: "
            + _esc("; ".join(f"{k}: {v}" for k, v in c["rejected"].items()))
            + "</p>"
        )
    return out


def _compute_section(report: Mapping[str, Any]) -> str:
    sim = report.get("simulation") or {}
    rounds = report.get("rounds") or {}
    rows = [
        ("Total wall time (simulation, with caches and baseline)", _fmt_seconds(sim.get("wall_time_s"))),
        ("Flower simulation wall time", _fmt_seconds(sim.get("flower_wall_time_s"))),
        ("Server wall time (both phases)", _fmt_seconds(report.get("wall_time_s"))),
        ("Rounds", ", ".join(f"{k}: {v}" for k, v in rounds.items()) or "n/a"),
        *(
            (
                f"Sent per {phase} round (model {_fmt(t.get('model_bytes', 0) / 2**20, '.2f', ' MiB')} x "
                f"{t.get('transfers_per_round', 'n/a')} transfers)",
                _fmt(t.get("bytes_per_round", 0) / 2**20, ".1f", " MiB"),
            )
            for phase, t in (report.get("transfer") or {}).items()
        ),
        ("Peak resident memory (RSS)", _fmt_bytes(sim.get("peak_rss_bytes"))),
    ]
    return (
        "<table><tbody>"
        + "".join(f"<tr><td>{_esc(k)}</td><td>{_esc(v)}</td></tr>" for k, v in rows)
        + "</tbody></table>"
    )


def _exact_section(exact: Mapping[str, Any]) -> str:
    groups = {g: r for g, r in exact.items() if isinstance(r, Mapping) and "auc" in r}
    if not groups:
        return ""
    names = {
        "macro_auc": "Macro AUC",
        "macro_accuracy": "Macro accuracy",
        "quadratic_kappa": "Quadratic kappa",
        "early_onfh_auc": "Early ONFH AUC (I or II vs 0)",
    }
    rows = []
    for g, r in groups.items():
        for name, title in names.items():
            c = (r.get("ci") or {}).get(name) or {}
            rows.append(
                f"<tr><td>{_esc(g)}</td><td>{_esc(title)}</td><td>{_fmt(c.get('point'), '.3f')}</td>"
                f"<td>{_fmt(c.get('low'), '.3f')} to {_fmt(c.get('high'), '.3f')}</td>"
                f"<td>{_esc(c.get('n_patients', 'n/a'))}</td></tr>"
            )
    ci_table = (
        "<table><thead><tr><th>test group</th><th>metric</th><th>point</th><th>95 % CI (bootstrap over "
        "patients)</th><th>patients</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>"
    )
    rows = []
    for g, r in groups.items():
        for stage, a in (r.get("auc") or {}).items():
            ok = a.get("within_bound")
            rows.append(
                f"<tr><td>{_esc(g)}</td><td>{_esc(stage)}</td><td>{_fmt(a.get('exact'), '.4f')}</td>"
                f"<td>{_fmt(a.get('histogram'), '.4f')}</td><td>{_fmt(a.get('abs_error'), '.4f')}</td>"
                f"<td>{_fmt(a.get('bound'), '.4f')}</td><td>{'yes' if ok else 'n/a' if ok is None else 'NO'}</td></tr>"
            )
    auc_table = (
        "<table><thead><tr><th>test group</th><th>stage</th><th>exact AUC</th><th>histogram AUC</th>"
        "<th>|difference|</th><th>stated bound</th><th>within bound</th></tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
    )
    readers = ""
    if exact.get("readers"):
        reader_rows = "".join(
            f"<tr><td>{_esc(r.get('reader'))}</td><td>{_esc(r.get('n'))}</td><td>{format_percent(r.get('reader_accuracy'))}</td>"
            f"<td>{format_percent(r.get('model_accuracy'))}</td><td>{_esc(r.get('b'))}</td><td>{_esc(r.get('c'))}</td>"
            f"<td>{_fmt(r.get('p_value'), '.4f')}</td><td>{_esc(r.get('method'))}</td></tr>"
            for r in exact["readers"]
        )
        readers = (
            "<h3>The model against readers (layout of Table 3; simulated readers)</h3>"
            '<p class="note">All test heads. b: model right, reader wrong; c: model wrong, reader right; '
            "McNemar's test (exact binomial when b + c &lt; 25). The readers are simulated with a fixed "
            "accuracy to exercise the path; use <code>onfh report readers</code> with real reader calls.</p>"
            "<table><thead><tr><th>reader</th><th>heads</th><th>reader accuracy (%)</th><th>model accuracy (%)"
            "</th><th>b</th><th>c</th><th>p</th><th>test</th></tr></thead><tbody>" + reader_rows + "</tbody></table>"
        )
    return (
        '<p class="note">Simulation only: the harness holds every site\'s data, so it re-predicts each test '
        "head with the bundle's models. A federation sees only the counts above.</p>"
        + ci_table
        + "<h3>Histogram AUC against the exact AUC</h3>"
        + auc_table
        + readers
    )


# --------------------------------------------------------------------------- page


def write_report_html(report: Mapping[str, Any], out_dir: Path) -> Path:
    """Write ``out_dir/report.html`` and its figures (``out_dir/figures/*.png``) from a run report.

    Args:
        report: the ``report.json`` dict (:func:`server.report.build_report`, plus
            ``baseline_intensity_logreg`` and ``simulation`` from :func:`sim.experiments.experiment.run_experiment`
            when present; both optional). Undefined metrics (``None``/NaN) show as ``n/a``; a report
            group with ``n = 0`` shows a "no test heads" row; a site that withheld its figures as a
            small cell shows "suppressed (< min-cell-heads heads)".
        out_dir: the run's folder; ``training_curves.png`` there is embedded when it exists.

    Returns:
        The path of ``report.html``.
    """
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    baselines = report.get("baseline_intensity_logreg") or {}
    sections = [
        f"<h1>ONFH-FL run report: Ficat-Arlet staging of early ONFH ({_esc(report.get('strategy', 'n/a'))})</h1>",
        _header(report),
        "<h2>Staging results per test group</h2>",
        (
            '<p class="note">Per stage one-vs-rest, in percent, layout of Yang et al., Front. Surg. 2025, '
            "Tables 1-2. Accuracy, sensitivity, specificity and F1 are exact (pooled confusion matrix); "
            "AUC is computed from the pooled score histograms (bound below). n/a: undefined "
            "(stage absent or only stage present).</p>"
        ),
    ]
    for i, (group, g) in enumerate((report.get("sites") or {}).items()):
        sections.append(
            _group_section(
                i,
                str(group),
                g or {},
                baselines.get(group),
                fig_dir,
                out_dir,
                min_heads=report.get("min_cell_heads", 5),
            )
        )
    per_site = {s: m for s, m in (report.get("per_site") or {}).items() if (m or {}).get("counts")}
    roc_files = [
        _roc_figure(f"site {s}", m["counts"], fig_dir / f"roc_site_{_slug(i, str(s))}.png")
        for i, (s, m) in enumerate(per_site.items())
    ]
    site_rocs = [_img(f, out_dir, f"ROC per stage, site {s}") for f, s in zip(roc_files, per_site) if f is not None]
    if site_rocs:
        sections += [
            "<h2>ROC per Ficat-Arlet stage and site</h2>",
            '<p class="note">Each site\'s own test heads, from its own score histograms.</p>',
            '<div class="figs">' + "\n".join(site_rocs) + "</div>",
        ]
    exact = _exact_section(report.get("exact_check") or {})
    if exact:
        sections += ["<h2>Confidence intervals and the exact AUC</h2>", exact]
    sections += [
        "<h2>Femoral-head detector per site</h2>",
        _detector_section(report.get("detector") or {}, fig_dir, out_dir, report.get("min_cell_heads", 5)),
    ]
    sections += [
        "<h2>Calibration on the validation split (issue 17)</h2>",
        calibration_section(report.get("calibration") or {}, report.get("min_cell_heads", 5)),
    ]
    curves = out_dir / "training_curves.png"
    if curves.is_file():
        sections += ["<h2>Learning curves per round and site</h2>", _img(curves, out_dir, "training curves")]
    sections += [
        "<h2>Compute used</h2>",
        _compute_section(report),
        '<p class="note">Aggregates only: this page and report.json hold no per-patient data.</p>',
    ]
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>ONFH-FL report ({_esc(report.get('strategy', 'n/a'))})</title>\n<style>{_CSS}</style>\n"
        "</head>\n<body>\n" + "\n".join(sections) + "\n</body>\n</html>\n"
    )
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- grid page (onfh sim compare)


def _pm_ci(s: Mapping[str, Any], key: str) -> str:
    mean: Any = s.get(key)  # numbers read from compare.json
    sd: Any = s.get(f"{key}_sd")
    ci: Any = s.get(f"{key}_ci") or [None, None]
    if not _finite(mean):
        return "n/a"
    text = f"{float(mean):.3f}"
    if int(s.get("seeds", 1)) > 1:
        text += f" ± {float(sd):.3f}"
        if _finite(ci[0]) and _finite(ci[1]):
            text += f" [{float(ci[0]):.3f}, {float(ci[1]):.3f}]"
    return text


def _grid_bar_figure(summary: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    groups = list(dict.fromkeys(str(s["group"]) for s in summary))
    variants = list(dict.fromkeys(str(s["variant"]) for s in summary))
    if not groups or not variants:
        return None
    by = {(str(s["variant"]), str(s["group"])): s for s in summary}
    fig = Figure(figsize=(max(5.0, 1.4 * len(groups) * max(1, len(variants)) / 2), 3.6))
    ax = fig.add_subplot()
    width = 0.8 / len(variants)
    x = np.arange(len(groups))
    for i, v in enumerate(variants):
        means = [
            float(by[(v, g)]["macro_auc"]) if (v, g) in by and _finite(by[(v, g)]["macro_auc"]) else np.nan
            for g in groups
        ]
        errs: list[list[float]] = [[], []]
        for g, m in zip(groups, means):
            ci = (by.get((v, g)) or {}).get("macro_auc_ci") or [None, None]
            ok = _finite(ci[0]) and _finite(ci[1]) and _finite(m)
            errs[0].append(m - float(ci[0]) if ok else 0.0)
            errs[1].append(float(ci[1]) - m if ok else 0.0)
        ax.bar(x + (i - (len(variants) - 1) / 2) * width, means, width, yerr=errs, capsize=3, label=v)
    ax.set_xticks(x, groups)
    ax.set_ylabel("macro AUC")
    ax.set_ylim(0.0, 1.05)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.legend(fontsize=7, ncols=min(4, len(variants)), loc="lower right")
    seeds = max(int(s.get("seeds", 1)) for s in summary)
    ax.set_title("Macro AUC per test group" + (f" (mean over {seeds} seeds, 95 % CI)" if seeds > 1 else " (one seed)"))
    fig.tight_layout()
    return _save(fig, path)


def _cross_site_figure(matrix: Mapping[str, Mapping[str, float]], path: Path) -> Path | None:
    variants = list(matrix)
    sites = sorted({s for row in matrix.values() for s in row})
    if not variants or not sites:
        return None
    values = np.array([[matrix[v].get(s, np.nan) for s in sites] for v in variants], dtype=np.float64)
    fig = Figure(figsize=(max(5.5, 1.6 + 0.9 * len(sites)), 1.4 + 0.45 * len(variants)))
    ax = fig.add_subplot()
    image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(sites)), [f"{s} test" for s in sites])
    ax.set_yticks(range(len(variants)), variants)
    for (i, j), v in np.ndenumerate(values):
        if np.isfinite(v):
            ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.8 else "black", fontsize=8)
    fig.colorbar(image, ax=ax, label="macro AUC")
    ax.set_title("Cross-site matrix: model (row) at site (column)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def write_compare_html(result: Mapping[str, Any], out_dir: Path) -> Path:
    """Write ``out_dir/report.html`` for an ``onfh sim compare`` grid (``compare.json``'s dict).

    Holds: the variants and their run-config overrides; per (variant, test group) the macro AUC,
    accuracy and F1 as mean ± sd over seeds with the 95 % Student-t interval of the mean; a bar chart of
    macro AUC with those intervals; the cross-site matrix (every variant's model evaluated at every
    site, mean macro AUC over seeds) as a heatmap; links to every cell's own ``report.html``.

    Returns:
        The path of the page.
    """
    out_dir = Path(out_dir)
    fig_dir = out_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    summary = result.get("summary") or []
    seeds = result.get("seeds") or []
    sections = [
        "<h1>ONFH-FL comparison: Ficat-Arlet staging across variants and seeds</h1>",
        f'<p class="note">Seeds: {_esc(", ".join(map(str, seeds)) or "n/a")}. Mean ± sample sd over seeds '
        "[95 % Student-t interval of the mean]. Every variant uses the same patient splits per seed.</p>",
        "<h2>Variants</h2><table><thead><tr><th>variant</th><th>run-config overrides</th></tr></thead><tbody>",
    ]
    for name, overrides in (result.get("variants") or {}).items():
        text = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "(the base configuration)"
        sections.append(f"<tr><td>{_esc(name)}</td><td>{_esc(text)}</td></tr>")
    sections.append("</tbody></table>")
    sections += [
        "<h2>Macro metrics per test group</h2>",
        "<table><thead><tr><th>variant</th><th>test group</th><th>seeds</th><th>macro AUC</th>"
        "<th>macro accuracy</th><th>macro F1</th><th>detector IoU</th></tr></thead><tbody>",
    ]
    for s in summary:
        sections.append(
            f"<tr><td>{_esc(s['variant'])}</td><td>{_esc(s['group'])}</td><td>{_esc(s['seeds'])}</td>"
            + "".join(
                f"<td>{_esc(_pm_ci(s, k))}</td>"
                for k in ("macro_auc", "macro_accuracy", "macro_f1", "detector_iou_mean")
            )
            + "</tr>"
        )
    sections.append("</tbody></table>")
    bar = _grid_bar_figure(summary, fig_dir / "grid_macro_auc.png")
    if bar is not None:
        sections.append(_img(bar, out_dir, "macro AUC per test group and variant"))
    matrix = (result.get("cross_site") or {}).get("macro_auc") or {}
    heat = _cross_site_figure(matrix, fig_dir / "cross_site_macro_auc.png")
    if heat is not None:
        sections += [
            "<h2>Cross-site matrix</h2>",
            "<p class=\"note\">Each row is one variant's selected model (for local-&lt;site&gt;, that site's "
            "own model), evaluated at every site on its test heads through Flower evaluate messages; only "
            "counts and histograms came back. Mean macro AUC over seeds.</p>",
            _img(heat, out_dir, "cross-site matrix of macro AUC"),
        ]
    cells = result.get("cells") or {}
    if cells:
        links = "".join(
            f'<li><a href="{_esc(Path(p, "report.html").as_posix())}">{_esc(name)}</a></li>'
            for name, p in cells.items()
        )
        sections += ["<h2>Runs</h2>", f"<ul>{links}</ul>"]
    page = (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>ONFH-FL comparison</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(sections)
        + "\n</body>\n</html>\n"
    )
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
