"""Decode one case to a float32 array (C, *spatial) in [0, 1]: the format dispatch for DICOM, NIfTI and PNG/JPEG.

Nothing here resizes or normalises: that is :mod:`medtransfer.data.transforms`. Every failure is a
:class:`~medtransfer.errors.ScanReadError` naming the file and saying what to do; reasons carry no PHI
(no header values other than technical ones such as sizes and transfer syntaxes).
"""

from __future__ import annotations

import gzip
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from medtransfer.data.dicom import LUMA, looks_like_raw_dicom, read_dicom_pixels, scale_intensity
from medtransfer.data.spec import InputSpec
from medtransfer.errors import ScanReadError

logger = logging.getLogger(__name__)

FORMATS = ("dicom", "nifti", "png", "jpeg")
_NIFTI_MAGIC = {348: (344, (b"n+1\0", b"ni1\0")), 540: (4, (b"n+2\0", b"ni2\0"))}
_HEAD_BYTES = 544


def sniff_format(path: str | os.PathLike[str]) -> str | None:
    """Guess a file's format from its content, not its name.

    Returns:
        ``"dicom"`` ('DICM' at offset 128, or a raw dataset that pydicom parses), ``"nifti"`` (NIfTI-1/2,
        gzipped or not), ``"png"``, ``"jpeg"``, or ``None`` (not a scan, or unreadable).

    Examples:
        >>> sniff_format("scans/IM-0001")  # doctest: +SKIP
        'dicom'
    """
    path = Path(path)
    try:
        if not path.is_file():
            return None
        with open(path, "rb") as fh:
            head = fh.read(_HEAD_BYTES)
    except OSError:
        return None
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if _is_nifti_header(head) or (head[:2] == b"\x1f\x8b" and _is_nifti_header(_gunzip_head(path))):
        return "nifti"
    if looks_like_raw_dicom(head) and _parses_as_dicom(path):
        return "dicom"
    return None


def load_case(paths: Sequence[Path] | Path, fmt: str, spec: InputSpec) -> np.ndarray:
    """Decode one case to float32 (C, *spatial) scaled to [0, 1] per ``spec.window``; not resized or normalised.

    Args:
        paths: one file, or the slices of one DICOM series (a folder is read as the series of its files).
        fmt: ``"dicom"``, ``"nifti"``, ``"png"`` or ``"jpeg"`` (see :func:`sniff_format`).
        spec: intensity window and MONOCHROME1 policy.

    Returns:
        float32 (1, H, W) for images (colour converted to grey luminance, ITU-R BT.601), (1, D, H, W) for
        volumes (multi-frame DICOM, DICOM series, 3D NIfTI); finite, not constant, in [0, 1].

    Raises:
        ScanReadError: unreadable/truncated/empty file, no pixel data, non-image DICOM, missing codec (the
            reason names ``pip install "medtransfer[dicom-codecs]"``), constant or all-NaN image,
            unsupported photometric interpretation, 4D NIfTI, mixed slice sizes or orientations.

    Examples:
        >>> x = load_case(Path("cxr/IM-0001.dcm"), "dicom", InputSpec())  # doctest: +SKIP
        >>> x.shape, x.dtype
        ((1, 2048, 2048), dtype('float32'))
    """
    files = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
    if not files:
        raise ScanReadError("<no files>", "no files were given for this case")
    kind = str(fmt).lower()
    where = files[0] if len(files) == 1 else files[0].parent
    if kind == "dicom":
        if len(files) == 1 and files[0].is_dir():
            files = _series_files(files[0])
        array, _ = read_dicom_pixels(files, spec)
    elif kind not in FORMATS:
        raise ScanReadError(str(where), f"unknown format '{fmt}'; expected one of {', '.join(FORMATS)}")
    elif len(files) > 1:
        raise ScanReadError(str(where), f"a {kind} case is one file, got {len(files)}")
    elif files[0].is_dir():
        raise ScanReadError(str(where), f"is a folder, not a {kind} file")
    elif kind == "nifti":
        array = _load_nifti(files[0], spec)
    else:
        array = _load_picture(files[0], spec)
    return _finalise(array, where)


def _finalise(array: np.ndarray, where: Path) -> np.ndarray:
    """Check the decoded (H, W) or (D, H, W) array and add the channel axis."""
    if not np.isfinite(array).all():  # scaling keeps finite input finite; this guards our own bugs
        raise ScanReadError(str(where), "decoding produced non-finite values")
    if float(array.max()) - float(array.min()) < 1e-6:
        raise ScanReadError(str(where), "constant image after intensity scaling (no contrast to learn from)")
    return np.clip(array.astype(np.float32, copy=False), 0.0, 1.0)[None]


def _series_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ScanReadError(str(folder), "folder holds no files; a DICOM series folder must contain its slices")
    return files


