"""DICOM output of ``onfh infer --dicom-out`` (issue 21): a TID 1500 Structured Report and a Segmentation.

Both are built with highdicom (Herrmann et al., J. Digit. Imaging 2022; DICOM PS3.16 TID 1500
"Measurement Report", PS3.3 A.51 "Segmentation IOD") and reference the source series: same
study, the source images as evidence (SR) or source images (SEG, which also copies their
FrameOfReferenceUID and is written on their exact geometry).

SR, one measurement group per femoral head (values from ``result.json``'s heads): TID 1411
(volumetric ROI) whose volume surface is the box's six faces in the source series' frame of
reference, or TID 1501 when the source has no ``FrameOfReferenceUID``:

* finding site: femoral head (SCT 2812003) with laterality right (SCT 24028007) or left (SCT 7771000);
* qualitative evaluations: the assessment (``ASSESSED``, ``NOT_ASSESSED``, ``REFUSED``), the
  Ficat-Arlet stage (assessed heads only), one per flag (``low_detector_score``,
  ``out_of_distribution``, ``off_target``, ``non_finite``, ``refused``);
* measurements: the box ``x0 y0 z0 x1 y1 z1`` (LPS mm in the source frame of reference), the
  detector score, and for assessed heads the three stage probabilities and the Grad-CAM volume (mm³).

A refused study gets an SR whose heads say ``REFUSED``, with no stage, no probabilities and no
Segmentation. There are no standard codes for Ficat-Arlet stages, the assessment or the flags, so
they use the private coding scheme :data:`SCHEME` ("99ONFH", PS3.3 8.2: "99" prefix for private
schemes); see :data:`PRIVATE_CODES`.

SEG: binary, one segment per assessed head whose Grad-CAM map reaches
:data:`~shared_models.pipeline.GRADCAM_VOLUME_THRESHOLD` (the level that ``gradcam_volume_mm3``
counts), the map resampled (linear) onto the source slices' grid.

Only single-frame source series are supported for the Segmentation (an enhanced multi-frame
series gets the SR only, with a warning).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

log = logging.getLogger(__name__)

SCHEME = "99ONFH"
#: value -> meaning of every private code (scheme :data:`SCHEME`)
PRIVATE_CODES = {
    "FA_STAGE": "Ficat-Arlet stage",
    "FA_0": "Ficat-Arlet stage 0",
    "FA_I": "Ficat-Arlet stage I",
    "FA_II": "Ficat-Arlet stage II",
    "ASSESSMENT": "Assessment",
    "ASSESSED": "Assessed",
    "NOT_ASSESSED": "Not assessed (flagged)",
    "REFUSED": "Refused (study gate failed)",
    "FLAG": "Flag",
    "low_detector_score": "Detector score below the validation threshold",
    "out_of_distribution": "Out of distribution (energy score)",
    "off_target": "Box is not a femoral head",
    "refused": "Study refused",
    "non_finite": "Stager output not finite (NaN or infinity)",
    "uncalibrated": "Calibration refused by the coordinator",
    "P_0": "Probability of Ficat-Arlet stage 0",
    "P_I": "Probability of Ficat-Arlet stage I",
    "P_II": "Probability of Ficat-Arlet stage II",
    "BOX_X0": "Box x0 (LPS)",
    "BOX_Y0": "Box y0 (LPS)",
    "BOX_Z0": "Box z0 (LPS)",
    "BOX_X1": "Box x1 (LPS)",
    "BOX_Y1": "Box y1 (LPS)",
    "BOX_Z1": "Box z1 (LPS)",
    "DETECTOR_SCORE": "Detector score",
    "GRADCAM_VOLUME": "Grad-CAM volume at or above threshold",
    "GRADCAM_EVIDENCE": "Grad-CAM evidence region",
}
BOX_KEYS = ("BOX_X0", "BOX_Y0", "BOX_Z0", "BOX_X1", "BOX_Y1", "BOX_Z1")


class DicomOutputError(ValueError):
    """The source series cannot carry DICOM output (names the problem)."""


def code(value: str):
    """A private :class:`highdicom.sr.CodedConcept` of :data:`SCHEME`."""
    from highdicom.sr import CodedConcept

    return CodedConcept(value, SCHEME, PRIVATE_CODES[value])


def _sorted_sources(files: Sequence[Path]):
    import pydicom

    datasets = [pydicom.dcmread(f) for f in files]
    if not datasets:
        raise DicomOutputError("no source DICOM files")
    if any(int(getattr(ds, "NumberOfFrames", 1) or 1) > 1 for ds in datasets):
        return datasets, None
    row_col = np.asarray(datasets[0].ImageOrientationPatient, dtype=np.float64).reshape(2, 3)
    normal = np.cross(row_col[0], row_col[1])
    datasets.sort(key=lambda ds: float(np.dot(np.asarray(ds.ImagePositionPatient, dtype=np.float64), normal)))
    return datasets, (row_col, normal)


def box_faces(box_lps_mm: Sequence[float]) -> list[np.ndarray]:
    """The six faces of the box ``(x0, y0, z0, x1, y1, z1)`` (mm) as closed polygons, each ``(5, 3)`` float32
    (first point repeated last, as DICOM POLYGON requires)."""
    x0, y0, z0, x1, y1, z1 = (float(v) for v in box_lps_mm)
    quads = [
        [(x0, y0, z0), (x0, y1, z0), (x0, y1, z1), (x0, y0, z1)],
        [(x1, y0, z0), (x1, y1, z0), (x1, y1, z1), (x1, y0, z1)],
        [(x0, y0, z0), (x1, y0, z0), (x1, y0, z1), (x0, y0, z1)],
        [(x0, y1, z0), (x1, y1, z0), (x1, y1, z1), (x0, y1, z1)],
        [(x0, y0, z0), (x1, y0, z0), (x1, y1, z0), (x0, y1, z0)],
        [(x0, y0, z1), (x1, y0, z1), (x1, y1, z1), (x0, y1, z1)],
    ]
    return [np.asarray([*q, q[0]], dtype=np.float32) for q in quads]


def source_grid(datasets, row_col: np.ndarray, normal: np.ndarray) -> sitk.Image:
    """A float32 image on the sorted single-frame ``datasets``' voxel grid (LPS; zeros)."""
    first = np.asarray(datasets[0].ImagePositionPatient, dtype=np.float64)
    step = (
        float(np.dot(np.asarray(datasets[1].ImagePositionPatient, dtype=np.float64) - first, normal))
        if len(datasets) > 1
        else float(getattr(datasets[0], "SliceThickness", 1.0) or 1.0)
    )
    dy, dx = (float(v) for v in datasets[0].PixelSpacing)  # row spacing, column spacing
    ref = sitk.Image(int(datasets[0].Columns), int(datasets[0].Rows), len(datasets), sitk.sitkFloat32)
    ref.SetSpacing((dx, dy, step))
    ref.SetOrigin(tuple(first))
    ref.SetDirection(tuple(np.column_stack([row_col[0], row_col[1], normal]).ravel()))
    return ref


