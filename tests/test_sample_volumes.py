"""The synthetic chest CT generator: folder layout, valid DICOM series, NIfTI geometry equal to the DICOM's (and to
dcm2niix's), balanced labels, lesion, shortcut and site effects really in the pixels, robust folder handling."""

from __future__ import annotations

import hashlib
import re
import shutil
import subprocess
from pathlib import Path

import nibabel as nib  # a dependency (MONAI NIfTI reading): a missing one fails
import numpy as np
import pandas as pd
import pydicom
import pytest
from typer.testing import CliRunner

from medtransfer.datasets.synthetic import (
    CT_SITES,
    VolumeDataConfig,
    generate_sample_volumes,
    sample_volume_truth,
    volumes,
)
from medtransfer.datasets.synthetic.volumes import plan_volume_cases
from medtransfer.errors import ConfigError, MedtransferError
from tests.conftest import skip_or_fail

SMALL = {"n": 24, "size": (16, 32, 32), "seed": 3}
COLUMNS = ["path", "label", "patient_id", "study_id", "sex", "age", "site"]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_sample_volumes(tmp_path_factory.mktemp("volumes") / "ct", **SMALL)


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _series(folder: Path) -> list[pydicom.Dataset]:
    """The slices of a series folder, sorted along the slice normal (not by file name or InstanceNumber)."""
    slices = [pydicom.dcmread(p) for p in folder.iterdir()]
    normal = np.cross(*np.reshape(np.asarray(slices[0].ImageOrientationPatient, float), (2, 3)))
    return sorted(slices, key=lambda s: float(np.dot(normal, np.asarray(s.ImagePositionPatient, float))))