def _load_nifti(path: Path, spec: InputSpec) -> np.ndarray:
    """NIfTI → float32 (H, W) or (D, H, W) in [0, 1], oriented like an axial DICOM series.

    nibabel reorients to RAS+ (the closest canonical orientation, as MONAI's ``Orientation("RAS")``), then
    the axes become (S, A→P, R→L): slices from inferior to superior, rows anterior to posterior and columns
    from the patient's right to left, i.e. the radiological view a DICOM axial series gives.
    """
    import nibabel as nib

    try:
        img = nib.load(str(path))
        shape = img.shape
        if len(shape) > 3 and any(s > 1 for s in shape[3:]):
            raise ScanReadError(str(path), f"4D NIfTI {tuple(shape)} (a time series or several channels); "
                                "save one 3D volume per case")
        data = np.asarray(img.get_fdata(dtype=np.float32)).reshape(*shape[:3], *([1] * (3 - len(shape))))
        ornt = nib.orientations.io_orientation(img.affine)
        data = nib.orientations.apply_orientation(data, ornt)
    except ScanReadError:
        raise
    except Exception as exc:  # nibabel raises assorted types for corrupt or truncated files
        raise ScanReadError(str(path), f"not a readable NIfTI file ({type(exc).__name__}: {_why(exc, path)})") from exc
    volume = _ras_to_dhw(data)
    volume = _replace_non_finite(volume, path)
    if float(volume.max()) == float(volume.min()):
        raise ScanReadError(str(path), f"constant image: every voxel is {float(volume.min()):g}")
    scaled, _ = scale_intensity(volume, spec)
    return scaled


def _ras_to_dhw(data: np.ndarray) -> np.ndarray:
    """RAS+ (i→R, j→A, k→S) array → (D, H, W) = (S, A→P, R→L); a single slice becomes (H, W)."""
    vol = np.ascontiguousarray(data.transpose(2, 1, 0)[:, ::-1, ::-1])
    d, h, w = vol.shape
    if d == 1:
        return vol[0]
    if h == 1:  # one coronal slice: superior at the top
        return np.ascontiguousarray(vol[::-1, 0, :])
    if w == 1:  # one sagittal slice: superior at the top, anterior on the left
        return np.ascontiguousarray(vol[::-1, :, 0])
    return vol


def _replace_non_finite(volume: np.ndarray, path: Path) -> np.ndarray:
    finite = np.isfinite(volume)
    if finite.all():
        return volume
    if not finite.any():
        raise ScanReadError(str(path), "every voxel is NaN or infinite; the file holds no image")
    lo, hi = float(volume[finite].min()), float(volume[finite].max())
    logger.info("%s: %d non-finite voxels replaced (NaN/-inf by %g, +inf by %g)", path.name, (~finite).sum(), lo, hi)
    return np.nan_to_num(volume, nan=lo, posinf=hi, neginf=lo)


def _load_picture(path: Path, spec: InputSpec) -> np.ndarray:
    """PNG/JPEG → float32 (H, W) in [0, 1]; 8-bit divided by 255 under ``window="file"``, 16-bit by percentiles."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            values, natural_max = _picture_values(im)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError) as exc:
        raise ScanReadError(str(path), f"not a readable image ({type(exc).__name__}: {_why(exc, path)})") from exc
    if float(values.max()) == float(values.min()):
        raise ScanReadError(str(path), f"constant image: every pixel is {float(values.min()):g}")
    scaled, _ = scale_intensity(values, spec, natural_max=natural_max)
    return scaled


def _picture_values(im: object) -> tuple[np.ndarray, float | None]:
    """Grey float32 (H, W) values and their natural maximum (255 for 8-bit; None for 16-bit/float)."""
    mode = im.mode  # type: ignore[attr-defined]
    if mode.startswith("I") or mode == "F":  # 16/32-bit integer or float grey
        return np.asarray(im, dtype=np.float32), None
    if mode in ("L", "1", "LA"):
        return np.asarray(im.convert("L"), dtype=np.float32), 255.0  # type: ignore[attr-defined]
    rgb = np.asarray(im.convert("RGB"), dtype=np.float32)  # type: ignore[attr-defined]
    return rgb @ LUMA, 255.0


def _why(exc: BaseException, path: Path) -> str:
    """A library's error text on one line, with the file's absolute path (the data folder's location, which
    reasons in quarantine.csv never show) cut down to its name."""
    return " ".join(str(exc).replace(str(path), path.name).split())


def _is_nifti_header(head: bytes) -> bool:
    if len(head) < 348:
        return False
    for order in ("little", "big"):
        size = int.from_bytes(head[:4], order)  # type: ignore[arg-type]
        if size in _NIFTI_MAGIC and len(head) >= size:
            offset, magics = _NIFTI_MAGIC[size]
            return head[offset : offset + 4] in magics
    return False


def _gunzip_head(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") as fh:
            return fh.read(_HEAD_BYTES)
    except (OSError, EOFError):
        return b""


def _parses_as_dicom(path: Path) -> bool:
    """A raw dataset (no preamble) counts as DICOM when pydicom parses it and it names a SOP class or image."""
    import pydicom

    from medtransfer.data.dicom import quiet_pydicom

    try:
        with quiet_pydicom():  # its messages can quote raw (PHI) values
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
            return any(k in ds for k in ("SOPClassUID", "Modality", "Rows", "StudyInstanceUID"))
    except Exception:  # anything pydicom cannot parse is simply not DICOM here
        return False
