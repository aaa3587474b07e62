"""``onfh sim bench --quick``: the smoke run completes and bench.json has every key (figures are not asserted)."""

from __future__ import annotations

import json
import math

from sim.cli import main

DETECTOR_KEYS = {"model_size", "params", "train_volumes_per_s", "train_step_ms", "augment_ms_per_batch",
                 "infer_ms_per_volume"}


def test_bench_quick_writes_every_key(tmp_path):
    assert main(["sim", "bench", "--quick", "--only", "detector", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert {"torch", "monai", "torch_threads", "load_avg_1min"} <= set(result["environment"])
    rows = result["sections"]["detector"]
    assert [r["model_size"] for r in rows] == ["default"]
    assert DETECTOR_KEYS <= set(rows[0])
    for key in DETECTOR_KEYS - {"model_size"}:
        assert math.isfinite(rows[0][key]) and rows[0][key] > 0, key


def test_bench_quick_transfer_section_counts_what_flower_sends(tmp_path):
    assert main(["sim", "bench", "--quick", "--only", "transfer", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["sections"]["transfer"]
    assert [r["model"] for r in rows] == ["detector", "stager"]
    for r in rows:
        # Flower's serialised arrays hold at least the raw fp32 payload, plus a small header per tensor
        assert r["fp32_bytes"] <= r["arrayrecord_bytes"] <= r["fp32_bytes"] + 1024 * r["tensors"]
        assert r["ratio"] == r["arrayrecord_bytes"] / r["fp32_bytes"]


def test_bench_refuses_an_unknown_section(tmp_path):
    assert main(["sim", "bench", "--only", "nosuch", "--out", str(tmp_path)]) == 1
