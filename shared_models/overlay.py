"""PNG figures of a two-stage inference: detector boxes over the study, Grad-CAM over each head.

``onfh infer`` writes, next to ``result.json`` and ``gradcam_<side>.nii.gz``:

* ``overview.png``: the whole study with both femoral-head boxes, one row per head,
  axial / coronal / sagittal slices through that box's centre; caption with each box's
  detector score and low-confidence flag. Purpose: checking by eye whether 3DC-YOLOX's
  boxes sit on the femoral heads.
* ``gradcam_<side>.png`` per head: the same three orthogonal slices zoomed on the head,
  MRI in grey, the 3D Grad-CAM map (paper section 2.4, Figure 7) over it as a
  semi-transparent ``jet`` map with a colour bar and its 0.5 contour, the box and the
  stager's crop region drawn; title with the predicted Ficat-Arlet stage, the three
  probabilities and the Grad-CAM volume at or above 0.5 in mm³ (paper section 3.4).

Geometry (see ``docs/CONVENTIONS.md``): every panel is a plane of an axis-aligned **LPS**
grid with **isotropic** pixels (``SliceGrid``), sampled from the study with
``sitk.Resample`` (linear). Oblique or anisotropic acquisitions are therefore shown in
true physical proportions and the axis-aligned LPS boxes are exact rectangles. Panels
follow the radiological display convention and are labelled at their edges:

============  ===================  =====================  ==================
plane          columns (left→right)  rows (top→bottom)      fixed coordinate
============  ===================  =====================  ==================
``axial``      +x: R → L             +y: A → P              z (mm)
``coronal``    +x: R → L             −z: S → I              y (mm)
``sagittal``   +y: A → P             −z: S → I              x (mm)
============  ===================  =====================  ==================

Points outside the scanned volume are NaN in the sampled arrays and drawn in a flat
brown, so a box that runs off the field of view stays visible as such.

Grey levels use a display window from the study's 1st and 99.5th intensity percentiles
(not the model's level/width window, which is tuned for the network's input).

Figures are rendered with matplotlib's Agg canvas (``matplotlib.figure.Figure`` +
``FigureCanvasAgg``), so pyplot's global backend is never touched. No patient data is
drawn or logged: figures hold geometry, scores and probabilities only.
"""

from __future__ import annotations

import itertools
import logging
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter, MaxNLocator

from shared_models.pipeline import GRADCAM_VOLUME_THRESHOLD, HeadResult
from shared_models.preprocessing import image_bounds_lps, midline_x_mm

__all__ = [
    "PLANES",
    "Panel",
    "SliceGrid",
    "cam_rgba",
    "display_window",
    "image_bounds_lps",
    "montage_panels",
    "overview_panels",
    "sample_slice",
    "write_gradcam_montage",
    "write_infer_figures",
    "write_overview_png",
]

log = logging.getLogger(__name__)

_EX, _EY, _EZ = np.eye(3)

# plane -> (column direction, row direction, normal), unit LPS vectors; (left, right, top, bottom) edge labels.
PLANES: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {
    "axial": (_EX, _EY, _EZ),
    "coronal": (_EX, -_EZ, _EY),
    "sagittal": (_EY, -_EZ, _EX),
}
_EDGE_LABELS = {
    "axial": ("R", "L", "A", "P"),
    "coronal": ("R", "L", "S", "I"),
    "sagittal": ("A", "P", "S", "I"),
}
_AXIS_NAMES = {"axial": ("x", "y", "z"), "coronal": ("x", "z", "y"), "sagittal": ("y", "z", "x")}

SIDE_NAMES = {"R": "right", "L": "left"}
SIDE_COLOURS = {"R": "#00e5ff", "L": "#ffb000"}  # cyan / amber, both visible on grey
OUTSIDE_COLOUR = "#5a3a1e"  # brown: outside the scanned volume
CAM_CMAP = "jet"
CAM_ALPHA = 0.5
OVERVIEW_MAX_PX = 512
MONTAGE_MAX_PX = 320


# --------------------------------------------------------------------------- geometry


def _check_image(image: sitk.Image) -> None:
    if not isinstance(image, sitk.Image) or image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError("expected a 3D scalar SimpleITK image")


