"""Header reading: the non-PHI fields of one scan file, without decoding its pixels.

DICOM headers are read once per file with ``stop_before_pixels=True`` (``force=True`` so files without
the 128-byte preamble are read too). Whether pixel data is present, and complete, is checked from the
file position where pydicom stopped: it rewinds to the start of the (7FE0,0010) element, so reading the
next element header and comparing its length with the file size costs a few bytes instead of the whole
image. NIfTI headers come from nibabel (the data array is never loaded) and PNG/JPEG sizes from Pillow's
lazy ``Image.open``. :func:`sniff_format` tells the format from a file's first bytes, and
:func:`read_header` is the whole per-file step of indexing (sniff, then the header of that format).

This module imports no torch or MONAI (nor :mod:`medtransfer.data.loading`, which does): the header reading
of large folders runs in worker processes (:func:`read_header_chunk`), and each one starts by importing it.

Privacy: PatientID and StudyInstanceUID are pseudonymised here (:func:`~medtransfer.data.privacy.pseudonym`)
so the raw values never leave this module; names, birth dates and accession numbers are never read.
pydicom's own warnings are muted *around the read only*, because they can quote raw element values.
"""

from __future__ import annotations

import gzip
import logging
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pandas as pd

from medtransfer.data.dicom import int_tag, looks_like_raw_dicom, obliquity_degrees, stack_problem
from medtransfer.data.privacy import pseudonym
from medtransfer.errors import ScanReadError

logger = logging.getLogger(__name__)

#: Modalities whose single-frame slices of one series form one volume (see discovery's grouping rule).
VOLUME_MODALITIES = frozenset({"CT", "MR", "PT", "NM"})

#: DICOM objects that carry no diagnostic image (reports, plans, contours, presentation states, ...).
NON_IMAGE_MODALITIES = frozenset(
    {"SR", "PR", "KO", "DOC", "RTPLAN", "RTSTRUCT", "RTRECORD", "RTDOSE", "SEG", "REG", "ECG", "HD", "AU", "FID",
     "PLAN", "RWV", "RESP", "EPS", "HC", "REGISTRATION", "ANN"}
)
_NON_IMAGE_SOP = re.compile(
    r"\bSR\b|Structured Report|Presentation State|Key Object|Encapsulated|Waveform|\bECG\b|Raw Data|"
    r"Spectroscopy|Segmentation|Registration|Fiducials|Surface|Plan Storage|Structure Set|Treatment|Record|"
    r"Delivery|Instruction|Dose|Annotation|Protocol|Palette",
)
_MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR
_DEFLATED = "1.2.840.10008.1.2.1.99"
_PIXEL_TAGS = ((0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009))
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_VRS = _LONG_VRS | {vr.encode() for vr in ("AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT",
                                            "PN", "SH", "SL", "SS", "ST", "TM", "UI", "UL", "US")}
_PIXEL_VRS = {b"OB", b"OW", b"UN"}  # the VRs (7FE0,0010) may have in explicit VR (PS3.5 8.2, A.4)
_VOLUME_TOLERANCE = 1e-3  # ImageOrientationPatient cosines that differ by less are "the same"
_AGE_UNITS = {"Y": 1.0, "M": 12.0, "W": 365.25 / 7, "D": 365.25}
_SEX = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F", "O": "O", "OTHER": "O"}
_NIFTI_MAGIC = {348: (344, (b"n+1\0", b"ni1\0")), 540: (4, (b"n+2\0", b"ni2\0"))}
_HEAD_BYTES = 544


class HeaderProblem(ScanReadError):
    """A scan that cannot be used, found from its header; ``problem`` is a short category for summaries.

    Args:
        path: the file, relative to the data folder.
        reason: what is wrong and what to do.
        problem: short category (``empty``, ``not_dicom``, ``unreadable``, ``non_image``, ``no_pixels``,
            ``truncated``, ``no_size``, ...), used to count quarantined files by kind.
    """

    def __init__(self, path: str, reason: str, problem: str) -> None:
        super().__init__(path, reason)
        self.problem = problem

    def __reduce__(self) -> tuple[type[HeaderProblem], tuple[str, str, str]]:
        # pickled by its three arguments (Exception's default would pass only the message): worker processes
        # that read headers send these back to the indexing process
        return type(self), (self.path, self.reason, self.problem)


