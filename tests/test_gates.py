"""Issue 17: every gate of the inference pipeline, with a case that passes and a case that is refused."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from shared_models.calibration import Calibration
from shared_models.detection import YOLOX3D
from shared_models.gates import check_body_part, check_field_of_view, check_head, check_pair
from shared_models.pipeline import _stage_from, analyse_study, study_verdict
from shared_models.preprocessing import PreprocessingSpec, orient_lps, resample_crop
from shared_models.specs import DetectorConfig
from shared_models.stager import MulDenseNet3D, StagerConfig

DCFG = DetectorConfig(widths=(4, 8, 8, 16), depths=(1, 1, 1), head_width=8)
SCFG = StagerConfig(init_features=8, growth_rate=4, block_config=(1, 1), pool_scales=(1, 2))


def _image(size_xyz=(32, 24, 16), spacing=(12.0, 10.0, 8.0), origin_centred=True) -> sitk.Image:
    """LPS-axis image; with the default 12 mm x spacing it is 384 mm wide, centred on x = 0."""
    rng = np.random.default_rng(1)
    img = sitk.GetImageFromArray(rng.uniform(0, 900, size=size_xyz[::-1]).astype(np.float32))
    img.SetSpacing(spacing)
    if origin_centred:
        img.SetOrigin(tuple(-(n - 1) / 2 * s for n, s in zip(size_xyz, spacing)))
    return img


# ----------------------------------------------------------------------------- study gates


def test_body_part_gate():
    assert check_body_part("HIP").passed and check_body_part("pelvis").passed
    assert check_body_part(None).passed and check_body_part("  ").passed  # absent: no decision
    refused = check_body_part("BRAIN")
    assert not refused.passed and "BRAIN" in refused.reasons[0]
    assert not check_body_part("KNEE").passed


def test_field_of_view_gate():
    assert check_field_of_view(_image()).passed  # 384 x 240 x 128 mm
    narrow = check_field_of_view(_image(size_xyz=(16, 24, 16)))  # 16 x 12 mm = 192 mm left-right
    assert not narrow.passed and "192 mm left-right" in narrow.reasons[0]
    short = check_field_of_view(_image(size_xyz=(32, 24, 4)))  # 4 x 8 mm = 32 mm head-foot
    assert not short.passed and "head-foot" in short.reasons[0]


@pytest.mark.parametrize(
    "spacing, origin",
    [
        ((float("nan"), 10.0, 8.0), None),
        ((12.0, 10.0, 8.0), (float("inf"), 0.0, 0.0)),
        ((12.0, 10.0, float("nan")), None),
    ],
)
def test_field_of_view_gate_fails_closed_on_non_finite_geometry(spacing, origin):
    image = _image(spacing=spacing)
    if origin is not None:
        image.SetOrigin(origin)
    gate = check_field_of_view(image)
    assert not gate.passed and "not finite" in gate.reasons[0]


def _box(centre, edge=48.0):
    c = np.asarray(centre, dtype=float)
    return tuple(np.concatenate([c - edge / 2, c + edge / 2]))


def test_pair_gate():
    image = _image()  # midline at x = 0; LPS: patient right is -x
    assert check_pair({"R": _box((-90, 0, 0)), "L": _box((90, 0, 0))}, image).passed
    swapped = check_pair({"R": _box((90, 0, 0)), "L": _box((-90, 0, 0))}, image)
    assert not swapped.passed and "midline" in swapped.reasons[0]
    close = check_pair({"R": _box((-30, 0, 0)), "L": _box((30, 0, 0))}, image)
    assert not close.passed and "60 mm apart" in close.reasons[0]
    far = check_pair({"R": _box((-150, 0, 0)), "L": _box((150, 0, 0))}, image)
    assert not far.passed and "300 mm apart" in far.reasons[0]
    assert not check_pair({"R": _box((-90, 0, 0))}, image).passed


def test_head_gate():
    image = _image()  # x -192..192, y -120..120, z -64..64 mm (voxel edges)
    assert check_head(_box((-90, 0, 0)), image).passed
    small = check_head(_box((-90, 0, 0), edge=14.0), image)
    assert not small.passed and "not the size of a femoral head" in small.reasons[0]
    big = check_head(_box((-90, 0, 0), edge=90.0), image)
    assert not big.passed
    # a box clipped at the -x face of the scanned volume: the head is cut by the field of view
    edge = check_head((-192.0, -24.0, -24.0, -150.0, 24.0, 24.0), image)
    assert not edge.passed and "edge of the scanned volume" in edge.reasons[-1]


# ----------------------------------------------------------------------------- pipeline


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return YOLOX3D(DCFG).eval(), MulDenseNet3D(SCFG).eval()


def test_refused_study_is_never_staged(models):
    detector, stager = models
    for image, body_part, reason in [(_image(size_xyz=(16, 24, 16)), None, "left-right"), (_image(), "BRAIN", "BRAIN")]:
        results = analyse_study(image, detector, stager, PreprocessingSpec(), body_part=body_part)
        verdict, reasons = study_verdict(results)
        assert verdict == "refused" and any(reason in r for r in reasons)
        for r in results:
            assert r.predicted_stage is None and r.stage_probabilities == {} and r.energy is None
            assert "refused" in r.flags and r.gradcam_volume_mm3 == 0.0
            assert not sitk.GetArrayViewFromImage(r.gradcam).any()


def _logits(stager, image, box, side, spec):
    crop, _ = resample_crop(orient_lps(sitk.Cast(image, sitk.sitkFloat32)), np.asarray(box), side, spec)
    with torch.no_grad():
        return stager(torch.from_numpy(crop)[None, None].float())[0].double()


def test_detector_threshold_and_out_of_distribution_gates(models):
    detector, stager = models
    spec, image = PreprocessingSpec(), _image()
    open_gates = Calibration(temperature=2.0, detector_threshold=0.0, energy_threshold=math.inf)
    passed = analyse_study(image, detector, stager, spec, calibration=open_gates, gates=False)
    assert study_verdict(passed) == ("assessed", [])
    for r in passed:
        # temperature scaling: softmax(z / T), z recomputed here from the same crop
        z = _logits(stager, image, r.box_lps_mm, r.side, spec)
        expected = torch.softmax(z / 2.0, dim=0).numpy()
        np.testing.assert_allclose([r.stage_probabilities[k] for k in ("0", "I", "II")], expected, atol=1e-5)
        assert r.energy == pytest.approx(float(-torch.logsumexp(z, dim=0)), abs=1e-5)
        assert r.predicted_stage is not None and r.assessed
    # a detector threshold above every score withholds both stages
    strict = analyse_study(image, detector, stager, spec, calibration=Calibration(detector_threshold=1.0), gates=False)
    verdict, reasons = study_verdict(strict)
    assert verdict == "flagged" and all("low_detector_score" in r.flags and r.low_confidence for r in strict)
    assert all(r.predicted_stage is None for r in strict) and "validation threshold" in reasons[0]
    # an energy threshold below both heads' energies flags them out of distribution
    ood_at = min(r.energy for r in passed) - 1e-3
    ood = analyse_study(image, detector, stager, spec, calibration=Calibration(energy_threshold=ood_at), gates=False)
    assert all(r.flags == ("out_of_distribution",) and r.predicted_stage is None for r in ood)
    # between the two energies: only the higher-energy head is flagged
    lo, hi = sorted(r.energy for r in passed)
    if hi - lo > 1e-4:
        mixed = analyse_study(
            image, detector, stager, spec, calibration=Calibration(energy_threshold=(lo + hi) / 2), gates=False
        )
        assert sorted(r.assessed for r in mixed) == [False, True]


def test_a_refused_calibration_withholds_every_stage(models):
    # the coordinator refused the pooled calibration (one site could force that): the bundle has no
    # validated gate, so the tool says it cannot judge instead of staging with the gates off
    detector, stager = models
    spec, image = PreprocessingSpec(), _image()
    assessed = analyse_study(image, detector, stager, spec, calibration=Calibration(), gates=False)
    assert study_verdict(assessed) == ("assessed", [])  # the same study is staged with a plain calibration
    refused = Calibration(fallback="temperature 8 outside [0.25, 4]")
    results = analyse_study(image, detector, stager, spec, calibration=refused, gates=False)
    verdict, reasons = study_verdict(results)
    assert verdict == "flagged" and "temperature 8 outside [0.25, 4]" in reasons[0]
    assert all(r.flags == ("uncalibrated",) and r.predicted_stage is None and not r.assessed for r in results)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("gates", [True, False])
def test_a_study_with_non_finite_voxels_is_refused_whatever_the_gates(models, bad, gates):
    detector, stager = models
    image = _image()
    values = sitk.GetArrayFromImage(image)
    values[8:, 10:14, :] = bad  # a slab of the study, wherever the heads are found
    broken = sitk.GetImageFromArray(values)
    broken.CopyInformation(image)
    calibration = Calibration(energy_threshold=math.inf, early_threshold=0.5)
    results = analyse_study(broken, detector, stager, PreprocessingSpec(), calibration=calibration, gates=gates)
    assert study_verdict(results) == ("refused", ["the study has non-finite voxel values (NaN or infinity)"])
    for r in results:
        assert r.predicted_stage is None and r.stage_probabilities == {} and r.energy is None
        assert r.early_probability is None and not sitk.GetArrayViewFromImage(r.gradcam).any()
    # the same study with the slab finite is assessed: the refusal is the non-finite voxels'
    assert (
        study_verdict(
            analyse_study(image, detector, stager, PreprocessingSpec(), calibration=calibration, gates=False)
        )[0]
        == "assessed"
    )


@pytest.mark.parametrize("logits", [(math.nan, math.nan, math.nan), (0.0, math.inf, 0.0), (0.0, 1.0, math.nan)])
def test_non_finite_stager_output_withholds_the_stage(models, logits):
    """Whatever the stager returns (here its output replaced by a forward hook), NaN passes no gate:
    with an open energy gate and an early threshold, NaN once compared False and was staged II."""
    detector, stager = models
    hook = stager.register_forward_hook(lambda module, inputs, output: torch.tensor([logits], dtype=output.dtype))
    try:
        results = analyse_study(
            _image(),
            detector,
            stager,
            PreprocessingSpec(),
            gates=False,
            calibration=Calibration(energy_threshold=math.inf, early_threshold=0.5),
        )
    finally:
        hook.remove()
    verdict, reasons = study_verdict(results)
    assert verdict == "flagged" and all("not finite" in reason for reason in reasons)
    for r in results:
        assert r.flags == ("non_finite",) and not r.assessed
        assert r.predicted_stage is None and r.stage_probabilities == {} and r.early_probability is None
    with pytest.raises(ValueError, match="not finite"):
        _stage_from(np.array([math.nan, math.nan, math.nan]), Calibration(early_threshold=0.5))


def test_early_threshold_decides_stage_zero_or_the_likelier_early_stage():
    probs = np.array([0.5, 0.3, 0.2])  # arg-max 0; P(early) = 0.5
    assert _stage_from(probs, None).label == "0"
    assert _stage_from(probs, Calibration(early_threshold=0.4)).label == "I"
    assert _stage_from(probs, Calibration(early_threshold=0.6)).label == "0"
    assert _stage_from(np.array([0.1, 0.3, 0.6]), Calibration(early_threshold=0.95)).label == "0"
    assert _stage_from(np.array([0.1, 0.3, 0.6]), Calibration(early_threshold=0.5)).label == "II"


def test_phantom_ground_truth_passes_every_gate_where_the_field_of_view_is_whole(tmp_path):
    """The anatomy limits hold for the phantoms' true boxes (heads 44-52 mm, 170-200 mm apart)."""
    import csv
    import dataclasses

    from client.dicom_series import read_study
    from sim.phantoms import PROFILES, generate_phantoms

    quick = PROFILES["quick"]
    profile = dataclasses.replace(
        quick,
        name="micro-gates",
        heads_per_site={"A": 8},
        patients_per_site={"A": 4},
        scanners={"A": quick.scanners["A"]},
        external_groups={},
    )
    generate_phantoms(tmp_path, profile, seed=3, workers=1)
    boxes: dict[str, dict[str, tuple]] = {}
    with open(tmp_path / "A" / "manifest.csv") as fh:
        for row in csv.DictReader(fh):
            boxes.setdefault(row["study"], {})[row["side"]] = tuple(float(v) for v in row["box_lps_mm"].split())
    whole = 0
    for study, pair in boxes.items():
        image = orient_lps(read_study(tmp_path / "A" / study))
        if not check_field_of_view(image).passed:  # a cut field of view (a prostate-like protocol): refused
            continue
        whole += 1
        assert check_pair(pair, image).passed, study
        assert all(check_head(b, image).passed for b in pair.values()), study
    assert whole >= 1
