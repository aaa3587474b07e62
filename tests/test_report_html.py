"""The static HTML report: figures exist and are PNGs, tables hold the pooled metrics, ROC math, escaping."""

from __future__ import annotations

import re

import numpy as np
import pytest

from server.report import build_report
from server.report_html import format_percent, roc_from_histograms, write_report_html
from shared_models.clinical_stats import auc_from_histograms
from shared_models.metrics import stage_counts

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVIL = "<script>alert(1)</script>"


def _cases(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Random labels and informative-but-noisy softmax probabilities."""
    y = rng.integers(0, 3, size=n)
    logits = rng.normal(size=(n, 3)) + 1.5 * np.eye(3)[y]
    p = np.exp(logits)
    return y, p / p.sum(axis=1, keepdims=True)


def _site_metrics(y: np.ndarray, p: np.ndarray) -> dict:
    """A stager evaluate MetricRecord as a client sends it (flat confusion, per-stage histograms)."""
    c = stage_counts(y, p)
    m = {"num-examples": int(y.size), "confusion": np.asarray(c["confusion"]).ravel().tolist(), "macro-auc": 0.7}
    for k in range(3):
        m[f"hist-pos-{k}"] = c["hist_pos"][k]
        m[f"hist-neg-{k}"] = c["hist_neg"][k]
    return m


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    rng = np.random.default_rng(1234)
    data = {"A": _cases(rng, 40), "B": _cases(rng, 30), EVIL: _cases(rng, 25)}
    stager = {1: {s: _site_metrics(y, p) for s, (y, p) in data.items()}}
    detector = {
        1: {
            s: {
                "num-examples": int(y.size),
                "iou-mean": 0.6 + 0.1 * i,
                "center-error-mm": 3.0 + i,
                "recall30": 1.0,
                "recall50": 0.9,
                "ap50": 0.8,
                "low-confidence": i,
            }
            for i, (s, (y, _)) in enumerate(data.items())
        }
    }
    groups = {"A-test": ("A",), "external-1": ("B", EVIL), "external-2": ("D",)}  # D sent nothing: n = 0
    report = build_report(
        strategy="fedavg",
        proximal_mu=0.0,
        rounds={"detector": 1, "stager": 1},
        stager_history=stager,
        detector_history=detector,
        selected_rounds={"detector": 1, "stager": 1},
        stager_train={},
        detector_train={},
        groups=groups,
        train_sites=("A",),
        crop_source="detector",
        wall_time_s=12.5,
    )
    report["simulation"] = {"wall_time_s": 30.0, "flower_wall_time_s": 20.0, "peak_rss_bytes": 3 * 2**30}
    report["baseline_intensity_logreg"] = {"A-test": {"n": 40, "macro": {"auc": 0.55}, "weighted": {"auc": 0.5}}}
    out = tmp_path_factory.mktemp("run")
    # a training_curves.png as server.report_plots writes it (any valid PNG will do for the page)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(2, 2))
    fig.add_subplot().plot([0, 1], [0, 1])
    fig.savefig(out / "training_curves.png")
    path = write_report_html(report, out)
    return {"report": report, "data": data, "out": out, "path": path, "html": path.read_text(encoding="utf-8")}


def _group_block(page: str, group: str) -> str:
    start = page.index(f"<h3>{group} ")
    return page[start : page.index("</section>", start)]


def test_page_written_with_valid_relative_pngs(run):
    out, page = run["out"], run["html"]
    assert run["path"] == out / "report.html" and run["path"].is_file()
    srcs = re.findall(r'<img src="([^"]+)"', page)
    # 2 groups with heads x (ROC + confusion) + 3 sites' ROC + detector bar chart + training curves
    assert len(srcs) == 9
    assert "training_curves.png" in srcs
    for src in srcs:
        assert not src.startswith("/") and "://" not in src
        f = out / src
        assert f.is_file(), src
        blob = f.read_bytes()
        assert blob[:8] == PNG_MAGIC, src
        assert len(blob) > 3000, (src, len(blob))
    assert sum(s.startswith("figures/roc_") and not s.startswith("figures/roc_site_") for s in srcs) == 2
    assert sum(s.startswith("figures/confusion_") for s in srcs) == 2


def test_macro_auc_in_table_matches_independent_histogram_auc(run):
    # independent: histograms with numpy of the raw cases of the pooled group, Mann-Whitney AUC per stage
    edges = np.linspace(0, 1, 101)
    ys, ps = zip(*(run["data"][s] for s in ("B", EVIL)), strict=True)
    y, p = np.concatenate(ys), np.concatenate(ps)
    aucs = [
        auc_from_histograms(np.histogram(p[y == k, k], edges)[0], np.histogram(p[y != k, k], edges)[0])
        for k in range(3)
    ]
    expected = f"{100 * np.mean(aucs):.2f}"
    assert format_percent(np.mean(aucs)) == expected
    block = _group_block(run["html"], "external-1")
    macro_row = re.search(r"<tr class=\"avg\"><td>Macro average</td>(.*?)</tr>", block).group(1)
    cells = re.findall(r"<td>([^<]*)</td>", macro_row)
    assert len(cells) == 5
    assert cells[-1] == expected  # AUC is the last column
    # the report's own pooled value agrees, and the other groups' numbers differ
    assert format_percent(run["report"]["sites"]["external-1"]["macro"]["auc"]) == expected


def test_header_kappa_bound_and_baseline(run):
    page = run["html"]
    assert "fedavg" in page and "3.00 GiB" in page and "30.0 s" in page
    assert "detector 1 (selected round 1)" in page
    assert "AUC from 100-bin score histograms" in page and "error at most" in page
    kappa = run["report"]["sites"]["A-test"]["quadratic_kappa"]
    assert f"Quadratic-weighted kappa: {kappa:.3f}" in _group_block(page, "A-test")
    assert "macro AUC 55.00 %" in _group_block(page, "A-test")
    assert "Intensity baseline" not in _group_block(page, "external-1")


def test_empty_group_renders_no_test_heads_row(run):
    block = _group_block(run["html"], "external-2")
    assert "n = 0" in block
    assert re.search(r'<td class="empty" colspan="6">no test heads', block)
    assert "<img" not in block


def test_site_names_are_escaped(run):
    page = run["html"]
    assert EVIL not in page
    assert "<script" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_detector_table(run):
    page = run["html"]
    assert re.search(r"<tr><td>A</td><td>40</td><td>0\.600</td><td>3\.00</td><td>0\.800</td>", page)
    assert "figures/detector_iou.png" in page


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_roc_trapezoid_equals_mann_whitney_auc(seed):
    rng = np.random.default_rng(seed)
    n_bins = int(rng.integers(1, 120))
    pos = rng.integers(0, 6, size=n_bins) * (rng.random(n_bins) < 0.6)
    neg = rng.integers(0, 6, size=n_bins) * (rng.random(n_bins) < 0.6)
    pos[-1] += 1
    neg[0] += 1  # both classes present
    fpr, tpr = roc_from_histograms(pos, neg)
    assert fpr.shape == tpr.shape == (n_bins + 1,)
    assert (fpr[0], tpr[0]) == (0.0, 0.0) and (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    trap = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert trap == pytest.approx(auc_from_histograms(pos, neg), abs=1e-9)


def test_roc_hand_case():
    # bins low -> high; positives 1 in bin 2, 1 in bin 1; negatives 1 in bin 1, 1 in bin 0
    fpr, tpr = roc_from_histograms([0, 1, 1], [1, 1, 0])
    np.testing.assert_allclose(tpr, [0, 0.5, 1, 1])
    np.testing.assert_allclose(fpr, [0, 0, 0.5, 1])
    # area: pair (pos bin1, neg bin1) tied -> 1/2, other 3 pairs ordered correctly -> (3 + 0.5) / 4
    assert float(np.trapezoid(tpr, fpr)) == pytest.approx(0.875)


@pytest.mark.parametrize("pos,neg", [([0, 0], [1, 2]), ([1, 2], [0, 0]), ([1, 2], [1]), ([], []), ([1, -1], [1, 1])])
def test_roc_rejects_undefined_or_bad_input(pos, neg):
    with pytest.raises(ValueError):
        roc_from_histograms(pos, neg)


@pytest.mark.filterwarnings("ignore:.*only one label in common:UserWarning")
def test_single_stage_group_shows_na_without_crashing(tmp_path):
    y = np.zeros(10, dtype=int)
    p = np.tile([0.8, 0.1, 0.1], (10, 1))
    report = build_report(
        strategy="fedprox",
        proximal_mu=0.01,
        rounds={"stager": 1},
        stager_history={1: {"A": _site_metrics(y, p)}},
        detector_history={},
        selected_rounds={"detector": 1, "stager": 1},
        stager_train={},
        detector_train={},
        groups={"A-test": ("A",)},
        train_sites=("A",),
        crop_source="ground-truth",
        wall_time_s=1.0,
    )
    page = write_report_html(report, tmp_path).read_text()
    assert "proximal mu 0.01" in page
    assert "n/a" in _group_block(page, "A-test")  # AUC undefined with stage 0 only
    assert "No detector results" in page
    assert not (tmp_path / "figures" / "detector_iou.png").exists()


def test_page_renders_in_headless_chromium_with_every_image_loaded(run, tmp_path):
    from sim.reports.render_check import find_chromium, render_check

    if find_chromium() is None:  # .ci/run installs Debian's chromium; a bare dev machine may lack it
        pytest.skip("chromium not installed (apt-get install chromium)")
    n_img = len(re.findall(r"<img ", run["html"]))
    result = render_check(run["path"], screenshot=tmp_path / "page.png")
    assert result.images == n_img >= 5
    assert result.broken == ()
    assert "Femoral-head detector per site" in result.headings and "Compute used" in result.headings
    assert (tmp_path / "page.png").read_bytes()[:8] == PNG_MAGIC

    # a page with a missing figure is caught
    broken = run["out"] / "broken.html"
    broken.write_text(run["html"].replace('src="figures/', 'src="missing/', 1), encoding="utf-8")
    assert len(render_check(broken).broken) == 1


def test_roc_per_site_from_each_sites_own_histograms(run):
    per_site = run["report"]["per_site"]
    assert set(per_site) == {"A", "B", EVIL}
    y, p = run["data"]["B"]
    counts = stage_counts(y, p)  # B alone, not pooled with the other member of its group
    assert per_site["B"]["macro"]["auc"] == pytest.approx(
        np.mean([auc_from_histograms(counts["hist_pos"][k], counts["hist_neg"][k]) for k in range(3)])
    )
    figures = sorted(p.name for p in (run["out"] / "figures").glob("roc_site_*.png"))
    assert len(figures) == 3 and all((run["out"] / "figures" / f).read_bytes()[:8] == PNG_MAGIC for f in figures)
    assert "ROC per Ficat-Arlet stage and site" in run["html"] and "site B" in run["html"]


def test_small_stage_is_marked_unreliable_on_the_page(tmp_path):
    y = np.array([0] * 12 + [1] * 2 + [2] * 12)
    p = np.random.default_rng(3).dirichlet(np.ones(3), size=y.size)
    report = build_report(
        strategy="fedavg",
        proximal_mu=0.0,
        rounds={"detector": 1, "stager": 1},
        stager_history={1: {"D": _site_metrics(y, p)}},
        detector_history={1: {}},
        selected_rounds={"detector": 1, "stager": 1},
        stager_train={},
        detector_train={},
        groups={"external-2": ("D",)},
        train_sites=("A",),
        crop_source="detector",
        wall_time_s=1.0,
    )
    block = _group_block(write_report_html(report, tmp_path).read_text(encoding="utf-8"), "external-2")
    assert "Stage I (unreliable: too few heads)" in block and "Stage II (unreliable" not in block
    assert "Macro average (unreliable)" in block and "stage I: 2 heads" in block


def test_calibration_section_shows_ece_and_early_onfh_figures_per_site():
    from server.report_html import calibration_section

    c = {
        "chosen": {
            "temperature": 1.7,
            "detector_threshold": 0.31,
            "energy_threshold": -3.25,
            "early_threshold": 0.42,
            "detector_miss": 0.01,
            "ood_false_alarm": 0.05,
            "val_heads": 40,
        },
        "validation": {"heads": 40, "ece_before": 0.21, "ece_after": 0.06},
        "sites": {
            "B": {
                "external": True,
                "test_heads": 17,
                "ece_before": 0.234,
                "ece_after": 0.081,
                "sensitivity": 0.8,
                "specificity": 0.5294,
                "tp": 8,
                "fn": 2,
                "tn": 9,
                "fp": 8,
                "ood_flagged": 0.0588,
                "detector_flagged": 0.0,
            },
            "C": {"external": True, "test_heads": None, "suppressed": True},
        },
        "rejected": {"D": "calibrate-val: nll: expected 31 sums"},
    }
    html = calibration_section(c, min_heads=5)
    assert "T = 1.7" in html and "P(I)+P(II) &ge; 0.42" in html
    assert "<td>0.234</td><td>0.081</td><td>80.00 %</td><td>52.94 %</td><td>8 / 2 / 9 / 8</td>" in html
    assert "suppressed" in html and "calibrate-val: nll" in html
    assert "No calibration" in calibration_section({})
    assert "too few heads" not in html and "too few heads" in calibration_section({**c, "chosen": {"val_heads": 2}})
    from rich.console import Console

    from client.infer import calibration_table

    console = Console(width=200, record=True)
    console.print(calibration_table({"calibration": c}))
    text = console.export_text()
    assert "T = 1.7" in text and "B (external)" in text and "0.234" in text and "0.529" in text
    assert "suppressed" in text and calibration_table({}) is None


def test_the_serverapp_writes_the_page_and_curves_itself(run, tmp_path):
    """Deployment runs have no simulation harness after them: the ServerApp writes report.html and
    training_curves.png beside report.json (issue 18)."""
    from server.server_app import _write_pages

    report = {**run["report"], "history": {"stager_val_macro_auc": {"1": {"A": 0.7}}}}
    _write_pages(report, tmp_path)
    assert (tmp_path / "training_curves.png").read_bytes()[:8] == PNG_MAGIC
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "<h3>A-test " in page and "training_curves.png" in page