@dataclass(frozen=True)
class ScanHeader:
    """What one file says about itself. No PHI: identifiers are already pseudonymised.

    Attributes:
        fmt: ``dicom``, ``nifti``, ``png`` or ``jpeg``.
        patient_key, study_key: pseudonyms of PatientID / StudyInstanceUID (empty when absent).
        series_uid: SeriesInstanceUID, used only to group slices; never written to the manifest.
        age: years (from PatientAge), or None.
        position, orientation: ImagePositionPatient / ImageOrientationPatient, for series grouping.
        obliquity: NIfTI only: degrees between the voxel axes and the nearest anatomical axes (from the affine).
        extra_dims: NIfTI only: the sizes of the dimensions beyond the third (time points, channels).
    """

    fmt: str
    modality: str = ""
    patient_key: str = ""
    study_key: str = ""
    series_uid: str = ""
    sex: str = ""
    age: float | None = None
    institution: str = ""
    manufacturer: str = ""
    station: str = ""
    view: str = ""
    photometric: str = ""
    rows: int | None = None
    cols: int | None = None
    frames: int = 1
    spacing_row: float | None = None
    spacing_col: float | None = None
    position: tuple[float, ...] | None = None
    orientation: tuple[float, ...] | None = None
    obliquity: float | None = None
    extra_dims: tuple[int, ...] = ()

    @property
    def is_volume_slice(self) -> bool:
        """Whether this file is one slice of a volumetric series (CT/MR/PT/NM, single frame, positioned)."""
        return (self.fmt == "dicom" and self.modality in VOLUME_MODALITIES and self.frames == 1
                and self.position is not None and bool(self.series_uid))


def parse_age(value: Any) -> float | None:
    """Age in years from a DICOM age string (``045Y``, ``006M``, ``010W``, ``003D``) or a plain number.

    Returns None for blanks, garbage and implausible values (negative or over 130 years).

    Examples:
        >>> parse_age("006M")
        0.5
    """
    text = str(value).strip().upper() if value is not None else ""
    if not text or text in {"NAN", "NONE"}:
        return None
    unit = _AGE_UNITS.get(text[-1])
    number = text[:-1] if unit else text
    try:
        years = float(number) / (unit or 1.0)
    except ValueError:
        return None
    if not 0 <= years <= 130 or years != years:
        return None
    return round(years, 2)


def parse_sex(value: Any) -> str:
    """``M``, ``F`` or ``O`` from a DICOM PatientSex or a CSV value (male/female/other accepted); else ``""``."""
    return _SEX.get(str(value).strip().upper(), "") if value is not None else ""


def age_band(age: float | None, bands: tuple[int, ...]) -> str:
    """The band label for ``age``: bands (18, 40, 60, 80) give ``0-17``, ``18-39``, ..., ``80+``.

    Examples:
        >>> age_band(45.0, (18, 40, 60, 80))
        '40-59'
    """
    if age is None or age != age:
        return ""
    edges = (0, *bands)
    for lo, hi in zip(edges, edges[1:], strict=False):
        if age < hi:
            return f"{lo}-{hi - 1}"
    return f"{edges[-1]}+"


def read_header(path: Path, rel: str, size: int, *, looks_like_image: bool) -> ScanHeader | None:
    """The per-file step of indexing: tell the format by content, then read that format's header.

    Args:
        path: the file.
        rel: its path relative to the data folder (for quarantine rows).
        size: its size in bytes (from the folder walk).
        looks_like_image: whether its name has an image extension; such a file that is empty or not an image
            is quarantined, any other is simply not a scan.

    Returns:
        The header, or None for a file that is not a scan (an empty or unknown file without an image extension,
        a DICOMDIR under another name).

    Raises:
        HeaderProblem: an image file that cannot be used (empty, not an image despite its name, unreadable,
            no or truncated pixel data, ...).
    """
    if size == 0:
        if looks_like_image:
            raise HeaderProblem(rel, "empty file (0 bytes); copy it again from its source", "empty")
        return None
    fmt = sniff_format(path)
    if fmt is None:
        if looks_like_image:
            raise HeaderProblem(rel, "the content is not DICOM, NIfTI, PNG or JPEG despite the file name; "
                                     "re-export it or remove it", "not_image")
        return None
    if fmt == "dicom":
        return read_dicom_header(path, rel, size)
    if fmt == "nifti":
        return read_nifti_header(path, rel)
    return read_image_header(path, rel, fmt)


