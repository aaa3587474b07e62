"""The ONFH-FL ServerApp: detector phase, site-local crops, stager phase, report, signed bundle.

Reads as steps (Flower ``server_app.py`` style):

1. read the run config; open the checkpoint store in ``out-dir``;
2. wait (bounded) for every configured site and ask each for its id (``hello`` query);
3. phase 1: federate 3DC-YOLOX for ``detector-rounds`` rounds (paper section 2.4-2.5:
   the detector is trained first);
4. send the phase-1 global detector to every site, which crops its femoral heads
   locally (``crops`` query) — or uses ground-truth boxes when ``crop-source`` says so;
5. phase 2: federate 3D-MulDenseNet for ``stager-rounds`` rounds on those crops;
6. calibrate on pooled validation aggregates (``server/calibration.py``: temperature, detector
   and out-of-distribution thresholds, early-ONFH threshold); write ``report.json`` and a
   signed model bundle that carries the calibration.

Every round ends with an evaluation at every site and a checkpoint; a restarted run
resumes after the last finished round.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from server.audit_anchors import ANCHORS_NAME, AnchorRecordingGrid
from server.calibration import run_calibration
from server.checkpoint import CheckpointStore, PhaseCheckpoint, config_fingerprint
from server.early_stopping import stop_round
from server.reply_polling import with_reply_polling
from server.report import build_report, transfer_summary
from server.run_paths import resolve_coordinator_paths
from server.tracking import Tracker, make_tracker, round_scalars, run_name, run_params
from shared_models.bundle import generate_signing_key, load_signing_key, write_bundle
from shared_models.config import RunConfig
from shared_models.detection import YOLOX3D
from shared_models.determinism import configure_determinism
from shared_models.device import select_device
from shared_models.flower.records import record_to_state, state_to_record
from shared_models.specs import (
    ACTION,
    ARRAYS,
    CONFIG,
    CROPS_KEY,
    LOW_CONFIDENCE,
    METRICS,
    NUM_EXAMPLES,
    PHASE,
    SITE,
    SITE_ID,
    VAL_NUM_EXAMPLES,
    VAL_SCORE,
    Action,
    Phase,
    heads_key,
)
from shared_models.stager import MulDenseNet3D
from strategies.site_aware import build_strategy
from strategies.update_checks import normalisation_problems

log = logging.getLogger(__name__)

app = ServerApp()


class SitesMissingError(RuntimeError):
    """Not every configured site connected within ``node-wait-timeout-s``."""


class SiteIdentityError(RuntimeError):
    """A node claimed a site name that is not bound to its authenticated node id (issue 16)."""


def identity_problem(node_id: int, claimed: str, site_nodes: dict[str, int], node_sites: dict[int, str]) -> str | None:
    """Why a node may not be the site it claims, or None when it may.

    In deployment (``site_nodes`` given, from the enrolment registry) a site is who its enrolled
    key says it is: the SuperLink authenticates each SuperNode by its key and gives the replies
    the node id Flower assigned to that key at ``flwr supernode register``, so the claim must
    equal the site bound to that node id. In simulation (``site_nodes`` empty) every node is a
    process of this run and the partition id names the site; a site claimed twice is still refused.
    """
    if site_nodes:
        bound = next((site for site, node in site_nodes.items() if node == node_id), None)
        if bound == claimed or (bound is None and claimed not in site_nodes):
            return None  # the site's own node, or a node of no site of this run (left out, not refused)
        if bound is None:
            return f"node {node_id} is not enrolled for any site of this run but claims site {claimed!r}"
        return f"node {node_id}, enrolled as site {bound!r}, claims site {claimed!r}"
    if claimed in node_sites.values():
        return f"node {node_id} claims site {claimed!r}, which another node already is"
    return None


def hello_problem(reply: Message) -> str | None:
    """Why a ``hello`` reply cannot be read; None when it can.

    It must hold a ``site`` ConfigRecord with a string ``site-id`` and a ``metrics`` MetricRecord
    of non-negative integer counts that declares the heads of every split (``heads-train``,
    ``heads-val``, ``heads-test``; studies refused optional): they later cap the site's reported
    counts, so a hello without them is refused (naming the missing keys).
    """
    content = reply.content
    site = content.config_records.get(SITE)
    if site is None or not isinstance(site.get(SITE_ID), str):
        return "hello reply without a site-id"
    metrics = content.metric_records.get(METRICS)
    if metrics is None:
        return "hello reply without counts"
    bad = sorted(k for k, v in metrics.items() if not isinstance(v, int) or isinstance(v, bool) or v < 0)
    if bad:
        return f"hello counts that are not non-negative integers: {', '.join(bad[:5])}"
    missing = [heads_key(split) for split in ("train", "val", "test") if heads_key(split) not in metrics]
    if missing:
        return f"hello without the declared head counts {', '.join(missing)}"
    return None


def discover_sites(
    grid: Grid, cfg: RunConfig, poll_s: float = 1.0, refused: list[str] | None = None
) -> tuple[dict[int, str], dict[str, dict]]:
    """Wait for one node per configured site and map node ids to site ids.

    Each node's claimed ``site-id`` is checked against ``site-nodes`` (:func:`identity_problem`).
    ``site-nodes`` is required unless the run config says ``identity = "simulation"`` (set by the
    simulation runner only, logged as a warning and recorded in ``report.json``): a deployment
    started with plain ``flwr run`` does not silently trust self-reported names.
    A node that claims a site not bound to it is refused by name, logged and listed in
    ``refused``: it gets no further message. If it is the enrolled node of a site of this run,
    that site cannot take part honestly and the run ends (:class:`SiteIdentityError`); a node of
    no site of this run is left out and the run goes on.

    Returns:
        ``(node_sites, site_data)``: node id -> site id, and per site the counts it
        reported (heads per split, studies refused; never study names).

    Raises:
        SitesMissingError: when the wait exceeds ``node-wait-timeout-s``; the message
            names the sites that did not answer.
        SiteIdentityError: an enrolled node of this run claimed another site's name, or
            ``site-nodes`` is empty outside simulation.
    """
    if not cfg.site_nodes and cfg.identity != "simulation":
        raise SiteIdentityError(
            "run config 'site-nodes' is empty: a deployment must bind every site to its enrolled key; start it with "
            "`onfh coordinator launch` (it fills site-nodes from the enrolment registry). Only the simulation runner "
            "sets identity = 'simulation' (self-reported site ids)"
        )
    if cfg.identity == "simulation":
        log.warning(
            "IDENTITY NOT VERIFIED: run config identity = 'simulation', so %s; never use this in a deployment",
            "site-nodes still binds the sites"
            if cfg.site_nodes
            else "every node is the site it says it is (self-reported site-id)",
        )
    expected = set(cfg.site_ids)
    deadline = time.monotonic() + cfg.node_wait_timeout_s
    node_sites: dict[int, str] = {}
    site_data: dict[str, dict] = {}
    ignored: set[int] = set()
    refused = refused if refused is not None else []
    while True:
        node_ids = [n for n in grid.get_node_ids() if n not in node_sites and n not in ignored]
        if node_ids:
            messages = [
                Message(
                    content=RecordDict({CONFIG: ConfigRecord({ACTION: Action.HELLO.value})}),
                    dst_node_id=n,
                    message_type=MessageType.QUERY,
                )
                for n in node_ids
            ]
            for reply in grid.send_and_receive(messages, timeout=max(1.0, deadline - time.monotonic())):
                if reply.has_error():
                    log.warning("a node failed the hello query: %s", reply.error.reason)
                    continue
                node_id = reply.metadata.src_node_id
                malformed = hello_problem(reply)
                if malformed:
                    refused.append(f"refused: node {node_id}: {malformed}")
                    ignored.add(node_id)
                    log.error("refused: node %s: %s", node_id, malformed)
                    continue
                site_id = str(reply.content[SITE][SITE_ID])
                problem = identity_problem(node_id, site_id, cfg.site_nodes, node_sites)
                if problem:
                    refused.append(f"refused: {problem}")
                    ignored.add(node_id)
                    log.error("refused: %s", problem)
                    if node_id in cfg.site_nodes.values():
                        raise SiteIdentityError(f"refused: {problem}; the run cannot go on without that site")
                    continue
                if cfg.site_nodes and site_id not in expected:
                    ignored.add(node_id)
                    continue
                node_sites[node_id] = site_id
                site_data[site_id] = dict(reply.content[METRICS])
        if expected <= set(node_sites.values()):
            break
        if time.monotonic() > deadline:
            missing = sorted(expected - set(node_sites.values()))
            raise SitesMissingError(
                f"sites {missing} did not connect within {cfg.node_wait_timeout_s:.0f} s"
                + (f" ({'; '.join(refused)})" if refused else "")
            )
        time.sleep(poll_s)
    log.info(
        "connected sites: %s%s",
        sorted(node_sites.values()),
        "" if cfg.site_nodes else " (simulation: sites named by partition id, not by enrolled keys)",
    )
    return node_sites, site_data


def prepare_crops(grid: Grid, node_sites: dict[int, str], detector_state: dict | None, cfg: RunConfig) -> str:
    """Have every site crop its heads with the global detector; return the crops key.

    Raises:
        RuntimeError: if no site made crops, or sites disagree on the key.
    """
    content = RecordDict({CONFIG: ConfigRecord({ACTION: Action.CROPS.value})})
    if cfg.crop_source == "detector" and detector_state is not None:
        content[ARRAYS] = state_to_record(detector_state, cfg)
    messages = [Message(content=content, dst_node_id=n, message_type=MessageType.QUERY) for n in node_sites]
    keys = set()
    for reply in grid.send_and_receive(messages, timeout=cfg.round_timeout_s):
        site = node_sites.get(reply.metadata.src_node_id, "?")
        if reply.has_error():
            log.warning("site %s failed to make crops: %s", site, reply.error.reason)
            continue
        keys.add(str(reply.content[SITE][CROPS_KEY]))
        metrics = reply.content.metric_records[METRICS]  # a site's counts, logged as sent
        log.info(
            "site %s: %s crops, %s low-confidence detections",
            site,
            metrics.get(NUM_EXAMPLES),
            metrics.get(LOW_CONFIDENCE),
        )
    if len(keys) != 1:
        raise RuntimeError(f"crop preparation failed: sites returned keys {sorted(keys)}")
    return keys.pop()


def validation_score(site_metrics: dict[str, dict]) -> float | None:
    """Validation-example-weighted mean of the sites' ``val-score``; None when no site has validation heads
    (or every site's validation score was suppressed as a small cell)."""
    scored = [site_metrics[s] for s in sorted(site_metrics) if VAL_SCORE in site_metrics[s]]  # fixed summation order
    n = sum(int(m.get(VAL_NUM_EXAMPLES, 0)) for m in scored)
    if n == 0:
        return None
    return sum(float(m[VAL_SCORE]) * int(m[VAL_NUM_EXAMPLES]) for m in scored) / n


def influence_bounds(cfg: RunConfig, phase: Phase | str, declared: dict[str, dict] | None) -> dict:
    """The strategy's bounds on one site's influence (issue 16) from the run config: robust-strategy
    parameters, the norm rule's factors, the declared counts, and how far an integer buffer may move
    in a round (one per local step; FedBN keeps norms local, so over all rounds of the phase)."""
    steps, rounds = cfg.phase(phase).local_steps, cfg.phase(phase).rounds
    return dict(
        trimmed_beta=cfg.trimmed_beta,
        krum_byzantine=cfg.krum_byzantine,
        declared=declared,
        max_int_delta=steps * (rounds if cfg.strategy == "fedbn" else 1),
        clip_factor=cfg.update_clip_factor,
        reject_factor=cfg.update_reject_factor,
    )


@dataclass
class _BestRound:
    """The best-validated round of a phase so far, as the round hook keeps it."""

    round: int
    score: float
    state: dict[str, torch.Tensor] | None


class PhaseConverged(Exception):
    """Raised from the round hook to end a phase early (:mod:`server.early_stopping`); the checkpoint is saved."""


def validation_scores(history: dict[int, dict[str, dict]]) -> dict[int, float | None]:
    """Round -> :func:`validation_score` of that round's site metrics."""
    return {r: validation_score(sites) for r, sites in sorted(history.items())}


def phase_finished(ckpt: PhaseCheckpoint | None, rounds: int, cfg: RunConfig) -> bool:
    """True when a phase's checkpoint ran all ``rounds`` or stopped early under the configured rule."""
    if ckpt is None:
        return False
    return (
        ckpt.round >= rounds
        or stop_round(
            validation_scores(ckpt.site_metrics),
            cfg.early_stopping_patience,
            cfg.early_stopping_min_delta,
            cfg.early_stopping_min_rounds,
        )
        is not None
    )


def run_phase(
    grid: Grid,
    cfg: RunConfig,
    store: CheckpointStore,
    node_sites: dict[int, str],
    *,
    phase: Phase | str,
    model: torch.nn.Module,
    rounds: int,
    extra_config: dict | None = None,
    declared: dict[str, dict] | None = None,
    tracker: Tracker | None = None,
) -> PhaseCheckpoint:
    """Federate one model for ``rounds`` rounds, resuming from its checkpoint.

    ``declared`` (site id -> heads per split from :func:`discover_sites`) caps the counts each
    site reports (issue 16, ``strategies/update_checks.py``). ``tracker`` gets every finished round's
    metrics (:mod:`server.tracking`).

    Returns:
        The final checkpoint: the last and the best-validated global state dicts and the
        per-site metrics of every round. The phase ends early when the validation score stops
        improving (:mod:`server.early_stopping`, ``early-stopping-patience``).
    """
    phase = Phase.parse(phase)
    ckpt = store.load(phase) or PhaseCheckpoint(
        round=0, state_dict={k: v.detach().cpu() for k, v in model.state_dict().items()}
    )
    if ckpt.round >= rounds:
        log.info("phase %s: already finished (%d rounds), skipping", phase, ckpt.round)
        return ckpt
    if ckpt.round:
        log.info("phase %s: resuming after round %d", phase, ckpt.round)
    template = model.state_dict()  # names, shapes and dtypes to unpack the packed global arrays
    strategy = build_strategy(
        cfg.strategy,
        proximal_mu=cfg.proximal_mu,
        node_sites=node_sites,
        train_sites=cfg.train_sites,
        round_offset=ckpt.round,
        min_fraction=cfg.min_site_fraction,
        node_wait_timeout_s=cfg.node_wait_timeout_s,
        state_problems=lambda arrays: normalisation_problems(record_to_state(arrays, template)),
        **influence_bounds(cfg, phase, declared),
    )
    strategy.missing_sites.update(ckpt.missing_sites)
    strategy.rejected_updates.update(ckpt.rejected_updates)
    strategy.site_metrics.update(ckpt.site_metrics)
    strategy.train_metrics.update(ckpt.train_metrics)
    config = ConfigRecord({PHASE: str(phase), **(extra_config or {})})

    best = _BestRound(ckpt.best_round, ckpt.best_score, ckpt.best_state_dict)

    def checkpoint_hook(server_round: int, arrays: ArrayRecord):
        if server_round == 0:
            return None
        reached = server_round + ckpt.round
        state = record_to_state(arrays, template)
        score = validation_score(strategy.site_metrics.get(reached, {}))
        scores[reached] = score
        if score is not None and score > best.score:
            best.round, best.score, best.state = reached, score, state
        store.save(
            phase,
            PhaseCheckpoint(
                round=reached,
                state_dict=state,
                site_metrics=dict(strategy.site_metrics),
                train_metrics=dict(strategy.train_metrics),
                best_round=best.round,
                best_score=best.score,
                best_state_dict=best.state,
                missing_sites=dict(strategy.missing_sites),
                rejected_updates=dict(strategy.rejected_updates),
            ),
        )
        (tracker or Tracker()).log_round_metrics(
            reached,
            round_scalars(
                phase,
                strategy.train_metrics.get(reached, {}),
                strategy.site_metrics.get(reached, {}),
                cfg.min_cell_heads,
                score,
            ),
        )
        summary = {
            s: round(float(m.get(phase.score_key, 0.0)), 3)
            for s, m in sorted(strategy.site_metrics.get(reached, {}).items())
        }
        log.info(
            "phase %s round %d/%d: test %s %s, validation score %s (best: round %d)",
            phase,
            reached,
            rounds,
            phase.score_key,
            summary,
            "n/a" if score is None else f"{score:.3f}",
            best.round,
        )
        if reached < rounds and stop_round(
            scores, cfg.early_stopping_patience, cfg.early_stopping_min_delta, cfg.early_stopping_min_rounds
        ):
            log.info(
                "phase %s: no validation improvement above %g for %d rounds: stopping after round %d (best: round %d)",
                phase,
                cfg.early_stopping_min_delta,
                cfg.early_stopping_patience,
                reached,
                best.round,
            )
            raise PhaseConverged(reached)
        return None

    scores = validation_scores(ckpt.site_metrics)
    if stop_round(scores, cfg.early_stopping_patience, cfg.early_stopping_min_delta, cfg.early_stopping_min_rounds):
        log.info("phase %s: stopped early after round %d, skipping", phase, ckpt.round)
        return ckpt
    try:
        result = strategy.start(
            grid=grid,
            initial_arrays=state_to_record(ckpt.state_dict, cfg),
            num_rounds=rounds - ckpt.round,
            timeout=cfg.round_timeout_s,
            train_config=config,
            evaluate_config=ConfigRecord(dict(config)),
            evaluate_fn=checkpoint_hook,
        )
    except PhaseConverged:
        converged = store.load(phase)
        if converged is None:  # the hook saved the round's checkpoint just before it stopped the phase
            raise RuntimeError(f"phase {phase}: stopped early, but its last checkpoint cannot be read") from None
        return converged
    final = store.load(phase)
    if final is None or final.round < rounds:
        # No round completed a checkpoint (e.g. every site failed): keep what Flower returned.
        final = PhaseCheckpoint(
            round=rounds,
            state_dict=record_to_state(result.arrays, template),
            site_metrics=dict(strategy.site_metrics),
            train_metrics=dict(strategy.train_metrics),
        )
    return final


def _signing_key(cfg: RunConfig, out: Path):
    path = Path(cfg.signing_key) if cfg.signing_key else out / "keys" / "bundle-signing-key.pem"
    if path.exists():
        return load_signing_key(path)
    if cfg.signing_key:
        raise FileNotFoundError(f"signing-key {path} does not exist (create it with `onfh coordinator certs`)")
    log.info("no signing-key configured: generated a run-local Ed25519 key")
    return generate_signing_key(path)


def _write_pages(report: dict, out: Path) -> None:
    """``training_curves.png`` and ``report.html`` beside ``report.json``, in deployment as in simulation
    (where :func:`sim.experiments.experiment.run_experiment` rewrites them with its extra sections). A figure that
    fails is logged and does not fail the run: the weights and ``report.json`` are already written."""
    try:
        from server.report_html import write_report_html
        from server.report_plots import plot_training_curves

        page = json.loads(json.dumps(report))  # as a reader of report.json sees it (string keys)
        plot_training_curves(page, out / "training_curves.png")
        write_report_html(page, out)
    except Exception:
        log.exception("could not write report.html / training_curves.png")


def _enable_project_logging() -> None:
    """Show this project's INFO logs in the ServerApp process (Flower configures only its own logger)."""
    for name in ("server", "strategies", "shared_models"):
        logger = logging.getLogger(name)
        if not logger.handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
            logger.addHandler(handler)
            logger.setLevel(logging.INFO)
            logger.propagate = False


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run both phases, then write ``report.json`` and the signed bundle to ``out-dir``."""
    t0 = time.monotonic()
    _enable_project_logging()
    grid = with_reply_polling(grid)  # deployment: replies asked for every 0.05-0.5 s, not every 3 s
    # 1. config and checkpoints
    run_config = resolve_coordinator_paths(context.run_config)  # deployment: paths not sent to sites
    cfg = RunConfig.from_run_config(run_config)
    if not cfg.out_dir:
        raise ValueError("run config 'out-dir' is empty: the server needs a folder for checkpoints, report and bundle")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    store = CheckpointStore(out / "checkpoints", config_fingerprint(run_config), run_config)
    configure_determinism(select_device(cfg.device))
    torch.manual_seed(cfg.seed)  # the initial global weights
    grid = anchors = AnchorRecordingGrid(grid, out / ANCHORS_NAME)  # every reply's audit-log head, per site
    tracker = make_tracker(cfg.track, out, cfg.tracking_uri)  # issue 21: MLflow / TensorBoard, never fatal
    tracker.start_run(run_params(run_config), run_name(out))

    # 2. sites
    refused: list[str] = []
    node_sites, site_data = discover_sites(grid, cfg, refused=refused)
    anchors.node_sites = node_sites

    # 3. phase 1: detector
    detector = run_phase(
        grid,
        cfg,
        store,
        node_sites,
        phase=Phase.DETECTOR,
        model=YOLOX3D(cfg.detector),
        rounds=cfg.phase(Phase.DETECTOR).rounds,
        declared=site_data,
        tracker=tracker,
    )

    # 4. site-local crops with the phase-1 global detector
    key = prepare_crops(grid, node_sites, detector.selected_state_dict, cfg)

    # 5. phase 2: stager
    stager = run_phase(
        grid,
        cfg,
        store,
        node_sites,
        phase=Phase.STAGER,
        model=MulDenseNet3D(cfg.stager),
        rounds=cfg.phase(Phase.STAGER).rounds,
        extra_config={CROPS_KEY: key},
        declared=site_data,
        tracker=tracker,
    )

    # 6. calibration on pooled validation aggregates (issue 17), report and signed bundle
    calibration, calibration_report = run_calibration(
        grid, node_sites, cfg, detector.selected_state_dict, stager.selected_state_dict, key, site_data
    )
    report = build_report(
        strategy=cfg.strategy,
        proximal_mu=cfg.proximal_mu,
        rounds={"detector": detector.round, "stager": stager.round},
        stager_history=stager.site_metrics,
        detector_history=detector.site_metrics,
        selected_rounds={"detector": detector.selected_round, "stager": stager.selected_round},
        stager_train=stager.train_metrics,
        detector_train=detector.train_metrics,
        groups=cfg.report_groups,
        train_sites=cfg.train_sites,
        crop_source=cfg.crop_source,
        site_data=site_data,
        min_cell_heads=cfg.min_cell_heads,
        wall_time_s=time.monotonic() - t0,
        transfer=transfer_summary(
            {"detector": detector.state_dict, "stager": stager.state_dict},
            n_sites=len(node_sites),
            n_train=sum(s in cfg.train_sites for s in node_sites.values()),
        ),
    )
    # sites missing from rounds (deployment: a node died or was late) and rejected updates, by phase and round
    report["early_stopping"] = {
        "rule": (
            f"stop when the pooled validation score has not improved by more than {cfg.early_stopping_min_delta:g} "
            f"for {cfg.early_stopping_patience} rounds, not before round {cfg.early_stopping_min_rounds}; keep the "
            "best round"
        )
        if cfg.early_stopping_patience
        else "off",
        "max_rounds": {str(p): cfg.phase(p).rounds for p in Phase},
        "rounds_run": {"detector": detector.round, "stager": stager.round},
        "validation_score": {
            "detector": validation_scores(detector.site_metrics),
            "stager": validation_scores(stager.site_metrics),
        },
    }
    report["missing_sites"] = {"detector": detector.missing_sites, "stager": stager.missing_sites}
    report["rejected_updates"] = {"detector": detector.rejected_updates, "stager": stager.rejected_updates}
    report["identity"] = {  # travels in the bundle's metrics too
        "mode": cfg.identity,
        "sites_bound_by": "enrolled keys (site-nodes)" if cfg.site_nodes else "self-reported site-id (simulation)",
    }
    report["refused_nodes"] = refused  # nodes that claimed a site not bound to their enrolled key
    report["audit_anchors"] = anchors.anchors()  # `onfh site verify-audit --anchors report.json`
    report["calibration"] = calibration_report
    (out / "report.json").write_text(json.dumps(report, indent=2))
    _write_pages(report, out)
    write_bundle(
        out / "bundle",
        detector_state=detector.selected_state_dict,
        stager_state=stager.selected_state_dict,
        detector_config=cfg.detector,
        stager_config=cfg.stager,
        spec=cfg.spec,
        metrics=report,
        run_config=run_config,
        signing_key=_signing_key(cfg, out),
        checkpoint_chain=store.chain(),
        calibration=calibration,
    )
    tracker.log_artifacts([out / "report.json", out / "bundle"])
    tracker.end()
    log.info("report and signed bundle written to the run's out-dir")
