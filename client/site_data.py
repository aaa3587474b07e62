"""A hospital site's data: manifest, patient split, per-study loading and the preprocessing cache.

Site folder (see ``docs/CONVENTIONS.md``)::

    <site-root>/manifest.csv   patient_id,study,side,ficat_stage,box_lps_mm,scanner
    <site-root>/split.csv      patient_id,split   (train|val|test; optional)
    <site-root>/<study>/...    DICOM files (any names, nested, junk allowed) or a .nii/.nii.gz file

:class:`SiteData` loads every study of the manifest once, at construction. A study that
cannot be read gets a ``"refused"`` :class:`StudyVerdict` with the reason and never stops
the others. Heads whose study loaded are in :attr:`SiteData.heads`.

The preprocessing cache (never leaves the site) holds, per study, under
``<cache_dir>/<key>/``:

* ``study.mha`` - the LPS-oriented float32 study (:func:`orient_lps` of :func:`read_study`);
* ``hemi_L.npy``/``hemi_R.npy`` - the windowed hemi volumes ``(D, H, W)`` float32;
* ``grid_L.json``/``grid_R.json`` - their :class:`GridGeometry`;
* ``meta.json`` - study shape, spacing, direction, series UID, read notes and the intensity
  convention, written last.

``key`` is the sha256 of the cache format, the full :class:`PreprocessingSpec`, the intensity
convention of :mod:`client.dicom_series` and the sorted sha256 digests of the *contents* of
every source file of the study: never paths, sizes or times. So a study whose files change
(even with the same size and mtime) gets a new entry and is never served stale, and a study
that is moved or renamed keeps its entry. The key holds no patient data, so cache folder
names are safe. Entries are written to a temporary folder
and renamed into place, so an interrupted run leaves no half entry. A hit reads no DICOM.
Failed studies are not cached: they are retried on the next construction. A study is checked
(field of view, boxes) before its entry is put in place, so a refused study leaves no entry;
one over the decoded size cap is refused before anything is decoded or written.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO

import numpy as np
import SimpleITK as sitk

from client.dicom_series import (
    INTENSITY_CONVENTION,
    MAX_STUDY_VOXELS,
    ReadReport,
    SeriesError,
    check_decoders,
    read_study,
)
from client.site_layout import (  # re-exported: the site folder's names live in client.site_layout
    DEFAULT_SPLIT,
    MANIFEST_COLUMNS,
    MANIFEST_NAME,
    SPLIT_COLUMNS,
    SPLIT_NAME,
    SPLITS,
)
from shared_models.preprocessing import (
    SIDES,
    GridGeometry,
    PreprocessingSpec,
    box_lps_to_voxel,
    orient_lps,
    resample_crop,
    resample_hemi,
)
from shared_models.safe_csv import restore
from shared_models.stages import FicatArletStage

logger = logging.getLogger(__name__)

SITE_CACHE_NAME = ".onfh-cache"  # default cache folder inside a site root; it never travels

# Smallest field of view (mm, LPS x = left-right, y = antero-posterior, z = supero-inferior) that
# can hold both femoral heads: the heads lie ~90 mm either side of the midline and are ~50 mm wide.
MIN_STUDY_EXTENT_MM: tuple[float, float, float] = (160.0, 60.0, 40.0)

# Bump when the cache layout or the reading code changes meaning.
CACHE_FORMAT = 2
_STUDY_FILE = "study.mha"
_META_FILE = "meta.json"


@dataclass(frozen=True)
class HeadRecord:
    """One femoral head of the manifest.

    Attributes:
        site_id: the site.
        patient_id: pseudonymous patient id (never logged).
        study: study path relative to the site root, as written in the manifest.
        side: ``"L"`` or ``"R"``.
        stage: Ficat-Arlet stage as an int (``FicatArletStage``), None if unknown.
        box_lps_mm: ``femoral_head_box_lps_mm`` ``(x0, y0, z0, x1, y1, z1)``, None if unknown.
        scanner: free text from the manifest.
        split: ``"train"``, ``"val"`` or ``"test"`` from ``split.csv``; ``"test"`` without one.
    """

    site_id: str
    patient_id: str
    study: str
    side: str
    stage: int | None
    box_lps_mm: tuple[float, ...] | None
    scanner: str
    split: str


@dataclass(frozen=True)
class StudyVerdict:
    """Outcome of loading one study.

    Attributes:
        study: study path relative to the site root.
        status: ``"ok"`` or ``"refused"``.
        reason: ``"ok"``, ``"ok (cached)"`` or why the study was refused; an ok study may
            carry read notes after a ``"; "`` (e.g. ``"ok; 2 exact duplicate slice(s) dropped"``).
        shape: LPS-oriented study size ``(D, H, W)``, None if refused.
        spacing_mm: its ``voxel_spacing_mm`` ``(D, H, W)``, None if refused.
        series_uid: ``SeriesInstanceUID`` of the series read ("" for NIfTI), None if refused.
        direction: the LPS-oriented image's direction matrix, row-major 9 numbers (ITK),
            None if refused.
    """

    study: str
    status: str
    reason: str
    shape: tuple[int, ...] | None
    spacing_mm: tuple[float, ...] | None
    series_uid: str | None = None
    direction: tuple[float, ...] | None = None

    def to_dict(self) -> dict:
        """The verdict as ``{study, series_uid, status, reason, shape, spacing_mm, direction}`` (JSON-ready)."""
        return {
            "study": self.study,
            "series_uid": self.series_uid,
            "status": self.status,
            "reason": self.reason,
            "shape": None if self.shape is None else list(self.shape),
            "spacing_mm": None if self.spacing_mm is None else list(self.spacing_mm),
            "direction": None if self.direction is None else list(self.direction),
        }


# Caps on a site CSV (manifest.csv, split.csv), checked on the raw bytes before any CSV parsing,
# so a hostile file can neither exhaust memory nor reach the csv module's own 128 KiB field limit
# (a raw ``_csv.Error``): a line longer than MAX_LINE_BYTES, or a field longer than
# MAX_FIELD_CHARS, refuses that row only. Real manifest lines are under 200 bytes.
MAX_CSV_BYTES = 64 << 20
MAX_LINE_BYTES = 16 << 10
MAX_FIELD_CHARS = 4096

# Plausible size of a femoral-head core-area box, per axis, in mm. Adult femoral head diameters
# are about 40-55 mm (the phantoms draw 44-52 mm, sim/phantoms/anatomy.py), and the project's box is the
# head's bounding box (docs/CONVENTIONS.md). Smallest: half the smallest head (a box tighter than
# that is not a head box); largest: the largest head plus 15 mm of annotation margin on each side.
BOX_SIDE_MM: tuple[float, float] = (20.0, 85.0)
# Largest |coordinate| of a box corner (mm): scanner coordinates lie within about 1 m of the
# isocentre; 2 m leaves room for table offsets.
BOX_MAX_ABS_MM: float = 2000.0


def _parse_box(text: str) -> tuple[float, ...] | None:
    text = text.strip()
    if not text:
        return None
    parts = text.split()
    if len(parts) != 6:
        raise ValueError(f"box_lps_mm must be 6 numbers separated by spaces, got {len(parts)} field(s)")
    try:
        box = tuple(float(p) for p in parts)
    except ValueError:
        raise ValueError("box_lps_mm must be 6 numbers separated by spaces (decimal point, no commas)") from None
    if not all(math.isfinite(v) for v in box):
        raise ValueError("box_lps_mm must be finite")
    if not (box[0] < box[3] and box[1] < box[4] and box[2] < box[5]):
        raise ValueError("box_lps_mm must satisfy x0<x1, y0<y1, z0<z1")
    if max(abs(v) for v in box) > BOX_MAX_ABS_MM:
        raise ValueError(f"box_lps_mm has a coordinate beyond +-{BOX_MAX_ABS_MM:g} mm of the scanner origin")
    sides = [box[i + 3] - box[i] for i in range(3)]
    lo, hi = BOX_SIDE_MM
    if not all(lo <= s <= hi for s in sides):
        have = " x ".join(f"{s:.3g}" for s in sides)
        raise ValueError(
            f"box_lps_mm is {have} mm; a femoral head core-area box is {lo:g}-{hi:g} mm along each axis "
            "(box in another unit or frame?)"
        )
    return box


def _parse_study(text: str) -> str:
    study = text.strip().replace("\\", "/")
    if not study:
        raise ValueError("study is empty")
    path = PurePosixPath(study)
    if path.is_absolute() or ".." in path.parts or (len(study) > 1 and study[1] == ":"):
        raise ValueError("study must be a path relative to the site root, inside it")
    if any(ord(c) < 32 for c in study):
        raise ValueError("study path has control characters")
    return str(path)


@dataclass(frozen=True)
class RowRefusal:
    """A row of a site CSV that was skipped, and why; the rest of the file goes on.

    Attributes:
        file: the file name (``manifest.csv`` or ``split.csv``).
        line: the row's line number in the file (the header is line 1).
        reason: why, without any value of the row (no patient id, no path).
        study: the row's study path when it was valid, else None.
        patient_id: the row's patient id when it was valid (for the split; never logged or shown).
    """

    file: str
    line: int
    reason: str
    study: str | None = None
    patient_id: str | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return f"{self.file} row {self.line}: {self.reason}"


def _refuse_row(
    path: Path,
    line: int,
    reason: str,
    refusals: list[RowRefusal] | None,
    study: str | None = None,
    patient: str | None = None,
) -> None:
    """Record a refused row, or raise it as a ValueError naming the file and row when ``refusals`` is None."""
    if refusals is None:
        raise ValueError(f"{path}: row {line}: {reason}")
    refusals.append(RowRefusal(path.name, line, reason, study, patient))


def _capped_lines(handle: IO[bytes]) -> Iterator[bytes | None]:
    """Raw lines of ``handle``; None for a line over ``MAX_LINE_BYTES`` (read past, never kept)."""
    while True:
        raw = handle.readline(MAX_LINE_BYTES + 1)
        if not raw:
            return
        if len(raw) > MAX_LINE_BYTES:
            while raw and not raw.endswith(b"\n"):
                raw = handle.readline(1 << 16)
            yield None
        else:
            yield raw


def _parse_line(raw: bytes | None, first: bool) -> list[str]:
    """One capped raw line as CSV fields; ValueError (never ``csv.Error``) naming the problem."""
    if raw is None:
        raise ValueError(f"line longer than {MAX_LINE_BYTES} bytes")
    if first and raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8) :]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not valid UTF-8 (byte {exc.start + 1} of the line); save the file as UTF-8") from None
    if "\x00" in text:
        raise ValueError("NUL character in the line")
    try:
        rows = list(csv.reader([text], strict=True))
    except csv.Error as exc:
        raise ValueError(f"malformed CSV ({exc}; a quoted field may not span lines)") from None
    return rows[0] if rows else []


def _read_csv(
    path: Path, required: Sequence[str], refusals: list[RowRefusal] | None = None
) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield ``(line number, row)`` of a site CSV with the required columns; blank rows skipped.

    Each line is capped (``MAX_LINE_BYTES``) and decoded as UTF-8 on its own, then parsed by
    the csv module; a field is capped at ``MAX_FIELD_CHARS``. A row that fails any of these,
    or has more non-empty fields than columns, is refused on its own (see :func:`_refuse_row`).

    Raises:
        ValueError: the file is over ``MAX_CSV_BYTES``, empty, or its header is unreadable or
            lacks a required column (the whole file is refused: no row can be trusted).
    """
    size = path.stat().st_size
    if size > MAX_CSV_BYTES:
        raise ValueError(f"{path}: {size} bytes, more than the {MAX_CSV_BYTES >> 20} MiB a site CSV may have")
    header: list[str] | None = None
    with open(path, "rb") as handle:
        for line, raw in enumerate(_capped_lines(handle), start=1):
            try:
                fields = [f.strip() for f in _parse_line(raw, line == 1)]
            except ValueError as exc:
                if header is None:
                    raise ValueError(f"{path}: header (row {line}): {exc}") from None
                _refuse_row(path, line, str(exc), refusals)
                continue
            if header is None:
                header = fields
                missing = [c for c in required if c not in header]
                if missing:
                    raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; expected {','.join(required)}")
                continue
            if not any(fields):
                continue
            if any(fields[len(header) :]):
                _refuse_row(path, line, "more fields than columns", refusals)
                continue
            long = [
                header[i] if header[i] in required else f"column {i + 1}"
                for i, f in enumerate(fields)
                if len(f) > MAX_FIELD_CHARS
            ]
            if long:
                _refuse_row(path, line, f"field {long[0]} longer than {MAX_FIELD_CHARS} characters", refusals)
                continue
            row = dict(zip(header, fields + [""] * (len(header) - len(fields))))
            yield line, row
    if header is None:
        raise ValueError(f"{path}: empty file, expected columns {','.join(required)}")


