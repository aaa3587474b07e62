"""3D Grad-CAM of the stager (paper section 2.4, "improved 3D Grad-CAM"; section 3.4, Figure 7).

Sources: Selvaraju et al., "Grad-CAM", ICCV 2017 (arXiv:1610.02391); Grad-CAM++: Chattopadhyay et
al., WACV 2018 (arXiv:1710.11063). Both come from MONAI (``monai.visualize.GradCAM`` /
``GradCAMpp``), applied to the last 3D convolution of :class:`~shared_models.stager.MulDenseNet3D`
as in the paper. The paper does not say what its "improvement" is; we read it as (a) full 3D maps
upsampled trilinearly to the crop, (b) the Grad-CAM++ option, and (c) a volume measure of the
highlighted region (section 3.4: "the volume ... of the abnormal regions can be further assessed").

Two MONAI behaviours are deliberately overridden:

* MONAI's default post-processing (``default_normalizer``) maps ``(min, max)`` to ``(1, 0)``,
  i.e. it **inverts** the map. We pass our own min-max scaling to ``[0, 1]`` that keeps the
  orientation (1 = most class evidence).
* MONAI only **warns** when the target layer does not exist; we raise a ``ValueError`` that names
  the layer and lists close candidates.

MONAI registers forward/backward hooks on the target layer that it never removes, turns off the
layer's ``inplace`` flag and clears the model's gradients. Instead of computing the map on a deep copy
of the model (206 ms a call for the paper stager on an H200, issue 19), :func:`_borrowed` lends the
model for the call and undoes all of that afterwards: the new hooks are removed, the flags, gradients,
``requires_grad`` and train/eval mode restored. The parameters do not require gradients during the
call (Grad-CAM needs only the gradient at the target layer's output, which flows from the input), so
no weight gradients are computed. Not safe while another thread trains the same model object.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Sequence
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn as nn
from monai.visualize import GradCAM, GradCAMpp

__all__ = ["stage_gradcam", "heatmap_volume_mm3", "minmax_normalize"]

logger = logging.getLogger(__name__)

_METHODS = {"gradcam": GradCAM, "gradcampp": GradCAMpp, "gradcam++": GradCAMpp}


def minmax_normalize(x: torch.Tensor) -> torch.Tensor:
    """Scale each map of a ``(B, 1, *spatial)`` batch to ``[0, 1]`` **without** inverting it.

    ``(x - min) / (max - min)`` per sample; a constant map (``max == min``, e.g. all zero after the
    Grad-CAM ReLU) becomes all zeros. Same device and dtype as the input.
    """
    flat = x.reshape(x.shape[0], -1)
    lo = flat.min(dim=1, keepdim=True).values
    hi = flat.max(dim=1, keepdim=True).values
    span = hi - lo
    safe_span = torch.where(span > 0, span, torch.ones_like(span))
    out = torch.where(span > 0, (flat - lo) / safe_span, torch.zeros_like(flat))
    return out.reshape(x.shape)


def _resolve_layer(model: nn.Module, target_layer: str | None) -> str:
    if target_layer is None:
        target_layer = getattr(model, "gradcam_layer", None)
        if not isinstance(target_layer, str):
            raise ValueError(
                f"target_layer: {type(model).__name__} has no 'gradcam_layer'; pass target_layer explicitly"
            )
    names = [name for name, _ in model.named_modules() if name]
    if target_layer not in names:
        close = difflib.get_close_matches(target_layer, names, n=5, cutoff=0.5)
        if not close:
            close = [n for n in names if n.endswith(target_layer.rsplit(".", 1)[-1])][-5:]
        raise ValueError(
            f"target_layer {target_layer!r} is not a module of {type(model).__name__}; "
            f"close candidates: {close if close else names[-5:]}"
        )
    return target_layer


@contextmanager
def _borrowed(model: nn.Module, layer: str):
    """Lend ``model`` to MONAI's CAM for one call and undo what it leaves behind (see module docstring)."""
    module = dict(model.named_modules())[layer]
    hook_dicts = ("_forward_hooks", "_backward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called")
    before = {name: set(getattr(module, name, {})) for name in hook_dicts}
    full_backward = getattr(module, "_is_full_backward_hook", None)
    inplace = module.__dict__.get("inplace")
    params = list(model.parameters())
    saved = [(p.grad, p.requires_grad) for p in params]
    training = model.training
    try:
        for p in params:
            p.requires_grad_(False)
        yield model
    finally:
        for name, keys in before.items():
            hooks = getattr(module, name, None) or {}
            for key in [k for k in hooks if k not in keys]:
                del hooks[key]
        module._is_full_backward_hook = full_backward
        if inplace is not None:
            module.__dict__["inplace"] = inplace
        for p, (grad, requires_grad) in zip(params, saved):
            p.requires_grad_(requires_grad)
            p.grad = grad
        model.train(training)


