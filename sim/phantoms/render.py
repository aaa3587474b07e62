"""Rendering a patient onto a voxel grid: partial volume, anatomy, marrow signs.

``_Canvas`` is an LPS-aligned voxel grid that paints shapes with a partial-volume ramp;
``_render_anatomy`` paints one patient's tissues, and ``_head_block`` the marrow signal
changes of one femoral head (stage signs, heterogeneity, physeal scar) averaged over
sub-voxel samples.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from sim.phantoms.anatomy import _Head, _Patient
from sim.phantoms.geometry import Vec, _Bone, _Capsule, _Intersect, _Sphere


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
