"""The audit anchors' file format, read by the ServerApp (to keep them across a resume) and by a site
(``onfh site verify-audit``): ``{"audit_anchors": {site: [anchor, ...]}}`` inside ``audit-anchors.json``,
``report.json`` or a bundle's ``metrics.json``. :mod:`server.audit_anchors` writes it; the anchors
themselves are described in :mod:`client.audit`.
"""

from __future__ import annotations

import json
from pathlib import Path

from shared_models.safe_files import read_regular_file

# Cap checked before reading: a report.json with every round's metrics is well under a few MB.
MAX_ANCHORS_FILE_BYTES = 64 << 20


def load_anchors(path: Path) -> dict[str, list[dict]]:
    """The ``audit_anchors`` (written by :mod:`server.audit_anchors`) of a run folder's
    ``audit-anchors.json``, a ``report.json`` or a bundle's ``metrics.json`` ({} when ``path`` does not exist).

    The file is read once, at most ``MAX_ANCHORS_FILE_BYTES`` (refused unread if larger, a
    symlink or not a regular file).

    Raises:
        ValueError: the file is not JSON, has no well-formed ``audit_anchors``, is too large or
            is not a regular file (names the file).
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return {}
    data = read_regular_file(path, MAX_ANCHORS_FILE_BYTES)  # UnsafeFileError (a ValueError) names the file
    try:
        anchors = json.loads(data).get("audit_anchors")
    except (ValueError, AttributeError):
        raise ValueError(f"{path}: not a JSON object with 'audit_anchors'") from None
    if not isinstance(anchors, dict) or not all(isinstance(v, list) for v in anchors.values()):
        raise ValueError(f"{path}: 'audit_anchors' must map each site to a list of anchors")
    return anchors
