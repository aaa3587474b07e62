"""What a site's GPU is, for ``onfh site check``, the site daemon's preflight and the benchmarks.

Reads PyTorch's view of CUDA device 0 (``torch.cuda.get_device_properties``) and the NVIDIA driver's
version from NVML (``libnvidia-ml.so.1``, ``nvmlSystemGetDriverVersion``; the same library PyTorch's
fork-safe availability check loads). Calling :func:`describe_gpu` initialises CUDA in the calling
process: never call it in the fork launcher's warm parent (:mod:`client.clientapp_forkserver`).
"""

from __future__ import annotations

import ctypes
import logging

import torch

__all__ = ["describe_gpu", "gpu_summary", "nvidia_driver_version"]

log = logging.getLogger(__name__)


def nvidia_driver_version() -> str | None:
    """The NVIDIA driver version (e.g. ``"580.159.04"``) from NVML, or ``None`` without NVML."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        if nvml.nvmlInit_v2() != 0:
            return None
        buf = ctypes.create_string_buffer(96)
        ok = nvml.nvmlSystemGetDriverVersion(buf, ctypes.c_uint(96)) == 0
        nvml.nvmlShutdown()
        return buf.value.decode() if ok else None
    except (OSError, AttributeError):
        return None


def describe_gpu() -> dict:
    """CUDA device 0 as PyTorch sees it.

    Returns:
        ``{"cuda": False, "torch": version}`` without a usable CUDA device; otherwise ``{"cuda": True,
        "name", "memory_gib" (total, GiB), "capability" ("9.0"), "multiprocessors", "device_count",
        "driver" (NVML; None if unreadable), "cuda_runtime" (``torch.version.cuda``), "torch",
        "bf16" (native bfloat16, compute capability >= 8.0)}``.
    """
    info: dict = {"cuda": False, "torch": torch.__version__}
    if not torch.cuda.is_available():
        return info
    props = torch.cuda.get_device_properties(0)
    info.update(
        {
            "cuda": True,
            "name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "device_count": torch.cuda.device_count(),
            "driver": nvidia_driver_version(),
            "cuda_runtime": torch.version.cuda,
            "bf16": bool(props.major >= 8),
        }
    )
    return info


def gpu_summary(info: dict | None = None) -> str:
    """One line for a preflight table: ``NVIDIA H200, 139.8 GiB, sm 9.0, driver 580.159.04, CUDA 13.0,
    torch 2.11.0, bf16 yes`` or ``no CUDA device (torch 2.13.0+cpu)``."""
    info = describe_gpu() if info is None else info
    if not info.get("cuda"):
        return f"no CUDA device (torch {info['torch']})"
    extra = f" (device 0 of {info['device_count']})" if info.get("device_count", 1) > 1 else ""
    return (
        f"{info['name']}{extra}, {info['memory_gib']:g} GiB, sm {info['capability']}, "
        f"driver {info.get('driver') or 'unknown'}, CUDA {info.get('cuda_runtime') or 'unknown'}, "
        f"torch {info['torch']}, bf16 {'yes' if info.get('bf16') else 'no'}"
    )
