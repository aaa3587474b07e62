"""Local training and prediction loops for 3D-MulDenseNet (the Ficat-Arlet stager).

Recipe (Yang et al., Front. Surg. 2025, doi:10.3389/fsurg.2025.1555749, section 2.5):
focal loss, Adam with weight decay, augmentation by random brightness, random flip and
Gaussian noise. Added here, because federated runs are long and the paper's learning
rate (1e-2) is high for a freshly initialised network:

* **learning-rate schedule** over the *global* step count: linear warm-up, then cosine
  decay (Goyal et al. 2017, arXiv:1706.02677, section 2.2, for the warm-up; Loshchilov &
  Hutter 2017, arXiv:1608.03983, eq. 5 without restarts, for the cosine). A federated
  round ``r`` (1-based) with ``L`` local steps passes ``step_offset=(r - 1) * L`` and
  ``total_steps=rounds * L``, so the schedule continues across rounds although each
  round builds a fresh optimiser (see :func:`lr_factor`);
* **channels-last 3D** memory layout (``torch.channels_last_3d``) for model and inputs,
  on CUDA only (cuDNN's fast 3D paths; on CPU it is slower, so it is not used there);
  mixed precision comes from :func:`client.training.autocast` (CUDA only);
* **centralised fitting** with periodic validation AUC and early stopping
  (:func:`fit_stager_central`), used by the pooled baselines and the MedMNIST benchmark.

The number of classes is the model's output width: 3 for the Ficat-Arlet stager,
2 for binary tasks such as AdrenalMNIST3D.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from monai.utils import set_determinism
from sklearn.metrics import roc_auc_score
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from client.augmentation import augment_intensity
from client.training import (
    LocalRun,
    autocast,
    batches,
    lr_factor,
    make_lr_scheduler,
    mean_loss,
    resident,
    take,
    to_device,
)
from shared_models.losses import stage_focal_loss
from shared_models.specs import TRAIN_LOSS
from shared_models.stages import NUM_STAGES

log = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

__all__ = [
    "lr_factor",
    "make_lr_scheduler",
    "num_classes_of",
    "class_balanced_weights",
    "macro_auc",
    "train_stager",
    "predict_stages",
    "fit_stager_central",
]


# ----------------------------------------------------------------------------- helpers


def num_classes_of(model: nn.Module) -> int:
    """Number of classes the model predicts: ``model.config.out_channels`` (MulDenseNet3D), else the
    ``out_features`` of its last ``nn.Linear``, else 3 (Ficat-Arlet stages)."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "out_channels"):
        return int(config.out_channels)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return int(linears[-1].out_features) if linears else NUM_STAGES


