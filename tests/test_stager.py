"""3D-MulDenseNet stager and MulPoolFusion (CPU, tiny widths, volumes <= 32^3)."""

from __future__ import annotations

import json

import pytest
import torch

from shared_models.stager import MulDenseNet3D, MulPoolFusion, StagerConfig

TINY = dict(init_features=8, growth_rate=4, block_config=(1, 2, 2), bn_size=2)

# (config, input shape, expected output shape)
STAGER_CASES = [
    (StagerConfig(), (2, 1, 32, 32, 32), (2, 3)),
    (StagerConfig(), (2, 1, 16, 16, 16), (2, 3)),
    (StagerConfig(fusion="sum"), (2, 1, 32, 32, 32), (2, 3)),
    (StagerConfig(fusion="sum"), (2, 1, 16, 16, 16), (2, 3)),
    (StagerConfig(transition="plain"), (2, 1, 32, 32, 32), (2, 3)),
    (StagerConfig(transition="plain"), (2, 1, 16, 16, 16), (2, 3)),
    (StagerConfig(**TINY, pool_scales=(1,), stem_pool=False), (2, 1, 24, 20, 16), (2, 3)),
    (StagerConfig(**TINY, pool_scales=(1, 3), dropout_prob=0.2), (2, 1, 9, 9, 9), (2, 3)),
    (StagerConfig(**TINY, out_channels=2, in_channels=2), (2, 2, 16, 16, 16), (2, 2)),
]


@pytest.mark.parametrize("config, in_shape, out_shape", STAGER_CASES)
def test_stager_shapes(config, in_shape, out_shape):
    model = MulDenseNet3D(config)
    model.train()
    out = model(torch.rand(in_shape))
    assert out.shape == out_shape
    out.sum().backward()
    model.eval()  # inference on a single crop (BatchNorm running stats)
    with torch.no_grad():
        assert model(torch.rand(1, *in_shape[1:])).shape == (1, out_shape[1])


# (fusion, scales, input spatial, expected spatial): ceil(n / 2) per axis, even for n = 1
MULPOOL_CASES = [
    ("concat", (1, 2, 4), (8, 8, 8), (4, 4, 4)),
    ("sum", (1, 2, 4), (8, 8, 8), (4, 4, 4)),
    ("concat", (1, 2, 4), (7, 5, 3), (4, 3, 2)),
    ("sum", (1, 2), (2, 2, 2), (1, 1, 1)),
    ("concat", (1, 2, 4), (1, 1, 1), (1, 1, 1)),
    ("concat", (3,), (16, 12, 10), (8, 6, 5)),
]


@pytest.mark.parametrize("fusion, scales, spatial, expected", MULPOOL_CASES)
def test_mulpoolfusion_halves_spatial_size(fusion, scales, spatial, expected):
    module = MulPoolFusion(3, in_channels=12, out_channels=6, pool_scales=scales, fusion=fusion)
    out = module(torch.rand(2, 12, *spatial))
    assert out.shape == (2, 6, *expected)
    assert len(module.branches) == 2 * len(scales)
    assert (module.fuse is not None) == (fusion == "concat")


@pytest.mark.parametrize("fusion", ["concat", "sum"])
def test_every_mulpoolfusion_branch_receives_gradient(fusion):
    torch.manual_seed(0)
    model = MulDenseNet3D(StagerConfig(**TINY, pool_scales=(1, 2, 4), fusion=fusion))
    model(torch.rand(2, 1, 16, 16, 16)).sum().backward()
    transitions = [m for m in model.modules() if isinstance(m, MulPoolFusion)]
    assert len(transitions) == len(TINY["block_config"]) - 1
    for t in transitions:
        for name, branch in t.branches.items():  # max and average pooling at every scale
            grad = branch.conv.weight.grad
            assert grad is not None and grad.abs().sum() > 0, name


def test_mulpoolfusion_average_branch_excludes_padding():
    # constant input: every average-pool window must average to the constant (no zero padding
    # leaking in), also for an input smaller than the kernel (scale 4 -> kernel 9 on 3 voxels)
    module = MulPoolFusion(3, 1, 1, pool_scales=(4,), fusion="sum")
    y = torch.full((1, 1, 3, 3, 3), 2.5)
    pooled = module.branches["avg_s4"].pool(y)
    torch.testing.assert_close(pooled, torch.full((1, 1, 2, 2, 2), 2.5))
    plain = torch.nn.AvgPool3d(5, 2, 2, count_include_pad=False)
    x = torch.rand(1, 2, 9, 10, 11)
    torch.testing.assert_close(MulPoolFusion(3, 2, 2, pool_scales=(2,)).branches["avg_s2"].pool(x), plain(x))


