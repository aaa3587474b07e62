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
* **round offset** — a resumed run continues its round numbering.

FedBN (Li et al. 2021, arXiv:2102.07623) aggregates like FedAvg on the server; the
sites keep their normalisation layers local (``client/client_app.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, FedProx

log = logging.getLogger(__name__)


def restore_dtypes(aggregated: ArrayRecord, reference: ArrayRecord) -> ArrayRecord:
    """Cast every aggregated entry back to the dtype it has in ``reference``.

    Integer entries are rounded to the nearest integer first.

    Raises:
        KeyError: if the two records do not hold the same keys.
    """
    out = {}
    for key, ref in reference.items():
        value = aggregated[key].numpy()
        ref_dtype = ref.numpy().dtype
        if np.issubdtype(ref_dtype, np.integer):
            value = np.rint(value)
        out[key] = Array(np.ascontiguousarray(value.astype(ref_dtype)))
    return ArrayRecord(out)


class SiteAwareMixin:
    """Adds site awareness to a Flower Message-API strategy (see module docstring).

    Attributes:
        node_sites: node id -> site id, filled from the ``hello`` query.
        train_sites: site ids that receive train messages.
        round_offset: added to Flower's round counter (resume).
        site_metrics: ``{round: {site_id: metrics dict}}`` from evaluate replies.
        train_metrics: ``{round: {site_id: metrics dict}}`` from train replies.
    """

    def __init__(self, *args, node_sites: dict[int, str], train_sites: Iterable[str], round_offset: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.node_sites = dict(node_sites)
        self.train_sites = set(train_sites)
        self.round_offset = round_offset
        self.site_metrics: dict[int, dict[str, dict]] = {}
        self.train_metrics: dict[int, dict[str, dict]] = {}

    def _site(self, msg: Message) -> str:
        return self.node_sites.get(msg.metadata.src_node_id, f"node-{msg.metadata.src_node_id}")

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        messages = super().configure_train(server_round + self.round_offset, arrays, config, grid)
        kept = [m for m in messages if self.node_sites.get(m.metadata.dst_node_id) in self.train_sites]
        log.info("round %d: training at %d site(s)", server_round + self.round_offset, len(kept))
        return kept

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return super().configure_evaluate(server_round + self.round_offset, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)
        ok = [r for r in replies if not r.has_error()]
        self.train_metrics[server_round + self.round_offset] = {
            self._site(r): dict(r.content["metrics"]) for r in ok
        }
        for r in replies:
            if r.has_error():
                log.warning("round %d: site %s failed to train: %s", server_round + self.round_offset, self._site(r), r.error.reason)
        if arrays is not None and ok:
            arrays = restore_dtypes(arrays, ok[0].content["arrays"])
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Keep each site's metrics; return the example-weighted mean of scalar metrics."""
        per_site: dict[str, dict] = {}
        for r in replies:
            if r.has_error():
                log.warning("round %d: site %s failed to evaluate: %s", server_round + self.round_offset, self._site(r), r.error.reason)
                continue
            per_site[self._site(r)] = dict(r.content["metrics"])
        self.site_metrics[server_round + self.round_offset] = per_site
        total = sum(int(m.get("num-examples", 0)) for m in per_site.values())
        if total == 0:
            return None
        scalars = {k for m in per_site.values() for k, v in m.items() if isinstance(v, float)}
        return MetricRecord(
            {k: sum(float(m.get(k, 0.0)) * int(m["num-examples"]) for m in per_site.values()) / total for k in sorted(scalars)}
        )


class SiteFedAvg(SiteAwareMixin, FedAvg):
    """FedAvg (McMahan et al. 2017, arXiv:1602.05629) with site awareness."""


class SiteFedProx(SiteAwareMixin, FedProx):
    """FedProx (Li et al. 2020, arXiv:1812.06127) with site awareness; sends ``proximal-mu``."""


def build_strategy(name: str, *, proximal_mu: float, node_sites: dict[int, str], train_sites: Iterable[str], round_offset: int = 0):
    """Build the strategy named in the run config.

    Args:
        name: ``fedavg``, ``fedprox`` or ``fedbn`` (FedAvg on the server, local norms at sites).

    Raises:
        ValueError: for an unknown name.
    """
    n_nodes = len(node_sites)
    n_train = sum(1 for s in node_sites.values() if s in set(train_sites))
    common = dict(
        fraction_train=1.0, fraction_evaluate=1.0, min_train_nodes=max(1, n_train),
        min_evaluate_nodes=n_nodes, min_available_nodes=n_nodes,
        node_sites=node_sites, train_sites=train_sites, round_offset=round_offset,
    )
    if name in ("fedavg", "fedbn"):
        return SiteFedAvg(**common)
    if name == "fedprox":
        return SiteFedProx(proximal_mu=proximal_mu, **common)
    raise ValueError(f"unknown strategy {name!r}; expected fedavg, fedprox or fedbn")
