"""The patient model of the phantoms: anatomy, stage signs and per-study randomisation.

``_sample_patient`` draws one patient (``_Patient``) in world LPS mm from a seed: body,
pelvis, femora, surroundings, the Ficat-Arlet signs of each femoral head and the study's
domain randomisation (``_Domain``). Rendering is in ``sim.phantoms.render``.

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
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared_models.stages import FicatArletStage
from sim.phantoms.geometry import Vec, _Body, _Bone, _Capsule, _Ellipsoid, _ellipsoid, _rot, _Sphere, _unit, _vec
from sim.phantoms.profiles import FOV_CENTRE_LPS_MM

_SIDES = ("R", "L")


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
