"""Real files for tests: DICOM written with pydicom, NIfTI with nibabel, PNG with Pillow.

Shared by every test module. Each writer returns the path it wrote. PHI-bearing attributes are filled with
canary strings by default so that any test can check they never leak.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, CTImageStorage, ExplicitVRLittleEndian, generate_uid

CANARY_NAME = "CANARYNAME^ZQX"
CANARY_ID = "CANARYPID9137"
CANARY_ACCESSION = "CANARYACC4471"
CANARY_BIRTH = "19010203"
CANARIES = (CANARY_NAME, "CANARYNAME", CANARY_ID, CANARY_ACCESSION, CANARY_BIRTH)


def write_dicom(
    path: str | Path,
    pixels: np.ndarray,
    *,
    patient_id: str = CANARY_ID,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,
    modality: str = "CR",
    sex: str | None = "F",
    age: str | None = "045Y",
    manufacturer: str = "ACME",
    institution: str | None = "General Hospital",
    view: str | None = "PA",
    study_uid: str | None = None,
    series_uid: str | None = None,
    instance: int = 1,
    position: tuple[float, float, float] | None = None,
    orientation: tuple[float, ...] | None = None,
    sop_class: str | None = None,
    preamble: bool = True,
    **extra: Any,
) -> Path:
    """Write a single-frame (2D) or multi-frame (3D array) uncompressed DICOM file.

    ``pixels`` is stored as is (uint16/int16/uint8); ``bits_stored`` defaults to the dtype's width.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.asarray(pixels)
    if sop_class is None:
        sop_class = CTImageStorage if modality == "CT" else ComputedRadiographyImageStorage
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128 if preamble else None)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName = CANARY_NAME
    ds.PatientID = patient_id
    ds.PatientBirthDate = CANARY_BIRTH
    ds.AccessionNumber = CANARY_ACCESSION
    if sex is not None:
        ds.PatientSex = sex
    if age is not None:
        ds.PatientAge = age
    ds.Modality = modality
    ds.Manufacturer = manufacturer
    if institution is not None:
        ds.InstitutionName = institution
    ds.InstitutionAddress = "1 CANARYSTREET"
    if view is not None:
        ds.ViewPosition = view
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.InstanceNumber = instance
    ds.StudyDate = "20200101"
    if position is not None:
        ds.ImagePositionPatient = list(position)
    if orientation is not None:
        ds.ImageOrientationPatient = list(orientation)
    ds.PixelSpacing = [0.5, 0.5]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.Rows, ds.Columns = pixels.shape[-2:]
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated = bits
    ds.BitsStored = bits_stored or bits
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if np.issubdtype(pixels.dtype, np.signedinteger) else 0
    if slope is not None:
        ds.RescaleSlope = slope
    if intercept is not None:
        ds.RescaleIntercept = intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    for key, value in extra.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=preamble)
    return path


def chest_like(size: int = 64, *, seed: int = 0, dtype: Any = np.uint16, max_value: int = 4095) -> np.ndarray:
    """A smooth, non-constant test image: bright body ellipse, darker lungs, a little noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    body = ((xx - 0.5) ** 2 / 0.16 + (yy - 0.5) ** 2 / 0.2) < 1
    lungs = (((xx - 0.33) ** 2 + (yy - 0.45) ** 2) < 0.02) | (((xx - 0.67) ** 2 + (yy - 0.45) ** 2) < 0.02)
    img = 0.1 + 0.6 * body - 0.35 * lungs + 0.02 * rng.standard_normal((size, size))
    img = np.clip(img, 0, 1) * max_value
    return img.astype(dtype)


def write_nifti(path: str | Path, volume: np.ndarray, *, affine: np.ndarray | None = None) -> Path:
    """Write a NIfTI file (``.nii`` or ``.nii.gz``)."""
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(volume), np.eye(4) if affine is None else affine), str(path))
    return path


def write_png(path: str | Path, image: np.ndarray) -> Path:
    """Write an 8- or 16-bit grey PNG (or RGB for (H, W, 3) uint8)."""
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(image)).save(path)
    return path


def read_back(path: str | Path) -> pydicom.Dataset:
    """Read a DICOM file written here (for assertions)."""
    return pydicom.dcmread(path, force=True)
