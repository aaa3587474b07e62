"""Simulation only: the run's figures recomputed from per-head predictions, which a federation never sees.

In a federation the server gets counts and binned score histograms, and its AUC is the histogram
AUC with a stated worst-case binning error (:func:`shared_models.clinical_stats.auc_bin_error_bound`).
In simulation the harness holds every site's data, so it can check that claim: it loads the signed
bundle (the selected round's models, as the report), predicts every test head of every report group
with the stager on the same cached crops the sites used, and records

* the exact per-stage AUC (scikit-learn, :func:`shared_models.metrics.stage_metrics`) next to the
  report's histogram AUC and its bound, and whether the difference lies within the bound;
* whether the pooled confusion matrix equals the report's (it must: same model, same crops);
* 95 % confidence intervals by percentile bootstrap over **patients** (both heads of a patient
  stay together; :func:`shared_models.clinical_stats.bootstrap_ci`) of macro AUC, macro accuracy,
  quadratic-weighted kappa and early-ONFH AUC (stage I or II vs 0), per report group.

It also writes ``OUT/exact/predictions.csv`` (patient_id as ``<site>/<patient_id>``, side, stage, predicted_stage, site,
group): phantom patients only, for ``onfh report readers``; and, to exercise the paper's Table 3
path end to end, compares the model with two **simulated** readers of fixed accuracy
(:data:`SIMULATED_READERS`, :func:`sim.reports.readers.simulate_readers`) on the same heads with McNemar's
test. Nothing here runs in deployment.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from shared_models.safe_csv import SafeDictWriter
from shared_models.stages import STAGE_LABELS

log = logging.getLogger(__name__)

N_BOOT = 1000

# Accuracy of each simulated reader (probability of the right Ficat-Arlet stage per head). Yang et al.
# 2025, Table 3, compare the model with readers of different experience; these stand in for them.
SIMULATED_READERS = {"simulated reader, 70 % accurate": 0.70, "simulated reader, 85 % accurate": 0.85}


def _bundle_public_key(out: Path, signing_key: str) -> Path:
    return Path(signing_key + ".pub") if signing_key else out / "keys" / "bundle-signing-key.pem.pub"


def _auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney U statistic over ``n_pos x n_neg`` (scipy.stats.mannwhitneyu; ties count
    1/2, as in sklearn's ``roc_auc_score``); NaN when a class is absent. About 10x faster than sklearn,
    which matters for 1000 bootstrap resamples."""
    from scipy.stats import mannwhitneyu

    n_pos = int(positive.sum())
    n_neg = positive.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    u = mannwhitneyu(score[positive], score[~positive], method="asymptotic", use_continuity=False).statistic
    return float(u) / (n_pos * n_neg)


def _macro_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Mean one-vs-rest AUC over the stages where it is defined (paper section 2.7's macro average,
    as :func:`shared_models.metrics.stage_metrics`)."""
    values = [v for k in range(p.shape[1]) if math.isfinite(v := _auc(y == k, p[:, k]))]
    return float(np.mean(values)) if values else math.nan


def _macro_accuracy(y: np.ndarray, p: np.ndarray) -> float:
    """Mean one-vs-rest accuracy over the stages ``(tp + tn) / n`` (as ``stage_metrics``)."""
    pred = p.argmax(axis=1)
    return float(np.mean([np.mean((y == k) == (pred == k)) for k in range(p.shape[1])]))


def _kappa(y: np.ndarray, p: np.ndarray) -> float:
    from shared_models.clinical_stats import quadratic_weighted_kappa

    return quadratic_weighted_kappa(y, p.argmax(axis=1))


def _early_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Early ONFH (stage I or II) against stage 0, scored ``P(I) + P(II)`` (as ``early_onfh_binary``)."""
    return _auc(y != 0, p[:, 1] + p[:, 2])


CI_METRICS = {
    "macro_auc": _macro_auc,
    "macro_accuracy": _macro_accuracy,
    "quadratic_kappa": _kappa,
    "early_onfh_auc": _early_auc,
}


