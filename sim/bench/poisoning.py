"""Poisoning benchmark (issue 16): one malicious site of four, against the real ServerApp and ClientApp.

``onfh sim bench --only poisoning`` runs the whole federation of :mod:`server.server_app` (site
discovery, detector phase, site-local crops, stager phase, report, signed bundle) **in this
process**: :class:`LocalGrid` is a Flower ``Grid`` that hands every message to the real ClientApp
handler of its node (:mod:`client.client_app`: ``query``, ``train``, ``evaluate``) one after the
other, instead of a SuperLink and Ray workers. The strategies, the update checks and the
aggregation are Flower's and this project's own classes, unchanged; only the transport is left
out, so a run costs the local training and nothing else (2 shared CPU cores: a full ``flwr run``
per attack and strategy would not fit in 20 minutes).

The malicious site is site ``D``: :func:`attack_reply` rewrites its honest reply before the
server sees it, one attack of issue 16 rows 3-5 per run:

* ``huge-1e30``: every floating value of the update is 1e30 (finite);
* ``sign-flip-x10``: ``w_global - 10 (w_D - w_global)``;
* ``random-weights``: every floating value drawn from N(0, 1);
* ``int-buffer-2^62``: every integer entry (BatchNorm ``num_batches_tracked``) is 2**62;
* ``num-examples-1e9``: the honest update, claiming 10**9 training examples;
* ``val-score-1e6``: every evaluate reply claims a validation score of 1e6.

Each run's **final model** is the one the bundle ships (the round with the best validation score);
it is evaluated outside the federation on the test heads of the three honest sites A-C with the
sites' own functions (:mod:`client.tasks`): pooled test macro AUC of the stager (pooled counts,
:func:`server.report.group_stage_metrics`) and the example-weighted mean detector IoU. The clean
run (no attack) is repeated over ``seeds`` seeds under FedAvg: the spread of those figures is
the bar the attacks are measured against (issue 16's target: within the clean-run seed spread).

Data: 4 phantom sites (``quick`` scanners, ``heads`` heads each), split by patient 50/20/30 into
train/val/test so that every site trains and has validation and test heads; run config from the
pyproject defaults with small widths and short schedules (the ``SCHEDULE`` below). The phantoms
hold no patients, so ``min-cell-heads`` is 1 here (the small-cell rule is tested on its own).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shared_models.specs import (
    IOU_MEAN,
    NUM_EXAMPLES,
    NUM_PARTITIONS,
    PARTITION_ID,
    PHASES,
    ROBUST_STRATEGIES,
    VAL_SCORE,
)
from sim.bench.core import Row, section
from sim.bench.data import DEFAULT_WORK

__all__ = ["ATTACKS", "LocalGrid", "attack_reply", "finish_rows", "poisoning_benchmark", "poisoning_markdown"]

logger = logging.getLogger(__name__)

ATTACKS = ("huge-1e30", "sign-flip-x10", "random-weights", "int-buffer-2^62", "num-examples-1e9", "val-score-1e6")
SITES = ("A", "B", "C", "D")
MALICIOUS = "D"

#: Run-config overrides of every benchmark run: small widths, short schedules, all four sites train.
SCHEDULE: dict[str, Any] = {
    "site-ids": ",".join(SITES),
    "train-sites": ",".join(SITES),
    "split-sites": ",".join(SITES),
    "report-groups": "all=" + ",".join(SITES),
    "device": "cpu",
    "amp": False,
    "detector-rounds": 2,
    "detector-local-steps": 4,
    "detector-batch-size": 4,
    "detector-warmup-steps": 0,
    "detector-widths": "8,16,16,32",
    "detector-head-width": 16,
    "detector-l1-rounds": 0,
    "stager-rounds": 3,
    "stager-local-steps": 12,
    "stager-batch-size": 8,
    "stager-warmup-steps": 0,
    "stager-init-features": 8,
    "stager-growth-rate": 4,
    "stager-block-config": "1,2",
    "stager-pool-scales": "1,2",
    "crop-source": "ground-truth",
    "min-cell-heads": 1,
    "krum-byzantine": 0,
    "node-wait-timeout-s": 30.0,
    "round-timeout-s": 600.0,
}


# ----------------------------------------------------------------------------- the in-process grid


@contextlib.contextmanager
def _task_identity(run_id: int = 1):
    """Flower stamps new Messages with the running task's identity; outside Flower there is none."""
    from shared_models.flower.internals import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = run_id, 1, 0
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = old