def _check_labels(labels: np.ndarray, num_classes: int, who: str) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"{who}: labels must have shape (N,), got {labels.shape}")
    labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{who}: class indices must be in 0..{num_classes - 1} (the model's output width)")
    return labels


def class_balanced_weights(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Per-sample sampling weights ``1 / count(class of sample)``, so every present class is drawn
    equally often in expectation (the stage imbalance of the paper's section 3.1).

    Args:
        labels: (N,) integer class indices in ``0..num_classes-1``.

    Returns:
        (N,) float64 weights (unnormalised; :func:`client.training.batches` normalises them).
    """
    freq = np.bincount(np.asarray(labels, np.int64), minlength=num_classes).astype(np.float64)
    return 1.0 / np.maximum(freq[labels], 1.0)


def macro_auc(labels: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC with scikit-learn: binary AUC of class 1 for 2 classes, else one-vs-rest macro AUC.

    Args:
        labels: (N,) integer class indices.
        probs: (N, K) float class probabilities (rows sum to 1).

    Returns:
        The AUC in [0, 1], or NaN when fewer than two classes are present in ``labels``.
    """
    labels = np.asarray(labels, np.int64)
    probs = np.asarray(probs, np.float64)
    if len(np.unique(labels)) < 2:
        return math.nan
    if probs.shape[1] == 2:
        return float(roc_auc_score(labels, probs[:, 1]))
    present = np.unique(labels)
    if len(present) < probs.shape[1]:  # sklearn's multi-class AUC needs every column's class present
        return float(np.mean([roc_auc_score(labels == k, probs[:, k]) for k in present]))
    return float(roc_auc_score(labels, probs, multi_class="ovr", average="macro", labels=list(range(probs.shape[1]))))


def _channels_last(device: torch.device, channels_last: bool | None) -> bool:
    """The stager's layout: ``channels_last`` when given, else channels-last 3D on CUDA only."""
    return device.type == "cuda" if channels_last is None else bool(channels_last)


def _to_device(x: torch.Tensor, device: torch.device, channels_last: bool | None = None) -> torch.Tensor:
    """Move a (B, C, D, H, W) batch to ``device`` (if not there yet), channels-last 3D per :func:`_channels_last`."""
    x = to_device(x, device)
    return x.contiguous(memory_format=torch.channels_last_3d) if _channels_last(device, channels_last) else x


def _prepare_model(model: nn.Module, device: torch.device, channels_last: bool | None = None) -> None:
    if _channels_last(device, channels_last):
        model.to(device, memory_format=torch.channels_last_3d)
    else:
        model.to(device)


def _release_model(model: nn.Module) -> None:
    """Back to contiguous (NCDHW) weights so that state dicts serialise as plain C-ordered arrays."""
    model.to(memory_format=torch.contiguous_format)


def _augment(x: torch.Tensor, gen: torch.Generator, flip_dims: tuple[int, ...], intensity: bool) -> torch.Tensor:
    """Random flips (each sample, each axis in ``flip_dims``, p = 0.5) then random brightness/noise, on
    ``x``'s device. The flips are drawn from ``gen`` on the host and applied to the whole batch at once,
    ``torch.where(flip, x.flip(dim), x)`` (``torch.flip`` is what MONAI ``Flip`` does to each sample): no
    indexing that depends on the draw, so nothing waits for the GPU."""
    for dim in flip_dims:
        flip = torch.rand(len(x), generator=gen) < 0.5
        x = torch.where(to_device(flip.view(-1, *([1] * (x.ndim - 1))), x.device), x.flip(dim), x)
    return augment_intensity(x, gen) if intensity else x


def _train_steps(
    run: LocalRun,
    scheduler: LambdaLR,
    crops: np.ndarray,
    labels: np.ndarray,
    index_batches: Iterator[np.ndarray],
    *,
    criterion: Callable,
    device: torch.device,
    amp: bool,
    flip_dims: tuple[int, ...],
    intensity_aug: bool,
    channels_last: bool | None = None,
) -> Iterator[torch.Tensor]:
    """One optimiser step per index batch; yields the step's total loss (focal + proximal) as a 0-d
    tensor on ``device``. The crops and labels are copied to ``device`` once (:func:`resident`); each
    batch is gathered and augmented there."""
    data, targets = resident(crops, device), resident(labels, device, torch.long)
    for idx in index_batches:
        x = _to_device(_augment(take(data, idx), run.gen, flip_dims, intensity_aug), device, channels_last)
        y = take(targets, idx)
        with autocast(device, amp):
            logits = run.model(x)
        loss = criterion(logits.float(), y)
        value = run.step(loss)
        scheduler.step()
        yield value


# ----------------------------------------------------------------------------- federated / local


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
    step_offset: int = 0,
    total_steps: int | None = None,
    warmup_steps: int = 0,
    intensity_aug: bool = True,
    channels_last: bool | None = None,
) -> dict[str, float]:
    """Train the stager for ``steps`` optimiser steps (one local round or one chunk of central training).

    Args:
        model: a classifier ``(B, 1, D, H, W) -> (B, K)`` logits, e.g. ``MulDenseNet3D``; K from
            :func:`num_classes_of`. Trained in place, on ``device``.
        crops: (N, 1, D, H, W) float32 crops in [0, 1] (windowed MRI, or MedMNIST volumes).
        stages: (N,) int64 class indices in ``0..K-1`` (Ficat-Arlet 0, I, II for the stager).
        steps: optimiser steps (local work is counted in steps, FLamby convention).
        batch_size: volumes per step.
        lr: base learning rate of Adam; the schedule multiplies it by :func:`lr_factor`.
        weight_decay: Adam weight decay (L2, paper section 2.5).
        focal_gamma: focal loss gamma (arXiv:1708.02002; MONAI ``FocalLoss``).
        device: where to train; on CUDA the model and inputs use ``torch.channels_last_3d``
            and ``amp`` enables autocast (bfloat16 where supported, else float16).
        proximal_mu: FedProx ``mu`` (``(mu/2)·||w − w_global||²``, arXiv:1812.06127 eq. 2) with
            the weights ``model`` holds on entry as ``w_global``.
        class_balanced: sample volumes with probability inversely proportional to their class
            frequency (the stage imbalance of section 3.1); the focal loss then runs unweighted.
        flip_dims: tensor dims (of ``(B, C, D, H, W)``: 2, 3, 4) each flipped with p = 0.5.
        seed: seed of the batch sampler and the augmentation streams.
        step_offset: global step at which this call starts (``(round - 1) * steps`` in a
            federated round), so the schedule continues across rounds.
        total_steps: global step count of the whole run (cosine decay to 0 at its end);
            ``None`` keeps the learning rate constant after warm-up.
        warmup_steps: global steps of linear warm-up (0: none).
        intensity_aug: apply :func:`client.augmentation.augment_intensity` (random brightness
            and Gaussian noise) after the flips.
        channels_last: model and batches in ``torch.channels_last_3d``; ``None``: on CUDA only
            (to be confirmed by ``onfh sim bench --only gpu``, issue 19).

    Returns:
        ``{"train-loss": mean loss over the steps}`` (focal plus proximal term).

    Raises:
        ValueError: if there are no crops or a class index is outside ``0..K-1``.
    """
    n = len(crops)
    if n == 0:
        raise ValueError("train_stager: no training crops")
    k = num_classes_of(model)
    stages = _check_labels(stages, k, "train_stager")
    _prepare_model(model, device, channels_last)
    run = LocalRun.start(
        model, lr=lr, weight_decay=weight_decay, device=device, amp=amp, proximal_mu=proximal_mu, seed=seed
    )
    scheduler = make_lr_scheduler(run.opt, step_offset=step_offset, warmup_steps=warmup_steps, total_steps=total_steps)
    weights = class_balanced_weights(stages, k) if class_balanced else None
    losses = list(
        _train_steps(
            run,
            scheduler,
            crops,
            stages,
            batches(n, batch_size, steps, run.rng, weights=weights),
            criterion=stage_focal_loss(gamma=focal_gamma),
            device=device,
            amp=amp,
            flip_dims=flip_dims,
            intensity_aug=intensity_aug,
            channels_last=channels_last,
        )
    )
    _release_model(model)
    return {TRAIN_LOSS: mean_loss(losses)}


@torch.no_grad()
def predict_stages(model: nn.Module, crops: np.ndarray, *, device: torch.device, batch_size: int = 16) -> np.ndarray:
    """Class probabilities (softmax) for each crop, in eval mode.

    Args:
        crops: (N, 1, D, H, W) float32.

    Returns:
        (N, K) float32 probabilities, K = the model's output width (3: Ficat-Arlet 0, I, II).
    """
    model.to(device).eval()
    out = []
    for start in range(0, len(crops), batch_size):
        x = _to_device(torch.from_numpy(np.asarray(crops[start : start + batch_size], np.float32)), device)
        out.append(torch.softmax(model(x).float(), dim=1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, num_classes_of(model)), np.float32)


# ----------------------------------------------------------------------------- central


def fit_stager_central(
    model: nn.Module,
    train_crops: np.ndarray,
    train_labels: np.ndarray,
    val_crops: np.ndarray,
    val_labels: np.ndarray,
    *,
    max_steps: int,
    eval_every: int,
    patience: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 1e-4,
    focal_gamma: float = 2.0,
    warmup_steps: int = 0,
    cosine: bool = True,
    device: torch.device | None = None,
    amp: bool = True,
    class_balanced: bool = True,
    flip_dims: tuple[int, ...] = (2, 3, 4),
    intensity_aug: bool = True,
    seed: int = 0,
    deterministic: bool = True,
) -> tuple[StateDict, list[dict]]:
    """Centralised (pooled) training with validation AUC and early stopping.

    Trains one optimiser over up to ``max_steps`` steps (same recipe and schedule as
    :func:`train_stager`, with ``total_steps=max_steps`` when ``cosine``), and every
    ``eval_every`` steps (and at the last step) computes the validation AUC with
    :func:`macro_auc` (binary AUC for 2 classes, one-vs-rest macro AUC otherwise,
    scikit-learn). Training stops early after ``patience`` consecutive evaluations without
    a strictly higher validation AUC. ``model`` ends holding the best weights.

    Determinism: when ``deterministic``, ``monai.utils.set_determinism(seed)`` seeds
    torch, numpy and ``random`` and sets cuDNN to deterministic, non-benchmark mode
    before training; the batch sampler and the augmentation use their own generators
    seeded with ``seed``. On CPU the same seed and the same initial weights give
    identical weights. Call ``set_determinism`` before building the model as well if the
    initialisation should be reproducible. 3D convolutions stay non-deterministic on CUDA.

    Args:
        model: classifier ``(B, 1, D, H, W) -> (B, K)``; trained in place.
        train_crops: (N, 1, D, H, W) float32 in [0, 1].
        train_labels: (N,) int class indices in ``0..K-1``.
        val_crops: (M, 1, D, H, W) float32.
        val_labels: (M,) int; must hold at least two classes.
        max_steps: optimiser step budget.
        eval_every: steps between validation evaluations.
        patience: non-improving evaluations tolerated before stopping (>= 1).
        batch_size, lr, weight_decay, focal_gamma, class_balanced, flip_dims, intensity_aug, amp,
            device: as in :func:`train_stager` (``device`` defaults to the CPU).
        warmup_steps: linear warm-up steps of the schedule.
        cosine: cosine decay to 0 at ``max_steps``; False keeps the learning rate constant.
        seed: seed of everything random here.
        deterministic: call ``monai.utils.set_determinism(seed)`` first.

    Returns:
        ``(best_state, history)``: a CPU copy of the state dict with the best validation AUC
        (ties keep the earlier one), and one dict per evaluation with ``step``,
        ``train_loss`` (mean since the previous evaluation), ``val_auc``, ``lr`` and ``best``
        (whether it became the new best).

    Raises:
        ValueError: empty training set, bad labels, validation with fewer than two classes,
            or non-positive ``max_steps``/``eval_every``/``patience``.
    """
    for key, value in (("max_steps", max_steps), ("eval_every", eval_every), ("patience", patience)):
        if int(value) < 1:
            raise ValueError(f"fit_stager_central: {key} must be >= 1, got {value}")
    if len(train_crops) == 0:
        raise ValueError("fit_stager_central: no training crops")
    k = num_classes_of(model)
    train_labels = _check_labels(train_labels, k, "fit_stager_central (train)")
    val_labels = _check_labels(val_labels, k, "fit_stager_central (val)")
    if len(np.unique(val_labels)) < 2:
        raise ValueError("fit_stager_central: the validation set needs at least two classes for an AUC")
    device = device or torch.device("cpu")
    if deterministic:
        set_determinism(seed=seed)
    _prepare_model(model, device)
    run = LocalRun.start(model, lr=lr, weight_decay=weight_decay, device=device, amp=amp, proximal_mu=0.0, seed=seed)
    scheduler = make_lr_scheduler(run.opt, warmup_steps=warmup_steps, total_steps=max_steps if cosine else None)
    weights = class_balanced_weights(train_labels, k) if class_balanced else None
    steps = _train_steps(
        run,
        scheduler,
        train_crops,
        train_labels,
        batches(len(train_crops), batch_size, max_steps, run.rng, weights=weights),
        criterion=stage_focal_loss(gamma=focal_gamma),
        device=device,
        amp=amp,
        flip_dims=flip_dims,
        intensity_aug=intensity_aug,
    )
    history: list[dict] = []
    best_auc, best_state, stale, window = -math.inf, None, 0, []
    for step, loss in enumerate(steps, start=1):
        window.append(loss)
        if step % eval_every and step != max_steps:
            continue
        lr_now = float(run.opt.param_groups[0]["lr"])
        auc = macro_auc(val_labels, predict_stages(model, val_crops, device=device, batch_size=64))
        model.train()
        improved = auc > best_auc
        if improved:
            best_auc, stale = auc, 0
            best_state = {name: t.detach().to("cpu", copy=True).contiguous() for name, t in model.state_dict().items()}
        else:
            stale += 1
        train_loss = mean_loss(window)
        history.append({"step": step, "train_loss": train_loss, "val_auc": float(auc), "lr": lr_now, "best": improved})
        log.info("step %d: train loss %.4f, val AUC %.4f%s", step, train_loss, auc, " (best)" if improved else "")
        window = []
        if stale >= patience:
            log.info("early stop at step %d: %d evaluations without improvement", step, patience)
            break
    _release_model(model)
    if best_state is None:  # every evaluation gave NaN (cannot happen with two validation classes)
        best_state = copy.deepcopy({name: t.detach().cpu() for name, t in model.state_dict().items()})
    model.load_state_dict(best_state)
    return best_state, history
