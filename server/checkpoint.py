"""Per-round checkpoints of a two-phase run, so that a stopped run resumes.

One file per phase, ``<out>/checkpoints/<phase>.pt``, rewritten atomically after
every round: the round reached, the global state dict, the per-site metrics of
every round so far, and a fingerprint of the run config. A run restarted on the
same ``out-dir`` with the same config continues from the last finished round; a
different config is refused rather than silently mixed.

Every save also appends to a **hash chain**, ``<out>/checkpoints/chain.json``: one entry per
checkpoint written, ``{phase, round, sha256, chain, saved_at}``, where ``sha256`` is the file's
digest, ``chain = sha256(previous chain + sha256 + phase + round)`` and ``saved_at`` the Unix
time in seconds (not chained; it gives the wall time of every round). The final bundle records
the chain (signed, in ``MANIFEST.json``), so the model can be traced to the exact sequence
of round checkpoints that produced it (:func:`verify_chain`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Keys that may change between a run and its resumption without invalidating it.
# out-dir: a run folder that was moved or copied resumes from its new place.
RESUMABLE_KEYS = frozenset({"detector-rounds", "stager-rounds", "node-wait-timeout-s", "round-timeout-s", "device", "amp",
                            "out-dir"})


def config_fingerprint(run_config: dict) -> str:
    """SHA-256 (hex) of the run config, ignoring keys that may change on resume."""
    kept = {k: v for k, v in sorted(run_config.items()) if k not in RESUMABLE_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def config_changes(stored: dict, current: dict, defaults: dict | None = None) -> list[str]:
    """What keeps a checkpoint's run from resuming under ``current``; [] when it may resume.

    A key in both must hold the same value; a key only in ``current`` (added by a later release)
    must hold its ``pyproject.toml`` default; a key only in ``stored`` (removed since) blocks.
    :data:`RESUMABLE_KEYS` are ignored.

    Returns:
        One ``"KEY: OLD -> NEW"`` (or ``"KEY: removed"`` / ``"KEY: new, not its default"``) per blocking key.
    """
    if defaults is None:
        from shared_models.config import default_run_config

        defaults = default_run_config()
    out = []
    for key in sorted((set(stored) | set(current)) - RESUMABLE_KEYS):
        if key in stored and key in current:
            if stored[key] != current[key]:
                out.append(f"{key}: {stored[key]!r} -> {current[key]!r}")
        elif key in stored:
            out.append(f"{key}: removed")
        elif key not in defaults or current[key] != defaults[key]:
            out.append(f"{key}: new, not its default")
    return out


@dataclass
class PhaseCheckpoint:
    """State of one phase after ``round`` finished rounds, and the best round so far."""

    round: int
    state_dict: dict[str, torch.Tensor]
    site_metrics: dict[int, dict[str, dict]] = field(default_factory=dict)
    train_metrics: dict[int, dict[str, dict]] = field(default_factory=dict)
    best_round: int = 0
    best_score: float = float("-inf")
    best_state_dict: dict[str, torch.Tensor] | None = None
    fingerprint: str = ""
    run_config: dict = field(default_factory=dict)  # without RESUMABLE_KEYS; to resume across releases
    missing_sites: dict[int, dict[str, list[str]]] = field(default_factory=dict)
    rejected_updates: dict[int, dict[str, list[str]]] = field(default_factory=dict)

    @property
    def selected_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights of the round chosen on the validation score (the last round if none was scored)."""
        return self.best_state_dict if self.best_state_dict is not None else self.state_dict

    @property
    def selected_round(self) -> int:
        return self.best_round if self.best_state_dict is not None else self.round


