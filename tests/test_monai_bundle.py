"""Issue 21: a signed bundle exported as a MONAI Bundle verifies and infers like ``onfh infer``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from shared_models.bundle import generate_signing_key
from shared_models.calibration import Calibration
from shared_models.cli import main
from shared_models.preprocessing import PreprocessingSpec
from tests.test_pipeline import _oblique_image, signed_tiny_bundle

CALIBRATION = Calibration(temperature=2.5, early_threshold=0.3)


@pytest.fixture(scope="module")
def signed(tmp_path_factory):
    root = tmp_path_factory.mktemp("monai")
    torch.manual_seed(3)
    bundle, _ = signed_tiny_bundle(root, CALIBRATION)
    study = root / "study.nii.gz"
    sitk.WriteImage(_oblique_image(), str(study))
    mon = root / "mon"
    assert (
        main(
            [
                "bundle",
                "export-monai",
                "--bundle",
                str(bundle),
                "--out",
                str(mon),
                "--public-key",
                str(root / "key.pem.pub"),
            ]
        )
        == 0
    )
    return {"root": root, "bundle": bundle, "pub": root / "key.pem.pub", "study": study, "mon": mon}


def test_export_writes_a_monai_bundle_whose_metadata_verifies(signed):
    from monai.bundle import verify_metadata

    mon = signed["mon"]
    for rel in (
        "configs/metadata.json",
        "configs/inference.json",
        "models/model.pt",
        "docs/README.md",
        "models/signed/calibration.json",
        "models/signed/MANIFEST.sig",
    ):
        assert (mon / rel).is_file(), rel
    meta = json.loads((mon / "configs/metadata.json").read_text())
    fmt = meta["network_data_format"]
    assert fmt["inputs"]["image"]["spatial_shape"] == list(PreprocessingSpec().hemi_shape)
    assert fmt["outputs"]["pred"]["num_channels"] == 3 and fmt["outputs"]["pred"]["type"] == "probabilities"
    # MONAI's own verifier (the schema file exists, so nothing is downloaded)
    verify_metadata(meta_file=str(mon / "configs/metadata.json"), filepath=str(mon / "configs/metadata_schema.json"))
    # ... and it can fail: metadata without its network data format is rejected
    broken = signed["root"] / "broken-metadata.json"
    broken.write_text(json.dumps({k: v for k, v in meta.items() if k != "network_data_format"}))
    with pytest.raises(ValueError, match="network_data_format"):
        verify_metadata(meta_file=str(broken), filepath=str(mon / "configs/metadata_schema.json"))
    # model.pt holds both networks as plain tensors, equal to the signed bundle's
    weights = torch.load(mon / "models/model.pt", weights_only=True)
    signed_stager = torch.load(signed["bundle"] / "stager.pt", weights_only=True)
    assert set(weights) == {"detector", "stager"}
    for name, tensor in signed_stager.items():
        assert torch.equal(weights["stager"][name], tensor), name
    assert "onfh-fl" in (mon / "docs/README.md").read_text()


def _compare(a: dict, b: dict) -> None:
    assert a["verdict"] == b["verdict"] and a["reasons"] == b["reasons"]
    assert a["bundle_trusted"] == b["bundle_trusted"] and a["calibration"] == b["calibration"]
    for ha, hb in zip(a["heads"], b["heads"], strict=True):
        assert ha["side"] == hb["side"] and ha["predicted_stage"] == hb["predicted_stage"]
        assert ha["flags"] == hb["flags"] and ha["assessed"] == hb["assessed"]
        np.testing.assert_allclose(ha["box_lps_mm"], hb["box_lps_mm"], atol=1e-5)
        assert set(ha["stage_probabilities"]) == set(hb["stage_probabilities"])
        for k, p in ha["stage_probabilities"].items():
            assert p == pytest.approx(hb["stage_probabilities"][k], abs=1e-5)


def test_monai_bundle_run_command_matches_onfh_infer(signed, tmp_path):
    """``python -m monai.bundle run`` in a fresh process, from the bundle folder, as its README says."""
    assert (
        main(
            [
                "infer",
                "--bundle",
                str(signed["bundle"]),
                "--public-key",
                str(signed["pub"]),
                "--study",
                str(signed["study"]),
                "--out",
                str(tmp_path / "onfh"),
                "--device",
                "cpu",
                "--allow-refused",
            ]
        )
        == 0
    )
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "run",
            "--config_file",
            "configs/inference.json",
            "--study",
            str(signed["study"]),
            "--output_dir",
            str(tmp_path / "monai"),
            "--public_key",
            str(signed["pub"]),
            "--device",
            "cpu",
        ],
        cwd=signed["mon"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    onfh = json.loads((tmp_path / "onfh" / "result.json").read_text())
    monai = json.loads((tmp_path / "monai" / "result.json").read_text())
    _compare(monai, onfh)
    assert monai["calibration"]["temperature"] == 2.5  # carried from the signed bundle
    for side in ("R", "L"):
        a = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "onfh" / f"gradcam_{side}.nii.gz")))
        b = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "monai" / f"gradcam_{side}.nii.gz")))
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_monai_bundle_stages_assessed_heads_like_onfh_infer(signed, tmp_path, monkeypatch):
    """A tiny untrained detector finds no femoral heads, so the study gates are opened here (they are
    tested in test_gates.py) to compare staged heads: stages and probabilities under the carried calibration."""
    import monai.bundle

    import shared_models.pipeline as pipeline
    from shared_models.gates import GateResult

    for gate in ("check_pair", "check_head", "check_field_of_view"):
        monkeypatch.setattr(pipeline, gate, lambda *a, **k: GateResult(()))
    assert (
        main(
            [
                "infer",
                "--bundle",
                str(signed["bundle"]),
                "--public-key",
                str(signed["pub"]),
                "--study",
                str(signed["study"]),
                "--out",
                str(tmp_path / "onfh"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    monai.bundle.run(
        config_file=str(signed["mon"] / "configs/inference.json"),
        bundle_root=str(signed["mon"]),
        study=str(signed["study"]),
        output_dir=str(tmp_path / "monai"),
        device="cpu",  # no public_key: the run verifies against the coordinator key pinned at export
    )
    onfh = json.loads((tmp_path / "onfh" / "result.json").read_text())
    monai_result = json.loads((tmp_path / "monai" / "result.json").read_text())
    assert onfh["verdict"] == "assessed" and all(h["predicted_stage"] for h in onfh["heads"])
    _compare(monai_result, onfh)


def test_export_refuses_a_tampered_or_unverified_bundle(signed, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(signed["bundle"], copy)
    cal = json.loads((copy / "calibration.json").read_text())
    cal["temperature"] = 1.0
    (copy / "calibration.json").write_text(json.dumps(cal))
    out = tmp_path / "mon"
    assert (
        main(["bundle", "export-monai", "--bundle", str(copy), "--out", str(out), "--public-key", str(signed["pub"])])
        == 1
    )
    assert not out.exists()
    # no key and no --allow-unsigned: refused before anything is written
    assert main(["bundle", "export-monai", "--bundle", str(signed["bundle"]), "--out", str(out)]) == 1
    assert not out.exists()
    # another coordinator's key
    other = generate_signing_key(tmp_path / "other.pem")
    del other
    assert (
        main(
            [
                "bundle",
                "export-monai",
                "--bundle",
                str(signed["bundle"]),
                "--out",
                str(out),
                "--public-key",
                str(tmp_path / "other.pem.pub"),
            ]
        )
        == 1
    )
    assert not out.exists()


def _raw_sha256(pem_path) -> str:
    """SHA-256 of the key's raw 32 bytes, computed here with cryptography directly."""
    import hashlib

    from cryptography.hazmat.primitives import serialization

    key = serialization.load_pem_public_key(pem_path.read_bytes())
    return hashlib.sha256(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).hexdigest()


