"""The pooled (centralised) baseline's site: every training site's data in one place.

Pooling is what federation avoids, so it exists only in the simulation harness, as one more
site folder ``<data-root>/POOLED`` that trains while the real sites only evaluate. It holds:

* ``manifest.csv`` - the rows of every pooled site's ``train`` and ``val`` patients, each patient id
  qualified as ``<site>/<patient_id>`` (ids are local to a hospital; two sites may share one);
* one symbolic link per study, ``<site>-<study>`` -> ``../<site>/<study>`` (no copies; a nested
  study ``sub/s1`` is the link ``<site>-sub/s1`` in a real folder ``<site>-sub``);
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
from pathlib import Path, PurePosixPath

from client.site_data import HeadRecord, check_manifest
from client.site_layout import MANIFEST_COLUMNS, MANIFEST_NAME, SPLIT_COLUMNS, SPLIT_NAME
from shared_models.safe_csv import SafeDictWriter, SafeWriter, neutralise
from shared_models.stages import FicatArletStage

log = logging.getLogger(__name__)

POOLED_SITE = "POOLED"


def _check_site_name(site: str) -> None:
    """A pooled site id must name one folder of the data root (it is joined to paths and prefixes link names)."""
    if not site or site != site.strip() or site.startswith(".") or any(c in site for c in "/\\:") or "\x00" in site:
        raise ValueError(f"site id {site!r} is not a plain folder name of the data root")


def _pooled_row(head: HeadRecord, patient: str, link: str) -> dict[str, str]:
    """A pooled manifest row from a head the site accepted: its checked values, normalised.

    The box is written as six numbers with single spaces (so :mod:`shared_models.safe_csv`
    leaves it alone and the pooled site reads what the site read), the stage as its label.
    """
    return {
        "patient_id": patient,
        "study": link,
        "side": head.side,
        "ficat_stage": "" if head.stage is None else FicatArletStage(head.stage).label,
        "box_lps_mm": "" if head.box_lps_mm is None else " ".join(repr(float(v)) for v in head.box_lps_mm),
        "scanner": head.scanner,
    }


def _link_study(target: Path, link: str, site: str, study: str, claimed: dict[str, tuple[str, str]]) -> str | None:
    """Make ``target/link`` a relative symbolic link to ``../<site>/<study>``; why not, or None when done.

    ``link`` may be nested (a study ``sub/s1`` of site ``A`` is ``A-sub/s1``): its parent folders
    are made as real folders inside ``target``, and a parent that is a link (a study lying inside
    another study) is refused, so no link is ever created through another link, outside ``target``.
    A link name already claimed by another site's study (``A`` + ``b-c`` and ``A-b`` + ``c``) is
    refused rather than shared.
    """
    if claimed.get(link, (site, study)) != (site, study):
        return "its pooled link name is taken by another pooled site's study"
    parts = PurePosixPath(link).parts
    folder = target
    for part in parts[:-1]:
        folder = folder / part
        if folder.is_symlink() or (folder.exists() and not folder.is_dir()):
            return "study lies inside another pooled study"
        folder.mkdir(exist_ok=True)
    path = folder / parts[-1]
    if not path.is_symlink():
        if path.exists():
            return "another pooled study lies inside this study"
        if not folder.resolve().is_relative_to(target.resolve()):  # cannot happen after the checks above
            return "pooled link would lie outside the pooled site"
        os.symlink(Path(*[".."] * len(parts)) / site / study, path)
    claimed[link] = (site, study)
    return None


def write_pooled_site(data_root: Path, sites: Sequence[str], name: str = POOLED_SITE) -> dict[str, int]:
    """(Re)write ``<data_root>/<name>`` from the ``train``/``val`` patients of ``sites``.

    Call it after :func:`client.splits.write_splits`: it reads each site's ``split.csv``. Each
    site's rows are read and checked exactly as the site checks them
    (:func:`client.site_data.check_manifest`: study paths inside the site root, side, stage,
    box, duplicates, split); a row the site would refuse is not pooled, and its refusal (file,
    row, reason, never a value) is logged as a warning. The pooled manifest holds the checked,
    normalised values, never a raw field.

    Returns:
        Patients per split in the pooled site (``train``, ``val``).

    Raises:
        FileNotFoundError: a site lacks ``manifest.csv`` or ``split.csv``.
        ValueError: no sites, the pooled name is among them, a site id is not a plain folder
            name, or a site's manifest or split file is unreadable as a whole (names the file).
    """
    if not sites:
        raise ValueError("a pooled site needs at least one site to pool")
    if name in sites:
        raise ValueError(f"the pooled site {name!r} cannot pool itself")
    for site in (*sites, name):
        _check_site_name(site)
    root = Path(data_root)
    target = root / name
    cache = target / ".onfh-cache"
    if target.is_symlink():
        raise ValueError(f"{target}: the pooled site folder is a symbolic link; remove it")
    if target.exists():  # rebuilt every run (splits depend on the seed); the preprocessing cache is kept
        for entry in target.iterdir():
            if entry != cache:
                entry.unlink() if entry.is_symlink() or entry.is_file() else shutil.rmtree(entry)
    target.mkdir(parents=True, exist_ok=True)
    manifest_rows: list[dict[str, str]] = []
    splits: dict[str, str] = {}
    claimed: dict[str, tuple[str, str]] = {}
    for site in sites:
        manifest, split_file = root / site / MANIFEST_NAME, root / site / SPLIT_NAME
        for path in (manifest, split_file):
            if not path.is_file():
                raise FileNotFoundError(
                    f"{path}: missing; pooled site {name} needs every pooled site's manifest and split"
                )
        heads, refusals = check_manifest(root / site, site, use_split=True)  # as the site reads them
        for refusal in refusals:
            log.warning("site %s: %s (row not pooled)", site, refusal)
        for head in heads:
            if head.split not in ("train", "val"):
                continue
            patient = f"{site}/{head.patient_id}"  # patient ids are local to a hospital: (site, patient) is the key
            link = f"{site}-{head.study}"
            problem = _link_study(target, link, site, head.study, claimed)
            if problem is not None:
                log.warning("site %s: %s: %s (row not pooled)", site, MANIFEST_NAME, problem)
                continue
            manifest_rows.append(_pooled_row(head, patient, link))
            splits[neutralise(patient)] = head.split  # as the pooled manifest spells it
    with open(target / MANIFEST_NAME, "w", newline="") as fh:
        writer = SafeDictWriter(fh, fieldnames=list(MANIFEST_COLUMNS))
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
