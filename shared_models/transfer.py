"""How a state dict travels between sites and server: packed into a few flat arrays, optionally fp16.

Flower 1.42 sends every array of an ``ArrayRecord`` as its own content-addressed object, pushed
and pulled one by one, so its transfer cost is **per tensor** as well as per byte
(``FLOWER-1.42-NOTES.md``, "Transfer cost: per tensor, not per byte": a DenseNet121-3D round fell
from about 70 s to about 25 s in deployment when its 727 tensors travelled as one flat array).
Our default detector has 258 tensors and the stager 147; the paper widths 450 and 748.

:func:`pack_state_dict` concatenates, in state-dict order, every floating entry into **one** flat
array (``"packed:float"``, in the transfer dtype) and the other entries into one flat array per
dtype (``"packed:int64"`` holds BatchNorm's ``num_batches_tracked``). So a model travels as two
arrays whatever its depth. :func:`unpack_state_dict` cuts them back into the entries of a
*template*: a state dict of the same architecture that both ends already have (each builds the
model from the run config), so no layout travels. Entries are cast back to the template's dtypes;
integer entries are rounded to the nearest integer first (a weighted mean of integers need not be
one).

Exactness under aggregation: FedAvg, FedProx (the same server-side mean) and FedBN (FedAvg on the
server, norms kept at the sites) compute an element-wise weighted mean, and Flower's
``aggregate_arrayrecords`` does it per array with numpy in the array's dtype. Packing changes
neither an element's value nor its dtype (floats stay float32, integers stay int64), so the mean
of packed arrays, unpacked, equals the mean of the unpacked arrays bit for bit
(``tests/test_transfer.py``).

``float_dtype="float16"`` halves the bytes of the floating entries (IEEE half: 11-bit
significand, relative rounding error <= 2**-11 ~ 4.9e-4, range +/-65504; values below ~6e-8
flush to 0). It is lossy: the weights that travel are rounded each round, and Flower averages
float16 arrays in float16. ``onfh sim bench --only transfer`` reports what that costs.

Pure numpy/torch: no Flower here (``shared_models`` imports no Flower); callers wrap the arrays
in ``flwr.app.Array``/``ArrayRecord``.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from shared_models.specs.run_config import TRANSFER_DTYPES  # its home is specs; keeps the old path

__all__ = [
    "FLOAT_KEY",
    "PACKED_PREFIX",
    "TRANSFER_DTYPES",
    "from_transfer",
    "is_packed",
    "pack_state_dict",
    "to_transfer",
    "unpack_state_dict",
]

#: Keys of packed arrays start with this; an ``ArrayRecord`` is packed when all its keys do.
PACKED_PREFIX = "packed:"
#: The flat array of every floating entry.
FLOAT_KEY = PACKED_PREFIX + "float"

StateDict = Mapping[str, torch.Tensor]


def _float_dtype(name: str) -> np.dtype:
    if name not in TRANSFER_DTYPES:
        raise ValueError(f"transfer dtype: expected one of {TRANSFER_DTYPES}, got {name!r}")
    return np.dtype(name)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().cpu().contiguous().numpy()


def _group_key(tensor: torch.Tensor) -> str:
    if tensor.is_floating_point():
        return FLOAT_KEY
    return PACKED_PREFIX + str(tensor.dtype).removeprefix("torch.")


def is_packed(keys) -> bool:
    """True when every key names a packed array (an empty record is not packed)."""
    keys = list(keys)
    return bool(keys) and all(str(k).startswith(PACKED_PREFIX) for k in keys)


def pack_state_dict(state: StateDict, *, float_dtype: str = "float32") -> dict[str, np.ndarray]:
    """Concatenate a state dict into one flat array per dtype group (see the module notes).

    Args:
        state: tensors on any device; floating ones of any float dtype.
        float_dtype: ``"float32"`` (exact for float32 models) or ``"float16"`` (lossy, half the bytes).

    Returns:
        ``{"packed:float": (n_float,) array of float_dtype, "packed:<dtype>": (n,) array, ...}``;
        groups with no entries are left out. Elements appear in state-dict order.

    Raises:
        ValueError: an unknown ``float_dtype``, or an empty state dict.
    """
    dtype = _float_dtype(float_dtype)
    if not state:
        raise ValueError("pack_state_dict: empty state dict")
    parts: dict[str, list[np.ndarray]] = {}
    for tensor in state.values():
        parts.setdefault(_group_key(tensor), []).append(_numpy(tensor).ravel())
    out = {}
    for key, arrays in parts.items():
        flat = np.concatenate(arrays) if len(arrays) > 1 else arrays[0].copy()
        out[key] = flat.astype(dtype, copy=False) if key == FLOAT_KEY else flat
    return out


def _cast_back(values: np.ndarray, like: torch.Tensor, name: str) -> torch.Tensor:
    """``values`` reshaped to ``like``'s shape and cast to its dtype (integers rounded first)."""
    target = like.dtype
    if not target.is_floating_point and target != torch.bool and np.issubdtype(values.dtype, np.floating):
        values = np.rint(values)
    try:
        array = values.reshape(tuple(like.shape))
    except ValueError:
        raise ValueError(f"entry {name!r}: {values.size} values for shape {tuple(like.shape)}") from None
    return torch.from_numpy(array.copy()).to(target)  # copy: contiguous, owned, keeps 0-d shapes


