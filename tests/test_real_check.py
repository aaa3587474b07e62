"""Hand-marked femoral heads of the real ProstateX study, and the box-distance check (issue 17)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from sim.experiments.real_check import PROSTATEX_MARKS, check_boxes, main
from tests.conftest import real_data_or_skip

MARKS = json.loads(PROSTATEX_MARKS.read_text())


def _result(boxes: dict[str, tuple[list[float], bool]]) -> dict:
    heads = []
    for side, (box, assessed) in boxes.items():
        heads.append(
            {
                "side": side,
                "box_lps_mm": box,
                "assessed": assessed,
                "predicted_stage": "I" if assessed else None,
                "flags": [] if assessed else ["off_target"],
            }
        )
    return {"verdict": "assessed", "heads": heads}


def _box_around(centre, offset, half=23.0) -> list[float]:
    c = np.asarray(centre, dtype=float) + np.asarray(offset, dtype=float)
    return [*(c - half), *(c + half)]


def test_distance_is_measured_from_the_box_centre():
    r, left = MARKS["heads"]["R"]["centre_lps_mm"], MARKS["heads"]["L"]["centre_lps_mm"]
    # a 3-4-12 offset is 13 mm away (within 15), a 12-16-0 offset is 20 mm (beyond)
    rows = check_boxes(
        _result({"R": (_box_around(r, (3, 4, 12)), True), "L": (_box_around(left, (12, -16, 0)), True)}), MARKS
    )
    by = {row["side"]: row for row in rows}
    assert by["R"]["distance_mm"] == pytest.approx(13.0, abs=0.05) and by["R"]["passed"]
    assert by["L"]["distance_mm"] == pytest.approx(20.0, abs=0.05) and not by["L"]["passed"]


def test_a_far_head_passes_only_when_it_is_not_staged():
    left = MARKS["heads"]["L"]["centre_lps_mm"]
    far = _box_around(left, (0, -50, 0))  # the anterior abdominal wall, 50 mm off
    staged = {r["side"]: r for r in check_boxes(_result({"L": (far, True)}), MARKS)}
    flagged = {r["side"]: r for r in check_boxes(_result({"L": (far, False)}), MARKS)}
    assert not staged["L"]["passed"] and staged["L"]["staged"]
    assert flagged["L"]["passed"] and not flagged["L"]["staged"] and flagged["L"]["flags"] == ["off_target"]


def test_marks_are_adult_hips_on_both_sides_of_the_study():
    study = real_data_or_skip("prostatex-0000-pelvis-t2-axial.nii.gz")
    image = sitk.ReadImage(str(study))
    r = np.array(MARKS["heads"]["R"]["centre_lps_mm"])
    left = np.array(MARKS["heads"]["L"]["centre_lps_mm"])
    assert left[0] > r[0]  # LPS: +x is the patient's left
    assert 150.0 <= np.linalg.norm(left - r) <= 220.0  # adult inter-head-centre distance
    for side in ("R", "L"):
        head = MARKS["heads"][side]
        assert 20.0 <= head["radius_mm"] <= 27.0
        index = np.array(image.TransformPhysicalPointToContinuousIndex(head["centre_lps_mm"]))
        np.testing.assert_allclose(index, head["continuous_index_ijk"], atol=0.05)
        assert np.all(index > -0.5) and np.all(index < np.array(image.GetSize()) - 0.5)
        # the centre is in marrow: brighter than the study's median, and a sphere of 15 mm is too
        a = sitk.GetArrayViewFromImage(image)
        k, j, i = (int(round(v)) for v in index[::-1])
        assert np.median(a[k, j - 10 : j + 11, max(i - 10, 0) : i + 11]) > np.median(a)


def test_marks_match_a_refit():
    study = real_data_or_skip("prostatex-0000-pelvis-t2-axial.nii.gz")
    path = PROSTATEX_MARKS.parent / "fit_femoral_heads.py"
    spec = importlib.util.spec_from_file_location("fit_femoral_heads", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    refit = module.fit(study, seed=1)  # other RANSAC draws than the recorded fit
    for side in ("R", "L"):
        assert math.dist(refit[side]["centre_lps_mm"], MARKS["heads"][side]["centre_lps_mm"]) < 1.5, side


@pytest.mark.slow
def test_trained_bundle_lands_on_the_real_heads_or_flags_them(tmp_path):
    """Issue 17's bar, on a bundle named by ``ONFH_REAL_BUNDLE`` (e.g. ``runs/demo/run/bundle`` of ``make demo``)."""
    study = real_data_or_skip("prostatex-0000-pelvis-t2-axial.nii.gz")
    bundle = os.environ.get("ONFH_REAL_BUNDLE")
    if not bundle:
        pytest.skip("set ONFH_REAL_BUNDLE to a trained bundle folder (paper profile) to run this check")
    key = Path(bundle).parent / "keys" / "bundle-signing-key.pem.pub"
    argv = ["--bundle", bundle, "--study", str(study), "--out", str(tmp_path)]
    argv += ["--public-key", str(key)] if key.exists() else []
    assert main(argv) == 0
