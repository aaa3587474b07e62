"""Local training and prediction loops for 3DC-YOLOX (the femoral head detector).

Recipe: YOLOX (Ge et al. 2021, arXiv:2107.08430) with Adam and weight decay as in
Yang et al., Front. Surg. 2025, section 2.5.
"""

from __future__ import annotations

import numpy as np
import torch

from client.augmentation import augment_detector_batch
from client.training import LocalRun, autocast, batches, make_lr_scheduler, mean_loss, resident, take, to_device
from shared_models.detection import YOLOX3D, decode_best_box, detector_loss
from shared_models.specs import TRAIN_LOSS


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
    l1_weight: float = 0.0,
    step_offset: int = 0,
    total_steps: int | None = None,
    warmup_steps: int = 0,
    channels_last: bool = False,
) -> dict[str, float]:
    """Train 3DC-YOLOX for ``steps`` optimiser steps on hemi-volumes.

    Args:
        volumes: (N, 1, D, H, W) float32 windowed hemi-volumes in [0, 1].
        boxes_voxel: (N, 6) float32 ground-truth boxes ``(cz, cy, cx, d, h, w)`` in voxels.
        proximal_mu: FedProx ``mu``; 0 disables the proximal term. The reference
            weights are the model's weights on entry (the received global model).
        seed: seeds batch order (``LocalRun.rng``) and augmentation (``LocalRun.gen``);
            the same seed, weights and data give the same result on CPU.
        l1_weight: weight of the L1 box loss in :func:`detector_loss` (``>= 0``); YOLOX
            (arXiv:2107.08430, section 2.2) turns it on for the last epochs only.
        step_offset, total_steps, warmup_steps: the learning-rate schedule over the global
            step count (linear warm-up, then cosine decay to 0 at ``total_steps``; ``None``:
            constant), continued across federated rounds; see
            :func:`client.training.lr_factor`.
        channels_last: model and batches in ``torch.channels_last_3d`` (off by default: not yet
            measured to help the detector, issue 19); the weights return in the contiguous layout.

    Augmentation (paper section 2.5 plus YOLOX's random affine), per batch by
    :func:`client.augmentation.augment_detector_batch`: random flips along D, H and W,
    a random isotropic zoom (+/- 10 %) and shift (+/- 3 voxels) moving image and box together,
    random brightness/contrast and Gaussian noise. It runs on ``device``: the site's volumes are
    copied there once for the round (:func:`client.training.resident`), each batch is gathered,
    resampled and noised there (noise from a seeded generator on the device); only the boxes (six
    numbers a volume) are augmented on the host and copied without waiting. The loss is read once, at
    the end (:func:`client.training.mean_loss`), not every step.

    Returns:
        ``{"train-loss": mean loss over the steps}``.

    Raises:
        ValueError: if there are no training volumes, or ``l1_weight < 0``.
    """
    n = len(volumes)
    if n == 0:
        raise ValueError("train_detector: no training volumes")
    if not l1_weight >= 0:
        raise ValueError(f"train_detector: l1_weight must be >= 0, got {l1_weight}")
    layout = torch.channels_last_3d if channels_last else torch.contiguous_format
    model.to(device, memory_format=layout)
    run = LocalRun.start(
        model, lr=lr, weight_decay=weight_decay, device=device, amp=amp, proximal_mu=proximal_mu, seed=seed
    )
    scheduler = make_lr_scheduler(run.opt, step_offset=step_offset, warmup_steps=warmup_steps, total_steps=total_steps)
    data = resident(volumes, device)
    boxes = torch.as_tensor(np.asarray(boxes_voxel, np.float32))  # host: MONAI's box ops are cheap there
    losses = []
    for idx in batches(n, batch_size, steps, run.rng):
        x, y = augment_detector_batch(take(data, idx), boxes[torch.from_numpy(np.asarray(idx, np.int64))], run.gen)
        x, y = x.contiguous(memory_format=layout), to_device(y, device)
        with autocast(device, amp):
            loss, _ = detector_loss(model(x), y, model.cells, l1_weight=l1_weight)
        losses.append(run.step(loss))
        scheduler.step()
    if channels_last:
        model.to(memory_format=torch.contiguous_format)
    return {TRAIN_LOSS: mean_loss(losses)}


@torch.no_grad()
def predict_boxes(
    model: YOLOX3D, volumes: np.ndarray, *, device: torch.device, batch_size: int = 8
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Best box per hemi-volume.

    Args:
        volumes: (N, 1, D, H, W) float32.

    Returns:
        ``boxes`` (N, 6) float32 voxels ``(cz, cy, cx, d, h, w)``, ``scores`` (N,) float32,
        ``low_confidence`` (N,) bool: False here (``decode_best_box`` without a score threshold or
        clipping); the validation-calibrated detector threshold is applied at inference.
    """
    model.to(device).eval()
    out_b, out_s, out_l = [], [], []
    for start in range(0, len(volumes), batch_size):
        x = to_device(torch.from_numpy(volumes[start : start + batch_size]).float(), device)
        boxes, scores, low = decode_best_box(model(x))
        out_b.append(boxes.float().cpu().numpy())
        out_s.append(scores.float().cpu().numpy())
        out_l.append(low.cpu().numpy())
    if not out_b:
        return np.zeros((0, 6), np.float32), np.zeros(0, np.float32), np.zeros(0, bool)
    return np.concatenate(out_b), np.concatenate(out_s), np.concatenate(out_l)
