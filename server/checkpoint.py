"""Per-round checkpoints of a two-phase run, so that a stopped run resumes.

One file per phase, ``<out>/checkpoints/<phase>.pt``, rewritten atomically after
every round: the round reached, the global state dict, the per-site metrics of
every round so far, and a fingerprint of the run config. A run restarted on the
same ``out-dir`` with the same config continues from the last finished round; a
different config is refused rather than silently mixed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

log = logging.getLogger(__name__)

# Keys that may change between a run and its resumption without invalidating it.
RESUMABLE_KEYS = frozenset({"detector-rounds", "stager-rounds", "node-wait-timeout-s", "round-timeout-s", "device", "amp"})


def config_fingerprint(run_config: dict) -> str:
    """SHA-256 (hex) of the run config, ignoring keys that may change on resume."""
    kept = {k: v for k, v in sorted(run_config.items()) if k not in RESUMABLE_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


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

    @property
    def selected_state_dict(self) -> dict[str, torch.Tensor]:
        """The weights of the round chosen on the validation score (the last round if none was scored)."""
        return self.best_state_dict if self.best_state_dict is not None else self.state_dict

    @property
    def selected_round(self) -> int:
        return self.best_round if self.best_state_dict is not None else self.round


class CheckpointStore:
    """Reads and atomically writes phase checkpoints under ``folder``."""

    def __init__(self, folder: Path, fingerprint: str):
        self.folder = Path(folder)
        self.fingerprint = fingerprint

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
            raise ValueError(
                f"{path}: checkpoint belongs to a run with a different configuration; "
                "use a new out-dir or delete the checkpoints folder to start over"
            )
        return ckpt

    def save(self, phase: str, ckpt: PhaseCheckpoint) -> None:
        """Write atomically (temp file + rename), so a crash never leaves half a checkpoint."""
        self.folder.mkdir(parents=True, exist_ok=True)
        ckpt.fingerprint = self.fingerprint
        tmp = self.path(phase).with_suffix(".tmp")
        torch.save(ckpt.__dict__, tmp)
        os.replace(tmp, self.path(phase))
        progress = {"phase": phase, "round": ckpt.round}
        (self.folder / "progress.json").write_text(json.dumps(progress))
