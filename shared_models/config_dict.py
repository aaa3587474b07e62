"""Validation helpers and the dict round trip shared by the model configs (rebuilt from bundles)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import Field, asdict, fields
from typing import Any, ClassVar, Self

import numpy as np


def positive_int(key: str, value: Any, min_value: int = 1) -> int:
    """``value`` as an int >= ``min_value`` (bools refused).

    Raises:
        ValueError: naming ``key``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < min_value:
        raise ValueError(f"{key}: expected an integer >= {min_value}, got {value!r}")
    return int(value)


def int_tuple(key: str, value: Any, min_value: int = 1) -> tuple[int, ...]:
    """A non-empty sequence (not a string) of ints, each >= ``min_value``, as a tuple.

    Raises:
        ValueError: naming ``key``.
    """
    if isinstance(value, str):
        raise ValueError(f"{key}: expected a sequence of integers, got a string {value!r}")
    try:
        items = tuple(value)
    except TypeError as exc:
        raise ValueError(f"{key}: expected a sequence of integers, got {value!r}") from exc
    if not items:
        raise ValueError(f"{key}: must not be empty")
    return tuple(positive_int(key, v, min_value) for v in items)


def positive_triple(value: Any, key: str, kind: type) -> tuple:
    """Validate a 3-sequence of positive finite numbers of ``kind`` (int or float) as a tuple.

    Raises:
        ValueError: naming ``key``.
    """
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 3:
        raise ValueError(f"{key} must be a sequence of 3 numbers, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise ValueError(f"{key} must hold numbers, got {value!r}")
        if kind is int:
            if int(v) != v:
                raise ValueError(f"{key} must hold integers, got {value!r}")
            v = int(v)
        else:
            v = float(v)
        if not (math.isfinite(v) and v > 0):
            raise ValueError(f"{key} must hold positive finite numbers, got {value!r}")
        out.append(v)
    return tuple(out)


def finite_number(value: Any, key: str) -> float:
    """``value`` as a finite float (bools refused).

    Raises:
        ValueError: naming ``key``.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{key} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{key} must be finite, got {value!r}")
    return value


class DictConfig:
    """Mixin for frozen config dataclasses: ``to_dict``/``from_dict`` with unknown keys refused."""

    # set by @dataclass on every subclass; declared so that type checkers see a dataclass here
    __dataclass_fields__: ClassVar[dict[str, Field[Any]]]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (tuples become lists) that :meth:`from_dict` reads back."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Self:
        """Build a validated config; missing keys take the defaults.

        Raises:
            ValueError: for an unknown key or a bad value (the message names the key).
        """
        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known:
                raise ValueError(f"{key}: unknown {cls.__name__} key (known: {sorted(known)})")
        return cls(**dict(data))
