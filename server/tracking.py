"""Experiment tracking from the ServerApp (issue 21): MLflow or TensorBoard, or nothing.

The ServerApp logs what it already holds, and sites send nothing new:

* per round and per site, the scalar metrics of the train and evaluate replies, as
  ``<phase>/<train|eval>/<site>/<metric>`` at step = round, and the pooled validation score as
  ``<phase>/validation-score``. A site that suppressed a split as a small cell
  (``client.tasks.suppress_small_cells``: fewer heads than ``min-cell-heads``) is logged as
  ``.../suppressed = 1`` only: no figure and no count of that split is logged, here or for training;
* the run configuration as parameters, without local paths (``safe_files.redact_paths``);
* at the end, the report, figures and signed bundle as artifacts (MLflow; TensorBoard keeps the
  figures as images and ``report.json`` as text).

Run-config keys ``track`` (``mlflow``, ``tensorboard`` or ``none``) and ``tracking-uri``. With
``tracking-uri`` empty, MLflow writes a SQLite store ``OUT/mlflow/mlflow.db`` with artifacts in
``OUT/mlflow/artifacts`` (MLflow 3 refuses the old ``./mlruns`` file store; SQLite needs no
server), and TensorBoard writes ``OUT/tensorboard``. A ``sqlite:///`` URI keeps its artifacts
beside the database; an ``http(s)://`` URI is a tracking server, which places the artifacts.

MLflow and TensorBoard are imported only when a tracker of theirs is made. Tracking never ends a
run: a failing call (a tracking server that went down) logs a warning, and after
:data:`MAX_FAILURES` failures in a row tracking is off for the rest of the run.

The run id is kept in ``OUT/tracking.json`` so that a resumed run, and the simulation harness that
adds ``report.html`` and its figures after the ServerApp ends (:func:`log_run_outputs`), log to
the same MLflow run.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared_models.config import TRACKERS
from shared_models.safe_files import PATH_KEYS, redact_paths
from shared_models.specs import NUM_EXAMPLES, SUPPRESSED, VAL_NUM_EXAMPLES, VAL_SCORE, VAL_SUPPRESSED

if TYPE_CHECKING:
    from torch.utils.tensorboard import SummaryWriter

log = logging.getLogger(__name__)

EXPERIMENT = "onfh-fl"
STATE_FILE = "tracking.json"
MAX_FAILURES = 3
#: Per-request limits for an MLflow tracking server (MLflow's defaults retry for minutes); the
#: environment variables of the same names override them.
MLFLOW_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def site_scalars(metrics: Mapping[str, Any], min_cell_heads: int) -> dict[str, float]:
    """The scalar metrics of one site's reply that may be logged.

    A test split flagged ``suppressed`` keeps only the flag (and its validation score, when that
    was not suppressed too); a validation split flagged ``val-suppressed`` loses ``val-num-examples``;
    a training reply with fewer than ``min_cell_heads`` examples loses ``num-examples``. Lists
    (confusion matrices, histograms) and booleans are not logged.

    Returns:
        metric name -> value.
    """
    out = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    if out.get(SUPPRESSED):
        out = {k: v for k, v in out.items() if k in (SUPPRESSED, VAL_SCORE, VAL_NUM_EXAMPLES, VAL_SUPPRESSED)}
    if out.get(VAL_SUPPRESSED):
        out.pop(VAL_SCORE, None)
        out.pop(VAL_NUM_EXAMPLES, None)
    if 0 < out.get(NUM_EXAMPLES, min_cell_heads) < min_cell_heads:
        out.pop(NUM_EXAMPLES)
    return out


def round_scalars(
    phase: str,
    train: Mapping[str, Mapping],
    evaluate: Mapping[str, Mapping],
    min_cell_heads: int,
    validation_score: float | None = None,
) -> dict[str, float]:
    """All metrics of one round as ``<phase>/<train|eval>/<site>/<metric>`` -> value (sites sorted)."""
    out: dict[str, float] = {}
    for kind, per_site in (("train", train), ("eval", evaluate)):
        for site in sorted(per_site):
            for key, value in sorted(site_scalars(per_site[site], min_cell_heads).items()):
                out[_tag(f"{phase}/{kind}/{site}/{key}")] = value
    if validation_score is not None:
        out[f"{phase}/validation-score"] = float(validation_score)
    return out


def run_params(run_config: Mapping[str, Any]) -> dict[str, str]:
    """The run configuration as parameters: no path key (``tracking-uri`` is one), no value that looks like a path."""
    redacted = redact_paths(run_config)
    return {k: str(v) for k, v in sorted(redacted.items()) if k not in PATH_KEYS and v == run_config[k]}


def _tag(name: str) -> str:
    """A metric name MLflow accepts (letters, digits, ``_ - . / space``)."""
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


class Tracker:
    """No tracking (``track = "none"``); the interface of every tracker."""

    name = "none"

    def start_run(self, params: Mapping[str, str], run_name: str = "") -> None:
        """Open (or, from ``OUT/tracking.json``, reopen) the run and log ``params``."""

    def log_round_metrics(self, step: int, scalars: Mapping[str, float]) -> None:
        """Log one round's metrics (from :func:`round_scalars`) at ``step`` = round."""

    def log_artifacts(self, paths: Iterable[Path]) -> None:
        """Log files and folders (a folder keeps its name in the run's artifacts)."""

    def end(self, failed: bool = False) -> None:
        """Close the run (MLflow status FINISHED, or FAILED)."""


