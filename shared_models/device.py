"""The torch device a site or the ServerApp runs on, from the run config's ``device`` key.

The sites' training loops (:mod:`client.training`) and the ServerApp (which switches PyTorch to its
deterministic algorithms for that device, :func:`shared_models.determinism.configure_determinism`)
choose it the same way.
"""

from __future__ import annotations

import torch


def select_device(preference: str = "auto") -> torch.device:
    """Return ``cuda`` when requested or available (``"auto"``), else ``cpu``.

    Raises:
        ValueError: if ``preference`` is ``"cuda"`` but no CUDA device is present.
    """
    if preference == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False")
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")