def test_export_pins_the_coordinator_key_and_its_readme_says_what_is_not_verified(signed):
    mon = signed["mon"]
    config = json.loads((mon / "configs/inference.json").read_text())
    assert config["public_key_sha256"] == _raw_sha256(signed["pub"])
    assert (mon / "models/coordinator.pub").read_bytes() == signed["pub"].read_bytes()
    assert (
        "models/coordinator.pub" in config["public_key"] and "public_key_sha256=@public_key_sha256" in config["run"][0]
    )
    readme = (mon / "docs/README.md").read_text()
    assert "trusted as code" in readme and "Not verified by anything" in readme
    assert "`models/model.pt`" in readme and config["public_key_sha256"] in readme


def test_a_run_verifies_models_signed_against_the_pinned_key_not_the_embedded_one(signed, tmp_path):
    """An export whose ``models/signed`` was swapped for a bundle signed by someone else (its own
    ``signer.pub`` embedded) is refused, with or without ``--public_key``; so is another key passed."""
    from client.infer import run_monai_inference
    from shared_models.bundle import BundleError

    mon = tmp_path / "mon"
    shutil.copytree(signed["mon"], mon)
    forged_root = tmp_path / "forged"
    forged_root.mkdir()
    forged, forged_pub = signed_tiny_bundle(forged_root, CALIBRATION)
    shutil.rmtree(mon / "models/signed")
    shutil.copytree(forged, mon / "models/signed")
    config = json.loads((mon / "configs/inference.json").read_text())
    pin, out = config["public_key_sha256"], tmp_path / "out"
    with pytest.raises(BundleError, match="MANIFEST.sig does not verify"):
        run_monai_inference(mon, signed["study"], out, public_key=mon / "models/coordinator.pub", public_key_sha256=pin)
    with pytest.raises(BundleError, match="not the coordinator key this MONAI Bundle was exported with"):
        run_monai_inference(mon, signed["study"], out, public_key=forged_pub, public_key_sha256=pin)
    with pytest.raises(BundleError, match="no --public_key"):
        run_monai_inference(mon, signed["study"], out, public_key=None, public_key_sha256=pin)
    assert not out.exists()


def test_an_unsigned_export_pins_nothing_and_says_so(signed, tmp_path):
    out = tmp_path / "mon"
    assert (
        main(["bundle", "export-monai", "--bundle", str(signed["bundle"]), "--out", str(out), "--allow-unsigned"]) == 0
    )
    config = json.loads((out / "configs/inference.json").read_text())
    assert config["public_key"] is None and config["public_key_sha256"] is None
    assert not (out / "models/coordinator.pub").exists()
    readme = (out / "docs/README.md").read_text()
    assert '"bundle_trusted": false' in readme and "trusted as code" in readme
