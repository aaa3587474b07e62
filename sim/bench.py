"""Benchmarks of the costly parts of ONFH-FL, one *section* per concern.

A section is a function that returns a list of flat, JSON-serialisable row dicts (one row per
configuration measured); it is registered under a name with :func:`section`. :func:`run_benchmarks`
runs the requested sections and returns ``{"environment": ..., "sections": {name: rows}}``, ready
for ``json.dump`` (``onfh sim bench`` writes it as ``bench.json``); :func:`print_table` renders any
section's rows with rich.

Sections (issue 8; each figure a ratio against a baseline run in the same call, with absolute
figures beside it):

* ``detector``: :func:`detector_benchmark`, 3DC-YOLOX training throughput (with the training
  augmentation) and single-volume inference latency for the ``default`` and ``paper`` model sizes;
* ``transfer``: :func:`transfer_benchmark`, bytes and Flower objects per round and direction,
  one array per tensor vs packed (default) vs packed float16;
* ``ingestion``, ``input_pipeline``, ``inference`` (:mod:`sim.bench_data`): DICOM reading against
  MONAI, training throughput against in-memory tensors, one study end to end;
* ``poisoning`` (:mod:`sim.bench_poisoning`): one malicious site of four, each attack of issue 16
  rows 3-5 under FedAvg (with the update checks) and the robust strategies, against the clean run;
* ``federated``, ``scaling``, ``deployment`` (:mod:`sim.bench_federation`): the Flower simulation
  against the same work in a plain loop, with memory and the float16 accuracy cost; 4/8/16
  sites and 1x/2x/4x data; a real SuperLink and SuperNodes on 127.0.0.1 against the simulation;
* ``gpu`` (:mod:`sim.bench_gpu`): our training loops against a plain PyTorch loop at the same batch,
  TFLOP/s, inference and Grad-CAM per study (issue 19).

Timing: ``time.perf_counter`` wall-clock after warm-up, with ``torch.cuda.synchronize`` around
timed regions on CUDA. CPU numbers depend on ``torch.get_num_threads()``, recorded in every row.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from client.augmentation import augment_detector_batch
from client.detector_training import train_detector
from client.training import select_device
from shared_models.config import MODEL_SIZES, RunConfig, default_run_config
from shared_models.detection import YOLOX3D, decode_best_box
from shared_models.preprocessing import PreprocessingSpec
from shared_models.specs import DetectorConfig, Phase

__all__ = [
    "SECTIONS",
    "BenchSection",
    "detector_benchmark",
    "detector_config",
    "environment",
    "print_table",
    "parse_option",
    "run_benchmarks",
    "section",
]

logger = logging.getLogger(__name__)

Row = dict[str, Any]


@dataclass(frozen=True)
class BenchSection:
    """A named benchmark: ``run(**options) -> list[Row]``; ``title`` heads its table."""

    name: str
    title: str
    run: Callable[..., list[Row]]


#: Registered sections by name, in registration order.
SECTIONS: dict[str, BenchSection] = {}


def section(name: str, title: str) -> Callable[[Callable[..., list[Row]]], Callable[..., list[Row]]]:
    """Decorator registering a benchmark function as section ``name``.

    Raises:
        ValueError: if ``name`` is already registered.
    """

    def register(fn: Callable[..., list[Row]]) -> Callable[..., list[Row]]:
        if name in SECTIONS:
            raise ValueError(f"benchmark section {name!r} is already registered")
        SECTIONS[name] = BenchSection(name=name, title=title, run=fn)
        return fn

    return register


def environment(device: torch.device | None = None) -> dict[str, Any]:
    """What the numbers depend on: library versions, CPU threads and load, device name."""
    import monai

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        # CPU timings on a shared machine depend on what else runs (OpenMP threads wait for each other).
        "load_avg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    if device is not None:
        env["device"] = str(device)
        if device.type == "cuda":
            env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def _random_hemi_batch(n: int, shape: tuple[int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random ``(1, D, H, W)`` float32 volumes in [0, 1] and plausible voxel boxes
    (femoral-head-sized, about 1/3 of D and H, 1/3 of W, inside the volume)."""
    rng = np.random.default_rng(seed)
    volumes = rng.random((n, 1) + shape, dtype=np.float32)
    size = np.asarray(shape, np.float64)
    sides = size / 3.0 * rng.uniform(0.8, 1.2, (n, 3))
    centres = rng.uniform(sides / 2, size - 1 - sides / 2)
    return volumes, np.concatenate([centres, sides], axis=1).astype(np.float32)


