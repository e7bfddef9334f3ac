"""``load_case`` / ``sniff_format`` on pydicom's and nibabel's corpora and on generated nasty files."""

from __future__ import annotations

import collections
import os
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import JPEG2000, BasicTextSRStorage

from medtransfer.data.loading import load_case, sniff_format
from medtransfer.data.spec import InputSpec
from medtransfer.errors import ScanReadError
from tests.factories import chest_like, read_back, write_dicom, write_nifti, write_png

#: Families that must load: CT/MR, JPEG 2000, RLE, JPEG-LS, JPEG baseline YBR, big endian, multi-frame, palette.
MUST_LOAD = (
    "CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm",
    "MR_small_bigendian.dcm", "SC_rgb_jpeg_dcmtk.dcm", "SC_rgb_rle_2frame.dcm", "examples_ybr_color.dcm",
    "examples_palette.dcm", "SC_rgb_jpeg.dcm", "image_dfl.dcm",
)
#: Present only with the optional pydicom-data package; checked when they exist.
MUST_LOAD_IF_PRESENT = ("emri_small.dcm", "emri_small_RLE.dcm", "SC_rgb.dcm", "JPEGLSNearLossless_16.dcm")
MUST_REFUSE = ("reportsi.dcm", "MR_truncated.dcm", "rtplan.dcm", "waveform_ecg.dcm", "README.txt")

# The exact outcome on pydicom's own corpus, measured with pydicom 3.0.2 (176 files, the optional pydicom-data
# package absent) and the decoders of medtransfer[dicom-codecs] (pylibjpeg 2.1.0, pylibjpeg-libjpeg 2.5.0,
# pylibjpeg-openjpeg 2.6.0, pylibjpeg-rle 2.2.0). The corpus is fixed for a pydicom version; another version,
# pydicom-data, or other decoder plugins may change it: then re-measure (run this test with -s, it prints every
# outcome) and update these numbers together with the version above.
CORPUS_PYDICOM = "3.0.2"
CORPUS_FILES = 176
CORPUS_LOADED = 79
_TINY_ALPHA = "dicomdirtests/TINY_ALPHA/PT000000/ST000000/SE000000/IM0000"
_NOT_DICOM = "not a DICOM file"
_NO_PIXELS = "no PixelData element"
_DOSE = "SOP class 'RT Dose Storage'"
_DICOMDIR = "SOP class 'Media Storage Directory Storage'"
#: Every file refused (path relative to pydicom's test_files folder) -> words its reason must contain.
CORPUS_REFUSED: dict[str, str] = {
    **dict.fromkeys(("README.txt", "crayons.icc", "dicomdirtests/README.txt", "dicomdirtests/TINY_ALPHA/README",
                     "no_meta.dcm", "rtplan.dump", "rtstruct.dump", "test1.json", "test_PN.json", "zipMR.gz"),
                    _NOT_DICOM),
    # the 50 DICOMDIR test records IM000000 ... IM00001D (base 36) carry headers only
    **{f"{_TINY_ALPHA}{i // 36}{'0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ'[i % 36]}": _NO_PIXELS for i in range(50)},
    **dict.fromkeys(("UN_sequence.dcm", "empty_charset_LEI.dcm", "no_meta_group_length.dcm", "priv_SQ.dcm"),
                    _NO_PIXELS),
    **dict.fromkeys(("meta_missing_tsyntax.dcm", "nested_priv_SQ.dcm"), "PixelData without Rows/Columns"),
    "MR_truncated.dcm": "the file is truncated",
    # lossy 12-bit JPEG and a J2K stream with an embedded delimiter: no installed decoder accepts them
    **dict.fromkeys(("JPEG-lossy.dcm", "JPEG2000-embedded-sequence-delimiter.dcm"), "could not be decoded"),
    # a CT whose own VOI window lies outside its pixel values
    **dict.fromkeys(("dicomdirtests/77654033/CT2/17166", "dicomdirtests/77654033/CT2/17196"),
                    "maps every pixel to the same value"),
    **dict.fromkeys(("badVR.dcm", "rtdose.dcm", "rtdose_1frame.dcm", "rtdose_expb.dcm", "rtdose_expb_1frame.dcm",
                     "rtdose_rle.dcm", "rtdose_rle_1frame.dcm"), _DOSE),
    **dict.fromkeys(("dicomdirtests/DICOMDIR", "dicomdirtests/DICOMDIR-bigEnd", "dicomdirtests/DICOMDIR-empty.dcm",
                     "dicomdirtests/DICOMDIR-implicit", "dicomdirtests/DICOMDIR-nooffset",
                     "dicomdirtests/DICOMDIR-nopatient", "dicomdirtests/DICOMDIR-reordered",
                     "dicomdirtests/TINY_ALPHA/DICOMDIR"), _DICOMDIR),
    **dict.fromkeys(("rtplan.dcm", "rtplan_truncated.dcm"), "SOP class 'RT Plan Storage'"),
    **dict.fromkeys(("ExplVR_BigEndNoMeta.dcm", "ExplVR_LitEndNoMeta.dcm"), "SOP class 'RT Ion Plan Storage'"),
    "rtstruct.dcm": "SOP class 'RT Structure Set Storage'",
    **dict.fromkeys(("reportsi.dcm", "reportsi_with_empty_number_tags.dcm"), "SOP class 'Basic Text SR Storage'"),
    "test-SR.dcm": "SOP class 'Comprehensive SR Storage'",
    **dict.fromkeys(("liver_1frame.dcm", "liver_expb_1frame.dcm"), "SOP class 'Segmentation Storage'"),
    "waveform_ecg.dcm": "SOP class '12-lead ECG Waveform Storage'",
}


