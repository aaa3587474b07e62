"""Geometry primitives of the phantom anatomy: signed distance functions in LPS mm.

Each shape has ``bbox()`` (its LPS bounding box, ``(lo, hi)``) and ``sdf(X, Y, Z)`` (signed
distance in mm, negative inside) on broadcast coordinate blocks, so that a shape is
evaluated only on the voxels near it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

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
