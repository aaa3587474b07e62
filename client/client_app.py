"""The ONFH-FL ClientApp: thin Flower handlers over :mod:`client.tasks`.

Each handler reads as numbered steps (NVIDIA FLARE style): 1. resolve the site,
2. unpack the global weights and the round's config, 3. call a plain function,
4. pack weights and aggregate metrics into the reply.

Messages:

* ``query`` with ``config["action"] == "hello"``: reply the site id and head counts
  (a ConfigRecord with ``site-id``, a MetricRecord of counts).
* ``query`` with ``action == "crops"``: crop every head with the detector in
  ``arrays`` (phase 1's global model) and cache the crops at the site.
* ``query`` with ``action`` ``"calibrate-val"`` / ``"calibrate-eval"``: validation and test
  aggregates for the bundle's calibration (``client/calibration_stats.py``).
* ``train`` / ``evaluate`` with ``config["phase"]`` ``"detector"`` or ``"stager"``.

Every reply (and every error) that leaves the site is first recorded in the site's
append-only audit log (:mod:`client.audit`, :func:`audit_log_path`).

The site's identity and data path come from the node config: ``site-id`` and
``data-path`` in deployment; in simulation only ``partition-id`` exists and is
mapped through the run config (``site-ids``, ``data-root``).

Site-local settings: the run config comes from the coordinator (``flwr run``), the party
small-cell suppression protects against. A deployed site (``data-path`` in its node config, set
by ``onfh site daemon``) therefore takes from its own node config, never from the run config:

* its cache folder, which holds decoded studies, crops, ``site-errors.log`` and the audit log:
  node config ``cache-dir``, else ``<data-path>/.onfh-cache`` (a run config ``cache-dir`` is
  ignored, with one log line), :func:`site_cache_dir`;
* the floor of its small-cell threshold: the effective ``min-cell-heads`` is the larger of the
  run config's value and node config ``min-cell-heads`` (default :data:`SITE_MIN_CELL_HEADS`),
  :func:`site_min_cell_heads`. A run can raise it, never lower it.

Simulated sites (``partition-id``) trust the run config for both, because they are simulated:
one process plays every party (tests and the quick profile use ``min-cell-heads = 1``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
import traceback
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from client import tasks
from client.audit import AUDIT_NAME, audited
from client.site_daemon import SITE_MIN_CELL_HEADS
from client.site_data import SITE_CACHE_NAME, SiteData
from shared_models.config import RunConfig
from shared_models.determinism import configure_determinism
from shared_models.device import select_device
from shared_models.flower.records import record_to_state, state_to_record
from shared_models.specs import (
    ACTION,
    ARRAYS,
    CONFIG,
    CROPS_KEY,
    METRICS,
    NODE_AUDIT_LOG,
    NODE_CACHE_DIR,
    NODE_DATA_PATH,
    NODE_MIN_CELL_HEADS,
    NODE_SITE_ID,
    PARTITION_ID,
    PHASE,
    PROXIMAL_MU,
    SERVER_ROUND,
    SITE,
    SITE_ID,
    Action,
    Phase,
    heads_key,
)
from shared_models.weights import norm_state_keys

log = logging.getLogger(__name__)

app = ClientApp()


def resolve_site(context: Context, cfg: RunConfig) -> tuple[str, Path]:
    """Return ``(site_id, site_root)`` from the node config (deployment) or partition id (simulation).

    Raises:
        ValueError: if neither ``site-id``/``data-path`` nor ``partition-id`` is set.
    """
    node = context.node_config
    if NODE_SITE_ID in node and NODE_DATA_PATH in node:
        return str(node[NODE_SITE_ID]), Path(str(node[NODE_DATA_PATH]))
    if PARTITION_ID in node:
        site_id = cfg.site_for_partition(int(node[PARTITION_ID]))
        if not cfg.data_root:
            raise ValueError("simulation run without run config 'data-root'")
        return site_id, Path(cfg.data_root) / site_id
    raise ValueError("node config needs 'site-id' and 'data-path' (deployment) or 'partition-id' (simulation)")


def is_deployment(context: Context) -> bool:
    """True for a deployed site (node config ``data-path``), False for a simulated one."""
    return NODE_DATA_PATH in context.node_config


_ignored_cache_dirs: set[str] = set()


def site_cache_dir(context: Context, cfg: RunConfig) -> Path:
    """The site's cache folder (decoded studies, crops, error log, audit log).

    Deployment: node config ``cache-dir`` (``onfh site daemon --cache``), else
    ``<data-path>/.onfh-cache``; the run config's ``cache-dir`` is ignored (logged once per
    process). Simulation: :func:`client.tasks.site_cache_dir` (run config ``cache-dir``).

    Raises:
        ValueError: as :func:`resolve_site`.
    """
    site_id, site_root = resolve_site(context, cfg)
    if not is_deployment(context):
        return tasks.site_cache_dir(cfg, site_id, site_root)
    if cfg.cache_dir and cfg.cache_dir not in _ignored_cache_dirs:
        _ignored_cache_dirs.add(cfg.cache_dir)
        log.warning(
            "site %s: the run config's cache-dir is ignored; a deployed site keeps its cache where its "
            "own node config says (onfh site daemon --cache)",
            site_id,
        )
    node = context.node_config
    return Path(str(node[NODE_CACHE_DIR])) if node.get(NODE_CACHE_DIR) else site_root / SITE_CACHE_NAME


def site_min_cell_heads(context: Context, cfg: RunConfig) -> int:
    """The site's small-cell threshold: the run config's ``min-cell-heads`` in simulation; in
    deployment the larger of that and the node config's ``min-cell-heads`` (default
    :data:`~client.site_daemon.SITE_MIN_CELL_HEADS`), so the coordinator can raise it, never lower it.

    Raises:
        ValueError: the node config's ``min-cell-heads`` is not an integer >= 1.
    """
    if not is_deployment(context):
        return cfg.min_cell_heads
    raw = context.node_config.get(NODE_MIN_CELL_HEADS, SITE_MIN_CELL_HEADS)
    try:
        floor = int(str(raw))  # str first: True or 2.5 are refused, not truncated
    except ValueError:
        floor = 0
    if floor < 1:
        raise ValueError(f"node config min-cell-heads must be an integer >= 1, not {raw!r}")
    return max(cfg.min_cell_heads, floor)


def _open(context: Context) -> tuple[RunConfig, SiteData]:
    """The run config with the site's own ``min-cell-heads``, and the site's data (site-local cache)."""
    cfg = RunConfig.from_run_config(context.run_config)
    cfg = dataclasses.replace(cfg, min_cell_heads=site_min_cell_heads(context, cfg))
    configure_determinism(select_device(cfg.device))  # process-wide; before any CUDA work of the handler
    if cfg.torch_threads:  # a last-bit perturbation for the spread measurement (README, Reproducibility)
        torch.set_num_threads(cfg.torch_threads)
    site_id, site_root = resolve_site(context, cfg)
    return cfg, tasks.open_site(cfg, site_id, site_root, site_cache_dir(context, cfg))


def _receive_state(msg: Message, context: Context, cfg: RunConfig, phase: Phase):
    """Global weights from the message, and the norm-layer keys the site keeps local under FedBN.

    Returns:
        ``(state_dict, norm_keys)``; ``norm_keys`` is empty unless the strategy is FedBN, in
        which case the site's own normalisation entries (from ``context.state``) replace
        the global ones.
    """
    state = _unpack(msg.content[ARRAYS], cfg, phase)
    norm_keys = _norm_keys(cfg, phase) if cfg.strategy == "fedbn" else set()
    local_key = f"fedbn-{phase}"
    if norm_keys and local_key in context.state:
        local = context.state[local_key].to_torch_state_dict()
        state.update({k: v for k, v in local.items() if k in norm_keys})
    return state, norm_keys


@functools.lru_cache(maxsize=4)
def _template(phase: Phase, model_config) -> dict:
    """A state dict of the phase's model on the ``meta`` device: names, shapes, dtypes, no memory."""
    from shared_models.detection import YOLOX3D
    from shared_models.stager import MulDenseNet3D

    with torch.device("meta"):
        model = YOLOX3D(model_config) if phase == Phase.DETECTOR else MulDenseNet3D(model_config)
    return model.state_dict()


