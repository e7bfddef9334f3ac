"""DICOM and NIfTI writers for the synthetic data set: realistic headers, obviously fake identifiers.

UIDs are derived from the config fingerprint (``generate_uid(entropy_srcs=...)``), not drawn at random, so the
same knobs give byte-identical files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    CTImageStorage,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    generate_uid,
)

from medtransfer.datasets.synthetic.anatomy import ellipse
from medtransfer.datasets.synthetic.plan import SampleDataConfig
from medtransfer.datasets.synthetic.sites import SiteProfile


def write_dicom(path: Path, pixels: np.ndarray, row: Any, site: SiteProfile, cfg: SampleDataConfig) -> None:
    """Write one radiograph with realistic header fields; all identifiers are obviously fake.

    Args:
        path: destination file (its folder is created).
        pixels: stored values, uint16 (rows, cols), already in the site's bit depth and polarity.
        row: the image's row of :func:`~medtransfer.datasets.synthetic.plan.plan_cases`.
        site: the acquiring site (modality, vendor tags, photometric interpretation, bits stored).
        cfg: the generator config (pixel spacing from its size; UIDs from its fingerprint).
    """
    sop_class = ComputedRadiographyImageStorage if site.modality == "CR" else DigitalXRayImageStorageForPresentation
    ds = _dataset(path, sop_class, _uid(cfg, row.patient, row.study, "image"))
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = row.date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "093000"
    ds.AccessionNumber = f"DEMOACC{row.patient:04d}{row.study}"
    ds.Modality, ds.Manufacturer, ds.ManufacturerModelName = site.modality, site.manufacturer, site.model
    ds.InstitutionName, ds.StationName = site.institution, site.station
    ds.StudyDescription, ds.BodyPartExamined, ds.ViewPosition = "CHEST", "CHEST", row.view
    ds.PatientName, ds.PatientID = f"DEMO^PATIENT{row.patient:04d}", f"DEMO-P{row.patient:04d}"
    ds.PatientSex, ds.PatientAge = row.sex, f"{row.age:03d}Y"
    ds.StudyInstanceUID = _uid(cfg, row.patient, row.study, "study")
    ds.SeriesInstanceUID = _uid(cfg, row.patient, row.study, "series")
    ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = str(row.study), 1, 1
    spacing = round(430.0 / cfg.size, 4)
    ds.PixelSpacing = ds.ImagerPixelSpacing = [spacing, spacing]
    if site.modality == "DX":
        ds.PresentationIntentType = "FOR PRESENTATION"
    top = 2**site.bits_stored - 1
    ds.WindowCenter, ds.WindowWidth = top // 2, top
    _set_pixels(ds, pixels, site.bits_stored, site.photometric)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write_extras(root: Path, cfg: SampleDataConfig) -> None:
    """Three 32x32x16 NIfTI volumes and an 8-slice CT series (HU = stored - 1024) for ingestion tests."""
    import nibabel as nib

    rng = np.random.default_rng([cfg.seed, 3])
    z, yy, xx = np.meshgrid(np.linspace(-1, 1, 16), np.linspace(-1, 1, 32), np.linspace(-1, 1, 32), indexing="ij")
    for k in range(3):
        vol = 100 * ellipse(xx, yy, 0, 0, 0.8, 0.9, 0.05) * (np.abs(z) < 0.9) + 50 * np.exp(
            -((xx - rng.uniform(-0.4, 0.4)) ** 2 + yy**2 + z**2) / 0.05) + rng.normal(0, 3, z.shape)
        img = nib.Nifti1Image(np.ascontiguousarray(vol.transpose(2, 1, 0), dtype=np.float32),
                              np.diag([1.5, 1.5, 3.0, 1.0]))
        (root / "nifti").mkdir(parents=True, exist_ok=True)
        nib.save(img, str(root / "nifti" / f"volume-{k + 1}.nii.gz"))
    hu = -1000 + 1040 * ellipse(xx, yy, 0, 0, 0.8, 0.7, 0.03) + 660 * ellipse(xx, yy, 0, 0.5, 0.12, 0.12, 0.1)
    for i in range(8):
        ds = _dataset(root / "ct_series", CTImageStorage, _uid(cfg, "ct", i))
        ds.Modality, ds.Manufacturer, ds.PatientID, ds.PatientName = "CT", "DEMO", "DEMO-CT0001", "DEMO^CT"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = _uid(cfg, "ct", "study"), _uid(cfg, "ct", "series")
        ds.StudyDate, ds.InstanceNumber, ds.SliceThickness = "20200101", i + 1, 2.5
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [-24.0, -24.0, 2.5 * i], [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.RescaleIntercept, ds.RescaleSlope = [1.5, 1.5], -1024, 1
        _set_pixels(ds, (hu[2 * i] + 1024 + rng.normal(0, 10, (32, 32))).clip(0).astype(np.int16), 16, "MONOCHROME2")
        (root / "ct_series").mkdir(parents=True, exist_ok=True)
        ds.save_as(root / "ct_series" / f"slice-{i + 1:02d}.dcm", enforce_file_format=True)


def _uid(cfg: SampleDataConfig, *parts: object) -> str:
    return generate_uid(entropy_srcs=["medtransfer-sample", cfg.fingerprint(), *map(str, parts)])


def _dataset(path: Path, sop_class: str, sop_uid: str) -> FileDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_uid
    return ds


def _set_pixels(ds: FileDataset, pixels: np.ndarray, bits_stored: int, photometric: str) -> None:
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(pixels.dtype.kind == "i")
    ds.PixelData = pixels.tobytes()
