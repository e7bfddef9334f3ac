"""The geometry and intensity steps of :func:`medtransfer.read_scan`, on MONAI ``MetaTensor``\\ s.

:func:`medtransfer.data.loading.read_scan` decodes a case (DICOM with :mod:`medtransfer.data.dicom`, NIfTI with
MONAI's ``LoadImage`` here) and hands its values, with their affine, to :func:`finish_scan`:

1. **Orientation** (volumes): MONAI ``Orientation`` to the (D, H, W) layout of ``spec.orientation``
   (:func:`layout_axcodes`: for RAS, slices inferior → superior, rows anterior → posterior, columns from the
   patient's right to left, i.e. an axial DICOM series as a radiologist sees it). Orienting straight to that
   layout is MONAI's ``Orientation("RAS")`` followed by the fixed transpose and flips, in one copy instead of two;
   MONAI updates the affine, which then maps (d, h, w) indices to RAS+ millimetres.
2. **Spacing** (volumes, optional): MONAI ``Spacing`` to ``spec.spacing`` mm, bilinear, in (D, H, W) order.
3. **Intensity**: the CT windows of ``spec.windows`` on the modality values (one channel each), or the values
   the reader already scaled to [0, 1] (``spec.window``: the DICOM VOI, fixed, min-max or percentiles).
4. **Resize** to exactly ``spec.size`` (:class:`~medtransfer.data.transforms.FitResized`: area averaging when
   shrinking, (tri|bi)linear when enlarging, ``keep_aspect`` pads), one channel at a time, so that a volume
   is held at full resolution once, as one float32 channel (a 512x512x300 CT: 300 MB), never k of them.

Nothing here reads PHI into the result: the meta dict is built from scratch (no file name, no header dump).
"""

from __future__ import annotations

import functools
import logging
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor

from medtransfer.data.dicom import window_to_unit
from medtransfer.data.headers import too_large_reason
from medtransfer.data.spec import InputSpec
from medtransfer.data.transforms import FitResized
from medtransfer.errors import ScanReadError

logger = logging.getLogger(__name__)

_OPPOSITE = dict(zip("LRAPSI", "RLPAIS", strict=True))


def layout_axcodes(orientation: str) -> str:
    """The axcode of the (D, H, W) array for volumes oriented to ``orientation``.

    D runs along ``orientation[2]``, H against ``orientation[1]`` and W against ``orientation[0]``, so RAS gives
    ``"SPL"``: slices from inferior to superior, rows from anterior to posterior, columns from the patient's right
    to left (the radiological view of an axial series).

    Examples:
        >>> layout_axcodes("RAS"), layout_axcodes("LPS")
        ('SPL', 'SAR')
    """
    code = orientation.upper()
    return code[2] + _OPPOSITE[code[1]] + _OPPOSITE[code[0]]


def read_nifti_values(path: Path, *, max_voxels: int | None = None) -> MetaTensor:
    """A NIfTI file as float32 (1, i, j, k) values as stored (``scl_slope``/``scl_inter`` applied), with its affine.

    Read with MONAI's ``LoadImage(reader="NibabelReader", ensure_channel_first=True)``; 2D files get k = 1.
    Non-finite voxels are replaced by the finite range (logged); the meta dict holds the affine only.

    Raises:
        ScanReadError: unreadable or truncated file, 4D data, more voxels than ``max_voxels``, all voxels
            non-finite, or a constant image.
    """
    import nibabel as nib

    try:
        shape = tuple(int(s) for s in nib.load(str(path)).shape)
    except Exception as exc:  # nibabel raises assorted types for corrupt or truncated files
        raise ScanReadError(str(path), f"not a readable NIfTI file ({type(exc).__name__}: {why(exc, path)})") from exc
    if len(shape) > 3 and any(s > 1 for s in shape[3:]):
        raise ScanReadError(str(path), f"4D NIfTI {shape} (a time series or several channels); "
                            "save one 3D volume per case")
    spatial = (*shape[:3], *([1] * (3 - len(shape[:3]))))
    check_voxels(str(path), spatial, max_voxels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # header fixes MONAI reports; the result is what matters
            loaded = _nifti_loader()(str(path))
    except Exception as exc:  # truncated data, bad compression...: the file is unreadable
        raise ScanReadError(str(path), f"not a readable NIfTI file ({type(exc).__name__}: {why(exc, path)})") from exc
    values = loaded.as_tensor().reshape(1, *spatial).numpy()
    values = replace_non_finite(values, path)
    if float(values.max()) == float(values.min()):
        raise ScanReadError(str(path), f"constant image: every voxel is {float(values.min()):g}")
    return MetaTensor(torch.from_numpy(values), affine=torch.as_tensor(np.asarray(loaded.affine), dtype=torch.float64))


@functools.lru_cache(maxsize=1)
def _nifti_loader() -> Any:
    """One MONAI ``LoadImage`` per process: constructing one instantiates every MONAI reader, which costs time
    and made MONAI's pydicom plugin log "nvImageCodec is not available" once per scan read (silenced below)."""
    from monai.transforms import LoadImage

    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)  # a GPU decoder we do not use
    return LoadImage(reader="NibabelReader", image_only=True, ensure_channel_first=True, dtype=np.float32)