def read_site_csv(
    path: Path, columns: Sequence[str], refusals: list[RowRefusal] | None = None
) -> list[tuple[int, dict[str, str]]]:
    """The rows of a site CSV (``manifest.csv``, ``split.csv``) as the site reads them, values unchecked.

    The line-level reader of :func:`read_manifest`: capped lines and fields, UTF-8, strict CSV,
    fields stripped, blank rows skipped; for tools that copy or subset a site's rows
    (:mod:`sim.experiments.pooled`, the benchmarks) so they read exactly what the site would.

    Args:
        path: the CSV file.
        columns: columns that must be in its header (e.g. :data:`MANIFEST_COLUMNS`); extra columns are kept.
        refusals: collects a :class:`RowRefusal` per unreadable row; None raises on the first.

    Returns:
        ``(line number, {column: value})`` per row, in file order (the header is line 1).

    Raises:
        ValueError: the file is over ``MAX_CSV_BYTES``, empty, or its header lacks a column (names
            the file); an unreadable row when ``refusals`` is None.
    """
    return list(_read_csv(Path(path), columns, refusals))


def _read_split(site_root: Path, refusals: list[RowRefusal] | None = None) -> tuple[dict[str, str], set[str]] | None:
    """``(patient -> split, patients with conflicting rows)`` from ``split.csv``; None without one.

    Patient ids are read with :func:`shared_models.safe_csv.restore` (the project writes this
    file with formulas neutralised).
    """
    path = site_root / SPLIT_NAME
    if not path.is_file():
        return None
    split: dict[str, str] = {}
    first: dict[str, int] = {}
    conflicts: set[str] = set()
    for line, row in _read_csv(path, SPLIT_COLUMNS, refusals):
        patient, value = restore(row["patient_id"]), row["split"].lower()
        if not patient:
            _refuse_row(path, line, "patient_id is empty", refusals)
        elif value not in SPLITS:
            _refuse_row(path, line, f"split must be one of {', '.join(SPLITS)}", refusals)
        elif split.get(patient, value) != value:
            _refuse_row(
                path,
                line,
                f"patient already assigned to another split in row {first[patient]}; the patient's heads are refused",
                refusals,
            )
            conflicts.add(patient)
        else:
            split[patient] = value
            first.setdefault(patient, line)
    return split, conflicts