def stage_gradcam(
    model: nn.Module,
    crop: torch.Tensor,
    target_layer: str | None = None,
    class_index: int | None = None,
    method: str = "gradcam",
) -> np.ndarray:
    """3D Grad-CAM map of one stager crop (paper section 2.4), orientation preserved.

    Args:
        model: the stager (:class:`~shared_models.stager.MulDenseNet3D`) or any classifier
            ``(1, C, D, H, W) -> (1, K)``; it is lent to MONAI for the call and returned as it was
            (weights, gradients, hooks, flags and train/eval mode; see :func:`_borrowed`).
        crop: ``(1, C, D, H, W)`` float crop, as fed to the model (any device; moved to the
            model's device).
        target_layer: module name to read; default ``model.gradcam_layer`` (the last 3D conv).
        class_index: class to explain; default the predicted (arg-max) class.
        method: ``"gradcam"`` (Selvaraju et al.) or ``"gradcampp"`` (Grad-CAM++).

    Returns:
        ``(D, H, W)`` float32 numpy array in ``[0, 1]`` (1 = strongest evidence for the class),
        upsampled trilinearly from the layer's resolution to the crop grid. All zeros when the
        map is constant (e.g. no positive evidence).

    Raises:
        ValueError: bad crop shape, unknown method, class index out of range, or a target layer
            that does not exist (the message lists close candidates).
    """
    if method not in _METHODS:
        raise ValueError(f"method: expected one of {sorted(_METHODS)}, got {method!r}")
    if not isinstance(crop, torch.Tensor) or crop.ndim != 5 or crop.shape[0] != 1:
        shape = tuple(crop.shape) if isinstance(crop, torch.Tensor) else type(crop).__name__
        raise ValueError(f"crop: expected a (1, C, D, H, W) tensor, got {shape}")
    layer = _resolve_layer(model, target_layer)
    try:
        param = next(model.parameters())
        device, dtype = param.device, param.dtype
    except StopIteration:
        device, dtype = crop.device, torch.float32
    # Works inside no_grad/inference_mode/autocast callers: the input is made as a normal float
    # tensor with autograd on.
    with (
        torch.inference_mode(False),
        torch.enable_grad(),
        torch.autocast(device_type=device.type, enabled=False),
        _borrowed(model, layer) as work,
    ):
        x = crop.detach().clone().to(device=device, dtype=dtype).requires_grad_(True)
        if class_index is not None:
            with torch.no_grad():
                n_classes = int(work.eval()(x).shape[1])
            if isinstance(class_index, bool) or not 0 <= int(class_index) < n_classes:
                raise ValueError(f"class_index: expected 0..{n_classes - 1}, got {class_index!r}")
            class_index = int(class_index)
        cam = _METHODS[method](nn_module=work, target_layers=layer, postprocessing=minmax_normalize)
        out = cam(x=x, class_idx=class_index)
    return out[0, 0].detach().float().cpu().numpy().astype(np.float32)


def heatmap_volume_mm3(cam: np.ndarray, spacing_dhw_mm: Sequence[float], threshold: float = 0.5) -> float:
    """Physical volume of the highlighted region of a Grad-CAM map (paper section 3.4).

    Args:
        cam: ``(D, H, W)`` map in ``[0, 1]`` from :func:`stage_gradcam`.
        spacing_dhw_mm: voxel spacing of the **crop grid** in mm, array-axis order ``(D, H, W)``
            (crop extent in mm divided by the crop shape), not the original MRI spacing.
        threshold: voxels with ``cam >= threshold`` count.

    Returns:
        Volume in mm^3: ``count(cam >= threshold) * prod(spacing)``.

    Raises:
        ValueError: ``cam`` not 3D, spacing not three positive finite numbers, or threshold
            outside ``[0, 1]``.
    """
    cam = np.asarray(cam)
    if cam.ndim != 3:
        raise ValueError(f"cam: expected a (D, H, W) map, got shape {cam.shape}")
    spacing = np.asarray(spacing_dhw_mm, dtype=np.float64)
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ValueError(f"spacing_dhw_mm: expected three positive numbers (D, H, W) in mm, got {spacing_dhw_mm!r}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold: expected a value in [0, 1], got {threshold!r}")
    return float(np.count_nonzero(cam >= threshold) * float(np.prod(spacing)))
