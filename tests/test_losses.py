"""Focal loss factory and FedProx proximal term, checked against values derived by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from monai.losses import FocalLoss

from shared_models.losses import fedprox_proximal_term, snapshot_params, stage_focal_loss


def _focal_by_hand(logits: torch.Tensor, target: torch.Tensor, gamma: float, weights=None) -> float:
    """-(w_t) (1 - p_t)^gamma log p_t per sample, averaged over B * C one-hot entries (MONAI mean)."""
    b, c = logits.shape
    total = 0.0
    for i in range(b):
        z = [float(v) for v in logits[i]]
        m = max(z)
        log_norm = m + math.log(sum(math.exp(v - m) for v in z))
        t = int(target[i])
        log_p = z[t] - log_norm
        w = 1.0 if weights is None else weights[t]
        total += -w * (1.0 - math.exp(log_p)) ** gamma * log_p
    return total / (b * c)


@pytest.mark.parametrize("gamma, weights", [(2.0, None), (0.0, None), (1.5, [0.2, 0.5, 0.3]), (2.0, [1.0, 2.0, 4.0])])
def test_stage_focal_loss_matches_hand_derivation(gamma, weights):
    torch.manual_seed(0)
    logits = torch.randn(6, 3, dtype=torch.float64) * 2
    target = torch.tensor([0, 1, 2, 2, 1, 0])
    loss_fn = stage_focal_loss(weights, gamma=gamma)
    assert isinstance(loss_fn, FocalLoss)
    expected = _focal_by_hand(logits, target, gamma, weights)
    assert loss_fn(logits, target).item() == pytest.approx(expected, rel=1e-6)
    assert loss_fn(logits, target.unsqueeze(1)).item() == pytest.approx(expected, rel=1e-6)


def test_gamma_zero_is_cross_entropy_over_classes():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3]])
    target = torch.tensor([0, 2])
    ce = F.cross_entropy(logits, target)
    assert stage_focal_loss(gamma=0.0)(logits, target).item() == pytest.approx(ce.item() / 3, rel=1e-6)


def test_stage_focal_loss_validation():
    with pytest.raises(ValueError, match="class_weights"):
        stage_focal_loss([1.0, 2.0])
    with pytest.raises(ValueError, match="class_weights"):
        stage_focal_loss([1.0, -2.0, 1.0])
    with pytest.raises(ValueError, match="gamma"):
        stage_focal_loss(gamma=-1.0)


def _model() -> nn.Module:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    model[2].bias.requires_grad_(False)  # frozen parameters are not part of the term
    return model


def test_snapshot_is_detached_clone_of_trainable_params():
    model = _model()
    snap = snapshot_params(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(snap) == len(trainable) == 5
    for s, p in zip(snap, trainable):
        assert torch.equal(s, p) and not s.requires_grad and s.data_ptr() != p.data_ptr()


def test_mu_zero_gives_zero_term_and_identical_gradients():
    model = _model()
    global_params = snapshot_params(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3)
    x = torch.randn(8, 4)
    model.zero_grad()
    model(x).pow(2).mean().backward()
    plain = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad()
    term = fedprox_proximal_term(model, global_params, mu=0.0)
    assert term.item() == 0.0
    (model(x).pow(2).mean() + term).backward()
    for g0, p in zip(plain, [p for p in model.parameters() if p.requires_grad]):
        assert torch.equal(g0, p.grad)


def test_term_value_and_gradient_equal_mu_times_difference():
    model = _model()
    global_params = snapshot_params(model)
    torch.manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    mu = 0.37
    trainable = [p for p in model.parameters() if p.requires_grad]
    # value: (mu / 2) * sum of squared differences, summed independently in float64
    expected = (
        0.5 * mu * sum(float(((p.detach().double() - g.double()) ** 2).sum()) for p, g in zip(trainable, global_params))
    )
    model.zero_grad()
    term = fedprox_proximal_term(model, global_params, mu)
    assert term.item() == pytest.approx(expected, rel=1e-6)
    term.backward()
    for p, g in zip(trainable, global_params):
        torch.testing.assert_close(p.grad, mu * (p.detach() - g), rtol=0, atol=0)
    assert all(g.grad is None for g in global_params)


def test_proximal_term_validation():
    model = _model()
    snap = snapshot_params(model)
    with pytest.raises(ValueError, match="proximal_mu"):
        fedprox_proximal_term(model, snap, -0.1)
    with pytest.raises(ValueError, match="global_params"):
        fedprox_proximal_term(model, snap[:-1], 0.1)
    with pytest.raises(ValueError, match="global_params"):
        fedprox_proximal_term(model, [s.reshape(-1, 1) if s.ndim == 1 else s for s in snap], 0.1)