def unpack_state_dict(arrays: Mapping[str, np.ndarray], template: StateDict) -> dict[str, torch.Tensor]:
    """Cut packed arrays back into the entries of ``template`` (names, shapes and dtypes).

    Args:
        arrays: the output of :func:`pack_state_dict` (possibly aggregated).
        template: a state dict of the same architecture, in the same order (e.g. a fresh model's
            ``state_dict()``, or one built on the ``meta`` device); only names, shapes and dtypes
            are read.

    Returns:
        A new state dict of CPU tensors with ``template``'s keys, shapes and dtypes.

    Raises:
        ValueError: when the groups do not match the template (a missing or extra group, or a
            group with too few or too many elements), naming the group.
    """
    needed: dict[str, int] = {}
    for tensor in template.values():
        key = _group_key(tensor)
        needed[key] = needed.get(key, 0) + tensor.numel()
    if set(needed) != set(arrays):
        raise ValueError(f"packed arrays {sorted(arrays)} do not match the model's groups {sorted(needed)}")
    flat = {k: np.asarray(v).ravel() for k, v in arrays.items()}
    for key, n in needed.items():
        if flat[key].size != n:
            raise ValueError(f"packed array {key!r}: {flat[key].size} elements, the model needs {n}")
    offsets = dict.fromkeys(needed, 0)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in template.items():
        key = _group_key(tensor)
        start, n = offsets[key], tensor.numel()
        out[name] = _cast_back(flat[key][start : start + n], tensor, name)
        offsets[key] = start + n
    return out


def to_transfer(state: StateDict, *, packed: bool = True, float_dtype: str = "float32") -> dict[str, np.ndarray]:
    """What to send for ``state``: packed (:func:`pack_state_dict`) or one array per entry.

    Unpacked, floating entries are cast to ``float_dtype`` and the others kept as they are.

    Raises:
        ValueError: an unknown ``float_dtype``.
    """
    if packed:
        return pack_state_dict(state, float_dtype=float_dtype)
    dtype = _float_dtype(float_dtype)
    return {k: (_numpy(v).astype(dtype, copy=False) if v.is_floating_point() else _numpy(v)) for k, v in state.items()}


def from_transfer(arrays: Mapping[str, np.ndarray], template: StateDict) -> dict[str, torch.Tensor]:
    """The state dict in received arrays, packed or not, in ``template``'s dtypes.

    Raises:
        ValueError: the arrays do not fit the template (packed: see :func:`unpack_state_dict`;
            unpacked: missing or extra keys).
    """
    if is_packed(arrays):
        return unpack_state_dict(arrays, template)
    if set(arrays) != set(template):
        missing, extra = sorted(set(template) - set(arrays)), sorted(set(arrays) - set(template))
        raise ValueError(f"received arrays do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    return {name: _cast_back(np.asarray(arrays[name]), like, name) for name, like in template.items()}
