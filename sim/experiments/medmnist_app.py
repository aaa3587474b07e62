"""A small Flower app (ServerApp + ClientApp) for the AdrenalMNIST3D benchmark (:mod:`sim.experiments.medmnist`).

It runs with ``flwr run`` in Flower's simulation engine (Flower 1.42, Ray backend), through the
same :func:`sim.experiments.runner.run_simulation` as the main federation (own SuperLink on 127.0.0.1, no
runtime dependency installation, the run's status read back), one virtual SuperNode per simulated
site. Its components are :data:`server_app` and :data:`client_app` (the small app folder
:func:`write_app_dir` writes names them). A node only knows its ``partition-id``; the
:class:`FedSpec` (built by the driver and written as JSON, whose path is the run-config key
``spec``) maps partition ids to index lists of the prepared training and validation arrays, which
every node reads from the driver's cache folder (memory-mapped ``.npy``), as if each site already
held its own data. The ServerApp writes its result next to the spec (:func:`read_result`).

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

import dataclasses
import functools
import json
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
from shared_models.safe_files import load_tensors, read_regular_file
from shared_models.specs import ARRAYS, METRICS, NUM_EXAMPLES, PARTITION_ID, PROXIMAL_MU, SERVER_ROUND, TRAIN_LOSS
from shared_models.stage_scores import score_histograms
from shared_models.stager import MulDenseNet3D, StagerConfig

log = logging.getLogger(__name__)

HIST_BINS = 1000
STRATEGIES = ("fedavg", "fedprox")
#: Run-config key of the spec's path (the only key of the app's ``[tool.flwr.app.config]``).
SPEC_KEY = "spec"
#: Next to the spec: the ServerApp's result (JSON) and the selected global weights (``torch.save``).
RESULT_NAME, BEST_STATE_NAME = "result.json", "best_state.pt"
#: Caps on the files the benchmark reads back (checked before reading): the spec and result are
#: small JSON (the spec's index lists are a few MB at most); the weights of a benchmark stager are a few MB.
MAX_SPEC_BYTES, MAX_RESULT_BYTES, MAX_STATE_BYTES = 256 << 20, 64 << 20, 1 << 30


@dataclass(frozen=True)
class FedSpec:
    """Everything the two apps need; picklable (Ray ships it to the node actors).

    Attributes:
        data_dir: folder with ``train_x.npy`` (N, 1, S, S, S) float32, ``train_y.npy`` (N,) int64,
            ``val_x.npy``, ``val_y.npy`` (see :func:`sim.experiments.medmnist.prepare_arrays`).
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

    def to_json(self) -> str:
        """The spec as JSON (the stager as its ``to_dict``); :meth:`from_json` reads it back equal."""
        data = dataclasses.asdict(self)
        data["stager"] = self.stager.to_dict()
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> FedSpec:
        """The spec from :meth:`to_json`'s text.

        Raises:
            ValueError: not a spec (unknown or missing fields, bad values; the message names them).
        """
        data = json.loads(text)
        try:
            data["stager"] = StagerConfig.from_dict(data["stager"])
            for key in ("train_parts", "val_parts"):
                data[key] = tuple(tuple(int(i) for i in part) for part in data[key])
            data["flip_dims"] = tuple(int(d) for d in data["flip_dims"])
            return cls(**data)
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a MedMNIST FedSpec: {exc}") from None


def _site_arrays(spec: FedSpec, split: str, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
    parts = spec.train_parts if split == "train" else spec.val_parts
    if not 0 <= partition_id < len(parts):
        raise ValueError(f"partition-id {partition_id} outside 0..{len(parts) - 1}")
    idx = np.asarray(parts[partition_id], np.int64)
    x = np.load(Path(spec.data_dir) / f"{split}_x.npy", mmap_mode="r")
    y = np.load(Path(spec.data_dir) / f"{split}_y.npy")
    return np.ascontiguousarray(x[idx]), y[idx]


@functools.lru_cache(maxsize=2)
def load_spec(path: str) -> FedSpec:
    """The run's :class:`FedSpec` from its JSON file (read once per process, at most ``MAX_SPEC_BYTES``).

    Raises:
        UnsafeFileError: the file is too large or not a regular file; ValueError: not a spec.
    """
    return FedSpec.from_json(read_regular_file(Path(path), MAX_SPEC_BYTES).decode("utf-8"))


def _spec(context: Context) -> FedSpec:
    return load_spec(str(context.run_config[SPEC_KEY]))


client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the global weights on the site's partition (thin handler over :func:`train_stager`)."""
    # 1. resolve the site
    spec = _spec(context)
    pid = int(context.node_config[PARTITION_ID])
    x, y = _site_arrays(spec, "train", pid)
    # 2. global weights and round config in
    config = msg.content["config"]
    server_round = int(config[SERVER_ROUND])
    model = MulDenseNet3D(spec.stager)
    model.load_state_dict(msg.content[ARRAYS].to_torch_state_dict())
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
        proximal_mu=float(config.get(PROXIMAL_MU, 0.0)),
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
        {ARRAYS: ArrayRecord(model.state_dict()), METRICS: MetricRecord({NUM_EXAMPLES: len(x), **metrics})}
    )
    return Message(content=content, reply_to=msg)


