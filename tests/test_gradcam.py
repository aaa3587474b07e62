"""3D Grad-CAM: orientation on a model with a known answer, stager integration, volume."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn as nn
from monai.visualize import GradCAM

from shared_models.gradcam import heatmap_volume_mm3, minmax_normalize, stage_gradcam
from shared_models.stager import MulDenseNet3D, StagerConfig

SHAPE = (16, 16, 16)
REGION = (slice(4, 8), slice(8, 12), slice(2, 6))  # even-aligned so 2x2x2 cells lie fully in or out


class BrightnessNet(nn.Module):
    """Known answer: class 1 ("lesion") = mean brightness, class 0 = mean darkness.

    ``features.conv`` (2x2x2, stride 2) has channel 0 = local mean of x and channel 1 =
    1 - local mean. The classifier reads logit1 = mean(channel 0), logit0 = mean(channel 1), so the
    Grad-CAM weights are (1/N, 0) for class 1 and (0, 1/N) for class 0: the class-1 map is the
    downsampled image (high in the bright region) and the class-0 map its complement.
    """

    gradcam_layer = "features.conv"

    def __init__(self) -> None:
        super().__init__()
        conv = nn.Conv3d(1, 2, kernel_size=2, stride=2)
        with torch.no_grad():
            conv.weight[0].fill_(1 / 8)
            conv.weight[1].fill_(-1 / 8)
            conv.bias.copy_(torch.tensor([0.0, 1.0]))
        fc = nn.Linear(2, 2)
        with torch.no_grad():
            fc.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
            fc.bias.zero_()
        self.features = nn.Sequential(OrderedDict([("conv", conv), ("relu", nn.ReLU())]))
        self.head = nn.Sequential(nn.AdaptiveAvgPool3d(1), nn.Flatten(1), fc)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _bright_region_volume() -> torch.Tensor:
    x = torch.full((1, 1, *SHAPE), 0.1)
    x[(0, 0, *REGION)] = 0.9
    return x


def _inside_outside(cam: np.ndarray) -> tuple[float, float]:
    mask = np.zeros(SHAPE, dtype=bool)
    mask[REGION] = True
    return float(cam[mask].mean()), float(cam[~mask].mean())


@pytest.mark.parametrize("method", ["gradcam", "gradcampp"])
def test_cam_is_high_where_the_class_evidence_is(method):
    model = BrightnessNet()
    x = _bright_region_volume()
    assert model(x).argmax().item() == 0  # mostly dark volume -> class 0 predicted
    cam1 = stage_gradcam(model, x, class_index=1, method=method)
    assert cam1.shape == SHAPE and cam1.dtype == np.float32
    assert cam1.min() >= 0.0 and cam1.max() == pytest.approx(1.0)
    inside, outside = _inside_outside(cam1)
    assert inside > 0.6 and outside < 0.3  # lesion evidence sits in the bright region
    # a 3D map, not a 2D one broadcast along depth: the depth profile peaks at the region's slices 4..7
    profile = cam1.mean(axis=(1, 2))
    assert profile[4:8].min() > 2 * profile[np.r_[0:3, 9:16]].max()
    cam0 = stage_gradcam(model, x, class_index=0, method=method)
    inside0, outside0 = _inside_outside(cam0)
    assert outside0 > inside0  # "normal" evidence sits outside it


def test_monai_default_normaliser_would_invert_the_map():
    # why stage_gradcam passes its own postprocessing: MONAI maps (min, max) -> (1, 0)
    x = _bright_region_volume().requires_grad_(True)
    default = GradCAM(nn_module=BrightnessNet(), target_layers="features.conv")(x=x, class_idx=1)
    inside, outside = _inside_outside(default[0, 0].detach().numpy())
    assert inside < outside


def test_stager_gradcam_shape_range_and_model_untouched():
    torch.manual_seed(0)
    model = MulDenseNet3D(StagerConfig(init_features=8, growth_rate=4, block_config=(1, 2), bn_size=2))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    crop = torch.rand(1, 1, 16, 16, 16)
    for method in ("gradcam", "gradcampp"):
        cam = stage_gradcam(model, crop, method=method)
        assert cam.shape == (16, 16, 16) and cam.dtype == np.float32
        assert 0.0 <= cam.min() and cam.max() <= 1.0
    cam2 = stage_gradcam(model, crop, class_index=2)
    assert cam2.shape == (16, 16, 16)
    assert model.training  # mode restored
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # weights and BN statistics unchanged
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())  # no leaked hooks
    with torch.no_grad():  # works inside no_grad callers too
        assert stage_gradcam(model, crop).shape == (16, 16, 16)


def test_missing_target_layer_is_an_error_with_candidates():
    model = MulDenseNet3D(StagerConfig(init_features=8, growth_rate=4, block_config=(1, 2), bn_size=2))
    bad = "features.denseblock2.denselayer3.layers.conv2"
    with pytest.raises(ValueError, match="denselayer3") as info:
        stage_gradcam(model, torch.rand(1, 1, 16, 16, 16), target_layer=bad)
    assert "features.denseblock2.denselayer2.layers.conv2" in str(info.value)
    with pytest.raises(ValueError, match="class_index"):
        stage_gradcam(model, torch.rand(1, 1, 16, 16, 16), class_index=3)
    with pytest.raises(ValueError, match="crop"):
        stage_gradcam(model, torch.rand(2, 1, 16, 16, 16))
    with pytest.raises(ValueError, match="method"):
        stage_gradcam(model, torch.rand(1, 1, 16, 16, 16), method="cam")


def test_minmax_normalize_keeps_orientation_and_handles_constant_maps():
    x = torch.tensor([[[1.0, 3.0, 2.0]], [[5.0, 5.0, 5.0]]])
    out = minmax_normalize(x)
    torch.testing.assert_close(out[0, 0], torch.tensor([0.0, 1.0, 0.5]))
    torch.testing.assert_close(out[1, 0], torch.zeros(3))


def test_heatmap_volume_mm3():
    cam = np.zeros((4, 5, 6), dtype=np.float32)
    cam[0, 0, :3] = 0.5
    cam[1, 1, 1] = 0.9
    cam[2, 2, 2] = 0.49
    # 4 voxels >= 0.5, each 2 x 1.5 x 0.5 mm = 1.5 mm^3
    assert heatmap_volume_mm3(cam, (2.0, 1.5, 0.5)) == pytest.approx(6.0)
    assert heatmap_volume_mm3(cam, (1.0, 1.0, 1.0), threshold=0.95) == 0.0
    with pytest.raises(ValueError, match="spacing"):
        heatmap_volume_mm3(cam, (1.0, 0.0, 1.0))
    with pytest.raises(ValueError, match="cam"):
        heatmap_volume_mm3(cam[0], (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="threshold"):
        heatmap_volume_mm3(cam, (1.0, 1.0, 1.0), threshold=1.5)