class _Guarded(Tracker):
    """Turns every failure of a backend into a warning; off after :data:`MAX_FAILURES` in a row."""

    def __init__(self, inner: Tracker):
        self.inner, self.name, self.failures = inner, inner.name, 0

    def _call(self, what: str, *args, **kwargs) -> None:
        if self.failures >= MAX_FAILURES:
            return
        try:
            getattr(self.inner, what)(*args, **kwargs)
            self.failures = 0
        except Exception as err:
            self.failures += 1
            first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
            log.warning(
                "%s tracking: %s failed (%s)%s",
                self.name,
                what,
                first,
                "; tracking is off for the rest of the run" if self.failures >= MAX_FAILURES else "",
            )

    def start_run(self, params, run_name=""):
        self._call("start_run", params, run_name)

    def log_round_metrics(self, step, scalars):
        self._call("log_round_metrics", step, scalars)

    def log_artifacts(self, paths):
        self._call("log_artifacts", list(paths))

    def end(self, failed=False):
        self._call("end", failed)


class MlflowTracker(Tracker):
    """MLflow through :class:`mlflow.MlflowClient` (no global active run)."""

    name = "mlflow"

    def __init__(self, out: Path, uri: str = ""):
        for key, value in MLFLOW_HTTP_ENV.items():
            os.environ.setdefault(key, value)
        from mlflow import MlflowClient

        self.out = Path(out)
        if uri:
            self.uri = uri
            db = uri[len("sqlite:///") :] if uri.startswith("sqlite:///") else None
        else:
            db = str((self.out / "mlflow" / "mlflow.db").resolve())
            self.uri = f"sqlite:///{db}"
        self.artifacts = (Path(db).parent / "artifacts").as_uri() if db else None
        if db:
            Path(db).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=self.uri)
        self.run_id: str | None = None

    def start_run(self, params, run_name=""):
        from mlflow.entities import Param

        self.run_id = _stored_run(self.out, self.name, self.uri)
        if self.run_id is not None:
            try:
                self.client.update_run(self.run_id, status="RUNNING")
                log.info("mlflow tracking: resuming run %s", self.run_id)
                return
            except Exception:
                self.run_id = None
        experiment = self.client.get_experiment_by_name(EXPERIMENT)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else self.client.create_experiment(EXPERIMENT, artifact_location=self.artifacts)
        )
        self.run_id = self.client.create_run(experiment_id, run_name=run_name or None).info.run_id
        _store_run(self.out, self.name, self.uri, self.run_id)
        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters a batch
            self.client.log_batch(self.run_id, params=items[i : i + 100])
        log.info(
            "mlflow tracking: run %s (view with `mlflow ui --backend-store-uri %s`)",
            self.run_id,
            self.uri if self.uri.startswith("sqlite:") else "<the tracking server>",
        )

    @property
    def _active_run(self) -> str:
        if self.run_id is None:
            raise RuntimeError("mlflow tracking: no run started (start_run first)")
        return self.run_id

    def log_round_metrics(self, step, scalars):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in scalars.items()]
        for i in range(0, len(items), 1000):  # MLflow takes at most 1000 metrics a batch
            self.client.log_batch(self._active_run, metrics=items[i : i + 1000])

    def log_artifacts(self, paths):
        for path in paths:
            path = Path(path)
            if path.is_dir():
                self.client.log_artifacts(self._active_run, str(path), artifact_path=path.name)
            elif path.is_file():
                self.client.log_artifact(self._active_run, str(path))

    def end(self, failed=False):
        self.client.set_terminated(self._active_run, status="FAILED" if failed else "FINISHED")


