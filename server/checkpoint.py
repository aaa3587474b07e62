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

Checkpoint files are treated as hostile (issue 16). A file is read once, size-capped, and its
SHA-256 must match an entry of its phase in a chain whose links verify **before** anything is
deserialised; it is then loaded from those same bytes with ``torch.load(weights_only=True)``
(tensors, dicts, lists and plain scalars only: a pickle cannot run code). Every save keeps the
previous round as ``<phase>.prev.pt``: when the last file is damaged (truncated disk, killed
copy) the run resumes from the previous verified round, with a warning that names the damaged
file and what is wrong with it (the damaged file is kept as ``<phase>.pt.damaged``); a damaged
round 1 starts the phase again. When no file verifies, :class:`CheckpointError` names them.

No local path is stored: the run config kept in a checkpoint has its path keys blanked
(``shared_models.safe_files.redact_paths``), and path keys never block a resume (a moved data
or run folder resumes; that the data is the same is not something a path could prove anyway).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from shared_models.safe_files import PATH_KEYS, UnsafeFileError, load_tensors, read_regular_file, redact_paths

log = logging.getLogger(__name__)

# Keys that may change between a run and its resumption without invalidating it.
# The path keys (out-dir, data-root, cache-dir, signing-key): a run or data folder that was moved
# resumes from its new place; paths are never stored (see module docstring).
RESUMABLE_KEYS = frozenset(
    {
        "detector-rounds",
        "stager-rounds",
        "node-wait-timeout-s",
        "round-timeout-s",
        "device",
        "amp",
        "track",
        "identity",  # how sites are named (the sim runner sets it, the CLI's check does not), not what weights are
        *PATH_KEYS,
    }
)
MAX_CHECKPOINT_BYTES = 4 << 30  # two state dicts of the paper-size models are a few MB
MAX_CHAIN_BYTES = 64 << 20


class CheckpointError(ValueError):
    """No checkpoint of a phase verifies against the chain; names the files and the problems."""


def config_fingerprint(run_config: dict) -> str:
    """SHA-256 (hex) of the run config, ignoring keys that may change on resume and any path."""
    kept = {k: v for k, v in sorted(redact_paths(run_config).items()) if k not in RESUMABLE_KEYS}
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
        self.run_config = {k: v for k, v in redact_paths(run_config or {}).items() if k not in RESUMABLE_KEYS}

    def path(self, phase: str) -> Path:
        return self.folder / f"{phase}.pt"

    def load(self, phase: str) -> PhaseCheckpoint | None:
        """The phase's last verified checkpoint, or None if the phase has none.

        A damaged last file falls back to the previous verified round (logged, naming the
        file); the damaged file is renamed ``<phase>.pt.damaged`` so that the next save does
        not rotate it over the good one.

        Raises:
            CheckpointError: the phase has checkpoints but none verifies (names each file and its problem).
            ValueError: if the checkpoint was written by a run with another config.
        """
        ckpt = read_checkpoint(self.folder, phase, set_aside_damaged=True)
        if ckpt is None:
            return None
        path = self.path(phase)
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
        buffer = io.BytesIO()
        torch.save({k: _plain(v, k) for k, v in ckpt.__dict__.items()}, buffer)
        data = buffer.getvalue()
        tmp = self.path(phase).with_suffix(".tmp")
        tmp.write_bytes(data)
        if self.path(phase).exists():
            os.replace(self.path(phase), previous_path(self.folder, phase))
        os.replace(tmp, self.path(phase))
        self._extend_chain(phase, ckpt.round, hashlib.sha256(data).hexdigest())
        progress = {"phase": phase, "round": ckpt.round}
        (self.folder / "progress.json").write_text(json.dumps(progress))

    def chain(self) -> list[dict]:
        """The hash chain of every checkpoint written so far (see module docstring); [] if none.

        Raises:
            CheckpointError: ``chain.json`` is too large or not a list of entries.
        """
        return read_chain(self.folder)

    def _extend_chain(self, phase: str, round_: int, digest: str) -> None:
        entries = self.chain()
        previous = entries[-1]["chain"] if entries else ""
        entries.append(
            {
                "phase": phase,
                "round": round_,
                "sha256": digest,
                "chain": chain_link(previous, digest, phase, round_),
                "saved_at": round(time.time(), 3),
            }
        )
        tmp = self.folder / "chain.json.tmp"
        tmp.write_text(json.dumps(entries, indent=1))
        os.replace(tmp, self.folder / "chain.json")


