"""Screenshot the MLflow UI of a tracked run in headless Chromium (the README's picture, issue 21).

    python scripts/mlflow_ui_screenshot.py --run RUN_OUT --mlflow /path/to/venv/bin/mlflow --out docs/tracking/mlflow-ui.png

Starts ``mlflow ui`` (the full ``mlflow`` package; the project installs only ``mlflow-skinny``) on
127.0.0.1 against ``RUN_OUT/mlflow/mlflow.db``, opens the run recorded in ``RUN_OUT/tracking.json``
on its model-metrics tab with Debian's Chromium, saves the screenshot, and stops the UI.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from sim.reports.render_check import CHROMIUM_FLAGS, find_chromium


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="run folder of a run tracked with --track mlflow (default store)")
    parser.add_argument("--mlflow", default="mlflow", help="the mlflow command of a full MLflow install")
    parser.add_argument("--out", required=True, help="PNG to write")
    parser.add_argument("--tab", default="model-metrics", help="run page tab (default model-metrics)")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    run = Path(args.run).resolve()
    run_id = json.loads((run / "tracking.json").read_text())["run-id"]
    chromium = find_chromium()
    if chromium is None:
        raise SystemExit("chromium not found on PATH: apt-get install chromium")
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            args.mlflow,
            "ui",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{run / 'mlflow' / 'mlflow.db'}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # its own group: the UI starts worker processes
    try:
        deadline = time.monotonic() + 180
        while True:  # the UI answers once its workers are up
            try:
                reply = urllib.request.urlopen(f"{base}/api/2.0/mlflow/runs/get?run_id={run_id}", timeout=30).read()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("mlflow ui did not answer within 180 s") from None
                time.sleep(2)
        experiment = json.loads(reply)["run"]["info"]["experiment_id"]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, headless=True, args=list(CHROMIUM_FLAGS))
            try:
                tab = browser.new_page(viewport={"width": 1500, "height": 950})
                tab.goto(
                    f"{base}/#/experiments/{experiment}/runs/{run_id}/{args.tab}", wait_until="load", timeout=120_000
                )
                tab.wait_for_timeout(20_000)  # the single-page app fetches the run, then draws the charts
                Path(args.out).parent.mkdir(parents=True, exist_ok=True)
                tab.screenshot(path=args.out)
            finally:
                browser.close()
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
    print(f"screenshot: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
