"""State-dict helpers shared by sites and server (pure torch; no Flower).

FedBN (Li et al. 2021, "FedBN: Federated Learning on Non-IID Features via Local
Batch Normalization", arXiv:2102.07623) keeps normalisation layers local. Which
entries those are is decided by **layer type**, never by parameter name.
"""

from __future__ import annotations

import hashlib

import torch
from torch import nn

NORM_LAYER_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*d and InstanceNorm*d
    nn.GroupNorm,
    nn.LayerNorm,
)


def norm_state_keys(model: nn.Module) -> set[str]:
    """State-dict keys (parameters and buffers) that belong to normalisation layers.

    Returns:
        Keys such as ``"features.norm0.running_mean"`` for every module that is an
        instance of :data:`NORM_LAYER_TYPES`, including integer buffers
        (``num_batches_tracked``).
    """
    keys: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, NORM_LAYER_TYPES):
            prefix = f"{name}." if name else ""
            keys.update(prefix + k for k in module.state_dict(keep_vars=True))
    return keys


def state_dict_sha256(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes of a state dict (hex, 64 chars)."""
    digest = hashlib.sha256()
    for key in sorted(state_dict):
        tensor = state_dict[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()