def chain_link(previous: str, digest: str, phase: str, round_: int) -> str:
    """One link of the checkpoint hash chain: SHA-256 (hex) of ``previous|digest|phase|round``."""
    return hashlib.sha256(f"{previous}|{digest}|{phase}|{round_}".encode()).hexdigest()


def verify_chain(entries: list[dict], folder: Path | None = None) -> None:
    """Check that every link follows from the one before; with ``folder``, also that each phase's
    last entry matches the checkpoint file there (earlier files were overwritten by later rounds).

    Each checkpoint file is read once with :func:`shared_models.safe_files.read_regular_file`
    (at most ``MAX_CHECKPOINT_BYTES``, refused before reading if larger; a symlink, device or FIFO
    is refused unread).

    Raises:
        ValueError: naming the first entry (phase, round) that does not verify, or the file that
            is missing, too large or not a regular file.
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
            try:  # read once, size-capped, regular file only (never a link to a device)
                data = read_regular_file(path, MAX_CHECKPOINT_BYTES)
            except (FileNotFoundError, UnsafeFileError) as err:
                raise ValueError(
                    f"{path}: cannot be checked against the last {phase} entry (round {entry['round']}) "
                    f"of the chain: {str(err).removeprefix(f'{path}: ')}"
                ) from None
            if hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise ValueError(f"{path}: does not match the last {phase} entry (round {entry['round']}) of the chain")


def previous_path(folder: Path, phase: str) -> Path:
    """Where a save keeps the phase's previous round: ``<folder>/<phase>.prev.pt``."""
    return Path(folder) / f"{phase}.prev.pt"


def read_chain(folder: Path) -> list[dict]:
    """``<folder>/chain.json``, size-capped and checked for shape (not yet for its links); [] if absent.

    Raises:
        CheckpointError: the file is too large, not JSON, or not a list of chain entries.
    """
    path = Path(folder) / "chain.json"
    if not path.exists() and not path.is_symlink():
        return []
    try:
        entries = json.loads(read_regular_file(path, MAX_CHAIN_BYTES))
        if not isinstance(entries, list) or not all(
            isinstance(e, dict)
            and isinstance(e.get("phase"), str)
            and isinstance(e.get("round"), int)
            and isinstance(e.get("sha256"), str)
            and isinstance(e.get("chain"), str)
            for e in entries
        ):
            raise TypeError
    except (UnsafeFileError, ValueError, TypeError) as err:
        detail = str(err) if isinstance(err, UnsafeFileError) else f"{path}: not a list of checkpoint-chain entries"
        raise CheckpointError(
            f"{detail}; no checkpoint can be verified without it (delete the checkpoints folder to start over)"
        ) from None
    return entries


