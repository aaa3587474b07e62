"""Scenario splits as data: one ``split.csv`` (patient_id, split) per site folder.

The paper's protocol (Yang et al. 2025, sections 2.3 and 3.1): the internal center's
patients are split 8:1:1 into train, val and test; the other centers are external
test sets. Generalised to a federation: every **training site** is split 8:1:1 by
patient, every **evaluate-only site** is all ``test``. Splits are by patient, never
by head, so the two hips of one patient never straddle a split; they are stratified
by the patient's highest Ficat-Arlet stage when every stratum is large enough.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from client.site_layout import MANIFEST_NAME, SPLIT_COLUMNS, SPLIT_NAME, SPLITS
from shared_models.safe_csv import SafeWriter

log = logging.getLogger(__name__)

FRACTIONS = (0.8, 0.1, 0.1)


def _patient_strata(manifest: Path, refusals: list | None = None) -> dict[str, int]:
    """Patient id -> highest Ficat-Arlet stage of the patient's heads, from the manifest's good rows.

    Rows are read as the site reads them (:func:`client.site_data.check_manifest`); a row refused
    only for its label or box (e.g. stage III) still gives its patient a split (stratum 0), any
    other bad row is skipped and appended to ``refusals``.
    """
    from client.site_data import check_manifest

    heads, skipped = check_manifest(manifest.parent, manifest.parent.name, use_split=False)
    worst: dict[str, int] = defaultdict(int)
    for head in heads:
        worst[head.patient_id] = max(worst[head.patient_id], head.stage or 0)
    for row in skipped:
        if row.patient_id is not None:  # label or box refused: the site refuses the head, the patient keeps a split
            worst[row.patient_id] = max(worst[row.patient_id], 0)
    if refusals is not None:
        refusals.extend(skipped)
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


def write_splits(
    data_root: Path,
    site_ids: Iterable[str],
    train_sites: Iterable[str],
    seed: int = 0,
    refusals: dict[str, list] | None = None,
) -> dict[str, dict[str, int]]:
    """Write ``<data_root>/<site>/split.csv`` for every site; return head-free counts per site and split.

    Patient ids are written with spreadsheet formulas neutralised (:mod:`shared_models.safe_csv`;
    the site reads them back with ``restore``). Bad manifest rows are skipped as the site skips
    them; with ``refusals`` given, ``refusals[site]`` receives their
    :class:`client.site_data.RowRefusal` (file, row, reason), and a warning names each.

    Raises:
        FileNotFoundError: if a site has no ``manifest.csv``.
        ValueError: a manifest as a whole is unusable (see :func:`client.site_data.check_manifest`).
    """
    train_sites = set(train_sites)
    summary: dict[str, dict[str, int]] = {}
    for site in site_ids:
        manifest = Path(data_root) / site / MANIFEST_NAME
        if not manifest.exists():
            raise FileNotFoundError(f"{manifest}: site {site} has no {MANIFEST_NAME}")
        skipped: list = []
        splits = assign_splits(_patient_strata(manifest, skipped), site in train_sites, seed)
        for row in skipped:
            log.warning("site %s: %s (row skipped)", site, row)
        if refusals is not None:
            refusals[site] = skipped
        with open(manifest.parent / SPLIT_NAME, "w", newline="") as fh:
            writer = SafeWriter(fh)
            writer.writerow(SPLIT_COLUMNS)
            writer.writerows(sorted(splits.items()))
        summary[site] = {s: sum(v == s for v in splits.values()) for s in SPLITS}
        log.info("site %s: patients per split %s", site, summary[site])
    return summary
