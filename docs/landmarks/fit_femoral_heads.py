"""How the femoral head marks in ``prostatex-0000-femoral-heads.json`` were obtained.

Semi-automatic and checked by eye (not a test; run by hand):

1. The study was read with SimpleITK and every slice rendered with matplotlib; both femoral
   heads were located by eye (both are cut by the lateral edges of the 192 mm field of view,
   the right one visible on slices 3-16, the left one on 6-18 of 19) and a rough centre noted
   per side (column, row, slice).
2. From that rough centre, rays in every slice (90 per slice) find the first strong
   bright-to-dark edge after bright marrow (the marrow / cortex boundary of the head), in
   the part of the ray inside the image.
3. A sphere is fitted to those 3D edge points (in mm, in the image's own voxel frame) by
   RANSAC (radius 19-29 mm, inlier band 1 mm) and a least-squares refit on the inliers; the
   centre is mapped to LPS with ``TransformContinuousIndexToPhysicalPoint`` (the file's
   direction cosines include its 18 deg oblique tilt).
4. The fitted circles were drawn over every slice and checked by eye: they follow the head
   outline on slices 3-15 (right) and 7-18 (left).

Run: ``.venv/bin/python docs/landmarks/fit_femoral_heads.py [--study FILE]``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter, map_coordinates

STUDY = Path(__file__).resolve().parents[3] / "shared" / "data" / "real" / "prostatex-0000-pelvis-t2-axial.nii.gz"
ROUGH_CENTRES = {"R": (5, 197), "L": (370, 216)}  # (column, row) read off the rendered slices


def _sphere(points: np.ndarray) -> tuple[np.ndarray, float]:
    a = np.c_[2 * points, np.ones(len(points))]
    sol = np.linalg.lstsq(a, (points**2).sum(1), rcond=None)[0]
    return sol[:3], float(np.sqrt(sol[3] + (sol[:3] ** 2).sum()))


def fit(study: Path = STUDY, seed: int = 0) -> dict:
    image = sitk.ReadImage(str(study))
    raw = sitk.GetArrayFromImage(image).astype(float)
    smooth = gaussian_filter(raw, (0, 1.5, 1.5))
    spacing = np.array(image.GetSpacing())
    n_k, n_j, n_i = raw.shape
    rng = np.random.default_rng(seed)
    out = {}
    for side, (c0, r0) in ROUGH_CENTRES.items():
        pts = []
        for k in range(n_k):
            for th in np.linspace(0, 2 * np.pi, 90, endpoint=False):
                rad = np.arange(6, 70, 0.5)
                cc, rr = c0 + rad * np.cos(th), r0 + rad * np.sin(th)
                ok = (cc >= 2) & (cc < n_i - 3) & (rr >= 2) & (rr < n_j - 3)
                if ok.sum() < 30:
                    continue
                prof = map_coordinates(smooth[k], [rr[ok], cc[ok]], order=1)
                g = np.gradient(prof)
                cand = [j for j in range(6, len(g))
                        if g[j] < -15 and prof[j - 6:j - 1].min() > 300 and g[j] <= g[max(0, j - 2):j + 3].min()]
                if cand:
                    pts.append((cc[ok][cand[0]], rr[ok][cand[0]], k))
        p = np.array(pts) * spacing
        best = None
        for _ in range(3000):
            c, r = _sphere(p[rng.choice(len(p), 4, replace=False)])
            if not 19 < r < 29:
                continue
            inl = np.abs(np.linalg.norm(p - c, axis=1) - r) < 1.0
            if best is None or inl.sum() > best.sum():
                best = inl
        c, r = _sphere(p[best])
        index = c / spacing
        out[side] = {
            "centre_lps_mm": [round(v, 2) for v in image.TransformContinuousIndexToPhysicalPoint(index.tolist())],
            "continuous_index_ijk": [round(float(v), 2) for v in index],
            "radius_mm": round(r, 2),
            "edge_points": f"{int(best.sum())} of {len(p)}",
        }
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, default=STUDY)
    print(json.dumps(fit(parser.parse_args().study), indent=2))
