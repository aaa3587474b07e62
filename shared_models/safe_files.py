"""Files read as hostile, and local paths kept out of everything a run stores or ships.

Three rules (issue 16, "nothing executes from a file", "no local paths leave the machine"):

- :func:`read_regular_file` reads a file **once**, size-capped before reading: it refuses
  symlinks, device files, FIFOs and anything else that is not a regular file, and anything that
  resolves outside an optional ``root`` folder. The caller hashes and deserialises the bytes it
  returns, so what was verified is what is loaded (no time-of-check/time-of-use gap).
- :func:`load_tensors` deserialises those bytes with ``torch.load(weights_only=True)``: tensors,
  dicts, lists and plain scalars only, never an arbitrary pickle (``__reduce__`` does not run).
- :func:`redact_paths` removes local filesystem paths from a run config before it is written
  to a checkpoint or a bundle.

Written by hand because neither the standard library nor PyTorch offers a bounded,
no-follow, regular-file-only read; each step is a documented POSIX call (``O_NOFOLLOW``,
``fstat``).
"""

from __future__ import annotations

import io
import os
import stat
import zipfile
from collections.abc import Mapping
from pathlib import Path, PurePosixPath, PureWindowsPath

import torch

# Run-config keys that hold a path on the machine that runs the command (``pyproject.toml``
# [tool.flwr.app.config]). Their values never go into a checkpoint or a bundle.
# tracking-uri (issue 21): a SQLite store or TensorBoard folder is a local path, a server URL is local infrastructure
PATH_KEYS = frozenset({"data-root", "cache-dir", "out-dir", "signing-key", "tracking-uri"})


class UnsafeFileError(ValueError):
    """A file that must not be read: not a regular file, outside its folder, too large, or not
    plain tensors. The message names the file and the problem."""


def read_regular_file(path: Path, max_bytes: int, *, root: Path | None = None) -> bytes:
    """The bytes of the regular file ``path``, read once, at most ``max_bytes``.

    Args:
        path: the file.
        max_bytes: refuse a larger file before reading it (and stop reading past it, should
            the file grow while it is read).
        root: if given, ``path`` must lie inside this folder once resolved, and must not be a
            symlink.

    Raises:
        UnsafeFileError: ``path`` is a symlink, a device, a FIFO, a folder, lies outside
            ``root`` or is larger than ``max_bytes``.
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    if root is not None:
        base = Path(root).resolve()
        if not path.resolve().is_relative_to(base):
            raise UnsafeFileError(f"{path}: lies outside {base}")
    try:
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
        fd = os.open(path, flags)  # O_NONBLOCK: opening a FIFO must not wait for a writer
    except OSError as err:
        if isinstance(err, FileNotFoundError):
            raise FileNotFoundError(f"{path}: no such file") from None
        if path.is_symlink():
            raise UnsafeFileError(f"{path}: is a symlink; only regular files are read") from None
        raise UnsafeFileError(f"{path}: cannot be opened ({err.strerror})") from None
    info = os.fstat(fd)  # of what was opened, not of what the name points to now
    if not stat.S_ISREG(info.st_mode) or info.st_size > max_bytes:
        os.close(fd)
        if not stat.S_ISREG(info.st_mode):
            raise UnsafeFileError(f"{path}: not a regular file (device, FIFO, socket or folder); refused")
        raise UnsafeFileError(f"{path}: {info.st_size} bytes, more than the {max_bytes} allowed")
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise UnsafeFileError(f"{path}: grew past the {max_bytes} bytes allowed while being read")
    return data


def _check_archive(data: bytes, name: str | Path) -> None:
    """Refuse a ``torch.save`` zip archive that would decode to more than it holds.

    ``torch.save`` stores its entries uncompressed, so every entry must be STORED and the declared
    sizes must add up to no more than the bytes read: a deflated entry (a zip bomb) is refused
    before anything is inflated. Bytes that are not a zip archive are left to ``torch.load``,
    which refuses them.
    """
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
    except zipfile.BadZipFile:
        return
    packed = [i.filename for i in infos if i.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise UnsafeFileError(
            f"{name}: compressed entries in a tensor file (torch.save stores them uncompressed): "
            f"{', '.join(sorted(packed)[:3])}"
        )
    declared = sum(i.file_size for i in infos)
    if declared > len(data):
        raise UnsafeFileError(f"{name}: entries declare {declared} bytes in a {len(data)}-byte file")


def load_tensors(data: bytes, name: str | Path):
    """Deserialise ``torch.save`` bytes with ``weights_only=True`` onto the CPU.

    Args:
        data: the bytes (from :func:`read_regular_file`).
        name: the file they came from, for the error message.

    Returns:
        What was saved: tensors, dicts, lists, tuples, str, int, float, bool, None.

    Raises:
        UnsafeFileError: the bytes are not a readable ``torch.save`` archive, or hold anything
            other than plain tensors and containers (for example a pickle with ``__reduce__``).
    """
    _check_archive(data, name)
    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsafeFileError(
            f"{name}: not a plain tensor file (damaged, truncated, or holds code): {first[:300]}"
        ) from None


def looks_like_path(value: object) -> bool:
    """True for a string that is an absolute POSIX or Windows path, or starts with ``~``."""
    if not isinstance(value, str) or not value:
        return False
    return value.startswith("~") or PurePosixPath(value).is_absolute() or PureWindowsPath(value).is_absolute()


def redact_paths(run_config: Mapping[str, object]) -> dict[str, object]:
    """A copy of ``run_config`` without local paths: every :data:`PATH_KEYS` value and any other
    value that :func:`looks_like_path` becomes ``""`` (the ``pyproject.toml`` default of the path
    keys: "not set")."""
    return {k: ("" if k in PATH_KEYS or looks_like_path(v) else v) for k, v in run_config.items()}
