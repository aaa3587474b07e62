"""GPU benchmark (issue 19): our training loops against a plain PyTorch loop at the same batch.

``onfh sim bench --only gpu``. Registered in :data:`sim.bench.core.SECTIONS` on import. For each model
(stager, detector), model size and batch size, in the same call and on the same device:

* **ours**: the project's loop, :func:`client.stager_training.train_stager` or
  :func:`client.detector_training.train_detector`, exactly as a site runs it in a round (the site's
  data copied to the device, batch sampling, augmentation on the device, loss, FedProx-ready step);
* **plain**: the same model, batch, precision (AMP or not) and memory layout, the data already on the
  device, contiguous batches, the same loss and Adam: forward, loss, backward, step; nothing else;
* ``ours_vs_plain``: ours' samples/s over plain's (target on one H200: >= 0.9);
* ``gflop_per_sample``: forward + backward FLOPs of one training sample from
  ``torch.utils.flop_counter.FlopCounterMode`` (convolutions and matrix products), and from it the
  achieved TFLOP/s of both loops;
* on CUDA, ``peak_mem_gib`` (``torch.cuda.max_memory_allocated`` during ours) and
  ``host_syncs_per_step`` (synchronising CUDA calls per step of ours, counted by
  ``torch.cuda.set_sync_debug_mode("warn")`` as the difference between two run lengths).

Per model size, one ``study`` row: the models' part of analysing one study (detector on both
hemi-volumes, stager on both crops) and 3D Grad-CAM of both crops, against Grad-CAM on a deep copy
of the stager (what :func:`shared_models.gradcam.stage_gradcam` did before issue 19).

Without CUDA the defaults shrink to the default-size models at one small batch and two steps: the
figures then only show that the plumbing works; the GPU figures come from ``scripts/gpu_check.sh``.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from client.detector_training import train_detector
from client.stager_training import train_stager
from client.training import autocast
from shared_models.device import select_device
from sim.bench.core import Row, _median_ms, _sync, section

logger = logging.getLogger(__name__)

#: Defaults on CUDA: the batches of the issue's H200 measurements (the configured training batches
#: are 16 for the stager and 4 for the detector, ``pyproject.toml``).
GPU_DEFAULTS = {
    "model_sizes": ("default", "paper"),
    "stager_batches": (16, 64, 256),
    "detector_batches": (4, 16, 64),
    "steps": 20,
    "warmup_steps": 5,
}
#: Defaults without CUDA: plumbing only.
CPU_DEFAULTS = {
    "model_sizes": ("default",),
    "stager_batches": (4,),
    "detector_batches": (2,),
    "steps": 2,
    "warmup_steps": 1,
}
LR, WEIGHT_DECAY, FOCAL_GAMMA = 1e-3, 1e-4, 2.0


def _configs(model_size: str, overrides: dict | None):
    from shared_models.config import RunConfig, default_run_config

    cfg = RunConfig.from_run_config({**default_run_config(), "model-size": model_size, **(overrides or {})})
    return cfg.stager, cfg.detector, tuple(cfg.spec.crop_shape), tuple(cfg.spec.hemi_shape)


def flops_per_sample(model: torch.nn.Module, shape: tuple[int, ...], device: torch.device) -> float:
    """Forward + backward FLOPs of one ``(1, 1, *shape)`` sample (``torch.utils.flop_counter``); the
    model's gradients are cleared afterwards."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.rand((1, 1, *shape), device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        out = model(x)
        (out.float().sum() if isinstance(out, torch.Tensor) else sum(o.float().sum() for o in out)).backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def _sync_count(fn: Callable[[], Any]) -> int:
    """Synchronising CUDA calls made by ``fn`` (CUDA's sync debug mode, one warning each)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _plain_loop(
    model: torch.nn.Module,
    data: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: Callable,
    batch: int,
    device: torch.device,
    amp: bool,
) -> Callable[[int], None]:
    """``run(steps)``: forward, ``loss_fn(model, output, targets)``, backward, Adam step on contiguous
    batches already on ``device``."""
    opt = torch.optim.Adam(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    starts = list(range(0, len(data) - batch + 1, batch))

    def run(steps: int) -> None:
        model.train()
        for i in range(steps):
            s = starts[i % len(starts)]
            with autocast(device, amp):
                out = model(data[s : s + batch])
            loss = loss_fn(model, out, targets[s : s + batch])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    return run


def _training_row(
    name: str,
    size: str,
    build: Callable[[], torch.nn.Module],
    shape: tuple[int, ...],
    batch: int,
    ours: Callable[[torch.nn.Module, int], Any],
    plain_data: tuple[torch.Tensor, torch.Tensor],
    loss_fn: Callable,
    *,
    channels_last: bool,
    device: torch.device,
    amp: bool,
    steps: int,
    warmup_steps: int,
) -> Row:
    model = build()
    gflop = flops_per_sample(model.to(device), shape, device) / 1e9
    ours(model, warmup_steps)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    ours_s = _timed(lambda: ours(model, steps), device)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    syncs = None
    if device.type == "cuda":
        syncs = (_sync_count(lambda: ours(model, 4)) - _sync_count(lambda: ours(model, 2))) / 2

    plain_model = build().to(device)
    if channels_last:
        plain_model = plain_model.to(memory_format=torch.channels_last_3d)
    run_plain = _plain_loop(plain_model, *plain_data, loss_fn, batch, device, amp)
    run_plain(warmup_steps)
    plain_s = _timed(lambda: run_plain(steps), device)
    ours_rate, plain_rate = steps * batch / ours_s, steps * batch / plain_s
    return {
        "section": "gpu",
        "model": name,
        "model_size": size,
        "batch_size": batch,
        "params": sum(p.numel() for p in model.parameters()),
        "gflop_per_sample": gflop,
        "ours_samples_per_s": ours_rate,
        "plain_samples_per_s": plain_rate,
        "ours_vs_plain": ours_rate / plain_rate,
        "ours_step_ms": 1e3 * ours_s / steps,
        "plain_step_ms": 1e3 * plain_s / steps,
        "ours_tflops": gflop * ours_rate / 1e3,
        "plain_tflops": gflop * plain_rate / 1e3,
        "peak_mem_gib": peak,
        "host_syncs_per_step": syncs,
        "amp": amp,
        "channels_last": channels_last,
        "steps": steps,
        "device": str(device),
    }


def _study_row(
    size: str,
    stager: torch.nn.Module,
    detector: torch.nn.Module,
    crop_shape,
    hemi_shape,
    device: torch.device,
    repeats: int,
    seed: int,
) -> Row:
    from shared_models.detection import decode_best_box
    from shared_models.gradcam import stage_gradcam

    gen = torch.Generator().manual_seed(seed)
    hemis = torch.rand((2, 1, *hemi_shape), generator=gen).to(device)
    crops = torch.rand((2, 1, *crop_shape), generator=gen).to(device)
    stager.to(device).eval()
    detector.to(device).eval()

    @torch.no_grad()
    def infer() -> None:
        decode_best_box(detector(hemis))
        torch.softmax(stager(crops).float(), dim=1).cpu()

    def gradcam() -> None:
        for i in range(2):
            stage_gradcam(stager, crops[i : i + 1])

    def gradcam_deepcopy() -> None:  # the former implementation's extra cost: a deep copy per call
        for i in range(2):
            stage_gradcam(copy.deepcopy(stager), crops[i : i + 1])

    infer_ms = _median_ms(infer, repeats, 1, device)
    cam_ms = _median_ms(gradcam, repeats, 1, device)
    copy_ms = _median_ms(gradcam_deepcopy, repeats, 1, device)
    return {
        "section": "gpu",
        "model": "study",
        "model_size": size,
        "infer_ms_per_study": infer_ms,
        "gradcam_ms_per_study": cam_ms,
        "gradcam_deepcopy_ms_per_study": copy_ms,
        "gradcam_speedup": copy_ms / cam_ms,
        "device": str(device),
    }


@section(
    "gpu",
    "GPU training: ours vs a plain loop at the same batch (same model, precision, data resident), "
    "TFLOP/s, inference and Grad-CAM per study",
)
def gpu_benchmark(
    model_sizes: Sequence[str] | None = None,
    *,
    stager_batches: Sequence[int] | None = None,
    detector_batches: Sequence[int] | None = None,
    steps: int | None = None,
    warmup_steps: int | None = None,
    device: str | torch.device = "auto",
    amp: bool = True,
    channels_last: bool | None = None,
    deterministic: bool = True,
    config_overrides: dict | None = None,
    infer_repeats: int = 5,
    seed: int = 0,
) -> list[Row]:
    """Rows of ours-vs-plain training throughput per model, size and batch, and one study row per size.

    Args:
        model_sizes: ``model-size`` values; default ``("default", "paper")`` on CUDA, ``("default",)`` without.
        stager_batches, detector_batches: batch sizes; default (16, 64, 256) and (4, 16, 64) on CUDA,
            (4,) and (2,) without.
        steps, warmup_steps: timed and untimed steps per loop (default 20 and 5 on CUDA, 2 and 1 without).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or a ``torch.device``.
        amp: autocast (bfloat16 where supported) in both loops; CUDA only, as in training.
        channels_last: ``torch.channels_last_3d`` in both loops; ``None``: each loop's default (the stager
            on CUDA only, the detector never).
        deterministic: PyTorch's deterministic settings during the measurement, as a ClientApp sets them
            (:func:`shared_models.determinism.configure_determinism`: deterministic cuDNN, no benchmark
            mode); restored afterwards. ``False`` shows what they cost.
        config_overrides: run-config keys over the pyproject defaults (e.g. tiny widths in tests).
        infer_repeats: timed repeats of the study inference and Grad-CAM.
        seed: seeds weights and data.

    Returns:
        Training rows (``model`` stager/detector): ``model_size, batch_size, params, gflop_per_sample,
        ours_samples_per_s, plain_samples_per_s, ours_vs_plain, ours_step_ms, plain_step_ms, ours_tflops,
        plain_tflops, peak_mem_gib, host_syncs_per_step`` (the last two None without CUDA), ``amp,
        channels_last, deterministic, steps, device``; study rows (``model`` "study"): ``infer_ms_per_study,
        gradcam_ms_per_study, gradcam_deepcopy_ms_per_study, gradcam_speedup``.

    Raises:
        ValueError: a batch size or step count below 1, or an unknown model size.
    """
    dev = device if isinstance(device, torch.device) else select_device(device)
    defaults = GPU_DEFAULTS if dev.type == "cuda" else CPU_DEFAULTS
    model_sizes = tuple(model_sizes or defaults["model_sizes"])
    stager_batches = tuple(stager_batches or defaults["stager_batches"])
    detector_batches = tuple(detector_batches or defaults["detector_batches"])
    steps = int(steps or defaults["steps"])
    warmup_steps = int(defaults["warmup_steps"] if warmup_steps is None else warmup_steps)
    if min(*stager_batches, *detector_batches, steps) < 1 or warmup_steps < 0:
        raise ValueError("gpu benchmark: batch sizes and steps must be >= 1, warmup_steps >= 0")
    amp = bool(amp and dev.type == "cuda")
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    if deterministic:
        from shared_models.determinism import configure_determinism

        configure_determinism(dev)
    try:
        rows = _measure(
            model_sizes,
            stager_batches,
            detector_batches,
            dev,
            amp,
            channels_last,
            config_overrides,
            steps,
            warmup_steps,
            infer_repeats,
            seed,
        )
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
    for row in rows:
        if row["model"] != "study":
            row["deterministic"] = deterministic
    if dev.type == "cuda":
        from client.gpu import gpu_summary

        summary = gpu_summary()
        for row in rows:
            row["gpu"] = summary
    return rows


def _measure(
    model_sizes,
    stager_batches,
    detector_batches,
    dev,
    amp,
    channels_last,
    config_overrides,
    steps,
    warmup_steps,
    infer_repeats,
    seed,
) -> list[Row]:
    from shared_models.detection import YOLOX3D, detector_loss
    from shared_models.losses import stage_focal_loss
    from shared_models.stager import MulDenseNet3D

    rng = np.random.default_rng(seed)
    rows: list[Row] = []
    timing = {"device": dev, "amp": amp, "steps": steps, "warmup_steps": warmup_steps}
    stager_cl = dev.type == "cuda" if channels_last is None else bool(channels_last)
    detector_cl = bool(channels_last)
    for size in model_sizes:
        stager_cfg, detector_cfg, crop_shape, hemi_shape = _configs(size, config_overrides)

        def build_stager(stager_cfg=stager_cfg):
            torch.manual_seed(seed)
            return MulDenseNet3D(stager_cfg)

        def build_detector(detector_cfg=detector_cfg):
            torch.manual_seed(seed)
            return YOLOX3D(detector_cfg)

        focal = stage_focal_loss(gamma=FOCAL_GAMMA)
        for batch in stager_batches:
            logger.info("gpu benchmark: stager %s, batch %d on %s", size, batch, dev)
            n = 2 * batch
            crops = rng.random((n, 1, *crop_shape), dtype=np.float32)
            labels = np.arange(n) % int(stager_cfg.out_channels)
            layout = torch.channels_last_3d if stager_cl else torch.contiguous_format
            data = torch.from_numpy(crops).to(dev).contiguous(memory_format=layout)

            def ours_stager(model, k, crops=crops, labels=labels, batch=batch):
                if k:
                    train_stager(
                        model,
                        crops,
                        labels,
                        steps=k,
                        batch_size=batch,
                        lr=LR,
                        weight_decay=WEIGHT_DECAY,
                        focal_gamma=FOCAL_GAMMA,
                        device=dev,
                        amp=amp,
                        seed=seed,
                        channels_last=stager_cl,
                    )

            rows.append(
                _training_row(
                    "stager",
                    size,
                    build_stager,
                    crop_shape,
                    batch,
                    ours_stager,
                    (data, torch.from_numpy(labels).to(dev)),
                    lambda _model, out, y, focal=focal: focal(out.float(), y),
                    channels_last=stager_cl,
                    **timing,
                )
            )
        for batch in detector_batches:
            logger.info("gpu benchmark: detector %s, batch %d on %s", size, batch, dev)
            from sim.bench.core import _random_hemi_batch

            volumes, boxes = _random_hemi_batch(2 * batch, hemi_shape, seed)

            def ours_detector(model, k, volumes=volumes, boxes=boxes, batch=batch):
                if k:
                    train_detector(
                        model,
                        volumes,
                        boxes,
                        steps=k,
                        batch_size=batch,
                        lr=LR,
                        weight_decay=WEIGHT_DECAY,
                        device=dev,
                        amp=amp,
                        seed=seed,
                        channels_last=detector_cl,
                    )

            rows.append(
                _training_row(
                    "detector",
                    size,
                    build_detector,
                    hemi_shape,
                    batch,
                    ours_detector,
                    (
                        torch.from_numpy(volumes)
                        .to(dev)
                        .contiguous(memory_format=torch.channels_last_3d if detector_cl else torch.contiguous_format),
                        torch.from_numpy(boxes).to(dev),
                    ),
                    lambda model, out, y: detector_loss(out, y, model.cells)[0],
                    channels_last=detector_cl,
                    **timing,
                )
            )
        rows.append(
            _study_row(size, build_stager(), build_detector(), crop_shape, hemi_shape, dev, infer_repeats, seed)
        )
    return rows
