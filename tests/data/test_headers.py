"""Header reading: field parsing, pixel-data presence/truncation checks without decoding, NIfTI/PNG headers."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pydicom.data
import pytest
from pydicom.uid import BasicTextSRStorage, GrayscaleSoftcopyPresentationStateStorage

from medtransfer.data.headers import (
    HeaderProblem,
    age_band,
    merge_fields,
    parse_age,
    parse_sex,
    read_dicom_header,
    read_image_header,
    read_nifti_header,
)
from medtransfer.data.privacy import pseudonym
from medtransfer.errors import ScanReadError
from tests.factories import CANARIES, CANARY_ID, chest_like, write_dicom, write_nifti, write_png


@pytest.mark.parametrize(
    ("value", "years"),
    [("045Y", 45.0), ("006M", 0.5), ("010W", 0.19), ("003D", 0.01), ("45", 45.0), ("62.5", 62.5), ("", None),
     (None, None), ("abc", None), ("200Y", None), ("-3", None), ("nan", None)],
)
def test_parse_age(value, years) -> None:
    assert parse_age(value) == (pytest.approx(years, abs=0.005) if years is not None else None)


@pytest.mark.parametrize(("value", "sex"), [("M", "M"), ("f", "F"), (" Female ", "F"), ("other", "O"), ("O", "O"),
                                            ("", ""), ("U", ""), (None, "")])
def test_parse_sex(value, sex: str) -> None:
    assert parse_sex(value) == sex


@pytest.mark.parametrize(("age", "band"), [(0.5, "0-17"), (17.99, "0-17"), (18, "18-39"), (59.9, "40-59"),
                                           (79.99, "60-79"), (80, "80+"), (101, "80+"), (None, ""), (float("nan"), "")])
def test_age_band_labels(age, band: str) -> None:
    assert age_band(age, (18, 40, 60, 80)) == band


def test_age_band_custom_edges() -> None:
    assert [age_band(a, (65,)) for a in (10, 64.5, 65)] == ["0-64", "0-64", "65+"]


def _read(path: Path):
    return read_dicom_header(path, path.name, path.stat().st_size)


def test_dicom_header_fields_are_read_and_identifiers_pseudonymised(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "a.dcm", chest_like(24), sex="F", age="045Y", view="PA", modality="DX",
                       manufacturer="ACME", institution="General Hospital", StationName="ST1",
                       PixelSpacing=[0.25, 0.3])
    h = _read(path)
    assert (h.fmt, h.modality, h.sex, h.age, h.view, h.institution, h.manufacturer, h.station) == (
        "dicom", "DX", "F", 45.0, "PA", "General Hospital", "ACME", "ST1")
    assert (h.rows, h.cols, h.frames, h.spacing_row, h.spacing_col, h.photometric) == (24, 24, 1, 0.25, 0.3,
                                                                                       "MONOCHROME2")
    assert h.patient_key == pseudonym(CANARY_ID, kind="patient") and len(h.study_key) == 12
    assert not any(c in repr(h) for c in CANARIES)
    assert not h.is_volume_slice


def test_ct_slice_and_multiframe(tmp_path: Path) -> None:
    ct = write_dicom(tmp_path / "ct.dcm", chest_like(16, dtype=np.int16), modality="CT", position=(0, 0, 1.5),
                     orientation=(1, 0, 0, 0, 1, 0))
    mf = write_dicom(tmp_path / "mf.dcm", np.stack([chest_like(16)] * 3), modality="CT", position=(0, 0, 0))
    assert _read(ct).is_volume_slice and _read(ct).position == (0.0, 0.0, 1.5)
    assert _read(mf).frames == 3 and not _read(mf).is_volume_slice


def test_raw_dicom_without_preamble_is_read(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "raw", chest_like(16), preamble=False, sex="M")
    assert _read(path).sex == "M" and _read(path).rows == 16


def test_truncated_pixel_data_is_detected_without_decoding(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "t.dcm", chest_like(32))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(HeaderProblem, match="truncated: pixel data needs 2048 bytes but the file has 1948") as exc:
        _read(path)
    assert exc.value.problem == "truncated" and isinstance(exc.value, ScanReadError) and exc.value.path == "t.dcm"


#: pydicom's bundled test files (read from the package folder: pydicom's own look-ups may try to download).
CORPUS = Path(pydicom.data.__file__).parent / "test_files"


def _corpus_file(name: str, tmp_path: Path) -> Path:
    """A copy of one of pydicom's bundled test files."""
    out = tmp_path / name
    out.write_bytes((CORPUS / name).read_bytes())
    return out


def test_compressed_pixel_data_is_not_held_to_the_uncompressed_length(tmp_path: Path) -> None:
    # JPEG Baseline written (by highdicom 0.1.0) in implicit VR under an explicit-VR transfer syntax: the old
    # check read the item tag of the first fragment as a 65535-byte length and quarantined it as truncated
    path = _corpus_file("SC_rgb_jpeg.dcm", tmp_path)
    header = _read(path)
    assert (header.rows, header.cols, header.photometric) == (256, 256, "RGB")
    path.write_bytes(path.read_bytes()[:-500])  # a cut fragment is the decoder's to find (verify_pixels)
    assert _read(path).rows == 256