def read_checkpoint(folder: Path, phase: str, *, set_aside_damaged: bool = False) -> PhaseCheckpoint | None:
    """The phase's newest checkpoint file that verifies, or None if the phase has none.

    The chain (``chain.json``) must verify link by link; then ``<phase>.pt``, else
    ``<phase>.prev.pt``, is read once (size-capped, regular file only), its SHA-256 must equal
    one of the phase's chain entries, and it is deserialised from those bytes with
    ``weights_only=True``. Nothing is unpickled before its hash matched.

    Args:
        folder: the run's ``checkpoints`` folder.
        phase: ``"detector"`` or ``"stager"``.
        set_aside_damaged: rename a damaged ``<phase>.pt`` to ``<phase>.pt.damaged`` when an
            older file is used instead (resume does; a status query only reads).

    Returns:
        The checkpoint; None when the phase has none, or only a damaged round 1 (then the phase
        starts again, with a warning).

    Raises:
        CheckpointError: the chain is broken, or files (or chain entries) exist for the phase
            but none verifies; the message names every file and its problem.
    """
    folder = Path(folder)
    entries = read_chain(folder)
    try:
        verify_chain(entries)
    except ValueError as err:
        raise CheckpointError(
            f"{folder / 'chain.json'}: {err}; no checkpoint can be trusted "
            "(delete the checkpoints folder to start over)"
        ) from None
    recorded = {e["sha256"]: e for e in entries if e["phase"] == phase}
    candidates = [p for p in (folder / f"{phase}.pt", previous_path(folder, phase)) if p.exists() or p.is_symlink()]
    if not candidates and not recorded:
        return None
    problems: list[str] = []
    for path in candidates:
        try:
            ckpt = _verified(path, recorded)
        except (CheckpointError, UnsafeFileError, OSError) as err:
            problems.append(str(err))
            continue
        if problems:
            log.warning(
                "%s; using the previous verified %s round %d (%s) instead", problems[0], phase, ckpt.round, path.name
            )
            if set_aside_damaged and candidates[0] != path:
                os.replace(candidates[0], candidates[0].with_name(candidates[0].name + ".damaged"))
        return ckpt
    if not candidates:
        problems.append(
            f"{folder / f'{phase}.pt'}: missing, but chain.json records {phase} rounds "
            f"{sorted(e['round'] for e in recorded.values())}"
        )
    if recorded and max(e["round"] for e in recorded.values()) == 1:
        # only round 1 was ever written: the previous verified state is the phase's start
        log.warning("%s; no earlier %s round was saved: the phase starts again from round 0", problems[0], phase)
        if set_aside_damaged:
            for path in candidates:
                os.replace(path, path.with_name(path.name + ".damaged"))
        return None
    raise CheckpointError(
        f"no {phase} checkpoint verifies: "
        + "; ".join(problems)
        + " (delete the checkpoints folder to start the run over)"
    )


def _verified(path: Path, recorded: dict[str, dict]) -> PhaseCheckpoint:
    data = read_regular_file(path, MAX_CHECKPOINT_BYTES)
    entry = recorded.get(hashlib.sha256(data).hexdigest())
    if entry is None:
        raise CheckpointError(f"{path}: damaged or modified (its SHA-256 is not in chain.json; {len(data)} bytes)")
    fields = load_tensors(data, path)
    known = {f.name for f in dataclasses.fields(PhaseCheckpoint)}
    if not isinstance(fields, dict) or not {"round", "state_dict"} <= set(fields) or set(fields) - known:
        raise CheckpointError(
            f"{path}: not a phase checkpoint (fields {sorted(fields) if isinstance(fields, dict) else type(fields).__name__})"
        )
    ckpt = PhaseCheckpoint(**fields)
    if ckpt.round != entry["round"]:
        raise CheckpointError(f"{path}: holds round {ckpt.round}, but its chain entry says round {entry['round']}")
    return ckpt


def _plain(value, where: str):
    """``value`` as what ``torch.load(weights_only=True)`` reads back: tensors, containers and
    plain scalars (numpy scalars become Python ones).

    Raises:
        TypeError: any other type (it could not be loaded safely), naming where it is.
    """
    if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)):
        return value
    if isinstance(value, dict):
        return {k: _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v, f"{where}[]") for v in value)
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:  # numpy scalar
        return value.item()
    raise TypeError(
        f"checkpoint field {where}: {type(value).__name__} cannot be stored (only tensors and plain values)"
    )