def _corpus_versions() -> str:
    """pydicom's version and its decoder plugins' (what decides the corpus and what decodes)."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for dist in ("pydicom", "pydicom-data", "pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle",
                 "python-gdcm", "pillow"):
        try:
            found.append(f"{dist} {version(dist)}")
        except PackageNotFoundError:
            continue
    return ", ".join(found)


def _expected_shape(path: str) -> tuple[int, ...]:
    ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
    frames = int(ds.get("NumberOfFrames") or 1)
    rows, cols = int(ds.Rows), int(ds.Columns)
    return (1, rows, cols) if frames == 1 else (1, frames, rows, cols)


def test_pydicom_corpus_loads_or_refuses_with_reason():
    import pydicom.data

    files = [f for f in pydicom.data.get_testdata_files() if os.path.isfile(f)]
    root = os.path.commonpath(files)
    assert len(files) > 100
    loaded, refused, cr_mono1 = set(), collections.Counter(), 0
    reasons: dict[str, str] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the corpus' deliberately odd files
        for f in files:
            fmt = sniff_format(f)
            try:
                arr = load_case(Path(f), fmt or "dicom", InputSpec())
            except ScanReadError as exc:
                assert exc.reason.strip(), f
                refused[exc.reason.split("(")[0].split(":")[0][:60]] += 1
                reasons[Path(os.path.relpath(f, root)).as_posix()] = exc.reason
                continue
            assert fmt == "dicom", f
            assert arr.dtype == np.float32 and arr.shape == _expected_shape(f), (f, arr.shape)
            assert np.isfinite(arr).all() and arr.min() >= 0 and arr.max() <= 1 and arr.max() > arr.min(), f
            loaded.add(os.path.basename(f))
            hdr = pydicom.dcmread(f, stop_before_pixels=True, force=True)
            cr_mono1 += hdr.get("Modality") == "CR" and hdr.get("PhotometricInterpretation") == "MONOCHROME1"
    print(f"\npydicom corpus: {len(files)} files, {len(loaded)} loaded, {sum(refused.values())} refused")
    for reason, n in refused.most_common():
        print(f"  refused {n:3d} x {reason}")
    # exact, for the pinned corpus: a file that stops loading (or starts loading) is a change to look at
    pinned = (f"measured with pydicom {CORPUS_PYDICOM} and the dicom-codecs decoders; this run has "
              f"{_corpus_versions()}. If a version changed, the corpus or the decoders did: re-measure and update "
              "CORPUS_* in this file; if not, medtransfer's loading changed")
    assert len(files) == CORPUS_FILES, f"pydicom's corpus has {len(files)} files, not {CORPUS_FILES} ({pinned})"
    unexpected = {k: v for k, v in reasons.items() if k not in CORPUS_REFUSED}
    not_refused = sorted(set(CORPUS_REFUSED) - set(reasons))
    assert not unexpected and not not_refused, (
        f"refused but not expected to be: {unexpected}; expected to be refused but were not: {not_refused} ({pinned})")
    wrong = {k: (reasons[k], words) for k, words in CORPUS_REFUSED.items() if words not in reasons[k]}
    assert not wrong, f"refused for another reason than expected (reason, expected words): {wrong}"
    assert len(loaded) == CORPUS_LOADED, f"{len(loaded)} files loaded, not {CORPUS_LOADED} ({pinned})"
    assert cr_mono1 >= 1
    missing = [n for n in MUST_LOAD if n not in loaded]
    present = {os.path.basename(f) for f in files}  # get_testdata_file() would try to download the rest
    missing += [n for n in MUST_LOAD_IF_PRESENT if n in present and n not in loaded]
    assert not missing, f"expected to load: {missing}"
    assert not [n for n in MUST_REFUSE if n in loaded]


def test_nibabel_corpus_loads_or_refuses_with_reason():
    from nibabel.testing import data_path

    outcomes = {}
    for name in sorted(os.listdir(data_path)):
        if not name.endswith((".nii", ".nii.gz")):
            continue
        path = Path(data_path) / name
        assert sniff_format(path) == "nifti", name
        try:
            arr = load_case(path, "nifti", InputSpec())
        except ScanReadError as exc:
            assert exc.reason.strip()
            outcomes[name] = f"refused: {exc.reason[:70]}"
            continue
        assert arr.dtype == np.float32 and arr.ndim in (3, 4) and arr.shape[0] == 1
        assert np.isfinite(arr).all() and 0 <= arr.min() < arr.max() <= 1
        outcomes[name] = f"loaded {arr.shape}"
    print("\nnibabel corpus:", *(f"\n  {k}: {v}" for k, v in outcomes.items()))
    assert outcomes["anatomical.nii"].startswith("loaded")
    assert "4D" in outcomes["example4d.nii.gz"]


def test_sniff_format(tmp_path):
    assert sniff_format(write_dicom(tmp_path / "a.dcm", chest_like(16))) == "dicom"
    assert sniff_format(write_dicom(tmp_path / "raw", chest_like(16), preamble=False)) == "dicom"
    assert sniff_format(write_png(tmp_path / "a.png", chest_like(16, dtype=np.uint8, max_value=255))) == "png"
    assert sniff_format(write_nifti(tmp_path / "a.nii", np.zeros((4, 4, 4), np.float32))) == "nifti"
    assert sniff_format(write_nifti(tmp_path / "a.nii.gz", np.zeros((4, 4, 4), np.float32))) == "nifti"
    from PIL import Image

    Image.fromarray(chest_like(16, dtype=np.uint8, max_value=255)).save(tmp_path / "x.jpg")
    assert sniff_format(tmp_path / "x.jpg") == "jpeg"
    (tmp_path / "notes.txt").write_text("not a scan\n" * 50)
    (tmp_path / "empty").write_bytes(b"")
    assert sniff_format(tmp_path / "notes.txt") is None
    assert sniff_format(tmp_path / "empty") is None
    assert sniff_format(tmp_path) is None


def test_raw_dicom_without_preamble_loads(tmp_path):
    img = chest_like(32)
    a = load_case(write_dicom(tmp_path / "raw", img, preamble=False), "dicom", InputSpec(window="minmax"))
    b = load_case(write_dicom(tmp_path / "std.dcm", img), "dicom", InputSpec(window="minmax"))
    np.testing.assert_array_equal(a, b)


def _refused(path, fmt="dicom", **spec) -> str:
    with pytest.raises(ScanReadError) as info:
        load_case(path, fmt, InputSpec(**spec))
    assert info.value.reason.strip()
    return info.value.reason


def test_nasty_dicoms_are_refused_with_reasons(tmp_path):
    (tmp_path / "zero.dcm").write_bytes(b"")
    assert "empty file" in _refused(tmp_path / "zero.dcm")

    full = write_dicom(tmp_path / "trunc.dcm", chest_like(64))
    data = full.read_bytes()
    full.write_bytes(data[: len(data) - 64 * 64])  # cut half of the 8 KiB of pixel data
    assert "truncated" in _refused(full)

    nopix = write_dicom(tmp_path / "nopix.dcm", chest_like(16))
    ds = read_back(nopix)
    del ds.PixelData
    ds.save_as(nopix)
    assert "no PixelData" in _refused(nopix)

    sr = write_dicom(tmp_path / "sr.dcm", chest_like(16), sop_class=BasicTextSRStorage, modality="SR")
    ds = read_back(sr)
    del ds.PixelData
    ds.save_as(sr)
    assert "Basic Text SR Storage" in _refused(sr)

    assert "constant image" in _refused(write_dicom(tmp_path / "flat.dcm", np.full((16, 16), 7, np.uint16)))

    huge = write_dicom(tmp_path / "huge.dcm", chest_like(16))
    ds = read_back(huge)
    ds.Rows = ds.Columns = 60000
    ds.PixelData = b"\0" * 10
    ds.save_as(huge)
    assert "10 bytes" in _refused(huge)


def test_jpeg2000_decodes_and_missing_decoder_names_the_extra(monkeypatch):
    from pydicom.data import get_testdata_file
    from pydicom.pixels import get_decoder

    path = Path(get_testdata_file("JPEG2000.dcm"))
    arr = load_case(path, "dicom", InputSpec())
    assert arr.shape == (1, 1024, 256) and arr.std() > 0.01
    # Simulate an install without the codecs: pydicom's J2K decoder then has no plugin at all, so pydicom
    # itself would fail too; the reason must say how to install them.
    monkeypatch.setattr(get_decoder(JPEG2000), "_available", {})
    reason = _refused(path)
    assert 'pip install "medtransfer[dicom-codecs]"' in reason and "JPEG 2000" in reason


def test_nifti_volume_orientation_and_shape(tmp_path):
    rng = np.random.default_rng(0)
    vol = rng.random((6, 7, 5)).astype(np.float32)  # (x, y, z) in RAS
    a = load_case(write_nifti(tmp_path / "ras.nii.gz", vol), "nifti", InputSpec(window="minmax"))
    flipped = np.diag([-1.0, 1.0, 1.0, 1.0])
    flipped[0, 3] = 5.0  # LAS: x stored right-to-left
    b = load_case(write_nifti(tmp_path / "las.nii.gz", vol[::-1].copy(), affine=flipped), "nifti",
                  InputSpec(window="minmax"))
    assert a.shape == (1, 5, 7, 6)  # (C, D=z, H=y, W=x)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_nifti_single_slice_is_2d_and_4d_refused(tmp_path):
    img = chest_like(32).astype(np.float32)
    assert load_case(write_nifti(tmp_path / "one.nii", img[:, :, None]), "nifti", InputSpec()).shape == (1, 32, 32)
    four = np.stack([img[:, :, None]] * 2, axis=-1)
    assert "4D" in _refused(write_nifti(tmp_path / "four.nii", four), "nifti")


def test_nifti_nan(tmp_path):
    assert "NaN" in _refused(write_nifti(tmp_path / "nan.nii", np.full((4, 4, 4), np.nan, np.float32)), "nifti")
    vol = np.random.default_rng(1).random((8, 8, 8)).astype(np.float32)
    vol[0, 0, :] = np.nan
    vol[1, 1, 1] = np.inf
    out = load_case(write_nifti(tmp_path / "some.nii", vol), "nifti", InputSpec(window="minmax"))
    assert np.isfinite(out).all() and out.shape == (1, 8, 8, 8) and out.max() == 1


def test_png_8bit_16bit_and_rgb(tmp_path):
    grey8 = chest_like(32, dtype=np.uint8, max_value=255)
    out = load_case(write_png(tmp_path / "g8.png", grey8), "png", InputSpec())
    np.testing.assert_allclose(out[0], grey8 / 255, atol=1e-6)

    grey16 = chest_like(32, max_value=60000)
    out16 = load_case(write_png(tmp_path / "g16.png", grey16), "png", InputSpec(window="minmax"))
    x = grey16.astype(np.float64)
    np.testing.assert_allclose(out16[0], (x - x.min()) / (x.max() - x.min()), atol=1e-5)

    rgb = np.stack([grey8, grey8 // 2, 255 - grey8], axis=-1).astype(np.uint8)
    out_rgb = load_case(write_png(tmp_path / "rgb.png", rgb), "png", InputSpec())
    assert out_rgb.shape == (1, 32, 32)
    np.testing.assert_allclose(out_rgb[0], (rgb @ np.array([0.299, 0.587, 0.114])) / 255, atol=1e-5)

    assert "constant" in _refused(write_png(tmp_path / "flat.png", np.full((8, 8), 9, np.uint8)), "png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)
    assert "not a readable image" in _refused(tmp_path / "bad.png", "png")


def test_dicom_series_folder(tmp_path):
    for k in range(3):
        write_dicom(tmp_path / "series" / f"{k}.dcm", chest_like(16, seed=k), position=(0, 0, float(k)),
                    orientation=(1, 0, 0, 0, 1, 0), series_uid="1.2.3")
    assert load_case(tmp_path / "series", "dicom", InputSpec()).shape == (1, 3, 16, 16)
    write_dicom(tmp_path / "series" / "other.dcm", chest_like(16), position=(0, 0, 3.0), orientation=(1, 0, 0, 0, 1, 0))
    assert "mix 2 series" in _refused(tmp_path / "series")  # a second series in the folder
    (tmp_path / "none").mkdir()
    assert "no files" in _refused(tmp_path / "none")