class HeadRefused(ValueError):
    """A manifest row whose head cannot be used (its label or box), while the rest of the manifest is fine."""


def _parse_stage(text: str) -> int | None:
    if not text:
        return None
    try:
        return int(FicatArletStage.parse(text))
    except ValueError as exc:
        if "out of scope" in str(exc):
            raise
        raise ValueError("unreadable Ficat-Arlet stage; expected 0, I or II") from None


def _manifest_rows(
    site_root: Path, site_id: str, refusals: list[RowRefusal] | None = None, use_split: bool = True
) -> list[tuple[int, HeadRecord]]:
    """Parse the manifest (and ``split.csv`` when ``use_split``); with ``refusals`` given, a bad row refuses only itself.

    ``refusals`` collects a :class:`RowRefusal` for every row skipped: unreadable (too long,
    not UTF-8, malformed CSV, a field over the cap), invalid (empty patient id, a study path
    outside the site root, a side other than L/R, a duplicate head, a study shared by two
    patients, no or conflicting split) or with an unusable label or box (Ficat-Arlet stage
    out of scope or unreadable, a malformed or implausible box). Without it the first such
    row raises.
    """
    site_root = Path(site_root)
    path = site_root / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(f"{path}: manifest not found")
    split = _read_split(site_root, refusals) if use_split else None
    out: list[tuple[int, HeadRecord]] = []
    seen_heads: dict[tuple[str, str], int] = {}
    study_patient: dict[str, tuple[str, int]] = {}
    n_refused = len(refusals) if refusals is not None else 0
    for line, row in _read_csv(path, MANIFEST_COLUMNS, refusals):
        patient, study, side = row["patient_id"], None, ""
        try:
            if not patient:
                raise ValueError("patient_id is empty")
            study = _parse_study(row["study"])
            side = row["side"].upper()
            if side not in SIDES:
                raise ValueError("side must be L or R")
            try:
                stage = _parse_stage(row["ficat_stage"])
                box = _parse_box(row["box_lps_mm"])
            except ValueError as exc:
                raise HeadRefused(str(exc)) from None
            if (patient, side) in seen_heads:
                raise ValueError(f"the same patient and side already appear in row {seen_heads[(patient, side)]}")
            if study in study_patient and study_patient[study][0] != patient:
                raise ValueError(f"study also belongs to another patient in row {study_patient[study][1]}")
            if split is None:
                head_split = DEFAULT_SPLIT
            elif patient in split[1]:
                raise ValueError(f"patient has conflicting rows in {SPLIT_NAME}")
            elif patient in split[0]:
                head_split = split[0][patient]
            else:
                raise ValueError(f"patient has no row in {SPLIT_NAME}")
        except HeadRefused as exc:
            _refuse_row(path, line, f"{exc} (the {side} head is refused)", refusals, study, patient)
            seen_heads[(patient, side)] = line
            continue
        except ValueError as exc:
            _refuse_row(path, line, str(exc), refusals, study)
            continue
        seen_heads[(patient, side)] = line
        study_patient.setdefault(study, (patient, line))
        out.append(
            (
                line,
                HeadRecord(
                    site_id=site_id,
                    patient_id=patient,
                    study=study,
                    side=side,
                    stage=stage,
                    box_lps_mm=box,
                    scanner=row["scanner"],
                    split=head_split,
                ),
            )
        )
    if not out and (refusals is None or len(refusals) == n_refused):
        raise ValueError(f"{path}: manifest has no rows")
    return out