@client_app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score the site's validation partition; reply only counts (two histograms of P(class 1))."""
    spec = _spec(context)
    pid = int(context.node_config[PARTITION_ID])
    x, y = _site_arrays(spec, "val", pid)
    model = MulDenseNet3D(spec.stager)
    model.load_state_dict(msg.content[ARRAYS].to_torch_state_dict())
    p_pos = predict_stages(model, x, device=torch.device("cpu"), batch_size=64)[:, 1] if len(x) else np.zeros(0)
    pos, neg = score_histograms(y == 1, p_pos, HIST_BINS)
    content = RecordDict({METRICS: MetricRecord({NUM_EXAMPLES: len(x), "val-hist-pos": pos, "val-hist-neg": neg})})
    return Message(content=content, reply_to=msg)


def pooled_val_auc(contents: list[RecordDict], weighting_key: str) -> MetricRecord:
    """``evaluate_metrics_aggr_fn``: sum the sites' histograms; pooled ``val-auc`` (NaN -> -1)."""
    pos = np.sum([np.asarray(c[METRICS]["val-hist-pos"]) for c in contents], axis=0)
    neg = np.sum([np.asarray(c[METRICS]["val-hist-neg"]) for c in contents], axis=0)
    auc = auc_from_histograms(pos, neg)
    n = sum(int(c[METRICS][weighting_key]) for c in contents)
    return MetricRecord({"val-auc": -1.0 if math.isnan(auc) else auc, NUM_EXAMPLES: n})


def run_strategy(grid: Grid, spec: FedSpec) -> dict:
    """Federate the stager for ``spec.rounds`` rounds; keep the global weights of the best validation round.

    Returns:
        ``{"best_state", "best_round", "best_val_auc", "history"}``; ``history`` holds per round
        ``round``, ``val_auc`` and ``train_loss``.
    """
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
    sink: dict = {"best_state": None, "best_round": 0, "best_val_auc": -math.inf, "history": []}

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
        train_metrics = result.train_metrics_clientapp.get(entry["round"])
        entry["train_loss"] = (
            float(train_metrics[TRAIN_LOSS]) if train_metrics is not None and TRAIN_LOSS in train_metrics else None
        )
    if sink["best_state"] is None:
        sink.update(best_state=result.arrays.to_torch_state_dict(), best_round=spec.rounds)
    return sink


server_app = ServerApp()


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the benchmark's federation and write :func:`run_strategy`'s result next to the spec."""
    spec_path = Path(str(context.run_config[SPEC_KEY]))
    sink = run_strategy(grid, load_spec(str(spec_path)))
    torch.save(sink.pop("best_state"), spec_path.parent / BEST_STATE_NAME)
    best_val_auc = sink["best_val_auc"]
    sink["best_val_auc"] = None if not math.isfinite(best_val_auc) else best_val_auc
    (spec_path.parent / RESULT_NAME).write_text(json.dumps(sink))


def read_result(folder: Path) -> dict:
    """The ServerApp's result in ``folder`` (the spec's): :func:`run_strategy`'s dict, ``best_state`` read with
    ``torch.load(weights_only=True)`` (nothing read from disk executes code).

    Both files are read once with :func:`shared_models.safe_files.read_regular_file`, size-capped
    (``MAX_RESULT_BYTES``, ``MAX_STATE_BYTES``) before reading; the weights go through
    :func:`shared_models.safe_files.load_tensors` (zip entries checked before decoding).

    Raises:
        FileNotFoundError: the run wrote no result (it failed before its end).
        UnsafeFileError: a file is too large, not a regular file, or not plain tensors (names it).
    """
    folder = Path(folder)
    result = json.loads(read_regular_file(folder / RESULT_NAME, MAX_RESULT_BYTES))
    state_path = folder / BEST_STATE_NAME
    result["best_state"] = load_tensors(read_regular_file(state_path, MAX_STATE_BYTES), state_path)
    if result["best_val_auc"] is None:
        result["best_val_auc"] = -math.inf
    return result


#: The app folder's ``pyproject.toml``: Flower reads the components and the run-config defaults from it.
APP_PYPROJECT = f"""[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "onfh-medmnist"
version = "1.0.0"
description = "ONFH-FL's AdrenalMNIST3D benchmark app (sim/experiments/medmnist_app.py)"
dependencies = []

[tool.flwr.app]
publisher = "onfh-fl"

[tool.flwr.app.components]
serverapp = "sim.experiments.medmnist_app:server_app"
clientapp = "sim.experiments.medmnist_app:client_app"

[tool.flwr.app.config]
{SPEC_KEY} = ""
"""


def write_app_dir(folder: Path) -> Path:
    """Write the benchmark's Flower app folder (only ``pyproject.toml``: the code is this installed
    project's, which the app's components name) and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(APP_PYPROJECT)
    return folder
