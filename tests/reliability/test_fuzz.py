"""Item 5: fuzzing. Hypothesis mutates DICOM headers (and bytes) and labels CSV rows; whatever it makes, the
readers either succeed (with a sane result) or raise a documented :class:`medtransfer.errors.MedtransferError`,
never anything else. Bounded to a few hundred examples (about 30 s on two shared cores).

DICOM: the header reader, the pixel pipeline and the resize that training applies, on one file.
CSV: ``index_scans`` with the labels CSV (paths, labels, demographics, splits), then the summary the CLI prints.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from medtransfer.config import DataConfig
from medtransfer.errors import MedtransferError
from tests.factories import chest_like, write_dicom

FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                                      HealthCheck.data_too_large])
#: Examples per test; MEDTRANSFER_FUZZ_SCALE=10 runs a longer campaign locally.
_SCALE = float(os.environ.get("MEDTRANSFER_FUZZ_SCALE", "1"))
EXAMPLES = {"dicom": int(250 * _SCALE), "csv": int(200 * _SCALE)}

_SIZES = st.one_of(st.sampled_from([0, 1, 2, 3, 7, 16, 17, 64, 65535]), st.integers(0, 65535))
_NUMBERS = st.one_of(st.sampled_from(["", "0", "-0", "1", "-1", "2", "1e308", "-1e308", "nan", "inf", "abc", "1\\2",
                                      " 12 ", "4096", "-32768"]),
                     st.floats(allow_nan=False, width=32).map(lambda f: f"{f:.6g}"))
#: keyword -> strategy for its new value (None deletes the element)
MUTATIONS: dict[str, st.SearchStrategy] = {
    "Rows": _SIZES, "Columns": _SIZES,
    "BitsAllocated": st.sampled_from([0, 1, 8, 12, 16, 24, 32, 64]),
    "BitsStored": st.integers(0, 40), "HighBit": st.integers(0, 40),
    "PixelRepresentation": st.integers(0, 2), "SamplesPerPixel": st.integers(0, 4),
    "PlanarConfiguration": st.integers(0, 2),
    "PhotometricInterpretation": st.one_of(
        st.sampled_from(["MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL", "YBR_FULL_422",
                         "YBR_PARTIAL_420", "CMYK", "ARGB", "HSV", ""]), st.text(max_size=16)),
    "NumberOfFrames": st.sampled_from(["", "0", "1", "2", "3", "-1", "abc", "2147483647"]),
    "RescaleSlope": _NUMBERS, "RescaleIntercept": _NUMBERS, "WindowCenter": _NUMBERS, "WindowWidth": _NUMBERS,
    "VOILUTFunction": st.sampled_from(["LINEAR", "LINEAR_EXACT", "SIGMOID", "", "BOGUS"]),
    "PresentationLUTShape": st.sampled_from(["IDENTITY", "INVERSE", "", "X"]),
    "Modality": st.one_of(st.sampled_from(["CR", "DX", "CT", "MR", "SR", "RTPLAN", "", "SEG"]), st.text(max_size=8)),
    "SOPClassUID": st.sampled_from(["1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.2",
                                    "1.2.840.10008.5.1.4.1.1.88.11", "1.2.840.10008.1.3.10", "1.2.3", ""]),
    "PatientAge": st.text(max_size=6), "PatientSex": st.text(max_size=3), "InstitutionName": st.text(max_size=20),
    "ViewPosition": st.text(max_size=6),
    "ImagePositionPatient": st.sampled_from([["0", "0", "0"], ["nan", "1", "2"], ["1"], []]),
}
TRANSFER_SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
                     DeflatedExplicitVRLittleEndian, RLELossless, JPEGBaseline8Bit, JPEG2000Lossless, JPEGLSLossless]


@st.composite
def dicom_mutations(draw: st.DrawFn) -> dict:
    keys = draw(st.lists(st.sampled_from(sorted(MUTATIONS)), max_size=6, unique=True))
    return {
        "set": {k: draw(st.one_of(st.none(), MUTATIONS[k])) for k in keys},
        "syntax": draw(st.sampled_from(TRANSFER_SYNTAXES)),
        "pixel_bytes": draw(st.one_of(st.none(), st.integers(0, 2 * 16 * 16 * 2 + 8))),
        "flips": draw(st.lists(st.tuples(st.integers(0, 1200), st.integers(0, 255)), max_size=4)),
        "cut": draw(st.one_of(st.none(), st.integers(0, 1300))),
    }


def _write_mutated(path: Path, m: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid values we write on purpose
        write_dicom(path, chest_like(16, seed=1))
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = m["syntax"]
        try:
            for keyword, value in m["set"].items():
                if value is None:
                    if keyword in ds:
                        delattr(ds, keyword)
                else:
                    setattr(ds, keyword, value)
            if m["pixel_bytes"] is not None:
                data = bytes(ds.PixelData)
                ds.PixelData = (data * 3)[: m["pixel_bytes"] + m["pixel_bytes"] % 2]
            ds.save_as(path, enforce_file_format=True)
        except Exception:  # noqa: BLE001 - pydicom cannot write this combination at all: not a file anyone has
            assume(False)
    raw = bytearray(path.read_bytes())
    for pos, value in m["flips"]:
        if pos < len(raw):
            raw[pos] = value
    if m["cut"] is not None:
        raw = raw[: m["cut"]]
    path.write_bytes(bytes(raw))


@settings(FUZZ, max_examples=EXAMPLES["dicom"])
@given(m=dicom_mutations())
def test_fuzzed_dicom_is_read_or_refused_with_a_documented_error(tmp_path: Path, m: dict) -> None:
    from medtransfer.data.headers import read_dicom_header
    from medtransfer.data.loading import load_case, sniff_format
    from medtransfer.data.spec import InputSpec
    from medtransfer.data.transforms import resize_transforms

    path = tmp_path / "fuzzed.dcm"
    _write_mutated(path, m)
    spec = InputSpec(size=(32, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if sniff_format(path) != "dicom":
                return
            read_dicom_header(path, "fuzzed.dcm", path.stat().st_size)
            array = load_case(path, "dicom", spec)
        except MedtransferError:
            return
        assert array.dtype == np.float32 and np.isfinite(array).all()
        assert 0.0 <= array.min() <= array.max() <= 1.0
        if array.ndim == 3:  # what training does next: resize to input.size
            out = resize_transforms(spec)({"image": array})["image"]
            assert tuple(out.shape) == (1, 32, 32)


# -- labels CSV ---------------------------------------------------------------------------------------------------
GOOD = [f"{c}/good{i}.dcm" for c in "ab" for i in range(4)]
_WEIRD = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
CELLS = {
    "path": st.one_of(st.sampled_from(GOOD), st.sampled_from(["..", "../x", "/etc/passwd", "", " ", "a/../a/good0.dcm",
                                                                "a\\good1.dcm", "./a/good2.dcm", "a//good3.dcm",
                                                                "a", "[/x].dcm"]), _WEIRD),
    "label": st.one_of(st.sampled_from(["a", "b", "normal", "pneumonia", "", "0", "1", "[/x]", "[red]"]), _WEIRD),
    "patient_id": st.one_of(st.sampled_from(["p1", "p2", "", "p1 "]), _WEIRD),
    "study_id": _WEIRD,
    "sex": st.one_of(st.sampled_from(["M", "F", "O", "", "male", "FEMALE", "x"]), _WEIRD),
    "age": st.one_of(st.sampled_from(["45", "045Y", "6M", "", "nan", "-5", "1e9", "200", "abc"]), _WEIRD),
    "site": _WEIRD, "view": _WEIRD,
    "split": st.one_of(st.sampled_from(["train", "val", "test", "", "TEST", "other"]), _WEIRD),
}


@st.composite
def labels_csvs(draw: st.DrawFn) -> bytes:
    optional = draw(st.lists(st.sampled_from(sorted(set(CELLS) - {"path", "label"})), unique=True, max_size=4))
    columns = ["path", "label", *optional]
    if draw(st.booleans()):
        columns.append(draw(_WEIRD))  # an extra column, ignored (or a duplicate / blank header)
    rows = draw(st.lists(st.tuples(*[CELLS.get(c, _WEIRD) for c in columns]), min_size=1, max_size=10))
    if draw(st.booleans()):  # mostly well-formed: every path once, with the first labels
        rows = [(GOOD[i], "ab"[i // 4], *row[2:]) if i < len(GOOD) and draw(st.booleans()) else row
                for i, row in enumerate(rows)]
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(columns)
    writer.writerows(rows)
    text = buf.getvalue()
    if draw(st.booleans()):  # break the CSV itself: a stray quote, a missing comma, a cut line
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.sampled_from(['"', ",", "\n", "", '"\n"'])) + text[at + draw(st.integers(0, 3)):]
    return text.encode(draw(st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "utf-16"])), errors="replace")


@pytest.fixture(scope="module")
def scan_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data = tmp_path_factory.mktemp("fuzz") / "data"
    for i, rel in enumerate(GOOD):
        write_dicom(data / rel, chest_like(16, seed=i), patient_id=f"P{i}")
    return data


@settings(FUZZ, max_examples=EXAMPLES["csv"])
@given(content=labels_csvs())
def test_fuzzed_labels_csv_is_indexed_or_refused_with_a_documented_error(scan_folder: Path, tmp_path: Path,
                                                                        content: bytes) -> None:
    from rich.console import Console

    from medtransfer.data.discovery import index_scans
    from medtransfer.data.summary import render_summary

    labels = tmp_path / "labels.csv"
    labels.write_bytes(content)
    try:
        manifest = index_scans(scan_folder, labels=labels, config=DataConfig(verify_pixels=False))
    except MedtransferError:
        return
    assert set(manifest.df["path"]) <= set(GOOD)
    render_summary(manifest, Console(file=io.StringIO(), width=100))  # what the CLI prints next
