"""The files of a site folder and their CSV columns: the one definition the site and the phantom writer share.

Site folder (``docs/CONVENTIONS.md``)::

    <site-root>/manifest.csv   patient_id,study,side,ficat_stage,box_lps_mm,scanner
    <site-root>/split.csv      patient_id,split   (train|val|test; optional)

The site reads them with :func:`client.site_data.read_manifest` / :func:`client.site_data.check_manifest`
(the hardened row-level parser, which refuses a bad row with a recorded reason). Whatever else reads a site
CSV (:mod:`client.splits`, the pooled baseline, the benchmarks) goes through that parser
(:func:`client.site_data.read_site_csv` for raw rows); whatever writes one (the phantom generator, the
pooled baseline) uses these names. No imports beyond the standard library, so the phantom generator can use
it without the site's readers.
"""

from __future__ import annotations

__all__ = ["DEFAULT_SPLIT", "MANIFEST_COLUMNS", "MANIFEST_NAME", "SPLITS", "SPLIT_COLUMNS", "SPLIT_NAME"]

#: One row per femoral head.
MANIFEST_NAME = "manifest.csv"
#: ``box_lps_mm`` is ``x0 y0 z0 x1 y1 z1`` in LPS millimetres; ``ficat_stage`` and ``box_lps_mm`` may be blank.
MANIFEST_COLUMNS: tuple[str, ...] = ("patient_id", "study", "side", "ficat_stage", "box_lps_mm", "scanner")
#: Optional: one row per patient (splits are by patient, never by head).
SPLIT_NAME = "split.csv"
SPLIT_COLUMNS: tuple[str, ...] = ("patient_id", "split")
SPLITS: tuple[str, ...] = ("train", "val", "test")
#: The split of every head of a site without ``split.csv``.
DEFAULT_SPLIT = "test"
