"""Stager training recipe: LR schedule, seeding, early stopping, class-balanced sampling, N classes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from client.stager_training import (
    class_balanced_weights,
    fit_stager_central,
    lr_factor,
    macro_auc,
    make_lr_scheduler,
    predict_stages,
    train_stager,
)
from client.training import batches
from shared_models.stager import MulDenseNet3D, StagerConfig

CPU = torch.device("cpu")


def tiny(out_channels: int = 2) -> MulDenseNet3D:
    return MulDenseNet3D(
        StagerConfig(
            out_channels=out_channels, init_features=4, growth_rate=4, block_config=(1, 1), pool_scales=(1,), bn_size=2
        )
    )


def blobs(n: int, seed: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """Class 1: a bright 6^3 cube in the centre; class 0: background only; plus noise."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.normal(0.2, 0.05, (n, 1, size, size, size)).astype(np.float32)
    c = size // 2
    x[y == 1, :, c - 3 : c + 3, c - 3 : c + 3, c - 3 : c + 3] += 0.6
    return np.clip(x, 0, 1), y.astype(np.int64)


# --------------------------------------------------------------------------- schedule


def _lrs(sched_kwargs: dict, n: int, base: float = 0.1) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    sched = make_lr_scheduler(opt, **sched_kwargs)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_schedule_warmup_then_cosine_hand_values():
    # warm-up 10, total 110: step s < 10 -> 0.1 * (s + 1) / 10; then 0.1 * 0.5 * (1 + cos(pi * (s - 10) / 100))
    lrs = _lrs({"warmup_steps": 10, "total_steps": 110}, 111)
    expected = {
        0: 0.01,
        4: 0.05,
        9: 0.1,
        10: 0.1,
        35: 0.1 * 0.8535533905932737,
        60: 0.05,
        85: 0.1 * 0.14644660940672627,
        110: 0.0,
    }
    for step, value in expected.items():
        assert lrs[step] == pytest.approx(value, abs=1e-12), step


def test_schedule_continues_across_rounds():
    # round 3 of 4 with 25 local steps starts at global step 50 and must match the continuous schedule
    whole = _lrs({"warmup_steps": 10, "total_steps": 100}, 100)
    round3 = _lrs({"warmup_steps": 10, "total_steps": 100, "step_offset": 50}, 25)
    assert round3 == pytest.approx(whole[50:75], abs=1e-15)
    assert round3[0] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 40 / 90)), abs=1e-12)


def test_schedule_defaults_are_constant_and_bad_values_raise():
    assert _lrs({}, 5) == [0.1] * 5
    assert _lrs({"warmup_steps": 4}, 6) == pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1, 0.1])
    assert lr_factor(500, warmup_steps=0, total_steps=100) == 0.0
    with pytest.raises(ValueError, match="total_steps"):
        lr_factor(0, warmup_steps=10, total_steps=5)
    with pytest.raises(ValueError, match="step_offset"):
        _lrs({"step_offset": -1}, 1)


# --------------------------------------------------------------------------- seeding


def _train_copy(state: dict, x: np.ndarray, y: np.ndarray, seed: int) -> dict:
    model = tiny()
    model.load_state_dict(state)
    train_stager(
        model,
        x,
        y,
        steps=3,
        batch_size=4,
        lr=1e-2,
        weight_decay=1e-4,
        focal_gamma=2.0,
        device=CPU,
        seed=seed,
        flip_dims=(2, 3, 4),
        warmup_steps=2,
        total_steps=6,
        step_offset=1,
    )
    return model.state_dict()


def test_same_seed_same_weights_different_seed_different_weights():
    torch.manual_seed(0)
    init = tiny().state_dict()
    x, y = blobs(12, seed=0)
    a, b, c = (_train_copy(init, x, y, s) for s in (7, 7, 8))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert not all(torch.equal(a[k], init[k]) for k in a)  # it did train


def test_fit_central_is_reproducible_with_set_determinism():
    x, y = blobs(16, seed=1)
    xv, yv = blobs(8, seed=2)
    states = []
    for _ in range(2):
        torch.manual_seed(3)
        model = tiny()
        state, _ = fit_stager_central(
            model, x, y, xv, yv, max_steps=4, eval_every=2, patience=5, batch_size=4, lr=1e-2, seed=5
        )
        states.append(state)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


# --------------------------------------------------------------------------- early stopping


