"""``read_scan``: the one reader of a case (DICOM, NIfTI, PNG/JPEG), and ``load_case``, ``sniff_format``.

:func:`read_scan` is what training, evaluation, prediction and users' scripts all read scans with (the
:class:`~medtransfer.data.dataset.ScanDataset` caches its output): decode (DICOM with
:mod:`medtransfer.data.dicom`, keeping its geometry; NIfTI with MONAI's ``LoadImage``), then orientation,
spacing, intensity and resizing (:mod:`medtransfer.data.volumes`). :func:`load_case` is the same without the
resize, as a numpy array. Every failure is a :class:`~medtransfer.errors.ScanReadError` naming the file and
saying what to do; reasons carry no PHI (no header values other than technical ones such as sizes and transfer
syntaxes).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from medtransfer.data.dicom import (
    LUMA,
    decode_dicom,
    dicom_to_unit,
    int_tag,
    inverts,
    pixel_spacing,
    quiet_pydicom,
    scale_intensity,
)
from medtransfer.data.headers import sniff_format as sniff_format  # re-exported: header reading is torch-free
from medtransfer.data.spec import InputSpec
from medtransfer.data.volumes import check_voxels, finish_scan, read_nifti_values, why
from medtransfer.errors import ScanReadError

if TYPE_CHECKING:
    from monai.data import MetaTensor

logger = logging.getLogger(__name__)

FORMATS = ("dicom", "nifti", "png", "jpeg")


def read_scan(path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], spec: InputSpec | None = None, *,
              resize: bool | None = None, fmt: str | None = None, max_voxels: int | None = None) -> MetaTensor:
    """Read one scan the way training does: a float32 MONAI ``MetaTensor`` in [0, 1] with its affine.

    The pipeline (the same for every caller: :class:`~medtransfer.data.dataset.ScanDataset` caches exactly this):

    - **DICOM**: decoded by medtransfer's DICOM pipeline (transfer syntaxes, modality LUT, VOI, MONOCHROME1);
      a series (a folder or its files) and a multi-frame object with per-frame positions become a volume whose
      slices are sorted along their normal and checked to form one regular grid (no missing slice, even
      spacing, no gantry tilt), with the affine built from ImageOrientationPatient, ImagePositionPatient and
      PixelSpacing (LPS → RAS). A single frame (a radiograph, one CT slice) is an image.
    - **NIfTI**: MONAI ``LoadImage(reader="NibabelReader", ensure_channel_first=True)``; a file one voxel
      thick is an image.
    - **PNG/JPEG**: images (colour → grey luminance).
    - Volumes are then reoriented to ``spec.orientation`` in the (D, H, W) layout (RAS: slices inferior →
      superior, rows anterior → posterior, columns patient's right → left), resampled to ``spec.spacing``
      when set, scaled to [0, 1] (``spec.windows``, else ``spec.window``), and resized to ``spec.size``.

    Args:
        path: a file, a DICOM series folder, or the files of one series.
        spec: the preprocessing; None = the default :class:`InputSpec`, without resizing.
        resize: resize to exactly ``spec.size``; default: when ``spec`` is given. With ``resize`` a scan whose
            dimensionality is not ``spec``'s (a 2D image for a 3D size) is refused.
        fmt: ``"dicom"``, ``"nifti"``, ``"png"`` or ``"jpeg"``; default: sniffed from the content.
        max_voxels: refuse volumes with more voxels, checked from the header before decoding (None: no limit;
            indexing applies ``data.max_volume_voxels``).

    Returns:
        float32 MetaTensor (k, D, H, W) for volumes or (k, H, W) for images, k = number of ``spec.windows``
        or 1, values in [0, 1]; ``.affine`` maps voxel indices to RAS+ mm (images: pixel spacing only);
        ``.meta`` holds ``format``, ``original_shape`` (as stored), ``spacing`` (mm per axis of the result),
        ``source_spacing``, ``orientation``/``axcodes`` (volumes), ``intensity`` (what scaled the values),
        ``eight_bit``, and no PHI.

    Raises:
        ScanReadError: the scan cannot be used; the reason says why and what to do.

    Examples:
        >>> spec = InputSpec(size=(64, 224, 224), windows=("lung",))
        >>> ct = read_scan("chest_ct/series_003/", spec)  # doctest: +SKIP
        >>> ct.shape, ct.meta["axcodes"]  # doctest: +SKIP
        (torch.Size([1, 64, 224, 224]), 'SPL')
    """
    return _read_scan(path, spec, resize=resize, fmt=fmt, max_voxels=max_voxels)


def _read_scan(path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], spec: InputSpec | None, *,
               resize: bool | None = None, fmt: str | None = None, max_voxels: int | None = None,
               raw: bool = False) -> MetaTensor:
    """:func:`read_scan`; ``raw`` keeps the modality values (HU, NIfTI values as stored) instead of scaling
    them, and never resizes (for geometry checks against other converters)."""
    import torch
    from monai.data import MetaTensor

    files = [Path(path)] if isinstance(path, (str, os.PathLike)) else [Path(p) for p in path]
    if not files:
        raise ScanReadError("<no files>", "no files were given for this case")
    resize = (spec is not None if resize is None else resize) and not raw
    spec = spec or InputSpec()
    where = files[0] if len(files) == 1 else files[0].parent
    kind = str(fmt).lower() if fmt else ("dicom" if len(files) > 1 or files[0].is_dir() else sniff_format(files[0]))
    if kind is None:
        raise ScanReadError(str(where), "not a recognised scan (DICOM, NIfTI, PNG or JPEG)")
    modality = raw or bool(spec.windows)  # modality values go through the geometry, windows come after
    windows = None if raw or not spec.windows else spec.window_values()
    meta: dict[str, object] = {"format": kind, "raw": raw}
    if kind == "dicom":
        if len(files) == 1 and files[0].is_dir():
            files = _series_files(files[0])
        if max_voxels is not None:
            _check_dicom_voxels(files, where, max_voxels)
        pixels = decode_dicom(files)
        invert = inverts(pixels, spec)
        if modality:
            values = pixels.values
            if float(values.max()) == float(values.min()):
                raise ScanReadError(str(where), f"constant image: every pixel is {float(values.min()):g} after "
                                    "decoding")
            meta["intensity"] = "modality values" if raw else "windows " + ", ".join(spec.windows)
        else:
            values, info = dicom_to_unit(pixels, spec)
            meta["intensity"] = info["window"]
        meta["original_shape"] = tuple(values.shape[1:] if pixels.single else values.shape)
        geometry = pixels.geometry
        if pixels.single:
            x = MetaTensor(torch.from_numpy(values), affine=_pixel_affine(pixels.ref))
        else:
            affine = geometry.affine if geometry is not None else _stored_affine(pixels.ref)
            x = MetaTensor(torch.from_numpy(values)[None], affine=torch.as_tensor(affine))
            if geometry is not None:
                meta["obliquity"] = round(geometry.obliquity, 3)
        del pixels, values
        return finish_scan(x, spec, where=str(where), resize=resize, reorient=geometry is not None,
                           windows=windows, invert=invert, meta=meta)
    if kind not in FORMATS:
        raise ScanReadError(str(where), f"unknown format '{fmt}'; expected one of {', '.join(FORMATS)}")
    if len(files) > 1:
        raise ScanReadError(str(where), f"a {kind} case is one file, got {len(files)}")
    if files[0].is_dir():
        raise ScanReadError(str(where), f"is a folder, not a {kind} file")
    if kind == "nifti":
        x = read_nifti_values(files[0], max_voxels=max_voxels)
        meta["original_shape"] = tuple(int(s) for s in x.shape[1:])
        if not modality:
            scaled, meta["intensity"] = scale_intensity(x.as_tensor().numpy(), spec)
            x = MetaTensor(torch.from_numpy(scaled), affine=x.affine)
        else:
            meta["intensity"] = "stored values" if raw else "windows " + ", ".join(spec.windows)
        return finish_scan(x, spec, where=str(where), resize=resize, reorient=True, windows=windows, meta=meta)
    if spec.windows:
        raise ScanReadError(str(where), f"input.windows are CT windows in Hounsfield units, but a {kind.upper()} "
                            "file holds display values; use DICOM or NIfTI CT scans, or leave input.windows empty")
    image, meta["intensity"] = _load_picture(files[0], spec)
    meta["original_shape"] = tuple(image.shape)
    return finish_scan(MetaTensor(torch.from_numpy(image)[None]), spec, where=str(where), resize=resize,
                       reorient=False, windows=None, meta=meta)


def load_case(paths: Sequence[Path] | Path, fmt: str, spec: InputSpec) -> np.ndarray:
    """Decode one case to float32 (C, *spatial) scaled to [0, 1] per ``spec``; oriented, not resized or normalised.

    This is :func:`read_scan` without the resize (``resize=False``), as a numpy array.

    Args:
        paths: one file, or the slices of one DICOM series (a folder is read as the series of its files).
        fmt: ``"dicom"``, ``"nifti"``, ``"png"`` or ``"jpeg"`` (see :func:`sniff_format`).
        spec: intensity window, MONOCHROME1 policy, orientation and spacing.

    Returns:
        float32 (C, H, W) for images (colour converted to grey luminance, ITU-R BT.601), (C, D, H, W) for
        volumes (multi-frame DICOM, DICOM series, 3D NIfTI), C = ``spec.intensity_channels``; finite, not
        constant, in [0, 1].

    Raises:
        ScanReadError: unreadable/truncated/empty file, no pixel data, non-image DICOM, missing codec (the
            reason names ``pip install "medtransfer[dicom-codecs]"``), constant or all-NaN image,
            unsupported photometric interpretation, 4D NIfTI, mixed slice sizes, orientations or series,
            missing slices, uneven spacing, gantry tilt.

    Examples:
        >>> x = load_case(Path("cxr/IM-0001.dcm"), "dicom", InputSpec())  # doctest: +SKIP
        >>> x.shape, x.dtype
        ((1, 2048, 2048), dtype('float32'))
    """
    kind = str(fmt).lower()
    if kind not in FORMATS:
        files = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
        where = files[0] if len(files) == 1 else files[0].parent if files else "<no files>"
        raise ScanReadError(str(where), f"unknown format '{fmt}'; expected one of {', '.join(FORMATS)}")
    return read_scan(paths, spec, resize=False, fmt=kind).as_tensor().numpy()


def _pixel_affine(ds: object) -> object:
    """4x4 affine of a single DICOM image: its pixel spacing (rows, columns) on the diagonal."""
    import torch

    row, col = pixel_spacing(ds, 0)  # type: ignore[arg-type]
    return torch.diag(torch.tensor([row, col, 1.0, 1.0], dtype=torch.float64))


def _stored_affine(ds: object) -> np.ndarray:
    """Frames without positions: kept as stored, with the pixel spacing and 1 mm between frames (no anatomy)."""
    row, col = pixel_spacing(ds, 0)  # type: ignore[arg-type]
    return np.diag([1.0, row, col, 1.0])


def _check_dicom_voxels(files: list[Path], where: Path, max_voxels: int) -> None:
    """Voxel count from the first file's header (slices x Rows x Columns, or frames), before any decoding."""
    import pydicom

    try:
        with quiet_pydicom():
            ds = pydicom.dcmread(files[0], stop_before_pixels=True, force=True)
            rows, cols = int_tag(ds, "Rows", 0) or 0, int_tag(ds, "Columns", 0) or 0
            frames = int_tag(ds, "NumberOfFrames", 1) or 1
    except Exception:  # noqa: BLE001 - unreadable: decoding says why
        return
    depth = len(files) if len(files) > 1 else frames
    check_voxels(str(where), (depth, rows, cols), max_voxels)


def _series_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ScanReadError(str(folder), "folder holds no files; a DICOM series folder must contain its slices")
    return files


def _load_picture(path: Path, spec: InputSpec) -> tuple[np.ndarray, str]:
    """PNG/JPEG → float32 (H, W) in [0, 1] and how it was scaled; 8-bit divided by 255 under ``window="file"``,
    16-bit by percentiles."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            values, natural_max = _picture_values(im)
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError) as exc:
        raise ScanReadError(str(path), f"not a readable image ({type(exc).__name__}: {why(exc, path)})") from exc
    if float(values.max()) == float(values.min()):
        raise ScanReadError(str(path), f"constant image: every pixel is {float(values.min()):g}")
    return scale_intensity(values, spec, natural_max=natural_max)


def _picture_values(im: object) -> tuple[np.ndarray, float | None]:
    """Grey float32 (H, W) values and their natural maximum (255 for 8-bit; None for 16-bit/float)."""
    mode = im.mode  # type: ignore[attr-defined]
    if mode.startswith("I") or mode == "F":  # 16/32-bit integer or float grey
        return np.asarray(im, dtype=np.float32), None
    if mode in ("L", "1", "LA"):
        return np.asarray(im.convert("L"), dtype=np.float32), 255.0  # type: ignore[attr-defined]
    rgb = np.asarray(im.convert("RGB"), dtype=np.float32)  # type: ignore[attr-defined]
    return rgb @ LUMA, 255.0
