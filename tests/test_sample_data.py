"""The synthetic chest X-ray generator: deterministic bytes, valid DICOM, real signal, planted shortcut/site gap."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest

from medtransfer.datasets.synthetic import SITES, generate, generate_sample_data, render_preview, sample_truth
from medtransfer.errors import ConfigError, MedtransferError

SMALL = {"n": 36, "size": 64}


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _display(path: Path) -> np.ndarray:
    """Pixels in MONOCHROME2 display space, 0..1."""
    ds = pydicom.dcmread(path)
    img = ds.pixel_array.astype(np.float64) / (2**ds.BitsStored - 1)
    return 1 - img if ds.PhotometricInterpretation == "MONOCHROME1" else img


def _marker_corner(img: np.ndarray) -> str:
    k = max(4, img.shape[0] // 6)
    patches = {"tl": img[:k, :k], "tr": img[:k, -k:], "bl": img[-k:, :k], "br": img[-k:, -k:]}
    return max(patches, key=lambda c: int((patches[c] >= 0.999).sum()))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_sample_data(tmp_path_factory.mktemp("sample") / "data", seed=3, **SMALL)


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    a = _hashes(generate_sample_data(tmp_path / "a", n=24, size=64, seed=7))
    b = _hashes(generate_sample_data(tmp_path / "b", n=24, size=64, seed=7))
    c = _hashes(generate_sample_data(tmp_path / "c", n=24, size=64, seed=8))
    assert a == b
    assert any(p.endswith(".nii.gz") for p in a) and any("ct_series" in p for p in a)
    shared = [p for p in set(a) & set(c) if p.startswith("dicom/")]
    assert shared and all(a[p] != c[p] for p in shared)


def test_files_are_valid_dicom_with_site_specific_headers(dataset: Path) -> None:
    labels = pd.read_csv(dataset / "labels.csv")
    assert list(labels.columns) == ["path", "label"]
    assert set(labels.label) == {"normal", "pneumonia"}
    for rel in labels.path:
        assert "normal" not in rel and "pneumonia" not in rel  # no label leaks through the path
        site = SITES[rel.split("/")[1]]
        ds = pydicom.dcmread(dataset / rel)
        assert ds.pixel_array.shape == (64, 64)
        assert ds.PhotometricInterpretation == site.photometric
        assert ds.BitsStored == site.bits_stored and ds.BitsAllocated == 16
        assert int(ds.pixel_array.max()) <= 2**site.bits_stored - 1
        assert (ds.Manufacturer, ds.InstitutionName, ds.Modality) == (site.manufacturer, site.institution,
                                                                       site.modality)
        assert ds.PatientSex in {"M", "F"} and re.fullmatch(r"\d{3}Y", ds.PatientAge)
        assert ds.ViewPosition in {"PA", "AP"} and ds.PatientID.startswith("DEMO-P")
        assert ds.PatientName.family_name == "DEMO"
    assert len({pydicom.dcmread(dataset / p).SOPInstanceUID for p in labels.path}) == len(labels)


def test_site_prevalence_and_repeat_patients(dataset: Path) -> None:
    truth = sample_truth(dataset)
    prevalence = truth.assign(pos=truth.label == "pneumonia").groupby("site").pos.mean()
    for site, value in prevalence.items():
        assert abs(value - SITES[site].prevalence) < 0.15
    assert prevalence["A"] < prevalence["B"] < prevalence["C"]
    studies = truth.groupby("patient_id").size()
    assert 1 <= (studies == 2).sum() < 0.4 * len(studies)
    assert (truth.groupby("patient_id").site.nunique() == 1).all()
    assert {"child", "elderly"} <= set(pd.cut(truth.age, [0, 17, 69, 90], labels=["child", "adult", "elderly"]))


def test_positives_are_brighter_in_the_lungs(dataset: Path) -> None:
    truth = sample_truth(dataset)
    gaps = []
    for _, group in truth.groupby("site"):
        lung_minus_body = []
        for rel in group.path:
            img = _display(dataset / rel)
            lungs = np.r_[img[16:40, 10:26].ravel(), img[16:40, 38:54].ravel()]
            lung_minus_body.append(lungs.mean() - np.median(img[54:60, 16:48]))
        score = pd.Series(lung_minus_body, index=group.index)
        gaps.append(score[group.label == "pneumonia"].mean() - score[group.label == "normal"].mean())
    assert np.mean(gaps) > 0
    assert (truth.opacity_area_frac[truth.label == "pneumonia"] > 0).all()
    assert (truth.n_opacities[truth.label == "normal"] == 0).all()


def test_marker_corner_is_burned_in_and_depends_on_site(dataset: Path) -> None:
    truth = sample_truth(dataset)
    detected = [_marker_corner(_display(dataset / rel)) for rel in truth.path]
    assert detected == list(truth.marker_corner)
    negatives = truth[truth.label == "normal"]
    for site, group in negatives.groupby("site"):
        assert group.marker_corner.value_counts().idxmax() == SITES[site].corner


@pytest.mark.parametrize("shortcut", [True, False])
def test_shortcut_plants_a_label_correlated_marker(tmp_path: Path, shortcut: bool) -> None:
    truth = sample_truth(generate_sample_data(tmp_path / "d", n=40, size=64, seed=1, shortcut=shortcut,
                                              extras=False))
    top_left = truth.marker_corner == "tl"
    gap = top_left[truth.label == "pneumonia"].mean() - top_left[truth.label == "normal"].mean()
    assert gap > 0.25 if shortcut else abs(gap) < 0.15


def test_shortcut_flag_changes_only_the_marker(tmp_path: Path) -> None:
    on = sample_truth(generate_sample_data(tmp_path / "on", n=24, size=64, extras=False))
    off = sample_truth(generate_sample_data(tmp_path / "off", n=24, size=64, shortcut=False, extras=False))
    pd.testing.assert_frame_equal(on.drop(columns=["marker_corner", "marker_letter"]),
                                  off.drop(columns=["marker_corner", "marker_letter"]))


def test_weak_site_has_fainter_opacities(tmp_path: Path) -> None:
    truth = sample_truth(generate_sample_data(tmp_path / "d", n=60, size=64, extras=False))
    contrast = truth[truth.label == "pneumonia"].groupby("site").opacity_contrast.median()
    assert contrast["C"] < 0.8 * min(contrast["A"], contrast["B"])


def test_second_call_is_idempotent_and_new_params_regenerate(tmp_path: Path) -> None:
    out = generate_sample_data(tmp_path / "d", n=24, size=64, extras=False)
    first = sorted(out.rglob("*.dcm"))[0]
    stamps = (first.stat().st_mtime_ns, (out / "labels.csv").stat().st_mtime_ns)
    assert generate_sample_data(tmp_path / "d", n=24, size=64, extras=False) == out
    assert (first.stat().st_mtime_ns, (out / "labels.csv").stat().st_mtime_ns) == stamps
    generate_sample_data(tmp_path / "d", n=24, size=64, seed=5, extras=False)
    assert pd.read_json(out / "generation.json", typ="series")["params"]["seed"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temporary or old folders left beside it


def test_interrupted_generation_leaves_nothing_under_the_final_name(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    real, calls = generate._write_case, []

    def flaky(*args: object, **kwargs: object) -> dict:
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(generate, "_write_case", flaky)
    with pytest.raises(KeyboardInterrupt):
        generate_sample_data(tmp_path / "d", n=24, size=64)
    assert list(tmp_path.iterdir()) == []


def test_interrupted_regeneration_keeps_the_previous_data_set(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    out = generate_sample_data(tmp_path / "d", n=24, size=64, extras=False)
    before = _hashes(out)
    monkeypatch.setattr(generate, "write_extras", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        generate_sample_data(tmp_path / "d", n=24, size=64, extras=True)
    assert _hashes(out) == before and [p.name for p in tmp_path.iterdir()] == ["d"]


def test_refuses_to_replace_a_folder_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(MedtransferError, match="not made by"):
        generate_sample_data(tmp_path, n=24, size=64)
    assert (tmp_path / "mine.txt").read_text() == "precious"


def test_bad_knobs_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sites"):
        generate_sample_data(tmp_path / "d", sites=("A", "Z"))
    with pytest.raises(ConfigError, match="weak_site"):
        generate_sample_data(tmp_path / "d", sites=("A", "B"), weak_site="C")


def test_extras_are_readable_volumes_and_a_ct_series(dataset: Path) -> None:
    nib = pytest.importorskip("nibabel")
    volumes = sorted((dataset / "extras" / "nifti").glob("*.nii.gz"))
    assert len(volumes) == 3 and all(nib.load(v).shape == (32, 32, 16) for v in volumes)
    slices = [pydicom.dcmread(p) for p in sorted((dataset / "extras" / "ct_series").glob("*.dcm"))]
    assert len(slices) == 8 and len({s.SeriesInstanceUID for s in slices}) == 1
    assert all(s.SOPClassUID == pydicom.uid.CTImageStorage and s.RescaleIntercept == -1024 for s in slices)
    assert [float(s.ImagePositionPatient[2]) for s in slices] == sorted({float(s.ImagePositionPatient[2])
                                                                         for s in slices})
    hu = slices[4].pixel_array * float(slices[4].RescaleSlope) + float(slices[4].RescaleIntercept)
    assert hu.min() < -900 and hu.max() > 0


def test_generation_json_and_preview(dataset: Path, tmp_path: Path) -> None:
    info = pd.read_json(dataset / "generation.json", typ="series")
    assert info["images"] == SMALL["n"] and set(info["sites"]) == {"A", "B", "C"}
    png = render_preview(dataset, tmp_path / "sheet.png", n=4)
    from PIL import Image

    assert Image.open(png).size == (4 * 256, 256 + 18)


def test_datasets_package_imports_without_torch_and_the_old_module_is_gone() -> None:
    import subprocess
    import sys

    code = ("import sys, importlib.util, medtransfer.datasets.synthetic; "
            "assert 'torch' not in sys.modules, 'medtransfer.datasets pulled in torch'; "
            "assert importlib.util.find_spec('medtransfer.sample_data') is None, 'old module still importable'")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
