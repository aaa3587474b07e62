"""Issue 16, rows 2, 7, 8, 10 and 16: checkpoints and bundles are read as an attacker would write them.

Each test is the attack of its row, run against the code path the issue names, and it asserts the
outcome that failed before: no code runs, no swapped or outside file is loaded, no local path is
stored, and a damaged last round falls back with a message naming the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path

import pytest
import torch

import server.coordinator as co
import shared_models.bundle as bundle_mod
from server.checkpoint import (
    CheckpointError,
    CheckpointStore,
    PhaseCheckpoint,
    chain_link,
    config_fingerprint,
    verify_chain,
)
from shared_models.bundle import BundleError, generate_signing_key, load_bundle, load_signing_key, write_bundle
from shared_models.cli import main
from shared_models.detection import YOLOX3D
from shared_models.preprocessing import PreprocessingSpec
from shared_models.safe_files import UnsafeFileError, read_regular_file
from shared_models.specs import DetectorConfig
from shared_models.stager import MulDenseNet3D, StagerConfig
from tests.conftest import tiny_run_config


class _Payload:
    """Unpickling this creates ``marker`` (what an attacker's ``os.system`` would do, made visible)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _evil_checkpoint_bytes(marker: Path) -> bytes:
    buffer = io.BytesIO()
    torch.save({"round": 5, "state_dict": {"w": torch.zeros(1)}, "site_metrics": {5: {"A": _Payload(marker)}}}, buffer)
    return buffer.getvalue()


def _plant_in_chain(folder: Path, phase: str, data: bytes, round_: int) -> None:
    """Write ``data`` as the phase checkpoint and re-link chain.json to it, as an attacker with
    write access to the run folder can: only ``weights_only=True`` stands in the way then."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{phase}.pt").write_bytes(data)
    chain_path = folder / "chain.json"
    entries = json.loads(chain_path.read_text()) if chain_path.exists() else []
    digest = hashlib.sha256(data).hexdigest()
    entries.append(
        {
            "phase": phase,
            "round": round_,
            "sha256": digest,
            "chain": chain_link(entries[-1]["chain"] if entries else "", digest, phase, round_),
            "saved_at": 0,
        }
    )
    chain_path.write_text(json.dumps(entries))


def test_the_payload_would_run_code_if_unpickled(tmp_path):
    """The attack itself works: without weights_only the marker appears (so the tests below can fail)."""
    marker = tmp_path / "pwned"
    torch.load(io.BytesIO(_evil_checkpoint_bytes(marker)), weights_only=False)
    assert marker.exists()


# ----------------------------------------------------------------------------- row 2: code in a checkpoint


def test_row2_pickle_checkpoint_is_refused_on_resume(tmp_path):
    """The pickle is the last round, and chain.json was re-linked to it: only weights_only stops it."""
    marker = tmp_path / "pwned"
    rc = tiny_run_config(**{"data-root": str(tmp_path / "data")})
    store = CheckpointStore(tmp_path / "out" / "checkpoints", config_fingerprint(rc), rc)
    store.save("detector", PhaseCheckpoint(round=1, state_dict={"w": torch.ones(1)}))
    _plant_in_chain(store.folder, "detector", _evil_checkpoint_bytes(marker), 5)
    with pytest.raises(CheckpointError, match=r"detector\.pt: not a plain tensor file"):
        store.load("detector")
    assert not marker.exists()
    # `onfh sim run` on that out-dir (resume): refused before Flower starts, with exit code 1
    (tmp_path / "data").mkdir()
    assert (
        main(["sim", "run", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "out"), "--profile", "quick"])
        == 1
    )
    assert not marker.exists()


def test_row2_pickle_replacing_the_last_round_falls_back_unread(tmp_path, caplog):
    """The pickle replaced the last round but the chain is untouched: its hash does not match, so
    it is never unpickled, and resume uses the previous verified round."""
    marker = tmp_path / "pwned"
    store = CheckpointStore(tmp_path / "checkpoints", "fp")
    for r in (1, 2):
        store.save("detector", PhaseCheckpoint(round=r, state_dict={"w": torch.full((1,), float(r))}))
    store.path("detector").write_bytes(_evil_checkpoint_bytes(marker))
    with caplog.at_level(logging.WARNING, logger="server.checkpoint"):
        assert store.load("detector").round == 1
    assert not marker.exists() and "detector.pt: damaged or modified" in caplog.text


def test_row2_pickle_checkpoint_is_refused_by_coordinator_status(tmp_path):
    marker = tmp_path / "pwned"
    out = tmp_path / "run"
    out.mkdir()
    (out / co.LAUNCH_NAME).write_text(json.dumps({"run_config": {"detector-rounds": 5}, "run_ids": [1]}))
    _plant_in_chain(out / "checkpoints", "detector", _evil_checkpoint_bytes(marker), 5)
    with pytest.raises(CheckpointError, match="detector.pt.*not a plain tensor file"):
        co.run_progress(out)
    assert not marker.exists()
    # the CLI: a clear error and exit code 1 (the SuperLink is not running; status says so and goes on)
    assert main(["coordinator", "status", "--home", str(tmp_path / "home"), "--out", str(out)]) == 1
    assert not marker.exists()


def test_row2_pickle_in_a_signed_bundle_payload_is_refused(tmp_path, tiny_bundle_parts):
    """Even a bundle signed by the trusted key cannot carry code in its weights."""
    marker = tmp_path / "pwned"
    path, pub, key = tiny_bundle_parts
    buffer = io.BytesIO()
    torch.save({"weight": _Payload(marker)}, buffer)
    (path / "detector.pt").write_bytes(buffer.getvalue())
    _resign(path, key)
    with pytest.raises(BundleError, match=r"detector\.pt.*not a plain tensor file"):
        load_bundle(path, pub)
    assert not marker.exists()


# ----------------------------------------------------------------------------- bundles


@pytest.fixture
def tiny_bundle_parts(tmp_path):
    dcfg = DetectorConfig(widths=(4, 8, 8, 16), depths=(1, 1, 1), head_width=8)
    scfg = StagerConfig(init_features=8, growth_rate=4, block_config=(1, 1), pool_scales=(1, 2))
    torch.manual_seed(0)
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
    return path, tmp_path / "keys" / "signing.pem.pub", load_signing_key(tmp_path / "keys" / "signing.pem")


def _resign(path: Path, key, files: dict[str, str] | None = None) -> None:
    """Rewrite MANIFEST.json (hashes of the files as they are now, or ``files``) and sign it
    with ``key``: what an attacker does with their own key and ``--allow-unsigned``."""
    manifest = json.loads((path / "MANIFEST.json").read_text())
    if files is None:
        files = {name: hashlib.sha256((path / name).read_bytes()).hexdigest() for name in manifest["files"]}
    manifest["files"] = files
    data = json.dumps(manifest).encode()
    (path / "MANIFEST.json").write_bytes(data)
    (path / "MANIFEST.sig").write_bytes(key.sign(data))


# ----------------------------------------------------------------------------- row 7: swap after verification


def test_row7_a_file_swapped_after_its_hash_was_checked_is_not_loaded(tiny_bundle_parts, monkeypatch):
    """The attacker replaces detector.pt the moment its hash has been computed. Code that hashes
    the file and then reads it again (the old ``load_bundle``) loads the attacker's weights; code
    that loads the very bytes it hashed does not."""
    path, pub, _ = tiny_bundle_parts
    original = (path / "detector.pt").read_bytes()
    good = torch.load(io.BytesIO(original), weights_only=True)
    attacker = io.BytesIO()
    torch.save({k: torch.full_like(v, 7) if v.is_floating_point() else v for k, v in good.items()}, attacker)
    real_sha256 = hashlib.sha256
    swapped = []

    def sha256_then_swap(data=b"", *args, **kwargs):
        digest = real_sha256(data, *args, **kwargs)
        if bytes(data) == original and not swapped:
            tmp = path / "detector.pt.new"
            tmp.write_bytes(attacker.getvalue())
            os.replace(tmp, path / "detector.pt")
            swapped.append(True)
        return digest

    class _Hashlib:
        sha256 = staticmethod(sha256_then_swap)

    monkeypatch.setattr(bundle_mod, "hashlib", _Hashlib)
    loaded = load_bundle(path, pub)
    assert swapped, "the swap never happened: the test did not exercise the race"
    for name, value in loaded.detector.state_dict().items():
        assert torch.equal(value, good[name]), f"{name}: the swapped-in weights were loaded"


def test_row7_each_bundle_file_is_opened_once(tiny_bundle_parts, monkeypatch):
    path, pub, _ = tiny_bundle_parts
    opened: list[str] = []
    real_open = os.open

    def counting_open(p, *args, **kwargs):
        opened.append(Path(p).name)
        return real_open(p, *args, **kwargs)

    monkeypatch.setattr("shared_models.safe_files.os.open", counting_open)
    load_bundle(path, pub)
    for name in bundle_mod.PAYLOAD:
        assert opened.count(name) == 1, (name, opened)


# ----------------------------------------------------------------------------- row 8: names outside the bundle


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "/dev/zero", "notes.txt"])
def test_row8_a_resigned_manifest_naming_other_files_is_refused(tiny_bundle_parts, name):
    path, _, key = tiny_bundle_parts
    files = json.loads((path / "MANIFEST.json").read_text())["files"]
    _resign(path, key, {**files, name: "0" * 64})
    (path / "signer.pub").write_bytes(bundle_mod.public_pem(key.public_key()))
    with pytest.raises(BundleError, match="not part of a bundle") as err:
        load_bundle(path)  # --allow-unsigned: checked against the embedded key only
    assert name in str(err.value)


def test_row8_a_manifest_that_leaves_a_payload_uncovered_is_refused(tiny_bundle_parts):
    path, _, key = tiny_bundle_parts
    files = json.loads((path / "MANIFEST.json").read_text())["files"]
    del files["detector.pt"]
    _resign(path, key, files)
    with pytest.raises(BundleError, match="does not cover.*detector.pt"):
        load_bundle(path)


@pytest.mark.parametrize("target", ["/dev/zero", "outside", "inside"])
def test_row8_a_payload_that_is_a_symlink_is_refused(tiny_bundle_parts, tmp_path, target):
    path, _, key = tiny_bundle_parts
    if target == "outside":  # a valid state dict outside the bundle, with its correct hash signed
        dest = tmp_path / "elsewhere.pt"
        os.replace(path / "detector.pt", dest)
    elif target == "inside":
        dest = path / "detector-copy.pt"
        os.replace(path / "detector.pt", dest)
    else:
        dest = Path(target)
        (path / "detector.pt").unlink()
    (path / "detector.pt").symlink_to(dest)
    files = json.loads((path / "MANIFEST.json").read_text())["files"]
    if target != "/dev/zero":
        files["detector.pt"] = hashlib.sha256(dest.read_bytes()).hexdigest()
    _resign(path, key, files)
    with pytest.raises(BundleError, match=r"detector\.pt refused.*(symlink|outside)"):
        load_bundle(path)


def test_row8_a_fifo_or_folder_payload_is_refused_without_blocking(tiny_bundle_parts):
    path, _, key = tiny_bundle_parts
    (path / "metrics.json").unlink()
    os.mkfifo(path / "metrics.json")  # opening a FIFO for reading would wait for a writer forever
    (path / "spec.json").unlink()
    (path / "spec.json").mkdir()
    _resign(path, key, json.loads((path / "MANIFEST.json").read_text())["files"])
    with pytest.raises(BundleError, match="not a regular file"):
        load_bundle(path)


def test_row8_an_oversized_payload_is_refused_before_it_is_read(tiny_bundle_parts, monkeypatch):
    path, pub, _ = tiny_bundle_parts
    size = (path / "detector.pt").stat().st_size
    monkeypatch.setattr(bundle_mod, "MAX_WEIGHTS_BYTES", size - 1)
    read_sizes = []
    real_fdopen = os.fdopen

    def watching_fdopen(*args, **kwargs):
        fh = real_fdopen(*args, **kwargs)
        real_read = fh.read
        fh.read = lambda n=-1: read_sizes.append(n) or real_read(n)
        return fh

    monkeypatch.setattr("shared_models.safe_files.os.fdopen", watching_fdopen)
    with pytest.raises(BundleError, match=rf"detector\.pt.*{size} bytes, more than"):
        load_bundle(path, pub)
    assert all(n != -1 for n in read_sizes)  # every read was bounded


def test_read_regular_file_refuses_devices_and_paths_outside_root(tmp_path):
    with pytest.raises(UnsafeFileError, match="not a regular file"):
        read_regular_file(Path("/dev/zero"), 1 << 20)
    (tmp_path / "root").mkdir()
    (tmp_path / "secret").write_text("x")
    with pytest.raises(UnsafeFileError, match="outside"):
        read_regular_file(tmp_path / "root" / ".." / "secret", 100, root=tmp_path / "root")
    (tmp_path / "root" / "ok").write_bytes(b"abc")
    assert read_regular_file(tmp_path / "root" / "ok", 3, root=tmp_path / "root") == b"abc"


# ----------------------------------------------------------------------------- row 10: no local paths stored


def test_row10_no_local_path_in_checkpoints_or_bundle_and_resume_still_matches(tmp_path):
    data_root = tmp_path / "hospital-data-7f3a"
    paths = {
        "data-root": str(data_root),
        "cache-dir": str(tmp_path / "cache-91c2"),
        "out-dir": str(tmp_path / "out-55e1"),
        "signing-key": str(tmp_path / "key-c0d3.pem"),
    }
    rc = tiny_run_config(**paths)
    out = Path(paths["out-dir"])
    store = CheckpointStore(out / "checkpoints", config_fingerprint(rc), rc)
    store.save(
        "detector",
        PhaseCheckpoint(round=1, state_dict={"w": torch.ones(2)}, site_metrics={1: {"A": {"iou-mean": 0.4}}}),
    )
    dcfg = DetectorConfig(widths=(4, 8, 8, 16), depths=(1, 1, 1), head_width=8)
    scfg = StagerConfig(init_features=8, growth_rate=4, block_config=(1, 1), pool_scales=(1, 2))
    write_bundle(
        out / "bundle",
        detector_state=YOLOX3D(dcfg).state_dict(),
        stager_state=MulDenseNet3D(scfg).state_dict(),
        detector_config=dcfg,
        stager_config=scfg,
        spec=PreprocessingSpec(),
        metrics={"auc": 0.5},
        run_config=rc,
        signing_key=generate_signing_key(tmp_path / "k.pem"),
    )
    stored = list((out / "checkpoints").iterdir()) + list((out / "bundle").iterdir())
    assert any(p.name == "run_config.json" for p in stored) and any(p.name == "detector.pt" for p in stored)
    for file in stored:
        data = file.read_bytes()
        for value in (*paths.values(), str(tmp_path)):
            assert value.encode() not in data, f"{file.name} holds the local path {value}"
    assert json.loads((out / "bundle" / "run_config.json").read_text())["data-root"] == ""
    assert json.loads((out / "bundle" / "run_config.json").read_text())["strategy"] == rc["strategy"]
    # the same run, its folders moved, resumes: the fingerprint ignores paths, a real change still blocks
    moved = {**rc, "data-root": str(tmp_path / "moved-data"), "out-dir": str(tmp_path / "moved-out")}
    assert config_fingerprint(moved) == config_fingerprint(rc)
    assert CheckpointStore(out / "checkpoints", config_fingerprint(moved), moved).load("detector").round == 1
    changed = {**rc, "stager-lr": 0.5}
    with pytest.raises(ValueError, match="stager-lr"):
        CheckpointStore(out / "checkpoints", config_fingerprint(changed), changed).load("detector")


# ----------------------------------------------------------------------------- row 16: damaged last round


def _store_with_rounds(tmp_path, rounds: int) -> CheckpointStore:
    store = CheckpointStore(tmp_path / "checkpoints", "fp")
    for r in range(1, rounds + 1):
        store.save("detector", PhaseCheckpoint(round=r, state_dict={"w": torch.full((64,), float(r))}))
    return store


def test_row16_truncated_last_round_falls_back_to_the_previous_one_and_names_the_file(tmp_path, caplog):
    store = _store_with_rounds(tmp_path, 3)
    last = store.path("detector")
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, logger="server.checkpoint"):
        ckpt = store.load("detector")
    assert ckpt.round == 2 and torch.equal(ckpt.state_dict["w"], torch.full((64,), 2.0))
    assert "detector.pt" in caplog.text and "damaged" in caplog.text and "round 2" in caplog.text
    assert "PytorchStreamReader" not in caplog.text
    # resuming writes round 3 again; the chain and the files verify; the damaged file is kept aside
    store.save("detector", PhaseCheckpoint(round=3, state_dict={"w": torch.full((64,), 3.0)}))
    verify_chain(store.chain(), store.folder)
    assert store.load("detector").round == 3 and (store.folder / "detector.pt.damaged").exists()


def test_row16_status_reads_the_previous_round_without_touching_files(tmp_path):
    out = tmp_path / "run"
    store = _store_with_rounds(out, 2)
    store.path("detector").write_bytes(b"PK\x03\x04 truncated")
    assert co.run_progress(out)["rounds"]["detector"]["done"] == 1
    assert store.path("detector").exists()  # a status query only reads


def test_row16_nothing_verifies_gives_a_clear_error_naming_the_files(tmp_path):
    store = _store_with_rounds(tmp_path, 3)
    for path in (store.path("detector"), store.folder / "detector.prev.pt"):
        path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"detector\.pt: damaged.*detector\.prev\.pt: damaged"):
        store.load("detector")


def test_row16_a_damaged_first_round_starts_the_phase_again(tmp_path, caplog):
    store = _store_with_rounds(tmp_path, 1)
    store.path("detector").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="server.checkpoint"):
        assert store.load("detector") is None
    assert "detector.pt" in caplog.text and "round 0" in caplog.text


def test_row16_a_broken_chain_is_named(tmp_path):
    store = _store_with_rounds(tmp_path, 2)
    (store.folder / "chain.json").write_text('[{"phase": "detector", "round": 1')
    with pytest.raises(CheckpointError, match=r"chain\.json"):
        store.load("detector")


def test_row16_a_missing_first_round_starts_the_phase_again(tmp_path):
    store = _store_with_rounds(tmp_path, 1)
    store.path("detector").unlink()
    assert store.load("detector") is None
    store.save("detector", PhaseCheckpoint(round=1, state_dict={"w": torch.zeros(1)}))
    assert store.load("detector").round == 1


def test_row8_models_json_describing_a_huge_network_is_refused_before_it_is_built(tiny_bundle_parts, monkeypatch):
    path, _, key = tiny_bundle_parts
    models = json.loads((path / "models.json").read_text())
    models["stager"]["init_features"] = 65536  # a re-signed bundle asking for a 40 GB network
    (path / "models.json").write_text(json.dumps(models))
    _resign(path, key)
    built = []
    real_init = MulDenseNet3D.__init__

    def recording_init(self, *args, **kwargs):
        built.append(torch.empty(0).device.type)  # the default device the network is built on
        real_init(self, *args, **kwargs)

    monkeypatch.setattr(MulDenseNet3D, "__init__", recording_init)
    with pytest.raises(BundleError, match="models.json describes a network of .* bytes, more than"):
        load_bundle(path)
    assert built == ["meta"]  # sized on the meta device only; no real allocation


def test_row8_pull_does_not_follow_a_symlink_out_of_the_run_folder(tmp_path, tiny_bundle_parts):
    path, pub, _ = tiny_bundle_parts
    out = tmp_path / "run"
    out.mkdir()
    os.replace(path, out / "bundle")
    (out / "bundle" / "metrics.json").unlink()
    (out / "bundle" / "metrics.json").symlink_to("/dev/zero")  # copying its target would never end
    with pytest.raises(BundleError, match="metrics.json refused.*(symlink|outside)"):
        co.pull(out, tmp_path / "dest", pub)
    assert not (tmp_path / "dest").exists()


def test_row8_weights_that_do_not_fit_models_json_are_refused_by_name(tiny_bundle_parts):
    path, _, key = tiny_bundle_parts
    models = json.loads((path / "models.json").read_text())
    models["stager"]["init_features"] = 16
    (path / "models.json").write_text(json.dumps(models))
    _resign(path, key)
    with pytest.raises(BundleError, match=r"stager\.pt does not fit the network in models\.json"):
        load_bundle(path)


def test_row10_deployment_run_config_sent_to_sites_holds_no_coordinator_path(tmp_path, monkeypatch):
    """`onfh coordinator launch`: what `flwr run` ships to every SuperNode names no path; the
    ServerApp (under the SuperLink's FLWR_HOME) gets the real out-dir and signing-key back."""
    import tomllib

    from server.run_paths import resolve_coordinator_paths

    sent = {}

    def fake_flwr(args, flwr_home, timeout=120):
        sent.update(tomllib.loads(Path(args[args.index("--run-config") + 1]).read_text()))
        return '{"success": true, "run-id": 11}'

    monkeypatch.setattr(co, "_flwr", fake_flwr)
    out, key, flwr_home = tmp_path / "run-out-4d2e", tmp_path / "certs-9a1b" / "signing.pem", tmp_path / "flwr-home"
    assert (
        co.launch(
            {"site-ids": "A,B", "train-sites": "A", "report-groups": "A=A;B=B"},
            out=out,
            flwr_home=flwr_home,
            signing_key=key,
        )
        == 11
    )
    assert str(tmp_path) not in json.dumps(sent) and sent["signing-key"] == ""
    monkeypatch.setenv("FLWR_HOME", str(flwr_home))
    resolved = resolve_coordinator_paths(sent)
    assert resolved["out-dir"] == str(out.resolve()) and resolved["signing-key"] == str(key.resolve())
    assert resolved["site-ids"] == "A,B"
    # resume launches again: a new reference, the same paths
    assert co.resume(out, flwr_home=flwr_home) == 11
    assert resolve_coordinator_paths(sent)["out-dir"] == str(out.resolve())
    # a forged reference names the problem instead of reading anything
    with pytest.raises(ValueError, match="not a valid coordinator run reference"):
        resolve_coordinator_paths({"out-dir": "coordinator-run:../../etc/passwd"})
    # simulation: nothing to resolve
    assert resolve_coordinator_paths({"out-dir": "/x/run"}) == {"out-dir": "/x/run"}
