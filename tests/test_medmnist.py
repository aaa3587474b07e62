"""AdrenalMNIST3D benchmark harness: data preparation, site splits, pooled AUC, and a smoke run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from shared_models.cli import main as onfh_main
from shared_models.clinical_stats import auc_from_histograms
from shared_models.stage_scores import score_histograms
from sim.cli import add_medmnist_parser
from sim.experiments.medmnist import (
    ROW_KEYS,
    dirichlet_label_split,
    downsample,
    iid_split,
    prepare_arrays,
    run_medmnist,
)

REAL_NPZ = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "medmnist" / "adrenalmnist3d_64.npz"
VALID = {("central", "none", "none"), ("central-plain-densenet", "none", "none")} | {
    ("federated", s, sp) for s in ("fedavg", "fedprox") for sp in ("iid", "label-skew")
}


def synthetic_npz(path: Path, n_train: int = 64, n_val: int = 16, n_test: int = 16, seed: int = 0) -> Path:
    """MedMNIST-3D keys and dtypes at 64^3: class 1 a big ball (radius 14), class 0 a small one (radius 8)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(64)] * 3, indexing="ij"))
    arrays = {}
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        labels = (np.arange(n) % 4 == 0).astype(np.uint8)  # 25 % positives, like the real set's ~22 %
        images = np.empty((n, 64, 64, 64), np.uint8)
        for i, lab in enumerate(labels):
            centre = 32 + rng.integers(-4, 5, size=3)
            r = 14 if lab else 8
            images[i] = (((grid - centre[:, None, None, None]) ** 2).sum(0) <= r * r) * 255
        arrays[f"{split}_images"] = images
        arrays[f"{split}_labels"] = labels[:, None]
    np.savez(path, **arrays)
    return path


def _check_rows(rows: list[dict], size: int, seeds: set[int]) -> None:
    for row in rows:
        assert set(ROW_KEYS) <= set(row)
        assert (row["setting"], row["strategy"], row["split"]) in VALID
        assert row["size"] == size and row["seed"] in seeds
        assert 0.0 <= row["auc"] <= 1.0 and 0.0 <= row["acc"] <= 1.0
        assert row["wall_s"] > 0


def test_quick_central_rows(tmp_path):
    npz = synthetic_npz(tmp_path / "tiny.npz")
    rows = run_medmnist(
        npz, 28, tmp_path / "out", seeds=(0, 1), settings=("central", "central-plain-densenet"), quick=True
    )
    assert [(r["setting"], r["seed"]) for r in rows] == [
        ("central", 0),
        ("central-plain-densenet", 0),
        ("central", 1),
        ("central-plain-densenet", 1),
    ]
    _check_rows(rows, 28, {0, 1})
    written = json.loads((tmp_path / "out" / "medmnist.json").read_text())
    assert [{k: r[k] for k in ROW_KEYS} for r in written] == [{k: r[k] for k in ROW_KEYS} for r in rows]
    # a second call into the same folder replaces its own key's row and keeps the others
    again = run_medmnist(npz, 28, tmp_path / "out", seeds=(1,), settings=("central",), quick=True)
    merged = json.loads((tmp_path / "out" / "medmnist.json").read_text())
    assert len(again) == 1 and len(merged) == 4
    assert sorted((r["setting"], r["seed"]) for r in merged) == sorted((r["setting"], r["seed"]) for r in rows)
    assert merged[-1]["wall_s"] == again[0]["wall_s"]


def test_quick_central_row_through_onfh(tmp_path, capsys):
    """``onfh sim medmnist``: the parser (torch-free, in ``sim.cli``) reaches the benchmark and prints its table."""
    npz = synthetic_npz(tmp_path / "tiny.npz")
    argv = ["sim", "medmnist", "--data", str(npz), "--out", str(tmp_path / "out"), "--seeds", "3"]
    assert onfh_main([*argv, "--settings", "central", "--quick"]) == 0
    rows = json.loads((tmp_path / "out" / "medmnist.json").read_text())
    assert [(r["setting"], r["seed"], r["size"]) for r in rows] == [("central", 3, 28)]
    _check_rows(rows, 28, {3})
    assert "AdrenalMNIST3D test split" in capsys.readouterr().out


