"""The torch-free specs: what importing them loads, and the wire form of phases and keys."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "monai", "SimpleITK", "flwr")


@pytest.mark.parametrize("module", ["shared_models.specs", "shared_models.config"])
def test_specs_import_neither_torch_monai_simpleitk_nor_flower(module):
    code = (
        f"import json, sys, {module}\nprint(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_the_probe_sees_a_heavy_import():
    # the check above could pass by looking wrong; importing the detector must show torch and MONAI
    code = (
        "import json, sys, shared_models.detection\n"
        f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["monai", "torch"]


def test_phases_travel_as_their_plain_strings():
    from shared_models.specs import PHASES, Phase

    assert [str(p) for p in PHASES] == ["detector", "stager"]  # training order
    assert Phase("detector") is Phase.DETECTOR
    assert Phase.DETECTOR == "detector" and "stager" == Phase.STAGER
    assert {"detector": 1}[Phase.DETECTOR] == 1  # hashes like the string
    assert f"{Phase.STAGER}" == "stager"
    assert type(str(Phase.STAGER)) is str
    assert json.dumps({Phase.DETECTOR: [Phase.STAGER]}) == '{"detector": ["stager"]}'
    with pytest.raises(ValueError):
        Phase("crops")
    assert Phase.DETECTOR.score_key == "iou-mean" and Phase.STAGER.score_key == "macro-auc"


def test_old_import_paths_name_the_same_objects():
    from shared_models import config, specs
    from shared_models.detection import network
    from shared_models.preprocessing import PreprocessingSpec
    from shared_models.stager import StagerConfig
    from shared_models.transfer import TRANSFER_DTYPES

    assert network.DetectorConfig is specs.DetectorConfig  # what YOLOX3D's type check accepts
    assert StagerConfig is specs.StagerConfig
    assert PreprocessingSpec is specs.PreprocessingSpec
    assert TRANSFER_DTYPES is specs.TRANSFER_DTYPES
    assert config.RunConfig is specs.RunConfig and config.STRATEGIES is specs.STRATEGIES
    assert specs.PYPROJECT.name == "pyproject.toml" and specs.PYPROJECT.is_file()


def test_message_keys_keep_their_wire_spelling():
    # the strings a site and a coordinator of different versions must agree on (spelled out here on purpose)
    from shared_models import specs

    wire = {
        "CONFIG": "config",
        "METRICS": "metrics",
        "ARRAYS": "arrays",
        "SITE": "site",
        "PHASE": "phase",
        "ACTION": "action",
        "SERVER_ROUND": "server-round",
        "PROXIMAL_MU": "proximal-mu",
        "CROPS_KEY": "crops-key",
        "CALIBRATION": "calibration",
        "SITE_ID": "site-id",
        "NUM_EXAMPLES": "num-examples",
        "TRAIN_LOSS": "train-loss",
        "VAL_NUM_EXAMPLES": "val-num-examples",
        "VAL_SCORE": "val-score",
        "IOU_MEAN": "iou-mean",
        "IOU_HIST": "iou-hist",
        "CENTER_ERROR_MM": "center-error-mm",
        "LOW_CONFIDENCE": "low-confidence",
        "RECALL30": "recall30",
        "RECALL50": "recall50",
        "AP50": "ap50",
        "MACRO_AUC": "macro-auc",
        "ACCURACY": "accuracy",
        "CONFUSION": "confusion",
        "HIST_POS_PREFIX": "hist-pos-",
        "HIST_NEG_PREFIX": "hist-neg-",
        "SUPPRESSED": "suppressed",
        "VAL_SUPPRESSED": "val-suppressed",
        "VAL_HEADS": "val-heads",
        "DET_HEADS": "det-heads",
        "DET_GOOD": "det-good",
        "DET_SCORE_HIST": "det-score-hist",
        "ENERGY_HIST": "energy-hist",
        "NLL": "nll",
        "NODE_SITE_ID": "site-id",
        "NODE_DATA_PATH": "data-path",
        "NODE_CACHE_DIR": "cache-dir",
        "NODE_MIN_CELL_HEADS": "min-cell-heads",
        "NODE_AUDIT_LOG": "audit-log",
        "PARTITION_ID": "partition-id",
        "NUM_PARTITIONS": "num-partitions",
        "ANCHOR_RECORD": "audit",
        "ANCHOR_KEY": "head-sha256",
    }
    assert {name: getattr(specs, name) for name in wire} == wire
    constants = {n for n in specs.keys.__all__ if n.isupper() and n != "PHASES"}
    assert constants == set(wire)  # a new key gets its wire spelling checked here too
    assert [str(a) for a in specs.Action] == ["hello", "crops", "calibrate-val", "calibrate-eval"]
    assert specs.heads_key("train") == "heads-train"