def group_check(
    y: np.ndarray, probs: np.ndarray, patients: np.ndarray, reported: Mapping, *, n_boot: int = N_BOOT, seed: int = 0
) -> dict:
    """Exact metrics, histogram-AUC check and patient-bootstrap CIs of one report group.

    Args:
        y: ``(N,)`` int64 Ficat-Arlet class indices of the group's test heads.
        probs: ``(N, 3)`` float32 stager probabilities.
        patients: ``(N,)`` patient ids (the bootstrap's clusters).
        reported: the group's entry of ``report.json`` ``sites`` (pooled counts and metrics).
        n_boot: bootstrap resamples.

    Returns:
        ``{"n", "confusion_matches", "auc": {stage: {"exact", "histogram", "bound", "abs_error",
        "within_bound"}}, "ci": {metric: {"point", "low", "high", "n_patients", "n_skipped"}}}``.
    """
    from shared_models.clinical_stats import bootstrap_ci
    from shared_models.metrics import stage_counts, stage_metrics

    exact = stage_metrics(y, probs)
    confusion = np.asarray(stage_counts(y, probs)["confusion"])
    reported_confusion = np.asarray((reported.get("counts") or {}).get("confusion", []))
    auc = {}
    for label in STAGE_LABELS:
        e = exact["per_stage"][label]["auc"]
        h = reported.get("per_stage", {}).get(label, {}).get("auc")
        b = (reported.get("auc_bin_error_bound") or {}).get(label)
        defined = all(v is not None and math.isfinite(float(v)) for v in (e, h, b))
        auc[label] = {
            "exact": e,
            "histogram": h,
            "bound": b,
            "abs_error": abs(float(e) - float(h)) if defined else None,
            "within_bound": bool(abs(float(e) - float(h)) <= float(b) + 1e-12) if defined else None,
        }
    ci = {}
    for name, fn in CI_METRICS.items():
        result = bootstrap_ci(patients, y, probs, fn, n_boot=n_boot, seed=seed)
        real = result.n_patients >= 2  # one patient resamples to itself: no interval
        ci[name] = {
            "point": result.point,
            "low": result.low if real else None,
            "high": result.high if real else None,
            "n_patients": result.n_patients,
            "n_skipped": result.n_skipped,
        }  # n_skipped: resamples
    return {
        "n": int(y.size),
        "confusion_matches": bool(
            confusion.shape == reported_confusion.shape and np.array_equal(confusion, reported_confusion)
        ),
        "auc": auc,
        "ci": ci,
    }


def exact_check(cfg, out: Path, sites: Mapping, report: Mapping, *, n_boot: int = N_BOOT) -> dict:
    """Recompute the report's stager figures from per-head predictions (see the module docstring).

    Args:
        cfg: the run's :class:`~shared_models.config.RunConfig`.
        out: the run folder (holds ``bundle/`` and ``report.json``).
        sites: ``{site_id: SiteData}`` of every site, opened with the run's config.
        report: the run's ``report.json`` dict.

    Returns:
        ``{group: group_check(...)}`` for every report group with test heads, plus
        ``"all_within_bound"`` (bool) and ``"max_abs_error"`` (float) over groups and stages.

    Raises:
        shared_models.bundle.BundleError: the bundle does not verify.
        FileNotFoundError: a site lacks the crops the run made (cache removed).
    """
    import torch

    from client import tasks
    from client.stager_training import predict_stages
    from shared_models.bundle import load_bundle
    from shared_models.device import select_device

    bundle = load_bundle(out / "bundle", public_key=_bundle_public_key(out, cfg.signing_key))
    detector_state = {k: v.detach().cpu() for k, v in bundle.detector.state_dict().items()}
    key = tasks.crops_key(cfg, detector_state)
    device = select_device(cfg.device)
    result: dict = {"crops_key": key, "n_boot": n_boot}
    predictions: list[dict] = []
    errors = []
    for group, reported in (report.get("sites") or {}).items():
        if not reported.get("n"):
            continue
        ys, ps, patients = [], [], []
        for site_id in reported.get("sites", []):
            site = sites[site_id]
            crop_set = tasks.load_crops(site, key)
            heads = [h for h in site.heads if h.stage is not None]
            mask = crop_set.splits == "test"
            if not mask.any():
                continue
            with torch.no_grad():
                probs = predict_stages(bundle.stager, crop_set.crops[mask], device=device)
            test_heads = [h for h, m in zip(heads, mask) if m]
            ys.append(crop_set.stages[mask])
            ps.append(probs)
            # patient ids are local to a hospital: (site, patient) is the patient, for the bootstrap and the readers
            patients += [f"{site_id}/{h.patient_id}" for h in test_heads]
            predictions += [
                {
                    "patient_id": f"{site_id}/{h.patient_id}",
                    "side": h.side,
                    "stage": STAGE_LABELS[int(h.stage)],
                    "predicted_stage": STAGE_LABELS[int(p.argmax())],
                    "site": site_id,
                    "group": group,
                }
                for h, p in zip(test_heads, probs)
            ]
        if not ys:
            continue
        result[group] = group_check(
            np.concatenate(ys), np.concatenate(ps), np.asarray(patients), reported, n_boot=n_boot, seed=cfg.seed
        )
        errors += [a["abs_error"] for a in result[group]["auc"].values() if a["abs_error"] is not None]
        if not result[group]["confusion_matches"]:
            log.warning("group %s: the confusion matrix recomputed from the bundle differs from the report's", group)
    within = [
        a["within_bound"]
        for g, r in result.items()
        if isinstance(r, dict) and "auc" in r
        for a in r["auc"].values()
        if a["within_bound"] is not None
    ]
    if predictions:
        from sim.reports.readers import compare_with_readers, simulate_readers

        result["readers"] = compare_with_readers(
            predictions, simulate_readers(predictions, SIMULATED_READERS, seed=cfg.seed)
        )
    result["all_within_bound"] = all(within) if within else None
    result["max_abs_error"] = max(errors) if errors else None
    folder = out / "exact"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "predictions.csv", "w", newline="") as fh:
        writer = SafeDictWriter(fh, fieldnames=["patient_id", "side", "stage", "predicted_stage", "site", "group"])
        writer.writeheader()
        writer.writerows(predictions)
    return result