def _grid_base():
    from flwr.serverapp import Grid

    return Grid


class LocalGrid(_grid_base()):
    """A Flower ``Grid`` that delivers each message to the real ClientApp handler of its node, in this
    process, in node order, and keeps the replies until they are pulled.

    Args:
        contexts: node id -> the node's Flower ``Context`` (``node_config`` with ``partition-id``).
        tamper: ``(node_id, message, reply) -> reply``, applied to every reply (the attack).
    """

    def __init__(self, contexts: dict[int, Any], tamper: Callable[[int, Any, Any], Any] | None = None) -> None:
        self.contexts, self.tamper = contexts, tamper
        self._replies: dict[str, Any] = {}
        self._count = 0
        self._run = None

    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        from flwr.app import Message

        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return sorted(self.contexts)

    def _handle(self, msg):
        from flwr.app import Error, Message

        from client import client_app

        handler = {"query": client_app.query, "train": client_app.train, "evaluate": client_app.evaluate}[
            msg.metadata.message_type.split(".")[0]
        ]
        node = msg.metadata.dst_node_id
        try:
            reply = handler(msg, self.contexts[node])
        except Exception as exc:
            reply = Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
        return self.tamper(node, msg, reply) if self.tamper else reply

    def push_messages(self, messages: Iterable[Any]) -> Iterable[str]:
        ids = []
        for msg in sorted(messages, key=lambda m: m.metadata.dst_node_id):
            self._count += 1
            msg.metadata.__dict__["_message_id"] = f"local-{self._count}"  # as Flower's InMemoryGrid does
            self._replies[msg.metadata.message_id] = self._handle(msg)
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Any]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None) -> Iterable[Any]:
        return self.pull_messages(self.push_messages(messages))


# ----------------------------------------------------------------------------- the attacks


def attack_reply(attack: str, msg, reply, rng: np.random.Generator):
    """The malicious site's reply for ``attack`` (module notes), built from its honest ``reply``.

    Args:
        attack: one of :data:`ATTACKS`, or ``"none"``.
        msg: the server's message (train: its ``arrays`` are the round's global model).
        reply: the site's honest reply.
        rng: random stream of ``random-weights``.

    Returns:
        A new reply to ``msg`` (or ``reply`` itself when the attack does not touch this message).

    Raises:
        ValueError: for an unknown attack.
    """
    from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

    if attack not in ATTACKS + ("none",):
        raise ValueError(f"unknown attack {attack!r}; expected one of {ATTACKS}")
    kind = msg.metadata.message_type.split(".")[0]
    if attack == "none" or reply.has_error() or kind not in ("train", "evaluate"):
        return reply
    metrics = dict(reply.content["metrics"])
    if kind == "evaluate":
        if attack != "val-score-1e6":
            return reply
        metrics[VAL_SCORE] = 1e6
        return Message(RecordDict({"metrics": MetricRecord(metrics)}), reply_to=msg)
    if attack == "val-score-1e6":
        return reply
    arrays = {k: reply.content["arrays"][k].numpy() for k in reply.content["arrays"].keys()}
    sent = {k: msg.content["arrays"][k].numpy() for k in msg.content["arrays"].keys()}
    out = {}
    for key, value in arrays.items():
        floating = np.issubdtype(value.dtype, np.floating)
        if attack == "huge-1e30" and floating:
            value = np.full_like(value, 1e30)
        elif attack == "sign-flip-x10" and floating:
            value = (sent[key] - 10.0 * (value - sent[key])).astype(value.dtype)
        elif attack == "random-weights" and floating:
            value = rng.standard_normal(value.shape).astype(value.dtype)
        elif attack == "int-buffer-2^62" and not floating:
            value = np.full_like(value, 2**62)
        out[key] = Array(np.ascontiguousarray(value))
    if attack == "num-examples-1e9":
        metrics[NUM_EXAMPLES] = 10**9
    return Message(RecordDict({"arrays": ArrayRecord(out), "metrics": MetricRecord(metrics)}), reply_to=msg)


