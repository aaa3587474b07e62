"""Training-time augmentation (paper section 2.5: random brightness, flip, Gaussian noise)."""

from __future__ import annotations

import torch


def augment_intensity(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random brightness/contrast and Gaussian noise per sample (paper section 2.5).

    ``x``: (B, 1, D, H, W) float32 in [0, 1]; returns the same shape, clipped to [0, 1].
    """
    b = x.shape[0]
    shape = (b,) + (1,) * (x.dim() - 1)
    scale = 1.0 + 0.2 * (torch.rand(shape, generator=gen, device="cpu") - 0.5)
    shift = 0.1 * (torch.rand(shape, generator=gen, device="cpu") - 0.5)
    sigma = 0.03 * torch.rand(shape, generator=gen, device="cpu")
    noise = torch.randn(x.shape, generator=gen, device="cpu") * sigma
    return (x * scale.to(x.device) + shift.to(x.device) + noise.to(x.device)).clamp_(0.0, 1.0)