def _unpack(record: ArrayRecord, cfg: RunConfig, phase: Phase) -> dict:
    """The state dict in a received record (:func:`shared_models.flower.records.record_to_state`)."""
    return record_to_state(record, _template(phase, cfg.model_config(phase)))


def _keep_local_norms(context: Context, state, model_keys: set[str], phase: Phase, cfg: RunConfig) -> None:
    if cfg.strategy == "fedbn":
        context.state[f"fedbn-{phase}"] = ArrayRecord({k: v for k, v in state.items() if k in model_keys})


def _norm_keys(cfg: RunConfig, phase: Phase) -> set[str]:
    from shared_models.detection import YOLOX3D
    from shared_models.stager import MulDenseNet3D

    model = YOLOX3D(cfg.detector) if phase == Phase.DETECTOR else MulDenseNet3D(cfg.stager)
    return norm_state_keys(model)


class SiteStepError(RuntimeError):
    """What the server learns of a failed site step: the step and the exception type, nothing else."""


def _contained(handler):
    """Keep a failure's details at the site.

    An exception text can hold a study path or a manifest row; Flower would send it to the
    server verbatim. The full traceback is appended to ``site-errors.log`` in the site's
    cache folder (it stays at the site); the reply carries only the step and exception type.
    A failed site does not stop the round: the strategy aggregates the others.
    """

    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        try:
            return handler(msg, context)
        except Exception as exc:
            step = f"{msg.metadata.message_type}/{msg.content['config'].get('phase', msg.content['config'].get('action', '?'))}"
            try:
                folder = site_cache_dir(context, RunConfig.from_run_config(context.run_config))
                folder.mkdir(parents=True, exist_ok=True)
                with open(folder / "site-errors.log", "a") as fh:
                    fh.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S')} {step}\n{traceback.format_exc()}\n")
            except Exception:
                pass
            raise SiteStepError(
                f"{step} failed at the site with {type(exc).__name__}; details are in the site's own error log"
            ) from None

    return wrapper


