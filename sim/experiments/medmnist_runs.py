"""The runs and volume sizes of the AdrenalMNIST3D benchmark (:mod:`sim.experiments.medmnist`).

Standard library only: ``onfh sim`` builds its parser from these names (``onfh sim medmnist --settings``,
``--size``), and ``onfh sim --help`` must not pay for the torch and MONAI that the benchmark imports.
"""

from __future__ import annotations

import argparse

#: volume edges in voxels: 64 is the release read from disk, 28 the size of the published rows
SIZES = (28, 64)
#: runs the CLI knows: a setting, or ``federated`` as ``<strategy>-<split>``
RUNS = ("central", "central-plain-densenet", "fedavg-iid", "fedavg-label-skew", "fedprox-iid", "fedprox-label-skew")
DEFAULT_RUNS = ("central", "central-plain-densenet", "fedavg-iid", "fedavg-label-skew", "fedprox-label-skew")


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"0,1,2"`` -> ``(0, 1, 2)``; an argparse ``type`` (raises :class:`argparse.ArgumentTypeError`)."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def parse_runs(text: str) -> tuple[str, ...]:
    """``"central,fedavg-iid"`` -> the runs, each one of :data:`RUNS`; an argparse ``type`` (raises
    :class:`argparse.ArgumentTypeError` naming the unknown ones)."""
    runs = tuple(v.strip() for v in text.split(",") if v.strip())
    bad = [r for r in runs if r not in RUNS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown settings {bad}; choose from {', '.join(RUNS)}")
    return runs
