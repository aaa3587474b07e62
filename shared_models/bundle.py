"""Signed model bundles: detector + stager + preprocessing spec + configs + metrics.

Layout of a bundle folder::

    detector.pt        3DC-YOLOX state dict (torch.save; loaded with weights_only=True)
    stager.pt          3D-MulDenseNet state dict
    spec.json          PreprocessingSpec
    models.json        DetectorConfig and StagerConfig (to rebuild the networks exactly)
    metrics.json       the run report (aggregate metrics only)
    run_config.json    the run configuration, without local paths (``safe_files.redact_paths``)
    calibration.json   validation-chosen thresholds and temperature (``shared_models.calibration``);
                       optional (:data:`OPTIONAL`): a bundle without it runs without those gates, with a warning
    MANIFEST.json      sha256 of every file above, and the hash chain of the run's round checkpoints
    MANIFEST.sig       Ed25519 signature of MANIFEST.json (raw 64 bytes)
    signer.pub         the signer's Ed25519 public key (PEM), for convenience only

Loading treats the folder as hostile: only the names above are read, each one a regular file
inside the folder (no symlink, device or FIFO), size-capped before reading, read **once**,
hashed, and deserialised from those same bytes (``torch.load(weights_only=True)`` for the
weights), so a file swapped after its hash was checked is never the one loaded.

Signatures use Ed25519 (RFC 8032) from the ``cryptography`` package. Trust comes
from the coordinator's public key passed to :func:`load_bundle`; the embedded
``signer.pub`` only proves integrity, not origin, and is reported as untrusted.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared_models.calibration import Calibration
from shared_models.detection import YOLOX3D
from shared_models.preprocessing import PreprocessingSpec
from shared_models.safe_files import UnsafeFileError, load_tensors, read_regular_file, redact_paths
from shared_models.specs import DetectorConfig
from shared_models.stager import MulDenseNet3D, StagerConfig

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
PAYLOAD = ("detector.pt", "stager.pt", "spec.json", "models.json", "metrics.json", "run_config.json")
OPTIONAL = ("calibration.json",)  # signed when present; older bundles lack it
# Size caps, checked before a file is read: weights of the paper-size models are a few MB.
MAX_WEIGHTS_BYTES = 1 << 30
MAX_JSON_BYTES = 64 << 20  # MANIFEST.json holds the checkpoint chain: ~250 bytes a round
MAX_KEY_BYTES = 64 << 10


class BundleError(Exception):
    """A bundle is incomplete, tampered with, or signed by an untrusted key."""


def generate_signing_key(path: Path) -> Ed25519PrivateKey:
    """Create an Ed25519 private key at ``path`` (PEM, PKCS8, unencrypted, mode 0600) and ``path.pub``."""
    key = Ed25519PrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    path.chmod(0o600)
    path.with_suffix(path.suffix + ".pub").write_bytes(public_pem(key.public_key()))
    return key


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """Load an Ed25519 private key (PEM).

    Raises:
        BundleError: if the file is not an Ed25519 private key.
    """
    key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(f"{path}: not an Ed25519 private key")
    return key


def public_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _max_bytes(name: str) -> int:
    return MAX_WEIGHTS_BYTES if name.endswith(".pt") else MAX_JSON_BYTES if name.endswith(".json") else MAX_KEY_BYTES


def write_bundle(
    out: Path,
    *,
    detector_state: dict[str, torch.Tensor],
    stager_state: dict[str, torch.Tensor],
    detector_config: DetectorConfig,
    stager_config: StagerConfig,
    spec: PreprocessingSpec,
    metrics: dict,
    run_config: dict,
    signing_key: Ed25519PrivateKey,
    checkpoint_chain: list[dict] | None = None,
    calibration: Calibration | None = None,
) -> Path:
    """Write and sign a bundle folder; returns ``out``.

    ``checkpoint_chain`` (``server/checkpoint.py``: ``[{phase, round, sha256, chain}, ...]``) is
    recorded under ``"checkpoint_chain"`` in ``MANIFEST.json``, so the signature covers it.
    """
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "detector.pt": _torch_bytes(detector_state),
        "stager.pt": _torch_bytes(stager_state),
        "spec.json": json.dumps(spec.to_dict(), indent=2).encode(),
        "models.json": json.dumps(
            {"detector": detector_config.to_dict(), "stager": stager_config.to_dict()}, indent=2
        ).encode(),
        "metrics.json": json.dumps(metrics, indent=2, allow_nan=False, default=str).encode(),
        "run_config.json": json.dumps(redact_paths(run_config), indent=2, default=str).encode(),
    }
    if calibration is not None:
        payload["calibration.json"] = json.dumps(calibration.to_dict(), indent=2).encode()
    for name, data in payload.items():
        (out / name).write_bytes(data)
    manifest = {
        "format_version": FORMAT_VERSION,
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in payload.items()},
    }
    if checkpoint_chain:
        manifest["checkpoint_chain"] = checkpoint_chain
    manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True).encode()
    (out / "MANIFEST.json").write_bytes(manifest_bytes)
    (out / "MANIFEST.sig").write_bytes(signing_key.sign(manifest_bytes))
    (out / "signer.pub").write_bytes(public_pem(signing_key.public_key()))
    return out


def _torch_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


@dataclass
class Bundle:
    """A verified bundle, with its networks rebuilt and in eval mode."""

    detector: YOLOX3D
    stager: MulDenseNet3D
    spec: PreprocessingSpec
    metrics: dict
    run_config: dict
    trusted: bool  # True when verified against a coordinator key given by the caller
    calibration: Calibration | None = None  # None: the bundle carries no calibration.json


def load_bundle(path: Path, public_key: Path | None = None) -> Bundle:
    """Verify and load a bundle.

    Every file is read once (a regular file inside ``path``, under its size cap), checked, and
    loaded from the bytes that were checked. ``MANIFEST.json`` must list exactly the names in
    :data:`PAYLOAD`: an unknown name (``../../etc/passwd``, ``/dev/zero``) is refused before
    anything is read, also when the bundle is checked only against its embedded key.

    Args:
        path: the bundle folder.
        public_key: the coordinator's Ed25519 public key (PEM). Without it the
            embedded ``signer.pub`` is used and the bundle is marked untrusted.

    Raises:
        BundleError: missing, oversized or non-regular file, unknown manifest entry, hash
            mismatch, bad signature, or weights that are not plain tensors (names the file).
    """
    path = Path(path)

    def read(name: str) -> bytes:
        if not (path / name).exists() and not (path / name).is_symlink():
            raise BundleError(f"{path}: bundle file {name} is missing")
        try:
            return read_regular_file(path / name, _max_bytes(name), root=path)
        except (UnsafeFileError, OSError) as err:
            raise BundleError(f"{path}: bundle file {name} refused: {err}") from None

    for name in (*PAYLOAD, "MANIFEST.json", "MANIFEST.sig"):
        if not (path / name).exists() and not (path / name).is_symlink():
            raise BundleError(f"{path}: bundle file {name} is missing")
    manifest_bytes = read("MANIFEST.json")
    if public_key:
        key_path = Path(public_key)
        key_bytes = read_regular_file(key_path, MAX_KEY_BYTES)
    else:
        key_path = path / "signer.pub"
        key_bytes = read("signer.pub")
    try:
        key = serialization.load_pem_public_key(key_bytes)
    except ValueError:
        raise BundleError(f"{key_path}: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"{key_path}: not an Ed25519 public key")
    try:
        key.verify(read("MANIFEST.sig"), manifest_bytes)
    except InvalidSignature:
        raise BundleError(f"{path}: MANIFEST.sig does not verify against {key_path.name}") from None
    try:
        files = json.loads(manifest_bytes)["files"]
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise TypeError
    except (ValueError, KeyError, TypeError):
        raise BundleError(f"{path}: MANIFEST.json has no valid 'files' table") from None
    unknown = sorted(set(files) - set(PAYLOAD) - set(OPTIONAL))
    if unknown:
        raise BundleError(f"{path}: MANIFEST.json names files that are not part of a bundle: {unknown!r}; refused")
    uncovered = sorted(set(PAYLOAD) - set(files))
    if uncovered:
        raise BundleError(f"{path}: MANIFEST.json does not cover {uncovered!r}; refused")
    data: dict[str, bytes] = {}
    for name in (*PAYLOAD, *(n for n in OPTIONAL if n in files)):
        data[name] = read(name)
        if hashlib.sha256(data[name]).hexdigest() != files[name]:
            raise BundleError(f"{path}: {name} does not match its MANIFEST.json hash (modified after signing)")

    def parse(name: str):
        try:
            return json.loads(data[name])
        except (ValueError, RecursionError) as err:
            raise BundleError(f"{path}: {name} is not valid JSON ({type(err).__name__})") from None

    def weights(name: str):
        try:
            state = load_tensors(data[name], path / name)
        except UnsafeFileError as err:
            raise BundleError(str(err)) from None
        if not isinstance(state, dict):
            raise BundleError(f"{path}: {name} holds no state dict")
        return state

    detector_config, stager_config = _model_configs(parse("models.json"), path)
    detector, stager = YOLOX3D(detector_config), MulDenseNet3D(stager_config)
    for name, net in (("detector.pt", detector), ("stager.pt", stager)):
        try:
            net.load_state_dict(weights(name))
        except RuntimeError as err:  # names or shapes that models.json does not describe
            raise BundleError(
                f"{path}: {name} does not fit the network in models.json ({str(err).splitlines()[0][:200]})"
            ) from None
    if public_key is None:
        log.warning(
            "bundle verified against its embedded signer key only; pass the coordinator's public key to trust it"
        )
    return Bundle(
        detector=detector.eval(),
        stager=stager.eval(),
        spec=PreprocessingSpec.from_dict(parse("spec.json")),
        metrics=parse("metrics.json"),
        run_config=parse("run_config.json"),
        trusted=public_key is not None,
        calibration=_calibration(parse("calibration.json"), path) if "calibration.json" in data else None,
    )


def _calibration(d, path: Path) -> Calibration:
    try:
        return Calibration.from_dict(d)
    except (ValueError, TypeError) as err:
        raise BundleError(f"{path}: calibration.json is invalid ({err})") from None


def _model_configs(models, path: Path) -> tuple[DetectorConfig, StagerConfig]:
    """The two network configs of ``models.json``, refused when malformed or when the networks
    they describe would be larger than :data:`MAX_WEIGHTS_BYTES` (sized on the ``meta`` device,
    which allocates nothing, before a real network is built).

    Raises:
        BundleError: naming ``models.json`` and the problem.
    """
    try:
        detector_config = DetectorConfig.from_dict(models["detector"])
        stager_config = StagerConfig.from_dict(models["stager"])
        with torch.device("meta"):
            sizes = [
                sum(t.numel() * t.element_size() for t in net.state_dict().values())
                for net in (YOLOX3D(detector_config), MulDenseNet3D(stager_config))
            ]
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise BundleError(f"{path}: models.json does not describe the networks ({type(err).__name__}: {err})") from None
    if max(sizes) > MAX_WEIGHTS_BYTES:
        raise BundleError(
            f"{path}: models.json describes a network of {max(sizes)} bytes, more than the {MAX_WEIGHTS_BYTES} allowed"
        )
    return detector_config, stager_config
