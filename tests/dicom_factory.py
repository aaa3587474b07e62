"""Shared builder for synthetic DICOM test inputs (pydicom)."""

from __future__ import annotations

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid


def new_mr_dataset(sop_class: str = MRImageStorage) -> Dataset:
    """An empty MR dataset (single-frame by default) with file meta and a fresh SOP Instance UID.

    Explicit VR little endian; callers add geometry, pixels and the other attributes.
    """
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    return ds
