"""Synthetic bilateral hip MRI phantoms for four simulated hospitals, written as real DICOM.

Clinical data is private, so the simulation harness trains and tests on phantoms. Each
phantom is one patient's T2-weighted turbo spin echo hip study, written as one uncompressed
MR DICOM series in the site folder layout of ``docs/CONVENTIONS.md``::

    <out_dir>/phantoms.json          summary: profile, seed, scanner traits, counts, measured CNR
    <out_dir>/ground_truth.csv       per head: centre, radius, sign location (never in a site folder)
    <out_dir>/<site>/manifest.csv    patient_id,study,side,ficat_stage,box_lps_mm,scanner
    <out_dir>/<site>/study-0042/DICOM/<random file names>   (+ junk files in some studies)

Coordinates
    Everything is physical LPS (+x patient left, +y posterior, +z superior), mm. The scanner's
    field of view (``ScannerProfile.fov_lps_mm``, extents along x, y, z) is centred on the LPS
    origin ``(0, 0, 0)``; along each axis it holds ``n = fov / spacing`` voxels (an integer,
    checked) whose centres sit at ``(i - (n - 1) / 2) * spacing``. Half the studies (at random,
    per study) are cut to a smaller field of view on the same voxel lattice, like a pelvic or
    prostate protocol that cuts through the hips: x near-symmetric (the outermost head centre
    at most a quarter radius outside, so a head's lateral part may be missing), anterior and
    posterior edges independently, and a slab 54 mm thick or more near the heads (the
    ProstateX T2 study marked in ``docs/landmarks`` is 57 mm thick with its head centres 4 and 8 mm inside
    its lateral edges). Axial series: rows run +y, columns +x,
    slices +z (``ImageOrientationPatient = 1\\0\\0\\0\\1\\0``, spacing x = y = pixel spacing,
    z = slice thickness). Coronal series: rows run -z (first row is the most superior), columns
    +x, slices +y (``1\\0\\0\\0\\0\\-1``, normal = row x column = +y; spacing x = column
    spacing, z = row spacing, y = slice thickness). Slices are contiguous
    (``SpacingBetweenSlices == SliceThickness``). Read with SimpleITK and reoriented with
    ``DICOMOrient(image, "LPS")`` the array is ``[z, y, x]`` with
    ``ScannerProfile.voxel_spacing_mm`` as its ``(D, H, W)`` spacing (``grid_shape`` voxels,
    fewer when cropped).

Anatomy (per patient, jittered so that a detector must really localise)
    * Body: rounded-rectangle cylinder (half-width 150-170 mm, half-depth 96-108 mm), a
      subcutaneous fat layer (10-38 mm, thickest posteriorly), muscle inside it, a few thin
      intermuscular fat sheets, the bladder (fluid, bright), the rectum (wall + gas), femoral
      artery and vein flow voids, sacrum and coccyx.
    * Surroundings (since generator version 7): visceral fat filling the true pelvis, an
      ischioanal fat pad inferomedial to each hip (bright and roughly round, like a head),
      iliopsoas anterior to each hip and obturator internus on the inner pelvic wall
      (muscle), and 1-5 small-bowel or sigmoid loops above the bladder whose lumen holds gas
      (a signal void, 65 %) or fluid.
    * Pelvis per side: acetabular bone mass, iliac wing, ischium, superior and ischiopubic
      rami meeting at the pubic symphysis. Bones are a dark cortical shell around marrow.
      The acetabulum is a spherical socket carved into the pelvis (its wall is the dark
      cortical cup), lined by cartilage (intermediate signal); the femoral head carries its
      own cartilage layer.
    * Femur per side: head sphere (diameter 44-52 mm per patient, +-0.4 mm per side), neck
      (radius 0.62 x head radius, neck-shaft angle ~130 deg, some anteversion), greater and
      lesser trochanters, shaft with thick cortex. Femoral head centres at +-(85-100) mm from
      the patient midline; the midline itself is within +-8 mm of the FOV x-centre, heads
      within +-9 mm (y) and -14..+2 mm (z) of the FOV centre. The whole patient is rotated by
      up to 7 deg (yaw), 6 deg (roll: one hip higher, about 5 deg on the ProstateX study)
      and 8 deg (pitch).
    * Signal (arbitrary units before the scanner's ``intensity_scale``): air 0, fat 820,
      femoral marrow 660, pelvic marrow 560, muscle 270, cartilage 400, fluid 1000, cortex
      45, flow voids 35, bowel gas 25; per patient a global gain (sd 5 %), per tissue (sd
      4 %) and extra marrow fat-fraction jitter (sd 5 %).
    * Domain randomisation per study, so that a detector must learn the head's shape in its
      socket rather than "a bright ball": tissue contrast (fat x 0.72-1.15, muscle x
      0.55-1.35, fluid x 0.75-1.3, pelvic marrow and cartilage x 0.8-1.2; femoral marrow keeps
      the per-patient jitter, since the stage signs are defined against it), a receiver gain
      of 0.5-1.3 (log-uniform; signal and noise alike, so CNR is unchanged; real T2 marrow sits
      near 350 on the ProstateX study, phantom marrow near 660 before it), noise x 0.85-1.3,
      the scanner's bias-field strength x 0.4-1.8 (at most 0.6), and surface-coil brightening
      of the anterior and posterior body wall (up to +50 %, decay 35-80 mm), which makes
      subcutaneous fat the brightest tissue in some studies.
    * Every femoral head (all stages alike) has normal marrow heterogeneity (hypointense
      red-marrow islands, 15-80 units) and a physeal scar (a thin dark plane at the head-neck
      junction, 15-70 units): normal anatomy that mimics disease, so that texture energy alone
      does not give the stage away.

Ficat-Arlet labels (``shared_models.stages.FicatArletStage``), all T2 signs inside marrow
    * Stage 0: homogeneous fatty marrow (plus the normal features above).
    * Stage I: diffuse marrow-oedema-like hyperintensity in head and neck, no demarcated
      lesion: a broad Gaussian envelope (sd 0.55-0.9 x radius, centred slightly
      anterosuperior) times a patchy smooth random field (wavelengths 14-26 mm), peak
      40-120 units.
    * Stage II: a demarcated subchondral lesion in the anterosuperior head: the head
      intersected with a ball of radius 0.35-0.7 x head radius centred on the anterosuperior
      surface, its border made serpiginous (+-10 %). T2 double-line sign: an inner bright band
      (granulation tissue, 120-220 units, 3-5 mm) and an outer dark band (sclerosis, 120-240
      units, 3-5 mm); the necrotic interior is slightly darker than marrow (-100..-10 units); 30 % of
      stage II heads also carry mild oedema (20-60 units), which can mask the dark band.
    * Disease parameters are drawn from each side's own random stream, unconditionally, so
      the same seed with other stages gives the same anatomy and noise (counterfactuals).
    * A joint effusion (bright fluid around the neck) is present in 15 % of stage 0 heads and
      35 % of stage I/II heads: a weak, realistic correlate, not a label.
    * Patients with one manifest row: the other hip is out of scope (Ficat-Arlet III, a
      collapsed head with a large lesion, 60 %) or unlabelled normal (40 %); it is still imaged.
    * Pairing of the two sides is random, so a patient can be stage I/II on one side and 0 on
      the other.
    * Signs are subtle on purpose: each sign's per-voxel contrast-to-noise ratio against the
      same head without the sign is about 0.5-2.5 at the noisiest (1.5T) scanner and at most
      about 4-5.5 at the 3T scanners, and amplitudes and sizes vary per head so that some cases
      are hard. Paper profile, seed 0, mean CNR per site A/B/C/D: stage I oedema 1.5/1.6/0.9/0.6;
      stage II bright band 3.7/3.3/1.9/2.1, dark band 3.8/3.3/2.4/2.2. (An earlier setting with
      band CNR 1.6-1.8 at A, 2-3.5 mm bands, proved below what 231 training heads can teach the
      default stager: macro AUC about 0.75; the double-line sign is conspicuous on real T2.)
      First-order intensity statistics of the head box do not separate the stages (see the
      report's logistic-regression baseline).
      ``phantoms.json`` records the measured CNR per site and sign: for every head, the sign
      region is where the noise-free sign field reaches half its peak; CNR = |mean(final
      image - noise-free image without the sign)| over that region / the noise sigma measured
      in the same head's marrow (all in rescaled scanner units, after bias field, Rician noise
      and quantisation).

Label geometry
    ``box_lps_mm`` is the femoral head core area: the axis-aligned box ``centre +- radius`` of
    the head sphere (bone surface, without cartilage), ``x0 y0 z0 x1 y1 z1``, 3 decimals. It is
    exact in the written images (no rounding of the anatomy to the voxel grid).

Counts (``PROFILES["paper"]``), after Yang et al., Front. Surg. 2025 (doi:10.3389/fsurg.2025.1555749)
    209 patients, 381 femoral heads, 4 centers. Heads per center A 289 (internal), B 49
    (external test set 1, Table 2), C 22 + D 21 (external test set 2, 43 heads). Patients per
    center A 158, B 27, C 12, D 12 (so 172 patients contribute both hips, 37 one hip). Stage
    split per the abstract (142 non-ONFH, 239 early ONFH; section 3.1 swaps the two numbers,
    we follow the abstract): stage 0 142, I 89, II 150. The external counts are read from
    Table 2's sensitivities and specificities (external 1: 17/7/25, e.g. stage I sensitivity
    71.43 % = 5/7 and specificity 83.33 % = 35/42; external 2: 16/5/22), center A holds the
    rest (109/77/103); C and D share external 2 as 8/3/11 and 8/2/11.

Scanners (paper section 2.2 names Siemens MAGNETOM Prisma 3T and Philips Ingenia 1.5T)
    A: Prisma 3T, axial, 1.5 x 1.5 x 4 mm, least noise. B: Prisma 3T, coronal, 1.6 x 1.6 x 5
    mm, brighter. C: Ingenia 1.5T, axial, 1.875 x 1.875 x 4.8 mm, more noise, stronger bias,
    Philips-like rescale slope. D: Ingenia 1.5T, coronal, 1.8 x 1.8 x 6 mm, larger FOV, most
    noise, strongest bias, signed pixels with a non-zero rescale intercept. Noise is Rician
    (magnitude of complex Gaussian); the bias field is a smooth random quadratic (normalised
    over the scanner's full field of view) times the surface-coil term above. After rescale,
    marrow and fat fall at about 250-1200, inside the project window (level 300, width 1500).

DICOM files
    One single-frame MR Image Storage series per study, explicit VR little endian,
    uncompressed, 16-bit pixels with 12 bits stored, ``RescaleSlope``/``RescaleIntercept`` to
    scanner units (Siemens: uint16, 1/0; center C: uint16, slope 2.12454212; center D: int16,
    slope 1.5, intercept -100). Files sit in ``<study>/DICOM/``, named at random per center
    style (32-hex ``.dcm``, ``IM#####`` or 8-hex, no extension), written in shuffled order;
    ``InstanceNumber`` ascends along the slice normal for Siemens and descends for Philips, so
    readers must sort by ``ImagePositionPatient`` (GDCM does). About half the studies carry a
    junk non-DICOM file (``README.txt`` in the study folder, ``.DS_Store`` or ``Thumbs.db`` next
    to the images). ``PatientID``/``PatientName`` are synthetic pseudonyms (``A-0007``,
    ``PHANTOM^A-0007``); study folders are numbered independently (``study-0042``).

Profiles and cost
    ``"paper"``: the counts above at full resolution (<= 1.4 M voxels per study, fewer when
    cropped); on 2 idle CPU cores generator version 6 took about 50 s (540 MB). Version 7
    (surroundings, randomisation, crops) writes 373 MB; rendering and writing the same 24
    studies (6 per scanner), versions interleaved on the same loaded machine, took 0.83 x
    version 6's time (cropped studies have fewer voxels; quick profile 0.82 x). ``"quick"``:
    the same four scanners at 3-3.6 mm x 6 mm voxels, 10/6/4/4 heads from 6/4/3/2 patients,
    about 1-3 s and 5 MB.

Determinism
    Everything derives from ``seed`` through ``numpy.random.SeedSequence`` keyed by site and
    patient, and DICOM UIDs come from ``pydicom.uid.generate_uid`` with entropy from the same
    keys, so the same seed gives byte-identical files whatever the number of workers.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from shared_models.stages import STAGE_LABELS, FicatArletStage

__all__ = [
    "FOV_CENTRE_LPS_MM",
    "GENERATOR_VERSION",
    "PROFILES",
    "PhantomProfile",
    "ScannerProfile",
    "generate_phantoms",
    "read_ground_truth",
]

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 7
"""Bumped whenever the output for a given profile and seed changes."""

FOV_CENTRE_LPS_MM: tuple[float, float, float] = (0.0, 0.0, 0.0)
"""Physical centre of every phantom's field of view."""

