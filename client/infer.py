"""``onfh infer``: one study through the gated two-stage pipeline; result.json, Grad-CAM maps, figures.

Exit codes: 0 assessed or flagged (a flagged head has no stage, and says why); 3 refused
(a study gate failed: wrong body part, field of view, or the two boxes are not a pair of
femoral heads), unless ``--allow-refused`` (then 0). Errors (bad bundle, unreadable study)
are raised and mapped to 1 by the CLI.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import SimpleITK as sitk

if TYPE_CHECKING:
    from shared_models.calibration import Calibration

log = logging.getLogger(__name__)

EXIT_REFUSED = 3


def calibration_warnings(calibration: Calibration | None) -> list[str]:
    """What ``onfh infer`` tells the user about the bundle's calibration: gates that are off, and why.

    A bundle whose pooled calibration the coordinator refused (``fallback``: it would have switched a
    gate off, ``server/calibration.py`` ``gate_problem``) says so, with the reason.
    """
    if calibration is None:
        return [
            "the bundle carries no validation calibration: no detector-score or out-of-distribution "
            "gate, uncalibrated probabilities, arg-max stage"
        ]
    off = [
        name
        for name, v in (
            ("detector-score", calibration.detector_threshold),
            ("out-of-distribution", calibration.energy_threshold),
        )
        if v is None
    ]
    if calibration.fallback:
        return [
            f"the coordinator refused the pooled calibration ({calibration.fallback}) and shipped uncalibrated "
            f"defaults: no {' or '.join(off) or 'validation'} gate, so every head's stage is withheld"
        ]
    if off:
        return [
            f"the bundle's calibration has no {' or '.join(off)} threshold (no validation aggregates "
            "reached the server): that gate is off"
        ]
    return []


def _orientation_code(image: sitk.Image) -> str:
    """Three-letter ITK orientation code of the image axes, e.g. ``"LPS"`` (from SimpleITK)."""
    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(image.GetDirection())


def read_for_inference(study: Path, files_out: list | None = None) -> tuple[sitk.Image, dict[str, Any], str | None]:
    """Read a study for inference and say which series was used and why.

    DICOM folder: the site's T2 rule (``client.dicom_series.choose_t2_series``); when no
    series qualifies, the MR series with most slices, with a warning in ``why``.

    Returns:
        ``(image, series, body_part)``: ``series`` has ``source``, ``description``,
        ``n_slices``, ``spacing_mm`` (x, y, z of the image axes), ``orientation`` (plane for
        DICOM, plus the image axes' code), ``candidates`` and ``why``; ``body_part`` is the
        series' DICOM ``BodyPartExamined`` (None for NIfTI or when absent). ``files_out``, when
        given, is extended with the chosen series' DICOM files (nothing for NIfTI).

    Raises:
        SeriesError: the study cannot be read (names the study and the reason).
    """
    import pydicom

    from client.dicom_series import (
        SeriesError,
        choose_largest_mr_series,
        choose_t2_series,
        find_series,
        read_study,
    )
    from client.dicom_series.selection import _t2_by_description, _t2_by_timing

    study = Path(study)
    if not study.is_dir():
        image = read_study(study)
        return (
            image,
            {
                "source": "NIfTI file",
                "description": "",
                "n_slices": int(image.GetSize()[2]),
                "spacing_mm": [round(float(v), 4) for v in image.GetSpacing()],
                "orientation": _orientation_code(image),
                "candidates": 1,
                "why": "a NIfTI file holds one volume",
            },
            None,
        )
    series = find_series(study)
    try:
        chosen = choose_t2_series(series)
        desc, timing = _t2_by_description(chosen), _t2_by_timing(chosen)
        why = "T2 series by the site rule: " + (
            "its description names T2"
            if desc
            else f"TE {chosen.echo_time_ms:g} ms and TR {chosen.repetition_time_ms:g} ms say T2"
            if timing
            else "T2"
        )
    except SeriesError as err:
        if "no T2 series" not in err.reason:
            raise
        chosen = choose_largest_mr_series(series)
        why = f"no T2 series ({err.reason}); used the MR series with most slices instead: interpret with care"
    image = read_study(study, choose=lambda _: chosen)
    if files_out is not None:
        files_out.extend(chosen.files)
    try:
        header = pydicom.dcmread(chosen.files[0], stop_before_pixels=True)
        body_part = str(header.get("BodyPartExamined", "") or "") or None
    except Exception:
        body_part = None
    return (
        image,
        {
            "source": "DICOM",
            "description": chosen.description,
            "n_slices": chosen.n_slices,
            "spacing_mm": [round(float(v), 4) for v in image.GetSpacing()],
            "orientation": f"{chosen.orientation or '?'} (image axes {_orientation_code(image)})",
            "candidates": len(series),
            "why": why,
        },
        body_part,
    )


def infer_to_folder(
    bundle, study: Path, out: Path, device=None, dicom_out: Path | None = None
) -> tuple[dict, list, sitk.Image, list[Path]]:
    """Run the gated pipeline of a loaded, verified bundle on one study and write ``out``.

    Writes ``result.json``, ``gradcam_<side>.nii.gz`` (input geometry) and the figures. Shared by
    ``onfh infer`` and the exported MONAI Bundle's ``configs/inference.json``
    (:mod:`shared_models.monai_bundle`), so both give the same result for the same study.

    Args:
        bundle: a :class:`shared_models.bundle.Bundle` (already verified by ``load_bundle``).
        study: DICOM folder or NIfTI file.
        out: output folder (created).
        device: ``torch.device`` or ``"auto" | "cpu" | "cuda"``; default ``"auto"``.
        dicom_out: also write a DICOM SR and Segmentation there
            (:func:`shared_models.dicom_output.write_dicom_outputs`); DICOM studies only.

    Returns:
        ``(payload, results, image, figures)``: the ``result.json`` dict, the
        :class:`~shared_models.pipeline.HeadResult` list (right, left), the study as read and the
        figure files written.

    Raises:
        SeriesError: the study cannot be read.
        ValueError: ``dicom_out`` for a NIfTI study (no source DICOM UIDs to reference).
    """
    import torch

    from shared_models.device import select_device
    from shared_models.overlay import write_infer_figures
    from shared_models.pipeline import analyse_study, study_verdict

    if not isinstance(device, torch.device):
        device = select_device(device or "auto")
    if dicom_out is not None and not Path(study).is_dir():
        raise ValueError(
            f"{study}: --dicom-out needs a DICOM study folder; a NIfTI file has no source series, "
            "study or frame-of-reference UIDs for a DICOM SR or Segmentation to reference"
        )
    source_files: list[Path] = []
    image, series, body_part = read_for_inference(Path(study), source_files)
    warnings = []
    if series["why"].startswith("no T2"):
        warnings.append(series["why"])
    warnings += calibration_warnings(bundle.calibration)
    t0 = time.monotonic()
    results = analyse_study(
        image,
        bundle.detector,
        bundle.stager,
        bundle.spec,
        device=device,
        calibration=bundle.calibration,
        body_part=body_part,
    )
    elapsed = time.monotonic() - t0
    verdict, reasons = study_verdict(results)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for r in results:
        sitk.WriteImage(r.gradcam, str(out / f"gradcam_{r.side}.nii.gz"))
    pngs = write_infer_figures(image, results, out)
    payload = {
        "bundle_trusted": bundle.trusted,
        "verdict": verdict,
        "reasons": reasons,
        "series": series,
        "body_part_examined": body_part,
        "calibration": bundle.calibration.to_dict() if bundle.calibration else None,
        "heads": [r.summary() for r in results],
        "warnings": warnings,
        "seconds": round(elapsed, 2),
    }
    (out / "result.json").write_text(json.dumps(payload, indent=2))
    if dicom_out is not None:
        from shared_models.dicom_output import write_dicom_outputs

        written = write_dicom_outputs(source_files, results, payload["heads"], verdict, Path(dicom_out))
        log.info("DICOM output: %s", ", ".join(p.name for p in written))
    return payload, results, image, pngs


def run_monai_inference(bundle_root, study, output_dir, public_key=None, device="auto", public_key_sha256=None) -> dict:
    """Entry point of an exported MONAI Bundle's ``configs/inference.json`` (:mod:`shared_models.monai_bundle`).

    Verifies ``bundle_root/models/signed`` (against ``public_key`` when given, else its embedded
    key) and runs :func:`infer_to_folder`, exactly like ``onfh infer``; returns the ``result.json`` dict.
    With ``public_key_sha256`` (the pin an export made with the coordinator's key writes), the key
    must be given and be that key (:func:`shared_models.monai_bundle.check_pinned_key`). This checks
    ``models/signed`` only; the export's config that calls this function is trusted as code.

    Raises:
        ValueError: no study given. BundleError: a pinned key that is missing or another key;
            as ``onfh infer``. SeriesError: as ``onfh infer``.
    """
    from shared_models.bundle import BundleError, load_bundle
    from shared_models.monai_bundle import check_pinned_key

    if not study:
        raise ValueError("no study: pass --study <DICOM folder or NIfTI file> to `python -m monai.bundle run`")
    if public_key_sha256:
        if not public_key:
            raise BundleError(
                "configs/inference.json pins the coordinator key but no --public_key is set; refusing to verify "
                "models/signed against its embedded key only"
            )
        check_pinned_key(Path(public_key), str(public_key_sha256))
    bundle = load_bundle(Path(bundle_root) / "models" / "signed", Path(public_key) if public_key else None)
    payload, *_ = infer_to_folder(bundle, Path(study), Path(output_dir), device)
    log.info("MONAI Bundle inference: %s; result.json in %s", payload["verdict"], output_dir)
    return payload


def run_infer(args, console) -> int:
    """The ``onfh infer`` command (see the module docstring for exit codes)."""
    from rich.table import Table

    from shared_models.bundle import load_bundle

    if not args.public_key and not getattr(args, "allow_unsigned", False):
        raise ValueError(
            f"{args.bundle}: refusing to run a bundle without verifying its signature; pass the "
            "coordinator's --public-key (or --allow-unsigned to check it only against its embedded key)"
        )
    bundle = load_bundle(Path(args.bundle), Path(args.public_key) if args.public_key else None)
    out = Path(args.out)
    dicom_out = getattr(args, "dicom_out", None)
    payload, results, image, pngs = infer_to_folder(
        bundle, Path(args.study), out, args.device, Path(dicom_out) if dicom_out else None
    )
    verdict, reasons, warnings, elapsed = (
        payload["verdict"],
        payload["reasons"],
        payload["warnings"],
        payload["seconds"],
    )
    series = payload["series"]
    table = Table(title=f"{Path(args.study).name}: {verdict} ({elapsed:.1f} s)")
    for col in ("side", "box LPS mm (x0 y0 z0 x1 y1 z1)", "det. score", "P(0)", "P(I)", "P(II)", "stage"):
        table.add_column(col)
    for r in results:
        p = r.stage_probabilities
        cells = [f"{p[k]:.2f}" for k in ("0", "I", "II")] if p else ["-"] * 3
        table.add_row(
            r.side,
            " ".join(f"{v:.0f}" for v in r.box_lps_mm),
            f"{r.detector_score:.2f}" + (" (low)" if r.low_confidence else ""),
            *cells,
            r.predicted_stage or "not assessed",
        )
    console.print(table)
    console.print(
        f"series: {series['description'] or series['source']}, {series['n_slices']} slices, "
        f"{series['orientation']}: {series['why']}"
    )
    for warning in warnings:
        console.print(f"[yellow]warning:[/yellow] {warning}")
    for reason in reasons:
        console.print(f"[red]{'refused' if verdict == 'refused' else 'not assessed'}:[/red] {reason}")
    console.print(
        f"wrote {out / 'result.json'}, gradcam_R/L.nii.gz (input geometry) and "
        f"{', '.join(p.name for p in pngs)} (boxes and Grad-CAM over the MRI)"
    )
    if dicom_out:
        console.print(f"wrote the DICOM SR (and the Grad-CAM Segmentation for assessed heads) to {dicom_out}")
    if verdict == "refused" and not getattr(args, "allow_refused", False):
        console.print(f"[red]study refused[/red] (exit code {EXIT_REFUSED}; --allow-refused exits 0)")
        return EXIT_REFUSED
    return 0


def calibration_table(report: dict):
    """The run report's calibration (issue 17) as a rich Table, or None when the report has none."""
    from rich.table import Table

    c = report.get("calibration")
    if not c:
        return None
    ch = c.get("chosen") or {}

    def f(v, spec=".3f"):
        return "–" if not isinstance(v, (int, float)) or isinstance(v, bool) else f"{v:{spec}}"

    table = Table(
        title=f"Calibration on {ch.get('val_heads', 0)} validation heads: T = {f(ch.get('temperature'), '.3g')}, "
        f"detector threshold {f(ch.get('detector_threshold'), '.2f')}, energy threshold "
        f"{ch.get('energy_threshold')}, early-ONFH threshold {f(ch.get('early_threshold'), '.2f')}"
    )
    for col in (
        "site",
        "test heads",
        "ECE before",
        "ECE after",
        "early sens.",
        "early spec.",
        "OOD flagged",
        "box below threshold",
    ):
        table.add_column(col, justify="right" if col != "site" else "left")
    for site, m in (c.get("sites") or {}).items():
        name = site + (" (external)" if m.get("external") else "")
        if m.get("suppressed"):
            table.add_row(name, "suppressed", *["–"] * 6)
            continue
        table.add_row(
            name,
            str(m.get("test_heads")),
            f(m.get("ece_before")),
            f(m.get("ece_after")),
            f(m.get("sensitivity")),
            f(m.get("specificity")),
            f(m.get("ood_flagged")),
            f(m.get("detector_flagged")),
        )
    return table
