"""Export a signed ONFH-FL bundle as a MONAI Bundle (issue 21).

MONAI Bundle specification (docs.monai.io, "MONAI Bundle Specification"): a folder with
``configs/metadata.json`` (mandatory keys, and ``network_data_format`` describing the network's
inputs and outputs), ``models/model.pt`` (the weights), ``docs/README.md``, and any further
configs; ``configs/inference.json`` is the usual inference script, run by
``python -m monai.bundle run --config_file configs/inference.json`` (MONAI's ``ConfigParser``).

Layout written by :func:`export_monai_bundle`::

    configs/metadata.json         MONAI metadata; "schema" names MONAI's published schema URL
    configs/metadata_schema.json  a JSON schema of the specification's mandatory keys (ours, see below)
    configs/inference.json        reads one study, runs the gated two-stage pipeline, writes result.json
    models/model.pt               {"detector": state dict, "stager": state dict} (plain tensors)
    models/signed/                the signed ONFH-FL bundle, byte for byte (weights, spec, calibration.json,
                                  MANIFEST.json, MANIFEST.sig, signer.pub)
    models/coordinator.pub        the coordinator's key the export was verified against (with --public-key only)
    docs/README.md                what the bundle does, how to run it, its limits

Two networks and a gated pipeline do not fit MONAI's one ``network_def`` + ``inferer`` pattern, so
``inference.json`` calls the project's own functions (``client.infer.run_monai_inference``): the
bundle needs ``onfh-fl`` installed. It loads ``models/signed`` with
:func:`shared_models.bundle.load_bundle` on every run, so the signature, the file hashes and the
optional ``calibration.json`` (temperature and gate thresholds) are checked and applied exactly as
``onfh infer`` does; ``models/model.pt`` is there for MONAI tools that expect it.

What is and is not verified. Exported with the coordinator's key, ``inference.json`` names the copy of
that key (``models/coordinator.pub``) and pins its SHA-256 (``public_key_sha256``,
:func:`public_key_sha256`): every run verifies ``models/signed`` against the pinned key, and a key
passed with ``--public_key`` must be that key, so a ``models/signed`` re-signed by anyone else is
refused. Exported with ``--allow-unsigned``, nothing is pinned and a run checks ``models/signed``
against its embedded key only (``bundle_trusted: false``), like ``onfh infer --allow-unsigned``.
Nothing the signature covers protects the export's own files: ``configs/*.json``, ``models/model.pt``,
``models/coordinator.pub`` and ``docs/``. MONAI evaluates ``$`` expressions and ``_target_`` names in
``inference.json`` while parsing it, before any check runs, so the export's config is trusted as code:
a tampered export can run anything, skip the check or fake its result. The export must come from a
trusted origin (made by the user from the signed bundle, or its checksum compared over a trusted
channel); this module cannot check that for it.

``metadata_schema.json``: ``monai.bundle verify_metadata`` downloads the schema named in
``metadata.json`` unless the file given as ``--filepath`` already exists; offline, pass
``--filepath configs/metadata_schema.json``. MONAI's published schema file could not be fetched
here, so that file is written by this module from the specification's list of mandatory keys and
tensor format specifiers; it is not MONAI's own schema file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import shutil
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from shared_models.bundle import (
    MAX_JSON_BYTES,
    MAX_KEY_BYTES,
    MAX_WEIGHTS_BYTES,
    OPTIONAL,
    PAYLOAD,
    BundleError,
    load_bundle,
)
from shared_models.safe_files import UnsafeFileError, read_regular_file
from shared_models.stages import FicatArletStage

log = logging.getLogger(__name__)

MONAI_SCHEMA_URL = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json"
)
SIGNED_FILES = (*PAYLOAD, *OPTIONAL, "MANIFEST.json", "MANIFEST.sig", "signer.pub")
COORDINATOR_KEY = "models/coordinator.pub"  # the export's copy of the key it was verified against

_TENSOR_KEYS = (
    "type",
    "format",
    "modality",
    "num_channels",
    "spatial_shape",
    "dtype",
    "value_range",
    "is_patch_data",
    "channel_def",
)
# the specification's "optional_packages_version" is "required_packages_version" since MONAI 1.4 (MONAI 1.6.1
# warns on the old name and renames it when it parses a config)
_MANDATORY = (
    "version",
    "monai_version",
    "pytorch_version",
    "numpy_version",
    "required_packages_version",
    "task",
    "description",
    "authors",
    "copyright",
    "network_data_format",
)


def metadata_schema() -> dict:
    """JSON schema (draft 7) of the MONAI Bundle specification's mandatory ``metadata.json`` keys and
    tensor format specifiers (written from the specification text, not MONAI's published file)."""
    tensor = {
        "type": "object",
        "required": list(_TENSOR_KEYS),
        "properties": {
            "type": {"type": "string"},
            "format": {"type": "string"},
            "modality": {"type": "string"},
            "num_channels": {"type": "integer", "minimum": 0},
            "spatial_shape": {"type": "array", "items": {"type": ["integer", "string"]}},
            "dtype": {"type": "string"},
            "value_range": {"type": "array", "items": {"type": "number"}},
            "is_patch_data": {"type": "boolean"},
            "channel_def": {"type": "object"},
        },
    }
    return {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "MONAI Bundle metadata.json (mandatory keys of the MONAI Bundle specification)",
        "type": "object",
        "required": ["schema", *_MANDATORY],
        "properties": {
            "schema": {"type": "string"},
            "version": {"type": "string"},
            "monai_version": {"type": "string"},
            "pytorch_version": {"type": "string"},
            "numpy_version": {"type": "string"},
            "required_packages_version": {"type": "object", "additionalProperties": {"type": "string"}},
            "task": {"type": "string"},
            "description": {"type": "string"},
            "authors": {"type": "string"},
            "copyright": {"type": "string"},
            "changelog": {"type": "object"},
            "network_data_format": {
                "type": "object",
                "required": ["inputs", "outputs"],
                "properties": {
                    "inputs": {"type": "object", "minProperties": 1, "additionalProperties": tensor},
                    "outputs": {"type": "object", "minProperties": 1, "additionalProperties": tensor},
                },
            },
        },
    }


def _metadata(bundle, version: str) -> dict:
    import monai

    stages = {str(int(s)): f"Ficat-Arlet stage {s.label}" for s in FicatArletStage}
    spec = bundle.spec
    return {
        "schema": MONAI_SCHEMA_URL,
        "version": version,
        "changelog": {version: "exported from a signed ONFH-FL bundle"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {
            "onfh-fl": _onfh_version(),
            "SimpleITK": _version_of("SimpleITK"),
            "pydicom": _version_of("pydicom"),
        },
        "name": "ONFH-FL femoral head detector and Ficat-Arlet stager",
        "task": "Early osteonecrosis of the femoral head: Ficat-Arlet stage 0/I/II of each femoral head on 3D hip MRI",
        "description": (
            "Two-stage pipeline (Yang et al., Front. Surg. 2025): 3DC-YOLOX finds each femoral head in "
            "its hemi-volume; 3D-MulDenseNet stages the cropped head (Ficat-Arlet 0, I, II); 3D Grad-CAM "
            "shows the evidence. Trained by federated learning with ONFH-FL. Studies that fail the "
            "anatomy and field-of-view gates are refused, heads below the calibrated detector or "
            "out-of-distribution thresholds are flagged and not staged."
        ),
        "authors": "ONFH-FL contributors",
        "copyright": "Copyright (c) ONFH-FL contributors",
        "license": "Apache-2.0",
        "intended_use": "Research only: not a medical device, not for diagnosis",
        "data_type": "dicom or nifti",
        "references": ["Yang et al. Front. Surg. 2025: 3DC-YOLOX and 3D-MulDenseNet for early ONFH on MRI"],
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": "MR",
                    "num_channels": 1,
                    "spatial_shape": list(spec.hemi_shape),
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": {
                        "0": f"T2 hemi-volume of one side (mirrored to medial->lateral), "
                        f"{list(spec.hemi_fov_mm)} mm (D, H, W), window level "
                        f"{spec.window_level:g} width {spec.window_width:g} scaled to [0, 1]"
                    },
                },
                "crop": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": "MR",
                    "num_channels": 1,
                    "spatial_shape": list(spec.crop_shape),
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": True,
                    "channel_def": {"0": f"femoral head box plus {spec.crop_margin_mm:g} mm, stager input"},
                },
            },
            "outputs": {
                "boxes": {
                    "type": "tuples",
                    "format": "points",
                    "modality": "n/a",
                    "num_channels": 8,
                    "spatial_shape": ["*"],
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": False,
                    "channel_def": {
                        "0": "cz",
                        "1": "cy",
                        "2": "cx",
                        "3": "d",
                        "4": "h",
                        "5": "w",
                        "6": "objectness logit",
                        "7": "class logit",
                    },
                },
                "pred": {
                    "type": "probabilities",
                    "format": "classes",
                    "modality": "n/a",
                    "num_channels": 3,
                    "spatial_shape": [1],
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": False,
                    "channel_def": stages,
                },
            },
        },
    }