# ----------------------------------------------------------------------------- data and one run


def poisoning_phantoms(work: Path, heads: int = 30, seed: int = 0) -> Path:
    """Four phantom sites A-D (``quick`` scanners, ``heads`` heads each), split by patient 50/20/30
    into train/val/test (``split.csv``); generated once under ``work/poisoning-phantoms-<heads>``."""
    from client.site_data import read_site_csv
    from client.site_layout import MANIFEST_COLUMNS, MANIFEST_NAME, SPLIT_COLUMNS, SPLIT_NAME
    from sim.phantoms import PROFILES, generate_phantoms

    root = Path(work) / f"poisoning-phantoms-{heads}"
    if not (root / "phantoms.json").exists():
        quick = PROFILES["quick"]
        patients = math.ceil(heads * 0.6)
        profile = dataclasses.replace(
            quick,
            name="poisoning",
            heads_per_site=dict.fromkeys(SITES, heads),
            patients_per_site=dict.fromkeys(SITES, patients),
        )
        logger.info("generating 4 phantom sites of %d heads in %s", heads, root)
        generate_phantoms(root, profile, seed=seed, workers=1)
    rng = np.random.default_rng(seed)
    for site in SITES:
        patients = sorted(
            {row["patient_id"] for _, row in read_site_csv(root / site / MANIFEST_NAME, MANIFEST_COLUMNS)}
        )
        order = [patients[i] for i in rng.permutation(len(patients))]
        n_train, n_val = round(0.5 * len(order)), round(0.2 * len(order))
        with open(root / site / SPLIT_NAME, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(SPLIT_COLUMNS)
            for i, p in enumerate(order):
                writer.writerow([p, "train" if i < n_train else "val" if i < n_train + n_val else "test"])
    return root


def run_federation(
    data: Path, out: Path, *, strategy: str, attack: str, seed: int, overrides: dict[str, Any] | None = None
) -> dict[str, Any]:
    """One federation of the real ServerApp (:func:`server.server_app.main`) over :class:`LocalGrid`,
    site D replying with ``attack``; the bundle's models evaluated on the honest sites' test heads.

    Returns:
        ``{"macro_auc", "iou_mean", "selected_rounds", "rejected", "wall_s"}``: pooled stager macro AUC
        and mean detector IoU over the test heads of A-C; the rounds the bundle ships; how many
        replies the checks rejected.
    """
    from flwr.app import Context, RecordDict

    from client import tasks
    from server import server_app
    from server.report import group_stage_metrics
    from shared_models.config import RunConfig, default_run_config

    shutil.rmtree(out, ignore_errors=True)
    rc = {
        **default_run_config(),
        **SCHEDULE,
        **(overrides or {}),
        "data-root": str(data),
        "cache-dir": str(Path(data).parent / f"{Path(data).name}-cache"),
        "out-dir": str(out),
        "strategy": strategy,
        "seed": seed,
        # an in-process simulation: sites are named by partition, not by enrolled keys (the sim runner sets the same)
        "identity": "simulation",
    }
    contexts = {
        i + 1: Context(
            run_id=1,
            node_id=i + 1,
            node_config={PARTITION_ID: i, NUM_PARTITIONS: len(SITES)},
            state=RecordDict(),
            run_config=rc,
        )
        for i in range(len(SITES))
    }
    bad_node = SITES.index(MALICIOUS) + 1
    rng = np.random.default_rng(seed + 1000)
    grid = LocalGrid(
        contexts, tamper=lambda node, msg, reply: attack_reply(attack, msg, reply, rng) if node == bad_node else reply
    )
    t0 = time.perf_counter()
    with _task_identity():
        server_app.main(grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=rc))
    wall = time.perf_counter() - t0

    import json

    import torch

    from shared_models.detection import YOLOX3D
    from shared_models.stager import MulDenseNet3D

    cfg = RunConfig.from_run_config(rc)
    report = json.loads((out / "report.json").read_text())
    detector, stager = YOLOX3D(cfg.detector), MulDenseNet3D(cfg.stager)
    # the bundle's weights: read back with the bundle's own loader (verified against the run's key)
    from shared_models.bundle import load_bundle

    bundle = load_bundle(out / "bundle", out / "keys" / "bundle-signing-key.pem.pub")
    detector.load_state_dict(bundle.detector.state_dict())
    stager.load_state_dict(bundle.stager.state_dict())
    det_state = {k: v.detach().cpu() for k, v in detector.state_dict().items()}
    stg_state = {k: v.detach().cpu() for k, v in stager.state_dict().items()}
    honest = [s for s in SITES if s != MALICIOUS]
    with torch.no_grad():
        sites = {s: tasks.open_site(cfg, s, Path(data) / s) for s in honest}
        det = {s: tasks.detector_evaluate(site, cfg, det_state) for s, site in sites.items()}
        key = {tasks.make_crops(site, cfg, det_state)[0] for site in sites.values()}.pop()
        stg = {s: tasks.stager_evaluate(site, cfg, stg_state, key) for s, site in sites.items()}
    n = sum(m[NUM_EXAMPLES] for m in det.values())
    iou = sum(m[IOU_MEAN] * m[NUM_EXAMPLES] for m in det.values()) / n if n else float("nan")
    pooled = group_stage_metrics(stg, {"honest": tuple(honest)})["honest"]
    rejected = sum(len(sites_) for phase in report.get("rejected_updates", {}).values() for sites_ in phase.values())
    return {
        "macro_auc": float(pooled.get("macro", {}).get("auc", float("nan"))),
        "iou_mean": float(iou),
        "selected_rounds": report.get("selected_rounds"),
        "rejected": rejected,
        "wall_s": wall,
        "weights": {"detector": _flat(det_state), "stager": _flat(stg_state)},
    }


