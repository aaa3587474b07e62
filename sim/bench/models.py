"""Benchmark sections of the two networks: ``detector`` (3DC-YOLOX training throughput and inference
latency) and ``transfer`` (what one client sends per round and direction). Registered in
:data:`sim.bench.core.SECTIONS` on import (:func:`sim.bench.core.load_sections` imports this module).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import numpy as np
import torch

from client.augmentation import augment_detector_batch
from client.detector_training import train_detector
from shared_models.config import MODEL_SIZES, RunConfig, default_run_config
from shared_models.detection import YOLOX3D, decode_best_box
from shared_models.device import select_device
from shared_models.preprocessing import PreprocessingSpec
from shared_models.specs import DetectorConfig, Phase
from sim.bench.core import Row, _median_ms, _random_hemi_batch, _sync, section

logger = logging.getLogger(__name__)


def detector_config(model_size: str) -> DetectorConfig:
    """The :class:`DetectorConfig` that ``RunConfig`` builds for ``model-size`` with the pyproject
    defaults (``default``: ``detector-widths``/``-depths``/``-head-width``; ``paper``:
    ``DetectorConfig.PAPER``).

    Raises:
        ValueError: if ``model_size`` is not one of ``shared_models.config.MODEL_SIZES``.
    """
    if model_size not in MODEL_SIZES:
        raise ValueError(f"model_size: expected one of {MODEL_SIZES}, got {model_size!r}")
    return RunConfig.from_run_config({**default_run_config(), "model-size": model_size}).detector


@section("detector", "3DC-YOLOX: training throughput and inference latency")
def detector_benchmark(
    model_sizes: Sequence[str] = ("default", "paper"),
    *,
    steps: int = 10,
    warmup_steps: int = 2,
    batch_size: int = 4,
    latency_repeats: int = 10,
    latency_warmup: int = 3,
    augment_repeats: int = 5,
    device: str | torch.device = "cpu",
    amp: bool = True,
    seed: int = 0,
) -> list[Row]:
    """Training throughput and inference latency of 3DC-YOLOX on random hemi-volumes.

    For each model size the detector is built as ``RunConfig`` builds it (:func:`detector_config`)
    and measured on random volumes of the real hemi shape ``PreprocessingSpec().hemi_shape``
    (``(1, 32, 112, 64)``) with femoral-head-sized boxes:

    * **training**: ``warmup_steps`` untimed steps, then ``steps`` timed optimiser steps of
      :func:`client.detector_training.train_detector` (the real loop: batch sampling, the
      box-aware augmentation, forward, YOLOX loss with SimOTA, backward, Adam) at ``batch_size``;
    * **augmentation alone**: median time of :func:`client.augmentation.augment_detector_batch`
      on one batch of ``batch_size`` on ``device`` (as in training), and its share of a step
      (the step time includes it);
    * **inference**: median over ``latency_repeats`` (after ``latency_warmup``) of
      ``decode_best_box(model(x))`` on one hemi-volume, eval mode, no autograd.

    Args:
        model_sizes: values of the ``model-size`` run-config key.
        steps: timed training steps (>= 1).
        warmup_steps: untimed training steps before them (>= 0).
        batch_size: training batch size (>= 1).
        latency_repeats: timed inference repeats (>= 1).
        latency_warmup: untimed inference calls (>= 0).
        augment_repeats: timed augmentation calls (>= 1).
        device: ``"cpu"``, ``"cuda"``, ``"auto"`` or a ``torch.device``.
        amp: mixed precision in training (CUDA only, as in training).
        seed: seeds weights, data and the training loop.

    Returns:
        One row per model size: ``section, model_size, widths, depths, head_width, params,
        batch_size, steps, train_volumes_per_s, train_step_ms, augment_ms_per_batch,
        augment_share_of_step, infer_ms_per_volume, device, torch_threads``
        (times in ms, throughput in volumes/s).

    Raises:
        ValueError: unknown model size or a count out of range.
    """
    for name, value, low in (
        ("steps", steps, 1),
        ("warmup_steps", warmup_steps, 0),
        ("batch_size", batch_size, 1),
        ("latency_repeats", latency_repeats, 1),
        ("latency_warmup", latency_warmup, 0),
        ("augment_repeats", augment_repeats, 1),
    ):
        if int(value) != value or value < low:
            raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
    dev = device if isinstance(device, torch.device) else select_device(device)
    shape = tuple(PreprocessingSpec().hemi_shape)
    volumes, boxes = _random_hemi_batch(max(4 * batch_size, 8), shape, seed)
    timing = {
        "steps": steps,
        "warmup_steps": warmup_steps,
        "batch_size": batch_size,
        "latency_repeats": latency_repeats,
        "latency_warmup": latency_warmup,
        "augment_repeats": augment_repeats,
        "amp": amp,
        "seed": seed,
    }
    return [_detector_row(size, volumes, boxes, dev, **timing) for size in model_sizes]


def _detector_row(
    size: str,
    volumes: np.ndarray,
    boxes: np.ndarray,
    dev: torch.device,
    *,
    steps: int,
    warmup_steps: int,
    batch_size: int,
    latency_repeats: int,
    latency_warmup: int,
    augment_repeats: int,
    amp: bool,
    seed: int,
) -> Row:
    """One :func:`detector_benchmark` row for model size ``size``."""
    config = detector_config(size)
    torch.manual_seed(seed)
    model = YOLOX3D(config)
    params = sum(p.numel() for p in model.parameters())
    logger.info("detector benchmark: %s (%d parameters) on %s", size, params, dev)

    gen = torch.Generator().manual_seed(seed)
    xb, yb = torch.from_numpy(volumes[:batch_size]).to(dev), torch.from_numpy(boxes[:batch_size]).to(dev)
    augment_ms = _median_ms(lambda: augment_detector_batch(xb, yb, gen), augment_repeats, 1, dev)

    train = {"batch_size": batch_size, "lr": 2e-3, "weight_decay": 1e-4, "device": dev, "amp": amp, "seed": seed}
    if warmup_steps:
        train_detector(model, volumes, boxes, steps=warmup_steps, **train)
    _sync(dev)
    t0 = time.perf_counter()
    train_detector(model, volumes, boxes, steps=steps, **train)
    _sync(dev)
    train_s = time.perf_counter() - t0

    model.eval()
    x1 = torch.from_numpy(volumes[:1]).to(dev)

    @torch.no_grad()
    def infer() -> None:
        decode_best_box(model(x1))

    infer_ms = _median_ms(infer, latency_repeats, latency_warmup, dev)
    step_ms = 1e3 * train_s / steps
    return {
        "section": "detector",
        "model_size": size,
        "widths": ",".join(map(str, config.widths)),
        "depths": ",".join(map(str, config.depths)),
        "head_width": config.head_width,
        "params": params,
        "batch_size": batch_size,
        "steps": steps,
        "train_volumes_per_s": steps * batch_size / train_s,
        "train_step_ms": step_ms,
        "augment_ms_per_batch": augment_ms,
        "augment_share_of_step": augment_ms / step_ms,
        "infer_ms_per_volume": infer_ms,
        "device": str(dev),
        "torch_threads": torch.get_num_threads(),
    }


@section("transfer", "Model transfer: what one client sends per round and direction (issue 8, bytes per round)")
def transfer_benchmark(
    model_sizes: Sequence[str] = ("default", "paper"), *, repeats: int = 3, seed: int = 0
) -> list[Row]:
    """Size and cost of each model's state dict as Flower sends it: one array per tensor, packed
    (the default, ``transfer-packing = true``) and packed in float16 (``transfer-dtype``).

    * ``fp32_bytes``: the state dict with every floating tensor at 4 bytes an element (integer
      buffers at their own size), the baseline of issue 8;
    * ``*_bytes``: the serialised array payloads Flower sends (``Array.data``), without message and
      gRPC framing; ``arrayrecord_bytes``/``ratio`` are the default (packed float32) path
      (target ratio <= 1.02); ``fp16_ratio`` the float16 path (target about 0.5);
    * ``*_objects``: Flower objects a message carries for the record (record, arrays, chunks of
      <= 5 MB): Flower pushes and pulls them one by one, so this count drives its per-round cost
      (``FLOWER-1.42-NOTES.md``); ``*_serialise_ms``: median time to deflate all of them, object
      ids (sha256) included, the sender's share of that cost;
    * ``pack_ms`` / ``unpack_ms``: :func:`shared_models.transfer.pack_state_dict` /
      ``unpack_state_dict`` (median of ``repeats``);
    * float16 accuracy cost on the outputs: ``fp16_weight_max_rel_err`` (largest relative rounding
      error of a weight above 1e-3 in magnitude) and ``fp16_output_max_abs_diff`` (largest change of
      the stager's stage probabilities / the detector's cell scores, objectness x class, on random inputs).
      The cost after federated training is in the ``federated`` section.

    Raises:
        ValueError: for an unknown model size.
    """
    from flwr.app import Array, ArrayRecord

    from shared_models.flower.internals import get_all_nested_objects
    from shared_models.stager import MulDenseNet3D
    from shared_models.transfer import pack_state_dict, to_transfer, unpack_state_dict

    cpu = torch.device("cpu")

    def record(arrays: dict) -> ArrayRecord:
        return ArrayRecord({k: Array(v) for k, v in arrays.items()})

    def measure(rec: ArrayRecord) -> tuple[int, int, float]:
        objects = get_all_nested_objects(rec)
        ms = _median_ms(
            lambda: [
                o.deflate() for o in get_all_nested_objects(record({k: rec[k].numpy() for k in rec.keys()})).values()
            ],
            repeats,
            1,
            cpu,
        )
        return sum(len(rec[k].data) for k in rec.keys()), len(objects), ms

    rows: list[Row] = []
    for size in model_sizes:
        cfg = RunConfig.from_run_config({**default_run_config(), "model-size": size})
        torch.manual_seed(seed)
        for name, model in (("detector", YOLOX3D(cfg.detector)), ("stager", MulDenseNet3D(cfg.stager))):
            state = model.state_dict()
            fp32 = sum(v.numel() * (4 if v.is_floating_point() else v.element_size()) for v in state.values())
            plain_bytes, plain_objects, plain_ms = measure(record(to_transfer(state, packed=False)))
            packed_bytes, packed_objects, packed_ms = measure(record(pack_state_dict(state)))
            half = pack_state_dict(state, float_dtype="float16")
            half_bytes, _, _ = measure(record(half))
            pack_ms = _median_ms(lambda state=state: pack_state_dict(state), repeats, 1, cpu)
            packed = pack_state_dict(state)
            unpack_ms = _median_ms(lambda packed=packed, state=state: unpack_state_dict(packed, state), repeats, 1, cpu)
            rel, out_diff = _fp16_cost(model, unpack_state_dict(half, state), name, cfg, seed)
            rows.append(
                {
                    "section": "transfer",
                    "model": name,
                    "model_size": size,
                    "tensors": len(state),
                    "fp32_bytes": int(fp32),
                    "unpacked_bytes": int(plain_bytes),
                    "unpacked_ratio": plain_bytes / fp32,
                    "unpacked_objects": plain_objects,
                    "unpacked_serialise_ms": plain_ms,
                    "arrayrecord_bytes": int(packed_bytes),
                    "ratio": packed_bytes / fp32,
                    "packed_arrays": len(packed),
                    "packed_objects": packed_objects,
                    "packed_serialise_ms": packed_ms,
                    "fp16_bytes": int(half_bytes),
                    "fp16_ratio": half_bytes / fp32,
                    "pack_ms": pack_ms,
                    "unpack_ms": unpack_ms,
                    "fp16_weight_max_rel_err": rel,
                    "fp16_output_max_abs_diff": out_diff,
                }
            )
    return rows


@torch.no_grad()
def _fp16_cost(model: torch.nn.Module, half_state: dict, name: str, cfg: RunConfig, seed: int) -> tuple[float, float]:
    """Largest relative weight error (|w| > 1e-3) and largest output change from fp16-rounded weights."""
    state = model.state_dict()
    rel = max(
        float(((half_state[k] - v).abs() / v.abs()).masked_fill(v.abs() <= 1e-3, 0).max())
        for k, v in state.items()
        if v.is_floating_point() and v.numel()
    )
    gen = torch.Generator().manual_seed(seed)
    shape = cfg.spec.hemi_shape if name == Phase.DETECTOR else cfg.spec.crop_shape
    x = torch.rand((2, 1, *shape), generator=gen)

    def outputs(weights: dict) -> torch.Tensor:
        model.load_state_dict(weights)
        model.eval()
        out = model(x)
        if name == Phase.STAGER:
            return torch.softmax(out.float(), dim=1)
        return torch.sigmoid(out[..., 6]) * torch.sigmoid(out[..., 7])  # (B, cells): objectness x class score

    before, after = outputs(state), outputs(half_state)
    model.load_state_dict(state)
    return rel, float((after - before).abs().max())