def _version_of(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def _onfh_version() -> str:
    return _version_of("onfh-fl")


def public_key_sha256(pem: bytes, name: str | Path = "public key") -> str:
    """SHA-256 (hex) of an Ed25519 public key's raw 32 bytes: the same for any PEM spelling of the key.

    Raises:
        BundleError: ``pem`` is not a PEM Ed25519 public key (names ``name``).
    """
    try:
        key = serialization.load_pem_public_key(pem)
    except ValueError:
        raise BundleError(f"{name}: not a PEM public key") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"{name}: not an Ed25519 public key")
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def check_pinned_key(public_key: Path, pinned_sha256: str) -> None:
    """Refuse ``public_key`` unless it is the key pinned by SHA-256 in an export's ``inference.json``.

    Raises:
        BundleError: the key file is unreadable (too large, not a regular file, not an Ed25519 PEM
            key) or is another key than the pinned one (names the file).
    """
    path = Path(public_key)
    try:
        pem = read_regular_file(path, MAX_KEY_BYTES)
    except (UnsafeFileError, OSError) as err:
        raise BundleError(f"{path}: public key refused: {err}") from None
    if public_key_sha256(pem, path) != pinned_sha256.lower():
        raise BundleError(
            f"{path}: not the coordinator key this MONAI Bundle was exported with (configs/inference.json pins "
            f"SHA-256 {pinned_sha256[:16]}...); models/signed is not verified against another key"
        )


