"""Issue 16, "sizes are capped before decoding": every file these readers take is size-checked first.

Checkpoint files checked against their chain, the MedMNIST benchmark's result and weights, a site's
public key and the enrolment registry, audit-anchor files and the readers' CSVs. Each test gives the
reader a file it must refuse before decoding: larger than the cap (a sparse file, or the cap
lowered so the file stays small; nothing here reads a file without a bound), a link to a device
or to a file elsewhere, or a CSV field past the csv module's own limit.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import pytest
import torch

import server.checkpoint as ckpt_mod
import server.coordinator as co
import shared_models.anchors as anchors_mod
import sim.experiments.medmnist_app as app
from client import site_daemon as sd
from server.checkpoint import CheckpointStore, PhaseCheckpoint, verify_chain
from shared_models.safe_files import UnsafeFileError
from sim.experiments.experiment import last_verified_checkpoint
from sim.reports.readers import load_predictions_csv, load_reader_csv


def _store(tmp_path: Path) -> CheckpointStore:
    store = CheckpointStore(tmp_path / "checkpoints", "fp")
    for r in (1, 2):
        store.save("detector", PhaseCheckpoint(round=r, state_dict={"w": torch.full((8,), float(r))}))
    return store


def _sparse(path: Path, size: int) -> Path:
    """A file of ``size`` bytes that takes no disk (``truncate``); only its size is ever looked at."""
    with open(path, "wb") as fh:
        fh.truncate(size)
    return path


def test_verify_chain_refuses_a_checkpoint_linked_to_a_device_unread(tmp_path):
    store = _store(tmp_path)
    path = store.path("detector")
    path.unlink()
    path.symlink_to("/dev/zero")  # refused by O_NOFOLLOW before any byte is read
    with pytest.raises(ValueError, match=r"detector\.pt: cannot be checked .*symlink"):
        verify_chain(store.chain(), store.folder)
    line = last_verified_checkpoint(store.folder)
    assert "does not verify" in line and "detector.pt" in line and "symlink" in line


def test_verify_chain_refuses_a_link_to_the_genuine_checkpoint_kept_elsewhere(tmp_path):
    store = _store(tmp_path)
    path = store.path("detector")
    elsewhere = tmp_path / "elsewhere.pt"
    elsewhere.write_bytes(path.read_bytes())  # same bytes, same hash: only the link is wrong
    path.unlink()
    path.symlink_to(elsewhere)
    with pytest.raises(ValueError, match="symlink"):
        verify_chain(store.chain(), store.folder)


def test_verify_chain_refuses_a_checkpoint_over_the_cap_before_reading_it(tmp_path, monkeypatch):
    store = _store(tmp_path)
    size = store.path("detector").stat().st_size
    monkeypatch.setattr(ckpt_mod, "MAX_CHECKPOINT_BYTES", size - 1)
    with pytest.raises(ValueError, match=rf"{size} bytes, more than the {size - 1} allowed"):
        verify_chain(store.chain(), store.folder)
    monkeypatch.setattr(ckpt_mod, "MAX_CHECKPOINT_BYTES", size)
    verify_chain(store.chain(), store.folder)  # at the cap it verifies


def _result_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "spec"
    folder.mkdir()
    (folder / app.RESULT_NAME).write_text(json.dumps({"best_val_auc": 0.75}))
    torch.save({"w": torch.arange(4.0)}, folder / app.BEST_STATE_NAME)
    return folder


def test_medmnist_result_reads_plain_tensors_within_the_caps(tmp_path):
    result = app.read_result(_result_folder(tmp_path))
    assert result["best_val_auc"] == 0.75 and torch.equal(result["best_state"]["w"], torch.arange(4.0))


def test_medmnist_result_refuses_weights_over_the_cap_and_a_compressed_archive(tmp_path, monkeypatch):
    folder = _result_folder(tmp_path)
    state = folder / app.BEST_STATE_NAME
    monkeypatch.setattr(app, "MAX_STATE_BYTES", 1 << 20)
    _sparse(state, (1 << 20) + 1)
    with pytest.raises(UnsafeFileError, match=rf"best_state\.pt: {(1 << 20) + 1} bytes, more than"):
        app.read_result(folder)
    # the same weights re-packed with deflated entries: a zip bomb's shape, refused before inflating
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(4096)}, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as src, zipfile.ZipFile(state, "w") as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info), compress_type=zipfile.ZIP_DEFLATED)
    with pytest.raises(UnsafeFileError, match="compressed entries"):
        app.read_result(folder)


def test_medmnist_result_and_spec_json_are_capped(tmp_path, monkeypatch):
    folder = _result_folder(tmp_path)
    monkeypatch.setattr(app, "MAX_RESULT_BYTES", 16)
    with pytest.raises(UnsafeFileError, match=r"result\.json: \d+ bytes, more than the 16 allowed"):
        app.read_result(folder)
    monkeypatch.setattr(app, "MAX_SPEC_BYTES", 1 << 10)
    spec = _sparse(tmp_path / "spec.json", 1 << 20)
    app.load_spec.cache_clear()
    with pytest.raises(UnsafeFileError, match=r"spec\.json: 1048576 bytes, more than the 1024 allowed"):
        app.load_spec(str(spec))


def test_key_fingerprint_refuses_a_key_file_over_the_cap_or_a_link_unread(tmp_path):
    _, public, _ = sd.make_site_keys(tmp_path / "keys")
    assert co.key_fingerprint(public).startswith("SHA256:")  # a real key is far under the cap
    big = tmp_path / "big.pub"
    big.write_bytes(public.read_bytes().rstrip() + b" " + b"x" * co.MAX_PUBLIC_KEY_BYTES + b"\n")
    with pytest.raises(ValueError, match=rf"big\.pub: .*more than the {co.MAX_PUBLIC_KEY_BYTES} allowed"):
        co.key_fingerprint(big)
    link = tmp_path / "zero.pub"
    link.symlink_to("/dev/zero")  # refused by O_NOFOLLOW before any byte is read
    with pytest.raises(ValueError, match=r"zero\.pub: .*symlink"):
        co.key_fingerprint(link)


def test_enrolment_registry_is_capped(tmp_path, monkeypatch):
    registry = tmp_path / co.REGISTRY_NAME
    registry.write_text(json.dumps({"A": {"fingerprint": "SHA256:x", "node_id": 1, "enrolled_at": ""}}))
    assert list(co.load_registry(registry)) == ["A"]
    monkeypatch.setattr(co, "MAX_REGISTRY_BYTES", 32)
    with pytest.raises(ValueError, match=rf"{co.REGISTRY_NAME}: \d+ bytes, more than the 32 allowed"):
        co.load_registry(registry)


def test_audit_anchor_file_is_capped_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "audit-anchors.json"
    path.write_text(json.dumps({"audit_anchors": {"A": [{"round": 1}]}}))
    assert anchors_mod.load_anchors(path) == {"A": [{"round": 1}]}
    monkeypatch.setattr(anchors_mod, "MAX_ANCHORS_FILE_BYTES", 1 << 10)
    _sparse(path, 1 << 20)
    with pytest.raises(ValueError, match=r"audit-anchors\.json: 1048576 bytes, more than the 1024 allowed"):
        anchors_mod.load_anchors(path)


def test_readers_csv_with_a_field_past_the_csv_limit_names_the_file_and_line(tmp_path):
    path = tmp_path / "readers.csv"
    path.write_text("patient_id,side,reader,stage\np1,R,X,0\np2,R,X," + "0" * 200_000 + "\n")
    with pytest.raises(ValueError, match=r"readers\.csv: row 3: line longer than"):
        load_reader_csv(path)
    path.write_text('patient_id,side,reader,stage\np1,R,X,0\np2,R,X,"' + "0" * 5000 + '"\n')
    with pytest.raises(ValueError, match=r"readers\.csv: row 3: field stage longer than"):
        load_reader_csv(path)
    path.write_bytes(b"patient_id,side,stage,predicted_stage\np1,R,0,0\x00\n")
    with pytest.raises(ValueError, match=r"readers\.csv: row 2: NUL character"):
        load_predictions_csv(path)
