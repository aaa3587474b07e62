"""AdrenalMNIST3D benchmark: 3D-MulDenseNet on real 3D data, central and federated (Flower).

The phantoms test the pipeline; this benchmark tests the network and the training recipe
on real public 3D data with published reference numbers. AdrenalMNIST3D (MedMNIST v2,
Yang et al., Scientific Data 10:41, 2023, doi:10.1038/s41597-022-01721-8, CC BY 4.0) holds
3D adrenal gland shapes from abdominal CT with a binary label (normal / adrenal mass);
official splits: 1188 train, 98 val, 298 test.

Protocol (``onfh sim medmnist``):

* **Data.** The 64^3 release (``adrenalmnist3d_64.npz``), uint8 0..255 scaled to [0, 1].
  For 28^3 (the size of the published rows) every volume is downsampled with MONAI
  ``Resize(mode="area")``, i.e. ``torch.nn.functional.interpolate(mode="area")``: adaptive
  average pooling, so each output voxel is the mean of the input voxels it covers. It is
  the anti-aliased choice for a 64 -> 28 reduction (trilinear would sample every ~2.3rd
  voxel and alias the thin binary shapes). It is not the official 28^3 pipeline (MedMNIST
  made that from the source CT), so the published rows are a reference, not a replica.
* **Splits.** Official train/val/test. Model selection on val AUC only; test AUC/ACC once,
  on the selected weights. ACC is at the argmax (P(mass) >= 0.5), as MedMNIST reports it.
* **Settings.**
  ``central``: 3D-MulDenseNet (MONAI DenseNet blocks + MulPoolFusion transitions),
  :func:`client.stager_training.fit_stager_central` (validation AUC every ``eval_every``
  steps, early stopping). ``central-plain-densenet``: the same with MONAI's plain
  transition (``StagerConfig(transition="plain")``), the ablation, same budget.
  ``federated``: a real Flower simulation (:mod:`sim.experiments.medmnist_app`, run with ``flwr run`` through
  :func:`sim.experiments.runner.run_simulation` like the main federation, Ray backend) over ``num_sites`` simulated sites,
  Flower's FedAvg or FedProx, an IID (stratified) or a label-skewed (Dirichlet) split of
  the training set; model selection on the pooled federated validation AUC after every
  round.
* **Matched budget.** Central runs get ``total_steps`` optimiser steps; a federated run
  gets ``rounds * num_sites * local_steps`` = ``total_steps`` steps in all (same batch size,
  same schedule shape over its own global steps), so both see the same number of
  training volumes.

Simulation harness only: the driver prepares every site's arrays in one place.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.transforms import Resize
from monai.utils import set_determinism
from sklearn.metrics import accuracy_score
from sklearn.model_selection import StratifiedKFold

from client.stager_training import fit_stager_central, macro_auc, predict_stages
from shared_models.stager import MulDenseNet3D, StagerConfig
from sim.experiments.medmnist_runs import DEFAULT_RUNS, RUNS, SIZES

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
SETTINGS = ("central", "central-plain-densenet", "federated")
ROW_KEYS = ("setting", "strategy", "split", "size", "seed", "auc", "acc", "wall_s")

#: MedMNIST v2 (Scientific Data 10:41, 2023), Table for AdrenalMNIST3D, test split, 28^3: (model, AUC, ACC)
PUBLISHED = (
    ("ResNet-18 + 3D", 0.827, 0.721),
    ("ResNet-50 + 3D", 0.828, 0.745),
    ("ResNet-18 + ACS", 0.839, 0.754),
    ("ResNet-50 + ACS", 0.828, 0.758),
)


@dataclass(frozen=True)
class Budget:
    """Model and training budget shared by every setting (matched compute).

    Attributes:
        stager: 3D-MulDenseNet architecture (``out_channels`` 2); the plain ablation only
            changes ``transition``.
        total_steps: optimiser steps of a central run; a federated run splits them into
            ``rounds * num_sites * local_steps``.
        rounds: federated rounds; ``local_steps = total_steps // (rounds * num_sites)``.
        num_sites: simulated sites.
        batch_size: volumes per optimiser step.
        lr: Adam base learning rate; warm-up for ``warmup_frac`` of the steps, then cosine decay.
        weight_decay: Adam weight decay.
        focal_gamma: focal loss gamma (paper section 2.5).
        class_balanced: class-balanced sampling of training volumes.
        intensity_aug: random brightness and Gaussian noise (``client.augmentation``).
        flip_dims: flipped tensor dims (random flips, p = 0.5 each).
        eval_every: central validation interval in steps.
        patience: central early-stopping patience in evaluations.
        proximal_mu: FedProx mu.
        dirichlet_alpha: concentration of the label-skewed split.
        threads: torch threads of a central run. 1 by default: on a shared 2-core machine,
            2 threads were 8x slower per step than 1 (spin-waiting under contention).
        parallel_clients: simulated clients that train at once (Ray ``init_args.num_cpus``;
            each client gets one CPU and one thread).
    """

    stager: StagerConfig = field(default_factory=lambda: StagerConfig(out_channels=2))
    total_steps: int = 1600
    rounds: int = 20
    num_sites: int = 4
    batch_size: int = 32
    lr: float = 2e-3
    warmup_frac: float = 0.05
    weight_decay: float = 1e-4
    focal_gamma: float = 2.0
    class_balanced: bool = False
    intensity_aug: bool = True
    flip_dims: tuple[int, ...] = (2, 3, 4)
    eval_every: int = 50
    patience: int = 10
    proximal_mu: float = 0.01
    dirichlet_alpha: float = 0.5
    threads: int = 1
    parallel_clients: int = 2

    def __post_init__(self) -> None:
        if self.total_steps < self.rounds * self.num_sites:
            raise ValueError(
                f"total_steps ({self.total_steps}) must be >= rounds * num_sites ({self.rounds * self.num_sites})"
            )

    @property
    def local_steps(self) -> int:
        return self.total_steps // (self.rounds * self.num_sites)

    @property
    def warmup_steps(self) -> int:
        return round(self.warmup_frac * self.total_steps)


#: a smoke-test budget: tiny network, a few steps, 2 rounds
QUICK = Budget(
    stager=StagerConfig(out_channels=2, init_features=4, growth_rate=4, block_config=(1, 1), pool_scales=(1, 2)),
    total_steps=16,
    rounds=2,
    batch_size=8,
    eval_every=4,
    patience=2,
)


# --------------------------------------------------------------------------- data


def downsample(volumes: np.ndarray, size: int, chunk: int = 128) -> np.ndarray:
    """Scale uint8 volumes to [0, 1] and resize them to ``size^3`` with MONAI ``Resize(mode="area")``.

    Args:
        volumes: (N, D, H, W) uint8 (0..255).
        size: output edge in voxels; the input size keeps the volumes as they are.

    Returns:
        (N, 1, size, size, size) float32 in [0, 1].
    """
    out = np.empty((len(volumes), 1, size, size, size), np.float32)
    resize = Resize(spatial_size=(size, size, size), mode="area")
    for start in range(0, len(volumes), chunk):
        block = torch.from_numpy(np.asarray(volumes[start : start + chunk], np.float32) / 255.0)
        if block.shape[1:] != (size, size, size):
            block = resize(block)  # MONAI treats the N volumes as channels: one call per chunk
        out[start : start + len(block), 0] = np.asarray(block, np.float32)
    return out


def prepare_arrays(npz: Path, size: int, cache: Path) -> Path:
    """Write ``{split}_x.npy`` (N, 1, size^3) float32 and ``{split}_y.npy`` (N,) int64 under ``cache``.

    Reuses the folder when it is complete. Memory-mappable, so simulated sites read only
    their own rows.

    Raises:
        ValueError: unsupported ``size`` or an npz without the MedMNIST keys.
        FileNotFoundError: if ``npz`` does not exist.
    """
    if size not in SIZES:
        raise ValueError(f"size: expected one of {SIZES}, got {size}")
    npz = Path(npz)
    if not npz.exists():
        raise FileNotFoundError(f"{npz}: no such MedMNIST file")
    folder = Path(cache) / f"{npz.stem}-{size}"
    if all((folder / f"{s}_{k}.npy").exists() for s in SPLITS for k in "xy"):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with np.load(npz) as data:
        missing = [f"{s}_{k}" for s in SPLITS for k in ("images", "labels") if f"{s}_{k}" not in data.files]
        if missing:
            raise ValueError(f"{npz}: not a MedMNIST 3D file, missing keys {missing}")
        for split in SPLITS:
            x = downsample(data[f"{split}_images"], size)
            y = np.asarray(data[f"{split}_labels"]).reshape(-1).astype(np.int64)
            if len(y) != len(x):
                raise ValueError(f"{npz}: {split} has {len(x)} images but {len(y)} labels")
            np.save(folder / f"{split}_x.npy", x)
            np.save(folder / f"{split}_y.npy", y)
    log.info("prepared %s at %d^3 in %s", npz.name, size, folder)
    return folder


def load_split(folder: Path, split: str, mmap: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` of one prepared split (see :func:`prepare_arrays`)."""
    return (
        np.load(Path(folder) / f"{split}_x.npy", mmap_mode="r" if mmap else None),
        np.load(Path(folder) / f"{split}_y.npy"),
    )


