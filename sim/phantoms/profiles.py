"""Phantom profiles: each simulated center's scanner protocol and how many heads it holds.

``ScannerProfile`` describes one center's T2 TSE hip protocol, ``PhantomProfile`` the counts
per site and stage; ``PROFILES`` holds the ``"paper"`` and ``"quick"`` profiles.

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
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

FOV_CENTRE_LPS_MM: tuple[float, float, float] = (0.0, 0.0, 0.0)
"""Physical centre of every phantom's field of view."""


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
