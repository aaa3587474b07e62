import json

import pytest
import torch

from shared_models.bundle import BundleError, generate_signing_key, load_bundle, write_bundle
from shared_models.detection import YOLOX3D
from shared_models.preprocessing import PreprocessingSpec
from shared_models.specs import DetectorConfig
from shared_models.stager import MulDenseNet3D, StagerConfig


@pytest.fixture
def bundle(tmp_path):
    dcfg = DetectorConfig(widths=(4, 8, 8, 16), depths=(1, 1, 1), head_width=8)
    scfg = StagerConfig(init_features=8, growth_rate=4, block_config=(1, 1), pool_scales=(1, 2))
    det, stg = YOLOX3D(dcfg), MulDenseNet3D(scfg)
    key = generate_signing_key(tmp_path / "keys" / "signing.pem")
    path = write_bundle(
        tmp_path / "bundle",
        detector_state=det.state_dict(),
        stager_state=stg.state_dict(),
        detector_config=dcfg,
        stager_config=scfg,
        spec=PreprocessingSpec(),
        metrics={"auc": 0.9},
        run_config={"strategy": "fedavg"},
        signing_key=key,
    )
    return path, tmp_path / "keys" / "signing.pem.pub", det, stg


def test_round_trip_rebuilds_identical_models(bundle):
    path, pub, det, stg = bundle
    loaded = load_bundle(path, pub)
    assert loaded.trusted
    for a, b in ((det, loaded.detector), (stg, loaded.stager)):
        for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items()):
            assert k == k2 and v.dtype == v2.dtype and torch.equal(v, v2)
    assert loaded.metrics == {"auc": 0.9}
    assert loaded.spec == PreprocessingSpec()


def test_without_trusted_key_it_loads_but_is_untrusted(bundle):
    assert load_bundle(bundle[0]).trusted is False


def test_tampered_file_is_refused_by_name(bundle):
    path = bundle[0]
    (path / "metrics.json").write_text(json.dumps({"auc": 1.0}))
    with pytest.raises(BundleError, match="metrics.json"):
        load_bundle(path, bundle[1])


def test_other_signer_is_refused(bundle, tmp_path):
    other = tmp_path / "other.pem"
    generate_signing_key(other)
    with pytest.raises(BundleError, match="does not verify"):
        load_bundle(bundle[0], tmp_path / "other.pem.pub")


def test_missing_file_is_named(bundle):
    (bundle[0] / "stager.pt").unlink()
    with pytest.raises(BundleError, match="stager.pt"):
        load_bundle(bundle[0], bundle[1])


def test_calibration_travels_signed_and_is_optional(bundle, tmp_path):
    import math

    from shared_models.calibration import Calibration

    path, pub, det, stg = bundle
    assert load_bundle(path, pub).calibration is None  # an older bundle: no calibration.json
    cal = Calibration(temperature=1.4, detector_threshold=0.35, energy_threshold=math.inf, early_threshold=0.45)
    key = generate_signing_key(tmp_path / "k2.pem")
    out = write_bundle(
        tmp_path / "b2",
        detector_state=det.state_dict(),
        stager_state=stg.state_dict(),
        detector_config=DetectorConfig(widths=(4, 8, 8, 16), depths=(1, 1, 1), head_width=8),
        stager_config=StagerConfig(init_features=8, growth_rate=4, block_config=(1, 1), pool_scales=(1, 2)),
        spec=PreprocessingSpec(),
        metrics={},
        run_config={},
        signing_key=key,
        calibration=cal,
    )
    assert load_bundle(out, tmp_path / "k2.pem.pub").calibration == cal
    # a lowered threshold after signing is refused, and so is a removed calibration file
    (out / "calibration.json").write_text(json.dumps({**cal.to_dict(), "detector_threshold": 0.0}))
    with pytest.raises(BundleError, match="calibration.json"):
        load_bundle(out, tmp_path / "k2.pem.pub")
    (out / "calibration.json").unlink()
    with pytest.raises(BundleError, match="calibration.json"):
        load_bundle(out, tmp_path / "k2.pem.pub")
