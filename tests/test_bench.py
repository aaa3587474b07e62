"""``onfh sim bench``: the quick smoke run completes and bench.json has every key (figures are not
asserted: they are machine-dependent), plus the pieces whose values can be checked exactly."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from shared_models.cli import main

#: Every key each section writes (beyond ``section``); ``onfh sim bench --quick`` must write them all.
EXPECTED_KEYS = {
    "detector": {
        "model_size",
        "params",
        "train_volumes_per_s",
        "train_step_ms",
        "augment_ms_per_batch",
        "augment_share_of_step",
        "infer_ms_per_volume",
    },
    "transfer": {
        "model",
        "model_size",
        "tensors",
        "fp32_bytes",
        "unpacked_bytes",
        "unpacked_ratio",
        "unpacked_objects",
        "arrayrecord_bytes",
        "ratio",
        "packed_arrays",
        "packed_objects",
        "fp16_bytes",
        "fp16_ratio",
        "pack_ms",
        "unpack_ms",
        "fp16_weight_max_rel_err",
        "fp16_output_max_abs_diff",
    },
    "ingestion": {"monai_reader", "studies", "monai_ms", "first_read_ms", "cached_read_ms", "first_read_over_monai"},
    "input_pipeline": {"model", "inmemory_volumes_per_s", "ours_volumes_per_s", "throughput_ratio"},
    "inference": {"model_size", "read_ms", "analyse_ms", "total_ms"},
    "federated": {
        "baseline_s",
        "flower_s",
        "overhead_ratio",
        "roundtrip_s_per_round",
        "peak_rss_gib",
        "peak_client_rss_gib",
        "fp32_iou_mean",
        "fp32_macro_auc",
        "fp16_iou_mean",
        "fp16_macro_auc",
    },
    "scaling": {
        "sites",
        "data_copies",
        "s_per_round",
        "per_site_s_per_round",
        "peak_rss_gib",
        "rss_round5_over_round2",
    },
    "deployment": {"status", "simulation_s", "deployment_s", "overhead_ratio"},
    "gpu": {"model", "model_size"},
    "poisoning": {
        "strategy",
        "attack",
        "seed",
        "macro_auc",
        "iou_mean",
        "rejected_replies",
        "auc_drop",
        "iou_drop",
        "stager_shift",
        "detector_shift",
        "within_spread",
    },
}


@pytest.mark.slow
def test_bench_quick_runs_every_section_and_writes_every_key(tmp_path, monkeypatch):
    # run from another folder with a relative --out, as the README's command is typed (issue 18)
    monkeypatch.chdir(tmp_path)
    assert main(["sim", "bench", "--quick", "--out", "results"]) == 0
    result = json.loads((tmp_path / "results" / "bench.json").read_text())
    assert result["quick"] is True
    assert {"torch", "monai", "torch_threads", "load_avg_1min", "load_avg_1min_end"} <= set(result["environment"])
    assert set(result["sections"]) == set(EXPECTED_KEYS)
    for name, keys in EXPECTED_KEYS.items():
        rows = result["sections"][name]
        assert rows, name
        for row in rows:
            assert keys <= set(row), (name, keys - set(row))
    fed = result["sections"]["federated"][0]
    assert math.isfinite(fed["overhead_ratio"]) and fed["overhead_ratio"] > 0
    assert 0 < fed["peak_client_rss_gib"] <= fed["peak_rss_gib"]


def test_bench_quick_detector_section(tmp_path):
    assert main(["sim", "bench", "--quick", "--only", "detector", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["sections"]["detector"]
    assert [r["model_size"] for r in rows] == ["default"]
    assert EXPECTED_KEYS["detector"] <= set(rows[0])
    for key in EXPECTED_KEYS["detector"] - {"model_size"}:
        assert math.isfinite(rows[0][key]) and rows[0][key] > 0, key


def test_bench_quick_transfer_section_counts_what_flower_sends(tmp_path):
    assert main(["sim", "bench", "--quick", "--only", "transfer", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "bench.json").read_text())["sections"]["transfer"]
    assert [r["model"] for r in rows] == ["detector", "stager"]
    for r in rows:
        assert EXPECTED_KEYS["transfer"] <= set(r)
        # Flower's serialised arrays hold at least the raw fp32 payload, plus a small header per array
        assert r["fp32_bytes"] <= r["unpacked_bytes"] <= r["fp32_bytes"] + 1024 * r["tensors"]
        assert r["fp32_bytes"] <= r["arrayrecord_bytes"] <= r["fp32_bytes"] + 1024 * r["packed_arrays"]
        assert r["ratio"] == r["arrayrecord_bytes"] / r["fp32_bytes"] and r["ratio"] <= 1.02
        assert r["packed_arrays"] == 2 and r["packed_objects"] < r["unpacked_objects"]
        assert 0.49 < r["fp16_ratio"] < 0.51
        assert r["fp16_weight_max_rel_err"] <= 2.0**-11


def test_bench_refuses_an_unknown_section(tmp_path):
    assert main(["sim", "bench", "--only", "nosuch", "--out", str(tmp_path)]) == 1


def test_plain_loop_fedavg_equals_flowers_aggregation():
    """The plain baseline's FedAvg (sim.bench.federation.fedavg_states) is Flower's weighted mean."""
    from flwr.app import ArrayRecord, MetricRecord, RecordDict

    from shared_models.flower.internals import aggregate_arrayrecords
    from sim.bench.federation import fedavg_states
    from strategies.site_aware import restore_dtypes

    gen = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(5, 3, generator=gen), "n": torch.tensor(100 + i, dtype=torch.int64)} for i in range(3)]
    counts = [4, 1, 6]
    records = [
        RecordDict({"arrays": ArrayRecord(s), "metrics": MetricRecord({"num-examples": n})})
        for s, n in zip(states, counts)
    ]
    flower = restore_dtypes(aggregate_arrayrecords(records, "num-examples"), records[0]["arrays"])
    ours = fedavg_states(states, counts)
    np.testing.assert_array_equal(ours["w"].numpy(), flower["w"].numpy())
    assert int(ours["n"]) == int(flower["n"].numpy().item()) == round((100 * 4 + 101 + 102 * 6) / 11)


def test_scaled_sites_copy_patients_under_new_names(tmp_path):
    from client.site_data import read_manifest
    from sim.bench.federation import make_scaled_sites

    src = tmp_path / "src"
    for site in "AB":
        (src / site / "study-1").mkdir(parents=True)
        (src / site / "manifest.csv").write_text(
            "patient_id,study,side,ficat_stage,box_lps_mm,scanner\n"
            f"{site}-1,study-1,L,0,0 0 0 40 40 40,x\n{site}-1,study-1,R,I,0 0 0 40 40 40,x\n"
        )
    ids = make_scaled_sites(src, tmp_path / "out", n_sites=3, copies=2)
    assert ids == ["S01", "S02", "S03"]
    heads = read_manifest(tmp_path / "out" / "S03", "S03")  # S03 is built from A again
    assert len(heads) == 4 and len({h.patient_id for h in heads}) == 2 and len({h.study for h in heads}) == 2
    assert (tmp_path / "out" / "S03" / "study-1-c1").resolve() == (src / "A" / "study-1").resolve()
