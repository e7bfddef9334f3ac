"""X-ray-aware DICOM pixel pipeline: stored values → modality values → VOI → [0, 1] → polarity.

The order is the DICOM grayscale pipeline (PS3.3 C.11, PS3.4 N.2.1.1), and it is the product's core promise:

1. **Stored values**: decoded pixel data with the unused high bits masked and signed values sign-extended
   (PS3.5 8.1.1; done by pydicom's decoders). Colour images are converted to grey luminance here.
2. **Modality LUT** (PS3.3 C.11.1): ``RescaleSlope``/``RescaleIntercept`` (per frame from the functional
   groups of enhanced multi-frame objects, PS3.3 C.7.6.16.2.9) or the Modality LUT Sequence, giving
   modality units (Hounsfield units for CT).
3. **VOI LUT** (PS3.3 C.11.2), in modality units: the VOI LUT Sequence, or ``WindowCenter``/``WindowWidth``
   with ``VOILUTFunction`` LINEAR (C.11.2.1.2.1), LINEAR_EXACT (C.11.2.1.3.2) or SIGMOID (C.11.2.1.3.1),
   or the window chosen by :class:`InputSpec` (fixed, min-max, percentiles). The output is scaled to [0, 1].
4. **Polarity** (PS3.3 C.7.6.3.1.2): MONOCHROME1 shows the minimum value as white. The window is applied in
   MONOCHROME1 modality space first and the result is inverted (``1 - x``) afterwards, so a model always sees
   MONOCHROME2 polarity (bone bright). A MONOCHROME1 twin of a MONOCHROME2 image gives the same array.

Only this module reads pixel data; headers are read elsewhere with ``stop_before_pixels``.

It also owns the geometry of slice stacks (series of single-frame files and multi-frame objects with per-frame
positions, PS3.3 C.7.6.2.1.1): the slice order along the normal, the checks that the slices form one regular
grid (no missing slice, no uneven spacing, no gantry tilt or shear) and the voxel-to-patient affine, converted
from DICOM's LPS to the RAS+ convention of NIfTI and MONAI.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, get_decoder
from pydicom.pixels.utils import get_expected_length
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from medtransfer.data.spec import InputSpec
from medtransfer.errors import ScanReadError

logger = logging.getLogger(__name__)

CODECS_HINT = 'Install the decoders with: pip install "medtransfer[dicom-codecs]"'
#: Refuse images declaring more samples than this (1 Gi samples = 4 GiB as float32) before allocating.
MAX_SAMPLES = 1 << 30
_GREY = ("MONOCHROME1", "MONOCHROME2")
#: Colour interpretations that pydicom's decoders turn into RGB (YBR_* → RGB, PS3.3 C.7.6.3.1.2) or that
#: a palette maps to RGB (PS3.3 C.7.6.3.1.5). Anything else (YBR_PARTIAL_*, CMYK, ARGB...) is refused.
_COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT", "PALETTE COLOR")
#: ITU-R BT.601 luma weights (the same as Pillow's ``convert("L")``).
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
#: SOP classes that carry no image a classifier could use (documents, reports, RT plans, segmentations...).
_NON_IMAGE_SOP_PREFIXES = (
    "1.2.840.10008.1.3.10",  # Media Storage Directory (DICOMDIR)
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports
    "1.2.840.10008.5.1.4.1.1.9.",  # waveforms (ECG, audio...)
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated PDF/CDA/STL
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, spatial registration, segmentation, fiducials
    "1.2.840.10008.5.1.4.1.1.481.",  # RT objects (RT Image, 481.1, is allowed below)
)
_RT_IMAGE = "1.2.840.10008.5.1.4.1.1.481.1"
#: pydicom's warning when a file ends inside an undefined-length element (its text follows; no path kept).
_CUT_SHORT = "End of file reached before delimiter"
_inversion_logged = False


@dataclass
class _Decoded:
    """Modality values of one file: float32 (F, H, W), the output photometric and the colour range."""

    values: np.ndarray
    photometric: str
    colour_max: float | None
    modality_lut: str


#: Slices may advance at most this many degrees off their normal before the stack counts as tilted or sheared.
MAX_TILT_DEGREES = 0.5
#: A gap between slices may differ from the median gap by this fraction (plus 0.01 mm of rounding) at most.
SPACING_TOLERANCE = 0.05


@dataclass(frozen=True)
class SliceGeometry:
    """Where the voxels of a stack of slices are: ``affine`` (4x4, RAS+ mm) maps (slice, row, column) indices of
    the decoded (F, H, W) array to patient coordinates; ``obliquity`` is the angle in degrees between the image
    axes and the nearest anatomical axes (0 for a true axial, coronal or sagittal stack)."""

    affine: np.ndarray
    obliquity: float


@dataclass
class DicomPixels:
    """One decoded DICOM case before intensity scaling (see :func:`decode_dicom`).

    Attributes:
        values: float32 (F, H, W) modality values (Hounsfield units for CT) or grey luminance, frames in
            slice order (sorted along the slice normal when positions are known).
        ref: the dataset whose VOI attributes stand for the case (the middle slice of a series).
        decoded: photometric, colour range and modality LUT of the values.
        sorted_by: how the frames were ordered.
        where: the file, or the series' folder, for error messages.
        geometry: the stack's affine, or None when the case has no usable position information (a radiograph,
            a cine loop, a series without ImagePositionPatient).
        single: one single-frame file: an image, not a volume.
        frames: for a multi-frame object, the file's frame number of each row of ``values``.
    """

    values: np.ndarray
    ref: Dataset
    decoded: _Decoded
    sorted_by: str
    where: Path
    geometry: SliceGeometry | None
    single: bool
    frames: list[int] | None = None


def read_dicom_pixels(paths: Sequence[Path] | Path, spec: InputSpec) -> tuple[np.ndarray, dict]:
    """Decode one DICOM image, multi-frame object or multi-file series to float32 in [0, 1].

    Args:
        paths: one file, or the files of one series (sorted here by slice position).
        spec: the intensity window and MONOCHROME1 policy (``window``, ``invert_monochrome1``...).

    Returns:
        ``(array, info)``: float32 (H, W) for a single frame, (F, H, W) for a multi-frame file or a series,
        values in [0, 1] with MONOCHROME2 polarity when ``spec.invert_monochrome1``; ``info`` holds
        ``photometric`` (as stored), ``inverted``, ``window`` (what was applied), ``bits_stored``,
        ``frames``, ``modality_lut``, ``transfer_syntax`` and ``sorted_by``.

    Raises:
        ScanReadError: unreadable, truncated, non-image, undecodable, constant or unsupported data, a series
            that is not one regular stack, or a header value the pipeline needs that pydicom cannot convert
            (``WindowCenter = "abc"``).
    """
    pixels = decode_dicom(paths)
    out, info = dicom_to_unit(pixels, spec)
    array = out[0] if pixels.single else out
    return np.ascontiguousarray(array, dtype=np.float32), info


def decode_dicom(paths: Sequence[Path] | Path) -> DicomPixels:
    """Read, check and decode one DICOM case to modality values, with its slice geometry.

    Args:
        paths: one file, or the files of one series.

    Raises:
        ScanReadError: see :func:`read_dicom_pixels`.
    """
    files = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not files:
        raise ScanReadError("<no files>", "no DICOM files were given for this case")
    with _as_scan_errors(files):
        if len(files) == 1:
            ref = read_dataset(files[0])
            check_dataset(ref, files[0])
            decoded = decode_values(ref, files[0])
            decoded, geometry, sorted_by, frames = _multi_frame_geometry(ref, decoded, files[0])
            _drop_pixels(ref)
            single = decoded.values.shape[0] == 1
            return DicomPixels(decoded.values, ref, decoded, sorted_by, files[0], geometry, single, frames)
        decoded, ref, sorted_by, geometry = _read_series(files)
        return DicomPixels(decoded.values, ref, decoded, sorted_by, files[0].parent, geometry, False)


def dicom_to_unit(pixels: DicomPixels, spec: InputSpec) -> tuple[np.ndarray, dict]:
    """The VOI (``spec.window``) and polarity steps: modality values (F, H, W) → float32 [0, 1], and what was done.

    The values are scaled frame by frame where the file gives per-frame windows, so this runs on the frames as
    decoded (before any reorientation).
    """
    values, ref, where = pixels.values, pixels.ref, pixels.where
    with _as_scan_errors([where]):
        if float(values.max()) == float(values.min()):
            raise ScanReadError(str(where), f"constant image: every pixel is {float(values.min()):g} after decoding")
        photometric = str(ref.get("PhotometricInterpretation", "")).strip()
        out, window = _voi_to_unit(values, ref, spec, pixels.decoded, where, pixels.frames)
        inverted = inverts(pixels, spec)
        if inverted:
            # PS3.3 C.7.6.3.1.2: MONOCHROME1 = minimum is white. Inverting after the VOI keeps the window's meaning.
            out = np.subtract(1.0, out, out=out if out is not values else None, dtype=np.float32)
            _log_inversion()
        info = {
            "photometric": photometric,
            "inverted": inverted,
            "window": window,
            "bits_stored": int(ref.get("BitsStored") or 0),
            "frames": int(values.shape[0]),
            "modality_lut": pixels.decoded.modality_lut,
            "transfer_syntax": str(_transfer_syntax(ref).name),
            "sorted_by": pixels.sorted_by,
        }
    return out, info


def inverts(pixels: DicomPixels, spec: InputSpec) -> bool:
    """Whether the case is MONOCHROME1 and ``spec`` asks for MONOCHROME2 polarity (to be inverted after VOI).

    Raises:
        ScanReadError: MONOCHROME2 with Presentation LUT Shape INVERSE (ambiguous polarity).
    """
    photometric = str(pixels.ref.get("PhotometricInterpretation", "")).strip()
    return _polarity(pixels.ref, photometric, pixels.where) and spec.invert_monochrome1


@contextlib.contextmanager
def _as_scan_errors(files: list[Path]) -> Iterator[None]:
    """pydicom muted, and its stray exceptions turned into ScanReadError (see below)."""
    with quiet_pydicom():
        try:
            yield
        except ScanReadError:
            raise
        except Exception as exc:  # noqa: BLE001 - see below
            # pydicom parses elements lazily, so a damaged file fails wherever a value is first used, with any
            # exception type (ValueError for WindowCenter "abc", NotImplementedError for a garbled VR...).
            # It is the file that is unreadable; its message can quote raw bytes (PHI), so only the type is kept.
            where = files[0] if len(files) == 1 else files[0].parent
            raise ScanReadError(str(where), f"the DICOM header is damaged or holds invalid values "
                                f"({type(exc).__name__}); re-export the file") from exc


def _drop_pixels(ds: Dataset) -> None:
    """Free a dataset's encoded pixel bytes once decoded (a 300-slice CT holds ~150 MB of them)."""
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            del ds[keyword]