class CheckpointStore:
    """Reads and atomically writes phase checkpoints under ``folder``."""

    def __init__(self, folder: Path, fingerprint: str, run_config: dict | None = None):
        """
        Args:
            folder: the run's ``checkpoints`` folder.
            fingerprint: :func:`config_fingerprint` of the run config.
            run_config: the run config itself; stored in every checkpoint so that a later release,
                which may add run-config keys, can still resume the run (see :func:`config_changes`).
        """
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.run_config = {k: v for k, v in (run_config or {}).items() if k not in RESUMABLE_KEYS}

    def path(self, phase: str) -> Path:
        return self.folder / f"{phase}.pt"

    def load(self, phase: str) -> PhaseCheckpoint | None:
        """The phase's checkpoint, or None if there is none.

        Raises:
            ValueError: if the checkpoint was written by a run with another config.
        """
        path = self.path(phase)
        if not path.exists():
            return None
        data = torch.load(path, weights_only=False, map_location="cpu")
        ckpt = PhaseCheckpoint(**data)
        if ckpt.fingerprint != self.fingerprint:
            changes = config_changes(ckpt.run_config, self.run_config) if ckpt.run_config and self.run_config else None
            if changes != []:
                detail = f" ({', '.join(changes)})" if changes else ""
                raise ValueError(
                    f"{path}: checkpoint belongs to a run with a different configuration{detail}; "
                    "use a new out-dir or delete the checkpoints folder to start over"
                )
            log.info("resuming a run of an earlier release: its config matches, new keys are at their defaults")
        return ckpt

    def save(self, phase: str, ckpt: PhaseCheckpoint) -> None:
        """Write atomically (temp file + rename), so a crash never leaves half a checkpoint."""
        self.folder.mkdir(parents=True, exist_ok=True)
        ckpt.fingerprint = self.fingerprint
        ckpt.run_config = dict(self.run_config)
        tmp = self.path(phase).with_suffix(".tmp")
        torch.save(ckpt.__dict__, tmp)
        os.replace(tmp, self.path(phase))
        self._extend_chain(phase, ckpt.round)
        progress = {"phase": phase, "round": ckpt.round}
        (self.folder / "progress.json").write_text(json.dumps(progress))

    def chain(self) -> list[dict]:
        """The hash chain of every checkpoint written so far (see module docstring); [] if none."""
        path = self.folder / "chain.json"
        return json.loads(path.read_text()) if path.exists() else []

    def _extend_chain(self, phase: str, round_: int) -> None:
        entries = self.chain()
        digest = hashlib.sha256(self.path(phase).read_bytes()).hexdigest()
        previous = entries[-1]["chain"] if entries else ""
        entries.append({"phase": phase, "round": round_, "sha256": digest,
                        "chain": chain_link(previous, digest, phase, round_), "saved_at": round(time.time(), 3)})
        tmp = self.folder / "chain.json.tmp"
        tmp.write_text(json.dumps(entries, indent=1))
        os.replace(tmp, self.folder / "chain.json")


def chain_link(previous: str, digest: str, phase: str, round_: int) -> str:
    """One link of the checkpoint hash chain: SHA-256 (hex) of ``previous|digest|phase|round``."""
    return hashlib.sha256(f"{previous}|{digest}|{phase}|{round_}".encode()).hexdigest()


def verify_chain(entries: list[dict], folder: Path | None = None) -> None:
    """Check that every link follows from the one before; with ``folder``, also that each phase's
    last entry matches the checkpoint file there (earlier files were overwritten by later rounds).

    Raises:
        ValueError: naming the first entry (phase, round) that does not verify.
    """
    previous = ""
    last: dict[str, dict] = {}
    for entry in entries:
        if chain_link(previous, entry["sha256"], entry["phase"], entry["round"]) != entry["chain"]:
            raise ValueError(f"checkpoint chain broken at {entry['phase']} round {entry['round']}")
        previous = entry["chain"]
        last[entry["phase"]] = entry
    if folder is not None:
        for phase, entry in last.items():
            path = Path(folder) / f"{phase}.pt"
            if not path.exists() or hashlib.sha256(path.read_bytes()).hexdigest() != entry["sha256"]:
                raise ValueError(f"{path}: does not match the last {phase} entry (round {entry['round']}) of the chain")