def write_dicom_outputs(
    source_files: Sequence[Path], results, heads: list[dict], verdict: str, out: Path, software_version: str = "0.1.0"
) -> list[Path]:
    """Write ``out/sr.dcm`` and, when a head was assessed, ``out/seg.dcm``; returns the files written.

    Args:
        source_files: the source series' DICOM files (the series ``onfh infer`` read).
        results: :class:`~shared_models.pipeline.HeadResult` per side (their ``gradcam`` maps,
            in the study's geometry, give the Segmentation).
        heads: ``result.json``'s ``heads`` (the SR's values, so they match ``result.json``).
        verdict: ``result.json``'s ``verdict``.
        out: output folder (created).

    Raises:
        DicomOutputError: no source files.
    """
    import highdicom as hd
    from highdicom.sr import (
        AlgorithmIdentification,
        Comprehensive3DSR,
        FindingSite,
        Measurement,
        MeasurementReport,
        MeasurementsAndQualitativeEvaluations,
        ObservationContext,
        QualitativeEvaluation,
        SourceSeriesForSegmentation,
        TrackingIdentifier,
        VolumeSurface,
        VolumetricROIMeasurementsAndQualitativeEvaluations,
    )
    from pydicom.sr.codedict import codes

    from shared_models.pipeline import GRADCAM_VOLUME_THRESHOLD

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    datasets, geometry = _sorted_sources(source_files)
    algorithm = AlgorithmIdentification(name="ONFH-FL 3DC-YOLOX + 3D-MulDenseNet", version=software_version)
    groups: list[MeasurementsAndQualitativeEvaluations | VolumetricROIMeasurementsAndQualitativeEvaluations] = []
    for head in heads:
        status = "REFUSED" if verdict == "refused" else "ASSESSED" if head["assessed"] else "NOT_ASSESSED"
        evaluations = [QualitativeEvaluation(code("ASSESSMENT"), code(status))]
        if head["assessed"] and head["predicted_stage"]:
            evaluations.append(QualitativeEvaluation(code("FA_STAGE"), code(f"FA_{head['predicted_stage']}")))
        evaluations += [
            QualitativeEvaluation(code("FLAG"), code(flag)) for flag in head["flags"] if flag in PRIVATE_CODES
        ]
        measurements = [
            Measurement(code(k), float(v), codes.UCUM.Millimeter) for k, v in zip(BOX_KEYS, head["box_lps_mm"])
        ]
        measurements.append(Measurement(code("DETECTOR_SCORE"), float(head["detector_score"]), codes.UCUM.NoUnits))
        if head["assessed"]:
            measurements += [
                Measurement(code(f"P_{k}"), float(p), codes.UCUM.NoUnits)
                for k, p in head["stage_probabilities"].items()
            ]
            measurements.append(
                Measurement(code("GRADCAM_VOLUME"), float(head["gradcam_volume_mm3"]), codes.UCUM.CubicMillimeter)
            )
        laterality = codes.SCT.Right if head["side"] == "R" else codes.SCT.Left
        common = dict(
            tracking_identifier=TrackingIdentifier(uid=hd.UID(), identifier=f"{head['side']} femoral head"),
            finding_type=codes.SCT.FemoralHead,
            algorithm_id=algorithm,
            finding_sites=[FindingSite(anatomic_location=codes.SCT.FemoralHead, laterality=laterality)],
            measurements=measurements,
            qualitative_evaluations=evaluations,
        )
        frame = getattr(datasets[0], "FrameOfReferenceUID", None)
        if frame:  # TID 1411: the box as a closed surface (its six faces) in the source frame of reference
            surface = VolumeSurface(
                graphic_type="POLYGON",
                graphic_data=box_faces(head["box_lps_mm"]),
                frame_of_reference_uid=frame,
                source_series=SourceSeriesForSegmentation(datasets[0].SeriesInstanceUID),
            )
            groups.append(
                VolumetricROIMeasurementsAndQualitativeEvaluations(referenced_volume_surface=surface, **common)
            )
        else:
            groups.append(MeasurementsAndQualitativeEvaluations(**common))
    report = MeasurementReport(
        observation_context=ObservationContext(),
        procedure_reported=codes.SCT.ImagingProcedure,
        imaging_measurements=groups,
    )
    sr = Comprehensive3DSR(
        evidence=datasets,
        content=report,
        series_instance_uid=hd.UID(),
        series_number=901,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="ONFH-FL",
        is_complete=True,
    )
    written = [out / "sr.dcm"]
    sr.save_as(written[0], enforce_file_format=True)
    assessed = [(h, r) for h, r in zip(heads, results, strict=True) if h["assessed"]]
    if not assessed or verdict == "refused":
        return written
    if geometry is None:
        log.warning("the source series is multi-frame: no DICOM Segmentation written (SR only)")
        return written
    ref = source_grid(datasets, *geometry)
    masks, descriptions = [], []
    for h, r in assessed:
        cam = sitk.Resample(r.gradcam, ref, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        mask = sitk.GetArrayFromImage(cam) >= GRADCAM_VOLUME_THRESHOLD  # (slices, rows, columns)
        if not mask.any():
            continue
        side = "right" if h["side"] == "R" else "left"
        masks.append(mask)
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=len(masks),
                segment_label=f"Grad-CAM {side} femoral head",
                segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                segmented_property_type=code("GRADCAM_EVIDENCE"),
                algorithm_type="AUTOMATIC",
                algorithm_identification=hd.AlgorithmIdentificationSequence(
                    name="ONFH-FL 3D Grad-CAM", family=codes.DCM.ArtificialIntelligence, version=software_version
                ),
                anatomic_regions=[codes.SCT.FemoralHead],
            )
        )
    if not masks:
        return written
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=np.stack(masks, axis=-1).astype(np.uint8),
        segmentation_type="BINARY",
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=902,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="ONFH-FL",
        manufacturer_model_name="ONFH-FL",
        software_versions=software_version,
        device_serial_number="0",
        content_description=f"Grad-CAM at or above {GRADCAM_VOLUME_THRESHOLD:g}",
        omit_empty_frames=False,
    )
    written.append(out / "seg.dcm")
    seg.save_as(written[-1], enforce_file_format=True)
    return written