def _flat(state: dict) -> np.ndarray:
    """Every floating entry of a state dict, concatenated (float64): the model as one vector."""
    return np.concatenate([v.numpy().astype(np.float64).ravel() for v in state.values() if v.is_floating_point()])


def _shift(a: dict, b: dict) -> dict[str, float]:
    return {phase: float(np.linalg.norm(a["weights"][phase] - b["weights"][phase])) for phase in PHASES}


# ----------------------------------------------------------------------------- the section


@section("poisoning", "Poisoning: one malicious site of 4, drop in test macro AUC and detector IoU vs the clean run")
def poisoning_benchmark(
    *,
    work: Path = DEFAULT_WORK,
    seeds: int = 3,
    strategies: Sequence[str] = ("fedavg",) + ROBUST_STRATEGIES,
    attacks: Sequence[str] = ATTACKS,
    robust_attacks: Sequence[str] = ATTACKS[:4],
    heads: int = 20,
    schedule: dict[str, Any] | None = None,
    baseline: bool = True,
    quick: bool = False,
) -> list[Row]:
    """Every attack under every strategy, against that strategy's clean run (module notes).

    Args:
        work: folder for the phantoms, their cache and the runs.
        seeds: clean FedAvg runs (seeds 0..seeds-1) whose spread is the bar; attacked runs use seed 0.
        strategies: ``fedavg`` (with the update checks, as every strategy) and robust ones.
        attacks: a subset of :data:`ATTACKS`, run under FedAvg.
        robust_attacks: the attacks run under the robust strategies (default: the update attacks of
            row 3; rows 4-5 are stopped by the same checks under every strategy).
        heads: heads per phantom site.
        schedule: run-config overrides on top of :data:`SCHEDULE` (e.g. ``{"stager-rounds": 2}``).
        baseline: run each strategy's clean run; False when those come from another invocation
            (rows are merged by :func:`finish_rows`; the weight shifts are then left undefined).
        quick: a smoke run: one seed, FedAvg only, two attacks, shorter schedules.

    Returns:
        One row per (strategy, attack), ``attack = "none"`` for the clean runs, with ``macro_auc``,
        ``iou_mean``, their drops against the strategy's clean seed-0 run, the clean FedAvg seed
        spread (max - min) and whether the drop is within it (:func:`finish_rows`);
        ``stager_shift`` / ``detector_shift``: L2 distance of the shipped weights from the strategy's
        clean seed-0 run, and ``clean_stager_shift`` / ``clean_detector_shift``: the largest such
        distance of a clean FedAvg seed from seed 0 (the model's own seed spread). Rows are also appended, as they come, to
        ``work/poisoning-rows.jsonl`` (a run cut short keeps what it measured).
    """
    import json

    overrides: dict[str, Any] = {}
    if quick:
        seeds, strategies, attacks, robust_attacks, heads = (
            1,
            ("fedavg",),
            ("sign-flip-x10", "num-examples-1e9"),
            (),
            12,
        )
        overrides = {"detector-rounds": 1, "stager-rounds": 2, "detector-local-steps": 3, "stager-local-steps": 3}
    overrides.update(schedule or {})
    data = poisoning_phantoms(Path(work), heads=heads)
    runs = Path(work) / "poisoning-runs"
    log_rows = Path(work) / "poisoning-rows.jsonl"
    log_rows.unlink(missing_ok=True)
    rows: list[Row] = []
    clean: dict[str, dict] = {}

    def record(strategy: str, attack: str, seed: int, result: dict) -> None:
        logger.info(
            "%s under %s (seed %d): macro AUC %.3f, IoU %.3f, %d replies rejected (%.0f s)",
            attack,
            strategy,
            seed,
            result["macro_auc"],
            result["iou_mean"],
            result["rejected"],
            result["wall_s"],
        )
        row = {"section": "poisoning", "strategy": strategy, "attack": attack, "seed": seed, **_figures(result)}
        base = clean.get(strategy)
        shifts = _shift(result, base) if base else {"detector": float("nan"), "stager": float("nan")}
        row.update(**{f"{p}_shift": v for p, v in shifts.items()})
        rows.append(row)
        with open(log_rows, "a") as fh:
            fh.write(json.dumps(row) + "\n")

    for seed in range(seeds):
        result = run_federation(
            data, runs / f"fedavg-none-{seed}", strategy="fedavg", attack="none", seed=seed, overrides=overrides
        )
        clean.setdefault("fedavg", result)
        record("fedavg", "none", seed, result)
    for strategy in strategies:
        if strategy not in clean and baseline:
            clean[strategy] = run_federation(
                data, runs / f"{strategy}-none-0", strategy=strategy, attack="none", seed=0, overrides=overrides
            )
            record(strategy, "none", 0, clean[strategy])
        for attack in attacks if strategy == "fedavg" else robust_attacks:
            result = run_federation(
                data, runs / f"{strategy}-{attack}-0", strategy=strategy, attack=attack, seed=0, overrides=overrides
            )
            record(strategy, attack, 0, result)
    return finish_rows(rows)