def read_manifest(site_root: Path, site_id: str) -> list[HeadRecord]:
    """Read and validate ``manifest.csv`` (and ``split.csv`` if present) of a site, strictly.

    Checks: the six columns exist (extra columns are ignored); every line is at most
    ``MAX_LINE_BYTES`` of UTF-8 and every field at most ``MAX_FIELD_CHARS``; ``patient_id`` and
    ``study`` are non-empty and ``study`` is relative, inside the site root; ``side`` is
    L/R; ``ficat_stage`` is blank, 0, I or II (III/IV are refused as out of scope);
    ``box_lps_mm`` is blank or six space-separated numbers with ``x0<x1, y0<y1, z0<z1``,
    each side ``BOX_SIDE_MM`` long and every corner within ``BOX_MAX_ABS_MM``;
    no patient/side appears twice; a study belongs to one patient; with a split file, every
    patient has one split in ``train|val|test``. :class:`SiteData` and :func:`check_manifest`
    skip bad rows instead.

    Returns:
        One :class:`HeadRecord` per manifest row, in file order.

    Raises:
        ValueError: naming the file and row (line number) and the reason; never a
            patient id.
    """
    return [record for _, record in _manifest_rows(site_root, site_id)]


def check_manifest(site_root: Path, site_id: str, use_split: bool = True) -> tuple[list[HeadRecord], list[RowRefusal]]:
    """Read a site's manifest (and ``split.csv`` when ``use_split``), skipping bad rows.

    Same checks as :func:`read_manifest`, but a bad row refuses only itself.

    Returns:
        ``(heads, refused rows)``: one :class:`HeadRecord` per good row in file order, and
        one :class:`RowRefusal` per skipped row of either file.

    Raises:
        ValueError: the manifest is missing, over ``MAX_CSV_BYTES``, has an unreadable header
            or lacks a column, or has no rows at all (and likewise for ``split.csv``).
    """
    refusals: list[RowRefusal] = []
    rows = _manifest_rows(Path(site_root), site_id, refusals, use_split=use_split)
    return [record for _, record in rows], refusals


