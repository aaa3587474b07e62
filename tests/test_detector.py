"""3DC-YOLOX detector: shapes, geometry, assignment, loss, decoding (CPU, tiny widths)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from shared_models.detection import YOLOX3D, box_iou_3d, center_prior, decode_best_box, detector_loss, simota_assign
from shared_models.specs import DetectorConfig

HEMI = (32, 112, 64)
TINY = DetectorConfig(widths=(4, 8, 8, 16), depths=(1, 1, 1), strides=(8, 16), head_width=8)


def _cells(shape, strides):
    """Expected cells per level: feature size = ceil-halving per stride-2 conv."""
    total = 0
    for s in strides:
        size = list(shape)
        for _ in range(int(math.log2(s))):
            size = [(n + 1) // 2 for n in size]
        total += size[0] * size[1] * size[2]
    return total


# (config, input shape, expected output shape)
SHAPE_CASES = [
    (DetectorConfig(), (2, 1, *HEMI), (2, 4 * 14 * 8 + 2 * 7 * 4, 8)),
    (TINY, (1, 1, *HEMI), (1, 504, 8)),
    (DetectorConfig(widths=(4, 8, 8, 16), strides=(4, 8, 16), head_width=8), (1, 1, *HEMI), (1, 8 * 28 * 16 + 504, 8)),
    (
        DetectorConfig(widths=(4, 4, 8, 8, 16), depths=(1, 1, 1, 1), strides=(8, 16, 32), head_width=8),
        (1, 1, *HEMI),
        (1, 504 + 8, 8),
    ),
    (TINY, (1, 1, 16, 20, 12), (1, _cells((16, 20, 12), (8, 16)), 8)),
]


@pytest.mark.parametrize("config, in_shape, out_shape", SHAPE_CASES)
def test_forward_shape_and_cells(config, in_shape, out_shape):
    model = YOLOX3D(config).eval()
    with torch.no_grad():
        out = model(torch.rand(in_shape))
    assert out.shape == out_shape
    assert out.dtype == torch.float32
    assert model.cells.shape == (out_shape[1], 4)
    assert torch.equal(model.cells, model.cell_geometry(in_shape[2:]))
    assert "cells" not in model.state_dict()
    assert (out[..., 3:6] > 0).all()


def test_cell_centres_follow_voxel_convention():
    model = YOLOX3D(TINY)
    cells = model.cell_geometry(HEMI)
    # first cell at stride 8 covers voxels 0..7 -> centre 3.5; first stride-16 cell covers 0..15 -> 7.5
    assert cells[0].tolist() == [3.5, 3.5, 3.5, 8.0]
    assert cells[4 * 14 * 8].tolist() == [7.5, 7.5, 7.5, 16.0]
    assert cells[-1].tolist() == [23.5, 103.5, 55.5, 16.0]


def test_zero_raw_output_decodes_to_stride_cube_at_cell_centre():
    model = YOLOX3D(TINY).eval()
    for head in model.heads:
        torch.nn.init.zeros_(head.reg_pred.weight)
        torch.nn.init.zeros_(head.reg_pred.bias)
    with torch.no_grad():
        out = model(torch.rand(1, 1, *HEMI))
    torch.testing.assert_close(out[0, :, :3], model.cells[:, :3])
    torch.testing.assert_close(out[0, :, 3:6], model.cells[:, 3:4].expand(-1, 3))


def test_config_round_trip_and_validation():
    for cfg in (DetectorConfig(), TINY, DetectorConfig.PAPER):
        data = json.loads(json.dumps(cfg.to_dict()))
        assert DetectorConfig.from_dict(data) == cfg
    bad = [
        ({"widths": [8, 16, 32]}, "widths"),
        ({"strides": [8, 32]}, "strides"),
        ({"strides": [4]}, "strides"),
        ({"head_width": 0}, "head_width"),
        ({"depths": [1, 0, 1]}, "depths"),
        ({"widths": "8,16,32,64"}, "widths"),
        ({"colour": 3}, "colour"),
    ]
    for data, key in bad:
        with pytest.raises(ValueError, match=key):
            DetectorConfig.from_dict(data)


def test_paper_preset_builds():
    model = YOLOX3D(DetectorConfig.PAPER)
    assert len(model.heads) == 3
    assert sum(p.numel() for p in model.parameters()) > 10 * sum(p.numel() for p in YOLOX3D().parameters())


def test_box_iou_3d_known_values():
    a = torch.tensor([[0.0, 0.0, 0.0, 2.0, 2.0, 2.0]])
    b = torch.tensor([[0.0, 0.0, 0.0, 2.0, 2.0, 2.0], [1.0, 0.0, 0.0, 2.0, 2.0, 2.0], [5.0, 5.0, 5.0, 1.0, 1.0, 1.0]])
    iou = box_iou_3d(a, b)
    # shift by 1 along one axis: intersection 1*2*2 = 4, union 8 + 8 - 4 = 12
    torch.testing.assert_close(iou, torch.tensor([[1.0, 1.0 / 3.0, 0.0]]))
    iou_np = box_iou_3d(a.numpy(), b.numpy())
    assert isinstance(iou_np, np.ndarray) and iou_np.shape == (1, 3)
    assert box_iou_3d(a, b[:0]).shape == (1, 0)
    with pytest.raises(ValueError, match="non-negative"):
        box_iou_3d(a, torch.tensor([[0.0, 0.0, 0.0, -1.0, 1.0, 1.0]]))


def test_box_at_known_position_is_assigned_to_its_cell():
    model = YOLOX3D(TINY)
    cells = model.cell_geometry(HEMI)
    # GT centred on the stride-8 cell (z=1, y=5, x=3) -> index 1*14*8 + 5*8 + 3
    idx = 1 * 14 * 8 + 5 * 8 + 3
    centre = (torch.tensor([1.0, 5.0, 3.0]) + 0.5) * 8 - 0.5
    gt = torch.cat([centre, torch.tensor([10.0, 20.0, 16.0])])
    in_box, in_center = center_prior(cells, gt)
    assert in_box[idx] and in_center[idx]
    far = 3 * 14 * 8 + 13 * 8 + 7  # stride-8 cell (3, 13, 7): 64 voxels away in y
    assert not (in_box[far] or in_center[far])
    # every cell predicts a GT-sized box at its own centre: IoU is 1 exactly at idx
    pred = torch.zeros(cells.shape[0], 8)
    pred[:, :3] = cells[:, :3]
    pred[:, 3:6] = gt[3:]
    positive, ious = simota_assign(pred, cells, gt)
    assert positive[idx]
    assert ious[idx] == pytest.approx(1.0)
    assert (in_box & in_center)[positive].all()
    assert not positive[~(in_box | in_center)].any()


def test_box_outside_grid_still_gets_one_positive():
    model = YOLOX3D(TINY)
    cells = model.cell_geometry(HEMI)
    pred = torch.zeros(cells.shape[0], 8)
    pred[:, :3] = cells[:, :3]
    pred[:, 3:6] = 8.0
    gt = torch.tensor([-200.0, -200.0, -200.0, 2.0, 2.0, 2.0])
    positive, _ = simota_assign(pred, cells, gt)
    assert positive.sum() == 1
    # nearest in stride units: the corner cell of the stride-16 level (index 4*14*8)
    assert positive[4 * 14 * 8]


def test_loss_backward_and_validation():
    model = YOLOX3D(TINY)
    x = torch.rand(2, 1, *HEMI)
    pred = model(x)
    gt = torch.tensor([[15.0, 50.0, 20.0, 10.0, 20.0, 16.0], [10.0, 60.0, 30.0, 8.0, 16.0, 12.0]])
    loss, logs = detector_loss(pred, gt, model.cells, l1_weight=1.0)
    loss.backward()
    assert torch.isfinite(loss)
    assert set(logs) == {"loss", "giou", "obj", "cls", "l1", "num_pos"}
    assert logs["num_pos"] >= 2
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with pytest.raises(ValueError, match="gt_boxes"):
        detector_loss(pred, gt[:1], model.cells)
    with pytest.raises(ValueError, match="gt_boxes"):
        detector_loss(pred, torch.tensor([[1.0, 1, 1, 0, 1, 1]] * 2), model.cells)
    with pytest.raises(ValueError, match="cells"):
        detector_loss(pred, gt, model.cells[:-1])


def test_loss_under_autocast_is_float32():
    model = YOLOX3D(TINY)
    gt = torch.tensor([[15.0, 50.0, 20.0, 10.0, 20.0, 16.0]])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = model(torch.rand(1, 1, *HEMI))
        loss, _ = detector_loss(pred, gt, model.cells)
    assert pred.dtype == torch.float32 and loss.dtype == torch.float32
    loss.backward()


@pytest.mark.parametrize(
    "volume",
    [
        torch.zeros(2, 1, *HEMI),
        torch.rand(3, 1, *HEMI),
        torch.randn(1, 1, *HEMI) * 1e6,
        torch.full((1, 1, *HEMI), float("nan")),
        torch.full((1, 1, *HEMI), float("inf")),
    ],
)
def test_decode_one_box_per_sample_never_crashes(volume):
    model = YOLOX3D(TINY).eval()
    with torch.no_grad():
        boxes, scores, low = decode_best_box(model(volume))
    b = volume.shape[0]
    assert boxes.shape == (b, 6) and scores.shape == (b,) and low.shape == (b,)
    assert low.dtype == torch.bool
    assert torch.isfinite(boxes).all() and (boxes[:, 3:] > 0).all()
    assert ((scores >= 0) & (scores <= 1)).all()


def test_decode_picks_top_box_and_flags_low_confidence():
    pred = torch.zeros(2, 5, 8)
    pred[..., 3:6] = 4.0
    pred[..., :3] = torch.arange(5, dtype=torch.float32).view(1, 5, 1) * 10
    pred[..., 6:8] = -10.0  # score ~ 2e-9 everywhere
    pred[0, 3, 6:8] = 5.0  # confident cell 3 in sample 0
    pred[0, 1, 6:8] = 4.0
    pred[1, 2, 6:8] = -1.0  # best but below threshold in sample 1
    boxes, scores, low = decode_best_box(pred, score_threshold=0.5)
    assert boxes[0, 0] == 30.0 and not low[0]
    assert boxes[1, 0] == 20.0 and low[1]
    assert scores[1] == pytest.approx(torch.sigmoid(torch.tensor(-1.0)).item() ** 2)


def test_overfit_one_sample_loss_drops_and_box_improves():
    torch.manual_seed(0)
    model = YOLOX3D(TINY)
    x = torch.rand(1, 1, *HEMI) * 0.2
    x[0, 0, 10:20, 40:60, 12:28] += 0.6  # a bright "head" where the GT box is
    gt = torch.tensor([[14.5, 49.5, 19.5, 10.0, 20.0, 16.0]])
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)

    def decoded_iou() -> float:
        # train-mode BatchNorm (batch statistics): 30 steps are too few for the running stats
        with torch.no_grad():
            boxes, _, _ = decode_best_box(model(x))
        return float(box_iou_3d(boxes, gt)[0, 0])

    iou_before = decoded_iou()
    losses = []
    for _ in range(30):
        pred = model(x)
        loss, _ = detector_loss(pred, gt, model.cells)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.5 * losses[0]
    iou_after = decoded_iou()
    assert iou_after > iou_before + 0.2
    assert iou_after > 0.4


def test_decode_clips_the_box_to_the_volume():
    pred = torch.full((3, 1, 8), 5.0)
    pred[0, 0, :6] = torch.tensor([2.0, 50.0, 60.0, 10.0, 20.0, 16.0])  # sticks out at z0 and x1
    pred[1, 0, :6] = torch.tensor([15.0, 50.0, 30.0, 4.0, 4.0, 4.0])  # inside: unchanged
    pred[2, 0, :6] = torch.tensor([15.0, 50.0, 200.0, 4.0, 4.0, 4.0])  # wholly outside along x
    boxes, _, low = decode_best_box(pred, spatial_shape=(32, 112, 64))
    lo, hi = boxes[:, :3] - boxes[:, 3:] / 2, boxes[:, :3] + boxes[:, 3:] / 2
    # sample 0: corners (-3, 40, 52)..(7, 60, 68) clipped to the volume's edges (-0.5 .. size - 0.5)
    assert torch.allclose(lo[0], torch.tensor([-0.5, 40.0, 52.0])) and torch.allclose(
        hi[0], torch.tensor([7.0, 60.0, 63.5])
    )
    assert torch.equal(boxes[1], pred[1, 0, :6]) and not low[0] and not low[1]
    assert low[2] and boxes[2, 5] == 0 and boxes[2, 2] == 63.5
    with pytest.raises(ValueError, match="spatial_shape"):
        decode_best_box(pred, spatial_shape=(32, 0, 64))


# -- SimOTA on a hand-made candidate grid ----------------------------------------------------------
def _shifted(gt: torch.Tensor, iou: float) -> torch.Tensor:
    """A copy of a cubic GT box shifted along x so that its IoU with the GT is exactly ``iou``:
    for two cubes of side a shifted by s on one axis, IoU = (a - s) / (a + s)."""
    a = float(gt[3])
    box = gt.clone()
    box[2] += a * (1 - iou) / (1 + iou)
    return box


def test_simota_picks_the_dynamic_k_lowest_cost_candidates():
    gt = torch.tensor([20.0, 20.0, 20.0, 16.0, 16.0, 16.0])  # spans 12..28 on every axis
    # stride-8 cells: c0-c4 inside the box and the centre radius (2.5 * 8 = 20 voxels);
    # c5 only inside the centre radius (x = 36 is 16 from the centre, outside the box);
    # c6 far away: not a candidate at all
    centres = [(20, 20, 20), (20, 20, 24), (20, 24, 20), (24, 20, 20), (16, 16, 16), (20, 20, 36), (20, 20, 80)]
    cells = torch.tensor([[*c, 8.0] for c in centres])
    ious = [0.9, 0.8, 0.6, 0.3, 0.1, 0.95, 0.99]
    pred = torch.zeros(7, 8)
    pred[:, :6] = torch.stack([_shifted(gt, v) for v in ious])
    positive, iou_out = simota_assign(pred, cells, gt)
    torch.testing.assert_close(iou_out[:6], torch.tensor(ious[:6]), atol=1e-5, rtol=0)
    assert iou_out[6] == 0  # not a candidate: no IoU target
    # equal class scores -> cost order = IoU order; dynamic k = int(0.95 + 0.9 + 0.8 + 0.6 + 0.3 + 0.1)
    # = int(3.65) = 3; c5 has the best IoU but is not in both box and centre region (+1e5 cost)
    assert positive.nonzero().flatten().tolist() == [0, 1, 2]

    # c1 now has a poor class score: cls cost = -log sigmoid(-6) = 6.0025, so its cost
    # 6.0025 + 3 * -log 0.8 = 6.67 exceeds c3's log 2 + 3 * -log 0.3 = 4.30; k is still 3
    pred[1, 6:8] = -6.0
    positive, _ = simota_assign(pred, cells, gt)
    assert positive.nonzero().flatten().tolist() == [0, 2, 3]


# -- IoU and GIoU against voxel counting --------------------------------------------------------
def _raster(box_q: np.ndarray, size: int) -> np.ndarray:
    """Boolean occupancy of a corner box given in quarter-voxel units on a (size,)*3 grid of quarters."""
    occ = np.zeros((size,) * 3, dtype=bool)
    occ[box_q[0] : box_q[3], box_q[1] : box_q[4], box_q[2] : box_q[5]] = True
    return occ


def test_iou_and_giou_match_brute_force_voxel_counts():
    from shared_models.detection.boxes import to_corners
    from shared_models.detection.loss import _GIOU

    rng = np.random.default_rng(7)
    size = 48  # quarter-voxel cells: a 12-voxel cube
    for _ in range(25):
        corners = []
        for _box in range(2):
            lo = rng.integers(0, size - 4, 3)
            hi = np.array([rng.integers(lo_i + 1, size + 1) for lo_i in lo])
            corners.append(np.concatenate([lo, hi]))
        a, b = (_raster(c, size) for c in corners)
        inter, union = np.logical_and(a, b).sum(), np.logical_or(a, b).sum()
        lo = np.minimum(corners[0][:3], corners[1][:3])
        hi = np.maximum(corners[0][3:], corners[1][3:])
        hull = np.prod(hi - lo)
        iou_ref = inter / union
        giou_ref = iou_ref - (hull - union) / hull
        # corner boxes in quarters -> (cz, cy, cx, d, h, w) in voxels
        boxes = torch.tensor(np.array([np.concatenate([(c[:3] + c[3:]) / 2, c[3:] - c[:3]]) / 4.0 for c in corners]))
        assert float(box_iou_3d(boxes[:1], boxes[1:])[0, 0]) == pytest.approx(iou_ref, abs=1e-6)  # MONAI: float32
        giou = 1.0 - float(_GIOU(to_corners(boxes[:1]), to_corners(boxes[1:])))
        assert giou == pytest.approx(giou_ref, abs=1e-6)


# -- NMS ---------------------------------------------------------------------------------------
def test_nms_drops_overlapping_lower_scores_only():
    from shared_models.detection import nms_3d

    boxes = torch.tensor(
        [
            [10.0, 10.0, 10.0, 8.0, 8.0, 8.0],  # A, best score
            [10.0, 10.0, 12.0, 8.0, 8.0, 8.0],  # B: A shifted by 2 -> IoU 6/10 = 0.6
            [40.0, 40.0, 40.0, 8.0, 8.0, 8.0],  # C: disjoint
            [10.0, 10.0, 17.0, 8.0, 8.0, 8.0],  # D: A shifted by 7 -> IoU 1/15
        ]
    )
    scores = torch.tensor([0.9, 0.95, 0.7, 0.8])
    assert nms_3d(boxes, scores, 0.5).tolist() == [1, 3, 2]  # B beats A (0.95 > 0.9, IoU 0.6 > 0.5)
    assert nms_3d(boxes, scores, 0.7).tolist() == [1, 0, 3, 2]  # IoU 0.6 is under 0.7: all kept
    assert nms_3d(boxes, scores, 0.5, max_proposals=1).tolist() == [1]
    assert nms_3d(boxes[:0], scores[:0], 0.5).numel() == 0
