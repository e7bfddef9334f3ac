"""The DICOM pixel pipeline: modality LUT → VOI → [0, 1] → MONOCHROME1 inversion, on real files."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from medtransfer.data.dicom import LUMA, read_dicom_pixels, window_to_unit
from medtransfer.data.spec import InputSpec
from medtransfer.errors import ScanReadError
from tests.factories import chest_like, read_back, write_dicom

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def _read(path, **spec):
    return read_dicom_pixels([path], InputSpec(**spec))


@pytest.mark.parametrize(
    ("window", "function", "atol"),
    [("file", "LINEAR_EXACT", 1e-6), ("file", "LINEAR", 1 / 2999 + 1e-6), ("file", "SIGMOID", 1e-6),
     ("minmax", None, 1e-6), ("percentile", None, 1e-6)],
)
def test_monochrome1_twin_equals_monochrome2(tmp_path, window, function, atol):
    img = chest_like(64, max_value=4095)
    twin = (4095 - img).astype(np.uint16)  # MONOCHROME1: the same image with minimum = white
    extra = {"VOILUTFunction": function} if function else {}
    m2 = write_dicom(tmp_path / "m2.dcm", img, window=(2000, 3000), **extra)
    m1 = write_dicom(tmp_path / "m1.dcm", twin, photometric="MONOCHROME1", window=(4095 - 2000, 3000), **extra)
    a2, info2 = _read(m2, window=window)
    a1, info1 = _read(m1, window=window)
    assert info1["inverted"] and not info2["inverted"]
    np.testing.assert_allclose(a1, a2, atol=atol)
    assert a2.std() > 0.05


def test_monochrome1_kept_when_inversion_off(tmp_path):
    img = chest_like(32)
    path = write_dicom(tmp_path / "m1.dcm", img, photometric="MONOCHROME1")
    inverted, _ = _read(path, window="minmax")
    kept, info = _read(path, window="minmax", invert_monochrome1=False)
    assert not info["inverted"]
    np.testing.assert_allclose(kept, 1 - inverted, atol=1e-6)


@pytest.mark.parametrize(
    ("function", "expected"),
    [
        # HU = stored - 1024 = [-1024, -24, 0, 40, 976]; window 20/80 (PS3.3 C.11.2.1.3.2): (x - c) / w + 0.5
        ("LINEAR_EXACT", [0.0, 0.0, 0.25, 0.75, 1.0]),
        # C.11.2.1.2.1: ((x - (c - 0.5)) / (w - 1) + 0.5), clipped
        ("LINEAR", [0.0, 0.0, (0 - 19.5) / 79 + 0.5, (40 - 19.5) / 79 + 0.5, 1.0]),
    ],
)
def test_rescale_is_applied_before_the_window(tmp_path, function, expected):
    stored = np.array([[0, 1000, 1024, 1064, 2000]], dtype=np.uint16)
    path = write_dicom(tmp_path / "ct.dcm", stored, modality="CT", slope=1, intercept=-1024,
                       window=(20, 80), VOILUTFunction=function)
    out, info = _read(path)
    np.testing.assert_allclose(out[0], expected, atol=1e-6)
    assert info["modality_lut"] == "rescale" and "20/80" in info["window"]
    # Windowing the stored values instead would put every non-zero pixel above the window:
    assert not np.allclose(window_to_unit(stored[0].astype(np.float32), 20, 80, function), expected)


def test_slope_scales_before_window(tmp_path):
    stored = np.array([[0, 256, 512, 600]], dtype=np.uint16)  # slope 2, intercept -1024 -> [-1024, -512, 0, 176]
    path = write_dicom(tmp_path / "s.dcm", stored, slope=2, intercept=-1024)
    out, _ = _read(path, window="fixed", window_center=0, window_width=2048)
    np.testing.assert_allclose(out[0], [0.0, 0.25, 0.5, 176 / 2048 + 0.5], atol=1e-6)


def test_sigmoid_window(tmp_path):
    stored = np.array([[0, 100, 200, 300]], dtype=np.uint16)
    path = write_dicom(tmp_path / "sig.dcm", stored, window=(150, 100), VOILUTFunction="SIGMOID")
    out, _ = _read(path)
    x = stored[0].astype(float)
    np.testing.assert_allclose(out[0], 1 / (1 + np.exp(-4 * (x - 150) / 100)), atol=1e-6)


def test_window_modes(tmp_path):
    img = chest_like(48, max_value=4000)
    path = write_dicom(tmp_path / "w.dcm", img, window=(1000, 500), VOILUTFunction="LINEAR_EXACT")
    x = img.astype(np.float64)
    file_, info = _read(path)
    np.testing.assert_allclose(file_, np.clip((x - 1000) / 500 + 0.5, 0, 1), atol=1e-6)
    minmax, _ = _read(path, window="minmax")
    np.testing.assert_allclose(minmax, (x - x.min()) / (x.max() - x.min()), atol=1e-6)
    lo, hi = np.percentile(x, (2, 98))
    pct, _ = _read(path, window="percentile", percentiles=(2, 98))
    np.testing.assert_allclose(pct, np.clip((x - lo) / (hi - lo), 0, 1), atol=1e-5)
    fixed, _ = _read(path, window="fixed", window_center=2000, window_width=1000)
    np.testing.assert_allclose(fixed, np.clip((x - 2000) / 1000 + 0.5, 0, 1), atol=1e-6)
    assert info["window"].startswith("file window")


def test_file_window_falls_back_to_percentile(tmp_path):
    img = chest_like(32)
    out, info = _read(write_dicom(tmp_path / "nowin.dcm", img))
    expected, _ = _read(write_dicom(tmp_path / "same.dcm", img), window="percentile")
    assert info["window"].startswith("percentile")
    np.testing.assert_array_equal(out, expected)


def test_voi_lut_sequence(tmp_path):
    stored = np.array([[0, 10, 20, 30, 99]], dtype=np.uint16)
    path = write_dicom(tmp_path / "lut.dcm", stored)
    ds = read_back(path)
    item = Dataset()
    item.add_new(0x00283002, "US", [50, 10, 16])  # LUTDescriptor: 50 entries, first input value 10
    item.add_new(0x00283006, "US", [2 * i for i in range(50)])  # LUTData: output 0..98
    ds.VOILUTSequence = Sequence([item])
    ds.save_as(path)
    out, info = _read(path)
    # inputs below the first entry map to entry 0, above the last to entry 49 (PS3.3 C.11.2.1.1)
    np.testing.assert_allclose(out[0], [0.0, 0.0, 20 / 98, 40 / 98, 1.0], atol=1e-6)
    assert info["window"] == "VOI LUT Sequence"


def test_12_bit_stored_in_16_allocated(tmp_path):
    clean = chest_like(32, max_value=4095)
    dirty = clean | np.uint16(0xF000)  # garbage in the 4 unused high bits (PS3.5 8.1.1)
    a, info = _read(write_dicom(tmp_path / "clean.dcm", clean, bits_stored=12), window="minmax")
    b, _ = _read(write_dicom(tmp_path / "dirty.dcm", dirty, bits_stored=12), window="minmax")
    np.testing.assert_array_equal(a, b)
    assert info["bits_stored"] == 12


def test_signed_int16(tmp_path):
    hu = np.linspace(-1000, 1000, 64 * 64).reshape(64, 64).astype(np.int16)
    path = write_dicom(tmp_path / "ct.dcm", hu, modality="CT", slope=1, intercept=0,
                       window=(0, 2000), VOILUTFunction="LINEAR_EXACT")
    out, _ = _read(path)
    np.testing.assert_allclose(out, hu / 2000 + 0.5, atol=1e-6)


def test_multi_frame_with_per_frame_rescale(tmp_path):
    frames = np.stack([chest_like(32, seed=i) for i in range(3)])
    path = write_dicom(tmp_path / "mf.dcm", frames)
    ds = read_back(path)
    shared, per = Dataset(), []
    shared.PixelValueTransformationSequence = Sequence([_rescale_item(1.0, 0.0)])
    for intercept in (0.0, 100.0, -100.0):
        group = Dataset()
        group.PixelValueTransformationSequence = Sequence([_rescale_item(1.0, intercept)])
        per.append(group)
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    ds.PerFrameFunctionalGroupsSequence = Sequence(per)
    ds.save_as(path)
    out, info = _read(path, window="fixed", window_center=2000, window_width=8000)
    assert out.shape == (3, 32, 32) and info["frames"] == 3
    for i, intercept in enumerate((0.0, 100.0, -100.0)):
        np.testing.assert_allclose(out[i], (frames[i] + intercept - 2000) / 8000 + 0.5, atol=1e-6)


def _rescale_item(slope: float, intercept: float) -> Dataset:
    item = Dataset()
    item.RescaleSlope, item.RescaleIntercept = slope, intercept
    return item


def test_series_is_sorted_by_position_not_by_name_or_instance(tmp_path):
    uid = "1.2.3.4"
    paths = []
    for k, z in enumerate([10.0, 0.0, 5.0]):  # written out of order, instance numbers misleading
        img = np.full((16, 16), 1000 * (z / 5 + 1), dtype=np.uint16)
        img[0, 0] = 0
        paths.append(write_dicom(tmp_path / f"s{k}.dcm", img, series_uid=uid, instance=k + 1,
                                 position=(0.0, 0.0, z), orientation=AXIAL))
    out, info = read_dicom_pixels(paths, InputSpec(window="minmax"))
    assert out.shape == (3, 16, 16) and info["sorted_by"] == "ImagePositionPatient"
    np.testing.assert_allclose(out[:, 5, 5], [1000 / 3000, 2000 / 3000, 1.0], atol=1e-6)


def test_series_refuses_mixed_orientation_and_size(tmp_path):
    a = write_dicom(tmp_path / "a.dcm", chest_like(16), position=(0, 0, 0), orientation=AXIAL)
    b = write_dicom(tmp_path / "b.dcm", chest_like(16), position=(0, 0, 5), orientation=(0, 1, 0, 0, 0, -1))
    with pytest.raises(ScanReadError, match="different orientations"):
        read_dicom_pixels([a, b], InputSpec())
    c = write_dicom(tmp_path / "c.dcm", chest_like(32), position=(0, 0, 5), orientation=AXIAL)
    with pytest.raises(ScanReadError, match="different sizes"):
        read_dicom_pixels([a, c], InputSpec())


def test_rgb_dicom_becomes_grey_luminance(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(16, 20, 3), dtype=np.uint8)
    path = write_dicom(tmp_path / "rgb.dcm", rgb[..., 0], modality="OT")
    ds = read_back(path)
    ds.SamplesPerPixel, ds.PlanarConfiguration, ds.PhotometricInterpretation = 3, 0, "RGB"
    ds.PixelData = rgb.tobytes()
    ds.save_as(path)
    out, info = _read(path)
    assert out.shape == (16, 20) and not info["inverted"]
    np.testing.assert_allclose(out, rgb.astype(np.float32) @ LUMA / 255, atol=1e-5)


def test_monochrome2_with_inverse_presentation_lut_is_refused(tmp_path):
    path = write_dicom(tmp_path / "odd.dcm", chest_like(16), PresentationLUTShape="INVERSE")
    with pytest.raises(ScanReadError, match="polarity"):
        _read(path)


def test_unknown_photometric_is_refused(tmp_path):
    path = write_dicom(tmp_path / "hsv.dcm", chest_like(16), photometric="HSV")
    with pytest.raises(ScanReadError, match="PhotometricInterpretation 'HSV' is not supported"):
        _read(path)


def test_per_frame_windows_are_applied_per_frame(tmp_path):
    frames = np.stack([chest_like(16, seed=i) for i in range(2)])
    path = write_dicom(tmp_path / "mfw.dcm", frames)
    ds = read_back(path)
    groups = []
    for center in (1000.0, 3000.0):
        voi, group = Dataset(), Dataset()
        voi.WindowCenter, voi.WindowWidth, voi.VOILUTFunction = center, 2000.0, "LINEAR_EXACT"
        group.FrameVOILUTSequence = Sequence([voi])
        groups.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(groups)
    ds.save_as(path)
    out, info = _read(path)
    for i, center in enumerate((1000.0, 3000.0)):
        np.testing.assert_allclose(out[i], np.clip((frames[i] - center) / 2000 + 0.5, 0, 1), atol=1e-6)
    assert "1000/2000" in info["window"] and "3000/2000" in info["window"]


def test_monochrome1_inversion_is_logged_once_at_info(tmp_path, caplog, monkeypatch):
    import medtransfer.data.dicom as dicom_mod

    monkeypatch.setattr(dicom_mod, "_inversion_logged", False)
    path = write_dicom(tmp_path / "m1.dcm", chest_like(16), photometric="MONOCHROME1")
    with caplog.at_level("INFO", logger="medtransfer.data.dicom"):
        _read(path)
        _read(path)
    messages = [r for r in caplog.records if "MONOCHROME1" in r.getMessage()]
    assert len(messages) == 1 and messages[0].levelname == "INFO"
    assert "invert_monochrome1" in messages[0].getMessage()


def _jpeg_corpus_file(tmp_path):
    """pydicom's SC_rgb_jpeg.dcm (JPEG Baseline, RGB; implicit VR under an explicit-VR transfer syntax)."""
    from pathlib import Path

    import pydicom.data

    out = tmp_path / "SC_rgb_jpeg.dcm"
    out.write_bytes((Path(pydicom.data.__file__).parent / "test_files" / "SC_rgb_jpeg.dcm").read_bytes())
    return out


@pytest.mark.filterwarnings("ignore:Expected explicit VR")  # pydicom's own read of this file, for the reference
def test_jpeg_baseline_decodes_like_pydicom(tmp_path):
    path = _jpeg_corpus_file(tmp_path)
    out, info = _read(path)
    expected = read_back(path).pixel_array.astype(np.float32) @ LUMA / 255
    assert out.shape == (256, 256) and info["transfer_syntax"] == "JPEG Baseline (Process 1)"
    np.testing.assert_allclose(out, expected, atol=1e-6)


def test_compressed_pixel_data_cut_short_is_called_truncated(tmp_path):
    # pydicom drops an encapsulated element the file ends inside (with a warning only): it must not read as
    # "no PixelData: not an image", nor be measured against the uncompressed length
    path = _jpeg_corpus_file(tmp_path)
    path.write_bytes(path.read_bytes()[:-500])
    with pytest.raises(ScanReadError, match="truncated: the file ends inside its compressed pixel data"):
        _read(path)