@contextlib.contextmanager
def quiet_pydicom(*also: str) -> Iterator[None]:
    """Mute pydicom's warnings and log records (and those of the loggers named in ``also``) for the block.

    pydicom's validation messages quote raw element values, and in a damaged file (a wrong element length)
    a "value" can run over the neighbouring elements: names, IDs, birth dates. What is wrong with a file is
    reported by the ScanReadError raised instead. Local to the block, never global; levels are restored after.
    """
    logs = [logging.getLogger(name) for name in ("pydicom", *also)]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.CRITICAL + 1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(logs, levels, strict=True):
            log.setLevel(level)


def read_dataset(path: Path) -> Dataset:
    """Read a whole DICOM file (pixels included); ``force`` only for raw datasets without a preamble.

    Raises:
        ScanReadError: missing, empty, not DICOM, or not parseable.
    """
    if path.is_dir():
        raise ScanReadError(str(path), "is a folder, not a DICOM file; pass the files of the series")
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError as exc:
        raise ScanReadError(str(path), f"cannot be opened ({type(exc).__name__}); check it exists and is readable") from exc
    if size == 0:
        raise ScanReadError(str(path), "empty file (0 bytes); re-export or remove it")
    has_preamble = head[128:132] == b"DICM"
    if not has_preamble and not looks_like_raw_dicom(head):
        raise ScanReadError(str(path), "not a DICOM file (no 'DICM' marker at byte 128 and no DICOM element at the start)")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path, force=not has_preamble)
    except Exception as exc:  # pydicom raises many types for malformed files; all mean "unreadable"
        raise ScanReadError(str(path), f"not a readable DICOM file ({type(exc).__name__}: {_short(exc)})") from exc
    if any(_CUT_SHORT in str(w.message) for w in caught):
        # pydicom drops an undefined-length element (encapsulated pixel data, a sequence) that the file ends
        # inside, with only a warning: without this the file would read as "no PixelData", not as truncated.
        raise ScanReadError(str(path), "truncated: the file ends inside its compressed pixel data (or a sequence) "
                            "before the closing delimiter; copy the file again from its source")
    return ds


