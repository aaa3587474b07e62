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
Failed studies are not cached: they are retried on the next construction.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterable, Iterator, Sequence

import numpy as np
import SimpleITK as sitk

from client.dicom_series import (
    INTENSITY_CONVENTION,
    ReadReport,
    SeriesError,
    check_decoders,
    read_study,
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
from shared_models.stages import FicatArletStage

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.csv"
SITE_CACHE_NAME = ".onfh-cache"  # default cache folder inside a site root; it never travels
SPLIT_NAME = "split.csv"
MANIFEST_COLUMNS: tuple[str, ...] = ("patient_id", "study", "side", "ficat_stage", "box_lps_mm", "scanner")
SPLIT_COLUMNS: tuple[str, ...] = ("patient_id", "split")
SPLITS: tuple[str, ...] = ("train", "val", "test")
DEFAULT_SPLIT = "test"

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
    return box


def _parse_study(text: str) -> str:
    study = text.strip().replace("\\", "/")
    if not study:
        raise ValueError("study is empty")
    path = PurePosixPath(study)
    if path.is_absolute() or ".." in path.parts or (len(study) > 1 and study[1] == ":"):
        raise ValueError("study must be a path relative to the site root, inside it")
    return str(path)


def _read_csv(path: Path, required: Sequence[str]) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield ``(line number, row)`` of a CSV with the required columns; blank rows skipped."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None:
            raise ValueError(f"{path}: empty file, expected columns {','.join(required)}")
        header = [(f or "").strip() for f in reader.fieldnames]
        missing = [c for c in required if c not in header]
        if missing:
            raise ValueError(f"{path}: missing column(s) {', '.join(missing)}; expected {','.join(required)}")
        reader.fieldnames = header
        for row in reader:
            values = {k: (v or "").strip() for k, v in row.items() if k is not None}
            if not any(values.values()):
                continue
            if None in row:
                raise ValueError(f"{path}: row {reader.line_num}: more fields than columns")
            yield reader.line_num, values


def _read_split(site_root: Path) -> dict[str, str] | None:
    path = site_root / SPLIT_NAME
    if not path.is_file():
        return None
    split: dict[str, str] = {}
    for line, row in _read_csv(path, SPLIT_COLUMNS):
        patient, value = row["patient_id"], row["split"].lower()
        if not patient:
            raise ValueError(f"{path}: row {line}: patient_id is empty")
        if value not in SPLITS:
            raise ValueError(f"{path}: row {line}: split must be one of {', '.join(SPLITS)}, got {row['split']!r}")
        if split.get(patient, value) != value:
            raise ValueError(f"{path}: row {line}: patient already assigned to another split")
        split[patient] = value
    return split


class HeadRefused(ValueError):
    """A manifest row whose head cannot be used (its label or box), while the rest of the manifest is fine."""


def _manifest_rows(
    site_root: Path, site_id: str, refusals: list[tuple[int, str, str]] | None = None
) -> list[tuple[int, HeadRecord]]:
    """Parse the manifest; with ``refusals`` given, label/box problems refuse only that head.

    ``refusals`` collects ``(line, study, reason)`` for rows refused on their own (a
    Ficat-Arlet stage out of scope or unreadable, a malformed box); without it those rows
    raise like any structural error.
    """
    site_root = Path(site_root)
    path = site_root / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(f"{path}: manifest not found")
    split = _read_split(site_root)
    out: list[tuple[int, HeadRecord]] = []
    seen_heads: dict[tuple[str, str], int] = {}
    study_patient: dict[str, tuple[str, int]] = {}
    for line, row in _read_csv(path, MANIFEST_COLUMNS):
        try:
            patient = row["patient_id"]
            if not patient:
                raise ValueError("patient_id is empty")
            study = _parse_study(row["study"])
            side = row["side"].upper()
            if side not in SIDES:
                raise ValueError(f"side must be L or R, got {row['side']!r}")
            try:
                stage = None if not row["ficat_stage"] else int(FicatArletStage.parse(row["ficat_stage"]))
                box = _parse_box(row["box_lps_mm"])
            except ValueError as exc:
                raise HeadRefused(str(exc)) from None
            if (patient, side) in seen_heads:
                raise ValueError(f"the same patient and side already appear in row {seen_heads[(patient, side)]}")
            if study in study_patient and study_patient[study][0] != patient:
                raise ValueError(f"study also belongs to another patient in row {study_patient[study][1]}")
            if split is None:
                head_split = DEFAULT_SPLIT
            elif patient in split:
                head_split = split[patient]
            else:
                raise ValueError(f"patient has no row in {SPLIT_NAME}")
        except HeadRefused as exc:
            if refusals is None:
                raise ValueError(f"{path}: row {line}: {exc}") from None
            refusals.append((line, study, f"head {side} refused: manifest row {line}: {exc}"))
            seen_heads[(patient, side)] = line
            continue
        except ValueError as exc:
            raise ValueError(f"{path}: row {line}: {exc}") from None
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
    if not out and not refusals:
        raise ValueError(f"{path}: manifest has no rows")
    return out


def read_manifest(site_root: Path, site_id: str) -> list[HeadRecord]:
    """Read and validate ``manifest.csv`` (and ``split.csv`` if present) of a site.

    Checks: the six columns exist (extra columns are ignored); ``patient_id`` and
    ``study`` are non-empty and ``study`` is relative, inside the site root; ``side`` is
    L/R; ``ficat_stage`` is blank, 0, I or II (III/IV are refused as out of scope);
    ``box_lps_mm`` is blank or six space-separated numbers with ``x0<x1, y0<y1, z0<z1``;
    no patient/side appears twice; a study belongs to one patient; with a split file, every
    patient has a split in ``train|val|test``.

    Returns:
        One :class:`HeadRecord` per manifest row, in file order.

    Raises:
        ValueError: naming the file and row (line number) and the reason; never a
            patient id.
    """
    return [record for _, record in _manifest_rows(site_root, site_id)]


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


def _write_entry(entry: Path, image: sitk.Image, spec: PreprocessingSpec, report: ReadReport) -> dict:
    """Write a cache entry for an LPS-oriented study atomically; return its meta."""
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
        verdicts: one :class:`StudyVerdict` per study of the manifest, in manifest order.
        decoders: compressed transfer syntax name -> decoder available, checked at start-up
            (:func:`client.dicom_series.check_decoders`).

    Args:
        site_root: the site folder.
        site_id: the site's id.
        cache_dir: preprocessing cache folder (created if missing).
        spec: preprocessing spec.
        progress: show a rich progress bar while loading.

    Raises:
        ValueError: the manifest or split file is invalid (see :func:`read_manifest`).
            Exception: a row whose Ficat-Arlet stage is out of scope (III/IV) or unreadable,
            or whose box is malformed, refuses only that head, with a verdict naming the
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
    ) -> None:
        self.site_root = Path(site_root)
        self.site_id = site_id
        self.cache_dir = Path(cache_dir)
        self.spec = spec
        refused_rows: list[tuple[int, str, str]] = []
        rows = _manifest_rows(self.site_root, site_id, refused_rows)
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
        # Heads refused for their label (e.g. stage III) get a verdict of their own; the
        # study's other head and every other study go on.
        self.verdicts += [StudyVerdict(study, "refused", reason, None, None) for _, study, reason in refused_rows]
        logger.info(
            "site %s: %d of %d studies loaded (%d from cache), %d refused; %d heads",
            site_id, len(ok), len(studies), n_cached, len(studies) - len(ok), len(self.heads),
        )

    # -- loading -------------------------------------------------------------------------

    def _load(self, study: str, heads: list[tuple[int, HeadRecord]]) -> tuple[StudyVerdict, bool]:
        path = self.site_root / study
        try:
            if not path.exists():
                raise SeriesError(path, "study does not exist")
            entry = self.cache_dir / cache_key(path, self.spec)
            cached = _entry_complete(entry)
            if cached:
                meta = json.loads((entry / _META_FILE).read_text())
            else:
                report = ReadReport()
                image = orient_lps(read_study(path, report=report))
                meta = _write_entry(entry, image, self.spec, report)
            self._check_extent(path, meta)
            grids = {s: GridGeometry.from_dict(json.loads((entry / f"grid_{s}.json").read_text())) for s in SIDES}
            for line, head in heads:
                self._check_box(head, line, grids[head.side])
        except SeriesError as exc:
            return self._refuse(study, exc.reason), False
        except Exception as exc:  # noqa: BLE001 - one broken study never stops the others
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
        if any(e < m for e, m in zip(extent, MIN_STUDY_EXTENT_MM)):
            have = " x ".join(f"{e:.0f}" for e in extent)
            need = " x ".join(f"{m:.0f}" for m in MIN_STUDY_EXTENT_MM)
            raise SeriesError(path, f"field of view too small to hold both hips: {have} mm (LR x AP x SI), at least {need} mm")

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
