"""Shared fixtures: tiny model configs and a micro phantom federation."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from shared_models.config import RunConfig, default_run_config

REAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "real"

TINY = {
    "detector-widths": "4,8,8,16",
    "detector-depths": "1,1,1",
    "detector-head-width": 8,
    "stager-init-features": 8,
    "stager-growth-rate": 4,
    "stager-block-config": "1,1",
    "stager-pool-scales": "1,2",
    # micro phantom federations have 1-3 heads per split: the small-cell rule (issue 16) would withhold
    # every figure the tests check; tests of the rule itself set min-cell-heads explicitly
    "min-cell-heads": 1,
}


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip without a CUDA device (``scripts/gpu_check.sh`` runs them on a GPU)."""
    gpu_tests = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_tests and not torch.cuda.is_available():
        for item in gpu_tests:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))


def tiny_run_config(**overrides) -> dict:
    """The pyproject defaults with tiny model widths and any overrides (kebab-case keys)."""
    return {**default_run_config(), **TINY, **{k.replace("_", "-"): v for k, v in overrides.items()}}


@pytest.fixture
def tiny_cfg() -> RunConfig:
    return RunConfig.from_run_config(tiny_run_config())


def real_data_or_skip(name: str) -> Path:
    path = REAL_DATA / name
    if not path.exists():
        pytest.skip(f"real data {path} not present (../shared/data/real is optional)")
    return path


@pytest.fixture
def task_identity():
    """Flower Messages need a run id; outside a running Flower process we set one for the test."""
    from shared_models.flower.internals import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = old


class _FlowerDeprecations(logging.Handler):
    """Collects Flower's "DEPRECATED FEATURE" log lines: Flower warns through its ``flwr`` logger, not ``warnings``."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "DEPRECATED FEATURE" in text:
            self.seen.append(" ".join(text.split())[:200])


@pytest.fixture(autouse=True)
def no_deprecated_flower_feature():
    """A test that makes Flower log a deprecation fails (issue 20: move off deprecated Flower APIs)."""
    handler = _FlowerDeprecations()
    flower_logger = logging.getLogger("flwr")
    flower_logger.addHandler(handler)
    try:
        yield
    finally:
        flower_logger.removeHandler(handler)
    assert not handler.seen, f"a deprecated Flower feature was used: {handler.seen}"