def read_header_chunk(items: Sequence[tuple[str, Path, int, bool]]) -> list[ScanHeader | HeaderProblem | None]:
    """:func:`read_header` for each ``(rel, path, size, looks_like_image)``, in order, problems returned not raised.

    The task a worker process runs when a large folder is indexed in parallel: a top-level function (picklable
    under any start method) whose results (frozen dataclasses, :class:`HeaderProblem` with its own pickling)
    travel back to the indexing process, which applies them in the original order.
    """
    out: list[ScanHeader | HeaderProblem | None] = []
    for rel, path, size, looks_like_image in items:
        try:
            out.append(read_header(path, rel, size, looks_like_image=looks_like_image))
        except HeaderProblem as exc:
            out.append(exc)
    return out


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


def read_dicom_header(path: Path, rel: str, size: int) -> ScanHeader | None:
    """Read one DICOM file's header and check that it holds a usable image.

    Args:
        path: the file.
        rel: its path relative to the data folder (for error messages and quarantine rows).
        size: its size in bytes (from the folder walk; saves a stat).

    Returns:
        The header fields, or None for a DICOMDIR (media directory), which is not a scan.

    Raises:
        HeaderProblem: not parseable, not an image (SR, RT plan, presentation state, ...), no or truncated
            pixel data, or no Rows/Columns.
    """
    import pydicom

    from medtransfer.data.dicom import quiet_pydicom

    try:
        with open(path, "rb") as fp, quiet_pydicom():  # pydicom's warnings and logs can quote raw (PHI) values
            ds = pydicom.dcmread(fp, stop_before_pixels=True, force=True)
            if str(ds.file_meta.get("MediaStorageSOPClassUID", "")) == _MEDIA_DIRECTORY:
                return None
            pixel_problem = _pixel_problem(fp, ds, size)
            header = _dicom_fields(ds)
            sop = ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID")
            sop_name = str(getattr(sop, "name", sop or ""))
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt input; all mean "unreadable"
        raise HeaderProblem(rel, f"not a readable DICOM file ({type(exc).__name__}); re-export it from the "
                                 "PACS or remove it", "unreadable") from None
    if header.modality in NON_IMAGE_MODALITIES or _NON_IMAGE_SOP.search(sop_name):
        what = sop_name or f"modality {header.modality}"
        raise HeaderProblem(rel, f"not an image ({what}); only image objects can be classified", "non_image")
    if pixel_problem:
        raise HeaderProblem(rel, pixel_problem[1], pixel_problem[0])
    if not header.rows or not header.cols:
        raise HeaderProblem(rel, "no Rows/Columns in the header; the image size is unknown", "no_size")
    return header


def _dicom_fields(ds: Any) -> ScanHeader:
    """The non-PHI fields of a pydicom dataset (PatientID/StudyInstanceUID only as pseudonyms)."""
    patient_id = _raw_text(ds, "PatientID")  # raw bytes: pydicom's validation would log the value (PHI)
    study_uid = _raw_text(ds, "StudyInstanceUID")
    spacing = _floats(ds, "PixelSpacing") or _floats(ds, "ImagerPixelSpacing")
    return ScanHeader(
        fmt="dicom",
        modality=_text(ds, "Modality").upper(),
        patient_key=pseudonym(patient_id, kind="patient") if patient_id else "",
        study_key=pseudonym(study_uid, kind="study") if study_uid else "",
        series_uid=_text(ds, "SeriesInstanceUID"),
        sex=parse_sex(_text(ds, "PatientSex")),
        age=parse_age(_text(ds, "PatientAge")),
        institution=_text(ds, "InstitutionName"),
        manufacturer=_text(ds, "Manufacturer"),
        station=_text(ds, "StationName"),
        view=_text(ds, "ViewPosition").upper(),
        photometric=_text(ds, "PhotometricInterpretation").upper(),
        rows=int_tag(ds, "Rows"),
        cols=int_tag(ds, "Columns"),
        frames=int_tag(ds, "NumberOfFrames") or 1,
        spacing_row=spacing[0] if spacing and len(spacing) == 2 else None,
        spacing_col=spacing[1] if spacing and len(spacing) == 2 else None,
        position=_floats(ds, "ImagePositionPatient"),
        orientation=_floats(ds, "ImageOrientationPatient"),
    )


