"""Figures for the run report (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator


def _series(history: dict) -> dict[str, tuple[list[int], list[float]]]:
    """``{round: {site: value}}`` (JSON keys are strings) -> ``{site: (rounds, values)}``."""
    out: dict[str, tuple[list[int], list[float]]] = {}
    for rnd, sites in sorted(history.items(), key=lambda kv: int(kv[0])):
        for site, value in sites.items():
            if value is None:
                continue
            rounds, values = out.setdefault(site, ([], []))
            rounds.append(int(rnd))
            values.append(float(value))
    return out


def _pooled_validation(ax, report: dict, phase: str) -> None:
    """The pooled validation score the server selects on (black), the chosen round starred, and where the
    phase stopped early (``report["early_stopping"]``, :mod:`server.early_stopping`)."""
    stopping = report.get("early_stopping") or {}
    scores = {
        int(r): v for r, v in ((stopping.get("validation_score") or {}).get(phase) or {}).items() if v is not None
    }
    if not scores:
        return
    rounds = sorted(scores)
    ax.plot(rounds, [scores[r] for r in rounds], color="black", lw=2, label="pooled (selection score)")
    chosen = (report.get("selected_rounds") or {}).get(phase)
    if chosen in scores:
        ax.plot(
            [chosen], [scores[chosen]], marker="*", ms=14, color="crimson", ls="none", label=f"chosen round {chosen}"
        )
    run, most = (stopping.get("rounds_run") or {}).get(phase), (stopping.get("max_rounds") or {}).get(phase)
    if run is not None and most is not None and run < most:
        ax.axvline(run, color="crimson", ls=":", lw=1, label=f"stopped early after {run}/{most}")


def plot_training_curves(report: dict, path: Path) -> Path:
    """Per-round, per-site curves of both phases: test metric, validation score and training loss; the
    validation panels add the pooled validation score, the chosen round (star) and an early stop (dotted).

    Writes a 2 x 3 PNG grid to ``path`` (detector on top, stager below) and returns it.
    """
    hist = report["history"]
    panels = [
        ("detector_iou_mean", "detector: test IoU (mean)"),
        ("detector_val_iou", "detector: validation IoU"),
        ("detector_train_loss", "detector: training loss"),
        ("stager_macro_auc", "stager: test macro AUC"),
        ("stager_val_macro_auc", "stager: validation macro AUC"),
        ("stager_train_loss", "stager: training loss"),
    ]
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), constrained_layout=True)
    selected = report.get("selected_rounds", {})
    for ax, (key, title) in zip(axes.ravel(), panels, strict=True):
        for site, (rounds, values) in sorted(_series(hist.get(key, {})).items()):
            ax.plot(rounds, values, marker="o", ms=3, label=site)
        phase = key.split("_")[0]
        if key in ("detector_val_iou", "stager_val_macro_auc"):
            _pooled_validation(ax, report, phase)
        if phase in selected:
            ax.axvline(selected[phase], color="grey", ls="--", lw=1)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(
        f"{report['strategy']}: per-site metrics by round (dashed: selected round; black: pooled "
        "validation score the round is chosen on)"
    )
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
