"""Benchmarks of the costly parts of ONFH-FL, one *section* per concern.

A section is a function that returns a list of flat, JSON-serialisable row dicts (one row per
configuration measured); it is registered under a name with :func:`section`. :func:`run_benchmarks`
runs the requested sections and returns ``{"environment": ..., "sections": {name: rows}}``, ready
for ``json.dump`` (``onfh sim bench`` writes it as ``bench.json``); :func:`print_table` renders any
section's rows with rich.

Sections (issue 8; each figure a ratio against a baseline run in the same call, with absolute
figures beside it):

* ``detector`` (:mod:`sim.bench.models`): :func:`~sim.bench.models.detector_benchmark`, 3DC-YOLOX training throughput (with the training
  augmentation) and single-volume inference latency for the ``default`` and ``paper`` model sizes;
* ``transfer`` (:mod:`sim.bench.models`): :func:`~sim.bench.models.transfer_benchmark`, bytes and Flower objects per round and direction,
  one array per tensor vs packed (default) vs packed float16;
* ``ingestion``, ``input_pipeline``, ``inference`` (:mod:`sim.bench.data`): DICOM reading against
  MONAI, training throughput against in-memory tensors, one study end to end;
* ``poisoning`` (:mod:`sim.bench.poisoning`): one malicious site of four, each attack of issue 16
  rows 3-5 under FedAvg (with the update checks) and the robust strategies, against the clean run;
* ``federated``, ``scaling``, ``deployment`` (:mod:`sim.bench.federation`): the Flower simulation
  against the same work in a plain loop, with memory and the float16 accuracy cost; 4/8/16
  sites and 1x/2x/4x data; a real SuperLink and SuperNodes on 127.0.0.1 against the simulation;
* ``gpu`` (:mod:`sim.bench.gpu`): our training loops against a plain PyTorch loop at the same batch,
  TFLOP/s, inference and Grad-CAM per study (issue 19).

Timing: ``time.perf_counter`` wall-clock after warm-up, with ``torch.cuda.synchronize`` around
timed regions on CUDA. CPU numbers depend on ``torch.get_num_threads()``, recorded in every row.
"""

from __future__ import annotations

import importlib
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

__all__ = [
    "SECTIONS",
    "BenchSection",
    "environment",
    "load_sections",
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


#: The modules that define sections, in the order their sections run by default.
SECTION_MODULES = (
    "sim.bench.models",  # detector, transfer
    "sim.bench.data",  # ingestion, input_pipeline, inference
    "sim.bench.federation",  # federated, scaling, deployment
    "sim.bench.gpu",  # gpu
    "sim.bench.poisoning",  # poisoning (issue 16)
)


def load_sections() -> dict[str, BenchSection]:
    """Import every module of :data:`SECTION_MODULES` (each registers its sections on import).

    A module whose third-party dependency is missing (e.g. Flower on a GPU machine that only runs
    ``scripts/gpu_check.sh``) is left out with a warning: its sections are then unknown, the others
    still run. The modules import this one, never the other way round (they are named by string).

    Returns:
        :data:`SECTIONS`.
    """
    for module in SECTION_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as err:
            if (err.name or "").split(".")[0] in ("sim", "client", "server", "shared_models", "strategies"):
                raise
            logger.warning(
                "benchmark module %s not loaded (%s is not installed): its sections are unavailable", module, err.name
            )
    return SECTIONS


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

    load_sections()
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