def _source_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    out = []
    for root, dirs, names in os.walk(path):
        dirs.sort()
        out.extend(Path(root) / n for n in sorted(names))
    return out


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_key(study_path: Path, spec: PreprocessingSpec) -> str:
    """sha256 of the cache format, the spec, the intensity convention and the study's file contents.

    Content only: the sorted sha256 digests of the study's files, never their paths, sizes or
    modification times (see the module notes).
    """
    digests = sorted(_file_digest(f) for f in _source_files(Path(study_path)))
    payload = {"format": CACHE_FORMAT, "spec": spec.to_dict(), "intensity": INTENSITY_CONVENTION, "files": digests}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _write_entry(
    entry: Path,
    image: sitk.Image,
    spec: PreprocessingSpec,
    report: ReadReport,
    validate: Callable[[dict, dict[str, GridGeometry]], None] | None = None,
) -> dict:
    """Write a cache entry for an LPS-oriented study atomically; return its meta.

    ``validate(meta, grids)`` runs on the finished entry before it is put in place; if it
    raises, nothing is left in the cache (the temporary folder is removed).
    """
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=entry.parent))
    try:
        # Uncompressed (4 bytes/voxel): reading it back for crops takes ~10 ms per 3M voxels,
        # about 5x faster than a compressed file.
        clean = sitk.Image(image)
        for key in clean.GetMetaDataKeys():
            clean.EraseMetaData(key)
        sitk.WriteImage(clean, str(tmp / _STUDY_FILE), useCompression=False)
        for side in SIDES:
            array, grid = resample_hemi(image, side, spec)
            np.save(tmp / f"hemi_{side}.npy", array)
            (tmp / f"grid_{side}.json").write_text(json.dumps(grid.to_dict()))
        meta = {
            "shape": list(image.GetSize()[::-1]),
            "spacing_mm": list(image.GetSpacing()[::-1]),
            "direction": list(image.GetDirection()),
            "series_uid": report.series_uid,
            "notes": list(report.notes),
            "intensity_convention": INTENSITY_CONVENTION,
        }
        (tmp / _META_FILE).write_text(json.dumps(meta))
        if validate is not None:
            validate(meta, {s: GridGeometry.from_dict(json.loads((tmp / f"grid_{s}.json").read_text())) for s in SIDES})
        try:
            os.replace(tmp, entry)
        except OSError:
            if not (entry / _META_FILE).is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process wrote the same entry
        return meta
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _entry_complete(entry: Path) -> bool:
    names = [_META_FILE, _STUDY_FILE] + [f"{p}_{s}.{e}" for s in SIDES for p, e in (("hemi", "npy"), ("grid", "json"))]
    return all((entry / n).is_file() for n in names)


