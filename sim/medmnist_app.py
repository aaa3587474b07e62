"""A small Flower app (ServerApp + ClientApp) for the AdrenalMNIST3D benchmark (:mod:`sim.medmnist`).

It runs in-process with ``flwr.simulation.run_simulation`` (Flower 1.42, Ray backend), one
virtual SuperNode per simulated site. A node only knows its ``partition-id``; the
:class:`FedSpec` (built by the driver, sent with the app) maps partition ids to index lists
of the prepared training and validation arrays, which every node reads from the driver's
cache folder (memory-mapped ``.npy``), as if each site already held its own data.

Message flow per round (Flower's own :class:`~flwr.serverapp.strategy.FedAvg` /
:class:`~flwr.serverapp.strategy.FedProx` drive it):

1. ``train``: the site loads the global weights, runs ``local-steps`` optimiser steps of
   :func:`client.stager_training.train_stager` on its partition with the learning-rate
   schedule continued over global steps (``step_offset = (round - 1) * local_steps``), adds
   FedProx's ``(mu/2)·||w − w_global||²`` when the config carries ``proximal-mu``, and
   replies weights + ``num-examples`` (training volumes) + ``train-loss``.
2. ``evaluate``: the site scores its validation partition with the global weights and
   replies only counts: ``num-examples`` and two ``HIST_BINS``-bin histograms of P(class 1)
   for its positive and negative cases (no per-case values leave the site).
3. The server sums the histograms (``evaluate_metrics_aggr_fn``) and computes the pooled
   validation AUC with scikit-learn (bin centres as scores, counts as sample weights), the
   federated validation metric; ``evaluate_fn`` keeps the global weights of the best round
   (model selection never looks at test data).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedProx

from client.stager_training import predict_stages, train_stager
from shared_models.clinical_stats import auc_from_histograms
from shared_models.stage_scores import score_histograms
from shared_models.stager import MulDenseNet3D, StagerConfig

log = logging.getLogger(__name__)

HIST_BINS = 1000
STRATEGIES = ("fedavg", "fedprox")


@dataclass(frozen=True)
class FedSpec:
    """Everything the two apps need; picklable (Ray ships it to the node actors).

    Attributes:
        data_dir: folder with ``train_x.npy`` (N, 1, S, S, S) float32, ``train_y.npy`` (N,) int64,
            ``val_x.npy``, ``val_y.npy`` (see :func:`sim.medmnist.prepare_arrays`).
        train_parts: per partition id, the training indices of that site.
        val_parts: per partition id, the validation indices of that site.
        stager: model architecture.
        strategy: ``fedavg`` or ``fedprox``.
        proximal_mu: FedProx mu (ignored by FedAvg).
        rounds: federated rounds.
        local_steps: optimiser steps per site per round.
        batch_size, lr, weight_decay, focal_gamma, warmup_steps, class_balanced, flip_dims,
            intensity_aug: :func:`client.stager_training.train_stager` arguments; the cosine
            schedule spans ``rounds * local_steps`` global steps.
        seed: base seed; a site's round seed is ``seed * 100_000 + round * 100 + partition id``.
    """

    data_dir: str
    train_parts: tuple[tuple[int, ...], ...]
    val_parts: tuple[tuple[int, ...], ...]
    stager: StagerConfig
    strategy: str
    proximal_mu: float
    rounds: int
    local_steps: int
    batch_size: int
    lr: float
    weight_decay: float
    focal_gamma: float
    warmup_steps: int
    class_balanced: bool = True
    flip_dims: tuple[int, ...] = (2, 3, 4)
    intensity_aug: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy: expected one of {STRATEGIES}, got {self.strategy!r}")
        if len(self.train_parts) != len(self.val_parts) or not self.train_parts:
            raise ValueError("train_parts and val_parts: one non-empty entry per site expected")

    @property
    def num_sites(self) -> int:
        return len(self.train_parts)


def _site_arrays(spec: FedSpec, split: str, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
    parts = spec.train_parts if split == "train" else spec.val_parts
    if not 0 <= partition_id < len(parts):
        raise ValueError(f"partition-id {partition_id} outside 0..{len(parts) - 1}")
    idx = np.asarray(parts[partition_id], np.int64)
    x = np.load(Path(spec.data_dir) / f"{split}_x.npy", mmap_mode="r")
    y = np.load(Path(spec.data_dir) / f"{split}_y.npy")
    return np.ascontiguousarray(x[idx]), y[idx]


def make_client_app(spec: FedSpec) -> ClientApp:
    """The benchmark's ClientApp: thin ``train``/``evaluate`` handlers over the stager loops."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        # 1. resolve the site
        pid = int(context.node_config["partition-id"])
        x, y = _site_arrays(spec, "train", pid)
        # 2. global weights and round config in
        config = msg.content["config"]
        server_round = int(config["server-round"])
        model = MulDenseNet3D(spec.stager)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        # 3. train (the schedule continues over global steps)
        metrics = train_stager(
            model,
            x,
            y,
            steps=spec.local_steps,
            batch_size=spec.batch_size,
            lr=spec.lr,
            weight_decay=spec.weight_decay,
            focal_gamma=spec.focal_gamma,
            device=torch.device("cpu"),
            proximal_mu=float(config.get("proximal-mu", 0.0)),
            class_balanced=spec.class_balanced,
            flip_dims=spec.flip_dims,
            intensity_aug=spec.intensity_aug,
            seed=spec.seed * 100_000 + server_round * 100 + pid,
            step_offset=(server_round - 1) * spec.local_steps,
            total_steps=spec.rounds * spec.local_steps,
            warmup_steps=spec.warmup_steps,
        )
        # 4. reply
        content = RecordDict(
            {"arrays": ArrayRecord(model.state_dict()), "metrics": MetricRecord({"num-examples": len(x), **metrics})}
        )
        return Message(content=content, reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        x, y = _site_arrays(spec, "val", pid)
        model = MulDenseNet3D(spec.stager)
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        p_pos = predict_stages(model, x, device=torch.device("cpu"), batch_size=64)[:, 1] if len(x) else np.zeros(0)
        pos, neg = score_histograms(y == 1, p_pos, HIST_BINS)
        content = RecordDict(
            {"metrics": MetricRecord({"num-examples": len(x), "val-hist-pos": pos, "val-hist-neg": neg})}
        )
        return Message(content=content, reply_to=msg)

    return app


def pooled_val_auc(contents: list[RecordDict], weighting_key: str) -> MetricRecord:
    """``evaluate_metrics_aggr_fn``: sum the sites' histograms; pooled ``val-auc`` (NaN -> -1)."""
    pos = np.sum([np.asarray(c["metrics"]["val-hist-pos"]) for c in contents], axis=0)
    neg = np.sum([np.asarray(c["metrics"]["val-hist-neg"]) for c in contents], axis=0)
    auc = auc_from_histograms(pos, neg)
    n = sum(int(c["metrics"][weighting_key]) for c in contents)
    return MetricRecord({"val-auc": -1.0 if math.isnan(auc) else auc, "num-examples": n})


def make_server_app(spec: FedSpec, sink: dict) -> ServerApp:
    """The benchmark's ServerApp; fills ``sink`` with ``best_state``, ``best_round``,
    ``best_val_auc`` and ``history`` (per round: ``round``, ``val_auc``, ``train_loss``)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.manual_seed(spec.seed)
        model = MulDenseNet3D(spec.stager)
        n = spec.num_sites
        latest: dict[str, float] = {}  # this round's pooled validation AUC, read by keep_best

        def aggregate_val(contents: list[RecordDict], weighting_key: str) -> MetricRecord:
            record = pooled_val_auc(contents, weighting_key)
            latest["val-auc"] = float(record["val-auc"])
            return record

        common = {
            "fraction_train": 1.0,
            "fraction_evaluate": 1.0,
            "min_train_nodes": n,
            "min_evaluate_nodes": n,
            "min_available_nodes": n,
            "evaluate_metrics_aggr_fn": aggregate_val,
        }
        strategy = FedProx(proximal_mu=spec.proximal_mu, **common) if spec.strategy == "fedprox" else FedAvg(**common)
        sink.update(best_state=None, best_round=0, best_val_auc=-math.inf, history=[])

        def keep_best(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
            # Flower calls this after the round's federated evaluation (and once for round 0).
            if server_round == 0:
                return None
            val = latest.pop("val-auc", None)
            sink["history"].append({"round": server_round, "val_auc": val})
            if val is not None and val > sink["best_val_auc"]:
                sink.update(best_state=arrays.to_torch_state_dict(), best_round=server_round, best_val_auc=val)
            return MetricRecord({"best-round": sink["best_round"]})

        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(model.state_dict()),
            num_rounds=spec.rounds,
            train_config=ConfigRecord({}),
            evaluate_config=ConfigRecord({}),
            evaluate_fn=keep_best,
        )
        for entry in sink["history"]:
            train = result.train_metrics_clientapp.get(entry["round"])
            entry["train_loss"] = float(train["train-loss"]) if train is not None and "train-loss" in train else None
        if sink["best_state"] is None:
            sink.update(best_state=result.arrays.to_torch_state_dict(), best_round=spec.rounds)

    return app