def looks_like_raw_dicom(head: bytes) -> bool:
    """True when ``head`` starts with a group 0002 or 0008 tag (a DICOM dataset written without preamble)."""
    if len(head) < 8:
        return False
    return int.from_bytes(head[:2], "little") in (0x0002, 0x0008) or int.from_bytes(head[:2], "big") == 0x0008


def check_dataset(ds: Dataset, path: Path) -> None:
    """Refuse, before decoding, datasets that hold no usable image or whose pixel data cannot be right.

    Raises:
        ScanReadError: non-image SOP class, no PixelData, unsupported photometric, absurd or truncated size.
    """
    sop = str(ds.get("SOPClassUID", "") or getattr(ds.get("file_meta", None), "MediaStorageSOPClassUID", "") or "")
    if sop.startswith(_NON_IMAGE_SOP_PREFIXES) and sop != _RT_IMAGE:
        raise ScanReadError(str(path), f"not an image: SOP class '{UID(sop).name}'; remove it from the scan folder")
    if "PixelData" not in ds:
        kind = "float pixel data (parametric map) is not supported" if (
            "FloatPixelData" in ds or "DoubleFloatPixelData" in ds) else "no PixelData element: not an image"
        raise ScanReadError(str(path), f"{kind} (SOP class '{UID(sop).name if sop else 'unknown'}')")
    if "Rows" not in ds or "Columns" not in ds or not ds.Rows or not ds.Columns:
        raise ScanReadError(str(path), "PixelData without Rows/Columns: the header is incomplete")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if photometric not in _GREY + _COLOUR:
        raise ScanReadError(
            str(path), f"PhotometricInterpretation '{photometric or 'missing'}' is not supported (validated: "
            f"{', '.join(_GREY + _COLOUR)}); convert the image to MONOCHROME2 or RGB")
    image_type = ds.get("ImageType")
    if image_type is not None and "MOSAIC" in {str(v).strip().upper() for v in np.atleast_1d(image_type)}:
        raise ScanReadError(str(path), "Siemens mosaic (the slices of a volume tiled in one image, ImageType MOSAIC); "
                            "convert the series to NIfTI with dcm2niix and use the NIfTI file")
    if not _transfer_syntax(ds).is_compressed:
        _check_native_length(ds, path)
    frames, spp = int_tag(ds, "NumberOfFrames", 1), int_tag(ds, "SamplesPerPixel", 1)
    if int(ds.Rows) * int(ds.Columns) * frames * spp > MAX_SAMPLES:
        raise ScanReadError(str(path), f"declares {ds.Rows}x{ds.Columns}x{frames} pixels, too large to decode safely")