def _inference_config(key_sha256: str | None) -> dict:
    return {
        "imports": ["$import client.infer"],
        "bundle_root": ".",
        "study": None,
        "output_dir": "$@bundle_root + '/eval'",
        # the coordinator key the export was verified against, pinned by its SHA-256 (None: embedded key only)
        "public_key": None if key_sha256 is None else f"$@bundle_root + '/{COORDINATOR_KEY}'",
        "public_key_sha256": key_sha256,
        "device": "auto",
        "inference": {"_target_": "client.infer.run_monai_inference", "_mode_": "callable"},
        "run": [
            "$@inference(@bundle_root, @study, @output_dir, public_key=@public_key, device=@device, "
            "public_key_sha256=@public_key_sha256)"
        ],
    }


def _readme(bundle, key_sha256: str | None) -> str:
    cal = bundle.calibration
    cal_line = (
        "none: no detector-score or out-of-distribution gate, temperature 1, arg-max stage"
        if cal is None
        else f"temperature {cal.temperature:g}, detector threshold {cal.detector_threshold}, energy threshold "
        f"{cal.energy_threshold}, early-ONFH threshold {cal.early_threshold}"
    )
    if key_sha256 is None:
        run_key = (
            "Exported without the coordinator's key, the run checks `models/signed` against its embedded "
            '`signer.pub` only (`result.json` says `"bundle_trusted": false`); add `--public_key coordinator.pub` '
            "to verify it against the coordinator's Ed25519 key."
        )
        verified_against = "the key you pass with `--public_key`, else only its own embedded `signer.pub`"
        key_file, key_line = "", ""
        exported = "against the bundle's embedded signer key only (no coordinator key given)"
    else:
        run_key = (
            "The run verifies `models/signed` against the coordinator's key this folder was exported with "
            f"(`{COORDINATOR_KEY}`, pinned by SHA-256 `{key_sha256}` in `configs/inference.json`); a key passed "
            "with `--public_key` must be that same key."
        )
        verified_against = f"the coordinator key pinned in `configs/inference.json` (SHA-256 `{key_sha256}`)"
        key_file = f", `{COORDINATOR_KEY}` and its pin"
        key_line = (
            f"\n- `{COORDINATOR_KEY}`: the coordinator's Ed25519 public key (PEM) the export was verified against."
        )
        exported = "against the coordinator's public key"
    return f"""# ONFH-FL: femoral head detector and Ficat-Arlet stager (MONAI Bundle)

Research only: not a medical device, not for diagnosis.

Two-stage pipeline on one 3D hip MRI study (DICOM folder or NIfTI): 3DC-YOLOX finds the right and the left
femoral head, 3D-MulDenseNet gives each the probabilities of Ficat-Arlet stage 0, I and II, and 3D Grad-CAM
shows the evidence in the study's geometry. A study of the wrong body part, too small a field of view, or two
boxes that are not a pair of femoral heads is refused and not staged; a head below the calibrated detector
threshold or out of distribution is flagged and not staged.

## Requirements

`configs/inference.json` calls the project's own code (`client.infer.run_monai_inference`): install ONFH-FL
(`pip install onfh-fl`, or `pip install -e .` from its repository) next to MONAI.

## Run

From this folder:

    python -m monai.bundle run --config_file configs/inference.json --study /path/to/study --output_dir out

writes `out/result.json` (verdict, reasons, per head: side, box in LPS mm, stage probabilities, stage, flags),
`out/gradcam_R.nii.gz` and `out/gradcam_L.nii.gz` (study geometry) and figures: the same as
`onfh infer --bundle models/signed --study /path/to/study --out out`. {run_key} Add `--device cpu` to stay
off the GPU.

## What is verified, and what is not

- Verified on every run: `models/signed` (its `MANIFEST.sig` over `MANIFEST.json`, and the hashes of the
  weights, network and preprocessing configs, metrics, run config and `calibration.json`), against {verified_against}.
- Not verified by anything: the export's own files, `configs/inference.json`, `configs/metadata.json`,
  `models/model.pt`{key_file} and `docs/`. The signature covers `models/signed` only.
- MONAI evaluates `$` expressions and `_target_` names in `configs/inference.json` while it parses it, before
  any check runs: this folder's config files are trusted as code. A tampered export can run any code, skip the
  signature check or fake `result.json`. Verify where this folder came from before running it: make it yourself
  with `onfh bundle export-monai` from the signed bundle, or compare its checksum with one received over a
  trusted channel.
- `models/model.pt` is a copy for MONAI tools, not used by the run and not signed: load it only from an export
  you trust, or load the weights from `models/signed`.

## Contents

- `models/signed/`: the signed ONFH-FL bundle, byte for byte. Every run checks its signature and hashes.
- `models/model.pt`: `{{"detector": state dict, "stager": state dict}}` for MONAI tools (load with
  `torch.load(..., weights_only=True)`); network configs in `models/signed/models.json`.{key_line}
- Calibration (validation-chosen, carried from the signed bundle): {cal_line}.
- Exported after verifying the signature {exported}.

## Verify the metadata

Offline: `python -m monai.bundle verify_metadata --meta_file configs/metadata.json --filepath
configs/metadata_schema.json` (a schema of the specification's mandatory keys, shipped here). Online, against
MONAI's published schema: `--filepath /tmp/meta_schema.json` (downloaded from the `schema` URL).
"""


