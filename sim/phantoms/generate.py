"""The phantom generation driver: plans every site's studies, runs them, writes the outputs.

``generate_phantoms`` plans the studies of every site (stages, bilateral patients, study
numbers), renders and writes them in worker processes (``_run_study``, a module-level
function so that ``ProcessPoolExecutor`` can pickle it), then writes each site's
``manifest.csv``, ``ground_truth.csv`` and ``phantoms.json``.

Label geometry
    ``box_lps_mm`` is the femoral head core area: the axis-aligned box ``centre +- radius`` of
    the head sphere (bone surface, without cartilage), ``x0 y0 z0 x1 y1 z1``, 3 decimals. It is
    exact in the written images (no rounding of the anatomy to the voxel grid).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np

from client.site_layout import MANIFEST_COLUMNS, MANIFEST_NAME
from shared_models.stages import STAGE_LABELS, FicatArletStage
from sim.phantoms.anatomy import _SIDES
from sim.phantoms.dicom_writer import _write_study
from sim.phantoms.geometry import Vec
from sim.phantoms.profiles import FOV_CENTRE_LPS_MM, PROFILES, PhantomProfile
from sim.phantoms.scanner import _simulate, _site_key, _StudyTask

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 7
"""Bumped whenever the output for a given profile and seed changes."""

SUMMARY_FILE = "phantoms.json"
GROUND_TRUTH_FILE = "ground_truth.csv"
_MARKER_FILE = ".onfh-phantoms"
_SIGN_KEYS = ("I_oedema", "II_bright_band", "II_dark_band", "II_necrotic", "II_oedema")


def _run_study(task: _StudyTask) -> dict[str, Any]:
    """Worker entry point: render, write, and return the rows and measurements."""
    stored, patient, records = _simulate(task)
    n_files, n_bytes = _write_study(task, stored, patient)
    return {
        "site": task.site,
        "patient_number": task.patient_number,
        "patient_id": task.patient_id,
        "study": task.study,
        "heads": records,
        "files": n_files,
        "bytes": n_bytes,
    }


# --------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------


def _plan_site(profile: PhantomProfile, site: str, seed: int, site_dir: Path) -> list[_StudyTask]:
    rng = np.random.default_rng(np.random.SeedSequence([seed, _site_key(site), 0]))
    n0, n1, n2 = profile.stage_counts()[site]
    stages = [int(s) for s in rng.permutation(np.repeat([0, 1, 2], [n0, n1, n2]))]
    n_patients = profile.patients_per_site[site]
    n_bilateral = profile.heads_per_site[site] - n_patients
    bilateral = set(int(i) for i in rng.permutation(n_patients)[:n_bilateral])
    study_numbers = rng.permutation(n_patients) + 1
    tasks, cursor = [], 0
    for i in range(n_patients):
        if i in bilateral:
            sides = {"R": stages[cursor], "L": stages[cursor + 1]}
            cursor += 2
        else:
            sides = {str(rng.choice(_SIDES)): stages[cursor]}
            cursor += 1
        tasks.append(
            _StudyTask(
                site=site,
                scanner=profile.scanners[site],
                patient_number=i + 1,
                patient_id=f"{site}-{i + 1:04d}",
                study=f"study-{int(study_numbers[i]):04d}",
                sides=sides,
                seed=seed,
                site_dir=str(site_dir),
            )
        )
    return tasks


def _resolve_profile(profile: str | PhantomProfile) -> PhantomProfile:
    if isinstance(profile, PhantomProfile):
        return profile
    if profile not in PROFILES:
        raise ValueError(f"unknown phantom profile {profile!r}; choose one of {sorted(PROFILES)}")
    return PROFILES[profile]


def _existing_summary(out_dir: Path, profile: PhantomProfile, seed: int) -> dict | None:
    path = out_dir / SUMMARY_FILE
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if (
        summary.get("generator_version") != GENERATOR_VERSION
        or summary.get("profile_fingerprint") != profile.fingerprint()
        or summary.get("seed") != seed
    ):
        return None
    if not all((out_dir / s / MANIFEST_NAME).is_file() for s in profile.sites):
        return None
    return summary


def _refuse_other_phantoms(out_dir: Path, profile: PhantomProfile, seed: int) -> None:
    """Refuse to overwrite phantoms of another profile or seed (their splits and site caches with them)."""
    try:
        summary = json.loads((out_dir / SUMMARY_FILE).read_text())
    except (OSError, ValueError):
        return
    if summary.get("profile_fingerprint") != profile.fingerprint() or summary.get("seed") != seed:
        raise FileExistsError(
            f"{out_dir} holds phantoms of profile {summary.get('profile')!r}, seed {summary.get('seed')}; "
            f"not overwriting them with profile {profile.name!r}, seed {seed}: use another output folder "
            "(or `onfh sim phantoms --replace`)"
        )


def _clear_previous(out_dir: Path, sites: set[str]) -> None:
    """Remove site folders a previous run wrote; refuse to touch anything else."""
    ours = (out_dir / _MARKER_FILE).is_file()
    for name in (SUMMARY_FILE, GROUND_TRUTH_FILE):
        if ours and (out_dir / name).is_file():
            (out_dir / name).unlink()
    for site in sorted(sites):
        site_dir = out_dir / site
        if not site_dir.exists():
            continue
        if site_dir.is_dir() and (ours or not any(site_dir.iterdir())):
            shutil.rmtree(site_dir)
        else:
            raise FileExistsError(
                f"{site_dir} exists and was not written by the phantom generator; choose an empty output folder"
            )


def _summarise_cnr(values: list[float]) -> dict[str, float | int]:
    arr = np.asarray([v for v in values if np.isfinite(v)], dtype=float)
    if arr.size == 0:
        return {"n": 0}
    return {
        "n": int(arr.size),
        "mean": round(float(arr.mean()), 3),
        "median": round(float(np.median(arr)), 3),
        "min": round(float(arr.min()), 3),
        "max": round(float(arr.max()), 3),
    }


def _fmt_vec(v: Vec) -> str:
    return " ".join(f"{float(a):.3f}" for a in v)


def generate_phantoms(
    out_dir: Path,
    profile: str | PhantomProfile = "quick",
    seed: int = 0,
    progress: bool = False,
    *,
    workers: int | None = None,
    replace: bool = False,
) -> dict:
    """Generate the phantom centers as DICOM site folders.

    Args:
        out_dir: output folder; gets one sub-folder per site plus ``phantoms.json`` and
            ``ground_truth.csv``. Created if missing.
        profile: a name in ``PROFILES`` (``"quick"``, ``"paper"``) or a ``PhantomProfile``.
        seed: master seed; the same seed gives byte-identical DICOM and manifests.
        progress: show a rich progress bar.
        workers: worker processes (default: available CPU cores); the output does not
            depend on it. Uses ``concurrent.futures`` with the platform's default start method,
            so scripts that call this must guard their entry point with
            ``if __name__ == "__main__":``.
        replace: overwrite phantoms of another profile or seed in ``out_dir`` (with their
            splits and site caches); otherwise that is refused. Phantoms of the same profile
            and seed from an older generator version are always regenerated.

    Returns:
        The JSON-able summary also written to ``phantoms.json``: profile, seed, per-site
        scanner traits, counts per stage, measured CNR per stage sign. If ``phantoms.json``
        already describes the same profile, seed and generator version (and the manifests
        exist), it is returned without regenerating.

    Raises:
        ValueError: unknown profile name.
        FileExistsError: a site folder to be written exists and is not ours, or ``out_dir``
            holds phantoms of another profile or seed and ``replace`` is False.
    """
    out_dir = Path(out_dir)
    prof = _resolve_profile(profile)
    seed = int(seed)
    existing = _existing_summary(out_dir, prof, seed)
    if existing is not None:
        logger.info("phantoms already generated (profile %s, seed %d); reusing", prof.name, seed)
        return existing
    if not replace:
        _refuse_other_phantoms(out_dir, prof, seed)

    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    previous_sites: set[str] = set()
    try:
        previous_sites = set(json.loads((out_dir / SUMMARY_FILE).read_text()).get("sites", {}))
    except (OSError, ValueError, AttributeError):
        pass
    _clear_previous(out_dir, set(prof.sites) | previous_sites)
    (out_dir / _MARKER_FILE).write_text("written by ONFH-FL sim.phantoms\n")

    tasks: list[_StudyTask] = []
    for site in prof.sites:
        (out_dir / site).mkdir(parents=True, exist_ok=True)
        tasks.extend(_plan_site(prof, site, seed, out_dir / site))

    if workers is None:
        workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = max(1, min(int(workers), len(tasks)))
    results = _execute(tasks, workers, progress)
    results.sort(key=lambda r: (r["site"], r["patient_number"]))

    summary = _write_outputs(out_dir, prof, seed, results)
    summary["elapsed_s"] = round(time.perf_counter() - started, 2)
    summary["workers"] = workers
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=False) + "\n")
    logger.info(
        "generated %d studies, %d heads in %d sites in %.1f s (%.0f MB)",
        len(results),
        summary["totals"]["heads"],
        len(prof.sites),
        summary["elapsed_s"],
        summary["totals"]["bytes"] / 1e6,
    )
    return summary


def _execute(tasks: list[_StudyTask], workers: int, progress: bool) -> list[dict[str, Any]]:
    bar: Any = None
    job: Any = None

    def advance() -> None:
        if bar is not None:
            bar.advance(job)

    if progress:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        bar = Progress("phantoms", BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=Console(stderr=True))
        bar.start()
        job = bar.add_task("phantoms", total=len(tasks))
    results = []
    try:
        if workers == 1 or len(tasks) < 4:
            for task in tasks:
                results.append(_run_study(task))
                advance()
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = [pool.submit(_run_study, t) for t in tasks]
                for fut in as_completed(futures):
                    results.append(fut.result())
                    advance()
    finally:
        if bar is not None:
            bar.stop()
    return results


def _write_outputs(out_dir: Path, prof: PhantomProfile, seed: int, results: list[dict]) -> dict:
    sites_summary: dict[str, Any] = {}
    gt_rows = []
    totals = {"patients": 0, "heads": 0, "studies": 0, "files": 0, "bytes": 0}
    total_stage = {label: 0 for label in STAGE_LABELS}
    for site in prof.sites:
        sc = prof.scanners[site]
        site_results = [r for r in results if r["site"] == site]
        manifest_rows = []
        stage_counts = {label: 0 for label in STAGE_LABELS}
        cnr: dict[str, list[float]] = {k: [] for k in _SIGN_KEYS}
        noise, marrow = [], []
        for r in site_results:
            for head in r["heads"]:
                centre, radius = np.asarray(head["centre"]), float(head["radius"])
                labelled = head["stage"] is not None
                label = FicatArletStage(head["stage"]).label if labelled else ""
                if labelled:
                    box = (*(centre - radius), *(centre + radius))
                    manifest_rows.append(
                        {
                            "patient_id": r["patient_id"],
                            "study": r["study"],
                            "side": head["side"],
                            "ficat_stage": label,
                            "box_lps_mm": _fmt_vec(box[:3]) + " " + _fmt_vec(box[3:]),
                            "scanner": sc.label,
                        }
                    )
                    stage_counts[label] += 1
                    for key, value in head["cnr"].items():
                        cnr[key].append(value)
                    if "noise_sigma_measured" in head:
                        noise.append(head["noise_sigma_measured"])
                        if head["stage"] == 0:
                            marrow.append(head["marrow_mean"])
                gt_rows.append(
                    {
                        "site": site,
                        "patient_id": r["patient_id"],
                        "study": r["study"],
                        "side": head["side"],
                        "ficat_stage": label if labelled else ("III-excluded" if head["collapsed"] else "unlabelled"),
                        "in_manifest": int(labelled),
                        "head_centre_lps_mm": _fmt_vec(head["centre"]),
                        "head_radius_mm": f"{radius:.3f}",
                        "sign": head.get("sign", ""),
                        "sign_centre_lps_mm": _fmt_vec(head["sign_centre"]) if "sign_centre" in head else "",
                        "sign_radius_mm": f"{head['sign_radius']:.3f}" if "sign_radius" in head else "",
                    }
                )
        manifest_rows.sort(key=lambda row: (row["patient_id"], row["side"]))
        with open(out_dir / site / MANIFEST_NAME, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(manifest_rows)
        n_files = sum(r["files"] for r in site_results)
        n_bytes = sum(r["bytes"] for r in site_results)
        sites_summary[site] = {
            "scanner": dataclasses.asdict(sc),
            "scanner_label": sc.label,
            "series_description": sc.description,
            "grid_shape_dhw": list(sc.grid_shape),
            "voxel_spacing_mm_dhw": list(sc.voxel_spacing_mm),
            "patients": len(site_results),
            "studies": len(site_results),
            "heads": len(manifest_rows),
            "heads_per_stage": stage_counts,
            "files": n_files,
            "bytes": n_bytes,
            "noise_sigma_measured": round(float(np.nanmean(noise)), 2) if noise else None,
            "stage0_marrow_mean": round(float(np.nanmean(marrow)), 1) if marrow else None,
            "cnr": {k: _summarise_cnr(v) for k, v in cnr.items() if v},
        }
        totals["patients"] += len(site_results)
        totals["studies"] += len(site_results)
        totals["heads"] += len(manifest_rows)
        totals["files"] += n_files
        totals["bytes"] += n_bytes
        for label, count in stage_counts.items():
            total_stage[label] += count
    totals["heads_per_stage"] = total_stage  # type: ignore[assignment]

    gt_rows.sort(key=lambda row: (row["site"], row["patient_id"], row["side"]))
    with open(out_dir / GROUND_TRUTH_FILE, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(gt_rows[0]) if gt_rows else ["site"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(gt_rows)

    return {
        "generator": "onfh-fl sim.phantoms",
        "generator_version": GENERATOR_VERSION,
        "profile": prof.name,
        "profile_fingerprint": prof.fingerprint(),
        "seed": seed,
        "external_groups": {k: list(v) for k, v in prof.external_groups.items()},
        "fov_centre_lps_mm": list(FOV_CENTRE_LPS_MM),
        "cnr_definition": (
            "per head: |mean(final - noise-free image without the sign)| over the region where "
            "the noise-free sign field reaches half its peak, / noise sigma measured in the same "
            "head's marrow; rescaled scanner units; summarised per site"
        ),
        "sites": sites_summary,
        "totals": totals,
        "ground_truth": GROUND_TRUTH_FILE,
    }


def read_ground_truth(out_dir: Path) -> list[dict[str, Any]]:
    """Per-head ground truth written next to the site folders (for tests and Grad-CAM checks).

    Returns one dict per imaged femoral head: ``site``, ``patient_id``, ``study``, ``side``,
    ``ficat_stage`` (``0``/``I``/``II``, ``III-excluded`` or ``unlabelled``), ``in_manifest``
    (bool), ``head_centre_lps_mm`` (3 floats), ``head_radius_mm``, ``sign`` (``lesion``,
    ``oedema`` or empty), ``sign_centre_lps_mm`` (3 floats or None), ``sign_radius_mm``
    (float or None; the oedema's envelope sd for ``oedema``).
    """
    rows = []
    with open(Path(out_dir) / GROUND_TRUTH_FILE, newline="") as fh:
        for row in csv.DictReader(fh):
            rows.append(
                {
                    **row,
                    "in_manifest": row["in_manifest"] == "1",
                    "head_centre_lps_mm": tuple(float(v) for v in row["head_centre_lps_mm"].split()),
                    "head_radius_mm": float(row["head_radius_mm"]),
                    "sign_centre_lps_mm": tuple(float(v) for v in row["sign_centre_lps_mm"].split())
                    if row["sign_centre_lps_mm"]
                    else None,
                    "sign_radius_mm": float(row["sign_radius_mm"]) if row["sign_radius_mm"] else None,
                }
            )
    return rows