def _pixel_problem(fp: BinaryIO, ds: Any, size: int) -> tuple[str, str] | None:
    """(problem, reason) if the pixel data element is absent, empty or cut short; None if it looks complete.

    ``fp`` is where ``dcmread(stop_before_pixels=True)`` left it: at the start of the pixel data element,
    or at the end of the file when there is none.

    Only *native* (uncompressed) pixel data is held to its length. Encapsulated pixel data (JPEG, JPEG-LS,
    JPEG 2000, RLE...; PS3.5 A.4) is a sequence of compressed fragments whose size says nothing about
    Rows x Columns; it is only required to be present here, and its fragments are checked when it is decoded
    (``DataConfig.verify_pixels``, :mod:`medtransfer.data.dicom`).
    """
    if str(ds.file_meta.get("TransferSyntaxUID", "")) == _DEFLATED:
        return None  # the dataset was inflated in memory; positions no longer match the file
    start = fp.tell()
    head = fp.read(12)
    implicit, little = ds.original_encoding
    if implicit is None:
        implicit, little = False, True
    if len(head) < 8 or struct.unpack("<HH" if little else ">HH", head[:4]) not in _PIXEL_TAGS:
        return "no_pixels", "no pixel data element; the file holds no image"
    if _encapsulated(ds):
        return None
    endian = "<" if little else ">"
    if _explicit_element(head, implicit=implicit):
        if head[4:6] in _LONG_VRS:
            if len(head) < 12:
                return "truncated", "file ends inside the pixel data element header; the file is truncated"
            length, header_len = struct.unpack(f"{endian}I", head[8:12])[0], 12
        else:
            length, header_len = struct.unpack(f"{endian}H", head[6:8])[0], 8
    else:
        length, header_len = struct.unpack(f"{endian}I", head[4:8])[0], 8
    if length == 0xFFFFFFFF:
        return None  # undefined length: encapsulated despite the transfer syntax; the decoder decides
    if length == 0:
        return "no_pixels", "pixel data element is empty; the file holds no image"
    available = size - start - header_len
    if length > available:
        return "truncated", (f"truncated: pixel data needs {length} bytes but the file has {max(available, 0)}; "
                             "copy the file again from its source")
    return None


def _encapsulated(ds: Any) -> bool:
    """Whether the file's transfer syntax stores pixel data encapsulated (compressed fragments, PS3.5 A.4).

    A private or unknown transfer syntax counts as native here; its element then tells (undefined length).
    """
    from pydicom.uid import UID

    ts = UID(str(ds.file_meta.get("TransferSyntaxUID", "") or ""))
    return bool(ts) and ts.is_transfer_syntax and ts.is_encapsulated


def _explicit_element(head: bytes, *, implicit: bool) -> bool:
    """Whether the pixel data element header in ``head`` is written with an explicit VR.

    The encoding the file declares is trusted unless the bytes contradict it, as pydicom does when it reads
    the dataset: some writers declare an explicit-VR transfer syntax but write implicit VR (pydicom's
    ``SC_rgb_jpeg.dcm``), where bytes 4-7 are a 4-byte length instead of a VR. In an implicit-VR file,
    bytes 4-5 cannot spell OB/OW/UN: pixel data lengths are even (PS3.5 7.1.1) and those letters are odd.
    """
    vr = head[4:6]
    if implicit:
        return vr in _PIXEL_VRS
    return vr in _VRS


