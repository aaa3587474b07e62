"""Check ``onfh infer`` boxes on a real pelvic MRI against hand-marked femoral head centres.

Issue 17's bar for real scans: each head's box centre lies within 15 mm of the true head
centre, or that head is flagged and not staged. The marks for the ProstateX study are in
``docs/landmarks/prostatex-0000-femoral-heads.json`` (how they were made: ``fit_femoral_heads.py``
next to it); more scans can be checked the same way with their own marks file.

Usage (after ``make demo`` or ``onfh sim demo --profile paper --out runs/demo``)::

    .venv/bin/python -m sim.experiments.real_check --bundle runs/demo/run/bundle \\
        --public-key runs/demo/run/keys/bundle-signing-key.pem.pub --out runs/demo/real-check

or, on an existing ``result.json``: ``python -m sim.experiments.real_check --result runs/demo/infer-prostatex/result.json``.
Exit code 0 when every head passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
PROSTATEX_MARKS = REPO / "docs" / "landmarks" / "prostatex-0000-femoral-heads.json"
PROSTATEX_STUDY = REPO.parent / "shared" / "data" / "real" / "prostatex-0000-pelvis-t2-axial.nii.gz"
MAX_DISTANCE_MM = 15.0


def _staged(head: dict[str, Any]) -> bool:
    """True when ``result.json`` gives this head a stage (not flagged / withheld)."""
    if head.get("predicted_stage") in (None, ""):
        return False
    return bool(head.get("assessed", True))


def check_boxes(result: dict[str, Any], marks: dict[str, Any], max_distance_mm: float = MAX_DISTANCE_MM) -> list[dict]:
    """Distance of each head's box centre from its marked centre, and the verdict.

    Args:
        result: a parsed ``result.json`` of ``onfh infer`` (``heads``: ``side``, ``box_lps_mm``
            ``x0 y0 z0 x1 y1 z1`` LPS mm, ``predicted_stage`` and, when present, ``assessed``
            and ``flags``).
        marks: a marks file (``heads``: side -> ``centre_lps_mm``, LPS mm).
        max_distance_mm: the bar (15 mm in issue 17).

    Returns:
        One dict per marked side: ``side``, ``distance_mm`` (None when the result has no box
        for that side), ``staged``, ``flags``, ``passed`` (distance <= bar, or not staged).
    """
    by_side = {h.get("side"): h for h in result.get("heads", [])}
    rows = []
    for side, mark in sorted(marks["heads"].items()):
        head = by_side.get(side)
        centre = [float(v) for v in mark["centre_lps_mm"]]
        if head is None or not head.get("box_lps_mm"):
            rows.append(
                {
                    "side": side,
                    "distance_mm": None,
                    "staged": False,
                    "flags": [],
                    "passed": True,
                    "note": "no box for this side",
                }
            )
            continue
        box = [float(v) for v in head["box_lps_mm"]]
        box_centre = [(box[i] + box[i + 3]) / 2.0 for i in range(3)]
        distance = math.dist(box_centre, centre)
        staged = _staged(head)
        rows.append(
            {
                "side": side,
                "box_centre_lps_mm": [round(v, 1) for v in box_centre],
                "marked_centre_lps_mm": centre,
                "distance_mm": round(distance, 1),
                "staged": staged,
                "predicted_stage": head.get("predicted_stage"),
                "detector_score": head.get("detector_score"),
                "flags": list(head.get("flags", [])),
                "passed": distance <= max_distance_mm or not staged,
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="check onfh infer boxes against hand-marked femoral heads")
    parser.add_argument("--result", type=Path, help="an existing result.json (skips inference)")
    parser.add_argument("--bundle", type=Path, help="model bundle folder (runs onfh infer)")
    parser.add_argument("--public-key", type=Path, help="coordinator's public key for the bundle")
    parser.add_argument("--study", type=Path, default=PROSTATEX_STUDY)
    parser.add_argument("--marks", type=Path, default=PROSTATEX_MARKS)
    parser.add_argument("--out", type=Path, default=Path("real-check"))
    args = parser.parse_args(argv)
    if args.result is None:
        if args.bundle is None:
            parser.error("give --result or --bundle")
        from shared_models.cli import main as onfh

        cmd = [
            "infer",
            "--bundle",
            str(args.bundle),
            "--study",
            str(args.study),
            "--out",
            str(args.out),
            "--device",
            "cpu",
        ]
        cmd += ["--public-key", str(args.public_key)] if args.public_key else ["--allow-unsigned"]
        code = onfh(cmd + ["--allow-refused"])
        if code not in (0, None):
            raise SystemExit(code)
        args.result = args.out / "result.json"
    result = json.loads(args.result.read_text())
    rows = check_boxes(result, json.loads(args.marks.read_text()))
    print(json.dumps({"verdict": result.get("verdict"), "heads": rows}, indent=2))
    return 0 if all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