def _box(box_lps_mm: npt.ArrayLike) -> np.ndarray:
    box = np.asarray(box_lps_mm, dtype=np.float64).reshape(-1)
    if box.shape != (6,) or not np.all(np.isfinite(box)) or np.any(box[3:] < box[:3]):
        raise ValueError(
            f"box must be 6 finite numbers (x0, y0, z0, x1, y1, z1) with x0<=x1, y0<=y1, z0<=z1, got {box_lps_mm!r}"
        )
    return box


@dataclass(frozen=True)
class SliceGrid:
    """One display plane: an axis-aligned LPS pixel grid with isotropic spacing.

    Pixel ``(row, col)`` has its centre at ``origin_lps_mm + col*spacing_mm*col_dir +
    row*spacing_mm*row_dir`` (``col_dir``/``row_dir`` from :data:`PLANES`); pixel centres are at
    integer coordinates, so the grid spans ``[-0.5, n-0.5]`` in continuous pixel units, which is
    matplotlib ``imshow``'s default extent.

    Attributes:
        plane: ``"axial"``, ``"coronal"`` or ``"sagittal"``.
        origin_lps_mm: LPS point (mm) of the centre of pixel ``(0, 0)``; its normal component is
            the slice position.
        spacing_mm: pixel size in mm along rows and columns (isotropic).
        shape: ``(rows, cols)``.
    """

    plane: str
    origin_lps_mm: tuple[float, float, float]
    spacing_mm: float
    shape: tuple[int, int]

    @classmethod
    def covering(
        cls,
        plane: str,
        low_xyz: npt.ArrayLike,
        high_xyz: npt.ArrayLike,
        through_lps_mm: npt.ArrayLike,
        spacing_mm: float,
    ) -> SliceGrid:
        """The grid of ``plane`` covering the LPS box ``[low, high]`` in-plane, through a point.

        Args:
            plane: one of :data:`PLANES`.
            low_xyz, high_xyz: LPS box (mm) the panel must show.
            through_lps_mm: a point (mm) on the plane, e.g. a femoral-head box centre.
            spacing_mm: isotropic pixel size in mm (> 0).

        Raises:
            ValueError: unknown plane, non-positive spacing or an empty box.
        """
        if plane not in PLANES:
            raise ValueError(f"plane must be one of {sorted(PLANES)}, got {plane!r}")
        if not (math.isfinite(spacing_mm) and spacing_mm > 0):
            raise ValueError(f"spacing_mm must be positive, got {spacing_mm!r}")
        low, high = np.asarray(low_xyz, float), np.asarray(high_xyz, float)
        if np.any(high <= low):
            raise ValueError(f"empty display box {low.tolist()} .. {high.tolist()}")
        col_dir, row_dir, normal = PLANES[plane]
        size = []
        start = np.asarray(through_lps_mm, float) * np.abs(normal)  # keeps only the normal component
        for d in (col_dir, row_dir):
            axis = int(np.argmax(np.abs(d)))
            n = max(1, math.ceil((high[axis] - low[axis]) / spacing_mm))
            first_edge = low[axis] if d[axis] > 0 else high[axis]
            start = start + (first_edge + d[axis] * spacing_mm / 2.0) * np.abs(d)
            # centre the n pixels on the requested extent
            start = start + d * ((high[axis] - low[axis]) - n * spacing_mm) / 2.0
            size.append(n)
        origin = (float(start[0]), float(start[1]), float(start[2]))
        return cls(plane, origin, float(spacing_mm), (size[1], size[0]))

    @property
    def directions(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(col_dir, row_dir, normal)`` unit LPS vectors."""
        return PLANES[self.plane]

    @property
    def position_mm(self) -> float:
        """The fixed coordinate of the plane (z for axial, y for coronal, x for sagittal), mm."""
        return float(np.dot(self.origin_lps_mm, self.directions[2]))

    def reference_image(self) -> sitk.Image:
        """A one-voxel-thick float32 3D image whose array ``[0]`` is this panel (a resampling target)."""
        col_dir, row_dir, normal = self.directions
        ref = sitk.Image([self.shape[1], self.shape[0], 1], sitk.sitkFloat32)
        ref.SetSpacing((self.spacing_mm,) * 3)
        ref.SetOrigin(self.origin_lps_mm)
        ref.SetDirection(tuple(np.column_stack([col_dir, row_dir, normal]).ravel()))
        return ref

    def lps_to_px(self, points_lps_mm: np.ndarray) -> np.ndarray:
        """LPS points ``(N, 3)`` mm -> continuous pixel coordinates ``(N, 2)`` as ``(col, row)``."""
        col_dir, row_dir, _ = self.directions
        rel = np.atleast_2d(np.asarray(points_lps_mm, float)) - np.asarray(self.origin_lps_mm)
        return np.stack([rel @ col_dir, rel @ row_dir], axis=1) / self.spacing_mm

    def px_to_mm(self, value: float, axis: int) -> float:
        """Continuous pixel coordinate along columns (``axis=0``) or rows (``axis=1``) -> LPS coordinate (mm)."""
        d = self.directions[axis]
        return float(np.dot(self.origin_lps_mm, d) + value * self.spacing_mm) * float(d[int(np.argmax(np.abs(d)))])

    def box_rect_px(self, box_lps_mm: npt.ArrayLike) -> tuple[float, float, float, float] | None:
        """The box's rectangle on this panel, or ``None`` when the plane misses the box.

        Args:
            box_lps_mm: ``(x0, y0, z0, x1, y1, z1)`` in LPS mm.

        Returns:
            ``(col0, row0, col1, row1)``, continuous pixel coordinates (``col0 < col1``,
            ``row0 < row1``), possibly beyond the panel when the box is.
        """
        box = _box(box_lps_mm)
        normal_axis = int(np.argmax(np.abs(self.directions[2])))
        if not box[normal_axis] <= self.position_mm <= box[3 + normal_axis]:
            return None
        px = self.lps_to_px(np.array(list(itertools.product(*zip(box[:3], box[3:])))))
        (c0, r0), (c1, r1) = px.min(axis=0), px.max(axis=0)
        return float(c0), float(r0), float(c1), float(r1)


def sample_slice(image: sitk.Image, grid: SliceGrid, outside: float = float("nan")) -> np.ndarray:
    """Sample a 3D image on a display plane with ``sitk.Resample`` (linear).

    Args:
        image: 3D scalar image in any geometry (study, Grad-CAM map, ...).
        grid: the display plane.
        outside: value for pixels outside ``image`` (NaN marks "not scanned").

    Returns:
        float32 ``grid.shape`` array, row 0 at the top of the panel.
    """
    _check_image(image)
    out = sitk.Resample(
        image, grid.reference_image(), sitk.Transform(), sitk.sitkLinear, float(outside), sitk.sitkFloat32
    )
    return sitk.GetArrayFromImage(out)[0]


def display_window(image: sitk.Image, percentiles: tuple[float, float] = (1.0, 99.5)) -> tuple[float, float]:
    """Grey-level display range ``(vmin, vmax)`` in the image's intensity units from its percentiles."""
    values = sitk.GetArrayViewFromImage(image)
    lo, hi = np.nanpercentile(values, percentiles)
    if not hi > lo:
        hi = lo + 1.0
    return float(lo), float(hi)


def cam_rgba(cam: np.ndarray, threshold: float = GRADCAM_VOLUME_THRESHOLD, alpha: float = CAM_ALPHA) -> np.ndarray:
    """Colour a Grad-CAM slice for overlay: ``jet`` colours, opacity rising with the map.

    Args:
        cam: 2D map in ``[0, 1]`` (NaN treated as 0).
        threshold: map value from which the overlay is fully opaque (``alpha``); below it the
            opacity falls linearly to 0 at 0, so zero evidence leaves the MRI untouched.
        alpha: maximum opacity.

    Returns:
        float32 ``(*cam.shape, 4)`` RGBA in ``[0, 1]``; alpha is 0 exactly where the map is 0.
    """
    cam = np.nan_to_num(np.clip(np.asarray(cam, dtype=np.float32), 0.0, 1.0))
    rgba = colormaps[CAM_CMAP](cam).astype(np.float32)
    rgba[..., 3] = alpha * np.clip(cam / max(threshold, 1e-6), 0.0, 1.0)
    return rgba


def _cam_image(result: HeadResult) -> sitk.Image:
    """The finest Grad-CAM map of a head: on the crop grid when known, else in the study's geometry."""
    if result.gradcam_crop is not None and result.crop_grid is not None:
        g = result.crop_grid
        cam = sitk.GetImageFromArray(np.asarray(result.gradcam_crop, dtype=np.float32))
        cam.SetSpacing(g.spacing_dhw_mm[::-1])
        cam.SetOrigin(g.origin_lps_mm)
        cam.SetDirection(g.direction)
        return cam
    return result.gradcam


# --------------------------------------------------------------------------- panels


@dataclass
class BoxOverlay:
    """A rectangle to draw on a :class:`Panel`.

    Attributes:
        label: text drawn at its top-left corner (e.g. ``"R"``, ``"L box"``, ``"crop"``).
        rect_px: ``(col0, row0, col1, row1)`` in continuous pixel coordinates of the panel.
        colour: matplotlib colour.
        dashed: dashed outline (a low-confidence detection).
        dotted: thin dotted outline (the stager's crop region).
    """

    label: str
    rect_px: tuple[float, float, float, float]
    colour: str
    dashed: bool = False
    dotted: bool = False


@dataclass
class Panel:
    """Everything one subplot draws, in display pixel coordinates (see :class:`SliceGrid`).

    Attributes:
        grid: the display plane.
        mri: float32 ``grid.shape``, study intensities (NaN outside the scan).
        cam: float32 ``grid.shape`` Grad-CAM map in ``[0, 1]`` (0 outside the crop), or ``None``.
        boxes: rectangles to draw (femoral-head boxes, crop regions).
        title: subplot title.
        midline_col: column of the detector's midline split, or ``None``.
    """

    grid: SliceGrid
    mri: np.ndarray
    cam: np.ndarray | None = None
    boxes: list[BoxOverlay] = field(default_factory=list)
    title: str = ""
    midline_col: float | None = None


def _box_centre(box: np.ndarray) -> np.ndarray:
    return (box[:3] + box[3:]) / 2.0


def _overview_bounds(image: sitk.Image, results: Sequence[HeadResult], slack_mm: float = 60.0):
    low, high = image_bounds_lps(image)
    show_low, show_high = low.copy(), high.copy()
    for r in results:
        box = _box(r.box_lps_mm)
        show_low = np.minimum(show_low, np.maximum(box[:3], low - slack_mm))
        show_high = np.maximum(show_high, np.minimum(box[3:], high + slack_mm))
    return show_low, show_high


def overview_panels(
    image: sitk.Image, results: Sequence[HeadResult], planes: Sequence[str] = ("axial", "coronal", "sagittal")
) -> list[list[Panel]]:
    """Panels of the overview figure: one row per head, one column per plane.

    Each panel shows the whole study (its LPS hull, widened to boxes that run past it by up to
    60 mm) on a plane through that head's box centre, with every box the plane cuts. Pixel size is
    the study's finest spacing, coarsened so no side exceeds 512 pixels.

    Args:
        image: the study as analysed (any orientation), 3D scalar.
        results: :func:`~shared_models.pipeline.analyse_study` output.
        planes: which of :data:`PLANES` to show, in order.

    Returns:
        ``rows[head][plane]``.

    Raises:
        ValueError: not a 3D scalar image, an unknown plane or a malformed box.
    """
    _check_image(image)
    low, high = _overview_bounds(image, results)
    spacing = max(min(image.GetSpacing()), float(np.max(high - low)) / OVERVIEW_MAX_PX)
    mid_x = midline_x_mm(image)  # where the detector splits the study (physical extent: orientation-independent)
    rows = []
    for r in results:
        centre = _box_centre(_box(r.box_lps_mm))
        row = []
        for plane in planes:
            grid = SliceGrid.covering(plane, low, high, centre, spacing)
            panel = Panel(grid, sample_slice(image, grid))
            for other in results:
                rect = grid.box_rect_px(other.box_lps_mm)
                if rect is not None:
                    panel.boxes.append(
                        BoxOverlay(other.side, rect, SIDE_COLOURS.get(other.side, "white"), dashed=other.low_confidence)
                    )
            if grid.directions[0][0] != 0:  # columns run along x: show the midline split
                panel.midline_col = float(grid.lps_to_px(np.array([mid_x, 0.0, 0.0]))[0, 0])
            name = _AXIS_NAMES[plane][2]
            panel.title = f"{plane}, {name} = {grid.position_mm:.1f} mm (through {r.side} box centre)"
            row.append(panel)
        rows.append(row)
    return rows


def montage_panels(image: sitk.Image, result: HeadResult, margin_mm: float | None = None) -> list[Panel]:
    """Panels of one head's Grad-CAM montage: axial, coronal, sagittal through the box centre.

    Each panel is a square field of view centred on the box, of side ``max(box size) + 2 *
    margin_mm`` (default margin: the larger of 15 mm and 35 % of the box's largest side).
    The Grad-CAM map is the crop-grid map (``result.gradcam_crop`` on ``result.crop_grid``)
    when present, else ``result.gradcam`` in the study's geometry; both are sampled with
    ``sitk.Resample`` onto the same pixels as the MRI.

    Returns:
        Three :class:`Panel` with ``cam`` set; boxes: the head box (dashed when low-confidence),
        and the stager's crop region (dotted) when the crop grid is known. Pixel size: half the
        study's finest spacing, coarsened so no side exceeds 320 pixels.

    Raises:
        ValueError: not a 3D scalar image or a malformed box.
    """
    _check_image(image)
    box = _box(result.box_lps_mm)
    centre = _box_centre(box)
    size = float(np.max(box[3:] - box[:3]))
    margin = max(15.0, 0.35 * size) if margin_mm is None else float(margin_mm)
    half = size / 2.0 + margin
    low, high = centre - half, centre + half
    spacing = max(min(image.GetSpacing()) / 2.0, 2.0 * half / MONTAGE_MAX_PX)
    cam_image = _cam_image(result)
    crop_box = None
    if result.crop_grid is not None:
        g = result.crop_grid
        ref = g.reference_image()
        crop_low, crop_high = image_bounds_lps(ref)
        crop_box = np.concatenate([crop_low, crop_high])
    panels = []
    for plane in PLANES:
        grid = SliceGrid.covering(plane, low, high, centre, spacing)
        panel = Panel(grid, sample_slice(image, grid), cam=sample_slice(cam_image, grid, outside=0.0))
        head_rect = grid.box_rect_px(box)
        if head_rect is None:  # cannot happen: the plane passes through the box centre
            raise RuntimeError(f"the {plane} panel misses the {result.side} box it is centred on")
        panel.boxes.append(BoxOverlay(f"{result.side} box", head_rect, "white", dashed=result.low_confidence))
        if crop_box is not None and (rect := grid.box_rect_px(crop_box)) is not None:
            panel.boxes.append(BoxOverlay("crop", rect, "#b0b0b0", dotted=True))
        panel.title = f"{plane}, {_AXIS_NAMES[plane][2]} = {grid.position_mm:.1f} mm"
        panels.append(panel)
    return panels


# --------------------------------------------------------------------------- drawing


def _grey_cmap():
    return colormaps["gray"].with_extremes(bad=OUTSIDE_COLOUR)


def _draw_panel(
    ax, panel: Panel, window: tuple[float, float], *, show_cam: bool = True, cam_threshold: float | None = None
) -> None:
    grid = panel.grid
    ax.imshow(
        np.ma.masked_invalid(panel.mri), cmap=_grey_cmap(), vmin=window[0], vmax=window[1], interpolation="nearest"
    )
    if panel.cam is not None and show_cam:
        ax.imshow(cam_rgba(panel.cam), interpolation="nearest")
        cam = np.nan_to_num(panel.cam)
        if cam_threshold is not None and cam.min() < cam_threshold <= cam.max():
            ax.contour(cam, levels=[cam_threshold], colors="white", linewidths=0.8, linestyles="solid")
    if panel.midline_col is not None and -0.5 <= panel.midline_col <= grid.shape[1] - 0.5:
        ax.axvline(panel.midline_col, color="#ff60ff", lw=0.8, ls=":")
    for b in panel.boxes:
        c0, r0, c1, r1 = b.rect_px
        ax.add_patch(
            Rectangle(
                (c0, r0),
                c1 - c0,
                r1 - r0,
                fill=False,
                edgecolor=b.colour,
                lw=1.0 if b.dotted else 1.6,
                ls=":" if b.dotted else "--" if b.dashed else "-",
            )
        )
        ax.text(c0, r0 - 1, b.label, color=b.colour, fontsize=7, va="bottom", ha="left", clip_on=True)
    ax.set_xlim(-0.5, grid.shape[1] - 0.5)
    ax.set_ylim(grid.shape[0] - 0.5, -0.5)
    ax.set_aspect("equal")  # pixels are isotropic: equal aspect is physical mm aspect
    names = _AXIS_NAMES[grid.plane]
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{grid.px_to_mm(v, 0):.0f}"))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{grid.px_to_mm(v, 1):.0f}"))
    ax.xaxis.set_major_locator(MaxNLocator(5))
    ax.yaxis.set_major_locator(MaxNLocator(5))
    ax.tick_params(labelsize=6, length=2)
    # Orientation letters sit in the axis labels, outside the image, so they never hide anatomy at the
    # edges of the field of view (where the femoral heads often are). A rotated y label reads bottom-up.
    left, right, top, bottom = _EDGE_LABELS[grid.plane]
    ax.set_xlabel(f"{left}  \u2190  {names[0]} (mm)  \u2192  {right}", fontsize=8, labelpad=1)
    ax.set_ylabel(f"{bottom}  \u2190  {names[1]} (mm)  \u2192  {top}", fontsize=8, labelpad=1)
    ax.set_title(panel.title, fontsize=8)