def _check_native_length(ds: Dataset, path: Path) -> None:
    try:
        expected = get_expected_length(ds, unit="bytes")
    except Exception as exc:  # inconsistent group 0028 values
        raise ScanReadError(str(path), f"inconsistent image header ({type(exc).__name__}: {_short(exc)})") from exc
    actual = len(ds.PixelData)
    if actual < expected:
        raise ScanReadError(
            str(path), f"pixel data is {actual} bytes but the header (Rows x Columns x frames x bits) needs "
            f"{expected}: the file is truncated or its header is corrupt; re-export it")


def decode_values(ds: Dataset, path: Path) -> _Decoded:
    """Decode the pixel data and apply the Modality LUT: float32 (F, H, W) in modality units (or grey luma)."""
    ts = _transfer_syntax(ds)
    ds.file_meta.TransferSyntaxUID = ts  # raw datasets read with force have none; the decoder needs it
    try:
        decoder = get_decoder(ts)
    except NotImplementedError as exc:
        raise ScanReadError(str(path), f"transfer syntax '{ts.name}' has no pixel data decoder") from exc
    if not decoder.is_available:
        raise ScanReadError(str(path), f"{ts.name} pixel data and no decoder installed. {CODECS_HINT}")
    try:
        arr, meta = decoder.as_array(ds)
    except Exception as exc:  # decoder plugins raise assorted types on corrupt data
        hint = f" If a decoder is missing: {CODECS_HINT}" if ts.is_compressed else ""
        raise ScanReadError(
            str(path), f"pixel data could not be decoded ({type(exc).__name__}: {_short(exc)}).{hint}") from exc
    photometric = str(meta.get("photometric_interpretation", ds.PhotometricInterpretation))
    spp = int(meta.get("samples_per_pixel", 1))
    arr = arr.reshape(-1, int(meta["rows"]), int(meta["columns"]), *((3,) if spp == 3 else ()))
    if photometric == "PALETTE COLOR":
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        rgb = apply_color_lut(arr, ds).astype(np.float32)
        return _Decoded(rgb @ LUMA, photometric, float(2**bits - 1), "palette")
    if spp == 3:
        colour_max = float(2 ** int(meta.get("bits_stored", 8)) - 1)
        return _Decoded(arr.astype(np.float32) @ LUMA, photometric, colour_max, "none (colour)")
    values, how = _modality_lut(arr, ds)
    return _Decoded(values, photometric, None, how)


def _modality_lut(arr: np.ndarray, ds: Dataset) -> tuple[np.ndarray, str]:
    """PS3.3 C.11.1: stored values → modality values, per frame where functional groups say so."""
    if ds.get("ModalityLUTSequence"):
        return apply_modality_lut(arr, ds).astype(np.float32), "Modality LUT Sequence"
    n = arr.shape[0]
    slopes = np.array([_frame_attr(ds, i, "PixelValueTransformationSequence", "RescaleSlope") for i in range(n)])
    inter = np.array([_frame_attr(ds, i, "PixelValueTransformationSequence", "RescaleIntercept") for i in range(n)])
    if all(s is None for s in slopes) and all(b is None for b in inter):
        return arr.astype(np.float32), "none"
    s = np.array([1.0 if v is None else float(v) for v in slopes], dtype=np.float32)[:, None, None]
    b = np.array([0.0 if v is None else float(v) for v in inter], dtype=np.float32)[:, None, None]
    return arr.astype(np.float32) * s + b, "rescale"


