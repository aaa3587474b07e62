"""shared_models.flower: one packing for both ends, one environment for every Flower process."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord

from shared_models.flower.env import FLOWER_SWITCHES, flower_bin, flower_env, flower_variables
from shared_models.flower.records import record_arrays, record_to_state, state_to_record


@dataclass(frozen=True)
class Transfer:
    transfer_packing: bool
    transfer_dtype: str


def _state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm3d(3)
    bn.num_batches_tracked.fill_(7)
    return {"conv.weight": torch.randn(3, 1, 2, 2, 2), **{f"bn.{k}": v for k, v in bn.state_dict().items()}}


@pytest.mark.parametrize("packed", [True, False])
def test_a_state_dict_survives_the_record_exactly(packed):
    state = _state()
    record = state_to_record(state, Transfer(packed, "float32"))
    assert isinstance(record, ArrayRecord)
    # packed: one flat array per dtype (float, int64); unpacked: one array per entry
    assert len(record) == (2 if packed else len(state))
    back = record_to_state(record, {k: torch.empty_like(v, device="meta") for k, v in state.items()})
    assert list(back) == list(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k


def test_float16_transfer_rounds_within_half_precision():
    state = _state()
    record = state_to_record(state, Transfer(True, "float16"))
    assert {a.dtype for a in record_arrays(record).values()} == {np.dtype("float16"), np.dtype("int64")}
    back = record_to_state(record, state)
    w = state["conv.weight"]
    assert torch.allclose(back["conv.weight"], w, rtol=2**-11, atol=0)
    assert not torch.equal(back["conv.weight"], w)  # it is lossy
    assert int(back["bn.num_batches_tracked"]) == 7 and back["bn.num_batches_tracked"].dtype == torch.int64


def test_a_record_that_does_not_fit_the_model_is_refused():
    state = _state()
    record = state_to_record({k: v for k, v in state.items() if k != "conv.weight"}, Transfer(False, "float32"))
    with pytest.raises(ValueError, match="missing"):
        record_to_state(record, state)


def test_the_flower_environment_is_offline_and_project_local(tmp_path):
    base = {"PATH": "/usr/bin", "OMP_NUM_THREADS": "8", "KEEP": "me"}
    env = flower_env(tmp_path / "home", threads=2, base=base)
    assert base == {"PATH": "/usr/bin", "OMP_NUM_THREADS": "8", "KEEP": "me"}  # not modified
    assert env["FLWR_HOME"] == str(tmp_path / "home") and env["KEEP"] == "me"
    assert env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["PATH"].split(os.pathsep) == [str(Path(sys.executable).parent), "/usr/bin"]
    assert env["OMP_NUM_THREADS"] == env["MKL_NUM_THREADS"] == "2" and env["PYTHONUNBUFFERED"] == "1"
    assert not any(k.startswith("RAY_") for k in env) and "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT" not in env


def test_a_simulation_environment_adds_rays_folder_and_the_local_superlink_port(tmp_path):
    env = flower_env(tmp_path / "home", ray_tmp=tmp_path / "ray", local_superlink_port=19999, base={})
    assert env["RAY_TMPDIR"] == str(tmp_path / "ray") and env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] == "19999"
    assert "OMP_NUM_THREADS" not in env  # threads not given: left to the caller's environment
    assert flower_variables(tmp_path / "home") == {"FLWR_HOME": str(tmp_path / "home"), **FLOWER_SWITCHES}


def test_flower_scripts_come_from_this_interpreter():
    assert flower_bin("flwr") == str(Path(sys.executable).parent / "flwr")
    assert flower_bin("no-such-script-here") == "no-such-script-here"


def test_the_environment_module_imports_neither_torch_nor_flower():
    code = "import sys, shared_models.flower.env; print(sorted({'torch', 'flwr'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