def check_voxels(where: str, shape: Sequence[int], max_voxels: int | None) -> None:
    """Refuse, before decoding, a scan with more voxels than ``max_voxels`` (None: no limit).

    Raises:
        ScanReadError: naming the size, the limit and how to raise it.
    """
    count = math.prod(int(s) for s in shape)
    if max_voxels is not None and count > max_voxels:
        shown = "x".join(str(int(s)) for s in shape)
        raise ScanReadError(where, too_large_reason(shown, count, max_voxels))


def finish_scan(x: MetaTensor, spec: InputSpec, *, where: str, resize: bool, reorient: bool,
                windows: Sequence[tuple[float, float]] | None, invert: bool = False,
                meta: dict[str, Any] | None = None) -> MetaTensor:
    """Orientation, spacing, intensity and resize: decoded values → the MetaTensor :func:`read_scan` returns.

    Args:
        x: float32 (1, a, b, c) volume (values with their affine, array axes as decoded) or (1, H, W) image.
        spec: orientation, spacing, windows, size and ``keep_aspect``.
        where: the case, for error messages.
        resize: resize to exactly ``spec.size`` (and refuse a scan whose dimensionality is not ``spec``'s).
        reorient: apply ``spec.orientation`` (False when the decoder knows no geometry: frames stay as stored).
        windows: ``(centre, width)`` per output channel applied to ``x``'s modality values, or None when ``x``
            already holds [0, 1] values (or, with ``meta["raw"]``, values to keep as they are).
        invert: with ``windows``, show MONOCHROME1 data with MONOCHROME2 polarity (``1 - window``).
        meta: entries for the result's meta dict (format, original_shape, ...).

    Returns:
        float32 MetaTensor (k, D, H, W) or (k, H, W), k = ``len(windows)`` or 1, in [0, 1], whose affine maps
        voxel indices to RAS+ mm; meta: ``spacing`` (mm per spatial axis of the result), ``source_spacing``
        (before spacing and resizing), ``orientation`` and ``axcodes`` (volumes), ``eight_bit`` (the values
        hold only the 256 levels of an 8-bit source) and what ``meta`` gave.
    """
    info = dict(meta or {})
    raw = bool(info.pop("raw", False))
    if x.ndim == 4:
        if reorient:
            from monai.transforms import Orientation

            x = Orientation(axcodes=layout_axcodes(spec.orientation), labels=None)(x)
        x = _as_image_if_flat(x)
    source_spacing = voxel_sizes(x)
    if x.ndim == 4 and spec.spacing is not None:
        from monai.transforms import Spacing

        x = Spacing(pixdim=tuple(spec.spacing), mode="bilinear", padding_mode="border")(x)
    dims = x.ndim - 1
    if resize and dims != spec.spatial_dims:
        raise ScanReadError(where, dims_reason(tuple(x.shape[1:]), spec))
    affine = torch.as_tensor(x.affine, dtype=torch.float64).clone()
    values = np.ascontiguousarray(x.as_tensor().numpy(), dtype=np.float32)
    del x
    channels: list[torch.Tensor] = []
    eight_bit = not raw
    resizer = FitResized("image", spec.size, keep_aspect=spec.keep_aspect) if resize else None
    flat = 0
    for centre_width in windows if windows else (None,):
        if centre_width is None:
            channel = values
            if not raw:
                _check_unit(channel, where)
        else:
            channel = window_to_unit(values, *centre_width, "LINEAR_EXACT")
            if invert:
                np.subtract(1.0, channel, out=channel)
        if not raw:
            eight_bit = eight_bit and holds_8bit_values(channel)
            flat += float(channel.max()) - float(channel.min()) < 1e-6
        tensor = MetaTensor(torch.from_numpy(channel), affine=affine)
        if resizer is not None:
            tensor = resizer._fit(tensor)
        channels.append(tensor)
        del channel
    if windows and flat == len(windows):
        names = ", ".join(f"{c:g}/{w:g}" for c, w in windows)
        raise ScanReadError(where, f"every window ({names} HU) maps the whole scan to one value: its values are "
                            "not CT Hounsfield units; leave input.windows empty (input.window: percentile) for MR "
                            "and other modalities")
    del values
    out_affine = torch.as_tensor(channels[0].affine, dtype=torch.float64).clone()
    data = channels[0].as_tensor() if len(channels) == 1 else torch.cat([c.as_tensor() for c in channels])
    data = data.to(torch.float32).contiguous()
    info.update(spacing=voxel_sizes(MetaTensor(data, affine=out_affine)), source_spacing=source_spacing,
                eight_bit=bool(eight_bit))
    if data.ndim == 4:
        info.update(orientation=spec.orientation if reorient else "unknown", axcodes=_axcodes(out_affine))
    return MetaTensor(data, affine=out_affine, meta=info)


