"""Reproducibility: one random stream per (seed, site, phase, round), and PyTorch's deterministic settings.

Same seed, data and run config give bit-identical weights and ``report.json`` metrics on the same
machine, whatever the timing (``tests/test_determinism.py`` runs the federation twice and compares):

* every random stream a site draws is seeded by :func:`stream_seed` from ``(seed, site, phase,
  round)``, so two sites never share a stream and a resumed round draws what it would have drawn;
* the server aggregates replies in site-id order (``strategies/site_aware.py``), so the floating-point
  sums do not depend on which site answered first;
* :func:`configure_determinism` switches PyTorch to its deterministic algorithms.

What stays non-deterministic:

* **Across machines** (other CPUs, other oneDNN/BLAS builds, another thread count): floating-point
  reductions may be summed in another order, so the last bits differ and grow over training. The
  README states the spread across seeds and under a changed thread count; figures should be read
  with that spread.
* **On CUDA**: PyTorch has no deterministic kernel for a few backward passes used here (e.g. 3D
  max/avg pooling and trilinear upsampling backward); they run anyway (``warn_only=True``) and PyTorch
  warns once each. bf16/fp16 autocast adds rounding of its own. No GPU was available to measure the
  run-to-run tolerance on CUDA; it is unmeasured.
"""

from __future__ import annotations

import os
import zlib

import numpy as np
import torch

# cuBLAS needs a fixed workspace for deterministic matrix products (CUDA >= 10.2; PyTorch's
# "Reproducibility" notes). It must be in the environment before the CUDA context is created.
CUBLAS_WORKSPACE = ":4096:8"


def stream_seed(seed: int, site: str, phase: str, server_round: int) -> int:
    """A 63-bit seed for the random streams of one site in one round of one phase.

    Derived with numpy's ``SeedSequence`` (hash-based entropy mixing, O'Neill's PCG seeding) from the run's
    ``seed``, CRC-32 of the site id and of the phase name, and the round, so the streams of different sites,
    phases and rounds are independent and the same tuple always gives the same seed (CRC-32 does not depend
    on ``PYTHONHASHSEED``).

    Args:
        seed: the run config's ``seed`` (>= 0).
        site: site id, e.g. ``"A"``.
        phase: ``"detector"``, ``"stager"``, or any other stream name.
        server_round: the federated round (1-based; 0 for work outside rounds).

    Returns:
        An int in [0, 2**63), for ``numpy.random.default_rng`` and ``torch.Generator.manual_seed``.

    Raises:
        ValueError: a negative seed or round.
    """
    if seed < 0 or server_round < 0:
        raise ValueError(f"stream_seed: seed ({seed}) and round ({server_round}) must be >= 0")
    entropy = [int(seed), zlib.crc32(site.encode()), zlib.crc32(phase.encode()), int(server_round)]
    words = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return int((int(words[0]) << 32 | int(words[1])) & (2**63 - 1))


def configure_determinism(device: torch.device | str = "cpu") -> None:
    """PyTorch's deterministic settings for this process (PyTorch docs, "Reproducibility").

    ``torch.use_deterministic_algorithms(True)``, cuDNN deterministic and not benchmarking, and
    ``CUBLAS_WORKSPACE_CONFIG`` (set when not already set). On CPU an operation without a deterministic
    implementation raises; on CUDA it only warns (``warn_only``), since a few 3D backward kernels have none
    (see the module docstring).
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    cuda = torch.device(device).type == "cuda"
    torch.use_deterministic_algorithms(True, warn_only=cuda)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
