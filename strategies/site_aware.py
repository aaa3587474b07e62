"""Flower strategies that know which node is which hospital site.

Flower's own :class:`~flwr.serverapp.strategy.FedAvg` and
:class:`~flwr.serverapp.strategy.FedProx` do the aggregation. What Flower lacks,
and this module adds as one mixin:

* **train sites only** — evaluate-only sites (the paper's external centers) get the
  global model in evaluate messages but never a train message;
* **dtype-preserving aggregation** — Flower's weighted mean turns integer buffers
  (BatchNorm ``num_batches_tracked``) into float64; they are cast back to the dtype
  each entry arrived with, rounding integers;
* **per-site metric capture** — each evaluate reply is kept under its site id, so the
  report can show per-site and pooled figures (AUC cannot be averaged);
* **round offset** — a resumed run continues its round numbering;
* **fixed aggregation order** — train and evaluate replies are aggregated in site-id order,
  so the floating-point sums (and the weights) do not depend on which site answered first;
* **update checks** — a train reply whose arrays do not match the global model's entries,
  shapes and dtypes, or hold non-finite or absurd values, is rejected and logged before aggregation
  (``strategies/update_checks.py``); the round goes on with the others;
* **bounded influence** (issue 16, rule and sources in ``strategies/update_checks.py``) — update
  norms against the round's global model are clipped at ``clip_factor`` x the round's median
  and rejected above ``reject_factor`` x it; ``num-examples`` and validation counts are capped
  at the heads each site declared (``declared``); scores outside [0, 1] reject the reply;
* **minimum fraction of sites** — a round completes with the sites that replied when at
  least ``ceil(min_fraction * training sites)`` trained, and names the missing ones
  (``missing_sites``, for training and evaluation); otherwise it fails with
  :class:`RoundIncompleteError`. The wait for nodes before a round is
  bounded by ``node_wait_timeout_s`` (Flower's own wait has no limit).

Robust aggregation: Flower's FedMedian (Yin et al. 2018, arXiv:1803.01498), FedTrimmedAvg
(same paper; ``beta`` = fraction cut at each end) and Krum (Blanchard et al. 2017,
NeurIPS) with the same mixin.

FedBN (Li et al. 2021, arXiv:2102.07623) aggregates like FedAvg on the server; the
sites keep their normalisation layers local (``client/client_app.py``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, MetricRecordValues
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedMedian, FedProx, FedTrimmedAvg, Krum

from shared_models.specs import (
    ARRAYS,
    METRICS,
    NUM_EXAMPLES,
    STRATEGIES,
    VAL_NUM_EXAMPLES,
    heads_key,
    robust_strategy_problem,
)
from strategies.update_checks import (
    bound_update_norms,
    cap_counts,
    clip_update,
    metrics_problems,
    reply_problems,
    update_norm,
)

log = logging.getLogger(__name__)


def restore_dtypes(aggregated: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """Cast every aggregated entry back to the dtype and shape it has in ``reference``.

    Integer entries are rounded to the nearest integer first.

    Raises:
        KeyError: if the two records do not hold the same keys.
    """
    out = {}
    for key, ref in reference.items():
        value = aggregated[key].numpy()
        ref_array = ref.numpy()
        if np.issubdtype(ref_array.dtype, np.integer):
            value = np.rint(value)
        # and the shape: np.ascontiguousarray would make a 0-d entry (num_batches_tracked) shape (1,)
        out[key] = Array(np.array(value, dtype=ref_array.dtype, order="C").reshape(ref_array.shape))
    return ArrayRecord(out)


class RoundIncompleteError(RuntimeError):
    """Fewer sites than the configured minimum fraction took part in a round; names the missing sites."""


class SiteAwareMixin(FedAvg):
    """Adds site awareness to a Flower Message-API strategy (see module docstring).

    Every Flower strategy it is mixed into (FedAvg, FedProx, FedMedian, FedTrimmedAvg, Krum) is a
    :class:`~flwr.serverapp.strategy.FedAvg`; deriving from it types the hooks this class overrides.

    Attributes:
        node_sites: node id -> site id, filled from the ``hello`` query.
        train_sites: site ids that receive train messages.
        round_offset: added to Flower's round counter (resume).
        site_metrics: ``{round: {site_id: metrics dict}}`` from evaluate replies.
        train_metrics: ``{round: {site_id: metrics dict}}`` from train replies.
        min_fraction: fraction (0, 1] of sites a round needs (train: of the training sites).
        node_wait_timeout_s: bound, in seconds, on the wait for nodes before a round (None: Flower's unbounded wait).
        missing_sites: ``{round: {"train": [site, ...], "evaluate": [...]}}`` for rounds where sites did not take part.
        rejected_updates: ``{round: {site_id: [problem, ...]}}`` for train replies rejected by the update
            checks, and evaluate replies rejected by the metric checks (problems prefixed ``evaluate:``).
        declared: site id -> the counts it declared at the start of the run (``heads-train``,
            ``heads-val``, ``heads-test``); its replies' counts are capped at them (absent: not capped).
        max_int_delta: largest move of an integer entry in one round (``None``: not checked).
        clip_factor, reject_factor: the norm rule's multiples of the round's median update norm.
    """

    def __init__(
        self,
        *args,
        node_sites: dict[int, str],
        train_sites: Iterable[str],
        round_offset: int = 0,
        min_fraction: float = 1.0,
        node_wait_timeout_s: float | None = None,
        declared: dict[str, dict] | None = None,
        max_int_delta: int | None = None,
        clip_factor: float = 2.0,
        reject_factor: float = 4.0,
        state_problems: Callable[[ArrayRecord], list[str]] | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.state_problems = state_problems
        bound_update_norms([], clip_factor=clip_factor, reject_factor=reject_factor)  # validates the factors
        self.declared = dict(declared or {})
        self.max_int_delta = max_int_delta
        self.clip_factor = clip_factor
        self.reject_factor = reject_factor
        if not 0.0 < min_fraction <= 1.0:
            raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction}")
        self.node_sites = dict(node_sites)
        self.train_sites = set(train_sites)
        self.round_offset = round_offset
        self.min_fraction = min_fraction
        self.node_wait_timeout_s = node_wait_timeout_s
        self.site_metrics: dict[int, dict[str, dict]] = {}
        self.train_metrics: dict[int, dict[str, dict]] = {}
        self.missing_sites: dict[int, dict[str, list[str]]] = {}
        self.rejected_updates: dict[int, dict[str, list[str]]] = {}
        self._sent: ArrayRecord | None = None

    def _required(self, n: int) -> int:
        return max(1, math.ceil(self.min_fraction * n - 1e-9)) if n else 0

    def _expected(self, phase: str) -> set[str]:
        sites = set(self.node_sites.values())
        return sites & self.train_sites if phase == "train" else sites

    def _wait_for_sites(self, grid: Grid, server_round: int, phase: str) -> None:
        """Wait (bounded) until enough of the expected sites' nodes are connected.

        Raises:
            RoundIncompleteError: the minimum was not reached within ``node_wait_timeout_s``.
        """
        if self.node_wait_timeout_s is None:
            return
        expected = self._expected(phase)
        needed = self._required(len(expected))
        deadline = time.monotonic() + self.node_wait_timeout_s
        while True:
            nodes = list(grid.get_node_ids())
            online = {self.node_sites.get(n) for n in nodes} & expected
            # Flower's sampling then waits, unbounded, for min_available_nodes of any site
            if len(online) >= needed and len(nodes) >= getattr(self, "min_available_nodes", 0):
                return
            if time.monotonic() > deadline:
                raise RoundIncompleteError(
                    f"round {server_round} ({phase}): only {len(online)} of {len(expected)} sites connected after "
                    f"{self.node_wait_timeout_s:.0f} s (minimum {needed}); missing: {sorted(expected - online)}"
                )
            time.sleep(1.0)

    def _record_missing(self, server_round: int, phase: str, replied: set[str]) -> None:
        """Record the expected sites that did not reply; in training, fail below the minimum.

        Raises:
            RoundIncompleteError: fewer training sites replied than ``ceil(min_fraction * training sites)``.
        """
        expected = self._expected(phase)
        missing = sorted(expected - replied)
        if missing:
            self.missing_sites.setdefault(server_round, {})[phase] = missing
            log.warning("round %d: %s completed without sites %s", server_round, phase, missing)
        needed = self._required(len(expected))
        if phase == "train" and len(expected & replied) < needed:
            raise RoundIncompleteError(
                f"round {server_round} ({phase}): {len(expected & replied)} of {len(expected)} sites replied, "
                f"fewer than the minimum {needed} (min-site-fraction {self.min_fraction:g}); missing: {missing}"
            )

    def in_site_order(self, replies: Iterable[Message]) -> list[Message]:
        """The replies sorted by site id (then node id), whatever order they arrived in."""
        return sorted(replies, key=lambda r: (self._site(r), r.metadata.src_node_id))

    def _site(self, msg: Message) -> str:
        return self.node_sites.get(msg.metadata.src_node_id, f"node-{msg.metadata.src_node_id}")

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._wait_for_sites(grid, server_round + self.round_offset, "train")
        self._sent = arrays
        messages = super().configure_train(server_round + self.round_offset, arrays, config, grid)
        kept = [m for m in messages if self.node_sites.get(m.metadata.dst_node_id) in self.train_sites]
        log.info("round %d: training at %d site(s)", server_round + self.round_offset, len(kept))
        return kept

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        self._wait_for_sites(grid, server_round + self.round_offset, "evaluate")
        messages = super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)
        # only the run's sites: a node refused at discovery (or of another run) gets nothing (issue 16)
        return [m for m in messages if m.metadata.dst_node_id in self.node_sites]

    def _reject(self, server_round: int, site: str, problems: list[str], phase: str = "train") -> None:
        prefix = "" if phase == "train" else f"{phase}: "
        self.rejected_updates.setdefault(server_round, {}).setdefault(site, []).extend(prefix + p for p in problems)
        what = "update" if phase == "train" else f"{phase} reply"
        log.warning("round %d: rejected the %s of site %s: %s", server_round, what, site, "; ".join(problems))

    def _caps(self, site: str, phase: str) -> dict[str, int]:
        heads = self.declared.get(site)
        if heads is None:
            return {}
        if phase == "train":
            return {NUM_EXAMPLES: int(heads.get(heads_key("train"), 0))}
        return {
            NUM_EXAMPLES: int(heads.get(heads_key("test"), 0)),
            VAL_NUM_EXAMPLES: int(heads.get(heads_key("val"), 0)),
        }

    def _checked_metrics(self, server_round: int, reply: Message, phase: str) -> dict[str, MetricRecordValues] | None:
        """The reply's metrics, counts capped at the site's declaration; None (logged) when out of range."""
        site = self._site(reply)
        if METRICS not in reply.content.metric_records:
            self._reject(server_round, site, ["no metrics"], phase)
            return None
        metrics = dict(reply.content.metric_records[METRICS])
        try:
            problems = metrics_problems(metrics)
            if not problems:
                notes = cap_counts(metrics, self._caps(site, phase))
                if notes:
                    log.warning(
                        "round %d: site %s reported more heads than it declared: %s",
                        server_round,
                        site,
                        "; ".join(notes),
                    )
                    problems = [f"{p} (after {'; '.join(notes)})" for p in metrics_problems(metrics)]
        except Exception as err:  # last line: metrics no check foresaw are rejected, never end the round
            problems = [f"unreadable metrics ({type(err).__name__} in the checks)"]
        if problems:
            self._reject(server_round, site, problems, phase)
            return None
        return metrics

    def check_updates(self, server_round: int, replies: list[Message]) -> list[Message]:
        """Drop (and log) train replies that fail :func:`~strategies.update_checks.reply_problems`
        against the arrays sent this round or the metric checks; cap their ``num-examples`` at the
        declared training heads; then apply the norm rule (clip or reject); error replies pass
        through unchanged."""
        if self._sent is None:
            return replies
        kept = []
        for r in replies:
            if r.has_error():
                kept.append(r)
                continue
            try:
                problems = reply_problems(r, self._sent, self.arrayrecord_key, max_int_delta=self.max_int_delta)
                if not problems and self.state_problems is not None:
                    problems = self.state_problems(r.content.array_records[self.arrayrecord_key])
            except Exception as err:  # last line: a reply no check foresaw is rejected, never ends the round
                problems = [f"unreadable update ({type(err).__name__} in the checks)"]
            if problems:
                self._reject(server_round, self._site(r), problems)
                continue
            metrics = self._checked_metrics(server_round, r, "train")
            if metrics is None:
                continue
            if NUM_EXAMPLES not in metrics:
                self._reject(server_round, self._site(r), ["no num-examples"], "train")
                continue
            r.content[METRICS] = MetricRecord(metrics)
            kept.append(r)
        ok = [r for r in kept if not r.has_error()]
        # Flower's aggregation needs the same metric keys in every reply: keep the keys all sites sent
        # (a site adding or leaving out a key cannot end the round); num-examples is required above
        common = set.intersection(*(set(r.content.metric_records[METRICS].keys()) for r in ok)) if ok else set()
        for r in ok:
            extra = sorted(set(r.content.metric_records[METRICS].keys()) - common)
            if extra:
                log.warning(
                    "round %d: dropped train metrics %s of site %s (not sent by every site)",
                    server_round,
                    extra,
                    self._site(r),
                )
                r.content[METRICS] = MetricRecord(
                    {k: v for k, v in r.content.metric_records[METRICS].items() if k in common}
                )
        norms = []
        for r in list(ok):
            try:
                norms.append(update_norm(r.content.array_records[self.arrayrecord_key], self._sent))
            except Exception as err:  # last line (the checks above make this unreachable for known attacks)
                self._reject(server_round, self._site(r), [f"unreadable update ({type(err).__name__} in the norm)"])
                ok.remove(r)
                kept.remove(r)
        actions = bound_update_norms(norms, clip_factor=self.clip_factor, reject_factor=self.reject_factor)
        median = float(np.median(norms)) if norms else 0.0
        dropped = set()
        for r, norm, (action, scale) in zip(ok, norms, actions):
            site = self._site(r)
            if action == "reject":
                self._reject(
                    server_round,
                    site,
                    [f"update norm {norm:.4g} above {self.reject_factor:g} x the round's median {median:.4g}"],
                )
                dropped.add(id(r))
            elif action == "clip":
                log.warning(
                    "round %d: clipped the update of site %s from norm %.4g to %.4g (%g x the round's median)",
                    server_round,
                    site,
                    norm,
                    norm * scale,
                    self.clip_factor,
                )
                arrays = r.content.array_records[self.arrayrecord_key]
                r.content[self.arrayrecord_key] = clip_update(arrays, self._sent, scale)
        return [r for r in kept if id(r) not in dropped]

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        reached = server_round + self.round_offset
        # site-id order: floating-point sums then do not depend on which site answered first
        replies = self.check_updates(reached, self.in_site_order(replies))
        ok = [r for r in replies if not r.has_error()]
        for r in replies:
            if r.has_error():
                log.warning("round %d: site %s failed to train: %s", reached, self._site(r), r.error.reason)
        self._record_missing(reached, "train", {self._site(r) for r in ok})
        # dtype reference taken before aggregating: FedMedian and FedTrimmedAvg pop the replies' arrays
        reference = ArrayRecord(dict(ok[0].content.array_records[ARRAYS].items())) if ok else None
        self.train_metrics[reached] = {self._site(r): dict(r.content.metric_records[METRICS]) for r in ok}
        arrays, metrics = super().aggregate_train(server_round, ok)
        if arrays is not None and reference is not None:
            arrays = restore_dtypes(arrays, reference)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Keep each site's metrics; return the example-weighted mean of scalar metrics."""
        per_site: dict[str, dict] = {}
        reached = server_round + self.round_offset
        for r in self.in_site_order(replies):
            if r.has_error():
                log.warning("round %d: site %s failed to evaluate: %s", reached, self._site(r), r.error.reason)
                continue
            metrics = self._checked_metrics(reached, r, "evaluate")
            if metrics is not None:
                per_site[self._site(r)] = metrics
        self.site_metrics[reached] = per_site
        self._record_missing(reached, "evaluate", set(per_site))
        scalars = {k for m in per_site.values() for k, v in m.items() if isinstance(v, float)}
        out: dict[str, MetricRecordValues] = {}
        for k in sorted(scalars):  # weighted over the sites that sent the metric (a suppressed site sends none)
            having = [m for m in per_site.values() if isinstance(m.get(k), float)]
            total = sum(int(m.get(NUM_EXAMPLES, 0)) for m in having)
            if total:
                out[k] = sum(float(m[k]) * int(m[NUM_EXAMPLES]) for m in having) / total
        return MetricRecord(out) if out else None


class SiteFedAvg(SiteAwareMixin, FedAvg):
    """FedAvg (McMahan et al. 2017, arXiv:1602.05629) with site awareness."""


class SiteFedProx(SiteAwareMixin, FedProx):
    """FedProx (Li et al. 2020, arXiv:1812.06127) with site awareness; sends ``proximal-mu``."""


class SiteFedMedian(SiteAwareMixin, FedMedian):
    """Coordinate-wise median (Yin et al. 2018, arXiv:1803.01498; Flower's FedMedian) with site awareness."""


class SiteFedTrimmedAvg(SiteAwareMixin, FedTrimmedAvg):
    """Coordinate-wise trimmed mean (Yin et al. 2018; Flower's FedTrimmedAvg, ``beta`` cut at each end)."""


class SiteKrum(SiteAwareMixin, Krum):
    """Krum (Blanchard et al. 2017; Flower's Krum): keeps the update closest to its neighbours."""


def build_strategy(
    name: str,
    *,
    proximal_mu: float,
    node_sites: dict[int, str],
    train_sites: Iterable[str],
    round_offset: int = 0,
    min_fraction: float = 1.0,
    node_wait_timeout_s: float | None = None,
    trimmed_beta: float = 0.25,
    krum_byzantine: int = 1,
    declared: dict[str, dict] | None = None,
    max_int_delta: int | None = None,
    clip_factor: float = 2.0,
    reject_factor: float = 4.0,
    state_problems: Callable[[ArrayRecord], list[str]] | None = None,
):
    """Build the strategy named in the run config.

    Args:
        name: ``fedavg``, ``fedprox``, ``fedbn`` (FedAvg on the server, local norms at sites),
            or a robust one: ``fedmedian``, ``fedtrimmedavg``, ``krum``.
        min_fraction: fraction (0, 1] of sites a round needs; the node minimums Flower waits
            for are ``ceil(min_fraction * sites)``.
        node_wait_timeout_s: bound on the wait for nodes before each round, in seconds.
        trimmed_beta: FedTrimmedAvg's fraction cut at each end, in [0, 0.5) (run config ``trimmed-beta``).
        krum_byzantine: Krum's assumed number of malicious sites ``f`` (run config ``krum-byzantine``).
        declared: site id -> counts declared at the start (``heads-train``/``-val``/``-test``); caps.
        max_int_delta: largest move of an integer entry per round (the local steps).
        clip_factor, reject_factor: the norm rule (``strategies/update_checks.py``).
        state_problems: further checks of an update's arrays (e.g. unpacked, by entry name), each
            problem rejecting it (``strategies.update_checks.normalisation_problems``).

    Raises:
        ValueError: for an unknown name, a bad fraction, or a robust strategy that cannot keep its
            promise with this many training sites
            (:func:`shared_models.config.robust_strategy_problem`).
    """
    train_sites = set(train_sites)
    n_nodes = len(node_sites)
    n_train = sum(1 for s in node_sites.values() if s in train_sites)
    problem = robust_strategy_problem(name, n_train, trimmed_beta, krum_byzantine)
    if problem:
        raise ValueError(problem)
    need = lambda n: max(1, math.ceil(min_fraction * n - 1e-9))  # noqa: E731
    common = dict(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=need(n_train),
        min_evaluate_nodes=need(n_nodes),
        min_available_nodes=need(n_nodes),
        node_sites=node_sites,
        train_sites=train_sites,
        round_offset=round_offset,
        min_fraction=min_fraction,
        node_wait_timeout_s=node_wait_timeout_s,
        declared=declared,
        max_int_delta=max_int_delta,
        clip_factor=clip_factor,
        reject_factor=reject_factor,
        state_problems=state_problems,
    )
    if name in ("fedavg", "fedbn"):
        return SiteFedAvg(**common)
    if name == "fedprox":
        return SiteFedProx(proximal_mu=proximal_mu, **common)
    if name == "fedmedian":
        return SiteFedMedian(**common)
    if name == "fedtrimmedavg":
        return SiteFedTrimmedAvg(beta=trimmed_beta, **common)
    if name == "krum":
        return SiteKrum(num_malicious_nodes=krum_byzantine, **common)
    raise ValueError(f"unknown strategy {name!r}; expected one of {', '.join(STRATEGIES)}")
