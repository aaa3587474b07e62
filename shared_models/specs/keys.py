"""The names that travel: training phases, query actions and the keys of Flower messages.

Every name here is a string on the wire (Flower ``ConfigRecord``/``MetricRecord`` keys and values)
and on disk (checkpoints, ``report.json``, bundles), so :class:`Phase` and :class:`Action` are
``StrEnum``: a member compares equal to, hashes like and formats as its plain string
(``Phase.DETECTOR == "detector"``, ``f"{Phase.STAGER}" == "stager"``), which keeps both formats
byte-identical. Write ``str(member)`` (or ``member.value``) where a plain ``str`` must be stored.

Metric keys are kebab-case, as Flower's examples write them. Only keys that more than one module
writes or reads live here; a key private to one module stays there.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "ACCURACY",
    "ACTION",
    "ANCHOR_KEY",
    "ANCHOR_RECORD",
    "AP50",
    "ARRAYS",
    "CALIBRATION",
    "CENTER_ERROR_MM",
    "CONFIG",
    "CONFUSION",
    "CROPS_KEY",
    "DET_GOOD",
    "DET_HEADS",
    "DET_SCORE_HIST",
    "ENERGY_HIST",
    "HIST_NEG_PREFIX",
    "HIST_POS_PREFIX",
    "IOU_HIST",
    "IOU_MEAN",
    "LOW_CONFIDENCE",
    "MACRO_AUC",
    "METRICS",
    "NLL",
    "NODE_AUDIT_LOG",
    "NODE_CACHE_DIR",
    "NODE_DATA_PATH",
    "NODE_MIN_CELL_HEADS",
    "NODE_SITE_ID",
    "NUM_PARTITIONS",
    "PARTITION_ID",
    "NUM_EXAMPLES",
    "PHASE",
    "PHASES",
    "PROXIMAL_MU",
    "RECALL30",
    "RECALL50",
    "SERVER_ROUND",
    "SITE",
    "SITE_ID",
    "SUPPRESSED",
    "TRAIN_LOSS",
    "VAL_HEADS",
    "VAL_NUM_EXAMPLES",
    "VAL_SCORE",
    "VAL_SUPPRESSED",
    "Action",
    "Phase",
    "heads_key",
]


class Phase(StrEnum):
    """The two federated training phases, run in this order: the detector, then the stager."""

    DETECTOR = "detector"
    STAGER = "stager"

    @classmethod
    def parse(cls, value: object) -> Phase:
        """``value`` (a :class:`Phase` or its string, e.g. from a ConfigRecord) as a :class:`Phase`.

        Raises:
            ValueError: ``phase must be 'detector' or 'stager', got ...`` for anything else.
        """
        if isinstance(value, str):
            try:
                return cls(value)
            except ValueError:
                pass
        raise ValueError(f"phase must be 'detector' or 'stager', got {value!r}")

    @property
    def score_key(self) -> str:
        """The evaluation metric a site reports for this phase: :data:`IOU_MEAN` or :data:`MACRO_AUC`."""
        return IOU_MEAN if self is Phase.DETECTOR else MACRO_AUC


#: Every phase, in training order.
PHASES: tuple[Phase, ...] = tuple(Phase)


class Action(StrEnum):
    """What a ``query`` message asks of a site (the value of its :data:`ACTION` config key)."""

    HELLO = "hello"  # reply the site id and head counts
    CROPS = "crops"  # crop every head (detector or ground truth) and cache the crops
    CALIBRATE_VAL = "calibrate-val"  # validation aggregates for the bundle's thresholds
    CALIBRATE_EVAL = "calibrate-eval"  # test aggregates of the calibrated bundle


# Records of a message's RecordDict
CONFIG = "config"  # ConfigRecord the server sends
METRICS = "metrics"  # MetricRecord a site replies
ARRAYS = "arrays"  # ArrayRecord of model weights
SITE = "site"  # ConfigRecord of a site's reply to hello/crops

# Keys of the server's ConfigRecord
PHASE = "phase"
ACTION = "action"
SERVER_ROUND = "server-round"
PROXIMAL_MU = "proximal-mu"
CROPS_KEY = "crops-key"  # also a key of the site's reply to Action.CROPS
CALIBRATION = "calibration"  # Action.CALIBRATE_EVAL: the server's chosen calibration, as JSON

# Keys of a site's reply
SITE_ID = "site-id"
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS = "train-loss"
VAL_NUM_EXAMPLES = "val-num-examples"
VAL_SCORE = "val-score"
IOU_MEAN = "iou-mean"
IOU_HIST = "iou-hist"
CENTER_ERROR_MM = "center-error-mm"
LOW_CONFIDENCE = "low-confidence"
RECALL30 = "recall30"  # detector: fraction of heads found with IoU >= 0.3
RECALL50 = "recall50"
AP50 = "ap50"
MACRO_AUC = "macro-auc"
ACCURACY = "accuracy"
#: Stager: the 3 x 3 confusion matrix, row-major (rows: true stage), as 9 counts.
CONFUSION = "confusion"
#: Stager: ``hist-pos-k`` / ``hist-neg-k`` count the heads of (not of) stage k per score bin.
HIST_POS_PREFIX = "hist-pos-"
HIST_NEG_PREFIX = "hist-neg-"
#: 1 when a site had fewer than ``min-cell-heads`` heads in a split and sent only the count (privacy).
SUPPRESSED = "suppressed"
VAL_SUPPRESSED = "val-suppressed"

# Keys of a site's reply to Action.CALIBRATE_VAL / CALIBRATE_EVAL (issue 17; client/calibration_stats.py)
VAL_HEADS = "val-heads"
DET_HEADS = "det-heads"
DET_GOOD = "det-good"  # detections with IoU >= 0.5
DET_SCORE_HIST = "det-score-hist"
ENERGY_HIST = "energy-hist"
NLL = "nll"

# The audit anchor every site reply carries (client/audit.py writes it, server/audit_anchors.py keeps it)
ANCHOR_RECORD = "audit"  # the reply's ConfigRecord that carries the anchor
ANCHOR_KEY = "head-sha256"  # SHA-256 of the reply's own audit-log line

# Node config of a SuperNode (``--node-config``): a deployed site's (``onfh site daemon`` writes them) ...
NODE_SITE_ID = "site-id"
NODE_DATA_PATH = "data-path"
NODE_CACHE_DIR = "cache-dir"
NODE_MIN_CELL_HEADS = "min-cell-heads"  # the site's own small-cell floor; the run config can only raise it
NODE_AUDIT_LOG = "audit-log"
# ... and a simulated one's (Flower's simulation engine sets them)
PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"


def heads_key(split: str) -> str:
    """The key of a site's hello reply that counts its heads in ``split`` (``"train"``, ``"val"``,
    ``"test"``): ``"heads-train"``, ...; the server caps the counts a site reports at these."""
    return f"heads-{split}"
