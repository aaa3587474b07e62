"""Packed transfer of state dicts (shared_models/transfer.py): exact round trips and exact FedAvg."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from shared_models.config import RunConfig, default_run_config
from shared_models.detection import YOLOX3D
from shared_models.flower.internals import aggregate_arrayrecords
from shared_models.stager import MulDenseNet3D
from shared_models.transfer import (
    FLOAT_KEY,
    from_transfer,
    is_packed,
    pack_state_dict,
    to_transfer,
    unpack_state_dict,
)
from strategies.site_aware import restore_dtypes

CFG = RunConfig.from_run_config(default_run_config())


def _trained_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A state dict with distinct random floats and non-zero ``num_batches_tracked`` counters."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in model.state_dict().items():
        if v.is_floating_point():
            state[k] = torch.randn(v.shape, generator=gen, dtype=v.dtype)
        else:
            state[k] = torch.randint(0, 10_000, v.shape, generator=gen, dtype=v.dtype)
    return state


@pytest.fixture(params=["detector", "stager"])
def model(request):
    torch.manual_seed(0)
    return YOLOX3D(CFG.detector) if request.param == "detector" else MulDenseNet3D(CFG.stager)


def test_round_trip_is_exact_including_integer_buffers(model):
    state = _trained_state(model, seed=1)
    assert any(not v.is_floating_point() for v in state.values())  # num_batches_tracked is there
    packed = pack_state_dict(state)
    assert set(packed) == {FLOAT_KEY, "packed:int64"}  # hundreds of tensors -> two arrays
    assert packed[FLOAT_KEY].dtype == np.float32 and packed["packed:int64"].dtype == np.int64
    back = unpack_state_dict(packed, model.state_dict())
    assert list(back) == list(state)
    for k in state:
        assert back[k].dtype == state[k].dtype and back[k].shape == state[k].shape, k
        assert torch.equal(back[k], state[k]), k
    model.load_state_dict(back)  # strict: every key, right shapes


def test_round_trip_through_a_flower_arrayrecord(model):
    state = _trained_state(model, seed=2)
    record = ArrayRecord({k: Array(v) for k, v in to_transfer(state).items()})
    assert is_packed(record.keys()) and len(record) == 2
    back = from_transfer({k: record[k].numpy() for k in record.keys()}, model.state_dict())
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_fedavg_over_packed_arrays_equals_fedavg_over_unpacked(model):
    """Flower's weighted mean (what FedAvg, FedProx and FedBN run on the server) plus our dtype
    restoration, on three sites with unequal example counts: packed == unpacked, bit for bit."""
    states = [_trained_state(model, seed=s) for s in (3, 4, 5)]
    counts = [7, 3, 12]
    template = model.state_dict()

    def fedavg(arrays_per_site: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        records = [
            RecordDict(
                {
                    "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
                    "metrics": MetricRecord({"num-examples": n}),
                }
            )
            for arrays, n in zip(arrays_per_site, counts)
        ]
        aggregated = restore_dtypes(aggregate_arrayrecords(records, "num-examples"), records[0]["arrays"])
        return {k: aggregated[k].numpy() for k in aggregated.keys()}

    plain = fedavg([to_transfer(s, packed=False) for s in states])
    packed = unpack_state_dict(fedavg([pack_state_dict(s) for s in states]), template)
    for k, v in plain.items():
        assert packed[k].numpy().dtype == v.dtype, k
        np.testing.assert_array_equal(packed[k].numpy(), v, err_msg=k)
    # not vacuous: the mean differs from every input, and integer means were rounded
    key = next(k for k, v in template.items() if v.is_floating_point())
    assert not any(torch.equal(packed[key], s[key]) for s in states)
    nbt = next(k for k, v in template.items() if not v.is_floating_point())
    expected = np.rint(sum(s[nbt].double() * (n / sum(counts)) for s, n in zip(states, counts)).numpy())
    np.testing.assert_array_equal(packed[nbt].numpy(), expected.astype(np.int64))


def test_float16_transfer_halves_the_floats_and_rounds_within_half_precision(model):
    state = _trained_state(model, seed=6)
    full, half = pack_state_dict(state), pack_state_dict(state, float_dtype="float16")
    assert half[FLOAT_KEY].nbytes * 2 == full[FLOAT_KEY].nbytes
    back = unpack_state_dict(half, model.state_dict())
    for k, v in state.items():
        assert back[k].dtype == v.dtype
        if v.is_floating_point():
            torch.testing.assert_close(back[k], v, rtol=2.0**-11, atol=6.1e-5)
        else:
            assert torch.equal(back[k], v)  # integers travel exactly
    unpacked_half = to_transfer(state, packed=False, float_dtype="float16")
    assert all(a.dtype == np.float16 for k, a in unpacked_half.items() if state[k].is_floating_point())


def test_unpacked_transfer_round_trip_and_mismatches_are_refused(model):
    state = _trained_state(model, seed=7)
    template = model.state_dict()
    back = from_transfer(to_transfer(state, packed=False), template)
    assert all(torch.equal(back[k], state[k]) for k in state)
    packed = pack_state_dict(state)
    with pytest.raises(ValueError, match="elements"):
        unpack_state_dict({**packed, FLOAT_KEY: packed[FLOAT_KEY][:-1]}, template)
    with pytest.raises(ValueError, match="groups"):
        unpack_state_dict({FLOAT_KEY: packed[FLOAT_KEY]}, template)
    with pytest.raises(ValueError, match="missing"):
        from_transfer({k: v for k, v in to_transfer(state, packed=False).items() if "bias" not in k}, template)
    with pytest.raises(ValueError, match="transfer dtype"):
        pack_state_dict(state, float_dtype="bfloat16")


def test_meta_device_template_is_enough():
    with torch.device("meta"):
        meta = YOLOX3D(CFG.detector).state_dict()
    torch.manual_seed(0)
    real = YOLOX3D(CFG.detector).state_dict()
    back = unpack_state_dict(pack_state_dict(real), meta)
    assert all(torch.equal(back[k], real[k]) and back[k].device.type == "cpu" for k in real)
