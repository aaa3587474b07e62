"""Writing one phantom study as a DICOM MR series, styled after its center's vendor.

DICOM files
    One single-frame MR Image Storage series per study, explicit VR little endian,
    uncompressed, 16-bit pixels with 12 bits stored, ``RescaleSlope``/``RescaleIntercept`` to
    scanner units (Siemens: uint16, 1/0; center C: uint16, slope 2.12454212; center D: int16,
    slope 1.5, intercept -100). Files sit in ``<study>/DICOM/``, named at random per center
    style (32-hex ``.dcm``, ``IM#####`` or 8-hex, no extension), written in shuffled order;
    ``InstanceNumber`` ascends along the slice normal for Siemens and descends for Philips, so
    readers must sort by ``ImagePositionPatient`` (GDCM does). About half the studies carry a
    junk non-DICOM file (``README.txt`` in the study folder, ``.DS_Store`` or ``Thumbs.db`` next
    to the images). ``PatientID``/``PatientName`` are synthetic pseudonyms (``A-0007``,
    ``PHANTOM^A-0007``); study folders are numbered independently (``study-0042``).
"""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmwrite
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)

from sim.phantoms.anatomy import _Patient
from sim.phantoms.scanner import _site_key, _stored_range, _study_axes, _StudyTask

_DICOM_STYLE = {
    "SIEMENS": {
        "image_type": ["ORIGINAL", "PRIMARY", "M", "NORM", "DIS2D"],
        "software": "syngo MR XA30",
        "sequence": "*tse2d1_15",
        "variant": ["SK", "SP", "OSP"],
        "instance_ascending": True,
    },
    "Philips": {
        "image_type": ["ORIGINAL", "PRIMARY", "M_SE", "M", "SE"],
        "software": "5.7.1",
        "sequence": "TSE",
        "variant": ["SK"],
        "instance_ascending": False,
    },
}


def _ds(value: float) -> str:
    text = f"{value:.10g}"
    if len(text) > 16:
        text = f"{value:.6g}"
    return "0" if text == "-0" else text


def _uid(*parts: Any) -> str:
    return generate_uid(entropy_srcs=["onfh-fl-phantom", *[str(p) for p in parts]])


def _file_names(rng: np.random.Generator, site: str, n: int) -> list[str]:
    style = _site_key(site) % 3
    if style == 0:
        return [f"{rng.integers(0, 2**63):016x}{rng.integers(0, 2**63):016x}.dcm" for _ in range(n)]
    if style == 1:
        numbers = rng.choice(90000, size=n, replace=False) + 10000
        return [f"IM{k:05d}" for k in numbers]
    return [f"{rng.integers(0, 2**32):08X}" for _ in range(n)]