def _save(fig: Figure, path: Path, dpi: int) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def not_assessed_text(r: HeadResult) -> str | None:
    """``"not assessed: <reasons>"`` for a head whose stage was withheld (refused study or a flag), else None."""
    reasons = getattr(r, "not_assessed", ())
    return f"not assessed: {'; '.join(reasons)}" if reasons else None


def _head_caption(r: HeadResult) -> str:
    flag = "  LOW CONFIDENCE (score below the validation threshold or no box; dashed)" if r.low_confidence else ""
    box = " ".join(f"{v:.0f}" for v in r.box_lps_mm)
    name = SIDE_NAMES.get(r.side, r.side)
    stage = not_assessed_text(r) or f"predicted Ficat-Arlet stage {r.predicted_stage}"
    return f"{r.side} ({name} head): {stage};  detector score {r.detector_score:.2f}{flag};  box LPS mm [{box}]"


def write_overview_png(image: sitk.Image, results: Sequence[HeadResult], path: Path, *, dpi: int = 110) -> Path:
    """Write the study overview with both femoral-head boxes (see the module docstring).

    Args:
        image: the study as analysed (any orientation; same image given to
            :func:`~shared_models.pipeline.analyse_study`), 3D scalar.
        results: one :class:`~shared_models.pipeline.HeadResult` per head.
        path: PNG file to write (parent folders are created).
        dpi: resolution.

    Returns:
        ``path``.

    Raises:
        ValueError: not a 3D scalar image or a malformed box.
        OSError: the file cannot be written.
    """
    rows = overview_panels(image, results)
    window = display_window(image)
    n_rows, n_cols = max(1, len(rows)), 3
    fig = Figure(figsize=(4.2 * n_cols, 3.9 * n_rows + 1.0), layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for i, row in enumerate(rows):
        for j, panel in enumerate(row):
            _draw_panel(axes[i][j], panel, window)
    for i in range(len(rows), n_rows):
        for ax in axes[i]:
            ax.set_axis_off()
    fig.suptitle(
        "Femoral-head detection (3DC-YOLOX): boxes on the input MRI, LPS display, radiological view", fontsize=10
    )
    caption = "\n".join(_head_caption(r) for r in results) or "no femoral head result"
    caption += (
        "\nboxes: R cyan, L amber (dashed = low confidence); magenta dotted: midline split of the detector;"
        " brown: outside the scanned volume; grey window: 1st-99.5th intensity percentile"
    )
    fig.supxlabel(caption, fontsize=7.5, ha="left", x=0.01, multialignment="left")
    return _save(fig, path, dpi)


def write_gradcam_montage(image: sitk.Image, result: HeadResult, path: Path, *, dpi: int = 110) -> Path:
    """Write one head's Grad-CAM montage (see the module docstring).

    Args:
        image: the study as analysed (any orientation), 3D scalar.
        result: that head's :class:`~shared_models.pipeline.HeadResult`; its map may be all zero.
        path: PNG file to write (parent folders are created).
        dpi: resolution.

    Returns:
        ``path``.

    Raises:
        ValueError: not a 3D scalar image or a malformed box.
        OSError: the file cannot be written.
    """
    panels = montage_panels(image, result)
    window = display_window(image)
    fig = Figure(figsize=(12.0, 9.3), layout="constrained")
    axes = fig.subplots(2, 3)
    # top row: the MRI alone, so the anatomy under the heat map stays readable; bottom row: the overlay
    for ax, panel in zip(axes[0], panels):
        _draw_panel(ax, panel, window, show_cam=False)
    for ax, panel in zip(axes[1], panels):
        _draw_panel(ax, panel, window, cam_threshold=GRADCAM_VOLUME_THRESHOLD)
    bar = fig.colorbar(ScalarMappable(Normalize(0.0, 1.0), CAM_CMAP), ax=list(axes[1]), shrink=0.85, pad=0.01)
    bar.set_label("Grad-CAM (evidence for the predicted stage, 0-1)", fontsize=8)
    bar.ax.tick_params(labelsize=7)
    probs = "  ".join(f"P({k}) = {v:.2f}" for k, v in result.stage_probabilities.items())
    flag = "  [LOW-CONFIDENCE DETECTION]" if result.low_confidence else ""
    withheld = not_assessed_text(result)
    verdict = withheld if withheld else f"predicted Ficat-Arlet stage {result.predicted_stage}   ({probs})"
    title = f"{SIDE_NAMES.get(result.side, result.side).capitalize()} femoral head ({result.side}): {verdict}"
    fig.suptitle(
        f"{textwrap.fill(title, 130)}\n"
        f"Grad-CAM >= {GRADCAM_VOLUME_THRESHOLD:g} (white contour): {result.gradcam_volume_mm3:,.0f} mm³;  "
        f"detector score {result.detector_score:.2f}{flag}",
        fontsize=10,
    )
    cam_max = max(float(np.nanmax(p.cam)) for p in panels if p.cam is not None)
    note = (
        "top: MRI; bottom: Grad-CAM over MRI. White box: femoral-head box (dashed = low-confidence detection); "
        "grey dotted: stager crop (box + margin), where the map is defined; brown: outside the scan.\n"
        "Grey window: 1st-99.5th intensity percentile. Research prototype, not a diagnosis."
    )
    if withheld:
        note = "No Grad-CAM: the head was not assessed (no stage is given).\n" + note
    elif cam_max <= 0.0:
        note = "Grad-CAM is zero on these slices (no positive evidence for the predicted stage). " + note
    fig.supxlabel(note, fontsize=7.5)
    return _save(fig, path, dpi)


def write_infer_figures(image: sitk.Image, results: Sequence[HeadResult], out_dir: Path) -> list[Path]:
    """Write ``overview.png`` and ``gradcam_<side>.png`` per head into ``out_dir``.

    Call it from ``onfh infer`` after ``gradcam_<side>.nii.gz`` are written, with the same image
    given to :func:`~shared_models.pipeline.analyse_study`.

    Args:
        image: the study as analysed, 3D scalar, any orientation.
        results: :func:`~shared_models.pipeline.analyse_study` output.
        out_dir: folder (created if missing).

    Returns:
        Paths written: overview first, then one montage per head in ``results`` order.

    Raises:
        ValueError: not a 3D scalar image or a malformed box.
        OSError: a file cannot be written.
    """
    out_dir = Path(out_dir)
    paths = [write_overview_png(image, results, out_dir / "overview.png")]
    for r in results:
        paths.append(write_gradcam_montage(image, r, out_dir / f"gradcam_{r.side}.png"))
    log.info("wrote %d inference figures (overview + %d Grad-CAM montages)", len(paths), len(results))
    return paths