def _median_ms(fn: Callable[[], Any], repeats: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


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


#: ``onfh sim bench --quick``: a smoke run (default widths, a few steps, one round, the smallest
#: scaling cell); its figures mean nothing, it only shows that every section runs and writes every key.
QUICK_OPTIONS: dict[str, dict[str, Any]] = {
    "detector": {
        "steps": 2,
        "warmup_steps": 1,
        "latency_repeats": 3,
        "latency_warmup": 1,
        "augment_repeats": 2,
        "model_sizes": ("default",),
    },
    "transfer": {"model_sizes": ("default",), "repeats": 1},
    "ingestion": {"studies": 2, "repeats": 1},
    "input_pipeline": {"steps": 3, "repeats": 1},
    "inference": {"model_sizes": ("default",), "repeats": 1},
    "federated": {"rounds": 1, "local_steps": 2},
    "scaling": {"site_counts": (4,), "data_copies": (1,), "rounds": 5, "local_steps": 1},
    "deployment": {"rounds": 1, "local_steps": 1},
    "gpu": {
        "model_sizes": ("default",),
        "stager_batches": (4,),
        "detector_batches": (2,),
        "steps": 2,
        "warmup_steps": 1,
        "infer_repeats": 1,
    },
    "poisoning": {"quick": True},
}


def run_benchmarks(
    names: Iterable[str] | None = None,
    *,
    quick: bool = False,
    work: Path | None = None,
    on_section: Callable[[dict[str, Any]], None] | None = None,
    **options: dict[str, Any],
) -> dict[str, Any]:
    """Run the named sections (all registered ones when ``None``).

    Args:
        names: section names, see :data:`SECTIONS`.
        quick: start from :data:`QUICK_OPTIONS` (explicit ``options`` still win).
        work: folder for the sections' data (phantom DICOM, site caches, Flower runs), passed to
            every section that takes ``work``; default ``runs/bench/work``.
        on_section: called with the result so far after every section (e.g. to write a partial
            ``bench.json``, so that a long run interrupted late keeps what it measured).
        **options: per-section keyword arguments, keyed by section name, e.g.
            ``detector={"steps": 3}``.

    Returns:
        ``{"environment": environment(), "sections": {name: rows}}`` (JSON-serialisable).

    Raises:
        ValueError: for an unknown section name or options for a section that is not run.
    """
    import inspect

    names = list(SECTIONS) if names is None else list(names)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise ValueError(f"unknown benchmark section(s) {unknown}; known: {list(SECTIONS)}")
    stray = [n for n in options if n not in names]
    if stray:
        raise ValueError(f"options given for section(s) {stray} that are not run ({names})")
    env = environment()
    results: dict[str, list[Row]] = {}
    out = {
        "environment": env,
        "quick": quick,
        "options": {n: {k: (list(v) if isinstance(v, tuple) else v) for k, v in o.items()} for n, o in options.items()},
        "sections": results,
    }
    for name in names:
        kwargs = {**(QUICK_OPTIONS.get(name, {}) if quick else {}), **options.get(name, {})}
        if work is not None and "work" in inspect.signature(SECTIONS[name].run).parameters:
            kwargs.setdefault("work", Path(work))
        logger.info("benchmark section %s …", name)
        t0 = time.perf_counter()
        results[name] = SECTIONS[name].run(**kwargs)
        logger.info("benchmark section %s: %.0f s", name, time.perf_counter() - t0)
        env["load_avg_1min_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        if on_section is not None:
            on_section(out)
    return out


def parse_option(text: str) -> tuple[str, str, Any]:
    """``"federated.local_steps=10"`` -> ``("federated", "local_steps", 10)``; the value is read as JSON
    (``10``, ``0.5``, ``true``, ``[4, 8]``; lists become tuples), else kept as a string.

    Raises:
        ValueError: without ``SECTION.KEY=VALUE`` form.
    """
    import json

    key, sep, value = text.partition("=")
    name, dot, option = key.strip().partition(".")
    if not sep or not dot or not name or not option:
        raise ValueError(f"--option {text!r}: expected SECTION.KEY=VALUE, e.g. federated.local_steps=10")
    try:
        parsed = json.loads(value)
    except ValueError:
        parsed = value
    return name, option, tuple(parsed) if isinstance(parsed, list) else parsed


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def print_table(rows: Sequence[Row], title: str | None = None, console=None, transpose: bool | None = None) -> None:
    """Print benchmark rows as a rich table.

    Keys with the same value in every row (of two or more) go to the caption. The other keys
    become columns (one line per row), or, transposed, lines (one column per row): the default
    transposes when there are more keys than rows, which keeps a few wide rows readable.

    Args:
        rows: row dicts of one section, e.g. from :func:`detector_benchmark`.
        title: table title; defaults to the registered title of the rows' ``section``.
        console: a ``rich.console.Console``; a 140-column one by default.
        transpose: force (``True``) or forbid (``False``) the transposed layout.
    """
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=140)
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys and k != "section"]
    shared = [k for k in keys if len(rows) > 1 and all(k in r and r[k] == rows[0][k] for r in rows)]
    keys = [k for k in keys if k not in shared]
    if title is None and rows and rows[0].get("section") in SECTIONS:
        title = SECTIONS[rows[0]["section"]].title
    caption = ", ".join(f"{k.replace('_', ' ')}: {_cell(rows[0][k])}" for k in shared) or None
    table = Table(title=title, caption=caption)
    if transpose if transpose is not None else len(keys) > len(rows):
        table.add_column("")
        for _ in rows:
            table.add_column("", justify="right")
        table.show_header = False
        for key in keys:
            table.add_row(key.replace("_", " "), *(_cell(r[key]) if key in r else "–" for r in rows))
    else:
        for key in keys:
            numeric = all(isinstance(r.get(key), (int, float)) for r in rows if key in r)
            table.add_column(key.replace("_", " "), justify="right" if numeric else "left")
        for row in rows:
            table.add_row(*(_cell(row[k]) if k in row else "–" for k in keys))
    console.print(table)


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


# Sections defined in their own modules register themselves on import. A module whose third-party
# dependency is missing (e.g. Flower on a GPU machine that only runs ``scripts/gpu_check.sh``) is left
# out with a warning: its sections are then unknown, the others still run.
import importlib as _importlib  # noqa: E402

for _module in (
    "bench_data",  # ingestion, input_pipeline, inference
    "bench_federation",  # federated, scaling, deployment
    "bench_gpu",  # gpu
    "bench_poisoning",  # poisoning (issue 16)
):
    try:
        _importlib.import_module(f"sim.{_module}")
    except ModuleNotFoundError as _err:
        if (_err.name or "").split(".")[0] in ("sim", "client", "server", "shared_models", "strategies"):
            raise
        logger.warning(
            "benchmark module sim.%s not loaded (%s is not installed): its sections are unavailable", _module, _err.name
        )
