"""Writers for the synthetic chest CT: a DICOM CT series per study and a NIfTI volume with the same geometry.

The array convention is medtransfer's (D, H, W): slices from inferior to superior, rows from anterior to
posterior, columns from the patient's right to left. With ImageOrientationPatient (1, 0, 0, 0, 1, 0) a slice's
rows run along +y (posterior) and its columns along +x (the patient's left) of the DICOM patient system (LPS),
and slice k lies at z = z0 + k * spacing; the NIfTI affine maps the same voxels to the same points in RAS.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.uid import CTImageStorage

from medtransfer.datasets.synthetic.writers import _dataset, _set_pixels


@dataclass(frozen=True)
class SeriesGeometry:
    """Where a volume's voxels are: position of the first voxel of slice 0 (LPS, mm) and the voxel size (mm)."""

    origin: tuple[float, float, float]  # ImagePositionPatient of the most inferior slice
    pixel: float  # PixelSpacing (rows and columns alike)
    spacing: float  # distance between slice centres along +z
    thickness: float  # SliceThickness (reconstructed slice profile; may exceed the spacing)

    def position(self, k: int) -> tuple[float, float, float]:
        """ImagePositionPatient of slice ``k`` (0 = most inferior)."""
        x, y, z = self.origin
        return x, y, round(z + k * self.spacing, 3)

    def ras_affine(self, shape: tuple[int, int, int]) -> np.ndarray:
        """Affine of the RAS+ array that :func:`to_ras` makes from a (D, H, W) volume of ``shape``.

        RAS voxel (i, j, k) is (D, H, W) voxel (k, H-1-j, W-1-i); its LPS centre is origin + (W-1-i) * pixel
        along x, (H-1-j) * pixel along y, k * spacing along z, and RAS = (-x, -y, z).
        """
        d, h, w = shape
        x0, y0, z0 = self.origin
        affine = np.diag([self.pixel, self.pixel, self.spacing, 1.0])
        affine[:3, 3] = [-(x0 + (w - 1) * self.pixel), -(y0 + (h - 1) * self.pixel), z0]
        return affine


def to_ras(volume: np.ndarray) -> np.ndarray:
    """(D, H, W) medtransfer volume → RAS+ array (i → R, j → A, k → S), the inverse of the NIfTI reader's turn.

    Columns run from the patient's right to left, so R grows as the column index falls; rows run from
    anterior to posterior, so A grows as the row index falls; slices already run inferior to superior.
    """
    return np.ascontiguousarray(volume.transpose(2, 1, 0)[::-1, ::-1, :])


def write_ct_series(folder: Path, stored: np.ndarray, geometry: SeriesGeometry, tags: dict[str, object],
                    uids: list[str], *, descending: bool) -> list[Path]:
    """Write one single-frame CT Image Storage file per slice; return the files.

    Args:
        folder: the series folder (created).
        stored: (D, H, W) stored pixel values (uint16 with RescaleIntercept -1024, or int16 with 0).
        geometry: slice positions and voxel size.
        tags: study/series/patient/equipment attributes shared by every slice (``RescaleIntercept``,
            ``BitsStored`` included).
        uids: SOPInstanceUID of each slice, in (D) order.
        descending: number the slices from the most superior (as many scanners do), else from the most
            inferior; readers must sort by position, not by InstanceNumber or file name.
    """
    folder.mkdir(parents=True, exist_ok=True)
    d = stored.shape[0]
    # One dataset per series, updated slice by slice: building ~60 elements per file costs more than writing it.
    ds = _dataset(folder / "IM-0001.dcm", CTImageStorage, uids[0])
    for key, value in tags.items():
        if key != "BitsStored":
            setattr(ds, key, value)
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [geometry.pixel, geometry.pixel]
    ds.SliceThickness = geometry.thickness
    _set_pixels(ds, stored[0], int(tags["BitsStored"]), "MONOCHROME2")  # type: ignore[call-overload]
    files = []
    for k in range(d):
        instance = d - k if descending else k + 1
        position = geometry.position(k)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uids[k]
        ds.InstanceNumber = instance
        ds.ImagePositionPatient = list(position)
        ds.SliceLocation = position[2]
        ds.PixelData = np.ascontiguousarray(stored[k]).tobytes()
        path = folder / f"IM-{instance:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def write_nifti(path: Path, hu: np.ndarray, geometry: SeriesGeometry) -> None:
    """Write the (D, H, W) HU volume as int16 NIfTI in RAS+ voxel order, qform and sform = scanner (mm)."""
    import nibabel as nib

    affine = geometry.ras_affine(hu.shape)
    img = nib.Nifti1Image(to_ras(hu.astype(np.int16)), affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header["descrip"] = b"medtransfer synthetic chest CT (DEMO)"
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