def _progress(items: Sequence[str], enabled: bool) -> Iterator[str]:
    if not enabled:
        yield from items
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task("Preprocessing studies", total=len(items))
        for item in items:
            yield item
            bar.advance(task)


class SiteData:
    """All heads of one site, with their preprocessed volumes.

    Construction reads the manifest and loads every study (from the cache when possible).

    Attributes:
        site_id: the site.
        spec: the preprocessing spec used for the hemi volumes and crops.
        heads: heads whose study loaded, in manifest order.
        verdicts: one :class:`StudyVerdict` per study of the manifest, in manifest order, then
            one per skipped manifest or split row.
        row_refusals: the skipped rows of ``manifest.csv`` and ``split.csv`` (:class:`RowRefusal`).
        decoders: compressed transfer syntax name -> decoder available, checked at start-up
            (:func:`client.dicom_series.check_decoders`).

    Args:
        site_root: the site folder.
        site_id: the site's id.
        cache_dir: preprocessing cache folder (created if missing).
        spec: preprocessing spec.
        progress: show a rich progress bar while loading.
        max_study_voxels: decoded size cap per study, checked on headers before decoding
            (:data:`client.dicom_series.MAX_STUDY_VOXELS`, 512 x 512 x 256, by default).

    Raises:
        ValueError: the manifest or split file as a whole is unusable (missing, over its
            size cap, unreadable header, missing column, no rows). A bad *row* (see
            :func:`check_manifest`) refuses only that row, with a verdict naming the file and
            row; the study's other head and every other study go on.

    A study is refused when its LPS field of view is smaller than ``MIN_STUDY_EXTENT_MM``
    (too small to hold both hips). It is also refused when a head of it has a box whose centre falls outside the
    hemi grid of its side (typically L/R swapped or a box in another frame), since training
    on such a head would teach the detector nonsense.
    """

    def __init__(
        self,
        site_root: Path,
        site_id: str,
        cache_dir: Path,
        spec: PreprocessingSpec,
        progress: bool = False,
        max_study_voxels: int = MAX_STUDY_VOXELS,
    ) -> None:
        self.site_root = Path(site_root)
        self.max_study_voxels = int(max_study_voxels)
        self.site_id = site_id
        self.cache_dir = Path(cache_dir)
        self.spec = spec
        self.row_refusals: list[RowRefusal] = []
        rows = _manifest_rows(self.site_root, site_id, self.row_refusals)
        for refusal in self.row_refusals:
            logger.warning("site %s: %s (row skipped)", site_id, refusal)
        self.decoders = check_decoders()
        studies = list(dict.fromkeys(record.study for _, record in rows))
        self._entries: dict[str, Path] = {}
        self._grids: dict[tuple[str, str], GridGeometry] = {}
        self._last_image: tuple[str, sitk.Image] | None = None
        self.verdicts: list[StudyVerdict] = []
        n_cached = 0
        for study in _progress(studies, progress):
            heads = [(line, r) for line, r in rows if r.study == study]
            verdict, cached = self._load(study, heads)
            n_cached += cached
            self.verdicts.append(verdict)
        ok = {v.study for v in self.verdicts if v.status == "ok"}
        self.heads: list[HeadRecord] = [r for _, r in rows if r.study in ok]
        # A skipped row (e.g. stage III, a path outside the site) gets a verdict of its own,
        # under its study when that was valid; the study's other head and every other study go on.
        self.verdicts += [
            StudyVerdict(r.study or f"{r.file} row {r.line}", "refused", str(r), None, None) for r in self.row_refusals
        ]
        logger.info(
            "site %s: %d of %d studies loaded (%d from cache), %d refused; %d heads",
            site_id,
            len(ok),
            len(studies),
            n_cached,
            len(studies) - len(ok),
            len(self.heads),
        )

    # -- loading -------------------------------------------------------------------------

    def _load(self, study: str, heads: list[tuple[int, HeadRecord]]) -> tuple[StudyVerdict, bool]:
        path = self.site_root / study
        try:
            if not path.exists():
                raise SeriesError(path, "study does not exist")
            entry = self.cache_dir / cache_key(path, self.spec)
            cached = _entry_complete(entry)

            def validate(meta: dict, grids: dict[str, GridGeometry]) -> None:
                self._check_extent(path, meta)
                for line, head in heads:
                    self._check_box(head, line, grids[head.side])

            if cached:
                meta = json.loads((entry / _META_FILE).read_text())
            else:  # a study refused by the size cap, or by validate, leaves nothing in the cache
                report = ReadReport()
                image = orient_lps(read_study(path, report=report, max_voxels=self.max_study_voxels))
                meta = _write_entry(entry, image, self.spec, report, validate)
                del image
            grids = {s: GridGeometry.from_dict(json.loads((entry / f"grid_{s}.json").read_text())) for s in SIDES}
            if cached:
                validate(meta, grids)
        except SeriesError as exc:
            return self._refuse(study, exc.reason), False
        except Exception as exc:
            return self._refuse(study, f"unexpected {type(exc).__name__}: {exc}"), False
        self._entries[study] = entry
        for side, grid in grids.items():
            self._grids[(study, side)] = grid
        reason = "; ".join(["ok (cached)" if cached else "ok", *meta.get("notes", [])])
        verdict = StudyVerdict(
            study=study,
            status="ok",
            reason=reason,
            shape=tuple(int(v) for v in meta["shape"]),
            spacing_mm=tuple(float(v) for v in meta["spacing_mm"]),
            series_uid=str(meta.get("series_uid", "")),
            direction=tuple(float(v) for v in meta["direction"]) if "direction" in meta else None,
        )
        return verdict, cached

    @staticmethod
    def _refuse(study: str, reason: str) -> StudyVerdict:
        logger.warning("a study was refused (details in its verdict)")
        return StudyVerdict(study=study, status="refused", reason=reason, shape=None, spacing_mm=None)

    @staticmethod
    def _check_extent(path: Path, meta: dict) -> None:
        """Refuse a study whose field of view is too small to hold both hips (``MIN_STUDY_EXTENT_MM``)."""
        d, h, w = (n * s for n, s in zip(meta["shape"], meta["spacing_mm"]))
        extent = (w, h, d)  # LPS x, y, z
        if any(not (e >= m) for e, m in zip(extent, MIN_STUDY_EXTENT_MM)):  # NaN fails closed
            have = " x ".join(f"{e:.0f}" for e in extent)
            need = " x ".join(f"{m:.0f}" for m in MIN_STUDY_EXTENT_MM)
            raise SeriesError(
                path, f"field of view too small to hold both hips: {have} mm (LR x AP x SI), at least {need} mm"
            )

    def _check_box(self, head: HeadRecord, line: int, grid: GridGeometry) -> None:
        if head.box_lps_mm is None:
            return
        centre = box_lps_to_voxel(head.box_lps_mm, grid)[:3]
        size = np.asarray(grid.size_dhw, dtype=np.float64)
        if np.any(centre < -0.5) or np.any(centre > size - 0.5):
            cz, cy, cx = (float(v) for v in centre)
            raise SeriesError(
                self.site_root / head.study,
                f"the box of the {head.side} head (manifest row {line}) is outside its hemi field of view: "
                f"centre at voxel (D {cz:.1f}, H {cy:.1f}, W {cx:.1f}) of a {tuple(grid.size_dhw)} grid "
                "(side swapped, or box not in LPS mm?)",
            )

    # -- access --------------------------------------------------------------------------

    def _entry(self, head: HeadRecord) -> Path:
        try:
            return self._entries[head.study]
        except KeyError:
            raise KeyError(f"study {head.study} was not loaded at this site") from None

    def heads_in(self, split: str) -> list[HeadRecord]:
        """Loaded heads of one split (``"train"``, ``"val"`` or ``"test"``)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
        return [h for h in self.heads if h.split == split]

    def hemi_volume(self, head: HeadRecord) -> tuple[np.ndarray, GridGeometry]:
        """The head's windowed hemi volume, float32 ``(1, D, H, W)`` in ``[0, 1]``, and its grid."""
        array = np.load(self._entry(head) / f"hemi_{head.side}.npy")
        return np.ascontiguousarray(array[None], dtype=np.float32), self._grids[(head.study, head.side)]

    def gt_box_voxels(self, head: HeadRecord) -> np.ndarray:
        """The manifest box in hemi-grid voxels, float32 ``(6,)`` ``(cz, cy, cx, d, h, w)``.

        Raises:
            ValueError: the head has no box in the manifest.
        """
        if head.box_lps_mm is None:
            raise ValueError(f"study {head.study}: the {head.side} head has no box_lps_mm in the manifest")
        self._entry(head)
        return box_lps_to_voxel(head.box_lps_mm, self._grids[(head.study, head.side)])

    def study_image(self, head: HeadRecord) -> sitk.Image:
        """The LPS-oriented float32 study of a head, from the cache (the last one is kept in memory)."""
        entry = self._entry(head)
        if self._last_image is None or self._last_image[0] != head.study:
            self._last_image = (head.study, sitk.ReadImage(str(entry / _STUDY_FILE), sitk.sitkFloat32))
        return self._last_image[1]

    def crop(self, head: HeadRecord, box_lps_mm: Iterable[float]) -> np.ndarray:
        """Stager input around ``box_lps_mm`` on the head's side: float32 ``(1, *crop_shape)`` in ``[0, 1]``."""
        array, _ = resample_crop(self.study_image(head), tuple(box_lps_mm), head.side, self.spec)
        return array[None]
