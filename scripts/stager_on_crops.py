"""Diagnose the stager fast: its federated local training replayed on one site's cached crops.

Issue 18's diagnosis tool. It replays what one training site does in the stager phase of a run
(the same ``train_stager`` call per round: ``stager-local-steps`` steps, a fresh Adam each round, the
cosine schedule over all ``stager-rounds``) on a crop set a finished run left in the site's cache
(``<site>/.onfh-cache/crops/detector-<hash>.npz``), with the split that ``client.splits`` gives the seed,
and prints the training loss and the validation and test macro AUC after every round. With one
training site (the paper profile) FedAvg of one site is that site's model, so this is the federated
stager minus Flower, the detector phase and the other sites' evaluation: minutes instead of a run.

    python scripts/stager_on_crops.py --site runs/paper-data/A --crops runs/paper-data/A/.onfh-cache/crops/X.npz \\
        --seed 2 --stop 10 [--set stager-input-norm=none] [--set stager-lr=0.0005]

Settings come from ``pyproject.toml`` ``[tool.flwr.app.config]`` plus ``--set``. One torch thread,
CPU, no autocast. Not bit-identical to the run (its own stream seeds), the same recipe.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from client.site_data import check_manifest
from client.splits import _patient_strata, assign_splits
from client.stager_training import macro_auc, predict_stages, train_stager
from shared_models.config import RunConfig, default_run_config
from shared_models.stager import MulDenseNet3D


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--site", type=Path, required=True, help="a training site's folder (manifest.csv)")
    p.add_argument("--crops", type=Path, required=True, help="a crop set .npz from the site's cache")
    p.add_argument("--seed", type=int, default=0, help="the run's seed: split, initial weights")
    p.add_argument("--stop", type=int, default=0, help="stop after this round (0: all stager-rounds)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="run-config override")
    p.add_argument("--out", type=Path, help="write the per-round history as JSON")
    a = p.parse_args()
    torch.set_num_threads(1)
    run_config = default_run_config()
    for item in a.set:
        key, value = item.split("=", 1)
        if key not in run_config:
            raise SystemExit(f"--set {key}: not a run-config key")
        run_config[key] = type(run_config[key])(value)
    run_config["seed"] = a.seed
    cfg = RunConfig.from_run_config(run_config)
    heads, _ = check_manifest(a.site, a.site.name, use_split=False)
    staged = [h for h in heads if h.stage is not None]
    with np.load(a.crops) as data:
        crops, stages = data["crops"], data["stages"]
    if len(crops) != len(staged) or not (stages == [h.stage for h in staged]).all():
        raise SystemExit(f"{a.crops}: its crops do not match the staged heads of {a.site}")
    split = assign_splits(_patient_strata(a.site / "manifest.csv"), True, a.seed)
    splits = np.array([split[h.patient_id] for h in staged])
    train, val, test = (splits == s for s in ("train", "val", "test"))
    torch.manual_seed(a.seed)
    model = MulDenseNet3D(cfg.stager)
    device, history, phase = torch.device("cpu"), [], cfg.phase("stager")
    for r in range(1, (a.stop or phase.rounds) + 1):
        start = time.perf_counter()
        metrics = train_stager(
            model,
            crops[train],
            stages[train],
            steps=phase.local_steps,
            batch_size=phase.batch_size,
            lr=phase.lr,
            weight_decay=cfg.weight_decay,
            focal_gamma=cfg.focal_gamma,
            device=device,
            amp=False,
            seed=a.seed * 1000 + r,
            **cfg.lr_schedule_args("stager", r),
        )
        row = {
            "round": r,
            "train_loss": round(metrics["train-loss"], 4),
            "val_macro_auc": round(macro_auc(stages[val], predict_stages(model, crops[val], device=device)), 3),
            "test_macro_auc": round(macro_auc(stages[test], predict_stages(model, crops[test], device=device)), 3),
            "seconds": round(time.perf_counter() - start, 1),
        }
        history.append(row)
        print(json.dumps(row), flush=True)
    if a.out:
        a.out.write_text(
            json.dumps(
                {
                    "settings": vars(a) | {"site": str(a.site), "crops": str(a.crops), "out": str(a.out)},
                    "history": history,
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
