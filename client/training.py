"""What the detector and stager local-training loops share: device choice, AMP, the
optimiser with the FedProx term, and seeded batch sampling.

The loops themselves are in :mod:`client.detector_training` and
:mod:`client.stager_training`. They know nothing about Flower: the ClientApp handlers
unpack a message, call them, and pack the reply; the simulation baselines call them
directly. Local work is counted in optimiser steps, not epochs, so sites of different
size do comparable work (FLamby convention).

FedProx adds ``(mu/2)·||w − w_global||²`` against a detached copy of the global
weights (Li et al. 2020, arXiv:1812.06127, eq. 2).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from shared_models.losses import fedprox_proximal_term, snapshot_params


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


def autocast(device: torch.device, amp: bool):
    """Mixed precision on CUDA only (bf16/fp16 autocast); a no-op context on CPU."""
    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


@dataclass
class LocalRun:
    """What one round of local training shares between the detector and the stager loops:
    Adam with weight decay, an AMP grad scaler (CUDA only), the FedProx reference weights
    and the seeded random streams."""

    model: nn.Module
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    global_params: list[torch.Tensor] | None
    proximal_mu: float
    rng: np.random.Generator
    gen: torch.Generator

    @classmethod
    def start(cls, model: nn.Module, *, lr: float, weight_decay: float, device: torch.device, amp: bool,
              proximal_mu: float, seed: int) -> "LocalRun":
        model.to(device).train()
        return cls(
            model=model,
            opt=torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay),
            scaler=torch.amp.GradScaler("cuda", enabled=amp and device.type == "cuda"),
            global_params=snapshot_params(model) if proximal_mu > 0 else None,
            proximal_mu=proximal_mu,
            rng=np.random.default_rng(seed),
            gen=torch.Generator().manual_seed(seed),
        )

    def step(self, loss: torch.Tensor) -> float:
        """Add the FedProx term (when mu > 0), take one optimiser step; returns the total loss."""
        if self.global_params is not None:
            loss = loss + fedprox_proximal_term(self.model, self.global_params, self.proximal_mu)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        return float(loss.detach())


def batches(n: int, batch_size: int, steps: int, rng: np.random.Generator, weights=None):
    """Yield ``steps`` index batches, reshuffling each pass (or sampling by ``weights``)."""
    if weights is not None:
        p = np.asarray(weights, dtype=np.float64)
        p = p / p.sum()
        for _ in range(steps):
            yield rng.choice(n, size=min(batch_size, n), replace=True, p=p)
        return
    order = rng.permutation(n)
    pos = 0
    for _ in range(steps):
        if pos + batch_size > n:
            order, pos = rng.permutation(n), 0
        yield order[pos : pos + batch_size]
        pos += batch_size