def test_mulpoolfusion_validation():
    with pytest.raises(ValueError, match="fusion"):
        MulPoolFusion(3, 4, 2, fusion="max")
    with pytest.raises(ValueError, match="pool_scales"):
        MulPoolFusion(3, 4, 2, pool_scales=(1, 1))
    with pytest.raises(ValueError, match="pool_scales"):
        MulPoolFusion(3, 4, 2, pool_scales=(0, 2))


@pytest.mark.parametrize(
    "config, expected",
    [
        (StagerConfig(), "features.denseblock3.denselayer4.layers.conv2"),
        (StagerConfig(**TINY), "features.denseblock3.denselayer2.layers.conv2"),
        (StagerConfig.PAPER, "features.denseblock4.denselayer16.layers.conv2"),
    ],
)
def test_gradcam_layer_is_last_conv(config, expected):
    model = MulDenseNet3D(config)
    assert model.gradcam_layer == expected
    modules = dict(model.named_modules())
    assert isinstance(modules[expected], torch.nn.Conv3d)
    last_conv = [name for name, m in model.named_modules() if isinstance(m, torch.nn.Conv3d)][-1]
    assert last_conv == expected


def test_transitions_are_mulpool_or_plain():
    mul = MulDenseNet3D(StagerConfig())
    plain = MulDenseNet3D(StagerConfig(transition="plain"))
    assert isinstance(mul.features.transition1, MulPoolFusion)
    assert isinstance(mul.features.transition2, MulPoolFusion)
    assert not any(isinstance(m, MulPoolFusion) for m in plain.modules())


def test_config_round_trip_and_validation():
    for cfg in (StagerConfig(), StagerConfig(**TINY, fusion="sum"), StagerConfig.PAPER):
        assert StagerConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    bad = [
        ({"fusion": "max"}, "fusion"),
        ({"transition": "none"}, "transition"),
        ({"pool_scales": [1, 1]}, "pool_scales"),
        ({"block_config": []}, "block_config"),
        ({"growth_rate": 0}, "growth_rate"),
        ({"dropout_prob": 1.0}, "dropout_prob"),
        ({"out_channels": 1}, "out_channels"),
        ({"stem_pool": "yes"}, "stem_pool"),
        ({"depth": 3}, "depth"),
    ]
    for data, key in bad:
        with pytest.raises(ValueError, match=key):
            StagerConfig.from_dict(data)


def test_paper_preset_builds():
    model = MulDenseNet3D(StagerConfig.PAPER)
    n_params = sum(p.numel() for p in model.parameters())
    assert 10e6 < n_params < 20e6  # DenseNet121-like in 3D, with MulPoolFusion transitions
    assert model.class_layers.out.out_features == 3


def test_crop_input_norm_removes_a_studys_gain_and_offset():
    # a study's gain g and the window's offset b move every voxel as g * x + b; "crop" sees the same input
    torch.manual_seed(0)
    x = torch.rand(3, 1, 16, 16, 16)
    y = 0.3 + 0.5 * (x - 0.3) + 0.05
    normed = MulDenseNet3D(StagerConfig(block_config=(1, 1), input_norm="crop")).eval()
    plain = MulDenseNet3D(StagerConfig(block_config=(1, 1), input_norm="none")).eval()
    plain.load_state_dict(normed.state_dict())  # no parameters of its own: the same weights load both ways
    with torch.no_grad():
        assert torch.allclose(normed(x), normed(y), atol=1e-4)
        assert not torch.allclose(plain(x), plain(y), atol=1e-3)
        # the standardised crop has mean 0 and sd 1 per sample (checked with numpy's formula)
        from shared_models.stager import standardise_crop

        z = standardise_crop(x).numpy().reshape(3, -1)
        assert abs(z.mean(1)).max() < 1e-5 and abs(z.std(1) - 1).max() < 1e-4
        assert torch.equal(standardise_crop(torch.full((1, 1, 4, 4, 4), 0.7)), torch.zeros(1, 1, 4, 4, 4))


def test_input_norm_is_validated_and_old_bundles_read_none():
    with pytest.raises(ValueError, match="input_norm"):
        StagerConfig(input_norm="zscore")
    old = {k: v for k, v in StagerConfig().to_dict().items() if k != "input_norm"}  # a bundle before issue 18
    assert StagerConfig.from_dict(old).input_norm == "none"
