"""Scenario splits as data: one ``split.csv`` (patient_id, split) per site folder.

The paper's protocol (Yang et al. 2025, sections 2.3 and 3.1): the internal center's
patients are split 8:1:1 into train, val and test; the other centers are external
test sets. Generalised to a federation: every **training site** is split 8:1:1 by
patient, every **evaluate-only site** is all ``test``. Splits are by patient, never
by head, so the two hips of one patient never straddle a split; they are stratified
by the patient's highest Ficat-Arlet stage when every stratum is large enough.
"""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from shared_models.stages import FicatArletStage

log = logging.getLogger(__name__)

FRACTIONS = (0.8, 0.1, 0.1)


def _patient_strata(manifest: Path) -> dict[str, int]:
    worst: dict[str, int] = defaultdict(int)
    with open(manifest, newline="") as fh:
        for row in csv.DictReader(fh):
            try:
                value = int(FicatArletStage.parse(row.get("ficat_stage", "").strip() or "0"))
            except ValueError:  # out of scope or unreadable: the site refuses that head; the patient still gets a split
                value = 0
            worst[row["patient_id"]] = max(worst[row["patient_id"]], value)
    return dict(worst)


def _split(items: list[str], strata: list[int], test_size: float, seed: int) -> tuple[list[str], list[str]]:
    if len(items) < 2:
        return items, []
    counts = np.bincount(strata)
    stratify = strata if counts[counts > 0].min() >= 2 and round(len(items) * test_size) >= len(set(strata)) else None
    a, b = train_test_split(items, test_size=test_size, random_state=seed, stratify=stratify)
    return list(a), list(b)


def assign_splits(patient_strata: dict[str, int], train_site: bool, seed: int) -> dict[str, str]:
    """Map patient id -> ``train``/``val``/``test``.

    Args:
        patient_strata: patient id -> highest stage index among the patient's heads.
        train_site: 8:1:1 split when True, all ``test`` otherwise.
        seed: random seed (same seed, same split).
    """
    patients = sorted(patient_strata)
    if not train_site:
        return {p: "test" for p in patients}
    strata = [patient_strata[p] for p in patients]
    train, rest = _split(patients, strata, 1.0 - FRACTIONS[0], seed)
    rest_strata = [patient_strata[p] for p in rest]
    val, test = _split(rest, rest_strata, FRACTIONS[2] / (FRACTIONS[1] + FRACTIONS[2]), seed + 1)
    return {**{p: "train" for p in train}, **{p: "val" for p in val}, **{p: "test" for p in test}}


def write_splits(data_root: Path, site_ids: Iterable[str], train_sites: Iterable[str], seed: int = 0) -> dict[str, dict[str, int]]:
    """Write ``<data_root>/<site>/split.csv`` for every site; return head-free counts per site and split.

    Raises:
        FileNotFoundError: if a site has no ``manifest.csv``.
    """
    train_sites = set(train_sites)
    summary: dict[str, dict[str, int]] = {}
    for site in site_ids:
        manifest = Path(data_root) / site / "manifest.csv"
        if not manifest.exists():
            raise FileNotFoundError(f"{manifest}: site {site} has no manifest.csv")
        splits = assign_splits(_patient_strata(manifest), site in train_sites, seed)
        with open(manifest.parent / "split.csv", "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["patient_id", "split"])
            writer.writerows(sorted(splits.items()))
        summary[site] = {s: sum(v == s for v in splits.values()) for s in ("train", "val", "test")}
        log.info("site %s: patients per split %s", site, summary[site])
    return summary