def _check_unit(values: np.ndarray, where: str) -> None:
    """Scaled values: finite, not constant, and clipped to [0, 1] in place."""
    if not np.isfinite(values).all():  # scaling keeps finite input finite; this guards our own bugs
        raise ScanReadError(where, "decoding produced non-finite values")
    if float(values.max()) - float(values.min()) < 1e-6:
        raise ScanReadError(where, "constant image after intensity scaling (no contrast to learn from)")
    np.clip(values, 0.0, 1.0, out=values)


def _as_image_if_flat(x: MetaTensor) -> MetaTensor:
    """A volume one voxel thick along an axis is an image: (1, 1, H, W) → (1, H, W); one coronal or sagittal
    slice, (1, D, 1, W) or (1, D, H, 1), is shown with superior at the top. The affine follows (4x4, with the
    dropped axis as its third column)."""
    d, h, w = (int(s) for s in x.shape[1:])
    if d != 1 and h != 1 and w != 1:
        return x
    axes, flip_rows = ((1, 2), False) if d == 1 else ((0, 2), True) if h == 1 else ((0, 1), True)
    dropped = ({0, 1, 2} - set(axes)).pop()
    arr = x.as_tensor()[0]
    image = arr.squeeze(dropped)
    old = np.asarray(x.affine, dtype=np.float64)
    index = np.zeros((4, 4))  # new (row, col, 0, 1) → old (d, h, w, 1)
    index[axes[0], 0], index[axes[1], 1], index[dropped, 2], index[3, 3] = 1.0, 1.0, 1.0, 1.0
    if flip_rows:
        image = torch.flip(image, dims=(0,))
        index[axes[0], 0], index[axes[0], 3] = -1.0, float(x.shape[1 + axes[0]] - 1)
    return MetaTensor(image.unsqueeze(0).contiguous(), affine=torch.as_tensor(old @ index))


def voxel_sizes(x: MetaTensor) -> tuple[float, ...]:
    """Voxel size in mm along each spatial axis of ``x`` (the norms of its affine's columns)."""
    affine = np.asarray(x.affine, dtype=np.float64)
    dims = x.ndim - 1
    return tuple(round(float(np.linalg.norm(affine[:3, i])), 6) for i in range(dims))


def _axcodes(affine: torch.Tensor) -> str:
    import nibabel as nib

    return "".join(str(c) for c in nib.aff2axcodes(np.asarray(affine, dtype=np.float64)))


def dims_reason(shape: tuple[int, ...], spec: InputSpec) -> str:
    """The reason a scan of spatial ``shape`` cannot be used with ``spec`` (2D image vs volume)."""
    kind = "a volume" if len(shape) == 3 else "a 2D image"
    return (f"{kind} {shape}, but input.size {tuple(spec.size)} is {spec.spatial_dims}D; set input.size to "
            f"{'(D, H, W)' if len(shape) == 3 else '(H, W)'}")


def holds_8bit_values(array: np.ndarray) -> bool:
    """Whether a decoded [0, 1] image holds only the 256 levels of an 8-bit source (k / 255).

    Checked in chunks of 1M values, stopping at the first that is not (a CT volume fails in its first chunk),
    so a large volume costs no full-size temporaries.
    """
    flat = np.ravel(np.asarray(array, dtype=np.float32))
    for start in range(0, flat.size, 1 << 20):
        scaled = flat[start:start + (1 << 20)] * np.float32(255.0)
        if np.abs(scaled - np.round(scaled)).max(initial=0.0) >= 1e-3:
            return False
    return True


def replace_non_finite(volume: np.ndarray, path: Path) -> np.ndarray:
    """NaN/-inf → the finite minimum, +inf → the finite maximum (logged); refuses an all-non-finite image."""
    finite = np.isfinite(volume)
    if finite.all():
        return volume
    if not finite.any():
        raise ScanReadError(str(path), "every voxel is NaN or infinite; the file holds no image")
    lo, hi = float(volume[finite].min()), float(volume[finite].max())
    logger.info("%s: %d non-finite voxels replaced (NaN/-inf by %g, +inf by %g)", path.name, (~finite).sum(), lo, hi)
    return np.nan_to_num(volume, nan=lo, posinf=hi, neginf=lo)


def why(exc: BaseException, path: Path) -> str:
    """A library's error text on one line (at most 200 characters), with the file's absolute path (the data
    folder's location, which reasons in quarantine.csv never show) cut down to its name."""
    text = " ".join(str(exc).replace(str(path), path.name).split())
    return text[:200] + ("..." if len(text) > 200 else "")