def faint_blobs(n: int, seed: int, size: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """A hard task: a faint 4^3 cube (+0.15) in strong noise (sd 0.15), so validation AUC wanders."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    x = rng.normal(0.3, 0.15, (n, 1, size, size, size)).astype(np.float32)
    c = size // 2
    x[y == 1, :, c - 2 : c + 2, c - 2 : c + 2, c - 2 : c + 2] += 0.15
    return np.clip(x, 0, 1), y.astype(np.int64)


def test_early_stopping_after_patience_returns_best_state():
    x, y = faint_blobs(32, seed=3)
    xv, yv = faint_blobs(24, seed=4)
    torch.manual_seed(0)
    model = tiny()
    patience = 3
    state, history = fit_stager_central(
        model,
        x,
        y,
        xv,
        yv,
        max_steps=400,
        eval_every=2,
        patience=patience,
        batch_size=8,
        lr=1e-2,
        warmup_steps=2,
        seed=0,
    )
    aucs = [h["val_auc"] for h in history]
    best = int(np.argmax(aucs))  # first maximum: ties keep the earlier state
    # stopped exactly `patience` evaluations after the last strict improvement, long before the budget
    assert len(history) == best + 1 + patience
    assert history[-1]["step"] == 2 * len(history) < 400
    assert [h["best"] for h in history].count(True) == sum(
        aucs[i] > max(aucs[:i], default=-1) for i in range(len(aucs))
    )
    # the last weights were worse than the best, so only the best state reproduces the best AUC
    assert aucs[-1] < aucs[best]
    fresh = tiny()
    fresh.load_state_dict(state)
    assert macro_auc(yv, predict_stages(fresh, xv, device=CPU)) == pytest.approx(aucs[best], abs=1e-9)
    assert all(torch.equal(state[k], model.state_dict()[k]) for k in state)  # the model holds it too


def test_fit_central_rejects_single_class_validation():
    x, y = blobs(8, seed=0)
    with pytest.raises(ValueError, match="two classes"):
        fit_stager_central(
            tiny(), x, y, x[:2], np.zeros(2, np.int64), max_steps=2, eval_every=1, patience=1, batch_size=4, lr=1e-3
        )


# --------------------------------------------------------------------------- sampling and classes


def test_class_balanced_sampling_on_90_10():
    labels = np.array([0] * 900 + [1] * 100)
    w = class_balanced_weights(labels, 2)
    drawn = np.concatenate(list(batches(len(labels), 50, 200, np.random.default_rng(0), weights=w)))
    share = labels[drawn].mean()
    assert abs(share - 0.5) < 0.03  # 10,000 draws: sd of the share is 0.005
    plain = np.concatenate(list(batches(len(labels), 50, 200, np.random.default_rng(0))))
    assert abs(labels[plain].mean() - 0.1) < 0.01


def test_n_classes_from_model_width():
    x, _ = blobs(6, seed=0)
    binary = tiny(2)
    assert predict_stages(binary, x, device=CPU).shape == (6, 2)
    assert predict_stages(binary, x[:0], device=CPU).shape == (0, 2)
    three = tiny(3)
    assert predict_stages(three, x, device=CPU).shape == (6, 3)
    with pytest.raises(ValueError, match=r"0\.\.1"):
        train_stager(
            binary,
            x,
            np.array([0, 1, 2, 0, 1, 0]),
            steps=1,
            batch_size=2,
            lr=1e-3,
            weight_decay=0.0,
            focal_gamma=2.0,
            device=CPU,
        )
    out = train_stager(
        three,
        x,
        np.array([0, 1, 2, 0, 1, 2]),
        steps=2,
        batch_size=3,
        lr=1e-3,
        weight_decay=0.0,
        focal_gamma=2.0,
        device=CPU,
    )
    assert math.isfinite(out["train-loss"]) and out["train-loss"] > 0


def test_macro_auc_binary_and_multiclass():
    y = np.array([0, 0, 1, 1])
    p1 = np.array([0.1, 0.6, 0.4, 0.9])  # pairs (pos>neg): 0.4>0.1, 0.9>0.1, 0.9>0.6 -> 3 of 4
    assert macro_auc(y, np.stack([1 - p1, p1], 1)) == pytest.approx(0.75)
    y3 = np.array([0, 1, 2, 0, 1, 2])
    perfect = np.eye(3)[y3] * 0.8 + 0.1 / 1.0 * (1 - np.eye(3)[y3])
    assert macro_auc(y3, perfect) == pytest.approx(1.0)
    assert math.isnan(macro_auc(np.zeros(3, int), np.full((3, 2), 0.5)))


def test_flip_augmentation_mirrors_some_samples_along_each_axis_and_leaves_the_rest():
    from client.stager_training import _augment

    x = torch.rand(32, 1, 6, 5, 4)
    out = _augment(x.clone(), torch.Generator().manual_seed(0), (4,), intensity=False)
    flipped = [torch.equal(o, torch.flip(v, dims=[3])) for o, v in zip(out, x)]
    same = [torch.equal(o, v) for o, v in zip(out, x)]
    assert all(f or s for f, s in zip(flipped, same))  # each sample is either mirrored along W or untouched
    assert 4 <= sum(flipped) <= 28 and 4 <= sum(same) <= 28  # p = 0.5 over 32 samples


def test_amp_uses_bfloat16_where_supported_and_scales_loss_only_for_float16(monkeypatch):
    import torch

    from client.training import LocalRun, amp_dtype, autocast, to_device

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert amp_dtype(cpu) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert amp_dtype(cuda) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert amp_dtype(cuda) == torch.float16
    # on CPU: no autocast, no loss scaling, and the copy is a plain move (no pinned memory without CUDA)
    with autocast(cpu, amp=True):
        assert torch.matmul(torch.ones(2, 2), torch.ones(2, 2)).dtype == torch.float32
    run = LocalRun.start(
        torch.nn.Linear(2, 2), lr=1e-3, weight_decay=0.0, device=cpu, amp=True, proximal_mu=0.0, seed=0
    )
    assert not run.scaler.is_enabled()
    x = torch.arange(6.0).reshape(2, 3)
    assert torch.equal(to_device(x, cpu), x)