def export_monai_bundle(bundle_dir: Path, out: Path, public_key: Path | None = None, version: str = "0.1.0") -> Path:
    """Copy a signed bundle into a new MONAI Bundle folder ``out`` and verify the copy; returns ``out``.

    Only the bundle's own file names are copied (each a regular file under its size cap); the
    copy in ``out/models/signed`` is then verified with :func:`shared_models.bundle.load_bundle`,
    so the files that ship are the ones whose signature was checked.

    Args:
        bundle_dir: the signed ONFH-FL bundle.
        out: new folder (must not exist, or be empty).
        public_key: the coordinator's Ed25519 public key (PEM); it is copied to
            ``models/coordinator.pub`` and pinned by SHA-256 in ``configs/inference.json``, so every
            run verifies ``models/signed`` against it. None checks the embedded key only (logged as
            a warning), at export and at every run.
        version: the MONAI Bundle's ``version``.

    Raises:
        BundleError: the bundle is incomplete, tampered with, or signed by another key (nothing is
            left in ``out``).
        FileExistsError: ``out`` exists and is not empty.
    """
    bundle_dir, out = Path(bundle_dir), Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty; choose a new folder for the MONAI Bundle")
    signed = out / "models" / "signed"
    signed.mkdir(parents=True)
    try:
        for name in SIGNED_FILES:
            src = bundle_dir / name
            if not src.exists() and not src.is_symlink():
                continue  # load_bundle below names a missing mandatory file
            cap = (
                MAX_WEIGHTS_BYTES
                if name.endswith(".pt")
                else MAX_JSON_BYTES
                if name.endswith(".json")
                else MAX_KEY_BYTES
            )
            try:
                (signed / name).write_bytes(read_regular_file(src, cap, root=bundle_dir))
            except (UnsafeFileError, OSError) as err:
                raise BundleError(f"{bundle_dir}: bundle file {name} refused: {err}") from None
        bundle = load_bundle(signed, public_key)
        key_sha256 = None
        if public_key is not None:  # the key load_bundle just verified against: copied and pinned for every run
            pem = read_regular_file(Path(public_key), MAX_KEY_BYTES)
            key_sha256 = public_key_sha256(pem, public_key)
            (out / COORDINATOR_KEY).write_bytes(pem)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    torch.save(
        {"detector": bundle.detector.state_dict(), "stager": bundle.stager.state_dict()}, out / "models" / "model.pt"
    )
    configs = out / "configs"
    configs.mkdir()
    (configs / "metadata.json").write_text(json.dumps(_metadata(bundle, version), indent=2))
    (configs / "metadata_schema.json").write_text(json.dumps(metadata_schema(), indent=2))
    (configs / "inference.json").write_text(json.dumps(_inference_config(key_sha256), indent=2))
    (out / "docs").mkdir()
    (out / "docs" / "README.md").write_text(_readme(bundle, key_sha256))
    log.info("MONAI Bundle written to %s (python %s)", out, platform.python_version())
    return out
