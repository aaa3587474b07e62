"""Losses shared by the site trainer: the stager's focal loss and the FedProx proximal term.

Sources:
    * Focal loss: Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017 (arXiv:1708.02002),
      used for the staging subnet in Yang et al., Front. Surg. 2025, section 2.5. Implemented by
      MONAI ``FocalLoss``.
    * FedProx: Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020
      (arXiv:1812.06127), eq. (2): the local objective is ``F_k(w) + (mu/2) ||w - w^t||^2``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
import torch.nn as nn
from monai.losses import FocalLoss

from shared_models.stages import NUM_STAGES

__all__ = ["stage_focal_loss", "snapshot_params", "fedprox_proximal_term"]

logger = logging.getLogger(__name__)


def stage_focal_loss(class_weights: Sequence[float] | None = None, gamma: float = 2.0) -> FocalLoss:
    """Softmax focal loss for the 3-class stager (paper section 2.5; arXiv:1708.02002).

    A MONAI ``FocalLoss(use_softmax=True, to_onehot_y=True, include_background=True,
    weight=class_weights, gamma=gamma, reduction="mean")``. Call it as ``loss(logits, target)``
    with ``logits`` ``(B, 3)`` float and ``target`` ``(B,)`` or ``(B, 1)`` integer class indices
    (``FicatArletStage``). Per sample ``FL = -w_t (1 - p_t)^gamma log p_t`` with ``p_t`` the softmax
    probability of the true class.

    Note MONAI's ``"mean"`` averages over all ``B * 3`` one-hot entries, of which only the true
    class is non-zero, so the value is ``mean_b(FL_b) / 3`` (a constant factor; the gradient
    direction is unchanged). ``gamma = 0`` and no weights gives cross-entropy / 3.

    Args:
        class_weights: optional non-negative weight per class (length 3), e.g. inverse class
            frequency; applied as MONAI's ``weight`` (per-class multiplier, the alpha_t of the paper).
        gamma: focusing parameter, ``>= 0``.

    Raises:
        ValueError: wrong number of weights, negative/non-finite weights, or bad ``gamma``.
    """
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"gamma: expected a finite number >= 0, got {gamma!r}")
    weight = None
    if class_weights is not None:
        weight = [float(w) for w in class_weights]
        if len(weight) != NUM_STAGES:
            raise ValueError(f"class_weights: expected {NUM_STAGES} values (stages 0, I, II), got {len(weight)}")
        if any(not math.isfinite(w) or w < 0 for w in weight):
            raise ValueError(f"class_weights: values must be finite and >= 0, got {weight}")
    return FocalLoss(
        include_background=True,
        to_onehot_y=True,
        gamma=float(gamma),
        weight=weight,
        reduction="mean",
        use_softmax=True,
    )


def _trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def snapshot_params(model: nn.Module) -> list[torch.Tensor]:
    """Detached clones of the trainable parameters (``requires_grad``), in ``parameters()`` order.

    Take it right after loading the global weights; it is the ``w^t`` of FedProx eq. (2).
    """
    return [p.detach().clone() for p in _trainable(model)]


def fedprox_proximal_term(model: nn.Module, global_params: Sequence[torch.Tensor], mu: float) -> torch.Tensor:
    """FedProx proximal term ``(mu / 2) * sum_i ||w_i - w_i^global||^2`` (arXiv:1812.06127, eq. 2).

    Sums over the trainable parameters of ``model`` (``requires_grad``, ``parameters()`` order;
    buffers such as BatchNorm statistics are not parameters and are excluded). The global
    parameters are detached, so the gradient w.r.t. ``w`` is ``mu * (w - w^global)``. Computed in
    float32 (AMP-safe).

    Args:
        model: the local model being trained.
        global_params: output of :func:`snapshot_params` taken from the global model.
        mu: proximal coefficient ``>= 0``; ``0`` returns a zero scalar without a graph.

    Returns:
        Scalar float32 tensor on the parameters' device, to be added to the task loss.

    Raises:
        ValueError: negative/non-finite ``mu``, or ``global_params`` not matching the trainable
            parameters in number or shapes.
    """
    if isinstance(mu, bool) or not isinstance(mu, (int, float)) or not math.isfinite(mu) or mu < 0:
        raise ValueError(f"proximal_mu: expected a finite number >= 0, got {mu!r}")
    params = _trainable(model)
    if len(params) != len(global_params):
        raise ValueError(
            f"global_params: expected {len(params)} tensors (trainable parameters), got {len(global_params)}"
        )
    device = params[0].device if params else torch.device("cpu")
    if mu == 0 or not params:
        return torch.zeros((), dtype=torch.float32, device=device)
    total = torch.zeros((), dtype=torch.float32, device=device)
    for i, (w, g) in enumerate(zip(params, global_params)):
        if w.shape != g.shape:
            raise ValueError(f"global_params[{i}]: shape {tuple(g.shape)} != parameter shape {tuple(w.shape)}")
        diff = w.float() - g.detach().to(device=w.device, dtype=torch.float32)
        total = total + (diff * diff).sum()
    return (float(mu) / 2.0) * total