SUMMARY_FILE = "phantoms.json"
GROUND_TRUTH_FILE = "ground_truth.csv"
MANIFEST_COLUMNS = ("patient_id", "study", "side", "ficat_stage", "box_lps_mm", "scanner")
_MARKER_FILE = ".onfh-phantoms"
_SIDES = ("R", "L")
_SIGN_KEYS = ("I_oedema", "II_bright_band", "II_dark_band", "II_necrotic", "II_oedema")


# --------------------------------------------------------------------------------------
# Profiles
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ScannerProfile:
    """Acquisition traits of one center's T2 TSE hip protocol.

    Attributes:
        vendor: DICOM ``Manufacturer`` (``"SIEMENS"``, ``"Philips"``).
        model: DICOM ``ManufacturerModelName``.
        field_strength_t: ``MagneticFieldStrength`` in tesla.
        pixel_spacing_mm: DICOM ``PixelSpacing`` order: (spacing between rows, between columns).
        slice_thickness_mm: slice thickness = spacing between slices (no gap).
        slice_orientation: ``"axial"`` (normal +z) or ``"coronal"`` (normal +y).
        noise_sigma: Gaussian sigma of each complex channel (Rician magnitude noise), in
            phantom units before ``intensity_scale``.
        bias_field_strength: maximum relative deviation of the multiplicative bias field.
        intensity_scale: receiver gain; scanner value = phantom units x scale (before noise
            is scaled too, so CNR does not depend on it).
        rescale_slope, rescale_intercept: DICOM rescale; stored = round((value - b) / m).
        fov_lps_mm: field of view extent along LPS x, y, z; each must be a whole number of
            voxels.
        pixel_signed: store int16 (``PixelRepresentation`` 1) instead of uint16.
        echo_time_ms, repetition_time_ms: T2-weighted TSE timing.
        series_description: DICOM ``SeriesDescription``; derived from vendor and orientation
            when empty.
    """

    vendor: str
    model: str
    field_strength_t: float
    pixel_spacing_mm: tuple[float, float]
    slice_thickness_mm: float
    slice_orientation: str
    noise_sigma: float
    bias_field_strength: float
    intensity_scale: float
    rescale_slope: float
    rescale_intercept: float
    fov_lps_mm: tuple[float, float, float] = (360.0, 240.0, 144.0)
    pixel_signed: bool = False
    echo_time_ms: float = 90.0
    repetition_time_ms: float = 4000.0
    series_description: str = ""

    def __post_init__(self) -> None:
        if self.slice_orientation not in ("axial", "coronal"):
            raise ValueError(f"slice_orientation must be 'axial' or 'coronal', got {self.slice_orientation!r}")
        if len(self.pixel_spacing_mm) != 2 or min(self.pixel_spacing_mm) <= 0:
            raise ValueError(f"pixel_spacing_mm must be two positive numbers, got {self.pixel_spacing_mm}")
        for name in ("field_strength_t", "slice_thickness_mm", "intensity_scale", "rescale_slope"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("noise_sigma", "bias_field_strength"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.bias_field_strength >= 0.9:
            raise ValueError(f"bias_field_strength must be < 0.9, got {self.bias_field_strength}")
        if len(self.fov_lps_mm) != 3:
            raise ValueError(f"fov_lps_mm must have 3 values, got {self.fov_lps_mm}")
        for axis, fov, spacing in zip("xyz", self.fov_lps_mm, self.lps_spacing_mm):
            n = fov / spacing
            if abs(n - round(n)) > 1e-6 or round(n) < 2:
                raise ValueError(f"fov_lps_mm {axis}={fov} is not a whole number (>= 2) of {spacing} mm voxels")

    @property
    def label(self) -> str:
        """Manifest ``scanner`` value, e.g. ``"SIEMENS Prisma 3T"``."""
        return f"{self.vendor} {self.model} {self.field_strength_t:g}T"

    @property
    def lps_spacing_mm(self) -> tuple[float, float, float]:
        """Voxel spacing along LPS x, y, z."""
        row, col = (float(v) for v in self.pixel_spacing_mm)
        if self.slice_orientation == "axial":
            return (col, row, float(self.slice_thickness_mm))
        return (col, float(self.slice_thickness_mm), row)

    @property
    def voxel_spacing_mm(self) -> tuple[float, float, float]:
        """``(D, H, W)`` spacing of the LPS-oriented array (``[z, y, x]``)."""
        sx, sy, sz = self.lps_spacing_mm
        return (sz, sy, sx)

    @property
    def grid_shape(self) -> tuple[int, int, int]:
        """``(D, H, W)`` voxel counts of the LPS-oriented array."""
        nx, ny, nz = (int(round(f / s)) for f, s in zip(self.fov_lps_mm, self.lps_spacing_mm))
        return (nz, ny, nx)

    @property
    def description(self) -> str:
        """The ``SeriesDescription`` written to DICOM."""
        if self.series_description:
            return self.series_description
        plane = "TRA" if self.slice_orientation == "axial" else "COR"
        prefix = "T2W_TSE" if self.vendor.lower().startswith("philips") else "T2_TSE"
        return f"{prefix}_{plane}"


def _default_external_groups() -> dict[str, tuple[str, ...]]:
    return {"external-1": ("B",), "external-2": ("C", "D")}


@dataclass(frozen=True)
class PhantomProfile:
    """How many phantoms each center gets and how they are acquired.

    Attributes:
        name: profile name (recorded in ``phantoms.json``).
        heads_per_site: labelled femoral heads (manifest rows) per site id.
        patients_per_site: patients (= studies) per site; ``P <= heads <= 2 P``, and
            ``heads - P`` patients contribute both hips.
        stage_fractions: target fractions of Ficat-Arlet stage 0, I, II.
        scanners: one ``ScannerProfile`` per site id.
        external_groups: held-out test sets, by site id.
        stage_counts_per_site: exact (stage 0, I, II) head counts per site; when ``None``
            they are derived from ``stage_fractions`` (see ``stage_counts``).
    """

    name: str
    heads_per_site: dict[str, int]
    patients_per_site: dict[str, int]
    stage_fractions: tuple[float, float, float]
    scanners: dict[str, ScannerProfile]
    external_groups: dict[str, tuple[str, ...]] = field(default_factory=_default_external_groups)
    stage_counts_per_site: dict[str, tuple[int, int, int]] | None = None

    def __post_init__(self) -> None:
        sites = set(self.heads_per_site)
        if not sites:
            raise ValueError("heads_per_site is empty")
        for name in ("patients_per_site", "scanners"):
            if set(getattr(self, name)) != sites:
                raise ValueError(f"{name} must name the same sites as heads_per_site ({sorted(sites)})")
        for site in sites:
            if not site or not site.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"site id {site!r} must be a plain folder name")
            heads, patients = self.heads_per_site[site], self.patients_per_site[site]
            if not (1 <= patients <= heads <= 2 * patients):
                raise ValueError(
                    f"site {site}: need 1 <= patients <= heads <= 2 x patients, got "
                    f"{patients} patients and {heads} heads"
                )
            if not isinstance(self.scanners[site], ScannerProfile):
                raise ValueError(f"scanners[{site!r}] must be a ScannerProfile")
        if len(self.stage_fractions) != 3 or min(self.stage_fractions) < 0:
            raise ValueError(f"stage_fractions must be 3 non-negative numbers, got {self.stage_fractions}")
        if abs(sum(self.stage_fractions) - 1.0) > 1e-6:
            raise ValueError(f"stage_fractions must sum to 1, got {sum(self.stage_fractions)}")
        for group, members in self.external_groups.items():
            unknown = set(members) - sites
            if unknown:
                raise ValueError(f"external_groups[{group!r}] names unknown sites {sorted(unknown)}")
        if self.stage_counts_per_site is not None:
            if set(self.stage_counts_per_site) != sites:
                raise ValueError("stage_counts_per_site must name the same sites as heads_per_site")
            for site, counts in self.stage_counts_per_site.items():
                if len(counts) != 3 or min(counts) < 0 or sum(counts) != self.heads_per_site[site]:
                    raise ValueError(
                        f"stage_counts_per_site[{site!r}]={counts} must be 3 counts summing to "
                        f"heads_per_site[{site!r}]={self.heads_per_site[site]}"
                    )

    @property
    def sites(self) -> tuple[str, ...]:
        """Site ids in sorted order."""
        return tuple(sorted(self.heads_per_site))

    @property
    def total_heads(self) -> int:
        return sum(self.heads_per_site.values())

    @property
    def total_patients(self) -> int:
        return sum(self.patients_per_site.values())

    def stage_counts(self) -> dict[str, tuple[int, int, int]]:
        """Heads per (stage 0, I, II) for every site.

        ``stage_counts_per_site`` when given; otherwise a controlled rounding of
        ``heads x stage_fractions`` whose rows sum to each site's heads and whose columns sum
        to the largest-remainder rounding of ``total heads x stage_fractions``.
        """
        if self.stage_counts_per_site is not None:
            return {s: tuple(int(v) for v in self.stage_counts_per_site[s]) for s in self.sites}
        fractions = np.asarray(self.stage_fractions, dtype=float)
        totals = _largest_remainder(self.total_heads * fractions, self.total_heads)
        expected = np.array([[self.heads_per_site[s] * f for f in fractions] for s in self.sites])
        counts = np.floor(expected + 1e-9).astype(int)
        remainder = expected - counts
        row_deficit = np.array([self.heads_per_site[s] for s in self.sites]) - counts.sum(axis=1)
        col_deficit = totals - counts.sum(axis=0)
        while row_deficit.sum() > 0:
            candidates = [
                (remainder[i, k], -i, -k)
                for i in range(len(self.sites))
                for k in range(3)
                if row_deficit[i] > 0 and col_deficit[k] > 0
            ]
            _, i, k = max(candidates)
            i, k = -i, -k
            counts[i, k] += 1
            remainder[i, k] -= 1.0
            row_deficit[i] -= 1
            col_deficit[k] -= 1
        return {s: tuple(int(v) for v in counts[i]) for i, s in enumerate(self.sites)}

    def fingerprint(self) -> str:
        """SHA-256 of the profile's canonical JSON (for idempotent regeneration)."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True, default=list)
        return hashlib.sha256(text.encode()).hexdigest()


def _largest_remainder(values: np.ndarray, total: int) -> np.ndarray:
    floors = np.floor(values + 1e-9).astype(int)
    order = np.argsort(-(values - floors), kind="stable")
    for k in order[: total - int(floors.sum())]:
        floors[k] += 1
    return floors


_PAPER_SCANNERS: dict[str, ScannerProfile] = {
    "A": ScannerProfile(
        vendor="SIEMENS",
        model="Prisma",
        field_strength_t=3.0,
        pixel_spacing_mm=(1.5, 1.5),
        slice_thickness_mm=4.0,
        slice_orientation="axial",
        noise_sigma=32.0,
        bias_field_strength=0.10,
        intensity_scale=1.00,
        rescale_slope=1.0,
        rescale_intercept=0.0,
        fov_lps_mm=(360.0, 240.0, 144.0),
        echo_time_ms=92.0,
        repetition_time_ms=4200.0,
    ),
    "B": ScannerProfile(
        vendor="SIEMENS",
        model="Prisma",
        field_strength_t=3.0,
        pixel_spacing_mm=(1.6, 1.6),
        slice_thickness_mm=5.0,
        slice_orientation="coronal",
        noise_sigma=36.0,
        bias_field_strength=0.15,
        intensity_scale=1.15,
        rescale_slope=1.0,
        rescale_intercept=0.0,
        fov_lps_mm=(360.0, 240.0, 144.0),
        echo_time_ms=101.0,
        repetition_time_ms=3800.0,
    ),
    "C": ScannerProfile(
        vendor="Philips",
        model="Ingenia",
        field_strength_t=1.5,
        pixel_spacing_mm=(1.875, 1.875),
        slice_thickness_mm=4.8,
        slice_orientation="axial",
        noise_sigma=50.0,
        bias_field_strength=0.25,
        intensity_scale=0.85,
        rescale_slope=2.12454212,
        rescale_intercept=0.0,
        fov_lps_mm=(360.0, 240.0, 144.0),
        echo_time_ms=80.0,
        repetition_time_ms=3500.0,
    ),
    "D": ScannerProfile(
        vendor="Philips",
        model="Ingenia",
        field_strength_t=1.5,
        pixel_spacing_mm=(1.8, 1.8),
        slice_thickness_mm=6.0,
        slice_orientation="coronal",
        noise_sigma=55.0,
        bias_field_strength=0.30,
        intensity_scale=0.92,
        rescale_slope=1.5,
        rescale_intercept=-100.0,
        pixel_signed=True,
        fov_lps_mm=(378.0, 252.0, 144.0),
        echo_time_ms=85.0,
        repetition_time_ms=3300.0,
    ),
}

# Same centers and contrasts, coarse voxels: for tests and a fast demo.
_QUICK_SCANNERS: dict[str, ScannerProfile] = {
    "A": dataclasses.replace(_PAPER_SCANNERS["A"], pixel_spacing_mm=(3.0, 3.0), slice_thickness_mm=6.0),
    "B": dataclasses.replace(_PAPER_SCANNERS["B"], pixel_spacing_mm=(3.0, 3.0), slice_thickness_mm=6.0),
    "C": dataclasses.replace(_PAPER_SCANNERS["C"], pixel_spacing_mm=(3.0, 3.0), slice_thickness_mm=6.0),
    "D": dataclasses.replace(_PAPER_SCANNERS["D"], pixel_spacing_mm=(3.6, 3.6), slice_thickness_mm=6.0),
}

_PAPER_STAGE_FRACTIONS = (142 / 381, 89 / 381, 150 / 381)

PROFILES: dict[str, PhantomProfile] = {
    "paper": PhantomProfile(
        name="paper",
        heads_per_site={"A": 289, "B": 49, "C": 22, "D": 21},
        patients_per_site={"A": 158, "B": 27, "C": 12, "D": 12},
        stage_fractions=_PAPER_STAGE_FRACTIONS,
        scanners=_PAPER_SCANNERS,
        external_groups=_default_external_groups(),
        stage_counts_per_site={"A": (109, 77, 103), "B": (17, 7, 25), "C": (8, 3, 11), "D": (8, 2, 11)},
    ),
    "quick": PhantomProfile(
        name="quick",
        heads_per_site={"A": 10, "B": 6, "C": 4, "D": 4},
        patients_per_site={"A": 6, "B": 4, "C": 3, "D": 2},
        stage_fractions=_PAPER_STAGE_FRACTIONS,
        scanners=_QUICK_SCANNERS,
        external_groups=_default_external_groups(),
    ),
}


# --------------------------------------------------------------------------------------
# Geometry primitives (signed distance functions on broadcast coordinate blocks)
# --------------------------------------------------------------------------------------

Vec = tuple[float, float, float]


def _vec(v: Any) -> Vec:
    a = np.asarray(v, dtype=float).reshape(3)
    return (float(a[0]), float(a[1]), float(a[2]))


def _unit(v: Any) -> np.ndarray:
    a = np.asarray(v, dtype=float)
    return a / np.linalg.norm(a)


def _rot(axis: str, degrees: float) -> np.ndarray:
    c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    if axis == "x":
        return np.array([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=float)
    if axis == "y":
        return np.array([[c, 0, s], [0, 1, 0], [-s, 0, c]], dtype=float)
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], dtype=float)


@dataclass(frozen=True)
class _Sphere:
    centre: Vec
    radius: float

    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        c = np.asarray(self.centre)
        return c - self.radius, c + self.radius

    def sdf(self, X, Y, Z):
        cx, cy, cz = self.centre
        return np.sqrt((X - cx) ** 2 + (Y - cy) ** 2 + (Z - cz) ** 2) - self.radius


@dataclass(frozen=True)
class _Capsule:
    a: Vec
    b: Vec
    radius: float

    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        a, b = np.asarray(self.a), np.asarray(self.b)
        return np.minimum(a, b) - self.radius, np.maximum(a, b) + self.radius

    def sdf(self, X, Y, Z):
        ax, ay, az = self.a
        bx, by, bz = (self.b[0] - ax, self.b[1] - ay, self.b[2] - az)
        length2 = bx * bx + by * by + bz * bz
        px, py, pz = X - ax, Y - ay, Z - az
        t = np.clip((px * bx + py * by + pz * bz) * (1.0 / length2), 0.0, 1.0)
        return np.sqrt((px - t * bx) ** 2 + (py - t * by) ** 2 + (pz - t * bz) ** 2) - self.radius


@dataclass(frozen=True)
class _Ellipsoid:
    centre: Vec
    semi_axes: Vec
    rotation: tuple[Vec, Vec, Vec]  # world-from-local, rows

    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        m = np.asarray(self.rotation)
        half = np.sqrt(((m * np.asarray(self.semi_axes)[None, :]) ** 2).sum(axis=1))
        c = np.asarray(self.centre)
        return c - half, c + half

    def sdf(self, X, Y, Z):
        m = self.rotation
        dx, dy, dz = X - self.centre[0], Y - self.centre[1], Z - self.centre[2]
        k2 = 0.0
        for j in range(3):
            u = dx * m[0][j] + dy * m[1][j] + dz * m[2][j]
            k2 = k2 + (u * (1.0 / self.semi_axes[j])) ** 2
        return (np.sqrt(k2) - 1.0) * min(self.semi_axes)


def _ellipsoid(centre: Any, semi: Any, rotation: np.ndarray) -> _Ellipsoid:
    rows = tuple(_vec(r) for r in np.asarray(rotation, dtype=float))
    return _Ellipsoid(_vec(centre), _vec(semi), rows)  # type: ignore[arg-type]


@dataclass(frozen=True)
class _Intersect:
    a: Any
    b: Any

    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        (la, ha), (lb, hb) = self.a.bbox(), self.b.bbox()
        return np.maximum(la, lb), np.minimum(ha, hb)

    def sdf(self, X, Y, Z):
        return np.maximum(self.a.sdf(X, Y, Z), self.b.sdf(X, Y, Z))


@dataclass(frozen=True)
class _Body:
    """Rounded-rectangle cylinder along the patient's (rotated) z axis."""

    centre: Vec
    half_width: float
    half_depth: float
    rotation: tuple[Vec, Vec, Vec]

    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        return np.full(3, -1e9), np.full(3, 1e9)

    def sdf(self, X, Y, Z):
        m = self.rotation
        dx, dy, dz = X - self.centre[0], Y - self.centre[1], Z - self.centre[2]
        ux = (dx * m[0][0] + dy * m[1][0] + dz * m[2][0]) * (1.0 / self.half_width)
        uy = (dx * m[0][1] + dy * m[1][1] + dz * m[2][1]) * (1.0 / self.half_depth)
        t, s = ux * ux, uy * uy
        k = 0.6 * np.sqrt(np.sqrt(t * t + s * s)) + 0.4 * np.sqrt(t + s)
        return (k - 1.0) * self.half_depth


@dataclass(frozen=True)
class _Bone:
    """Union of parts, each with its own cortical thickness; optional carved socket and cut."""

    parts: tuple[tuple[Any, float], ...]
    carve: tuple[Vec, float, float] | None = None  # (centre, radius, wall cortex mm)
    flatten: tuple[Vec, Vec, float] | None = None  # (origin, outward normal, cortex mm)

    def bbox(self) -> tuple[np.ndarray, np.ndarray]:
        boxes = [p.bbox() for p, _ in self.parts]
        return np.min([b[0] for b in boxes], axis=0), np.max([b[1] for b in boxes], axis=0)

    def union_sdf(self, X, Y, Z):
        out = None
        for part, _ in self.parts:
            sd = part.sdf(X, Y, Z)
            out = sd if out is None else np.minimum(out, sd)
        return out

    def sdfs(self, X, Y, Z):
        """(outer surface, marrow surface) signed distances."""
        outer = inner = None
        for part, cortex in self.parts:
            sd = part.sdf(X, Y, Z)
            outer = sd if outer is None else np.minimum(outer, sd)
            inner = sd + cortex if inner is None else np.minimum(inner, sd + cortex)
        if self.carve is not None:
            (cx, cy, cz), radius, wall = self.carve
            hole = radius - np.sqrt((X - cx) ** 2 + (Y - cy) ** 2 + (Z - cz) ** 2)
            outer = np.maximum(outer, hole)
            inner = np.maximum(inner, hole + wall)
        if self.flatten is not None:
            (ox, oy, oz), (nx, ny, nz), cortex = self.flatten
            plane = (X - ox) * nx + (Y - oy) * ny + (Z - oz) * nz
            outer = np.maximum(outer, plane)
            inner = np.maximum(inner, plane + cortex)
        return outer, inner


def _occupancy(sd: np.ndarray, fallback_width: float) -> np.ndarray:
    """Partial-volume fraction inside ``sd < 0`` for voxels of the block's grid.

    The ramp width is |grad sd| per voxel step (the surface's extent across one voxel along
    its normal), so anisotropic voxels blur surfaces the way a box-shaped voxel would.
    """
    axes = tuple(a for a in range(sd.ndim) if sd.shape[a] >= 2)
    if axes:
        grads = np.gradient(sd, axis=axes)
        if len(axes) == 1:
            grads = [grads]
        width = np.sqrt(sum(g * g for g in grads))
        np.maximum(width, 0.05, out=width)
    else:
        width = np.float32(fallback_width)
    return np.clip(0.5 - sd / width, 0.0, 1.0)


class _Canvas:
    """An LPS-aligned voxel grid ``[z, y, x]`` with voxel-centre coordinate vectors."""

    def __init__(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> None:
        self.x = x.astype(np.float32)
        self.y = y.astype(np.float32)
        self.z = z.astype(np.float32)
        steps = [float(abs(a[1] - a[0])) if len(a) > 1 else 1.0 for a in (x, y, z)]
        self.margin = 2.0 * max(steps)
        self.mean_step = float(np.mean(steps))
        self.img = np.zeros((len(z), len(y), len(x)), dtype=np.float32)

    def block(self, lo: np.ndarray, hi: np.ndarray) -> tuple[slice, slice, slice] | None:
        out = []
        for coords, low, high in zip((self.z, self.y, self.x), lo[::-1], hi[::-1]):
            i0 = int(np.searchsorted(coords, low - self.margin, "left"))
            i1 = int(np.searchsorted(coords, high + self.margin, "right"))
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return tuple(out)  # type: ignore[return-value]

    def coords(self, sl: tuple[slice, slice, slice]):
        return (
            self.x[sl[2]][None, None, :],
            self.y[sl[1]][None, :, None],
            self.z[sl[0]][:, None, None],
        )

    def paint_sd(self, sl, sd: np.ndarray, value: float) -> np.ndarray:
        occ = _occupancy(sd, self.mean_step)
        blk = self.img[sl]
        blk += occ * (np.float32(value) - blk)
        return occ

    def paint(self, shape: Any, value: float) -> None:
        sl = self.block(*shape.bbox())
        if sl is not None:
            self.paint_sd(sl, shape.sdf(*self.coords(sl)), value)

    def paint_bone(self, bone: _Bone, cortex: float, marrow: float) -> None:
        sl = self.block(*bone.bbox())
        if sl is not None:
            outer, inner = bone.sdfs(*self.coords(sl))
            self.paint_sd(sl, outer, cortex)
            self.paint_sd(sl, inner, marrow)


# --------------------------------------------------------------------------------------
# Patient model
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Waves:
    """Smooth random field: sum of plane waves, unit variance, resolution independent."""

    k: tuple[Vec, ...]
    phase: tuple[float, ...]

    def __call__(self, dX, dY, dZ):
        out = 0.0
        for (kx, ky, kz), ph in zip(self.k, self.phase):
            out = out + np.cos(dX * kx + dY * ky + dZ * kz + ph)
        return out * math.sqrt(2.0 / len(self.k))


def _waves(rng: np.random.Generator, n: int, wavelength_mm: tuple[float, float]) -> _Waves:
    dirs = rng.normal(size=(n, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    k = dirs * (2 * math.pi / rng.uniform(*wavelength_mm, size=n))[:, None]
    return _Waves(tuple(_vec(v) for v in k), tuple(float(p) for p in rng.uniform(0, 2 * math.pi, n)))


@dataclass(frozen=True)
class _Lesion:
    tip: Vec  # centre of the demarcating ball, on the anterosuperior head surface
    radius: float
    border: _Waves
    necrotic: float
    bright: float
    bright_width: float
    dark: float
    dark_width: float


@dataclass(frozen=True)
class _Oedema:
    centre: Vec
    sigma: float
    amplitude: float
    patches: _Waves


@dataclass(frozen=True)
class _Head:
    side: str
    stage: int | None  # None: imaged but not labelled (out of scope or unlabelled normal)
    collapsed: bool
    centre: Vec
    radius: float
    femur: _Bone
    het_amplitude: float
    het: _Waves
    scar_amplitude: float
    scar_origin: Vec
    scar_normal: Vec
    oedema: _Oedema | None
    lesion: _Lesion | None
    effusion_mm: float
    neck_axis: tuple[Vec, Vec]
    neck_radius: float

    @property
    def mods_radius(self) -> float:
        """Marrow signal changes vanish beyond this distance from the centre."""
        return self.radius + 10.0


@dataclass(frozen=True)
class _Surroundings:
    """What surrounds the hips on a real pelvic MRI beyond the bones (drawn from its own stream).

    ``visceral_fat``: fat filling the true pelvis and the ischioanal fossae; ``muscles``:
    iliopsoas (anterior to each hip) and obturator internus (lining the inner pelvic wall);
    ``bowel``: (wall, lumen, lumen tissue key) of small-bowel and sigmoid loops, the lumen gas
    (a signal void) or fluid.
    """

    visceral_fat: tuple[_Ellipsoid, ...]
    muscles: tuple[_Ellipsoid, ...]
    bowel: tuple[tuple[_Ellipsoid, _Ellipsoid, str], ...]


@dataclass(frozen=True)
class _Domain:
    """Per-study acquisition randomisation (domain randomisation; drawn from its own stream).

    ``gain`` scales signal and noise alike (so CNR is unchanged), ``noise_factor`` scales the
    noise only, ``bias_factor`` the scanner's bias-field strength; ``coil`` adds surface-coil
    brightening near the anterior and posterior body wall (peak gain, decay length mm);
    ``fov_lps_mm`` is the study's field of view ``(x0, y0, z0, x1, y1, z1)`` (a crop of the
    scanner's, or the scanner's own). ``slab`` ``(tilt deg, y mm, z mm, half-thickness mm)``:
    an oblique slab (normal ``(0, sin tilt, cos tilt)`` through ``(., y, z)``) outside which
    the study reads 0, as an oblique acquisition does once resampled onto LPS axes.
    """

    gain: float
    noise_factor: float
    bias_factor: float
    coil: tuple[float, float]
    fov_lps_mm: tuple[float, float, float, float, float, float] | None
    slab: tuple[float, float, float, float] | None = None


@dataclass(frozen=True)
class _Patient:
    sex: str
    age: int
    tissue: dict[str, float]
    body: _Body
    muscle: _Body
    fat_sheets: tuple[_Ellipsoid, ...]
    bladder: _Ellipsoid
    rectum_wall: _Ellipsoid
    rectum_lumen: _Ellipsoid
    vessels: tuple[_Capsule, ...]
    sacrum: _Bone
    pelvis: tuple[_Bone, ...]
    acetabula: tuple[tuple[_Bone, _Sphere], ...]
    heads: tuple[_Head, ...]
    bias: tuple[float, ...]
    surroundings: _Surroundings
    domain: _Domain


_BASE_TISSUE = {
    "fat": 820.0,
    "muscle": 270.0,
    "femoral_marrow": 660.0,
    "pelvic_marrow": 560.0,
    "cortex": 45.0,
    "cartilage": 400.0,
    "fluid": 1000.0,
    "flow_void": 35.0,
    "gas": 25.0,
    "bowel_wall": 300.0,
    "bowel_fluid": 700.0,
}

# Per-study contrast randomisation: each tissue's signal is multiplied by a factor drawn
# uniformly from this range (on top of the per-patient jitter), so that neither "brighter
# than fat" nor "as bright as marrow" identifies a femoral head. Femoral marrow itself is
# left to the patient jitter: the stage signs are defined against it.
_CONTRAST_RANGE = {
    "fat": (0.72, 1.15),
    "muscle": (0.55, 1.35),
    "pelvic_marrow": (0.8, 1.2),
    "cartilage": (0.8, 1.2),
    "fluid": (0.75, 1.3),
    "bowel_wall": (0.8, 1.25),
    "bowel_fluid": (0.7, 1.3),
}


def _sample_patient(
    seed: np.random.SeedSequence,
    sides: dict[str, int | None],
    scanner_fov_lps_mm: tuple[float, float, float] = (360.0, 240.0, 144.0),
    crop_probability: float = 0.5,
) -> _Patient:
    """Draw one patient's anatomy in world LPS mm, and the study's acquisition randomisation.

    ``sides`` maps side -> stage; a side that is absent (or None) is imaged but not labelled.
    Anatomy comes from one stream, each side's disease parameters from its own, and the
    surroundings (visceral fat, muscles, bowel) and the per-study domain randomisation
    (contrast, gain, noise, bias, coil, field-of-view crop) from a fourth, all drawn
    unconditionally, so the same seed with other stages gives the same anatomy.
    ``scanner_fov_lps_mm`` is the scanner's full field of view (centred on
    ``FOV_CENTRE_LPS_MM``); with ``crop_probability`` the study's is a random crop of it.
    """
    anatomy_seed, *side_seeds, extra_seed = seed.spawn(2 + len(_SIDES))
    rng = np.random.default_rng(anatomy_seed)
    extra = np.random.default_rng(extra_seed)
    sign_rngs = {side: np.random.default_rng(ss) for side, ss in zip(_SIDES, side_seeds)}
    u = rng.uniform
    mid = np.array(
        [
            float(np.clip(rng.normal(0, 3.5), -8, 8)),
            float(np.clip(rng.normal(0, 4.0), -9, 9)),
            float(np.clip(rng.normal(-6, 4.0), -14, 2)),
        ]
    )
    # yaw, roll (one hip higher than the other: about 5 deg on the ProstateX study) and pitch
    rot = (
        _rot("z", float(np.clip(rng.normal(0, 3.0), -7, 7)))
        @ _rot("y", float(np.clip(rng.normal(0, 2.5), -6, 6)))
        @ _rot("x", float(np.clip(rng.normal(0, 3.0), -8, 8)))
    )

    def world(v: Any) -> Vec:
        return _vec(mid + rot @ np.asarray(v, dtype=float))

    gain = rng.normal(1.0, 0.05)
    tissue = {k: float(v * gain * rng.normal(1.0, 0.04)) for k, v in _BASE_TISSUE.items()}
    tissue["femoral_marrow"] *= float(rng.normal(1.0, 0.05))

    half_width, half_depth, body_y = u(150, 170), u(96, 108), u(6, 14)
    fat_ant, fat_lat, fat_post = u(10, 28), u(14, 32), u(18, 38)
    rot_rows = tuple(_vec(r) for r in rot)
    body = _Body(world((0, body_y, 0)), half_width, half_depth, rot_rows)  # type: ignore[arg-type]
    muscle = _Body(
        world((0, body_y + (fat_ant - fat_post) / 2, 0)),
        half_width - fat_lat,
        half_depth - (fat_ant + fat_post) / 2,
        rot_rows,  # type: ignore[arg-type]
    )

    sheets = []
    for side_sign in (-1.0, 1.0):
        for _ in range(3):
            local = _rot("z", u(-60, 60)) @ _rot("x", u(-30, 30)) @ _rot("y", u(-30, 30))
            sheets.append(
                _ellipsoid(
                    world((side_sign * u(40, 135), u(-60, 70), u(-60, 60))),
                    (u(1.2, 2.2), u(25, 50), u(30, 60)),
                    rot @ local,
                )
            )

    bladder = _ellipsoid(world((0, u(-48, -34), u(22, 38))), (u(25, 45), u(16, 26), u(18, 32)), rot)
    rectum_c = world((0, u(58, 70), u(0, 20)))
    rectum_wall = _ellipsoid(rectum_c, (16, 14, 35), rot)
    rectum_lumen = _ellipsoid(rectum_c, (u(5, 10), u(4, 8), 28), rot)
    sacrum = _Bone(
        parts=(
            (_ellipsoid(world((0, u(72, 80), u(50, 62))), (u(42, 50), 16, 38), rot @ _rot("x", -25)), 2.0),
            (_Capsule(world((0, 86, 18)), world((0, 76, -18)), 7.0), 1.5),
        )
    )

    head_radius = u(44, 52) / 2
    head_offset = u(85, 100)
    neck_tilt = rng.normal(0, 0.05, size=3)
    symphysis_y, symphysis_z = u(-56, -46), u(-28, -18)
    pelvis, acetabula, heads, vessels = [], [], [], []
    for side in _SIDES:
        sgn = 1.0 if side == "L" else -1.0
        r = float(head_radius + np.clip(rng.normal(0, 0.4), -0.8, 0.8))
        c_p = np.array([sgn * (head_offset + rng.normal(0, 1.2)), rng.normal(0, 1.2), rng.normal(0, 1.2)])

        def sp(v: Any, c_p: np.ndarray = c_p, sgn: float = sgn) -> Vec:
            """Side-local point: x positive = lateral, relative to the head centre."""
            return world(c_p + np.array([sgn * v[0], v[1], v[2]], dtype=float))

        def sd_(v: Any, sgn: float = sgn) -> np.ndarray:
            return np.array([sgn * v[0], v[1], v[2]], dtype=float)

        centre = world(c_p)
        tuberosity = sp((-28 + u(-3, 3), 30, -50))
        pelvis_bone = _Bone(
            parts=(
                (_ellipsoid(sp((-18, 10, 24)), (u(32, 36), u(32, 36), u(34, 38)), rot), 2.0),
                (_ellipsoid(sp((-8, 24, 64)), (u(11, 14), 44, 44), rot @ _rot("y", sgn * 25)), 2.0),
                (_Capsule(sp((-22, -8, -2)), world((sgn * 11, symphysis_y, symphysis_z)), u(8, 10)), 2.0),
                (_Capsule(world((sgn * 12, symphysis_y + 4, symphysis_z - 18)), tuberosity, u(7, 9)), 2.0),
                (_Capsule(sp((-10, 20, -10)), tuberosity, u(11, 14)), 2.0),
                (_ellipsoid(tuberosity, (12, 14, 12), rot), 2.0),
            ),
            carve=(centre, r + 3.5, 2.0),
        )
        pelvis.append(pelvis_bone)
        acetabula.append((dataclasses.replace(pelvis_bone, carve=None), _Sphere(centre, r + 3.5)))
        vessels.append(_Capsule(sp((-12, -42, 80)), sp((-4, -40, -80)), u(3.5, 4.5)))
        vessels.append(_Capsule(sp((-24, -40, 80)), sp((-14, -36, -80)), u(4.5, 6.0)))

        neck = _unit(sd_((0.74, 0.18, -0.62)) + sd_(neck_tilt) + rng.normal(0, 0.03, 3))
        neck_w = rot @ neck
        c = np.asarray(centre)
        neck_a, neck_b = c + neck_w * 0.2 * r, c + neck_w * (r + 20)
        neck_radius = 0.62 * r
        antsup = rot @ _unit(sd_((0.22, -0.55, 0.80)) + rng.normal(0, 0.10, 3))
        het_amplitude, het = u(15, 80), _waves(rng, 6, (10.0, 20.0))
        scar_amplitude = u(15, 70)
        scar_origin = _vec(c + neck_w * (0.42 * r + rng.normal(0, 1.5)))
        scar_normal = _vec(rot @ _unit(neck + rng.normal(0, 0.12, 3)))

        # Disease and out-of-scope parameters: always drawn, in a fixed order, from the
        # side's own stream, so the anatomy (and the noise) do not depend on the stage.
        rs = sign_rngs[side]
        q = {
            k: float(rs.random())
            for k in (
                "collapsed",
                "co_oedema",
                "oedema_amp",
                "oedema_ant",
                "oedema_neck",
                "oedema_sigma",
                "lesion_radius",
                "necrotic",
                "bright",
                "bright_width",
                "dark",
                "dark_width",
                "effusion",
                "effusion_mm",
            )
        }
        oedema_waves, border_waves = _waves(rs, 6, (14.0, 26.0)), _waves(rs, 5, (8.0, 14.0))

        def lerp(key: str, lo: float, hi: float, q: dict = q) -> float:
            return lo + q[key] * (hi - lo)

        stage = sides.get(side)
        labelled = stage is not None
        collapsed = (not labelled) and q["collapsed"] < 0.6
        femur = _Bone(
            parts=(
                (_Sphere(centre, r), 1.6),
                (_Capsule(_vec(neck_a), _vec(neck_b), neck_radius), 2.5),
                (_ellipsoid(sp((r + 34, 10, -12)), (13, 20, 24), rot), 1.5),
                (_Capsule(sp((r + 22, 8, -30)), sp((r + 14, 10, -150)), 14.0), 5.0),
                (_Sphere(sp((r + 4, 18, -48)), 9.0), 1.5),
            ),
            flatten=(_vec(c + antsup * 0.84 * r), _vec(antsup), 1.6) if collapsed else None,
        )
        oedema = lesion = None
        if stage == FicatArletStage.STAGE_I or (stage == FicatArletStage.STAGE_II and q["co_oedema"] < 0.3):
            shift = antsup * lerp("oedema_ant", 0.0, 0.35) + neck_w * lerp("oedema_neck", 0.0, 0.3)
            peak = (40, 120) if stage == FicatArletStage.STAGE_I else (20, 60)
            oedema = _Oedema(
                centre=_vec(c + shift * r),
                sigma=r * lerp("oedema_sigma", 0.55, 0.9),
                amplitude=lerp("oedema_amp", *peak),
                patches=oedema_waves,
            )
        if stage == FicatArletStage.STAGE_II or collapsed:
            lesion = _Lesion(
                tip=_vec(c + antsup * r),
                radius=r * (lerp("lesion_radius", 0.6, 0.8) if collapsed else lerp("lesion_radius", 0.35, 0.7)),
                border=border_waves,
                necrotic=lerp("necrotic", -100, -10),
                bright=lerp("bright", 80, 140) if collapsed else lerp("bright", 120, 220),
                bright_width=lerp("bright_width", 3.0, 5.0),
                dark=lerp("dark", 100, 160) if collapsed else lerp("dark", 120, 240),
                dark_width=lerp("dark_width", 3.0, 5.0),
            )
        effusion_p = 0.6 if collapsed else (0.15 if stage in (None, 0) else 0.35)
        heads.append(
            _Head(
                side=side,
                stage=int(stage) if labelled else None,
                collapsed=collapsed,
                centre=centre,
                radius=r,
                femur=femur,
                het_amplitude=het_amplitude,
                het=het,
                scar_amplitude=scar_amplitude,
                scar_origin=scar_origin,
                scar_normal=scar_normal,
                oedema=oedema,
                lesion=lesion,
                effusion_mm=lerp("effusion_mm", 1.5, 4.0) if q["effusion"] < effusion_p else 0.0,
                neck_axis=(_vec(c), _vec(c + neck_w * (r + 18))),
                neck_radius=neck_radius,
            )
        )

    bias = rng.normal(size=6)
    bias[3] = abs(bias[3]) + 0.5
    surroundings = _sample_surroundings(extra, world, rot, [np.asarray(h.centre) for h in heads])
    for key, (lo, hi) in _CONTRAST_RANGE.items():
        tissue[key] *= float(extra.uniform(lo, hi))
    domain = _sample_domain(
        extra, [np.asarray(h.centre) for h in heads], [h.radius for h in heads], scanner_fov_lps_mm, crop_probability
    )
    return _Patient(
        sex=str(rng.choice(["M", "F"], p=[0.5617, 0.4383])),
        age=int(rng.integers(18, 69)),
        tissue=tissue,
        body=body,
        muscle=muscle,
        fat_sheets=tuple(sheets),
        bladder=bladder,
        rectum_wall=rectum_wall,
        rectum_lumen=rectum_lumen,
        vessels=tuple(vessels),
        sacrum=sacrum,
        pelvis=tuple(pelvis),
        acetabula=tuple(acetabula),
        heads=tuple(heads),
        bias=tuple(float(b) for b in bias),
        surroundings=surroundings,
        domain=domain,
    )


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    return _rot("z", rng.uniform(-90, 90)) @ _rot("x", rng.uniform(-40, 40)) @ _rot("y", rng.uniform(-40, 40))


def _sample_surroundings(
    rng: np.random.Generator, world: Callable[[Any], Vec], rot: np.ndarray, centres: list[np.ndarray]
) -> _Surroundings:
    """Visceral fat, iliopsoas and obturator internus, bowel loops (see :class:`_Surroundings`).

    Positions are in the patient frame (``world`` maps them into LPS); the muscles are placed
    relative to each femoral head centre (``centres``, world LPS, right then left).
    """
    u = rng.uniform
    inv = rot.T
    fat = [
        # true pelvis: perivesical / mesorectal fat between the pelvic walls
        _ellipsoid(world((0, u(-5, 20), u(5, 35))), (u(45, 60), u(40, 55), u(55, 75)), rot),
    ]
    muscles = []
    for c_world in centres:
        c = inv @ (c_world - np.asarray(world((0, 0, 0))))  # head centre in the patient frame
        sgn = 1.0 if c[0] > 0 else -1.0
        # ischioanal fossa: a large fat pad inferomedial to each hip (bright, roughly round)
        fat.append(
            _ellipsoid(
                world((sgn * u(30, 45), c[1] + u(25, 45), c[2] - u(35, 55))),
                (u(14, 22), u(20, 30), u(25, 40)),
                rot @ _rot("y", sgn * u(10, 30)),
            )
        )
        # iliopsoas: anterior to the hip joint, running inferolaterally to the lesser trochanter
        muscles.append(
            _ellipsoid(
                world((c[0] - sgn * u(8, 18), c[1] - u(34, 42), c[2] + u(5, 20))),
                (u(14, 20), u(11, 15), u(55, 75)),
                rot @ _rot("y", -sgn * u(5, 15)),
            )
        )
        # obturator internus: a sheet on the inner (medial) wall of the acetabulum
        muscles.append(
            _ellipsoid(
                world((c[0] - sgn * u(52, 58), c[1] + u(0, 10), c[2] - u(0, 12))),
                (u(6, 9), u(24, 32), u(28, 38)),
                rot @ _rot("z", sgn * u(-10, 10)),
            )
        )
    bowel = []
    for _ in range(int(rng.integers(1, 6))):
        # small-bowel and sigmoid loops above the bladder and rectum; the lumen holds gas or fluid
        centre = world((u(-55, 55), u(-60, 40), u(15, 75)))
        semi = np.array([u(10, 17), u(10, 17), u(14, 30)])
        orient = rot @ _random_rotation(rng)
        lumen_scale = u(0.45, 0.8)
        content = "gas" if rng.random() < 0.65 else "bowel_fluid"
        bowel.append((_ellipsoid(centre, semi, orient), _ellipsoid(centre, semi * lumen_scale, orient), content))
    return _Surroundings(visceral_fat=tuple(fat), muscles=tuple(muscles), bowel=tuple(bowel))


def _sample_domain(
    rng: np.random.Generator,
    centres: list[np.ndarray],
    radii: list[float],
    scanner_fov_lps_mm: tuple[float, float, float],
    crop_probability: float,
) -> _Domain:
    """Per-study gain, noise, bias and coil randomisation, and the field-of-view crop.

    A cropped field of view keeps every femoral head centre within ``0.25 x radius`` of the
    crop (most of each head stays in the image, its lateral edge may be cut: on the ProstateX
    study the head centres lie 4 and 8 mm inside the lateral edges) and keeps the slab at least
    54 mm thick (18 slices of 3 mm); the x-crop is near-symmetric (the scanner centres on the
    patient). Crop edges are in mm; the study grid keeps the scanner's voxel lattice.
    """
    u = rng.uniform
    gain = float(math.exp(u(math.log(0.5), math.log(1.3))))
    noise_factor = float(u(0.85, 1.3))
    bias_factor = float(u(0.4, 1.8))
    coil = (float(u(0.0, 0.5)), float(u(35.0, 80.0)))
    crop = rng.random() < crop_probability
    fov = np.asarray(scanner_fov_lps_mm, dtype=float)
    half = fov / 2.0
    cen = np.asarray(FOV_CENTRE_LPS_MM, dtype=float)
    c = np.asarray(centres, dtype=float)
    r = float(min(radii))
    # always drawn (same count whatever ``crop``), so the crop does not shift later draws
    x_half = u(0.0, 1.0)
    x_shift = u(-8.0, 8.0)
    y_front, y_back = u(0.0, 1.0), u(0.0, 1.0)
    z_thick, z_shift = u(0.0, 1.0), u(-12.0, 12.0)
    oblique = rng.random() < 0.5
    tilt = float(rng.choice([-1.0, 1.0]) * u(8.0, 25.0))
    slab_half = float(u(27.0, 45.0))
    if not crop:
        return _Domain(gain, noise_factor, bias_factor, coil, None)
    # x: half-width between (outermost head centre - 0.25 r) and the full field
    need_x = float(np.abs(c[:, 0] - cen[0] - x_shift).max()) - 0.25 * r
    hx = need_x + x_half * max(half[0] - need_x, 0.0)
    x0, x1 = max(cen[0] + x_shift - hx, cen[0] - half[0]), min(cen[0] + x_shift + hx, cen[0] + half[0])
    # y: anterior and posterior edges independently, never closer than r to a head centre
    y_lo_max, y_hi_min = float(c[:, 1].min()) - r, float(c[:, 1].max()) + r
    y0 = cen[1] - half[1] + y_front * max(y_lo_max - (cen[1] - half[1]), 0.0)
    y1 = cen[1] + half[1] - y_back * max(cen[1] + half[1] - y_hi_min, 0.0)
    # z: a slab 54 mm .. full, centred near the heads, inside the scanner's field
    thick = 54.0 + z_thick * max(fov[2] - 54.0, 0.0)
    zc = float(c[:, 2].mean()) + z_shift
    zc = float(np.clip(zc, cen[2] - half[2] + thick / 2, cen[2] + half[2] - thick / 2))
    if not oblique:
        return _Domain(
            gain,
            noise_factor,
            bias_factor,
            coil,
            (float(x0), float(y0), zc - thick / 2, float(x1), float(y1), zc + thick / 2),
        )
    # oblique slab through the heads (ProstateX: tilted 18.5 deg about x, 57 mm thick); its mid
    # plane passes within 8 mm (z_shift / 1.5) of the heads' mean centre, so with a half
    # thickness of 27 mm or more and heads at most ~10 mm from their mean, each centre is inside
    yc = float(c[:, 1].mean())
    zc = float(c[:, 2].mean()) + z_shift / 1.5
    t = math.radians(tilt)
    reach = slab_half / math.cos(t) + abs(math.tan(t)) * max(abs(y0 - yc), abs(y1 - yc))
    z0, z1 = max(zc - reach, cen[2] - half[2]), min(zc + reach, cen[2] + half[2])
    return _Domain(
        gain,
        noise_factor,
        bias_factor,
        coil,
        (float(x0), float(y0), float(z0), float(x1), float(y1), float(z1)),
        (tilt, yc, zc, slab_half),
    )


def _sigmoid(x):
    return 0.5 + 0.5 * np.tanh(0.5 * x)


def _head_fields(head: _Head, X, Y, Z) -> dict[str, np.ndarray]:
    """Marrow signal changes of one head (phantom units), before multiplying by marrow."""
    cx, cy, cz = head.centre
    dX, dY, dZ = X - cx, Y - cy, Z - cz
    dist = np.sqrt(dX * dX + dY * dY + dZ * dZ)
    cut = np.clip((head.mods_radius - dist) * (1.0 / 6.0), 0.0, 1.0)
    fields: dict[str, np.ndarray] = {}
    fields["het"] = -head.het_amplitude * _sigmoid(3.0 * (head.het(dX, dY, dZ) - 0.3)) * cut
    ox, oy, oz = head.scar_origin
    nx, ny, nz = head.scar_normal
    plane = (X - ox) * nx + (Y - oy) * ny + (Z - oz) * nz
    fields["scar"] = -head.scar_amplitude * np.exp(-((plane * (1.0 / 0.9)) ** 2)) * cut
    if head.oedema is not None:
        oe = head.oedema
        ex, ey, ez = oe.centre
        env = np.exp(-((X - ex) ** 2 + (Y - ey) ** 2 + (Z - ez) ** 2) * (0.5 / oe.sigma**2))
        patch = _sigmoid(1.5 * (oe.patches(dX, dY, dZ) + 0.6))
        fields["oedema"] = oe.amplitude * env * patch * cut
    if head.lesion is not None:
        le = head.lesion
        tx, ty, tz = le.tip
        rho = le.radius * (1.0 + 0.1 * le.border(dX, dY, dZ))
        d = np.sqrt((X - tx) ** 2 + (Y - ty) ** 2 + (Z - tz) ** 2) - rho
        hb, hd = le.bright_width / 2, le.dark_width / 2
        fields["necrotic"] = le.necrotic * _sigmoid(-d * (1.0 / 0.8)) * cut
        fields["bright_band"] = le.bright * np.exp(-(((d + hb) * (1.0 / hb)) ** 2)) * cut
        fields["dark_band"] = -le.dark * np.exp(-(((d - hd) * (1.0 / hd)) ** 2)) * cut
    return fields


def _render_anatomy(patient: _Patient, canvas: _Canvas) -> None:
    t = patient.tissue
    canvas.paint(patient.body, t["fat"])
    canvas.paint(patient.muscle, t["muscle"])
    for sheet in patient.fat_sheets:
        canvas.paint(sheet, t["fat"])
    around = patient.surroundings
    for fat in around.visceral_fat:
        canvas.paint(fat, t["fat"])
    for muscle in around.muscles:
        canvas.paint(muscle, t["muscle"])
    for wall, lumen, content in around.bowel:
        canvas.paint(wall, t["bowel_wall"])
        canvas.paint(lumen, t[content])
    canvas.paint(patient.bladder, t["fluid"])
    canvas.paint(patient.rectum_wall, t["bowel_wall"])
    canvas.paint(patient.rectum_lumen, t["gas"])
    for vessel in patient.vessels:
        canvas.paint(vessel, t["flow_void"])
    canvas.paint_bone(patient.sacrum, t["cortex"], t["pelvic_marrow"])
    for bone in patient.pelvis:
        canvas.paint_bone(bone, t["cortex"], t["pelvic_marrow"])
    for uncarved, socket in patient.acetabula:
        sl = canvas.block(*socket.bbox())
        if sl is not None:
            X, Y, Z = canvas.coords(sl)
            canvas.paint_sd(sl, np.maximum(socket.sdf(X, Y, Z), uncarved.union_sdf(X, Y, Z)), t["cartilage"])
    for head in patient.heads:
        if head.effusion_mm > 0:
            a, b = head.neck_axis
            canvas.paint(
                _Intersect(
                    _Capsule(a, b, head.neck_radius + head.effusion_mm),
                    _Sphere(head.centre, head.radius + 12.0),
                ),
                t["fluid"],
            )
        canvas.paint(_Sphere(head.centre, head.radius + 1.8), t["cartilage"])
        canvas.paint_bone(head.femur, t["cortex"], t["femoral_marrow"])


def _supersampled_axis(coords: np.ndarray, step: float, factor: int) -> np.ndarray:
    offsets = ((np.arange(factor) + 0.5) / factor - 0.5) * step
    return (coords.astype(np.float64)[:, None] + offsets[None, :]).reshape(-1)


def _head_block(head: _Head, canvas: _Canvas, steps: Vec):
    """Marrow changes of one head averaged over sub-voxel samples (partial volume).

    Returns (slices, {field: array}, marrow occupancy) on the canvas grid, or None.
    """
    c = np.asarray(head.centre)
    sl = canvas.block(c - head.mods_radius - 2.0, c + head.mods_radius + 2.0)
    if sl is None:
        return None
    # sub-samples along each axis: at most ~2 mm (in-plane) / ~1.5 mm (slice) apart
    factors = [max(1, math.ceil(s / 2.0 - 1e-9)) for s in steps]
    factors = [max(f, math.ceil(s / 1.6 - 1e-9)) if s > 3.0 else f for f, s in zip(factors, steps)]
    fx, fy, fz = factors
    x = _supersampled_axis(canvas.x[sl[2]], steps[0], fx)
    y = _supersampled_axis(canvas.y[sl[1]], steps[1], fy)
    z = _supersampled_axis(canvas.z[sl[0]], steps[2], fz)
    X = x.astype(np.float32)[None, None, :]
    Y = y.astype(np.float32)[:, None][None]
    Z = z.astype(np.float32)[:, None, None]
    _, inner = head.femur.sdfs(X, Y, Z)
    marrow = _occupancy(inner, min(steps) / max(factors))
    shape = tuple(s.stop - s.start for s in sl)

    def down(a: np.ndarray) -> np.ndarray:
        a = np.broadcast_to(a, marrow.shape)
        return a.reshape(shape[0], fz, shape[1], fy, shape[2], fx).mean(axis=(1, 3, 5), dtype=np.float32)

    fields = {k: down(v * marrow) for k, v in _head_fields(head, X, Y, Z).items()}
    return sl, fields, down(marrow)


def _bias_field(patient: _Patient, canvas: _Canvas, strength: float, fov_lps_mm: Vec | None = None) -> np.ndarray:
    """Multiplicative receive-field gain on the canvas grid, float32 ``[z, y, x]``.

    A smooth random quadratic of relative amplitude ``strength`` (normalised over the
    scanner's full field of view ``fov_lps_mm``, so that a cropped study sees the same field
    as the full one would there), times surface-coil brightening near the anterior and
    posterior body wall: ``1 + peak x exp(-depth / decay)`` with depth the distance inside
    the body surface along y (``patient.domain.coil``).
    """
    half = (
        np.asarray(fov_lps_mm, dtype=float) / 2.0
        if fov_lps_mm is not None
        else np.array([max(float(np.abs(a).max()), 1e-6) for a in (canvas.x, canvas.y, canvas.z)])
    )
    cen = np.asarray(FOV_CENTRE_LPS_MM, dtype=np.float32)
    ux = (canvas.x - cen[0]) / np.float32(half[0])
    uy = (canvas.y - cen[1]) / np.float32(half[1])
    uz = (canvas.z - cen[2]) / np.float32(half[2])
    c = patient.bias

    def field(ux, uy, uz):
        gx = c[0] * ux + c[4] * (ux * ux - 1 / 3)
        gy = c[1] * uy + c[3] * (uy * uy - 1 / 3)
        gz = c[2] * uz
        return gz[:, None, None] + gy[None, :, None] + gx[None, None, :] + c[5] * (uy[:, None] * ux[None, :])[None]

    # normalised to a peak of 1 over the scanner's full field (|u| <= 1), not over this grid
    full = np.linspace(-1.0, 1.0, 33, dtype=np.float32)
    f = field(ux, uy, uz)
    f *= 1.0 / max(float(np.abs(field(full, full, full)).max()), 1e-6)
    gain = 1.0 + strength * f
    peak, decay = patient.domain.coil
    if peak > 0:
        body = patient.body
        front = body.centre[1] - body.half_depth
        back = body.centre[1] + body.half_depth
        depth = np.minimum(np.abs(canvas.y - np.float32(front)), np.abs(np.float32(back) - canvas.y))
        gain = gain * (1.0 + np.float32(peak) * np.exp(-depth / np.float32(decay)))[None, :, None]
    return gain.astype(np.float32)


def _stored_range(scanner: ScannerProfile) -> tuple[int, int, np.dtype]:
    if scanner.pixel_signed:
        return -2048, 2047, np.dtype("<i2")
    return 0, 4095, np.dtype("<u2")


# --------------------------------------------------------------------------------------
# One study: render, measure, write
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _StudyTask:
    site: str
    scanner: ScannerProfile
    patient_number: int
    patient_id: str
    study: str
    sides: dict[str, int | None]  # side -> stage; absent sides are not labelled
    seed: int
    site_dir: str


def _site_key(site: str) -> int:
    return zlib.crc32(site.encode()) & 0x7FFFFFFF


def _lps_axes(scanner: ScannerProfile) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    out = []
    for fov, step, centre in zip(scanner.fov_lps_mm, scanner.lps_spacing_mm, FOV_CENTRE_LPS_MM):
        n = int(round(fov / step))
        out.append(centre + (np.arange(n) - (n - 1) / 2.0) * step)
    return out[0], out[1], out[2]


def _study_axes(scanner: ScannerProfile, domain: _Domain) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Voxel-centre coordinates of one study: the scanner's lattice, cut to the study's crop.

    Every axis keeps at least 2 voxels (and the crop is never empty: it holds the heads).
    """
    axes = _lps_axes(scanner)
    if domain.fov_lps_mm is None:
        return axes
    lo, hi = domain.fov_lps_mm[:3], domain.fov_lps_mm[3:]
    out = []
    for a, low, high in zip(axes, lo, hi):
        keep = np.flatnonzero((a >= low) & (a <= high))
        if keep.size < 2:
            keep = np.arange(max(0, int(np.searchsorted(a, (low + high) / 2)) - 1), len(a))[:2]
        out.append(a[keep[0] : keep[-1] + 1])
    return out[0], out[1], out[2]


def _simulate(task: _StudyTask) -> tuple[np.ndarray, _Patient, list[dict[str, Any]]]:
    """Render one study. Returns (stored pixels [z, y, x], patient, per-head records)."""
    sc = task.scanner
    patient = _sample_patient(
        np.random.SeedSequence([task.seed, _site_key(task.site), 1, task.patient_number]),
        task.sides,
        scanner_fov_lps_mm=sc.fov_lps_mm,
    )
    dom = patient.domain
    x, y, z = _study_axes(sc, dom)
    canvas = _Canvas(x, y, z)
    _render_anatomy(patient, canvas)
    blocks = {}
    for head in patient.heads:
        hb = _head_block(head, canvas, sc.lps_spacing_mm)
        if hb is None:
            continue
        sl, fields, marrow = hb
        canvas.img[sl] += sum(fields.values())
        blocks[head.side] = (sl, fields, marrow)

    inside = None
    if dom.slab is not None:
        tilt, yc, zc, slab_half = dom.slab
        t = math.radians(tilt)
        across = (canvas.z[:, None] - np.float32(zc)) * np.float32(math.cos(t)) + (
            canvas.y[None, :] - np.float32(yc)
        ) * np.float32(math.sin(t))
        # partial volume over about one slice thickness at the slab's faces
        inside = np.clip(0.5 + (slab_half - np.abs(across)) / np.float32(max(sc.lps_spacing_mm[2], 1.0)), 0.0, 1.0)
        inside = inside.astype(np.float32)[:, :, None]
    strength = min(sc.bias_field_strength * dom.bias_factor, 0.6)
    gain = _bias_field(patient, canvas, strength, sc.fov_lps_mm)
    gain *= np.float32(sc.intensity_scale * dom.gain)
    clean = canvas.img
    clean *= gain
    clean_blocks = {side: clean[b[0]].copy() for side, b in blocks.items()}
    sigma = np.float32(sc.noise_sigma * sc.intensity_scale * dom.gain * dom.noise_factor)
    noise_rng = np.random.default_rng(np.random.SeedSequence([task.seed, _site_key(task.site), 2, task.patient_number]))
    real = clean + sigma * noise_rng.standard_normal(clean.shape, dtype=np.float32)
    imag = sigma * noise_rng.standard_normal(clean.shape, dtype=np.float32)
    magnitude = np.sqrt(real * real + imag * imag)
    if inside is not None:  # outside the oblique slab the resampled study reads 0, noise-free
        magnitude *= inside
        for side, (sl, _, _) in blocks.items():
            clean_blocks[side] *= inside[sl[0], sl[1], :]
    lo, hi, dtype = _stored_range(sc)
    stored = np.clip(np.rint((magnitude - sc.rescale_intercept) / sc.rescale_slope), lo, hi).astype(dtype)

    records = []
    for head in patient.heads:
        rec: dict[str, Any] = {
            "side": head.side,
            "stage": head.stage,
            "collapsed": head.collapsed,
            "centre": head.centre,
            "radius": head.radius,
            "cnr": {},
        }
        if head.lesion is not None:
            rec["sign_centre"], rec["sign_radius"], rec["sign"] = head.lesion.tip, head.lesion.radius, "lesion"
        elif head.oedema is not None:
            rec["sign_centre"], rec["sign_radius"], rec["sign"] = head.oedema.centre, head.oedema.sigma, "oedema"
        if head.side in blocks and head.stage is not None:
            sl, fields, marrow = blocks[head.side]
            rescaled = stored[sl].astype(np.float32) * np.float32(sc.rescale_slope) + np.float32(sc.rescale_intercept)
            resid = rescaled - clean_blocks[head.side]
            core = marrow > 0.98
            noise = float(resid[core].std()) if core.sum() > 10 else float("nan")
            rec["noise_sigma_measured"] = noise
            rec["marrow_mean"] = float(clean_blocks[head.side][core].mean()) if core.any() else float("nan")
            prefix = "I" if head.stage == FicatArletStage.STAGE_I else "II"
            for name in ("oedema", "bright_band", "dark_band", "necrotic"):
                if name not in fields:
                    continue
                scaled = fields[name] * gain[sl]
                peak = float(np.abs(scaled).max())
                if peak <= 0:
                    continue
                region = np.abs(scaled) >= 0.5 * peak
                effect = float((resid + scaled)[region].mean())
                rec["cnr"][f"{prefix}_{name}"] = abs(effect) / noise
        records.append(rec)
    return stored, patient, records


_DICOM_STYLE = {
    "SIEMENS": {
        "image_type": ["ORIGINAL", "PRIMARY", "M", "NORM", "DIS2D"],
        "software": "syngo MR XA30",
        "sequence": "*tse2d1_15",
        "variant": ["SK", "SP", "OSP"],
        "instance_ascending": True,
    },
    "Philips": {
        "image_type": ["ORIGINAL", "PRIMARY", "M_SE", "M", "SE"],
        "software": "5.7.1",
        "sequence": "TSE",
        "variant": ["SK"],
        "instance_ascending": False,
    },
}


def _ds(value: float) -> str:
    text = f"{value:.10g}"
    if len(text) > 16:
        text = f"{value:.6g}"
    return "0" if text == "-0" else text


def _uid(*parts: Any) -> str:
    return generate_uid(entropy_srcs=["onfh-fl-phantom", *[str(p) for p in parts]])


def _file_names(rng: np.random.Generator, site: str, n: int) -> list[str]:
    style = _site_key(site) % 3
    if style == 0:
        return [f"{rng.integers(0, 2**63):016x}{rng.integers(0, 2**63):016x}.dcm" for _ in range(n)]
    if style == 1:
        numbers = rng.choice(90000, size=n, replace=False) + 10000
        return [f"IM{k:05d}" for k in numbers]
    return [f"{rng.integers(0, 2**32):08X}" for _ in range(n)]


def _write_study(task: _StudyTask, stored: np.ndarray, patient: _Patient) -> tuple[int, int]:
    """Write the study's DICOM series. Returns (files, bytes)."""
    sc = task.scanner
    rng = np.random.default_rng(np.random.SeedSequence([task.seed, _site_key(task.site), 3, task.patient_number]))
    style = _DICOM_STYLE.get(sc.vendor, _DICOM_STYLE["SIEMENS"])
    x, y, z = _study_axes(sc, patient.domain)
    if sc.slice_orientation == "axial":
        orientation = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        slices = [(stored[k], (x[0], y[0], z[k]), float(z[k])) for k in range(len(z))]
    else:
        orientation = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
        slices = [(stored[::-1, k, :], (x[0], y[k], z[-1]), float(y[k])) for k in range(len(y))]
    rows, cols = slices[0][0].shape
    n = len(slices)
    _, _, dtype = _stored_range(sc)

    study_day = date(2018, 2, 1) + timedelta(days=int(rng.integers(0, 1700)))
    study_date = study_day.strftime("%Y%m%d")
    study_time = f"{rng.integers(7, 19):02d}{rng.integers(0, 60):02d}{rng.integers(0, 60):02d}"
    keys = (task.seed, task.site, task.patient_number)
    study_uid = _uid(*keys, "study")
    series_uid = _uid(*keys, "series")
    frame_uid = _uid(*keys, "frame-of-reference")

    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "ONFHFL_PHANTOM"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = style["image_type"]
    ds.SOPClassUID = MRImageStorage
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study_date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = study_time
    ds.AccessionNumber = f"PH{int(rng.integers(10**7, 10**8))}"
    ds.Modality = "MR"
    ds.Manufacturer = sc.vendor
    ds.InstitutionName = f"ONFH-FL phantom center {task.site}"
    ds.ReferringPhysicianName = ""
    ds.StationName = f"PHANTOM{task.site}"
    ds.StudyDescription = "MR HIP BILATERAL"
    ds.SeriesDescription = sc.description
    ds.ManufacturerModelName = sc.model
    ds.PatientName = f"PHANTOM^{task.patient_id}"
    ds.PatientID = task.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = patient.sex
    ds.PatientAge = f"{patient.age:03d}Y"
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "synthetic phantom (ONFH-FL sim.phantoms), no real patient"
    ds.BodyPartExamined = "HIP"
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = style["variant"]
    ds.ScanOptions = "SFS" if sc.slice_orientation == "coronal" else ""
    ds.MRAcquisitionType = "2D"
    ds.SequenceName = style["sequence"]
    ds.SliceThickness = _ds(sc.slice_thickness_mm)
    ds.RepetitionTime = _ds(sc.repetition_time_ms)
    ds.EchoTime = _ds(sc.echo_time_ms)
    ds.NumberOfAverages = "2" if sc.field_strength_t < 2 else "1"
    ds.ImagingFrequency = _ds(round(42.577478 * sc.field_strength_t, 6))
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = "1"
    ds.MagneticFieldStrength = _ds(sc.field_strength_t)
    ds.SpacingBetweenSlices = _ds(sc.slice_thickness_mm)
    ds.EchoTrainLength = "15"
    ds.PercentSampling = "100"
    ds.PercentPhaseFieldOfView = "100"
    ds.PixelBandwidth = "190" if sc.field_strength_t > 2 else "150"
    ds.DeviceSerialNumber = str(10000 + _site_key(task.site) % 90000)
    ds.SoftwareVersions = style["software"]
    ds.ProtocolName = sc.description.lower()
    ds.FlipAngle = "150" if sc.vendor == "SIEMENS" else "90"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = str(int(rng.integers(2, 12)))
    ds.AcquisitionNumber = "1"
    ds.ImageOrientationPatient = [_ds(v) for v in orientation]
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.PixelSpacing = [_ds(v) for v in sc.pixel_spacing_mm]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 1 if sc.pixel_signed else 0
    ds.WindowCenter = _ds(round(500 * sc.intensity_scale * patient.domain.gain))
    ds.WindowWidth = _ds(round(1200 * sc.intensity_scale * patient.domain.gain))
    ds.RescaleIntercept = _ds(sc.rescale_intercept)
    ds.RescaleSlope = _ds(sc.rescale_slope)
    ds.RescaleType = "US"
    ds.LossyImageCompression = "00"

    series_dir = Path(task.site_dir) / task.study / "DICOM"
    series_dir.mkdir(parents=True, exist_ok=True)
    names = _file_names(rng, task.site, n)
    total = 0
    for k in rng.permutation(n):
        pixels, position, location = slices[int(k)]
        number = int(k) + 1 if style["instance_ascending"] else n - int(k)
        sop_uid = _uid(*keys, "image", int(k))
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SOPInstanceUID = sop_uid
        ds.InstanceCreationDate = study_date
        ds.InstanceCreationTime = study_time
        ds.InstanceNumber = str(number)
        ds.ImagePositionPatient = [_ds(float(v)) for v in position]
        ds.SliceLocation = _ds(location)
        ds.PixelData = np.ascontiguousarray(pixels, dtype=dtype).tobytes()
        path = series_dir / names[int(k)]
        dcmwrite(path, ds, enforce_file_format=True)
        total += path.stat().st_size

    files = n
    junk = rng.random()
    if junk < 0.25:
        text = "Exported from PACS. Series: 1. This folder holds a synthetic phantom study.\n"
        (Path(task.site_dir) / task.study / "README.txt").write_text(text)
        files += 1
    elif junk < 0.45:
        noise = bytes(rng.integers(0, 256, 120, dtype=np.uint8))
        (series_dir / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + noise)
        files += 1
    elif junk < 0.55:
        (series_dir / "Thumbs.db").write_bytes(bytes(rng.integers(0, 256, 512, dtype=np.uint8)))
        files += 1
    return files, total


def _run_study(task: _StudyTask) -> dict[str, Any]:
    """Worker entry point: render, write, and return the rows and measurements."""
    stored, patient, records = _simulate(task)
    n_files, n_bytes = _write_study(task, stored, patient)
    return {
        "site": task.site,
        "patient_number": task.patient_number,
        "patient_id": task.patient_id,
        "study": task.study,
        "heads": records,
        "files": n_files,
        "bytes": n_bytes,
    }


# --------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------


def _plan_site(profile: PhantomProfile, site: str, seed: int, site_dir: Path) -> list[_StudyTask]:
    rng = np.random.default_rng(np.random.SeedSequence([seed, _site_key(site), 0]))
    n0, n1, n2 = profile.stage_counts()[site]
    stages = [int(s) for s in rng.permutation(np.repeat([0, 1, 2], [n0, n1, n2]))]
    n_patients = profile.patients_per_site[site]
    n_bilateral = profile.heads_per_site[site] - n_patients
    bilateral = set(int(i) for i in rng.permutation(n_patients)[:n_bilateral])
    study_numbers = rng.permutation(n_patients) + 1
    tasks, cursor = [], 0
    for i in range(n_patients):
        if i in bilateral:
            sides = {"R": stages[cursor], "L": stages[cursor + 1]}
            cursor += 2
        else:
            sides = {str(rng.choice(_SIDES)): stages[cursor]}
            cursor += 1
        tasks.append(
            _StudyTask(
                site=site,
                scanner=profile.scanners[site],
                patient_number=i + 1,
                patient_id=f"{site}-{i + 1:04d}",
                study=f"study-{int(study_numbers[i]):04d}",
                sides=sides,
                seed=seed,
                site_dir=str(site_dir),
            )
        )
    return tasks


def _resolve_profile(profile: str | PhantomProfile) -> PhantomProfile:
    if isinstance(profile, PhantomProfile):
        return profile
    if profile not in PROFILES:
        raise ValueError(f"unknown phantom profile {profile!r}; choose one of {sorted(PROFILES)}")
    return PROFILES[profile]


def _existing_summary(out_dir: Path, profile: PhantomProfile, seed: int) -> dict | None:
    path = out_dir / SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if (
        summary.get("generator_version") != GENERATOR_VERSION
        or summary.get("profile_fingerprint") != profile.fingerprint()
        or summary.get("seed") != seed
    ):
        return None
    if not all((out_dir / s / "manifest.csv").is_file() for s in profile.sites):
        return None
    return summary


def _refuse_other_phantoms(out_dir: Path, profile: PhantomProfile, seed: int) -> None:
    """Refuse to overwrite phantoms of another profile or seed (their splits and site caches with them)."""
    try:
        summary = json.loads((out_dir / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return
    if summary.get("profile_fingerprint") != profile.fingerprint() or summary.get("seed") != seed:
        raise FileExistsError(
            f"{out_dir} holds phantoms of profile {summary.get('profile')!r}, seed {summary.get('seed')}; "
            f"not overwriting them with profile {profile.name!r}, seed {seed}: use another output folder "
            "(or `onfh sim phantoms --replace`)"
        )


def _clear_previous(out_dir: Path, sites: set[str]) -> None:
    """Remove site folders a previous run wrote; refuse to touch anything else."""
    ours = (out_dir / _MARKER_FILE).is_file()
    for name in (SUMMARY_FILE, GROUND_TRUTH_FILE):
        if ours and (out_dir / name).is_file():
            (out_dir / name).unlink()
    for site in sorted(sites):
        site_dir = out_dir / site
        if not site_dir.exists():
            continue
        if site_dir.is_dir() and (ours or not any(site_dir.iterdir())):
            shutil.rmtree(site_dir)
        else:
            raise FileExistsError(
                f"{site_dir} exists and was not written by the phantom generator; choose an empty output folder"
            )


def _summarise_cnr(values: list[float]) -> dict[str, float | int]:
    arr = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    if arr.size == 0:
        return {"n": 0}
    return {
        "n": int(arr.size),
        "mean": round(float(arr.mean()), 3),
        "median": round(float(np.median(arr)), 3),
        "min": round(float(arr.min()), 3),
        "max": round(float(arr.max()), 3),
    }


def _fmt_vec(v: Vec) -> str:
    return " ".join(f"{float(a):.3f}" for a in v)


def generate_phantoms(
    out_dir: Path,
    profile: str | PhantomProfile = "quick",
    seed: int = 0,
    progress: bool = False,
    *,
    workers: int | None = None,
    replace: bool = False,
) -> dict:
    """Generate the phantom centers as DICOM site folders.

    Args:
        out_dir: output folder; gets one sub-folder per site plus ``phantoms.json`` and
            ``ground_truth.csv``. Created if missing.
        profile: a name in ``PROFILES`` (``"quick"``, ``"paper"``) or a ``PhantomProfile``.
        seed: master seed; the same seed gives byte-identical DICOM and manifests.
        progress: show a rich progress bar.
        workers: worker processes (default: available CPU cores); the output does not
            depend on it. Uses ``concurrent.futures`` with the platform's default start method,
            so scripts that call this must guard their entry point with
            ``if __name__ == "__main__":``.
        replace: overwrite phantoms of another profile or seed in ``out_dir`` (with their
            splits and site caches); otherwise that is refused. Phantoms of the same profile
            and seed from an older generator version are always regenerated.

    Returns:
        The JSON-able summary also written to ``phantoms.json``: profile, seed, per-site
        scanner traits, counts per stage, measured CNR per stage sign. If ``phantoms.json``
        already describes the same profile, seed and generator version (and the manifests
        exist), it is returned without regenerating.

    Raises:
        ValueError: unknown profile name.
        FileExistsError: a site folder to be written exists and is not ours, or ``out_dir``
            holds phantoms of another profile or seed and ``replace`` is False.
    """
    out_dir = Path(out_dir)
    prof = _resolve_profile(profile)
    seed = int(seed)
    existing = _existing_summary(out_dir, prof, seed)
    if existing is not None:
        logger.info("phantoms already generated (profile %s, seed %d); reusing", prof.name, seed)
        return existing
    if not replace:
        _refuse_other_phantoms(out_dir, prof, seed)

    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    previous_sites: set[str] = set()
    try:
        previous_sites = set(json.loads((out_dir / SUMMARY_FILE).read_text()).get("sites", {}))
    except (OSError, ValueError, AttributeError):
        pass
    _clear_previous(out_dir, set(prof.sites) | previous_sites)
    (out_dir / _MARKER_FILE).write_text("written by ONFH-FL sim.phantoms\n")

    tasks: list[_StudyTask] = []
    for site in prof.sites:
        (out_dir / site).mkdir(parents=True, exist_ok=True)
        tasks.extend(_plan_site(prof, site, seed, out_dir / site))

    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, min(int(workers), len(tasks)))
    results = _execute(tasks, workers, progress)
    results.sort(key=lambda r: (r["site"], r["patient_number"]))

    summary = _write_outputs(out_dir, prof, seed, results)
    summary["elapsed_s"] = round(time.perf_counter() - started, 2)
    summary["workers"] = workers
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n")
    logger.info(
        "generated %d studies, %d heads in %d sites in %.1f s (%.0f MB)",
        len(results),
        summary["totals"]["heads"],
        len(prof.sites),
        summary["elapsed_s"],
        summary["totals"]["bytes"] / 1e6,
    )
    return summary


def _execute(tasks: list[_StudyTask], workers: int, progress: bool) -> list[dict[str, Any]]:
    bar: Any = None
    job: Any = None

    def advance() -> None:
        if bar is not None:
            bar.advance(job)

    if progress:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        bar = Progress("phantoms", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=Console(stderr=True))
        bar.start()
        job = bar.add_task("phantoms", total=len(tasks))
    results = []
    try:
        if workers == 1 or len(tasks) < 4:
            for task in tasks:
                results.append(_run_study(task))
                advance()
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = [pool.submit(_run_study, t) for t in tasks]
                for fut in as_completed(futures):
                    results.append(fut.result())
                    advance()
    finally:
        if bar is not None:
            bar.stop()
    return results


def _write_outputs(out_dir: Path, prof: PhantomProfile, seed: int, results: list[dict]) -> dict:
    sites_summary: dict[str, Any] = {}
    gt_rows = []
    totals = {"patients": 0, "heads": 0, "studies": 0, "files": 0, "bytes": 0}
    total_stage = {label: 0 for label in STAGE_LABELS}
    for site in prof.sites:
        sc = prof.scanners[site]
        site_results = [r for r in results if r["site"] == site]
        manifest_rows = []
        stage_counts = {label: 0 for label in STAGE_LABELS}
        cnr: dict[str, list[float]] = {k: [] for k in _SIGN_KEYS}
        noise, marrow = [], []
        for r in site_results:
            for head in r["heads"]:
                centre, radius = np.asarray(head["centre"]), float(head["radius"])
                labelled = head["stage"] is not None
                label = FicatArletStage(head["stage"]).label if labelled else ""
                if labelled:
                    box = (*(centre - radius), *(centre + radius))
                    manifest_rows.append(
                        {
                            "patient_id": r["patient_id"],
                            "study": r["study"],
                            "side": head["side"],
                            "ficat_stage": label,
                            "box_lps_mm": _fmt_vec(box[:3]) + " " + _fmt_vec(box[3:]),
                            "scanner": sc.label,
                        }
                    )
                    stage_counts[label] += 1
                    for key, value in head["cnr"].items():
                        cnr[key].append(value)
                    if "noise_sigma_measured" in head:
                        noise.append(head["noise_sigma_measured"])
                        if head["stage"] == 0:
                            marrow.append(head["marrow_mean"])
                gt_rows.append(
                    {
                        "site": site,
                        "patient_id": r["patient_id"],
                        "study": r["study"],
                        "side": head["side"],
                        "ficat_stage": label if labelled else ("III-excluded" if head["collapsed"] else "unlabelled"),
                        "in_manifest": int(labelled),
                        "head_centre_lps_mm": _fmt_vec(head["centre"]),
                        "head_radius_mm": f"{radius:.3f}",
                        "sign": head.get("sign", ""),
                        "sign_centre_lps_mm": _fmt_vec(head["sign_centre"]) if "sign_centre" in head else "",
                        "sign_radius_mm": f"{head['sign_radius']:.3f}" if "sign_radius" in head else "",
                    }
                )
        manifest_rows.sort(key=lambda row: (row["patient_id"], row["side"]))
        with open(out_dir / site / "manifest.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(manifest_rows)
        n_files = sum(r["files"] for r in site_results)
        n_bytes = sum(r["bytes"] for r in site_results)
        sites_summary[site] = {
            "scanner": dataclasses.asdict(sc),
            "scanner_label": sc.label,
            "series_description": sc.description,
            "grid_shape_dhw": list(sc.grid_shape),
            "voxel_spacing_mm_dhw": list(sc.voxel_spacing_mm),
            "patients": len(site_results),
            "studies": len(site_results),
            "heads": len(manifest_rows),
            "heads_per_stage": stage_counts,
            "files": n_files,
            "bytes": n_bytes,
            "noise_sigma_measured": round(float(np.nanmean(noise)), 2) if noise else None,
            "stage0_marrow_mean": round(float(np.nanmean(marrow)), 1) if marrow else None,
            "cnr": {k: _summarise_cnr(v) for k, v in cnr.items() if v},
        }
        totals["patients"] += len(site_results)
        totals["studies"] += len(site_results)
        totals["heads"] += len(manifest_rows)
        totals["files"] += n_files
        totals["bytes"] += n_bytes
        for label, count in stage_counts.items():
            total_stage[label] += count
    totals["heads_per_stage"] = total_stage  # type: ignore[assignment]

    gt_rows.sort(key=lambda row: (row["site"], row["patient_id"], row["side"]))
    with open(out_dir / GROUND_TRUTH_FILE, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(gt_rows[0]) if gt_rows else ["site"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(gt_rows)

    return {
        "generator": "onfh-fl sim.phantoms",
        "generator_version": GENERATOR_VERSION,
        "profile": prof.name,
        "profile_fingerprint": prof.fingerprint(),
        "seed": seed,
        "external_groups": {k: list(v) for k, v in prof.external_groups.items()},
        "fov_centre_lps_mm": list(FOV_CENTRE_LPS_MM),
        "cnr_definition": (
            "per head: |mean(final - noise-free image without the sign)| over the region where "
            "the noise-free sign field reaches half its peak, / noise sigma measured in the same "
            "head's marrow; rescaled scanner units; summarised per site"
        ),
        "sites": sites_summary,
        "totals": totals,
        "ground_truth": GROUND_TRUTH_FILE,
    }


def read_ground_truth(out_dir: Path) -> list[dict[str, Any]]:
    """Per-head ground truth written next to the site folders (for tests and Grad-CAM checks).

    Returns one dict per imaged femoral head: ``site``, ``patient_id``, ``study``, ``side``,
    ``ficat_stage`` (``0``/``I``/``II``, ``III-excluded`` or ``unlabelled``), ``in_manifest``
    (bool), ``head_centre_lps_mm`` (3 floats), ``head_radius_mm``, ``sign`` (``lesion``,
    ``oedema`` or empty), ``sign_centre_lps_mm`` (3 floats or None), ``sign_radius_mm``
    (float or None; the oedema's envelope sd for ``oedema``).
    """
    rows = []
    with open(Path(out_dir) / GROUND_TRUTH_FILE, newline="") as fh:
        for row in csv.DictReader(fh):
            rows.append(
                {
                    **row,
                    "in_manifest": row["in_manifest"] == "1",
                    "head_centre_lps_mm": tuple(float(v) for v in row["head_centre_lps_mm"].split()),
                    "head_radius_mm": float(row["head_radius_mm"]),
                    "sign_centre_lps_mm": tuple(float(v) for v in row["sign_centre_lps_mm"].split())
                    if row["sign_centre_lps_mm"]
                    else None,
                    "sign_radius_mm": float(row["sign_radius_mm"]) if row["sign_radius_mm"] else None,
                }
            )
    return rows