@pytest.mark.slow
def test_quick_federated_rows_through_the_cli(tmp_path):
    npz = synthetic_npz(tmp_path / "tiny.npz")
    parser = argparse.ArgumentParser()
    add_medmnist_parser(parser.add_subparsers())
    args = parser.parse_args(
        [
            "medmnist",
            "--data",
            str(npz),
            "--size",
            "28",
            "--out",
            str(tmp_path / "out"),
            "--settings",
            "fedavg-iid,fedprox-label-skew",
            "--quick",
        ]
    )
    assert args.func(args) == 0
    rows = json.loads((tmp_path / "out" / "medmnist.json").read_text())
    assert [(r["strategy"], r["split"]) for r in rows] == [("fedavg", "iid"), ("fedprox", "label-skew")]
    _check_rows(rows, 28, {0})
    for row in rows:  # the Flower run did its rounds and model selection saw every one
        assert [h["round"] for h in row["history"]] == [1, 2]
        assert all(0.0 <= h["val_auc"] <= 1.0 for h in row["history"])
        assert sum(row["site_sizes"]) == 64


def test_cli_rejects_unknown_setting():
    parser = argparse.ArgumentParser()
    add_medmnist_parser(parser.add_subparsers())
    with pytest.raises(SystemExit):
        parser.parse_args(["medmnist", "--data", "x", "--out", "y", "--settings", "central,fedsgd-iid"])


# --------------------------------------------------------------------------- splits


def _labels(n: int = 400, pos: float = 0.2, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.random(n) < pos).astype(np.int64)


@pytest.mark.parametrize("kind", ["iid", "label-skew"])
def test_splits_partition_every_training_index_exactly_once(kind):
    labels = _labels()
    parts = iid_split(labels, 4, seed=0) if kind == "iid" else dirichlet_label_split(labels, 4, 0.5, seed=0)
    assert len(parts) == 4
    joined = np.concatenate(parts)
    assert len(joined) == len(labels)
    assert np.array_equal(np.sort(joined), np.arange(len(labels)))


