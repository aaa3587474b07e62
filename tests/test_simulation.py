"""One real `flwr run` through Flower's simulation engine: 2 sites, 1 round per phase, tiny models."""

from __future__ import annotations

import dataclasses
import json

import pytest

from shared_models.bundle import load_bundle
from shared_models.cli import main
from sim.phantoms import PROFILES, generate_phantoms
from tests.conftest import TINY

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_site_phantoms(tmp_path_factory):
    quick = PROFILES["quick"]
    profile = dataclasses.replace(
        quick,
        name="micro",
        heads_per_site={"A": 10, "B": 3},
        patients_per_site={"A": 6, "B": 2},
        scanners={s: quick.scanners[s] for s in ("A", "B")},
        external_groups={"external-1": ("B",)},
    )
    root = tmp_path_factory.mktemp("phantoms")
    generate_phantoms(root, profile, seed=1)
    # broken exports at the training site A and the evaluate-only site B: the study folder
    # holds no DICOM, only junk; and at A a head labelled stage III (out of scope)
    for site in ("A", "B"):
        broken = root / site / "study-broken"
        broken.mkdir()
        (broken / "notes.txt").write_text("not an image")
        with open(root / site / "manifest.csv", "a") as fh:
            fh.write(f"{site}-9999,study-broken,L,0,,SIEMENS Prisma 3T\n")
    with open(root / "A" / "manifest.csv", "a") as fh:
        fh.write("A-9998,study-collapsed,R,III,,SIEMENS Prisma 3T\n")
    return root


def test_flwr_simulation_two_sites_one_round(two_site_phantoms, tmp_path):
    out = tmp_path / "run"
    sets = {
        **TINY,
        "site-ids": "A,B",
        "report-groups": "A-test=A;external-1=B",
        "detector-rounds": 1,
        "stager-rounds": 1,
        "detector-local-steps": 2,
        "stager-local-steps": 2,
        "stager-batch-size": 4,
    }
    argv = [
        "sim",
        "run",
        "--data",
        str(two_site_phantoms),
        "--out",
        str(out),
        "--profile",
        "quick",
        "--strategy",
        "fedprox",
    ]
    for k, v in sets.items():
        argv += ["--set", f"{k}={v}"]
    assert main(argv) == 0

    report = json.loads((out / "report.json").read_text())
    html = (out / "report.html").read_text()
    assert "A-test" in html and "external-1" in html and (out / "figures").is_dir()
    assert report["strategy"] == "fedprox" and report["rounds"] == {"detector": 1, "stager": 1}
    assert set(report["sites"]) == {"A-test", "external-1"}
    ext = report["sites"]["external-1"]
    assert ext["n"] == 3  # every usable B head is an external test head; the broken study was skipped
    assert report["site_data"]["B"]["studies_refused"] == 1 and report["site_data"]["A"]["studies_refused"] == 2
    for stage in ("0", "I", "II"):
        assert set(ext["per_stage"][stage]) >= {"accuracy", "sensitivity", "specificity", "f1", "auc"}
    # site A trained in both phases (a failed local training would only show as a missing entry)
    assert set(report["history"]["detector_train_loss"]["1"]) == {"A"}
    assert set(report["history"]["stager_train_loss"]["1"]) == {"A"}
    assert set(report["detector"]) == {"A", "B"}
    assert 0.0 <= report["detector"]["B"]["iou_mean"] <= 1.0
    assert 0.0 <= report["detector"]["B"]["ap50"] <= 1.0
    # per-round checkpoints for both phases, and the signed bundle verifies against the run's key
    assert (out / "checkpoints" / "detector.pt").exists() and (out / "checkpoints" / "stager.pt").exists()
    bundle = load_bundle(out / "bundle", out / "keys" / "bundle-signing-key.pem.pub")
    assert bundle.trusted
    # issue 17: calibration chosen on pooled validation aggregates, shipped in the bundle, reported per site
    calib = report["calibration"]
    assert calib["rejected"] == {} and set(calib["sites"]) == {"A", "B"} and calib["sites"]["B"]["external"]
    assert calib["sites"]["B"]["test_heads"] == 3 and 0.0 <= calib["sites"]["B"]["ece_before"] <= 1.0
    assert bundle.calibration is not None and bundle.calibration.to_dict() == calib["chosen"]
    assert "Calibration on the validation split" in html
    # issue 16: every reply's audit anchor was recorded, and each site's log verifies against them
    assert set(report["audit_anchors"]) == {"A", "B"} and report["refused_nodes"] == []
    for site in ("A", "B"):
        assert (
            main(
                ["site", "verify-audit", "--data", str(two_site_phantoms / site), "--anchors", str(out / "report.json")]
            )
            == 0
        )

    # experiment tracking (issue 21, default MLflow store under the run folder), read back through MLflow's client:
    # each round's metrics per site as the server received them (small cells: tests/test_tracking.py; TINY sets
    # min-cell-heads 1 so that B's 3 heads are reported here)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{out / 'mlflow' / 'mlflow.db'}")
    run_id = json.loads((out / "tracking.json").read_text())["run-id"]
    tracked = client.get_run(run_id)
    assert tracked.info.status == "FINISHED" and tracked.data.params["strategy"] == "fedprox"
    for phase in ("detector", "stager"):
        losses = client.get_metric_history(run_id, f"{phase}/train/A/train-loss")
        assert [(m.step, m.value) for m in losses] == [
            (1, pytest.approx(report["history"][f"{phase}_train_loss"]["1"]["A"]))
        ]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "stager/eval/B/num-examples")] == [
        (1, ext["n"])
    ]
    assert {"report.json", "report.html", "bundle", "figures"} <= {a.path for a in client.list_artifacts(run_id)}

    # no local path is stored (issue 16 row 10): not the data folder, not the run folder
    for file in [*(out / "checkpoints").iterdir(), *(out / "bundle").iterdir()]:
        data = file.read_bytes()
        assert str(two_site_phantoms).encode() not in data and str(out).encode() not in data, file.name

    # resume: the same command on the same out-dir finds both phases finished and only re-reports
    assert main(argv) == 0
    again = json.loads((out / "report.json").read_text())
    assert again["sites"]["external-1"]["n"] == 3

    # a truncated last checkpoint (issue 16 row 16): the same command starts that phase's only
    # round again, names the damaged file, and finishes
    stager = out / "checkpoints" / "stager.pt"
    stager.write_bytes(stager.read_bytes()[:1000])
    assert main(argv) == 0
    assert (out / "checkpoints" / "stager.pt.damaged").exists()
    assert load_bundle(out / "bundle", out / "keys" / "bundle-signing-key.pem.pub").trusted


def test_site_check_names_the_broken_study(two_site_phantoms, tmp_path):
    report = tmp_path / "verdicts.json"
    assert (
        main(
            [
                "site",
                "check",
                "--data",
                str(two_site_phantoms / "B"),
                "--cache",
                str(tmp_path / "cache"),
                "--json",
                str(report),
            ]
        )
        == 1
    )
    verdicts = {v["study"]: v for v in json.loads(report.read_text())}
    assert verdicts["study-broken"]["status"] == "refused" and "DICOM" in verdicts["study-broken"]["reason"]
    assert sum(v["status"] == "ok" for v in verdicts.values()) == 2