class TensorBoardTracker(Tracker):
    """TensorBoard event files through :class:`torch.utils.tensorboard.SummaryWriter`."""

    name = "tensorboard"

    def __init__(self, out: Path, logdir: str = ""):
        self.logdir = Path(logdir) if logdir else Path(out) / "tensorboard"
        self.writer: SummaryWriter | None = None

    def _open(self) -> SummaryWriter:
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.logdir))
        return self.writer

    def start_run(self, params, run_name=""):
        table = "| key | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in params.items())
        writer = self._open()
        writer.add_text("run-config", table, global_step=0)
        writer.flush()

    def log_round_metrics(self, step, scalars):
        writer = self._open()
        for tag, value in scalars.items():
            writer.add_scalar(tag, float(value), global_step=int(step))
        writer.flush()

    def log_artifacts(self, paths):
        import matplotlib.image

        writer = self._open()
        for path in paths:
            path = Path(path)
            files = sorted(path.rglob("*")) if path.is_dir() else [path]
            for f in files:
                if f.suffix == ".png":
                    writer.add_image(f"figures/{f.stem}", matplotlib.image.imread(f)[..., :3], dataformats="HWC")
                elif f.name == "report.json":
                    writer.add_text("report", "```\n" + f.read_text() + "\n```")
        writer.flush()

    def end(self, failed=False):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def make_tracker(track: str, out: Path, uri: str = "") -> Tracker:
    """The tracker for run-config ``track`` writing under the run folder ``out`` (or to ``uri``).

    Never raises for a backend that cannot start (a missing package, a store that cannot be
    opened): logs a warning and returns the no-op :class:`Tracker`.

    Raises:
        ValueError: ``track`` is not one of :data:`TRACKERS`.
    """
    if track not in TRACKERS:
        raise ValueError(f"run config 'track': expected one of {TRACKERS}, got {track!r}")
    if track == "none":
        return Tracker()
    try:
        inner = MlflowTracker(out, uri) if track == "mlflow" else TensorBoardTracker(out, uri)
    except Exception as err:
        log.warning(
            "%s tracking could not start (%s); the run goes on without it",
            track,
            (str(err).strip().splitlines() or [type(err).__name__])[0][:300],
        )
        return Tracker()
    return _Guarded(inner)


def _stored_run(out: Path, backend: str, uri: str) -> str | None:
    try:
        state = json.loads((Path(out) / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    if state.get("backend") == backend and state.get("uri") == uri and isinstance(state.get("run-id"), str):
        return state["run-id"]
    return None


def _store_run(out: Path, backend: str, uri: str, run_id: str) -> None:
    (Path(out) / STATE_FILE).write_text(json.dumps({"backend": backend, "uri": uri, "run-id": run_id}, indent=2))


def run_name(out: Path) -> str:
    """A run name from the run folder's name, with its parent for a grid cell (``<variant>/seed-<n>``)."""
    out = Path(out)
    return f"{out.parent.name}/{out.name}" if re.fullmatch(r"seed-\d+", out.name) else out.name


def log_run_outputs(track: str, out: Path, uri: str, paths: Iterable[Path]) -> None:
    """After the run: add ``paths`` (report.html, figures) to the run the ServerApp tracked in ``out``.

    Used by the simulation harness, which writes ``report.html`` and its figures after the ServerApp
    ends. Does nothing when tracking is off or no run was recorded; never raises.
    """
    if track == "none" or (track == "mlflow" and not (Path(out) / STATE_FILE).exists()):
        return
    tracker = make_tracker(track, out, uri)
    if isinstance(tracker, _Guarded) and isinstance(tracker.inner, MlflowTracker):
        tracker.inner.run_id = _stored_run(out, "mlflow", tracker.inner.uri)
        if tracker.inner.run_id is None:
            return
    tracker.log_artifacts([p for p in paths if Path(p).exists()])
    if isinstance(tracker, _Guarded) and isinstance(tracker.inner, TensorBoardTracker):
        tracker.end()
