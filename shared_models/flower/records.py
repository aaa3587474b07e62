"""A state dict <-> Flower ``ArrayRecord``: the one place the site and the coordinator pack weights.

Packing is :mod:`shared_models.transfer`'s (one flat array per dtype, since Flower's transfer cost is
per tensor; ``transfer-packing`` and ``transfer-dtype`` of the run config). Used by the ClientApp
(:mod:`client.client_app`), the ServerApp (:mod:`server.server_app`) and the calibration round
(:mod:`server.calibration`), so both ends agree on the layout by construction.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

from shared_models.transfer import from_transfer, to_transfer

__all__ = ["TransferSettings", "record_arrays", "record_to_state", "state_to_record"]


class TransferSettings(Protocol):
    """How weights travel: :class:`shared_models.config.RunConfig` satisfies it."""

    @property
    def transfer_packing(self) -> bool: ...  # run-config key ``transfer-packing``

    @property
    def transfer_dtype(self) -> str: ...  # run-config key ``transfer-dtype``: "float32" or "float16"


def state_to_record(state: Mapping[str, torch.Tensor], settings: TransferSettings) -> ArrayRecord:
    """The weights to send: packed into one flat array per dtype unless ``transfer-packing`` is off.

    Args:
        state: a state dict (every buffer included; integer buffers stay integers).
        settings: ``transfer_packing`` and ``transfer_dtype`` (the run config).

    Returns:
        An ``ArrayRecord`` of numpy-backed ``Array``\\ s (on the CPU whatever ``state``'s device).

    Raises:
        ValueError: an unknown ``transfer_dtype`` (:func:`shared_models.transfer.to_transfer`).
    """
    arrays = to_transfer(state, packed=settings.transfer_packing, float_dtype=settings.transfer_dtype)
    return ArrayRecord({k: Array(v) for k, v in arrays.items()})


def record_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    """The record's arrays as numpy, by key, in the record's order."""
    return {k: record[k].numpy() for k in record.keys()}


def record_to_state(record: ArrayRecord, template: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict in a received (or aggregated) record, packed or one array per tensor.

    Args:
        record: the weights as they travelled.
        template: a state dict of the same architecture (a ``meta``-device model's is enough): names,
            shapes and dtypes; entries are cast back to its dtypes.

    Raises:
        ValueError: the record does not fit ``template`` (:func:`shared_models.transfer.from_transfer`).
    """
    return from_transfer(record_arrays(record), template)