def _write_study(task: _StudyTask, stored: np.ndarray, patient: _Patient) -> tuple[int, int]:
    """Write the study's DICOM series. Returns (files, bytes)."""
    sc = task.scanner
    rng = np.random.default_rng(np.random.SeedSequence([task.seed, _site_key(task.site), 3, task.patient_number]))
    style = _DICOM_STYLE.get(sc.vendor, _DICOM_STYLE["SIEMENS"])
    x, y, z = _study_axes(sc, patient.domain)
    if sc.slice_orientation == "axial":
        orientation = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        slices = [(stored[k], (x[0], y[0], z[k]), float(z[k])) for k in range(len(z))]
    else:
        orientation = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
        slices = [(stored[::-1, k, :], (x[0], y[k], z[-1]), float(y[k])) for k in range(len(y))]
    rows, cols = slices[0][0].shape
    n = len(slices)
    _, _, dtype = _stored_range(sc)

    study_day = date(2018, 2, 1) + timedelta(days=int(rng.integers(0, 1700)))
    study_date = study_day.strftime("%Y%m%d")
    study_time = f"{rng.integers(7, 19):02d}{rng.integers(0, 60):02d}{rng.integers(0, 60):02d}"
    keys = (task.seed, task.site, task.patient_number)
    study_uid = _uid(*keys, "study")
    series_uid = _uid(*keys, "series")
    frame_uid = _uid(*keys, "frame-of-reference")

    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "ONFHFL_PHANTOM"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = style["image_type"]
    ds.SOPClassUID = MRImageStorage
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study_date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = study_time
    ds.AccessionNumber = f"PH{int(rng.integers(10**7, 10**8))}"
    ds.Modality = "MR"
    ds.Manufacturer = sc.vendor
    ds.InstitutionName = f"ONFH-FL phantom center {task.site}"
    ds.ReferringPhysicianName = ""
    ds.StationName = f"PHANTOM{task.site}"
    ds.StudyDescription = "MR HIP BILATERAL"
    ds.SeriesDescription = sc.description
    ds.ManufacturerModelName = sc.model
    ds.PatientName = f"PHANTOM^{task.patient_id}"
    ds.PatientID = task.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = patient.sex
    ds.PatientAge = f"{patient.age:03d}Y"
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "synthetic phantom (ONFH-FL sim.phantoms), no real patient"
    ds.BodyPartExamined = "HIP"
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = style["variant"]
    ds.ScanOptions = "SFS" if sc.slice_orientation == "coronal" else ""
    ds.MRAcquisitionType = "2D"
    ds.SequenceName = style["sequence"]
    ds.SliceThickness = _ds(sc.slice_thickness_mm)
    ds.RepetitionTime = _ds(sc.repetition_time_ms)
    ds.EchoTime = _ds(sc.echo_time_ms)
    ds.NumberOfAverages = "2" if sc.field_strength_t < 2 else "1"
    ds.ImagingFrequency = _ds(round(42.577478 * sc.field_strength_t, 6))
    ds.ImagedNucleus = "1H"
    ds.EchoNumbers = "1"
    ds.MagneticFieldStrength = _ds(sc.field_strength_t)
    ds.SpacingBetweenSlices = _ds(sc.slice_thickness_mm)
    ds.EchoTrainLength = "15"
    ds.PercentSampling = "100"
    ds.PercentPhaseFieldOfView = "100"
    ds.PixelBandwidth = "190" if sc.field_strength_t > 2 else "150"
    ds.DeviceSerialNumber = str(10000 + _site_key(task.site) % 90000)
    ds.SoftwareVersions = style["software"]
    ds.ProtocolName = sc.description.lower()
    ds.FlipAngle = "150" if sc.vendor == "SIEMENS" else "90"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = str(int(rng.integers(2, 12)))
    ds.AcquisitionNumber = "1"
    ds.ImageOrientationPatient = [_ds(v) for v in orientation]
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.PixelSpacing = [_ds(v) for v in sc.pixel_spacing_mm]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 1 if sc.pixel_signed else 0
    ds.WindowCenter = _ds(round(500 * sc.intensity_scale * patient.domain.gain))
    ds.WindowWidth = _ds(round(1200 * sc.intensity_scale * patient.domain.gain))
    ds.RescaleIntercept = _ds(sc.rescale_intercept)
    ds.RescaleSlope = _ds(sc.rescale_slope)
    ds.RescaleType = "US"
    ds.LossyImageCompression = "00"

    series_dir = Path(task.site_dir) / task.study / "DICOM"
    series_dir.mkdir(parents=True, exist_ok=True)
    names = _file_names(rng, task.site, n)
    total = 0
    for k in rng.permutation(n):
        pixels, position, location = slices[int(k)]
        number = int(k) + 1 if style["instance_ascending"] else n - int(k)
        sop_uid = _uid(*keys, "image", int(k))
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.SOPInstanceUID = sop_uid
        ds.InstanceCreationDate = study_date
        ds.InstanceCreationTime = study_time
        ds.InstanceNumber = str(number)
        ds.ImagePositionPatient = [_ds(float(v)) for v in position]
        ds.SliceLocation = _ds(location)
        ds.PixelData = np.ascontiguousarray(pixels, dtype=dtype).tobytes()
        path = series_dir / names[int(k)]
        dcmwrite(path, ds, enforce_file_format=True)
        total += path.stat().st_size

    files = n
    junk = rng.random()
    if junk < 0.25:
        text = "Exported from PACS. Series: 1. This folder holds a synthetic phantom study.\n"
        (Path(task.site_dir) / task.study / "README.txt").write_text(text)
        files += 1
    elif junk < 0.45:
        noise = bytes(rng.integers(0, 256, 120, dtype=np.uint8))
        (series_dir / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + noise)
        files += 1
    elif junk < 0.55:
        (series_dir / "Thumbs.db").write_bytes(bytes(rng.integers(0, 256, 512, dtype=np.uint8)))
        files += 1
    return files, total
