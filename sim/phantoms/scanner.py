"""The scanner model: one study's voxel lattice, bias field, Rician noise and stored pixels.

``_simulate`` renders one study (``_StudyTask``) as its scanner acquires it: the patient on
the study's field of view, times a smooth bias field and surface-coil gain, with Rician
magnitude noise, quantised to the scanner's stored range through its rescale slope and
intercept; it also measures every labelled head's noise and per-sign CNR (see
``sim.phantoms.anatomy``).
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared_models.stages import FicatArletStage
from sim.phantoms.anatomy import _Domain, _Patient, _sample_patient
from sim.phantoms.geometry import Vec
from sim.phantoms.profiles import FOV_CENTRE_LPS_MM, ScannerProfile
from sim.phantoms.render import _Canvas, _head_block, _render_anatomy


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