def read_nifti_header(path: Path, rel: str) -> ScanHeader:
    """Shape, voxel size and obliquity of a NIfTI file via nibabel (the data array is not loaded).

    ``rows``/``cols`` are the first two array dimensions as stored, ``frames`` the third (1 for 2D), and
    ``extra_dims`` any further ones (a 4D series).

    Raises:
        HeaderProblem: nibabel cannot read the header.
    """
    import nibabel as nib

    try:
        img = nib.load(str(path))
        shape = tuple(int(s) for s in img.shape)
        zooms = tuple(float(z) for z in img.header.get_zooms())
        rotation = np.asarray(img.affine, dtype=np.float64)[:3, :3]
    except Exception as exc:  # noqa: BLE001 - nibabel raises several types for corrupt files
        raise HeaderProblem(rel, f"not a readable NIfTI file ({type(exc).__name__})", "unreadable") from None
    if len(shape) < 2 or min(shape) < 1:
        raise HeaderProblem(rel, f"NIfTI image has shape {shape}; expected at least 2 dimensions", "no_size")
    norms = np.linalg.norm(rotation, axis=0)
    obliquity = None
    if np.all(norms > 0) and np.isfinite(rotation).all():
        cosines = np.max(np.abs(rotation), axis=0) / norms
        obliquity = float(np.degrees(np.arccos(np.clip(cosines.min(), -1.0, 1.0))))
    return ScanHeader(
        fmt="nifti", rows=shape[0], cols=shape[1], frames=shape[2] if len(shape) > 2 else 1,
        spacing_row=zooms[0] if len(zooms) > 1 else None, spacing_col=zooms[1] if len(zooms) > 1 else None,
        obliquity=obliquity, extra_dims=tuple(shape[3:]),
    )