def _frame_attr(ds: Dataset, frame: int, sequence: str, attr: str, *, top_level: bool = True) -> object:
    """``attr`` for ``frame``: per-frame functional group, then shared group (PS3.3 C.7.6.16), then top level
    (unless ``top_level`` is False)."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    shared = ds.get("SharedFunctionalGroupsSequence")
    for item in (per_frame[frame] if per_frame and frame < len(per_frame) else None,
                 shared[0] if shared else None):
        inner = item.get(sequence) if item is not None else None
        if inner and attr in inner[0]:
            return inner[0][attr].value
    return ds.get(attr) if top_level else None


def _voi_to_unit(values: np.ndarray, ds: Dataset, spec: InputSpec, dec: _Decoded, where: Path,
                 frames: Sequence[int] | None = None) -> tuple[np.ndarray, str]:
    """PS3.3 C.11.2: modality values (F, H, W) → [0, 1] per ``spec.window``; returns what was applied.

    ``frames``: the file's frame number of each row of ``values`` (multi-frame objects sorted by position).
    """
    if spec.window != "file":
        return scale_intensity(values, spec)
    if dec.colour_max is not None:  # no VOI for colour (C.11.2 applies to MONOCHROME only): use the stored range
        return np.clip(values / dec.colour_max, 0.0, 1.0), f"colour range 0..{dec.colour_max:g}"
    if ds.get("VOILUTSequence"):
        out = _voi_lut_sequence(values, ds)
        desc = "VOI LUT Sequence"
    else:
        per_frame = values.shape[0] == int_tag(ds, "NumberOfFrames", 1)
        frames = list(frames) if frames is not None else list(range(values.shape[0]))
        windows = [_frame_window(ds, frames[i] if per_frame else 0, where) for i in range(values.shape[0])]
        if any(w is None for w in windows):
            out, desc = percentile_to_unit(values, spec.percentiles)
            return out, f"{desc} (no valid window in the file)"
        if len(set(windows)) == 1:
            out = window_to_unit(values, *windows[0])
        else:
            out = np.empty_like(values, dtype=np.float32)
            for i, (v, w) in enumerate(zip(values, windows, strict=True)):
                out[i] = window_to_unit(v, *w)
        distinct = sorted({f"{c:g}/{w:g} {f}" for c, w, f in windows})
        desc = "file window " + ("; ".join(distinct) if len(distinct) <= 3 else f"{len(distinct)} per-frame windows")
    if float(out.max()) - float(out.min()) < 1e-6:
        raise ScanReadError(str(where), f"the {desc} maps every pixel to the same value (it does not fit "
                            "the pixel data); use input.window='percentile' or 'minmax'")
    return out, desc


def _frame_window(ds: Dataset, frame: int, where: Path) -> tuple[float, float, str] | None:
    """(center, width, function) of ``frame`` from FrameVOILUTSequence or the top level; None if absent/invalid."""
    center = _frame_attr(ds, frame, "FrameVOILUTSequence", "WindowCenter")
    width = _frame_attr(ds, frame, "FrameVOILUTSequence", "WindowWidth")
    if center is None or width is None or center == "" or width == "":
        return None
    func = str(_frame_attr(ds, frame, "FrameVOILUTSequence", "VOILUTFunction") or "LINEAR").strip().upper()
    if func not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        raise ScanReadError(str(where), f"VOILUTFunction '{func}' is not one PS3.3 C.11.2.1.3 defines "
                            "(LINEAR, LINEAR_EXACT, SIGMOID); use input.window='percentile'")
    # A multi-valued window holds alternative views (C.11.2.1.2); the first is the default.
    c = float(center[0] if isinstance(center, Sequence) and not isinstance(center, str) else center)
    w = float(width[0] if isinstance(width, Sequence) and not isinstance(width, str) else width)
    if (func == "LINEAR" and w < 1) or w <= 0:
        logger.info("ignoring an invalid window width %g (%s); using percentiles", w, func)
        return None
    return c, w, func


def _voi_lut_sequence(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """PS3.3 C.11.2.1.1: look modality values up in the first VOI LUT; output scaled by the LUT's own range.

    The range comes from the LUT data rather than LUTDescriptor[2] because some writers declare 16 bits for
    12-bit tables (a known quirk that would otherwise give a nearly black image).
    """
    descriptor = ds.VOILUTSequence[0].LUTDescriptor
    n, first = int(descriptor[0]) or 65536, int(descriptor[1])
    lut = apply_voi(np.arange(first, first + n, dtype=np.int64), ds).astype(np.float32)
    lo, hi = float(lut.min()), float(lut.max())
    idx = np.clip(np.rint(values) - first, 0, n - 1).astype(np.int64)
    return (lut[idx] - lo) / (hi - lo) if hi > lo else np.zeros_like(values)


def _polarity(ds: Dataset, photometric: str, where: Path) -> bool:
    """True when the image is MONOCHROME1 (to be inverted).

    PS3.3 C.8.11.1.1 (DX Image): Presentation LUT Shape INVERSE accompanies MONOCHROME1 and means the same
    inversion, so it is not applied twice. INVERSE on a MONOCHROME2 image contradicts that rule and was
    never validated here: refuse rather than guess the polarity.
    """
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    if photometric == "MONOCHROME2" and shape == "INVERSE":
        raise ScanReadError(str(where), "MONOCHROME2 with Presentation LUT Shape INVERSE: the polarity is "
                            "ambiguous; re-export the image as MONOCHROME1 or MONOCHROME2 without INVERSE")
    return photometric == "MONOCHROME1"


def _log_inversion() -> None:
    global _inversion_logged
    if not _inversion_logged:
        logger.info("MONOCHROME1 images are inverted to MONOCHROME2 polarity (bone bright); "
                    "set input.invert_monochrome1=false to keep them as stored")
        _inversion_logged = True


def _read_series(files: list[Path]) -> tuple[_Decoded, Dataset, str, SliceGeometry | None]:
    """Read, check, sort and decode the slices of one series into one (D, H, W) volume (and its geometry)."""
    folder = files[0].parent
    datasets = [read_dataset(p) for p in files]
    for ds, p in zip(datasets, files, strict=True):
        check_dataset(ds, p)
        if int_tag(ds, "NumberOfFrames", 1) > 1:
            raise ScanReadError(str(p), "multi-frame file inside a multi-file series; give it as its own case")
    sizes = sorted({(int(ds.Rows), int(ds.Columns)) for ds in datasets})
    if len(sizes) > 1:
        raise ScanReadError(str(folder), f"slices of one series have different sizes {sizes}; a case must be "
                            "one series of equally sized slices")
    photometrics = sorted({str(ds.PhotometricInterpretation) for ds in datasets})
    if len(photometrics) > 1:
        raise ScanReadError(str(folder), f"slices mix PhotometricInterpretation {photometrics}")
    order, sorted_by = _slice_order(datasets, folder)
    series = collections.Counter(str(ds.get("SeriesInstanceUID", "") or "") for ds in datasets)
    series.pop("", None)
    if len(series) > 1:
        counts = ", ".join(str(n) for n in sorted(series.values(), reverse=True))
        raise ScanReadError(str(folder), f"these files mix {len(series)} series (SeriesInstanceUID differs; "
                            f"{counts} slices): a case must be one series. Put each series in its own folder")
    geometry = None
    if sorted_by == "ImagePositionPatient":
        geometry = _stack_geometry([_floats_of(datasets[0], "ImageOrientationPatient")] * len(order),
                                   [_floats_of(datasets[i], "ImagePositionPatient") for i in order],
                                   pixel_spacing(datasets[0], 0), folder)
    # decoded one slice at a time into one preallocated volume, each file's pixel bytes freed once decoded
    first = decode_values(datasets[order[0]], files[order[0]])
    values = np.empty((len(order), *first.values.shape[1:]), dtype=np.float32)
    for n, i in enumerate(order):
        part = first if n == 0 else decode_values(datasets[i], files[i])
        values[n] = part.values[0]
        _drop_pixels(datasets[i])
    ref = datasets[order[len(order) // 2]]  # the middle slice's window is the series' window
    return _Decoded(values, first.photometric, first.colour_max, first.modality_lut), ref, sorted_by, geometry


def _slice_order(datasets: list[Dataset], folder: Path) -> tuple[list[int], str]:
    """Sort slices by ImagePositionPatient projected on the slice normal (PS3.3 C.7.6.2.1.1), else InstanceNumber."""
    iops = [ds.get("ImageOrientationPatient") for ds in datasets]
    ipps = [ds.get("ImagePositionPatient") for ds in datasets]
    if all(o is not None and len(o) == 6 for o in iops):
        iop = np.array([[float(v) for v in o] for o in iops])
        if np.abs(iop - iop[0]).max() > 1e-3:
            raise ScanReadError(str(folder), "slices have different orientations (ImageOrientationPatient); "
                                "a case must be one series with one orientation")
        if all(p is not None and len(p) == 3 for p in ipps):
            pos = np.array([[float(v) for v in p] for p in ipps]) @ slice_normal(iop[0])
            return [int(i) for i in np.argsort(pos, kind="stable")], "ImagePositionPatient"
    numbers = [ds.get("InstanceNumber") for ds in datasets]
    if all(n is not None and str(n) != "" for n in numbers):
        return [int(i) for i in np.argsort([int(n) for n in numbers], kind="stable")], "InstanceNumber"
    logger.info("series without positions or instance numbers; keeping the given slice order")
    return list(range(len(datasets))), "given order"


def _multi_frame_geometry(ds: Dataset, decoded: _Decoded, path: Path
                          ) -> tuple[_Decoded, SliceGeometry | None, str, list[int] | None]:
    """Frames of a multi-frame object sorted along their normal, with the stack's geometry and the original frame
    numbers, when every frame has its own position (PS3.3 C.7.6.16.2.3, Plane Position); otherwise the frames
    as stored, no geometry."""
    n = decoded.values.shape[0]
    stored = (decoded, None, "single file", None)
    if n < 2 or not ds.get("PerFrameFunctionalGroupsSequence"):
        return stored
    positions = [_frame_attr(ds, i, "PlanePositionSequence", "ImagePositionPatient", top_level=False)
                 for i in range(n)]
    orientations = [_frame_attr(ds, i, "PlaneOrientationSequence", "ImageOrientationPatient") for i in range(n)]
    if any(p is None or len(p) != 3 for p in positions) or any(o is None or len(o) != 6 for o in orientations):
        return stored
    ipps = [[float(v) for v in p] for p in positions]
    if np.ptp(np.asarray(ipps), axis=0).max() < 1e-4:  # one position: a time series (cine), frames as stored
        return stored
    iops = [[float(v) for v in o] for o in orientations]
    if np.abs(np.asarray(iops) - iops[0]).max() > 1e-3:
        raise ScanReadError(str(path), "frames have different orientations (Plane Orientation); a case must be "
                            "one stack of parallel slices: export each orientation as its own series")
    order = np.argsort(np.asarray(ipps) @ slice_normal(iops[0]), kind="stable")
    geometry = _stack_geometry([iops[0]] * n, [ipps[i] for i in order], pixel_spacing(ds, 0), path)
    if (order != np.arange(n)).any():
        decoded = _Decoded(decoded.values[order], decoded.photometric, decoded.colour_max, decoded.modality_lut)
    return decoded, geometry, "Plane Position (per frame)", [int(i) for i in order]


def _floats_of(ds: Dataset, keyword: str) -> list[float]:
    return [float(v) for v in ds.get(keyword)]


def pixel_spacing(ds: Dataset, frame: int) -> tuple[float, float]:
    """(row spacing, column spacing) in mm: PixelSpacing (per frame, shared, top level); 1 mm when absent."""
    value = _frame_attr(ds, frame, "PixelMeasuresSequence", "PixelSpacing")
    try:
        row, col = (float(v) for v in value)  # type: ignore[union-attr]
        if row > 0 and col > 0:
            return row, col
    except (TypeError, ValueError):
        pass
    logger.info("no valid PixelSpacing; assuming 1 mm pixels for the volume's geometry")
    return 1.0, 1.0


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """The unit normal of slices with ImageOrientationPatient ``orientation`` (row x column cosines, LPS)."""
    iop = np.asarray(orientation, dtype=np.float64)
    normal = np.cross(iop[:3], iop[3:])
    return normal / (np.linalg.norm(normal) or 1.0)


def obliquity_degrees(orientation: Sequence[float]) -> float:
    """Degrees between the image axes (rows, columns, normal) and the nearest anatomical axes; 0 when the
    slices are exactly axial, coronal or sagittal."""
    iop = np.asarray(orientation, dtype=np.float64)
    axes = [iop[:3], iop[3:], slice_normal(iop)]
    cosines = [float(np.max(np.abs(a)) / (np.linalg.norm(a) or 1.0)) for a in axes]
    return float(np.degrees(np.arccos(np.clip(min(cosines), -1.0, 1.0))))


def stack_problem(orientation: Sequence[float], positions: Sequence[Sequence[float]]) -> str | None:
    """Why slices at ``positions`` (ImagePositionPatient, any order) with one ``orientation`` are not one regular
    grid, or None.

    Checked along the slice normal after sorting: a repeated position, a missing slice (a gap that is a multiple
    of the usual spacing), uneven spacing (beyond :data:`SPACING_TOLERANCE`), and slices that advance off their
    normal (gantry tilt, or a sheared stack: more than :data:`MAX_TILT_DEGREES`). Slice numbers in the reasons
    count from 1 in that sorted order.
    """
    pos = np.asarray(positions, dtype=np.float64)
    n = len(pos)
    if n < 2:
        return None
    normal = slice_normal(orientation)
    pos = pos[np.argsort(pos @ normal, kind="stable")]
    steps = np.diff(pos, axis=0)
    along = steps @ normal
    if (np.abs(along) < 1e-4).any():
        i = int(np.argmax(np.abs(along) < 1e-4))
        return (f"slices {i + 1} and {i + 2} of {n} lie at the same position (duplicate files, or several "
                "acquisitions in one series); export each acquisition as its own series")
    usual = float(np.median(along))
    off = np.abs(along - usual) > SPACING_TOLERANCE * usual + 0.01
    if off.any():
        i = int(np.argmax(np.abs(along - usual)))
        gap, others = float(along[i]), f"{_mm(usual)} mm elsewhere"
        multiple = gap / usual
        if round(multiple) >= 2 and abs(multiple - round(multiple)) <= SPACING_TOLERANCE:
            missing = round(multiple) - 1
            what = "a slice is missing" if missing == 1 else f"{missing} slices are missing"
            more = f" ({int(off.sum())} such gaps)" if off.sum() > 1 else ""
            return (f"slice spacing {_mm(gap)} mm between slices {i + 1} and {i + 2}, {others}: {what}{more}; "
                    "export the complete series again")
        return (f"uneven slice spacing: {_mm(gap)} mm between slices {i + 1} and {i + 2}, {others} "
                f"({int(off.sum())} of {n - 1} gaps differ); export the series again or resample it to even spacing")
    inplane = np.linalg.norm(steps - along[:, None] * normal, axis=1)
    angles = np.degrees(np.arctan2(inplane, np.abs(along)))
    limit = np.degrees(np.arctan2(np.tan(np.radians(MAX_TILT_DEGREES)) * np.abs(along) + 0.01, np.abs(along)))
    if (angles > limit).any():
        angle = float(angles.max())
        return (f"the slices advance at {angle:.1f} degrees to their normal (gantry tilt or a sheared stack; "
                f"tolerance {MAX_TILT_DEGREES:g} degrees), so they do not form a rectangular grid; resample the series "
                "to slices without tilt (dcm2niix corrects gantry tilt) or export it without tilt")
    return None


def _mm(x: float) -> str:
    return f"{x:.1f}" if abs(x) >= 1 else f"{x:.3g}"


def _stack_geometry(orientations: list[list[float]], positions: list[list[float]], spacing: tuple[float, float],
                    where: Path) -> SliceGeometry:
    """Check a sorted stack and build its affine (RAS+, for (slice, row, column) indices).

    DICOM (PS3.3 C.7.6.2.1.1): voxel (column i, row j) of a slice lies at ``IPP + i * dc * X + j * dr * Y``
    (X, Y: the row and column direction cosines of ImageOrientationPatient; dr, dc: PixelSpacing), in LPS;
    the slice axis steps from the first to the last position in equal steps. LPS → RAS negates x and y.
    """
    problem = stack_problem(orientations[0], positions)
    if problem:
        raise ScanReadError(str(where), problem)
    iop = np.asarray(orientations[0], dtype=np.float64)
    pos = np.asarray(positions, dtype=np.float64)
    dr, dc = spacing
    step = (pos[-1] - pos[0]) / (len(pos) - 1)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = step, iop[3:] * dr, iop[:3] * dc, pos[0]
    return SliceGeometry(np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps, obliquity_degrees(iop))


# --- Intensity windows to [0, 1] (also used for NIfTI and PNG by medtransfer.data.loading) ---------------


def window_to_unit(x: np.ndarray, center: float, width: float, function: str = "LINEAR") -> np.ndarray:
    """Apply a VOI window (PS3.3 C.11.2.1.2/C.11.2.1.3) with output in [0, 1] instead of the bit range.

    LINEAR (C.11.2.1.2.1) keeps the standard's half-unit offsets: 0 where ``x <= c - 0.5 - (w - 1) / 2``,
    1 where ``x > c - 0.5 + (w - 1) / 2``, else ``(x - (c - 0.5)) / (w - 1) + 0.5``. LINEAR_EXACT
    (C.11.2.1.3.2): ``(x - c) / w + 0.5`` clipped. SIGMOID (C.11.2.1.3.1): ``1 / (1 + exp(-4 (x - c) / w))``.
    Computed in float32 in one new array (volumes hold hundreds of MB; no float64, no temporaries).
    """
    x = np.asarray(x, dtype=np.float32)
    if function == "SIGMOID":
        out = np.subtract(x, center, dtype=np.float32)
        out *= np.float32(-4.0)
        out /= np.float32(width)
        np.exp(out, out=out)
        out += 1.0
        return np.divide(1.0, out, out=out)
    if function != "LINEAR_EXACT" and width == 1:  # LINEAR with w = 1 is a threshold at c - 0.5
        return (x > center - 0.5).astype(np.float32)
    shift, scale = (center, width) if function == "LINEAR_EXACT" else (center - 0.5, width - 1)
    out = np.subtract(x, shift, dtype=np.float32)
    out /= np.float32(scale)
    out += np.float32(0.5)
    return np.clip(out, 0.0, 1.0, out=out)


def percentile_to_unit(x: np.ndarray, percentiles: tuple[float, float]) -> tuple[np.ndarray, str]:
    """Clip at the given percentiles and scale to [0, 1]; min-max when they coincide (mostly flat images).

    Large volumes are subsampled (a regular stride, so deterministic) to keep this fast.
    """
    x = np.asarray(x, dtype=np.float32)
    sample = x.reshape(-1)[:: max(1, x.size // 4_000_000)] if x.flags.c_contiguous else x.flat[:: max(
        1, x.size // 4_000_000)]
    lo, hi = (float(v) for v in np.percentile(sample, percentiles))
    if hi <= lo:
        return minmax_to_unit(x)
    out = np.subtract(x, np.float32(lo), dtype=np.float32)
    out /= np.float32(hi - lo)
    return np.clip(out, 0.0, 1.0, out=out), f"percentile {percentiles} = {lo:g}..{hi:g}"


def minmax_to_unit(x: np.ndarray) -> tuple[np.ndarray, str]:
    """Scale the image's own min..max to [0, 1] (zeros for a constant image, which callers refuse)."""
    x = np.asarray(x, dtype=np.float32)
    lo, hi = float(x.min()), float(x.max())
    scale = 1.0 / (hi - lo) if hi > lo else 0.0
    out = np.subtract(x, np.float32(lo), dtype=np.float32)
    out *= np.float32(scale)
    return out, f"minmax {lo:g}..{hi:g}"


