"""The one typed run configuration, built from Flower's ``context.run_config``.

Defaults live only in ``[tool.flwr.app.config]`` of ``pyproject.toml``; this module
validates types and ranges and names the bad key in its ``ValueError``. It imports
neither Flower nor torch, MONAI or SimpleITK: callers pass the plain mapping
(``dict(context.run_config)``). ``shared_models.config`` re-exports it under its old path.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared_models.specs.keys import Phase
from shared_models.specs.models import INPUT_NORMS, DetectorConfig, PreprocessingSpec, StagerConfig

#: Aggregation strategies of the run-config key ``strategy``; the last three are robust (issue 7).
#: The one list: ``strategies.site_aware.build_strategy`` and the CLI's ``--strategy`` take it from here.
STRATEGIES = ("fedavg", "fedprox", "fedbn", "fedmedian", "fedtrimmedavg", "krum")
#: The robust subset of :data:`STRATEGIES` (they bound one site's pull on the model).
ROBUST_STRATEGIES = ("fedmedian", "fedtrimmedavg", "krum")
CROP_SOURCES = ("detector", "ground-truth")
MODEL_SIZES = ("default", "paper")
DEVICES = ("auto", "cpu", "cuda")
LR_SCHEDULES = ("cosine", "constant")
IDENTITIES = ("enrolled", "simulation")  # review F7: who says which site a node is (server_app.discover_sites)
TRACKERS = ("mlflow", "tensorboard", "none")  # issue 21 (server/tracking.py)
#: Allowed transfer dtypes of floating entries (run-config key ``transfer-dtype``; see ``shared_models.transfer``).
TRANSFER_DTYPES = ("float32", "float16")

PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


def default_run_config(pyproject: Path = PYPROJECT) -> dict[str, Any]:
    """Return the run-config defaults declared in ``[tool.flwr.app.config]``.

    Raises:
        FileNotFoundError: if ``pyproject`` does not exist.
        KeyError: if it has no ``[tool.flwr.app.config]`` table.
    """
    with open(pyproject, "rb") as fh:
        return dict(tomllib.load(fh)["tool"]["flwr"]["app"]["config"])


def _ints(key: str, text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in str(text).split(",") if v.strip())
    except ValueError:
        raise ValueError(f"run config {key!r}: expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise ValueError(f"run config {key!r}: expected positive integers, got {text!r}")
    return values


def _names(key: str, text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in str(text).split(",") if v.strip())
    if not values:
        raise ValueError(f"run config {key!r}: expected a comma-separated list of site ids, got {text!r}")
    return values


def _spec(crop_shape: str, margin_mm: float) -> PreprocessingSpec:
    shape = _ints("crop-shape", crop_shape)
    if len(shape) != 3:
        raise ValueError(f"run config 'crop-shape': expected D,H,W, got {crop_shape!r}")
    if margin_mm < 0:
        raise ValueError(f"run config 'crop-margin-mm': must be >= 0, got {margin_mm}")
    return PreprocessingSpec(crop_shape=shape, crop_margin_mm=margin_mm)


def robust_strategy_problem(strategy: str, n_train: int, trimmed_beta: float, krum_byzantine: int) -> str | None:
    """Why a robust strategy cannot keep its promise with ``n_train`` training sites; None when it can.

    * ``fedtrimmedavg`` cuts ``int(beta * n)`` updates at each end (Flower's ``trim_mean``); with
      ``beta * n < 1`` it cuts nothing and is a plain mean. ``beta`` must be in [0, 0.5).
    * ``krum`` (Blanchard et al. 2017, NeurIPS) tolerates ``f`` Byzantine sites only when ``n > 2f + 2``.
    * ``fedmedian`` (Yin et al. 2018) is the mean of both updates at 2 sites: needs ``n >= 3``.

    Other strategies: always None.
    """
    if strategy == "fedtrimmedavg":
        if not 0.0 <= trimmed_beta < 0.5:
            return f"'trimmed-beta' must be in [0, 0.5), got {trimmed_beta}"
        if int(trimmed_beta * n_train) < 1:
            return (
                f"fedtrimmedavg with trimmed-beta {trimmed_beta:g} trims int({trimmed_beta:g} x {n_train}) = 0 "
                f"updates at {n_train} training site(s): it would be a plain mean; needs trimmed-beta x sites >= 1"
            )
    if strategy == "krum":
        if krum_byzantine < 0:
            return f"'krum-byzantine' must be >= 0, got {krum_byzantine}"
        if n_train <= 2 * krum_byzantine + 2:
            return (
                f"krum tolerates krum-byzantine = {krum_byzantine} malicious site(s) only with more than "
                f"{2 * krum_byzantine + 2} training sites (n > 2f + 2), got {n_train}"
            )
    if strategy == "fedmedian" and n_train < 3:
        return (
            f"fedmedian needs at least 3 training sites to outvote one (the median of 2 is their mean), got {n_train}"
        )
    return None


def tracking_uri_problem(track: str, uri: str) -> str | None:
    """Why ``tracking-uri`` ``uri`` cannot serve ``track``; None when it can.

    MLflow takes a URI with a scheme (``http://127.0.0.1:5000``, ``sqlite:////abs/mlflow.db``);
    TensorBoard takes an absolute log folder (the ServerApp does not run in the caller's folder).
    ``""`` means the default under ``out-dir``; with ``track = "none"`` the URI is ignored.
    """
    if not uri or track == "none":
        return None
    if track == "mlflow" and not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", uri):
        return (
            f"'tracking-uri': MLflow needs a URI such as http://127.0.0.1:5000 or sqlite:////abs/path/mlflow.db, "
            f"got {uri!r}"
        )
    if track == "tensorboard" and not Path(uri).is_absolute():
        return f"'tracking-uri': TensorBoard needs an absolute log folder, got {uri!r}"
    return None


def _fraction(value: float) -> float:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"run config 'min-site-fraction': must be in (0, 1], got {value}")
    return value


def parse_report_groups(text: str) -> dict[str, tuple[str, ...]]:
    """Parse ``"A-test=A;external-1=B;external-2=C,D"`` into ``{group: (site, ...)}``.

    Raises:
        ValueError: on a malformed entry (names the entry).
    """
    groups: dict[str, tuple[str, ...]] = {}
    for entry in str(text).split(";"):
        if not entry.strip():
            continue
        name, sep, sites = entry.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"run config 'report-groups': malformed entry {entry!r}; expected NAME=SITE[,SITE]")
        groups[name.strip()] = _names("report-groups", sites)
    if not groups:
        raise ValueError("run config 'report-groups' is empty")
    return groups


def parse_site_nodes(text: str, site_ids: tuple[str, ...]) -> dict[str, int]:
    """Parse ``"A=5512,B=9071"`` (site -> the node id Flower assigned to its enrolled key) into a dict.

    Empty text means no binding (simulation: the partition id names the site). A binding that
    is given must cover every site of ``site_ids`` and give each node to one site only.

    Raises:
        ValueError: a malformed entry, an unknown or unbound site, or a node bound twice (names it).
    """
    nodes: dict[str, int] = {}
    for entry in str(text).split(","):
        if not entry.strip():
            continue
        site, sep, node = entry.partition("=")
        site = site.strip()
        if site in nodes:
            raise ValueError(f"run config 'site-nodes': site {site!r} is bound twice")
        try:
            nodes[site] = int(node.strip())
        except ValueError:
            raise ValueError(f"run config 'site-nodes': malformed entry {entry!r}; expected SITE=NODE_ID") from None
        if not sep or not site:
            raise ValueError(f"run config 'site-nodes': malformed entry {entry!r}; expected SITE=NODE_ID")
    if not nodes:
        return {}
    unknown = sorted(set(nodes) - set(site_ids))
    unbound = [s for s in site_ids if s not in nodes]
    if unknown or unbound:
        raise ValueError(
            f"run config 'site-nodes': binds sites {unknown} that are not in site-ids"
            if unknown
            else f"run config 'site-nodes': sites {unbound} have no enrolled node"
        )
    if len(set(nodes.values())) != len(nodes):
        raise ValueError("run config 'site-nodes': one node id is bound to two sites")
    return nodes


@dataclass(frozen=True)
class PhaseConfig:
    """How one phase trains, from the run-config keys ``<phase>-rounds``, ``<phase>-local-steps``,
    ``<phase>-batch-size``, ``<phase>-lr``, ``<phase>-warmup-steps`` and ``detector-l1-rounds``.

    Attributes:
        rounds: federated rounds of the phase (> 0).
        local_steps: optimiser steps per site and round (> 0; FLamby convention).
        batch_size: volumes (detector) or crops (stager) per step (> 0).
        lr: learning rate per optimisation step (> 0).
        warmup_steps: linear warm-up steps of the schedule (>= 0; capped at the phase's total).
        l1_rounds: detector only: the last rounds that add the L1 box loss (>= 0; 0 for the stager).
    """

    rounds: int
    local_steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    l1_rounds: int = 0


@dataclass(frozen=True)
class RunConfig:
    """Validated run configuration shared by ServerApp, ClientApp and the simulation harness.

    Attributes mirror the kebab-case keys of ``[tool.flwr.app.config]`` in snake_case, but the
    keys that each phase has (``detector-rounds``, ``stager-rounds``, ...) are grouped per phase in
    ``phases`` (read them with :meth:`phase`). Durations are seconds; learning rates are per
    optimisation step; ``local_steps`` counts optimiser steps per round (FLamby convention: sites
    of different size do comparable work). No field has a default: the defaults live only in
    ``[tool.flwr.app.config]`` (:func:`default_run_config`).
    """

    data_root: str
    site_ids: tuple[str, ...]
    train_sites: tuple[str, ...]
    split_sites: tuple[str, ...]
    pooled_sites: tuple[str, ...]
    report_groups: dict[str, tuple[str, ...]]
    cache_dir: str
    out_dir: str
    signing_key: str
    seed: int
    strategy: str
    proximal_mu: float
    node_wait_timeout_s: float
    round_timeout_s: float
    phases: dict[Phase, PhaseConfig]
    detector: DetectorConfig
    stager: StagerConfig
    crop_source: str
    spec: PreprocessingSpec
    weight_decay: float
    lr_schedule: str
    focal_gamma: float
    model_size: str
    device: str
    amp: bool
    transfer_packing: bool
    transfer_dtype: str
    min_site_fraction: float  # issue 7: fraction (0, 1] of training sites a round needs
    # issue 16: robust-strategy parameters and the bounds on one site's influence
    trimmed_beta: float  # FedTrimmedAvg: fraction cut at each end, [0, 0.5)
    krum_byzantine: int  # Krum: malicious sites tolerated (needs training sites > 2f + 2)
    update_clip_factor: float  # update norms clipped at this x the round's median norm
    update_reject_factor: float  # ... and rejected above this x the median norm
    min_cell_heads: int  # a site with fewer heads in a split sends only the count ("suppressed")
    early_stopping_patience: int  # issue 18: rounds without validation improvement before a phase stops (0: off)
    early_stopping_min_delta: float  # an improvement must beat the best validation score by more than this
    early_stopping_min_rounds: int  # no early stop before this round
    site_nodes: dict[str, int]  # issue 16: site -> enrolled node id ({}: simulation)
    identity: str  # "enrolled" (site-nodes required) or "simulation" (self-reported site-id; sim runner only)
    track: str  # issue 21: experiment tracking from the ServerApp: "mlflow", "tensorboard" or "none"
    tracking_uri: str  # MLflow tracking URI or absolute TensorBoard folder; "" = under out-dir
    torch_threads: int  # issue 18: torch threads of a site's ClientApp (0: the process default)

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Build and validate from a Flower run config mapping.

        Raises:
            ValueError: naming the missing, mistyped or out-of-range key.
        """
        rc = dict(run_config)

        def get(key: str, kind: type) -> Any:
            if key not in rc:
                raise ValueError(f"run config key {key!r} is missing (declare it in [tool.flwr.app.config])")
            value = rc[key]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if kind is int and isinstance(value, bool) or not isinstance(value, kind):
                raise ValueError(f"run config {key!r}: expected {kind.__name__}, got {value!r}")
            return value

        def positive(key: str, kind: type) -> Any:
            value = get(key, kind)
            if value <= 0:
                raise ValueError(f"run config {key!r}: must be > 0, got {value!r}")
            return value

        def non_negative(key: str, kind: type) -> Any:
            value = get(key, kind)
            if value < 0:
                raise ValueError(f"run config {key!r}: must be >= 0, got {value!r}")
            return value

        def phase_config(phase: Phase) -> PhaseConfig:
            return PhaseConfig(
                rounds=positive(f"{phase}-rounds", int),
                local_steps=positive(f"{phase}-local-steps", int),
                batch_size=positive(f"{phase}-batch-size", int),
                lr=positive(f"{phase}-lr", float),
                l1_rounds=non_negative("detector-l1-rounds", int) if phase is Phase.DETECTOR else 0,
                warmup_steps=non_negative(f"{phase}-warmup-steps", int),
            )

        def choice(key: str, options: tuple[str, ...]) -> str:
            value = get(key, str)
            if value not in options:
                raise ValueError(f"run config {key!r}: expected one of {options}, got {value!r}")
            return value

        site_ids = _names("site-ids", get("site-ids", str))
        train_sites = _names("train-sites", get("train-sites", str))
        unknown = [s for s in train_sites if s not in site_ids]
        if unknown:
            raise ValueError(f"run config 'train-sites': {unknown} not in site-ids {list(site_ids)}")
        split_sites = _names("split-sites", get("split-sites", str)) if get("split-sites", str).strip() else train_sites
        pooled_sites = _names("pooled-sites", get("pooled-sites", str)) if get("pooled-sites", str).strip() else ()
        for key, names in (("split-sites", split_sites), ("pooled-sites", pooled_sites)):
            unknown = [s for s in names if s not in site_ids]
            if unknown:
                raise ValueError(f"run config {key!r}: {unknown} not in site-ids {list(site_ids)}")
        groups = parse_report_groups(get("report-groups", str))
        for name, members in groups.items():
            bad = [s for s in members if s not in site_ids]
            if bad:
                raise ValueError(f"run config 'report-groups': group {name!r} names unknown sites {bad}")
        mu = get("proximal-mu", float)
        if mu < 0:
            raise ValueError(f"run config 'proximal-mu': must be >= 0, got {mu}")
        strategy = choice("strategy", STRATEGIES)
        trimmed_beta, krum_byzantine = get("trimmed-beta", float), non_negative("krum-byzantine", int)
        problem = robust_strategy_problem(strategy, len(train_sites), trimmed_beta, krum_byzantine)
        if problem:
            raise ValueError(f"run config 'strategy': {problem}")
        clip_factor, reject_factor = positive("update-clip-factor", float), positive("update-reject-factor", float)
        if reject_factor < clip_factor:
            raise ValueError(
                f"run config 'update-reject-factor': must be >= update-clip-factor {clip_factor}, got {reject_factor}"
            )
        track, tracking_uri = choice("track", TRACKERS), get("tracking-uri", str).strip()
        problem = tracking_uri_problem(track, tracking_uri)
        if problem:
            raise ValueError(f"run config {problem}")
        model_size = choice("model-size", MODEL_SIZES)
        if model_size == "paper":
            detector = DetectorConfig.PAPER
            stager = dataclasses.replace(StagerConfig.PAPER, input_norm=choice("stager-input-norm", INPUT_NORMS))
        else:
            detector = DetectorConfig(
                widths=_ints("detector-widths", get("detector-widths", str)),
                depths=_ints("detector-depths", get("detector-depths", str)),
                head_width=positive("detector-head-width", int),
            )
            try:
                stager = StagerConfig(
                    init_features=positive("stager-init-features", int),
                    growth_rate=positive("stager-growth-rate", int),
                    block_config=_ints("stager-block-config", get("stager-block-config", str)),
                    pool_scales=_ints("stager-pool-scales", get("stager-pool-scales", str)),
                    fusion=get("stager-fusion", str),
                    transition=get("stager-transition", str),
                    dropout_prob=get("stager-dropout", float),
                    input_norm=get("stager-input-norm", str),
                )
            except ValueError as err:
                if str(err).startswith("run config"):
                    raise
                field = str(err).split(":", 1)[0]
                key = {
                    "fusion": "stager-fusion",
                    "transition": "stager-transition",
                    "dropout_prob": "stager-dropout",
                    "input_norm": "stager-input-norm",
                }.get(field, "stager-*")
                raise ValueError(f"run config {key!r}: {str(err).split(':', 1)[-1].strip()}") from None
        return cls(
            data_root=get("data-root", str),
            site_ids=site_ids,
            train_sites=train_sites,
            split_sites=split_sites,
            pooled_sites=pooled_sites,
            report_groups=groups,
            cache_dir=get("cache-dir", str),
            out_dir=get("out-dir", str),
            signing_key=get("signing-key", str),
            seed=get("seed", int),
            strategy=strategy,
            proximal_mu=mu,
            node_wait_timeout_s=positive("node-wait-timeout-s", float),
            round_timeout_s=positive("round-timeout-s", float),
            phases={phase: phase_config(phase) for phase in Phase},  # detector keys first, then stager
            detector=detector,
            stager=stager,
            crop_source=choice("crop-source", CROP_SOURCES),
            spec=_spec(get("crop-shape", str), get("crop-margin-mm", float)),
            weight_decay=get("weight-decay", float),
            lr_schedule=choice("lr-schedule", LR_SCHEDULES),
            focal_gamma=get("focal-gamma", float),
            model_size=model_size,
            device=choice("device", DEVICES),
            amp=get("amp", bool),
            transfer_packing=get("transfer-packing", bool),
            transfer_dtype=choice("transfer-dtype", TRANSFER_DTYPES),
            min_site_fraction=_fraction(get("min-site-fraction", float)),
            trimmed_beta=trimmed_beta,
            krum_byzantine=krum_byzantine,
            update_clip_factor=clip_factor,
            update_reject_factor=reject_factor,
            min_cell_heads=positive("min-cell-heads", int),
            early_stopping_patience=non_negative("early-stopping-patience", int),
            early_stopping_min_delta=non_negative("early-stopping-min-delta", float),
            early_stopping_min_rounds=non_negative("early-stopping-min-rounds", int),
            site_nodes=parse_site_nodes(get("site-nodes", str), site_ids),
            identity=choice("identity", IDENTITIES),
            track=track,
            tracking_uri=tracking_uri,
            torch_threads=non_negative("torch-threads", int),
        )

    def phase(self, phase: Phase | str) -> PhaseConfig:
        """The training numbers of ``phase`` (a :class:`Phase` or its string).

        Raises:
            ValueError: for a phase other than ``"detector"`` or ``"stager"``.
        """
        return self.phases[Phase.parse(phase)]

    def model_config(self, phase: Phase | str) -> DetectorConfig | StagerConfig:
        """The network configuration of ``phase``: :attr:`detector` or :attr:`stager`.

        Raises:
            ValueError: for a phase other than ``"detector"`` or ``"stager"``.
        """
        return self.detector if Phase.parse(phase) is Phase.DETECTOR else self.stager

    def detector_l1_weight(self, server_round: int) -> float:
        """Weight of the L1 box loss in detector round ``server_round`` (1-based): 1 in the last
        ``detector-l1-rounds`` rounds, else 0 (YOLOX adds L1 for its last 15 epochs,
        arXiv:2107.08430, section 2.2)."""
        detector = self.phases[Phase.DETECTOR]
        return 1.0 if server_round > detector.rounds - detector.l1_rounds else 0.0

    def lr_schedule_args(self, phase: Phase | str, server_round: int) -> dict[str, int | None]:
        """``step_offset``, ``total_steps`` and ``warmup_steps`` of the learning-rate schedule for
        local training in round ``server_round`` (1-based) of ``phase`` (see
        :func:`client.training.lr_factor`): the schedule runs over all rounds of the phase.

        Raises:
            ValueError: for a phase other than ``"detector"`` or ``"stager"``.
        """
        numbers = self.phase(phase)
        total = numbers.rounds * numbers.local_steps
        return {
            "step_offset": (server_round - 1) * numbers.local_steps,
            "total_steps": total if self.lr_schedule == "cosine" else None,
            "warmup_steps": min(numbers.warmup_steps, total),
        }

    def site_for_partition(self, partition_id: int) -> str:
        """Map a simulation ``partition-id`` to its site id (the order of ``site-ids``).

        Raises:
            ValueError: if the partition id is out of range.
        """
        if not 0 <= partition_id < len(self.site_ids):
            raise ValueError(f"partition-id {partition_id} has no site: site-ids lists {len(self.site_ids)} sites")
        return self.site_ids[partition_id]