def test_no_encapsulated_corpus_file_is_called_truncated() -> None:
    seen = 0
    for path in sorted(CORPUS.rglob("*.dcm")):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pydicom warns about the corpus' deliberately odd files
                syntax = pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
        except Exception:  # noqa: BLE001 - files without a readable meta header are not what this test is about
            continue
        if not syntax.is_encapsulated:
            continue
        seen += 1
        try:
            _read(path)
        except HeaderProblem as exc:
            assert exc.problem != "truncated", (path.name, exc.reason)
    assert seen >= 20


def _implicit_under_explicit(path: Path) -> Path:
    """A native image whose meta header says Explicit VR Little Endian but whose dataset is implicit VR."""
    from pydicom.filebase import DicomFileLike
    from pydicom.filewriter import write_dataset, write_file_meta_info

    ds = pydicom.dcmread(write_dicom(path, chest_like(16)))
    with open(path, "wb") as fh:
        fh.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(DicomFileLike(fh), ds.file_meta)
        body = DicomFileLike(fh)
        body.is_little_endian, body.is_implicit_VR = True, True
        write_dataset(body, ds)
    return path


def test_native_length_is_read_as_the_element_is_written(tmp_path: Path) -> None:
    path = _implicit_under_explicit(tmp_path / "m.dcm")
    with pytest.warns(UserWarning, match="found implicit VR"):  # pydicom notices the mismatch too
        assert str(pydicom.dcmread(path).file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.1"
    assert _read(path).rows == 16  # was "pixel data element is empty" (bytes 6-7 of a 4-byte length)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(HeaderProblem, match="needs 512 bytes but the file has 412") as exc:
        _read(path)
    assert exc.value.problem == "truncated"
    with pytest.raises(HeaderProblem, match="needs 8192 bytes but the file has 8130"):
        _read(_corpus_file("MR_truncated.dcm", tmp_path))  # native explicit VR, truly cut short


@pytest.mark.parametrize(("sop", "modality"), [(BasicTextSRStorage, "SR"), (BasicTextSRStorage, "OT"),
                                               (GrayscaleSoftcopyPresentationStateStorage, "PR"),
                                               ("1.2.840.10008.5.1.4.1.1.481.5", "RTPLAN")])
def test_non_image_objects_are_refused(tmp_path: Path, sop: str, modality: str) -> None:
    path = write_dicom(tmp_path / "x.dcm", chest_like(16), sop_class=sop, modality=modality)
    with pytest.raises(HeaderProblem, match="not an image") as exc:
        _read(path)
    assert exc.value.problem == "non_image"


def test_missing_pixel_data_rows_and_garbage(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "p.dcm", chest_like(16))
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    with pytest.raises(HeaderProblem, match="no pixel data element") as exc:
        _read(path)
    assert exc.value.problem == "no_pixels"
    path = write_dicom(tmp_path / "r.dcm", chest_like(16))
    ds = pydicom.dcmread(path)
    del ds.Columns
    ds.save_as(path)
    with pytest.raises(HeaderProblem, match="no Rows/Columns"):
        _read(path)
    garbage = tmp_path / "g.dcm"
    garbage.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\x7f")
    with pytest.raises(HeaderProblem) as exc:
        _read(garbage)
    assert exc.value.problem in {"unreadable", "no_pixels"}


def test_dicomdir_by_sop_class_is_not_a_scan(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "index", chest_like(16), sop_class="1.2.840.10008.1.3.10")
    assert _read(path) is None


def test_nifti_and_png_headers(tmp_path: Path) -> None:
    nii = write_nifti(tmp_path / "v.nii.gz", np.zeros((10, 12, 5), np.float32), affine=np.diag([0.7, 0.8, 2.0, 1]))
    h = read_nifti_header(nii, "v.nii.gz")
    assert (h.fmt, h.rows, h.cols, h.frames) == ("nifti", 10, 12, 5)
    assert h.spacing_row == pytest.approx(0.7) and h.spacing_col == pytest.approx(0.8)
    png = write_png(tmp_path / "x.png", np.zeros((20, 30), np.uint8))
    h = read_image_header(png, "x.png", "png")
    assert (h.rows, h.cols, h.photometric) == (20, 30, "MONOCHROME2")
    (tmp_path / "bad.nii").write_bytes(b"x" * 400)
    with pytest.raises(HeaderProblem, match="not a readable NIfTI"):
        read_nifti_header(tmp_path / "bad.nii", "bad.nii")


def test_merge_fields_prefers_csv_then_header_then_fallbacks() -> None:
    df = pd.DataFrame({
        "sex": ["F", "M", ""], "age": [45.0, None, 30.0], "view": ["PA", "", "AP"],
        "institution": ["Hosp", "", ""], "manufacturer": ["ACME", "ACME", ""], "station": ["", "ST2", ""],
        "csv_sex": ["", "F", ""], "csv_age": [np.nan, 81.0, np.nan], "csv_site": ["", "", "SiteZ"],
        "csv_patient_id": ["p", "q", "r"],
    })
    out = merge_fields(df, (18, 40, 60, 80))
    assert out["sex"].tolist() == ["F", "F", ""]
    assert out["age_band"].tolist() == ["40-59", "80+", "18-39"]
    assert out["site"].tolist() == ["Hosp", "ACME ST2", "SiteZ"]
    assert "csv_sex" not in out.columns and "institution" not in out.columns and "csv_patient_id" in out.columns
