"""Experiment tracking (issue 21, server/tracking.py): metrics read back through MLflow's client API and
TensorBoard's event reader; small cells stay suppressed; paths stay out; a dead server does not end a run."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys

import pytest

from server.checkpoint import config_fingerprint
from server.tracking import (
    STATE_FILE,
    Tracker,
    log_run_outputs,
    make_tracker,
    round_scalars,
    run_name,
    run_params,
    site_scalars,
)
from shared_models.config import RunConfig, default_run_config

MIN_HEADS = 5

# Three rounds of what the server holds: site A has enough heads; site B suppressed its test split (2 heads)
# and its validation split; site C suppressed only its validation split. A's numbers change per round.
TRAIN = {
    r: {"A": {"num-examples": 40, "train-loss": 1.0 / r}, "B": {"num-examples": 3, "train-loss": 2.0 / r}}
    for r in (1, 2, 3)
}
EVAL = {
    r: {
        "A": {
            "num-examples": 12,
            "macro-auc": 0.5 + 0.1 * r,
            "val-num-examples": 6,
            "val-score": 0.4 + 0.1 * r,
            "confusion": [[1, 0], [0, 1]],
        },
        "B": {"num-examples": 2, "suppressed": 1, "val-num-examples": 1, "val-suppressed": 1},
        "C": {"num-examples": 9, "macro-auc": 0.7, "val-num-examples": 2, "val-suppressed": 1},
    }
    for r in (1, 2, 3)
}


def _run_config(tmp_path, **extra) -> dict:
    return {
        **default_run_config(),
        "data-root": str(tmp_path / "data"),
        "out-dir": str(tmp_path / "run"),
        "signing-key": "/home/someone/keys/k.pem",
        **extra,
    }


def _log_rounds(tracker: Tracker, rounds=(1, 2, 3)) -> None:
    for r in rounds:
        tracker.log_round_metrics(
            r, round_scalars("stager", TRAIN[r], EVAL[r], MIN_HEADS, validation_score=0.4 + 0.1 * r)
        )


def test_site_scalars_keep_small_cells_suppressed():
    assert site_scalars(EVAL[1]["A"], MIN_HEADS) == {
        "num-examples": 12.0,
        "macro-auc": 0.6,
        "val-num-examples": 6.0,
        "val-score": 0.5,
    }  # the confusion matrix (a list) is not logged
    assert site_scalars(EVAL[1]["B"], MIN_HEADS) == {"suppressed": 1.0, "val-suppressed": 1.0}
    assert site_scalars(EVAL[1]["C"], MIN_HEADS) == {"num-examples": 9.0, "macro-auc": 0.7, "val-suppressed": 1.0}
    # a train reply is not suppressed by the site, but its small count is not logged either
    assert site_scalars(TRAIN[1]["B"], MIN_HEADS) == {"train-loss": 2.0}
    # a reply that a site suppressed but still padded with figures: only the flag survives
    assert site_scalars({"num-examples": 3, "suppressed": 1, "macro-auc": 0.9, "flag": True}, MIN_HEADS) == {
        "suppressed": 1.0
    }


def test_run_params_hold_no_path(tmp_path):
    rc = _run_config(tmp_path, **{"tracking-uri": "sqlite:////srv/hospital/mlflow.db", "strategy": "fedprox"})
    params = run_params(rc)
    assert params["strategy"] == "fedprox" and params["stager-rounds"] == str(rc["stager-rounds"])
    for key in ("data-root", "out-dir", "signing-key", "tracking-uri", "cache-dir"):
        assert key not in params
    assert not any("/" in v and v.startswith(("/", "sqlite")) for v in params.values())
    # changing tracking on resume does not change the checkpoint fingerprint
    assert config_fingerprint(rc) == config_fingerprint({**rc, "track": "none", "tracking-uri": ""})


def test_run_config_validates_tracking(tmp_path):
    base = _run_config(tmp_path)
    assert base["track"] == "mlflow" and base["tracking-uri"] == ""
    cfg = RunConfig.from_run_config({**base, "track": "tensorboard", "tracking-uri": str(tmp_path / "tb")})
    assert (cfg.track, cfg.tracking_uri) == ("tensorboard", str(tmp_path / "tb"))
    with pytest.raises(ValueError, match="'track'"):
        RunConfig.from_run_config({**base, "track": "wandb"})
    with pytest.raises(ValueError, match="'tracking-uri'.*MLflow needs a URI"):
        RunConfig.from_run_config({**base, "tracking-uri": "runs/mlflow"})
    with pytest.raises(ValueError, match="'tracking-uri'.*absolute"):
        RunConfig.from_run_config({**base, "track": "tensorboard", "tracking-uri": "runs/tb"})


def test_mlflow_metrics_params_artifacts_read_back(tmp_path):
    from mlflow import MlflowClient

    out = tmp_path / "run"
    out.mkdir()
    tracker = make_tracker("mlflow", out)
    tracker.start_run(run_params(_run_config(tmp_path)), run_name(out))
    _log_rounds(tracker, (1, 2))
    (out / "report.json").write_text(json.dumps({"sites": {}}))
    (out / "bundle").mkdir()
    (out / "bundle" / "MANIFEST.json").write_text("{}")
    tracker.log_artifacts([out / "report.json", out / "bundle"])
    tracker.end()

    uri = f"sqlite:///{out / 'mlflow' / 'mlflow.db'}"
    run_id = json.loads((out / STATE_FILE).read_text())["run-id"]
    client = MlflowClient(tracking_uri=uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["strategy"] == "fedavg" and "data-root" not in run.data.params

    def history(key):
        return [(m.step, round(m.value, 6)) for m in client.get_metric_history(run_id, key)]

    assert history("stager/eval/A/macro-auc") == [(1, 0.6), (2, 0.7)]
    assert history("stager/train/A/train-loss") == [(1, 1.0), (2, 0.5)]
    assert history("stager/validation-score") == [(1, 0.5), (2, 0.6)]
    assert history("stager/eval/B/suppressed") == [(1, 1.0), (2, 1.0)]
    keys = set(run.data.metrics)
    assert not {k for k in keys if k.startswith("stager/eval/B/") and not k.endswith("suppressed")}
    assert "stager/eval/C/val-score" not in keys and "stager/eval/C/val-num-examples" not in keys
    assert "stager/train/B/num-examples" not in keys and "stager/train/A/num-examples" in keys
    assert {a.path for a in client.list_artifacts(run_id)} == {"report.json", "bundle"}
    assert [a.path for a in client.list_artifacts(run_id, "bundle")] == ["bundle/MANIFEST.json"]

    # a resumed run logs into the same MLflow run; the harness adds its files afterwards
    again = make_tracker("mlflow", out)
    again.start_run(run_params(_run_config(tmp_path)), run_name(out))
    _log_rounds(again, (3,))
    again.end()
    assert history("stager/eval/A/macro-auc") == [(1, 0.6), (2, 0.7), (3, 0.8)]
    (out / "report.html").write_text("<html></html>")
    log_run_outputs("mlflow", out, "", [out / "report.html", out / "missing.png"])
    assert "report.html" in {a.path for a in client.list_artifacts(run_id)}


def test_tensorboard_scalars_and_figures_read_back(tmp_path):
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    out.mkdir()
    tracker = make_tracker("tensorboard", out)
    tracker.start_run(run_params(_run_config(tmp_path)))
    _log_rounds(tracker)
    fig = plt.figure(figsize=(2, 1))
    fig.savefig(out / "training_curves.png")
    plt.close(fig)
    tracker.log_artifacts([out / "training_curves.png"])
    tracker.end()

    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    values = [(e.step, round(e.value, 6)) for e in events.Scalars("stager/eval/A/macro-auc")]
    assert values == [(1, 0.6), (2, 0.7), (3, 0.8)]
    assert [e.value for e in events.Scalars("stager/eval/B/suppressed")] == [1.0, 1.0, 1.0]
    assert {t for t in tags if t.startswith("stager/eval/B/")} == {
        "stager/eval/B/suppressed",
        "stager/eval/B/val-suppressed",
    }
    assert "stager/eval/C/val-score" not in tags and "stager/train/B/num-examples" not in tags
    assert events.Tags()["images"] == ["figures/training_curves"]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_dead_tracking_server_does_not_end_the_run(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    tracker = make_tracker("mlflow", tmp_path, f"http://127.0.0.1:{_closed_port()}")
    with caplog.at_level(logging.WARNING, logger="server.tracking"):
        tracker.start_run({"strategy": "fedavg"})
        _log_rounds(tracker)
        tracker.end()
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 3 and "tracking is off" in warnings[-1]  # then no more calls, no more waiting


def test_none_tracks_nothing_and_nothing_imports_the_backends(tmp_path):
    code = (
        "import sys; from pathlib import Path; import shared_models.cli; from server.tracking import make_tracker; "
        "shared_models.cli.build_parser(); t = make_tracker('none', Path(sys.argv[1])); t.start_run({'strategy': 'fedavg'}); "
        "t.log_round_metrics(1, {'stager/eval/A/macro-auc': 0.5}); t.log_artifacts([Path(sys.argv[1])]); t.end(); "
        "print(sorted(m for m in ('mlflow', 'tensorboard', 'torch.utils.tensorboard') if sys.modules.get(m)))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]" and list(tmp_path.iterdir()) == []


def test_cli_passes_tracking_to_the_run_config(tmp_path, monkeypatch):
    from shared_models.cli import build_parser
    from sim.cli import _run_config_for

    monkeypatch.chdir(tmp_path)
    args = build_parser().parse_args(
        ["sim", "run", "--data", "d", "--out", "o", "--track", "tensorboard", "--tracking-uri", "tb"]
    )
    rc = _run_config_for(args)
    assert rc["track"] == "tensorboard" and rc["tracking-uri"] == str(tmp_path / "tb")
    args = build_parser().parse_args(["coordinator", "launch", "--out", "o", "--track", "none"])
    assert args.track == "none"
    rc = _run_config_for(build_parser().parse_args(["sim", "run", "--data", "d", "--out", "o"]))
    assert rc["track"] == "mlflow" and "tracking-uri" not in rc
    RunConfig.from_run_config({**default_run_config(), **rc})


def test_tracking_uri_is_not_sent_to_sites(tmp_path, monkeypatch):
    from server.run_paths import hide_coordinator_paths, resolve_coordinator_paths

    rc = {
        "out-dir": str(tmp_path / "run"),
        "signing-key": "",
        "track": "mlflow",
        "tracking-uri": "http://10.0.0.7:5000",
    }
    sent = hide_coordinator_paths(rc, tmp_path / "flwr-home")
    assert sent["tracking-uri"] == "" and sent["track"] == "mlflow" and "10.0.0.7" not in json.dumps(sent)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    assert resolve_coordinator_paths(sent)["tracking-uri"] == "http://10.0.0.7:5000"


def test_compare_puts_every_cell_in_one_mlflow_store(tmp_path, monkeypatch):
    from shared_models.cli import main

    seen = {}
    monkeypatch.setattr(
        "sim.experiments.compare.run_compare", lambda base, out, variants, seeds, console=None: seen.update(base) or {}
    )
    monkeypatch.setattr("sim.experiments.compare.print_summary", lambda summary, console: None)
    assert (
        main(["sim", "compare", "--data", str(tmp_path / "d"), "--out", str(tmp_path / "grid"), "--variant", "default"])
        == 0
    )
    assert (
        seen["track"] == "mlflow" and seen["tracking-uri"] == f"sqlite:///{tmp_path / 'grid' / 'mlflow' / 'mlflow.db'}"
    )
    assert run_name(tmp_path / "grid" / "default" / "seed-0") == "default/seed-0"


def test_monai_does_not_load_the_trackers_but_user_code_can():
    # MONAI's optional imports are declined (shared_models/__init__.py); the same import from other code works.
    code = (
        "import sys, shared_models, monai, monai.visualize, monai.handlers; "
        "before = sorted(m for m in ('mlflow', 'tensorboard', 'torch.utils.tensorboard') if sys.modules.get(m)); "
        "import mlflow; from torch.utils.tensorboard import SummaryWriter; print(before, mlflow.__name__)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-2:] == ["[]", "mlflow"]
