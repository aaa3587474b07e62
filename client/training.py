"""What the detector and stager local-training loops share: AMP, device copies, the
optimiser with the FedProx term, and seeded batch sampling.

The loops themselves are in :mod:`client.detector_training` and
:mod:`client.stager_training`. They know nothing about Flower: the ClientApp handlers
unpack a message, call them, and pack the reply; the simulation baselines call them
directly. Local work is counted in optimiser steps, not epochs, so sites of different
size do comparable work (FLamby convention).

The learning-rate schedule runs over the *global* step count: linear warm-up, then
cosine decay (Goyal et al. 2017, arXiv:1706.02677, section 2.2; Loshchilov & Hutter
2017, arXiv:1608.03983, eq. 5 without restarts). A federated round ``r`` (1-based) with
``L`` local steps passes ``step_offset=(r - 1) * L`` and ``total_steps=rounds * L``, so
the schedule continues across rounds although each round builds a fresh optimiser.

FedProx adds ``(mu/2)·||w − w_global||²`` against a detached copy of the global
weights (Li et al. 2020, arXiv:1812.06127, eq. 2).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from shared_models.losses import fedprox_proximal_term, snapshot_params


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype on ``device``: bfloat16 where the GPU supports it (Ampere and later: float32's
    range, no loss scaling), else float16; None on CPU, where autocast is off."""
    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, amp: bool):
    """Mixed precision on CUDA only (:func:`amp_dtype`); a no-op context on CPU."""
    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=amp_dtype(device))
    return contextlib.nullcontext()


def to_device(x: torch.Tensor, device: torch.device, **kwargs) -> torch.Tensor:
    """Copy a CPU batch to ``device``: through pinned memory with a non-blocking copy on CUDA, so the
    copy overlaps the previous step's kernels (and the host does not wait for the GPU); a plain move
    on CPU or for a tensor already on a GPU. ``kwargs`` go to ``Tensor.to`` (e.g. ``memory_format``)."""
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True, **kwargs)
    return x.to(device, **kwargs)


def resident(array: np.ndarray, device: torch.device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A site's whole training array on ``device`` for the round: copied once, so each step only
    gathers its batch there (:func:`take`). On CPU it shares the array's memory when the dtype matches.

    Args:
        array: ``(N, ...)`` numpy array (e.g. ``(N, 1, D, H, W)`` float32 volumes or ``(N,)`` labels).
    """
    return to_device(torch.as_tensor(np.ascontiguousarray(array)), device, dtype=dtype)


def take(data: torch.Tensor, idx: np.ndarray) -> torch.Tensor:
    """The rows ``idx`` (numpy integer indices) of ``data``, gathered on ``data``'s device (a new tensor)."""
    return data.index_select(0, to_device(torch.from_numpy(np.asarray(idx, np.int64)), data.device))


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
    def start(
        cls,
        model: nn.Module,
        *,
        lr: float,
        weight_decay: float,
        device: torch.device,
        amp: bool,
        proximal_mu: float,
        seed: int,
    ) -> LocalRun:
        model.to(device).train()
        return cls(
            model=model,
            opt=torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay),
            # loss scaling only for float16: bfloat16 has float32's exponent range
            scaler=torch.amp.GradScaler("cuda", enabled=amp and amp_dtype(device) == torch.float16),
            global_params=snapshot_params(model) if proximal_mu > 0 else None,
            proximal_mu=proximal_mu,
            rng=np.random.default_rng(seed),
            gen=torch.Generator().manual_seed(seed),
        )

    def step(self, loss: torch.Tensor) -> torch.Tensor:
        """Add the FedProx term (when mu > 0), take one optimiser step; returns the total loss, detached,
        as a 0-d tensor on the training device (no ``float()`` here: reading it would make the host wait
        for the GPU every step; :func:`mean_loss` reads them once at the end)."""
        if self.global_params is not None:
            loss = loss + fedprox_proximal_term(self.model, self.global_params, self.proximal_mu)
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        return loss.detach()


def mean_loss(losses: list[torch.Tensor]) -> float:
    """Mean of per-step losses (0-d tensors from :meth:`LocalRun.step`) in float64; 0.0 for none."""
    return float(torch.stack([v.reshape(()) for v in losses]).double().mean()) if losses else 0.0


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


def lr_factor(global_step: int, *, warmup_steps: int = 0, total_steps: int | None = None) -> float:
    """Multiplier of the base learning rate at optimiser step ``global_step`` (0-based).

    * warm-up, ``global_step < warmup_steps``: ``(global_step + 1) / warmup_steps``
      (linear, reaching 1 at the last warm-up step; Goyal et al. 2017, arXiv:1706.02677);
    * then, if ``total_steps`` is given: ``0.5 * (1 + cos(pi * t))`` with
      ``t = min(1, (global_step - warmup_steps) / max(1, total_steps - warmup_steps))``
      (cosine decay to 0, SGDR eq. 5 without restarts, arXiv:1608.03983);
    * otherwise 1 (constant learning rate; the default, as before the schedule existed).

    Steps past ``total_steps`` stay at 0 (``t`` is clipped to 1).

    Raises:
        ValueError: negative ``global_step``/``warmup_steps``, or ``total_steps`` < ``warmup_steps``.
    """
    if global_step < 0 or warmup_steps < 0:
        raise ValueError(f"lr_factor: global_step ({global_step}) and warmup_steps ({warmup_steps}) must be >= 0")
    if total_steps is not None and total_steps < warmup_steps:
        raise ValueError(f"lr_factor: total_steps ({total_steps}) must be >= warmup_steps ({warmup_steps})")
    if global_step < warmup_steps:
        return (global_step + 1) / warmup_steps
    if total_steps is None:
        return 1.0
    t = min(1.0, (global_step - warmup_steps) / max(1, total_steps - warmup_steps))
    return 0.5 * (1.0 + math.cos(math.pi * t))


def make_lr_scheduler(
    optimizer: torch.optim.Optimizer, *, step_offset: int = 0, warmup_steps: int = 0, total_steps: int | None = None
) -> LambdaLR:
    """A ``torch.optim.lr_scheduler.LambdaLR`` following :func:`lr_factor` from global step ``step_offset``.

    Call ``scheduler.step()`` after every ``optimizer.step()``. The optimiser's learning
    rate is ``base_lr * lr_factor(step_offset + k)`` during its ``k``-th local step.

    Raises:
        ValueError: as :func:`lr_factor`, or a negative ``step_offset``.
    """
    if step_offset < 0:
        raise ValueError(f"step_offset must be >= 0, got {step_offset}")
    lr_factor(step_offset, warmup_steps=warmup_steps, total_steps=total_steps)  # validate now, not at first step
    return LambdaLR(optimizer, lambda k: lr_factor(step_offset + k, warmup_steps=warmup_steps, total_steps=total_steps))