def test_label_skew_is_more_skewed_than_iid():
    labels = _labels()
    global_pos = labels.mean()
    for seed in range(5):
        iid = max(abs(labels[p].mean() - global_pos) for p in iid_split(labels, 4, seed))
        skew = max(abs(labels[p].mean() - global_pos) for p in dirichlet_label_split(labels, 4, 0.5, seed))
        # stratified folds: every site within one case of the global mix (<= 1/100 off)
        assert iid <= 1.0 / (len(labels) // 4)
        assert skew > 5 * iid and skew > 0.05


def test_dirichlet_split_is_seeded_and_respects_min_size():
    labels = _labels()
    a = dirichlet_label_split(labels, 4, 0.5, seed=3, min_size=20)
    b = dirichlet_label_split(labels, 4, 0.5, seed=3, min_size=20)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert min(len(p) for p in a) >= 20
    with pytest.raises(ValueError, match="alpha"):
        dirichlet_label_split(labels, 4, 0.0, seed=0)


# --------------------------------------------------------------------------- data and metrics


def test_downsample_area_averages():
    vol = np.zeros((2, 64, 64, 64), np.uint8)
    vol[0] = 255
    vol[1, :32] = 255  # first half of the depth axis set
    out = downsample(vol, 28)
    assert out.shape == (2, 1, 28, 28, 28) and out.dtype == np.float32
    assert np.allclose(out[0], 1.0)
    depth_profile = out[1, 0, :, 14, 14]
    assert np.allclose(depth_profile[:12], 1.0) and np.allclose(depth_profile[16:], 0.0)
    assert np.all(np.diff(depth_profile) <= 0)  # area averaging: a monotone edge, no overshoot
    assert out[1].mean() == pytest.approx(0.5, abs=0.02)
    assert downsample(vol, 64)[1, 0, 31, 0, 0] == 1.0  # 64 keeps the volumes (scaled to [0, 1])


def test_pooled_histogram_auc_matches_sklearn_on_raw_scores():
    rng = np.random.default_rng(0)
    labels = (rng.random(300) < 0.3).astype(np.int64)
    # scores at distinct bin centres (1000 bins): binning loses nothing, so the AUCs must agree
    scores = (rng.choice(1000, size=300, replace=False) + 0.5) / 1000 + 0.2 * labels
    scores = np.clip(scores, 0.0, 0.9995)
    halves = [slice(0, 150), slice(150, 300)]
    sums = [np.zeros(1000, np.int64), np.zeros(1000, np.int64)]
    for s in halves:  # two sites, summed like the server does
        pos, neg = score_histograms(labels[s] == 1, scores[s], 1000)
        sums[0] += pos
        sums[1] += neg
    assert sums[0].sum() == labels.sum() and sums[1].sum() == (1 - labels).sum()
    expected = roc_auc_score(labels, np.floor(scores * 1000))  # same ordering as the bins
    assert auc_from_histograms(*sums) == pytest.approx(expected, abs=1e-12)
    assert np.isnan(auc_from_histograms(sums[0], np.zeros(1000)))


def test_prepare_arrays_on_the_real_file(tmp_path):
    if not REAL_NPZ.exists():
        pytest.skip(f"{REAL_NPZ} not present (shared/data/medmnist is optional)")
    folder = prepare_arrays(REAL_NPZ, 28, tmp_path)
    counts = {}
    for split, n in (("train", 1188), ("val", 98), ("test", 298)):
        x = np.load(folder / f"{split}_x.npy", mmap_mode="r")
        y = np.load(folder / f"{split}_y.npy")
        assert x.shape == (n, 1, 28, 28, 28) and x.dtype == np.float32 and y.shape == (n,)
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
        counts[split] = np.bincount(y, minlength=2).tolist()
    assert counts == {"train": [929, 259], "val": [76, 22], "test": [229, 69]}


# --------------------------------------------------------------------------- the Flower app


def test_the_spec_travels_as_json_unchanged():
    from shared_models.stager import StagerConfig
    from sim.experiments.medmnist_app import FedSpec

    spec = FedSpec(
        data_dir="/data/x",
        train_parts=((0, 2), (1, 3, 5)),
        val_parts=((0,), (1,)),
        stager=StagerConfig(out_channels=2, init_features=4, growth_rate=4, block_config=(1, 1), pool_scales=(1, 2)),
        strategy="fedprox",
        proximal_mu=0.01,
        rounds=2,
        local_steps=3,
        batch_size=4,
        lr=1e-3,
        weight_decay=1e-4,
        focal_gamma=2.0,
        warmup_steps=1,
        flip_dims=(2,),
        seed=7,
    )
    assert FedSpec.from_json(spec.to_json()) == spec
    with pytest.raises(ValueError, match="FedSpec"):
        FedSpec.from_json('{"data_dir": "/x"}')


def test_the_app_folder_names_the_benchmarks_components(tmp_path):
    import importlib
    import tomllib

    from flwr.clientapp import ClientApp
    from flwr.serverapp import ServerApp

    from sim.experiments.medmnist_app import SPEC_KEY, write_app_dir

    flwr_app = tomllib.loads((write_app_dir(tmp_path / "app") / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert flwr_app["config"] == {SPEC_KEY: ""}
    loaded = {}
    for role, ref in flwr_app["components"].items():
        module, _, attribute = ref.partition(":")
        loaded[role] = getattr(importlib.import_module(module), attribute)
    assert isinstance(loaded["serverapp"], ServerApp) and isinstance(loaded["clientapp"], ClientApp)
