"""Plain local training and evaluation loops for the detector and the stager.

These functions know nothing about Flower: the ClientApp handlers unpack a message,
call them, and pack the reply; the simulation baselines (local-only, pooled) call
them directly. Local work is counted in optimiser steps, not epochs, so sites of
different size do comparable work (FLamby convention).

Recipe (Yang et al., Front. Surg. 2025, section 2.5): focal loss for the stager,
Adam with weight decay, augmentation by random brightness, random flip and Gaussian
noise. FedProx adds ``(mu/2)·||w − w_global||²`` against a detached copy of the
global weights (Li et al. 2020, arXiv:1812.06127, eq. 2).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from shared_models.detector import YOLOX3D, decode_best_box, detector_loss
from shared_models.losses import fedprox_proximal_term, snapshot_params, stage_focal_loss
from shared_models.stages import NUM_STAGES

log = logging.getLogger(__name__)


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


def _autocast(device: torch.device, amp: bool):
    """Mixed precision on CUDA only (bf16/fp16 autocast); a no-op context on CPU."""
    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return contextlib.nullcontext()


@dataclass
class _LocalRun:
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
              proximal_mu: float, seed: int) -> "_LocalRun":
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


def _batches(n: int, batch_size: int, steps: int, rng: np.random.Generator, weights=None):
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


def _augment_intensity(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
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


def train_detector(
    model: YOLOX3D,
    volumes: np.ndarray,
    boxes_voxel: np.ndarray,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    device: torch.device,
    amp: bool = True,
    proximal_mu: float = 0.0,
    seed: int = 0,
) -> dict[str, float]:
    """Train 3DC-YOLOX for ``steps`` optimiser steps on hemi-volumes.

    Args:
        volumes: (N, 1, D, H, W) float32 windowed hemi-volumes in [0, 1].
        boxes_voxel: (N, 6) float32 ground-truth boxes ``(cz, cy, cx, d, h, w)`` in voxels.
        proximal_mu: FedProx ``mu``; 0 disables the proximal term. The reference
            weights are the model's weights on entry (the received global model).

    Augmentation: random flip along H (anterior-posterior; the box centre is mirrored
    consistently), random brightness/contrast and Gaussian noise.

    Returns:
        ``{"train-loss": mean loss over the steps}``.

    Raises:
        ValueError: if there are no training volumes.
    """
    n = len(volumes)
    if n == 0:
        raise ValueError("train_detector: no training volumes")
    run = _LocalRun.start(model, lr=lr, weight_decay=weight_decay, device=device, amp=amp, proximal_mu=proximal_mu, seed=seed)
    h_size = volumes.shape[3]
    losses = []
    for idx in _batches(n, batch_size, steps, run.rng):
        x = torch.from_numpy(volumes[idx]).float()
        y = torch.from_numpy(boxes_voxel[idx]).float().clone()
        flip = torch.rand(len(idx), generator=run.gen) < 0.5
        if flip.any():
            x[flip] = torch.flip(x[flip], dims=[3])
            y[flip, 1] = (h_size - 1) - y[flip, 1]
        x = _augment_intensity(x, run.gen).to(device)
        y = y.to(device)
        with _autocast(device, amp):
            loss, _ = detector_loss(model(x), y, model.cells)
        losses.append(run.step(loss))
    return {"train-loss": float(np.mean(losses))}


@torch.no_grad()
def predict_boxes(
    model: YOLOX3D, volumes: np.ndarray, *, device: torch.device, batch_size: int = 8
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best box per hemi-volume.

    Args:
        volumes: (N, 1, D, H, W) float32.

    Returns:
        ``boxes`` (N, 6) float32 voxels ``(cz, cy, cx, d, h, w)``, ``scores`` (N,) float32,
        ``low_confidence`` (N,) bool (nothing passed the score threshold).
    """
    model.to(device).eval()
    out_b, out_s, out_l = [], [], []
    for start in range(0, len(volumes), batch_size):
        x = torch.from_numpy(volumes[start : start + batch_size]).float().to(device)
        boxes, scores, low = decode_best_box(model(x))
        out_b.append(boxes.float().cpu().numpy())
        out_s.append(scores.float().cpu().numpy())
        out_l.append(low.cpu().numpy())
    if not out_b:
        return np.zeros((0, 6), np.float32), np.zeros(0, np.float32), np.zeros(0, bool)
    return np.concatenate(out_b), np.concatenate(out_s), np.concatenate(out_l)


def train_stager(
    model: nn.Module,
    crops: np.ndarray,
    stages: np.ndarray,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    focal_gamma: float,
    device: torch.device,
    amp: bool = True,
    proximal_mu: float = 0.0,
    class_balanced: bool = True,
    flip_dims: tuple[int, ...] = (4,),
    seed: int = 0,
) -> dict[str, float]:
    """Train 3D-MulDenseNet for ``steps`` optimiser steps on femoral-head crops.

    Args:
        crops: (N, 1, D, H, W) float32 windowed crops in [0, 1].
        stages: (N,) int64 Ficat-Arlet stage indices 0, 1, 2.
        class_balanced: sample heads with probability inversely proportional to the
            stage frequency (the stage imbalance of section 3.1); the focal loss then
            runs unweighted.

    Augmentation: random flips along D/H/W, random brightness/contrast, Gaussian noise.

    Returns:
        ``{"train-loss": mean loss over the steps}``.

    Raises:
        ValueError: if there are no crops or a stage index is outside 0..2.
    """
    n = len(crops)
    if n == 0:
        raise ValueError("train_stager: no training crops")
    if stages.min() < 0 or stages.max() >= NUM_STAGES:
        raise ValueError(f"train_stager: stage indices must be in 0..{NUM_STAGES - 1}")
    run = _LocalRun.start(model, lr=lr, weight_decay=weight_decay, device=device, amp=amp, proximal_mu=proximal_mu, seed=seed)
    criterion = stage_focal_loss(gamma=focal_gamma)
    weights = None
    if class_balanced:
        freq = np.bincount(stages, minlength=NUM_STAGES).astype(np.float64)
        weights = 1.0 / np.maximum(freq[stages], 1.0)
    losses = []
    for idx in _batches(n, batch_size, steps, run.rng, weights=weights):
        x = torch.from_numpy(crops[idx]).float()
        for dim in flip_dims:
            flip = torch.rand(len(idx), generator=run.gen) < 0.5
            if flip.any():
                x[flip] = torch.flip(x[flip], dims=[dim])
        x = _augment_intensity(x, run.gen).to(device)
        y = torch.from_numpy(stages[idx]).long().to(device)
        with _autocast(device, amp):
            logits = model(x)
        loss = criterion(logits.float(), y)
        losses.append(run.step(loss))
    return {"train-loss": float(np.mean(losses))}


@torch.no_grad()
def predict_stages(
    model: nn.Module, crops: np.ndarray, *, device: torch.device, batch_size: int = 16
) -> np.ndarray:
    """Stage probabilities (softmax) for each crop.

    Args:
        crops: (N, 1, D, H, W) float32.

    Returns:
        (N, 3) float32 probabilities for Ficat-Arlet stages 0, I, II.
    """
    model.to(device).eval()
    out = []
    for start in range(0, len(crops), batch_size):
        x = torch.from_numpy(crops[start : start + batch_size]).float().to(device)
        out.append(torch.softmax(model(x).float(), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, NUM_STAGES), np.float32)