def scale_intensity(x: np.ndarray, spec: InputSpec, *, natural_max: float | None = None) -> tuple[np.ndarray, str]:
    """Scale values to [0, 1] per ``spec.window`` when the file carries no window of its own.

    ``"file"`` divides by ``natural_max`` (8-bit images: 255) when given, else uses the percentiles;
    ``"fixed"`` is a LINEAR_EXACT window at ``spec.window_center``/``window_width`` in the file's units.
    """
    if spec.window == "fixed":
        c, w = float(spec.window_center or 0.0), float(spec.window_width or 1.0)
        return window_to_unit(x, c, w, "LINEAR_EXACT"), f"fixed {c:g}/{w:g}"
    if spec.window == "minmax":
        return minmax_to_unit(x)
    if spec.window == "file" and natural_max is not None:
        out = np.divide(x, np.float32(natural_max), dtype=np.float32)
        return np.clip(out, 0.0, 1.0, out=out), f"range 0..{natural_max:g}"
    return percentile_to_unit(x, spec.percentiles)


def _transfer_syntax(ds: Dataset) -> UID:
    meta = getattr(ds, "file_meta", None)
    ts = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    if ts:
        return UID(ts)
    implicit, little = getattr(ds, "original_encoding", (True, True))
    if implicit or implicit is None:
        return ImplicitVRLittleEndian
    return ExplicitVRLittleEndian if little or little is None else ExplicitVRBigEndian


def int_tag(ds: Any, keyword: str, default: int | None = None) -> int | None:
    """The integer value of DICOM attribute ``keyword``, or ``default`` when absent, empty or not a number."""
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else default
    except (TypeError, ValueError):
        return default


def _short(exc: BaseException, limit: int = 160) -> str:
    text = " ".join(str(exc).split())
    return text[:limit] + ("..." if len(text) > limit else "")