def finish_rows(rows: Sequence[Row]) -> list[Row]:
    """Drops against each strategy's clean seed-0 row; the clean FedAvg seed spread; the verdict.

    The spread is max - min over the clean FedAvg rows (``attack == "none"``) of ``macro_auc`` and
    ``iou_mean``, and the largest weight distance of a clean seed from seed 0 (``*_shift``). A row is
    ``within_spread`` when both of its drops are no larger (in magnitude) than the spread; None with
    fewer than 2 clean seeds. Also merges rows of separate invocations (e.g. FedAvg and the robust
    strategies run apart): pass them all.
    """
    rows = [dict(r) for r in rows]
    ref = {r["strategy"]: r for r in rows if r["attack"] == "none" and r["seed"] == 0}
    for row in rows:  # drops against the same strategy's clean seed-0 run (NaN without one)
        b = ref.get(row["strategy"])
        row["auc_drop"] = b["macro_auc"] - row["macro_auc"] if b else float("nan")
        row["iou_drop"] = b["iou_mean"] - row["iou_mean"] if b else float("nan")
    base = [r for r in rows if r["strategy"] == "fedavg" and r["attack"] == "none"]

    def spread(key: str) -> float:
        return max(r[key] for r in base) - min(r[key] for r in base) if len(base) > 1 else float("nan")

    auc_bar, iou_bar = spread("macro_auc"), spread("iou_mean")
    shift = {
        p: max((r[f"{p}_shift"] for r in base), default=float("nan")) if len(base) > 1 else float("nan") for p in PHASES
    }
    for row in rows:
        row.update(
            clean_auc_spread=auc_bar,
            clean_iou_spread=iou_bar,
            clean_detector_shift=shift["detector"],
            clean_stager_shift=shift["stager"],
        )
        row["within_spread"] = (
            bool(abs(row["auc_drop"]) <= auc_bar + 1e-9 and abs(row["iou_drop"]) <= iou_bar + 1e-9)
            if not (math.isnan(auc_bar) or math.isnan(row["auc_drop"]))
            else None
        )
    return rows


