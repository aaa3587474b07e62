"""Dict round trip shared by the model configs (they are rebuilt from bundles)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, fields
from typing import Any


class DictConfig:
    """Mixin for frozen config dataclasses: ``to_dict``/``from_dict`` with unknown keys refused."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (tuples become lists) that :meth:`from_dict` reads back."""
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]):
        """Build a validated config; missing keys take the defaults.

        Raises:
            ValueError: for an unknown key or a bad value (the message names the key).
        """
        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known:
                raise ValueError(f"{key}: unknown {cls.__name__} key (known: {sorted(known)})")
        return cls(**dict(data))
