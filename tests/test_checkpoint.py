"""Checkpoints resume across releases that add run-config keys, and name what blocks a resume."""

from __future__ import annotations

import pytest
import torch

from server.checkpoint import CheckpointStore, PhaseCheckpoint, config_changes, config_fingerprint
from tests.conftest import tiny_run_config


def _store(tmp_path, rc):
    return CheckpointStore(tmp_path / "checkpoints", config_fingerprint(rc), rc)


def test_a_later_release_with_a_new_key_at_its_default_resumes(tmp_path):
    old = tiny_run_config()
    new_key = next(iter(old))  # pretend the first key did not exist in the old release
    released_before = {k: v for k, v in old.items() if k != new_key}
    _store(tmp_path, released_before).save("detector", PhaseCheckpoint(round=2, state_dict={"w": torch.ones(1)}))
    ckpt = _store(tmp_path, old).load("detector")
    assert ckpt.round == 2 and torch.equal(ckpt.state_dict["w"], torch.ones(1))


def test_a_changed_value_is_refused_and_named(tmp_path):
    rc = tiny_run_config()
    _store(tmp_path, rc).save("stager", PhaseCheckpoint(round=1, state_dict={}))
    with pytest.raises(ValueError, match=r"stager-lr: 0.002 -> 0.01"):
        _store(tmp_path, {**rc, "stager-lr": 0.01}).load("stager")
    # resumable keys (more rounds, another device) may change
    assert _store(tmp_path, {**rc, "stager-rounds": 99, "device": "cpu"}).load("stager").round == 1


def test_config_changes_rules():
    defaults = {"a": 1, "b": "x", "c": 2.0}
    assert config_changes({"a": 1}, {"a": 1, "b": "x"}, defaults) == []  # new key at its default
    assert config_changes({"a": 1}, {"a": 1, "b": "y"}, defaults) == ["b: new, not its default"]
    assert config_changes({"a": 1, "z": 0}, {"a": 1}, defaults) == ["z: removed"]
    assert config_changes({"a": 1}, {"a": 3}, defaults) == ["a: 1 -> 3"]


def test_a_moved_run_folder_resumes(tmp_path):
    rc = tiny_run_config(**{"out-dir": str(tmp_path / "old")})
    _store(tmp_path, rc).save("detector", PhaseCheckpoint(round=3, state_dict={}))
    assert _store(tmp_path, {**rc, "out-dir": str(tmp_path / "moved")}).load("detector").round == 3