def _figures(result: dict) -> dict:
    selected = result.get("selected_rounds") or {}
    return {
        "macro_auc": result["macro_auc"],
        "iou_mean": result["iou_mean"],
        "rejected_replies": result["rejected"],
        "selected_detector_round": selected.get("detector"),
        "selected_stager_round": selected.get("stager"),
        "wall_s": result["wall_s"],
    }


def poisoning_markdown(rows: Sequence[Row]) -> str:
    """The rows as one markdown table (for the README): strategy, attack, figures, drops, verdict."""
    lines = [
        "| strategy | attack | seed | test macro AUC | drop | detector IoU | drop | stager shift | detector shift "
        "| rejected replies | within clean spread |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(v, spec=".3f"):
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)

    for r in rows:
        verdict = {True: "yes", False: "**no**", None: "n/a"}[r.get("within_spread")]
        lines.append(
            f"| {r['strategy']} | {r['attack']} | {r['seed']} | {f(r['macro_auc'])} | {f(r['auc_drop'], '+.3f')} | "
            f"{f(r['iou_mean'])} | {f(r['iou_drop'], '+.3f')} | {f(r['stager_shift'], '.2f')} | "
            f"{f(r['detector_shift'], '.2f')} | {r['rejected_replies']} | {verdict} |"
        )
    if rows:
        r0 = rows[0]
        lines.append(
            f"\nClean FedAvg seed spread (max - min over {sum(r['attack'] == 'none' and r['strategy'] == 'fedavg' for r in rows)} "
            f"seeds): macro AUC {f(r0['clean_auc_spread'])}, IoU {f(r0['clean_iou_spread'])}; weight distance "
            f"of a clean seed from seed 0 (L2, largest): stager {f(r0['clean_stager_shift'], '.2f')}, detector "
            f"{f(r0['clean_detector_shift'], '.2f')}. Shifts: L2 distance of the shipped weights from the "
            "strategy's clean seed-0 run."
        )
    return "\n".join(lines)