def audit_log_path(context: Context) -> Path:
    """The site's audit log (``client/audit.py``): node config ``audit-log`` if set, else
    ``audit.jsonl`` in the site's cache folder (:func:`site_cache_dir`: in deployment never moved
    by the run config). Every reply leaving the site is recorded there."""
    if NODE_AUDIT_LOG in context.node_config:
        return Path(str(context.node_config[NODE_AUDIT_LOG]))
    return site_cache_dir(context, RunConfig.from_run_config(context.run_config)) / AUDIT_NAME


def _reply(msg: Message, arrays: ArrayRecord | None, metrics: dict) -> Message:
    content = RecordDict({METRICS: MetricRecord(metrics)})
    if arrays is not None:
        content[ARRAYS] = arrays
    return Message(content=content, reply_to=msg)


@app.query()
@audited(audit_log_path)
@_contained
def query(msg: Message, context: Context) -> Message:
    """``hello`` (site id and counts) or ``crops`` (make the phase-2 crops at the site)."""
    # 1. resolve the site and its data
    cfg, site = _open(context)
    action = str(msg.content[CONFIG][ACTION])
    # 2-3. run the action
    if action == Action.HELLO:
        metrics = {heads_key(split): len(site.heads_in(split)) for split in ("train", "val", "test")}
        metrics["studies-refused"] = sum(v.status != "ok" for v in site.verdicts)
        content = RecordDict({SITE: ConfigRecord({SITE_ID: site.site_id}), METRICS: MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)
    if action == Action.CROPS:
        detector = _unpack(msg.content[ARRAYS], cfg, Phase.DETECTOR) if ARRAYS in msg.content else None
        key, metrics = tasks.make_crops(site, cfg, detector)
        content = RecordDict({SITE: ConfigRecord({CROPS_KEY: key}), METRICS: MetricRecord(metrics)})
        return Message(content=content, reply_to=msg)
    if action in (Action.CALIBRATE_VAL, Action.CALIBRATE_EVAL):  # issue 17: aggregates for the bundle's thresholds
        from client.calibration_stats import run as calibration_stats

        detector = _unpack(msg.content[Phase.DETECTOR.value], cfg, Phase.DETECTOR)
        stager = _unpack(msg.content[Phase.STAGER.value], cfg, Phase.STAGER)
        return _reply(msg, None, calibration_stats(action, site, cfg, detector, stager, dict(msg.content[CONFIG])))
    raise ValueError(f"unknown query action {action!r}")


@app.train()
@audited(audit_log_path)
@_contained
def train(msg: Message, context: Context) -> Message:
    """Local training for the phase named in the round's config."""
    # 1. resolve the site
    cfg, site = _open(context)
    config = msg.content[CONFIG]
    phase = Phase.parse(config[PHASE])
    server_round = int(config[SERVER_ROUND])
    mu = float(config.get(PROXIMAL_MU, 0.0))
    # 2. global weights in (FedBN: keep local norm layers)
    state, norm_keys = _receive_state(msg, context, cfg, phase)
    # 3. train
    if phase is Phase.DETECTOR:
        new_state, metrics = tasks.detector_train(site, cfg, state, proximal_mu=mu, server_round=server_round)
    else:
        new_state, metrics = tasks.stager_train(
            site, cfg, state, str(config[CROPS_KEY]), proximal_mu=mu, server_round=server_round
        )
    _keep_local_norms(context, new_state, norm_keys, phase, cfg)
    # 4. reply: weights with dtypes intact, aggregate metrics only
    return _reply(msg, state_to_record(new_state, cfg), metrics)


@app.evaluate()
@audited(audit_log_path)
@_contained
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the global model on the site's held-out (``test``) heads."""
    cfg, site = _open(context)
    config = msg.content[CONFIG]
    phase = Phase.parse(config[PHASE])
    state, _ = _receive_state(msg, context, cfg, phase)
    metrics = tasks.evaluate(site, cfg, phase, state, str(config.get(CROPS_KEY, "")))
    # small cells: a split with fewer than min-cell-heads heads (the site's own floor in deployment)
    # sends only its count (issue 16)
    return _reply(msg, None, tasks.suppress_small_cells(metrics, cfg.min_cell_heads))