# --------------------------------------------------------------------------- splits


def iid_split(labels: np.ndarray, num_sites: int, seed: int) -> list[np.ndarray]:
    """Stratified IID partition: scikit-learn ``StratifiedKFold`` test folds, one per site.

    Every index lands in exactly one site; each site has about the global label mix.

    Returns:
        ``num_sites`` sorted int64 index arrays.
    """
    folds = StratifiedKFold(n_splits=num_sites, shuffle=True, random_state=seed)
    return [np.sort(test) for _, test in folds.split(np.zeros(len(labels)), labels)]


def dirichlet_label_split(
    labels: np.ndarray, num_sites: int, alpha: float, seed: int, min_size: int = 8, max_tries: int = 1000
) -> list[np.ndarray]:
    """Label-skewed partition: per class, site shares drawn from ``Dirichlet(alpha * 1)``.

    The common non-IID benchmark split of Hsu et al. 2019 (arXiv:1909.06335, section 3)
    and Yurochkin et al. 2019 (arXiv:1905.12022): for every class ``c`` draw
    ``q_c ~ Dir(alpha, ..., alpha)`` over the sites and deal the shuffled indices of class
    ``c`` out in those proportions. Smaller ``alpha`` is more skewed. Draws are repeated
    (same seeded stream) until every site holds at least ``min_size`` indices.

    Returns:
        ``num_sites`` sorted int64 index arrays partitioning ``range(len(labels))``.

    Raises:
        ValueError: ``alpha <= 0``, or no draw met ``min_size`` within ``max_tries``.
    """
    if not alpha > 0:
        raise ValueError(f"dirichlet alpha must be > 0, got {alpha}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    for _ in range(max_tries):
        parts: list[list[int]] = [[] for _ in range(num_sites)]
        for c in np.unique(labels):
            idx = rng.permutation(np.flatnonzero(labels == c))
            cuts = (np.cumsum(rng.dirichlet(np.full(num_sites, alpha)))[:-1] * len(idx)).astype(int)
            for site, chunk in enumerate(np.split(idx, cuts)):
                parts[site].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [np.sort(np.asarray(p, np.int64)) for p in parts]
    raise ValueError(f"no Dirichlet({alpha}) split gave every one of {num_sites} sites >= {min_size} cases")


def make_split(kind: str, labels: np.ndarray, num_sites: int, seed: int, alpha: float) -> list[np.ndarray]:
    """``iid`` or ``label-skew`` partition of ``labels``' indices.

    Raises:
        ValueError: unknown ``kind``.
    """
    if kind == "iid":
        return iid_split(labels, num_sites, seed)
    if kind == "label-skew":
        return dirichlet_label_split(labels, num_sites, alpha, seed)
    raise ValueError(f"split: expected 'iid' or 'label-skew', got {kind!r}")


# --------------------------------------------------------------------------- runs


def score_split(model: torch.nn.Module, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """``(AUC, ACC)`` on the given split: binary AUC of P(class 1) and accuracy of the argmax (scikit-learn)."""
    probs = predict_stages(model, x, device=torch.device("cpu"), batch_size=64)
    return macro_auc(y, probs), float(accuracy_score(y, probs.argmax(1)))


def run_central(folder: Path, budget: Budget, seed: int, transition: str = "mulpool") -> dict:
    """One central run; returns the row (plus ``val_auc`` and ``selected`` = best step)."""
    t0 = time.monotonic()
    x, y = load_split(folder, "train")
    xv, yv = load_split(folder, "val")
    xt, yt = load_split(folder, "test")
    set_determinism(seed=seed)
    model = MulDenseNet3D(dataclasses.replace(budget.stager, transition=transition))
    _, history = fit_stager_central(
        model,
        x,
        y,
        xv,
        yv,
        max_steps=budget.total_steps,
        eval_every=budget.eval_every,
        patience=budget.patience,
        batch_size=budget.batch_size,
        lr=budget.lr,
        weight_decay=budget.weight_decay,
        focal_gamma=budget.focal_gamma,
        warmup_steps=budget.warmup_steps,
        class_balanced=budget.class_balanced,
        flip_dims=budget.flip_dims,
        intensity_aug=budget.intensity_aug,
        seed=seed,
    )
    auc, acc = score_split(model, xt, yt)
    best = max(history, key=lambda h: h["val_auc"])
    return {
        "setting": "central" if transition == "mulpool" else "central-plain-densenet",
        "strategy": "none",
        "split": "none",
        "seed": seed,
        "auc": auc,
        "acc": acc,
        "wall_s": round(time.monotonic() - t0, 1),
        "val_auc": best["val_auc"],
        "selected": f"step {best['step']}",
        "history": history,
    }


def run_federated(folder: Path, budget: Budget, seed: int, strategy: str, split: str, work: Path) -> dict:
    """One federated run in Flower's simulation engine; returns the row.

    Raises:
        RuntimeError: if the simulation produced no global weights.
    """
    from sim.experiments.medmnist_app import FedSpec, read_result, write_app_dir
    from sim.experiments.runner import run_simulation

    t0 = time.monotonic()
    _, y = load_split(folder, "train", mmap=True)
    _, yv = load_split(folder, "val", mmap=True)
    parts = make_split(split, y, budget.num_sites, seed, budget.dirichlet_alpha)
    # validation: always a stratified split, so every site can score its share
    val_parts = iid_split(yv, budget.num_sites, seed)
    spec = FedSpec(
        data_dir=str(Path(folder).resolve()),  # the ClientApps run in Flower's own folder
        train_parts=tuple(tuple(int(i) for i in p) for p in parts),
        val_parts=tuple(tuple(int(i) for i in p) for p in val_parts),
        stager=budget.stager,
        strategy=strategy,
        proximal_mu=budget.proximal_mu,
        rounds=budget.rounds,
        local_steps=budget.local_steps,
        batch_size=budget.batch_size,
        lr=budget.lr,
        weight_decay=budget.weight_decay,
        focal_gamma=budget.focal_gamma,
        warmup_steps=budget.warmup_steps // budget.num_sites,
        class_balanced=budget.class_balanced,
        flip_dims=budget.flip_dims,
        intensity_aug=budget.intensity_aug,
        seed=seed,
    )
    work = Path(work).resolve()
    spec_dir = work / "spec"
    spec_dir.mkdir(parents=True, exist_ok=True)
    for stale in spec_dir.iterdir():  # a rerun into the same folder never reads the last run's result
        stale.unlink()
    (spec_dir / "spec.json").write_text(spec.to_json())
    run_simulation(
        {"spec": str(spec_dir / "spec.json")},
        num_sites=budget.num_sites,
        work_dir=work,
        cpus_per_client=1,
        gpus_per_client=0.0,  # the benchmark's sites train on the CPU
        app_dir=write_app_dir(work / "app"),
        ray_cpus=max(1, min(budget.parallel_clients, budget.num_sites)),
    )
    try:
        sink = read_result(spec_dir)
    except FileNotFoundError:
        raise RuntimeError(
            f"federated {strategy}/{split} run produced no global weights; see {work / 'run.log'}"
        ) from None
    model = MulDenseNet3D(budget.stager)
    model.load_state_dict(sink["best_state"])
    xt, yt = load_split(folder, "test")
    auc, acc = score_split(model, xt, yt)
    return {
        "setting": "federated",
        "strategy": strategy,
        "split": split,
        "seed": seed,
        "auc": auc,
        "acc": acc,
        "wall_s": round(time.monotonic() - t0, 1),
        "val_auc": float(sink["best_val_auc"]),
        "selected": f"round {sink['best_round']}",
        "history": sink["history"],
        "site_sizes": [len(p) for p in parts],
        "site_pos_frac": [float(np.mean(y[p])) for p in parts],
    }


def run_medmnist(
    data: Path,
    size: int,
    out: Path,
    seeds: Sequence[int] = (0,),
    settings: Sequence[str] = DEFAULT_RUNS,
    quick: bool = False,
    budget: Budget | None = None,
) -> list[dict]:
    """Run the benchmark and write ``out/medmnist.json``.

    Args:
        data: the MedMNIST 3D ``.npz`` (64^3 release, keys ``{train,val,test}_{images,labels}``).
        size: 28 (downsampled, comparable with the published rows) or 64.
        out: output folder (``medmnist.json``, prepared arrays under ``cache/``, Flower/Ray
            scratch under ``flower/``).
        seeds: one run of every setting per seed.
        settings: runs from :data:`RUNS`: ``central``, ``central-plain-densenet``, and
            ``<fedavg|fedprox>-<iid|label-skew>``.
        quick: the :data:`QUICK` smoke budget (tiny network, a few steps).
        budget: overrides the budget (default :class:`Budget`, or ``QUICK`` when ``quick``).

    Returns:
        This call's rows ``{setting, strategy, split, size, seed, auc, acc, wall_s}`` (plus
        ``val_auc``, ``selected`` and the training ``history``). ``out/medmnist.json`` is
        rewritten after every run: rows of earlier calls with other (setting, strategy,
        split, size, seed) are kept, rows with the same key are replaced, so a long
        benchmark can be run in pieces into one folder and keeps what it finished.

    Raises:
        ValueError: unknown setting or size; FileNotFoundError: missing ``data``.
    """
    unknown = [s for s in settings if s not in RUNS]
    if unknown:
        raise ValueError(f"unknown settings {unknown}; expected some of {RUNS}")
    budget = budget or (QUICK if quick else Budget())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    folder = prepare_arrays(Path(data), size, out / "cache")
    torch.set_num_threads(budget.threads)
    path = out / "medmnist.json"
    kept = json.loads(path.read_text()) if path.exists() else []
    rows: list[dict] = []
    for seed in seeds:
        for name in settings:
            log.info("medmnist %d^3 seed %d: %s", size, seed, name)
            if name == "central":
                row = run_central(folder, budget, seed, "mulpool")
            elif name == "central-plain-densenet":
                row = run_central(folder, budget, seed, "plain")
            else:
                strategy, split = name.split("-", 1)
                row = run_federated(folder, budget, seed, strategy, split, out / "flower" / f"{name}-seed{seed}")
            row["size"] = size
            rows.append(row)
            log.info(
                "medmnist %s seed %d: test AUC %.4f ACC %.4f (%s, %.0f s)",
                name,
                seed,
                row["auc"],
                row["acc"],
                row["selected"],
                row["wall_s"],
            )
            done = {_row_key(r) for r in rows}
            path.write_text(json.dumps([r for r in kept if _row_key(r) not in done] + rows, indent=2))
    return rows


def _row_key(row: dict) -> tuple:
    return (row["setting"], row["strategy"], row["split"], row["size"], row["seed"])


# --------------------------------------------------------------------------- report and CLI


def summary_rows(rows: list[dict]) -> list[tuple[str, str, str, int, int, str, str, str]]:
    """Group rows by (setting, strategy, split, size): mean ± sd of AUC and ACC over seeds, mean wall time."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["setting"], r["strategy"], r["split"], r["size"]), []).append(r)

    def fmt(values: list[float]) -> str:
        return f"{np.mean(values):.3f}" + (f" ± {np.std(values, ddof=1):.3f}" if len(values) > 1 else "")

    return [
        (
            s,
            st,
            sp,
            size,
            len(g),
            fmt([r["auc"] for r in g]),
            fmt([r["acc"] for r in g]),
            f"{np.mean([r['wall_s'] for r in g]):.0f}",
        )
        for (s, st, sp, size), g in groups.items()
    ]


def print_table(rows: list[dict], console=None) -> None:
    """Our rows (grouped over seeds) beside the published MedMNIST v2 rows, as a rich table."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console(width=140)
    table = Table(title="AdrenalMNIST3D test split (ours: model selected on val AUC)")
    for col in ("model / setting", "strategy", "split", "size", "seeds", "AUC", "ACC", "wall s"):
        table.add_column(col, justify="left" if col in ("model / setting", "strategy", "split") else "right")
    for setting, strategy, split, size, n, auc, acc, wall in summary_rows(rows):
        name = {
            "central": "3D-MulDenseNet (central)",
            "central-plain-densenet": "3D DenseNet, plain transitions (central)",
            "federated": "3D-MulDenseNet (federated)",
        }.get(setting, setting)
        table.add_row(name, strategy, split, f"{size}³", str(n), auc, acc, wall)
    for model, auc, acc in PUBLISHED:
        table.add_row(f"{model} (MedMNIST v2, published)", "–", "–", "28³", "–", f"{auc:.3f}", f"{acc:.3f}", "–")
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    """``python -m sim.experiments.medmnist ...`` is ``onfh sim medmnist ...``."""
    from shared_models.cli import main as onfh_main

    return onfh_main(["sim", "medmnist", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
