"""The run configuration's import path of old: everything here lives in :mod:`shared_models.specs.run_config`.

``from shared_models.config import RunConfig`` keeps working and, like the specs, imports neither
torch, MONAI, SimpleITK nor Flower. New code may import from :mod:`shared_models.specs`.
"""

from __future__ import annotations

from shared_models.specs.run_config import (
    CROP_SOURCES,
    DEVICES,
    LR_SCHEDULES,
    MODEL_SIZES,
    PYPROJECT,
    ROBUST_STRATEGIES,
    STRATEGIES,
    TRACKERS,
    TRANSFER_DTYPES,
    PhaseConfig,
    RunConfig,
    default_run_config,
    parse_report_groups,
    parse_site_nodes,
    robust_strategy_problem,
    tracking_uri_problem,
)

__all__ = [
    "CROP_SOURCES",
    "DEVICES",
    "LR_SCHEDULES",
    "MODEL_SIZES",
    "PYPROJECT",
    "ROBUST_STRATEGIES",
    "STRATEGIES",
    "TRACKERS",
    "TRANSFER_DTYPES",
    "PhaseConfig",
    "RunConfig",
    "default_run_config",
    "parse_report_groups",
    "parse_site_nodes",
    "robust_strategy_problem",
    "tracking_uri_problem",
]
