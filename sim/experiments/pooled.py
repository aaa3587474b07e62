"""The pooled (centralised) baseline's site: every training site's data in one place.

Pooling is what federation avoids, so it exists only in the simulation harness, as one more
site folder ``<data-root>/POOLED`` that trains while the real sites only evaluate. It holds:

* ``manifest.csv`` - the rows of every pooled site's ``train`` and ``val`` patients, each patient id
  qualified as ``<site>/<patient_id>`` (ids are local to a hospital; two sites may share one);
* one symbolic link per study, ``<site>-<study>`` -> ``../<site>/<study>`` (no copies);
* ``split.csv`` - each patient's split at its own site, so the pooled model trains and
  selects its round on exactly the heads the federated sites use, and never sees a test head.

The test heads stay at their own sites, which evaluate the pooled model like any global
model; the report groups are unchanged. Matched compute (issue 6): the federated run takes
``local-steps`` optimiser steps per training site and round, so the pooled site takes
``local-steps x number of pooled sites`` per round (:func:`pooled_overrides`).
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

from client.site_data import read_site_csv
from client.site_layout import MANIFEST_COLUMNS, MANIFEST_NAME, SPLIT_COLUMNS, SPLIT_NAME
from shared_models.safe_csv import SafeDictWriter, SafeWriter, neutralise, restore

log = logging.getLogger(__name__)

POOLED_SITE = "POOLED"


def write_pooled_site(data_root: Path, sites: Sequence[str], name: str = POOLED_SITE) -> dict[str, int]:
    """(Re)write ``<data_root>/<name>`` from the ``train``/``val`` patients of ``sites``.

    Call it after :func:`client.splits.write_splits`: it reads each site's ``split.csv``.

    Returns:
        Patients per split in the pooled site (``train``, ``val``).

    Raises:
        FileNotFoundError: a site lacks ``manifest.csv`` or ``split.csv``.
        ValueError: no sites, or the pooled name is among them.
    """
    if not sites:
        raise ValueError("a pooled site needs at least one site to pool")
    if name in sites:
        raise ValueError(f"the pooled site {name!r} cannot pool itself")
    root = Path(data_root)
    target = root / name
    cache = target / ".onfh-cache"
    if target.exists():  # rebuilt every run (splits depend on the seed); the preprocessing cache is kept
        for entry in target.iterdir():
            if entry != cache:
                entry.unlink() if entry.is_symlink() or entry.is_file() else shutil.rmtree(entry)
    target.mkdir(parents=True, exist_ok=True)
    manifest_rows: list[dict[str, str]] = []
    splits: dict[str, str] = {}
    header: list[str] | None = None
    for site in sites:
        manifest, split_file = root / site / MANIFEST_NAME, root / site / SPLIT_NAME
        for path in (manifest, split_file):
            if not path.exists():
                raise FileNotFoundError(
                    f"{path}: missing; pooled site {name} needs every pooled site's manifest and split"
                )
        # read as the site reads them (client.site_data); an unreadable row is left out, with a warning
        skipped: list = []
        site_split = {
            restore(r["patient_id"]): r["split"] for _, r in read_site_csv(split_file, SPLIT_COLUMNS, skipped)
        }  # written neutralised
        rows = read_site_csv(manifest, MANIFEST_COLUMNS, skipped)
        for refusal in skipped:
            log.warning("site %s: %s (row not pooled)", site, refusal)
        header = header or (list(rows[0][1]) if rows else None)
        for _, row in rows:
            local = row["patient_id"]
            if site_split.get(local) not in ("train", "val"):
                continue
            patient = f"{site}/{local}"  # patient ids are local to a hospital: (site, patient) is the key
            link = f"{site}-{row['study']}"
            if not (target / link).is_symlink():
                os.symlink(Path("..") / site / row["study"], target / link)
            manifest_rows.append({**row, "patient_id": patient, "study": link})
            splits[neutralise(patient)] = site_split[local]  # as the pooled manifest spells it
    with open(target / MANIFEST_NAME, "w", newline="") as fh:
        writer = SafeDictWriter(fh, fieldnames=header or list(MANIFEST_COLUMNS))
        writer.writeheader()
        writer.writerows(manifest_rows)
    with open(target / SPLIT_NAME, "w", newline="") as fh:
        writer = SafeWriter(fh)
        writer.writerow(SPLIT_COLUMNS)
        writer.writerows(sorted(splits.items()))
    return {s: sum(v == s for v in splits.values()) for s in ("train", "val")}


def pooled_overrides(
    base: Mapping[str, object], pooled_sites: Sequence[str], name: str = POOLED_SITE
) -> dict[str, object]:
    """Run-config overrides that turn a federated configuration into its pooled baseline.

    ``name`` joins ``site-ids`` and is the only training site; ``split-sites`` keeps the real
    sites' 8:1:1 splits; local steps per round are multiplied by ``len(pooled_sites)`` so the
    pooled model gets the same number of optimiser steps as all federated sites together.

    Args:
        base: the federated configuration's run config (must hold ``site-ids`` and both
            ``*-local-steps``).
        pooled_sites: the federated run's training sites.

    Raises:
        ValueError: no pooled sites.
    """
    if not pooled_sites:
        raise ValueError("a pooled baseline needs at least one training site to pool")
    site_ids = [s for s in str(base["site-ids"]).split(",") if s.strip() and s.strip() != name]
    k = len(pooled_sites)
    return {
        "site-ids": ",".join([*site_ids, name]),
        "train-sites": name,
        "split-sites": ",".join(pooled_sites),
        "pooled-sites": ",".join(pooled_sites),
        "detector-local-steps": int(base["detector-local-steps"]) * k,
        "stager-local-steps": int(base["stager-local-steps"]) * k,
    }
