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
    "ACTION",
    "ARRAYS",
    "CENTER_ERROR_MM",
    "CONFIG",
    "CROPS_KEY",
    "IOU_HIST",
    "IOU_MEAN",
    "LOW_CONFIDENCE",
    "MACRO_AUC",
    "METRICS",
    "NUM_EXAMPLES",
    "PHASE",
    "PHASES",
    "PROXIMAL_MU",
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
MACRO_AUC = "macro-auc"
#: 1 when a site had fewer than ``min-cell-heads`` heads in a split and sent only the count (privacy).
SUPPRESSED = "suppressed"
VAL_SUPPRESSED = "val-suppressed"
VAL_HEADS = "val-heads"
