"""Torch-free specs: the run configuration, the model configs, the phases and the message keys.

Importing this package loads neither torch, MONAI, SimpleITK nor Flower (a test checks it in a
fresh process), so command-line parsing, validation and the coordinator can read a run config or a
bundle's configs cheaply. Its modules:

* :mod:`~shared_models.specs.run_config`: :class:`RunConfig` (from ``[tool.flwr.app.config]``), its
  parsers and the choice lists, :data:`STRATEGIES` among them (the one strategy list);
* :mod:`~shared_models.specs.models`: :class:`DetectorConfig`, :class:`StagerConfig`,
  :class:`PreprocessingSpec` (recorded in every model bundle);
* :mod:`~shared_models.specs.keys`: :class:`Phase`, :class:`Action` and the message-key constants.

The old import paths (``shared_models.config``, ``shared_models.stager.StagerConfig``,
``shared_models.preprocessing.PreprocessingSpec``) import from here; nothing is defined twice.
"""

from __future__ import annotations

from shared_models.specs.keys import *  # noqa: F403 (the constants; keys.__all__ lists them)
from shared_models.specs.keys import __all__ as _KEYS
from shared_models.specs.models import (
    FUSION_MODES,
    INPUT_NORMS,
    TRANSITIONS,
    DetectorConfig,
    PreprocessingSpec,
    StagerConfig,
)
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
    *_KEYS,
    "CROP_SOURCES",
    "DEVICES",
    "FUSION_MODES",
    "LR_SCHEDULES",
    "MODEL_SIZES",
    "PYPROJECT",
    "ROBUST_STRATEGIES",
    "STRATEGIES",
    "TRACKERS",
    "TRANSFER_DTYPES",
    "TRANSITIONS",
    "DetectorConfig",
    "PhaseConfig",
    "PreprocessingSpec",
    "RunConfig",
    "StagerConfig",
    "INPUT_NORMS",
    "default_run_config",
    "parse_report_groups",
    "parse_site_nodes",
    "robust_strategy_problem",
    "tracking_uri_problem",
]