def read_image_header(path: Path, rel: str, fmt: str) -> ScanHeader:
    """Size and colour mode of a PNG/JPEG file via Pillow (only the header is parsed).

    Raises:
        HeaderProblem: Pillow cannot identify the file.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            cols, rows = im.size
            mode = im.mode
    except Exception as exc:  # noqa: BLE001 - Pillow raises several types for corrupt files
        raise HeaderProblem(rel, f"not a readable {fmt.upper()} file ({type(exc).__name__})", "unreadable") from None
    photometric = "MONOCHROME2" if mode in {"L", "I", "I;16", "I;16B", "F", "1"} else "RGB" if mode.startswith(
        "RGB") else mode
    return ScanHeader(fmt=fmt, rows=rows, cols=cols, photometric=photometric)


def _text(ds: Any, keyword: str) -> str:
    value = ds.get(keyword)
    if value is None:
        return ""
    if not isinstance(value, (str, bytes)) and hasattr(value, "__iter__"):
        value = "\\".join(str(v) for v in value)
    return str(value).strip()


def _raw_text(ds: Any, keyword: str) -> str:
    """An element's text without pydicom's value conversion, whose validation warnings quote the value."""
    elem = ds.get_item(keyword)
    value = getattr(elem, "value", None)
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    return str(value).strip(" \0") if value is not None else ""


def _floats(ds: Any, keyword: str) -> tuple[float, ...] | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    try:
        seq = value if hasattr(value, "__iter__") and not isinstance(value, str) else [value]
        return tuple(float(v) for v in seq)
    except (TypeError, ValueError):
        return None


def merge_fields(df: pd.DataFrame, age_bands: tuple[int, ...]) -> pd.DataFrame:
    """Final subgroup columns: a labels-CSV value (``csv_<name>`` columns) wins over the header's.

    ``sex``, ``age``, ``view`` come from the CSV, else the DICOM tags; ``age_band`` is derived from ``age``;
    ``site`` is the CSV ``site``, else InstitutionName, else Manufacturer + StationName. InstitutionName is
    kept because it is the site label users ask for (subgroup tables); InstitutionAddress is never read.
    The helper columns (``csv_*``, ``institution``, ``station``) are dropped.
    """
    out = df.copy()
    for col in ("sex", "view", "site"):
        csv_col = f"csv_{col}"
        base = _site_from_header(out) if col == "site" else out[col].fillna("").astype(str)
        if csv_col in out.columns:
            given = out[csv_col].fillna("").astype(str)
            base = given.where(given != "", base)
        out[col] = base.to_numpy()
    age = pd.to_numeric(out["age"], errors="coerce")
    if "csv_age" in out.columns:
        age = pd.to_numeric(out["csv_age"], errors="coerce").fillna(age)
    out["age"] = age.astype(float)
    out["age_band"] = [age_band(a, age_bands) for a in out["age"]]
    helpers = [c for c in out.columns if c.startswith("csv_") and c not in ("csv_patient_id", "csv_study_id",
                                                                            "csv_split")]
    return out.drop(columns=[*helpers, "institution", "station"])


def _site_from_header(df: pd.DataFrame) -> pd.Series:
    institution = df["institution"].fillna("").astype(str)
    fallback = (df["manufacturer"].fillna("").astype(str) + " " + df["station"].fillna("").astype(str)).str.strip()
    return institution.where(institution != "", fallback)


def series_problem(slices: list[ScanHeader], *, max_obliquity: float | None = None) -> tuple[str, str] | None:
    """Why these slices of one series cannot form one volume, as ``(problem, reason)``, or None.

    Problems: ``mixed_series`` (sizes, orientations or positions that do not belong to one stack),
    ``series_geometry`` (a missing slice, uneven spacing, gantry tilt: see
    :func:`medtransfer.data.dicom.stack_problem`), ``oblique`` (slices tilted more than ``max_obliquity``
    degrees from the nearest anatomical plane; None: not checked).
    """
    n = len(slices)
    if len({(h.rows, h.cols) for h in slices}) > 1:
        return "mixed_series", (f"the {n} slices of this series differ in size (Rows/Columns); export each size as "
                                "its own series")
    orientations = [h.orientation for h in slices]
    first = orientations[0]
    if any(o is None for o in orientations) and first is not None or any(
        o is not None and (first is None or len(o) != len(first) or not np.allclose(o, first, atol=_VOLUME_TOLERANCE))
        for o in orientations
    ):
        return "mixed_series", (f"the {n} slices of this series have mixed orientations (ImageOrientationPatient); "
                                "split it into one series per orientation")
    if len({tuple(round(p, 3) for p in h.position or ()) for h in slices}) < n:
        return "mixed_series", (f"several of the {n} slices of this series share one position (duplicate files or "
                                "acquisitions)")
    if first is None or len(first) != 6 or any(h.position is None or len(h.position) != 3 for h in slices):
        return None
    problem = stack_problem(first, [h.position for h in slices])  # type: ignore[misc]
    if problem:
        return "series_geometry", problem
    return oblique_problem(obliquity_degrees(first), max_obliquity)


def too_large_reason(shown: str, count: int, limit: int) -> str:
    """The quarantine reason for a volume of ``count`` voxels (``shown``, e.g. ``512x512x3000``) over ``limit``."""
    return (f"volume {shown} has {count:,} voxels ({count * 4 / 2**30:.1f} GiB as float32), more than the "
            f"data.max_volume_voxels limit of {limit:,} ({limit * 4 / 2**30:.1f} GiB): raise it (e.g. --set "
            f"data.max_volume_voxels={_next_power(count)}) on a machine with the memory, or crop the volume")


def _next_power(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def oblique_problem(angle: float | None, max_obliquity: float | None) -> tuple[str, str] | None:
    """``("oblique", reason)`` when ``angle`` (degrees from the nearest anatomical axes) exceeds the tolerance."""
    if angle is None or max_obliquity is None or angle <= max_obliquity:
        return None
    return "oblique", (f"oblique volume: its slices are tilted {angle:.1f} degrees from the nearest axial, coronal "
                       f"or sagittal plane (data.max_obliquity is {max_obliquity:g}); reformat it to straight slices "
                       "(a viewer's MPR, or resampling), or raise data.max_obliquity to read it in its own grid")
