"""Ficat-Arlet stages handled by ONFH-FL.

Source: modified Ficat-Arlet classification (Ficat RP, J Bone Joint Surg Br 1985;
67(1):3-9; Jawad MU et al., Clin Orthop Relat Res 2012;470(9):2636-9), as used
by Yang et al., Front. Surg. 2025 (doi:10.3389/fsurg.2025.1555749), section 1:
stages 0 to II are "early ONFH" and are the only ones in scope.
"""

from __future__ import annotations

from enum import IntEnum


class FicatArletStage(IntEnum):
    """Ficat-Arlet stage of one femoral head; the integer is the class index.

    Stage 0: normal marrow (non-ONFH). Stage I: diffuse marrow oedema, no
    demarcated lesion. Stage II: demarcated subchondral lesion (double-line sign),
    no collapse. Stages III and IV (collapse) are out of scope.
    """

    STAGE_0 = 0
    STAGE_I = 1
    STAGE_II = 2

    @property
    def label(self) -> str:
        """Roman-numeral label used in reports: ``"0"``, ``"I"`` or ``"II"``."""
        return ("0", "I", "II")[int(self)]

    @property
    def is_early_onfh(self) -> bool:
        """True for stage I or II (early ONFH), False for stage 0."""
        return self is not FicatArletStage.STAGE_0

    @classmethod
    def parse(cls, text: str | int) -> FicatArletStage:
        """Parse ``0|I|II`` (also ``1``/``2``, case-insensitive).

        Raises:
            ValueError: for stage III/IV (out of scope) or anything unreadable.
        """
        token = str(text).strip().upper()
        table = {"0": 0, "I": 1, "1": 1, "II": 2, "2": 2}
        if token in table:
            return cls(table[token])
        if token in {"III", "IV", "3", "4"}:
            raise ValueError(
                f"Ficat-Arlet stage {token} is out of scope: ONFH-FL grades early ONFH only (stages 0, I, II)"
            )
        raise ValueError(f"unreadable Ficat-Arlet stage {text!r}; expected 0, I or II")


STAGE_LABELS: tuple[str, ...] = tuple(s.label for s in FicatArletStage)
NUM_STAGES: int = len(FicatArletStage)