def _dicom_volume(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """HU array indexed (column, row, slice) and its RAS affine, computed from IPP/IOP/PixelSpacing alone."""
    slices = _series(folder)
    iop = np.asarray(slices[0].ImageOrientationPatient, float)
    row_dir, col_dir = iop[:3], iop[3:]  # direction of increasing column index, of increasing row index
    row_spacing, col_spacing = (float(v) for v in slices[0].PixelSpacing)
    first, last = (np.asarray(s.ImagePositionPatient, float) for s in (slices[0], slices[-1]))
    step = (last - first) / (len(slices) - 1)
    lps = np.eye(4)
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row_dir * col_spacing, col_dir * row_spacing, step, first
    hu = np.stack([s.pixel_array * float(s.RescaleSlope) + float(s.RescaleIntercept) for s in slices])
    return hu.transpose(2, 1, 0), np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _dhw(path: Path) -> np.ndarray:
    """A NIfTI volume as medtransfer's (D, H, W): inferior→superior, anterior→posterior, right→left."""
    data = nib.as_closest_canonical(nib.load(str(path))).get_fdata()
    return data.transpose(2, 1, 0)[:, ::-1, ::-1]


def test_layout_labels_and_generation_json(dataset: Path) -> None:
    labels = pd.read_csv(dataset / "labels.csv")
    nifti = pd.read_csv(dataset / "labels_nifti.csv")
    assert list(labels.columns) == COLUMNS and list(nifti.columns) == COLUMNS
    assert len(labels) == SMALL["n"] and labels.study_id.is_unique
    pd.testing.assert_frame_equal(labels.drop(columns="path"), nifti.drop(columns="path"))
    assert set(labels.label) == {"normal", "nodule"}
    for rel, nii in zip(labels.path, nifti.path, strict=True):
        assert re.fullmatch(r"dicom/[ABC]/DEMO-CT\d{4}/study-\d", rel) and rel.split("/")[1] in CT_SITES
        assert len(list((dataset / rel).glob("IM-*.dcm"))) == SMALL["size"][0]
        assert re.fullmatch(r"nifti/DEMO-CT\d{4}_study-\d\.nii\.gz", nii) and (dataset / nii).is_file()
        assert "normal" not in rel + nii and "nodule" not in rel + nii  # no label leaks through a path
    per_patient = labels.groupby("patient_id")
    assert (per_patient.site.nunique() == 1).all() and (per_patient.sex.nunique() == 1).all()
    assert (per_patient.label.nunique() == 1).all()  # a nodule persists into the follow-up
    assert 1 <= (per_patient.size() == 2).sum() < 0.5 * labels.patient_id.nunique()
    info = pd.read_json(dataset / "generation.json", typ="series")
    assert info["studies"] == SMALL["n"] and set(info["sites"]) == set(CT_SITES)
    assert {"lesion", "shortcut", "weak_site"} <= set(info["planted"]) and "site B" in info["planted"]["shortcut"]
    assert "What is planted" in (dataset / "README.md").read_text()
    assert sorted(p.name for p in dataset.iterdir()) == [".complete", ".truth", "README.md", "dicom",
                                                          "generation.json", "labels.csv", "labels_nifti.csv", "nifti"]


def test_labels_are_balanced_and_prevalence_differs_by_site() -> None:
    plan = plan_volume_cases(VolumeDataConfig(n=300))
    assert 0.4 < plan.label.mean() < 0.6
    by_site = plan.drop_duplicates("patient").groupby("site").label.mean()
    for site, value in by_site.items():
        assert abs(value - CT_SITES[site].prevalence) < 0.02  # exact per site among patients (rounded)
    assert by_site["A"] < by_site["B"] < by_site["C"]


def test_dicom_headers_are_complete_and_consistent(dataset: Path) -> None:
    labels = pd.read_csv(dataset / "labels.csv")
    sop_uids, study_uids = set(), {}
    for row in labels.itertuples():
        site = CT_SITES[row.site]
        slices = _series(dataset / row.path)
        assert len({s.SeriesInstanceUID for s in slices}) == 1 and len({s.StudyInstanceUID for s in slices}) == 1
        sop_uids |= {s.SOPInstanceUID for s in slices}
        study_uids[row.study_id] = slices[0].StudyInstanceUID
        first = slices[0]
        assert first.SOPClassUID == pydicom.uid.CTImageStorage and first.Modality == "CT"
        assert (first.Manufacturer, first.InstitutionName) == (site.manufacturer, site.institution)
        assert first.ConvolutionKernel == site.kernel and first.PatientPosition == "HFS"
        assert first.PatientID == row.patient_id and first.PatientName.family_name == "DEMO"
        assert first.PatientSex == row.sex and first.PatientAge == f"{row.age:03d}Y"
        assert [float(v) for v in first.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert first.pixel_array.shape == SMALL["size"][1:] and first.BitsAllocated == 16
        assert float(first.RescaleSlope) == 1 and float(first.RescaleIntercept) == (0 if site.signed else -1024)
        assert first.PixelRepresentation == int(site.signed) and first.WindowCenter is not None
        z = np.array([float(s.ImagePositionPatient[2]) for s in slices])
        assert np.allclose(np.diff(z), np.diff(z)[0], atol=2e-3) and np.diff(z)[0] > 0  # even spacing, no gaps
        assert np.isclose(float(first.SliceThickness), np.diff(z)[0] * site.thickness_ratio, atol=2e-3)
        numbers = [int(s.InstanceNumber) for s in slices]  # site B numbers from the top, like many scanners
        assert numbers == (list(range(len(z), 0, -1)) if site.descending else list(range(1, len(z) + 1)))
    assert len(sop_uids) == SMALL["n"] * SMALL["size"][0] and len(set(study_uids.values())) == len(study_uids)


def test_dciodvfy_finds_no_errors(dataset: Path) -> None:
    tool = shutil.which("dciodvfy") or ("/usr/bin/dciodvfy" if Path("/usr/bin/dciodvfy").is_file() else None)
    if tool is None:
        skip_or_fail("dciodvfy (dicom3tools) is not installed; it validates the CT Image IOD "
                     "(Debian/Ubuntu: apt-get install dicom3tools)")
    labels = pd.read_csv(dataset / "labels.csv")
    for site in CT_SITES:  # one slice per site: signed and unsigned storage, one and two window presets
        rel = labels.path[labels.site == site].iloc[0]
        proc = subprocess.run([tool, str(sorted((dataset / rel).glob("*.dcm"))[0])], capture_output=True,
                              text=True, timeout=60)
        report = proc.stdout + proc.stderr
        assert "CTImage" in report
        assert not [line for line in report.splitlines() if line.startswith("Error")], report


def test_nifti_affine_and_voxels_agree_with_the_dicom_geometry(dataset: Path) -> None:
    truth = sample_volume_truth(dataset)
    for row in truth.itertuples():
        hu, affine = _dicom_volume(dataset / row.path)
        img = nib.load(str(dataset / row.nifti))
        assert nib.aff2axcodes(img.affine) == ("R", "A", "S") and int(img.header["sform_code"]) == 1
        dicom = nib.as_closest_canonical(nib.Nifti1Image(hu, affine))
        np.testing.assert_allclose(img.affine, dicom.affine, atol=1e-3)
        np.testing.assert_array_equal(img.get_fdata(), dicom.get_fdata())
        assert _dhw(dataset / row.nifti).shape == SMALL["size"]


def test_dcm2niix_writes_the_same_geometry_and_voxels(dataset: Path, tmp_path: Path) -> None:
    tool = shutil.which("dcm2niix") or ("/usr/bin/dcm2niix" if Path("/usr/bin/dcm2niix").is_file() else None)
    if tool is None:
        skip_or_fail("dcm2niix is not installed; it is the reference DICOM-to-NIfTI converter "
                     "(Debian/Ubuntu: apt-get install dcm2niix)")
    truth = sample_volume_truth(dataset)
    for site in CT_SITES:
        row = truth[truth.site == site].iloc[0]
        out = tmp_path / site
        out.mkdir()
        subprocess.run([tool, "-z", "n", "-b", "n", "-f", "vol", "-o", str(out), str(dataset / row.path)],
                       capture_output=True, check=True, timeout=120)
        ref = nib.as_closest_canonical(nib.load(str(out / "vol.nii")))
        ours = nib.load(str(dataset / row.nifti))
        np.testing.assert_allclose(ours.affine, ref.affine, atol=1e-3)
        np.testing.assert_array_equal(ours.get_fdata(), np.squeeze(ref.get_fdata()))


def test_nodules_are_in_the_pixels(dataset: Path) -> None:
    truth = sample_volume_truth(dataset)
    assert (truth.nodule == (truth.label == "nodule")).all() and (truth.n_nodules[~truth.nodule] == 0).all()
    pos = truth[truth.nodule]
    assert pos.nodule_mm.between(5.0, 40.0 * 1.3).all() and pos.nodule_solid.any() and pos.nodule_hu.lt(-200).any()
    for row in pos.itertuples():
        vol = _dhw(dataset / row.nifti)
        d, h, w = row.nodule_d, row.nodule_h, row.nodule_w
        peak = vol[max(d - 1, 0): d + 2, max(h - 1, 0): h + 2, max(w - 1, 0): w + 2].max()
        # Around the nodule, lung parenchyma is about -860 HU; the nodule (even a subsolid one at -550 HU in
        # 30-mm slices) lifts the local peak well above it.
        assert peak > -650, (row.path, row.nodule_mm, row.nodule_hu, peak)


def test_skin_marker_is_in_the_pixels_only_where_planted(dataset: Path) -> None:
    truth = sample_volume_truth(dataset)
    assert truth.marker.any() and not truth.marker.all()
    for row in truth.itertuples():
        vol = _dhw(dataset / row.nifti)
        assert (vol.max() >= 3000) == row.marker  # metal saturates; bone and contrast-free tissue stay < 1000
        if row.marker:
            assert vol[row.marker_d, row.marker_h, row.marker_w] > 1000


@pytest.mark.parametrize("shortcut", [True, False])
def test_shortcut_ties_the_marker_to_positives_at_site_b(shortcut: bool) -> None:
    plan = plan_volume_cases(VolumeDataConfig(n=400, shortcut=shortcut))
    rate = plan.groupby(["site", "label"]).marker.mean()
    gap_b = rate["B", True] - rate["B", False]
    assert gap_b > 0.5 if shortcut else abs(gap_b) < 0.1
    for site in ("A", "C"):
        assert abs(rate[site, True] - rate[site, False]) < 0.1


def test_shortcut_flag_changes_only_the_marker(tmp_path: Path) -> None:
    kw = {"n": 12, "size": (8, 16, 16), "seed": 1, "sites": ("B",), "shortcut_site": "B", "weak_site": None}
    on = generate_sample_volumes(tmp_path / "on", **kw)
    off = generate_sample_volumes(tmp_path / "off", shortcut=False, **kw)
    t_on, t_off = sample_volume_truth(on), sample_volume_truth(off)
    marker_cols = ["marker", "marker_d", "marker_h", "marker_w"]
    pd.testing.assert_frame_equal(t_on.drop(columns=marker_cols), t_off.drop(columns=marker_cols))
    same = t_on.marker == t_off.marker
    assert (~same).any() and same.any()
    for row, equal in zip(t_on.itertuples(), same, strict=True):
        a, b = _dhw(on / row.nifti), _dhw(off / row.nifti)
        assert np.array_equal(a, b) == equal


def test_sites_differ_in_noise_geometry_and_storage(dataset: Path) -> None:
    truth = sample_volume_truth(dataset)
    noise = {}
    for site, group in truth.groupby("site"):
        air = [_dhw(dataset / p)[:, :3, :4] for p in group.nifti]  # anterior corners: air outside the body
        noise[site] = float(np.median([a.std() for a in air]))
        assert group.pixel_mm.between(*(np.array([-30, 30]) + CT_SITES[site].fov_mm) / SMALL["size"][2]).all()
    assert noise["A"] < noise["B"] < noise["C"]  # C: the planted weak site, noisier still
    thickness = truth.groupby("site").thickness_mm.first()
    assert thickness["A"] < thickness["B"] < thickness["C"]


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    kw = {"n": 6, "size": (8, 16, 16)}
    a = _hashes(generate_sample_volumes(tmp_path / "a", seed=7, **kw))
    b = _hashes(generate_sample_volumes(tmp_path / "b", seed=7, **kw))
    c = _hashes(generate_sample_volumes(tmp_path / "c", seed=8, **kw))
    assert a == b
    shared = [p for p in set(a) & set(c) if p.endswith(".nii.gz")]
    assert shared and all(a[p] != c[p] for p in shared)


def test_second_call_is_idempotent_and_new_params_regenerate(tmp_path: Path) -> None:
    kw = {"n": 6, "size": (8, 16, 16)}
    out = generate_sample_volumes(tmp_path / "d", **kw)
    first = sorted(out.rglob("*.dcm"))[0]
    stamps = (first.stat().st_mtime_ns, (out / "labels.csv").stat().st_mtime_ns)
    assert generate_sample_volumes(tmp_path / "d", **kw) == out
    assert (first.stat().st_mtime_ns, (out / "labels.csv").stat().st_mtime_ns) == stamps
    generate_sample_volumes(tmp_path / "d", seed=5, **kw)
    assert pd.read_json(out / "generation.json", typ="series")["params"]["seed"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temporary or old folders left beside it


def test_interrupted_generation_leaves_nothing_under_the_final_name(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    real, calls = volumes._write_case, []

    def flaky(*args: object, **kwargs: object) -> dict:
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(volumes, "_write_case", flaky)
    with pytest.raises(KeyboardInterrupt):
        generate_sample_volumes(tmp_path / "d", n=6, size=(8, 16, 16))
    assert list(tmp_path.iterdir()) == []


def test_refuses_to_replace_a_folder_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("precious")
    with pytest.raises(MedtransferError, match="not made by"):
        generate_sample_volumes(tmp_path, n=6, size=(8, 16, 16))
    assert (tmp_path / "mine.txt").read_text() == "precious"


@pytest.mark.parametrize(("kw", "match"), [
    ({"sites": ("A", "Z")}, "sites"), ({"sites": ("A", "C")}, "shortcut_site"),
    ({"size": (4, 32, 32)}, "size"), ({"size": (16, 32)}, "size"), ({"nodule_mm": (30, 10)}, "nodule_mm"),
])
def test_bad_knobs_are_config_errors(tmp_path: Path, kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        generate_sample_volumes(tmp_path / "d", **kw)
    assert not (tmp_path / "d").exists()


def test_index_reads_both_labels_files_unchanged(dataset: Path) -> None:
    from medtransfer.config import DataConfig
    from medtransfer.data.discovery import index_scans

    for name, fmt in (("labels.csv", "dicom"), ("labels_nifti.csv", "nifti")):
        manifest = index_scans(dataset, labels=dataset / name, config=DataConfig(verify_pixels=False))
        df = manifest.df.sort_values("path").reset_index(drop=True)
        expected = pd.read_csv(dataset / name).sort_values("path").reset_index(drop=True)
        assert len(manifest.quarantine) == 0 and list(df.path) == list(expected.path)
        assert (df.format == fmt).all() and (df.frames == SMALL["size"][0]).all()
        assert list(df.label) == list(expected.label) and list(df.site) == list(expected.site)


def test_cli_writes_volumes(tmp_path: Path) -> None:
    from medtransfer.cli import app

    out = tmp_path / "ct"
    result = CliRunner().invoke(app, ["sample-data", "--volumes", "--out", str(out), "--n", "6", "--size", "16",
                                      "--slices", "8"])
    assert result.exit_code == 0, result.output
    assert "labels_nifti.csv" in result.output
    assert pd.read_json(out / "generation.json", typ="series")["params"]["size"] == [8, 16, 16]
