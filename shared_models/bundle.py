"""Signed model bundles: detector + stager + preprocessing spec + configs + metrics.

Layout of a bundle folder::

    detector.pt        3DC-YOLOX state dict (torch.save; loaded with weights_only=True)
    stager.pt          3D-MulDenseNet state dict
    spec.json          PreprocessingSpec
    models.json        DetectorConfig and StagerConfig (to rebuild the networks exactly)
    metrics.json       the run report (aggregate metrics only)
    run_config.json    the run configuration
    MANIFEST.json      sha256 of every file above, and the hash chain of the run's round checkpoints
    MANIFEST.sig       Ed25519 signature of MANIFEST.json (raw 64 bytes)
    signer.pub         the signer's Ed25519 public key (PEM), for convenience only

Signatures use Ed25519 (RFC 8032) from the ``cryptography`` package. Trust comes
from the coordinator's public key passed to :func:`load_bundle`; the embedded
``signer.pub`` only proves integrity, not origin, and is reported as untrusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shared_models.detector import YOLOX3D, DetectorConfig
from shared_models.preprocessing import PreprocessingSpec
from shared_models.stager import MulDenseNet3D, StagerConfig

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
PAYLOAD = ("detector.pt", "stager.pt", "spec.json", "models.json", "metrics.json", "run_config.json")


class BundleError(Exception):
    """A bundle is incomplete, tampered with, or signed by an untrusted key."""


def generate_signing_key(path: Path) -> Ed25519PrivateKey:
    """Create an Ed25519 private key at ``path`` (PEM, PKCS8, unencrypted, mode 0600) and ``path.pub``."""
    key = Ed25519PrivateKey.generate()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
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


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
) -> Path:
    """Write and sign a bundle folder; returns ``out``.

    ``checkpoint_chain`` (``server/checkpoint.py``: ``[{phase, round, sha256, chain}, ...]``) is
    recorded under ``"checkpoint_chain"`` in ``MANIFEST.json``, so the signature covers it.
    """
    out.mkdir(parents=True, exist_ok=True)
    torch.save(detector_state, out / "detector.pt")
    torch.save(stager_state, out / "stager.pt")
    (out / "spec.json").write_text(json.dumps(spec.to_dict(), indent=2))
    (out / "models.json").write_text(json.dumps({"detector": detector_config.to_dict(), "stager": stager_config.to_dict()}, indent=2))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, allow_nan=False, default=str))
    (out / "run_config.json").write_text(json.dumps(run_config, indent=2, default=str))
    manifest = {"format_version": FORMAT_VERSION, "files": {name: _sha256(out / name) for name in PAYLOAD}}
    if checkpoint_chain:
        manifest["checkpoint_chain"] = checkpoint_chain
    manifest_bytes = json.dumps(manifest, indent=2, sort_keys=True).encode()
    (out / "MANIFEST.json").write_bytes(manifest_bytes)
    (out / "MANIFEST.sig").write_bytes(signing_key.sign(manifest_bytes))
    (out / "signer.pub").write_bytes(public_pem(signing_key.public_key()))
    return out


@dataclass
class Bundle:
    """A verified bundle, with its networks rebuilt and in eval mode."""

    detector: YOLOX3D
    stager: MulDenseNet3D
    spec: PreprocessingSpec
    metrics: dict
    run_config: dict
    trusted: bool  # True when verified against a coordinator key given by the caller


def load_bundle(path: Path, public_key: Path | None = None) -> Bundle:
    """Verify and load a bundle.

    Args:
        path: the bundle folder.
        public_key: the coordinator's Ed25519 public key (PEM). Without it the
            embedded ``signer.pub`` is used and the bundle is marked untrusted.

    Raises:
        BundleError: missing file, hash mismatch, or bad signature (names the file).
    """
    path = Path(path)
    for name in (*PAYLOAD, "MANIFEST.json", "MANIFEST.sig"):
        if not (path / name).is_file():
            raise BundleError(f"{path}: bundle file {name} is missing")
    manifest_bytes = (path / "MANIFEST.json").read_bytes()
    key_path = Path(public_key) if public_key else path / "signer.pub"
    key = serialization.load_pem_public_key(key_path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"{key_path}: not an Ed25519 public key")
    try:
        key.verify((path / "MANIFEST.sig").read_bytes(), manifest_bytes)
    except InvalidSignature:
        raise BundleError(f"{path}: MANIFEST.sig does not verify against {key_path.name}") from None
    manifest = json.loads(manifest_bytes)
    for name, digest in manifest["files"].items():
        if _sha256(path / name) != digest:
            raise BundleError(f"{path}: {name} does not match its MANIFEST.json hash (modified after signing)")
    models = json.loads((path / "models.json").read_text())
    detector = YOLOX3D(DetectorConfig.from_dict(models["detector"]))
    detector.load_state_dict(torch.load(path / "detector.pt", weights_only=True, map_location="cpu"))
    stager = MulDenseNet3D(StagerConfig.from_dict(models["stager"]))
    stager.load_state_dict(torch.load(path / "stager.pt", weights_only=True, map_location="cpu"))
    if public_key is None:
        log.warning("bundle verified against its embedded signer key only; pass the coordinator's public key to trust it")
    return Bundle(
        detector=detector.eval(),
        stager=stager.eval(),
        spec=PreprocessingSpec.from_dict(json.loads((path / "spec.json").read_text())),
        metrics=json.loads((path / "metrics.json").read_text()),
        run_config=json.loads((path / "run_config.json").read_text()),
        trusted=public_key is not None,
    )
