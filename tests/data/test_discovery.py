"""index_scans on real files written with pydicom/nibabel/Pillow: formats, grouping, fields, quarantine, privacy."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydicom.uid import BasicTextSRStorage, generate_uid
from rich.console import Console

from medtransfer.config import DataConfig
from medtransfer.data.discovery import index_scans
from medtransfer.data.manifest import Manifest
from medtransfer.data.summary import render_summary, summary_dict
from medtransfer.errors import ManifestError, ScanReadError
from tests.factories import CANARIES, CANARY_ID, chest_like, write_dicom, write_nifti, write_png

FAST = DataConfig(verify_pixels=False)
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def ct_series(folder: Path, n: int = 3, *, patient_id: str = "PCT", orientations=None, names=None) -> list[Path]:
    """Write an n-slice CT series (one SeriesInstanceUID) into ``folder``."""
    uid, study = generate_uid(), generate_uid()
    out = []
    for k in range(n):
        name = names[k] if names else f"slice{k:02d}.dcm"
        out.append(write_dicom(folder / name, chest_like(16, seed=k, dtype=np.int16), modality="CT", series_uid=uid,
                               study_uid=study, position=(0.0, 0.0, float(k)), instance=k + 1,
                               orientation=orientations[k] if orientations else AXIAL, patient_id=patient_id))
    return out


@pytest.fixture()
def mixed(tmp_path: Path) -> Path:
    """Class sub-folders holding every supported kind of file, plus things that must be ignored."""
    data = tmp_path / "data"
    write_dicom(data / "normal" / "cr_preamble.dcm", chest_like(16), patient_id="P1", sex="F", age="045Y",
                view="PA", institution="General Hospital")
    write_dicom(data / "normal" / "IM0002", chest_like(16, seed=1), patient_id="P2", preamble=False, sex="M",
                age="006M", view="AP", institution=None, manufacturer="ACME", StationName="ROOM1")
    write_dicom(data / "normal" / "DICOMDIR", chest_like(16), patient_id="P9")
    write_png(data / "normal" / "x.png", (chest_like(16) // 16).astype(np.uint8))
    ct_series(data / "pneumonia" / "series1", 3, patient_id="P3")
    write_dicom(data / "pneumonia" / "mf.dcm", np.stack([chest_like(16, seed=k) for k in range(4)]), modality="MR",
                patient_id="P4", age="081Y", sex="O")
    write_nifti(data / "pneumonia" / "vol.nii.gz", np.random.default_rng(0).random((8, 8, 5)).astype(np.float32))
    (data / "notes.txt").write_text("not a scan")
    (data / ".hidden.dcm").write_bytes(b"junk")
    return data


def test_mixed_folder_gives_expected_cases_formats_labels_and_fields(mixed: Path) -> None:
    m = index_scans(mixed, config=FAST)
    df = m.df.set_index("path")
    assert sorted(df.index) == ["normal/IM0002", "normal/cr_preamble.dcm", "normal/x.png", "pneumonia/mf.dcm",
                                "pneumonia/series1", "pneumonia/vol.nii.gz"]
    assert m.classes == ["normal", "pneumonia"] and m.task == "binary"
    assert df["format"].to_dict() == {"normal/IM0002": "dicom", "normal/cr_preamble.dcm": "dicom",
                                      "normal/x.png": "png", "pneumonia/mf.dcm": "dicom",
                                      "pneumonia/series1": "dicom", "pneumonia/vol.nii.gz": "nifti"}
    assert df.loc["pneumonia/series1", "files"] == ";".join(f"pneumonia/series1/slice{k:02d}.dcm" for k in range(3))
    assert df.loc["pneumonia/series1", "frames"] == 3 and df.loc["pneumonia/mf.dcm", "frames"] == 4
    assert df.loc["pneumonia/vol.nii.gz", "frames"] == 5
    cr = df.loc["normal/cr_preamble.dcm"]
    assert (cr["label"], cr["sex"], cr["age"], cr["age_band"], cr["site"], cr["view"], cr["modality"]) == (
        "normal", "F", 45.0, "40-59", "General Hospital", "PA", "CR")
    raw = df.loc["normal/IM0002"]
    assert (raw["sex"], raw["age"], raw["age_band"], raw["site"], raw["view"]) == ("M", 0.5, "0-17", "ACME ROOM1", "AP")
    mf = df.loc["pneumonia/mf.dcm"]
    assert (mf["sex"], mf["age_band"], mf["modality"]) == ("O", "80+", "MR")
    assert (cr["rows"], cr["cols"], cr["spacing_row"], cr["photometric"]) == (16, 16, 0.5, "MONOCHROME2")
    assert df.loc["normal/x.png", "sex"] == "" and pd.isna(df.loc["normal/x.png", "age"])
    assert all(c.startswith("c") and len(c) == 11 for c in m.df["case_id"])
    assert len(m.quarantine) == 0


def test_xray_series_images_are_separate_cases_and_ct_series_across_folders_is_one(tmp_path: Path) -> None:
    uid = generate_uid()
    for k in range(2):  # two radiographs of one series: two cases
        write_dicom(tmp_path / "a" / f"dx{k}.dcm", chest_like(16, seed=k), modality="DX", series_uid=uid,
                    position=(0.0, 0.0, float(k)))
    series = ct_series(tmp_path / "b" / "s", 2)
    (tmp_path / "b" / "s" / "x").mkdir()
    series[1].rename(tmp_path / "b" / "s" / "x" / "slice01.dcm")  # one series, two folders
    m = index_scans(tmp_path, config=FAST)
    assert sorted(m.df["path"]) == ["a/dx0.dcm", "a/dx1.dcm", "b/s"]
    assert m.df.set_index("path").loc["b/s", "files"] == "b/s/slice00.dcm;b/s/x/slice01.dcm"


def test_single_slice_ct_is_its_own_case_and_mixed_orientation_series_is_quarantined(tmp_path: Path) -> None:
    ct_series(tmp_path / "a" / "one", 1)
    ct_series(tmp_path / "a" / "mixed", 2, orientations=[AXIAL, (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)])
    write_dicom(tmp_path / "b" / "cr.dcm", chest_like(16))
    m = index_scans(tmp_path, config=FAST)
    assert sorted(m.df["path"]) == ["a/one/slice00.dcm", "b/cr.dcm"]
    q = m.quarantine.set_index("path")
    assert sorted(q.index) == ["a/mixed/slice00.dcm", "a/mixed/slice01.dcm"]
    assert set(q["problem"]) == {"mixed_series"} and "orientation" in q["reason"].iloc[0]


def _bad_files(data: Path) -> None:
    write_dicom(data / "a" / "good1.dcm", chest_like(16), patient_id="A1")
    write_dicom(data / "a" / "good2.dcm", chest_like(16, seed=2), patient_id="A2")
    write_dicom(data / "b" / "good3.dcm", chest_like(16, seed=3), patient_id="B1")
    write_dicom(data / "b" / "good4.dcm", chest_like(16, seed=4), patient_id="B2")
    (data / "b" / "empty.dcm").write_bytes(b"")
    full = write_dicom(data / "b" / "truncated.dcm", chest_like(32)).read_bytes()
    (data / "b" / "truncated.dcm").write_bytes(full[:-500])
    write_dicom(data / "b" / "report.dcm", chest_like(16), sop_class=BasicTextSRStorage, modality="SR")
    (data / "b" / "fake.dcm").write_text("this is not a DICOM file, just text with a .dcm name\n" * 5)


def test_bad_files_are_quarantined_with_reasons_and_indexing_continues(tmp_path: Path) -> None:
    _bad_files(tmp_path / "data")
    out = tmp_path / "out"
    m = index_scans(tmp_path / "data", config=FAST, out_dir=out)
    assert sorted(m.df["path"]) == ["a/good1.dcm", "a/good2.dcm", "b/good3.dcm", "b/good4.dcm"]
    q = pd.read_csv(out / "quarantine.csv", dtype=str).set_index("path")
    assert q["problem"].to_dict() == {"b/empty.dcm": "empty", "b/truncated.dcm": "truncated",
                                      "b/report.dcm": "non_image", "b/fake.dcm": "not_image"}
    assert "Basic Text SR" in q.loc["b/report.dcm", "reason"] and "truncated" in q.loc["b/truncated.dcm", "reason"]
    assert any("4 file(s) quarantined" in w for w in m.warnings)
    summary = summary_dict(m)["quarantine"]
    assert (summary["total"], summary["by_problem"]) == (4, {"empty": 1, "truncated": 1, "non_image": 1,
                                                             "not_image": 1})
    assert summary["reasons"]["truncated"] == [q.loc["b/truncated.dcm", "reason"]]  # why, per problem


def test_strict_raises_for_the_first_bad_file(tmp_path: Path) -> None:
    _bad_files(tmp_path / "data")
    with pytest.raises(ScanReadError, match=r"b/(empty|truncated|report|fake)\.dcm"):
        index_scans(tmp_path / "data", config=FAST, strict=True)
    with pytest.raises(ScanReadError):
        index_scans(tmp_path / "data", config=DataConfig(verify_pixels=False, strict=True))


def test_no_pixel_data_and_missing_rows_are_quarantined(tmp_path: Path) -> None:
    import pydicom

    for name in ("a/ok.dcm", "b/ok.dcm", "b/nopix.dcm", "b/norows.dcm"):
        write_dicom(tmp_path / name, chest_like(16))
    ds = pydicom.dcmread(tmp_path / "b/nopix.dcm")
    del ds.PixelData
    ds.save_as(tmp_path / "b/nopix.dcm")
    ds = pydicom.dcmread(tmp_path / "b/norows.dcm")
    del ds.Rows
    ds.save_as(tmp_path / "b/norows.dcm")
    q = index_scans(tmp_path, config=FAST).quarantine.set_index("path")["problem"].to_dict()
    assert q == {"b/nopix.dcm": "no_pixels", "b/norows.dcm": "no_size"}


def test_verify_pixels_quarantines_constant_images(tmp_path: Path) -> None:
    write_dicom(tmp_path / "a" / "ok.dcm", chest_like(16))
    write_dicom(tmp_path / "b" / "ok.dcm", chest_like(16, seed=1))
    write_dicom(tmp_path / "b" / "flat.dcm", np.full((16, 16), 7, np.uint16))
    m = index_scans(tmp_path, config=DataConfig(verify_pixels=True), progress=True)
    assert sorted(m.df["path"]) == ["a/ok.dcm", "b/ok.dcm"]
    assert m.quarantine["path"].tolist() == ["b/flat.dcm"] and m.quarantine["problem"].tolist() == ["pixels"]
    assert "constant" in m.quarantine["reason"].iloc[0]
    with pytest.raises(ScanReadError, match="flat.dcm"):
        index_scans(tmp_path, config=DataConfig(verify_pixels=True, strict=True))


def test_symlink_loop_does_not_hang_and_outside_links_are_not_read(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_dicom(data / "a" / "x.dcm", chest_like(16), patient_id="A")
    write_dicom(data / "b" / "y.dcm", chest_like(16, seed=1), patient_id="B")
    os.symlink(data / "a", data / "a" / "loop")  # a/loop -> a
    os.symlink("..", data / "b" / "up")  # b/up -> data
    secret = write_dicom(tmp_path / "outside.dcm", chest_like(16, seed=2))
    os.symlink(secret, data / "b" / "outside.dcm")
    m = index_scans(data, config=FAST)
    assert sorted(m.df["path"]) == ["a/x.dcm", "b/y.dcm"]
    assert m.quarantine.set_index("path")["problem"].to_dict() == {"b/outside.dcm": "outside"}
    assert any("2 folder symlink(s) were not followed, 2 of them forming loops" in w for w in m.warnings)


def test_empty_folder_missing_folder_and_single_class_fail_clearly(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(ManifestError, match=r"no scans found .*DICOM.*NIfTI.*PNG"):
        index_scans(tmp_path / "empty", config=FAST)
    with pytest.raises(ManifestError, match="not found"):
        index_scans(tmp_path / "nope", config=FAST)
    write_dicom(tmp_path / "one" / "normal" / "a.dcm", chest_like(16))
    with pytest.raises(ManifestError, match="at least two classes.*'normal'"):
        index_scans(tmp_path / "one", config=FAST)
    write_dicom(tmp_path / "two" / "normal" / "a.dcm", chest_like(16))
    (tmp_path / "two" / "sick").mkdir()
    (tmp_path / "two" / "sick" / "bad.dcm").write_bytes(b"")
    with pytest.raises(ManifestError, match=r"class folder\(s\) \['sick'\] have no usable scan"):
        index_scans(tmp_path / "two", config=FAST, out_dir=tmp_path / "out2")
    assert "sick/bad.dcm" in (tmp_path / "out2" / "quarantine.csv").read_text()


def test_outputs_are_written_and_reload_and_reindexing_is_stable(mixed: Path) -> None:
    out = mixed / "runs" / "index"  # inside the data folder: must not be indexed the second time
    first = index_scans(mixed, config=FAST, out_dir=out)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.csv", "manifest.json", "quarantine.csv",
                                                     "summary.json"]
    assert (out / "quarantine.csv").read_text().strip() == "path,problem,reason"
    assert json.loads((out / "summary.json").read_text())["n_cases"] == 6
    again = index_scans(mixed, config=FAST, out_dir=out)
    pd.testing.assert_frame_equal(first.df, again.df)
    loaded = Manifest.load(out)
    assert (loaded.classes, loaded.task, len(loaded)) == (first.classes, first.task, 6)
    assert loaded.digest() == first.digest()


def test_phi_never_leaks_into_outputs_logs_or_summary(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = tmp_path / "data"
    canary_dir = data / "normal" / f"{CANARY_ID}_study"
    write_dicom(canary_dir / f"{CANARY_ID}.dcm", chest_like(16))  # factory defaults: every PHI tag is a canary
    write_dicom(data / "normal" / "b.dcm", chest_like(16, seed=1))
    write_dicom(data / "sick" / "c.dcm", chest_like(16, seed=2))
    ct_series(data / "sick" / "ct", 2, patient_id=CANARY_ID, names=[f"{CANARY_ID}_{k}.dcm" for k in range(2)])
    (data / "sick" / f"{CANARY_ID}_broken.dcm").write_bytes(b"")
    out = tmp_path / "out"
    console = Console(record=True, width=200)
    with caplog.at_level(logging.DEBUG):
        m = index_scans(data, config=DataConfig(verify_pixels=True), out_dir=out, progress=True)
        render_summary(m, console)
    assert len(m.quarantine) == 1 and len(m) == 4
    texts = {"log": caplog.text, "console": console.export_text(), "warnings": "\n".join(m.warnings)}
    for f in out.iterdir():
        if f.name == "manifest.csv":
            texts[f.name] = pd.read_csv(f, dtype=str).drop(columns=["path", "files"]).to_csv()
        elif f.name == "quarantine.csv":
            texts[f.name] = pd.read_csv(f, dtype=str).drop(columns=["path"]).to_csv()
        else:
            texts[f.name] = f.read_text()
    assert {"manifest.csv", "manifest.json", "quarantine.csv", "summary.json"} <= set(texts)
    for where, text in texts.items():
        for canary in (*CANARIES, "CANARYSTREET"):
            assert canary not in text, f"{canary} leaked into {where}"
    assert CANARY_ID in (out / "manifest.csv").read_text()  # the check above can fail: the path column has it


# -- folders without labels: an inventory (require_labels=False, what `medtransfer index` does) ----------------
def _unlabelled(root: Path) -> Path:
    """Scans as a scanner export leaves them: no class sub-folders and no labels CSV."""
    write_dicom(root / "cr1.dcm", chest_like(16), patient_id="P1", sex="F", age="045Y", view="PA")
    write_dicom(root / "cr2.dcm", chest_like(16, seed=1), patient_id="P1", sex="F", age="045Y", view="LL")
    write_dicom(root / "dx.dcm", chest_like(24, seed=2), patient_id="P2", sex="M", age=None, modality="DX", view="AP")
    ct_series(root, 3, patient_id="P3")  # slices directly in the folder: one case, path "."
    (root / "broken.dcm").write_bytes(b"")
    return root


def test_a_folder_without_labels_is_an_inventory_without_labels_or_split(tmp_path: Path) -> None:
    data = _unlabelled(tmp_path / "data")
    out = tmp_path / "out"
    m = index_scans(data, config=FAST, out_dir=out, require_labels=False)
    assert (m.task, m.classes, m.labelled, m.label_columns) == ("unlabelled", [], False, [])
    assert "label" not in m.df.columns and "split" not in m.df.columns  # no split without labels
    assert sorted(m.df["path"]) == [".", "cr1.dcm", "cr2.dcm", "dx.dcm"]
    assert m.quarantine.set_index("path")["problem"].to_dict() == {"broken.dcm": "empty"}
    info = summary_dict(m)
    assert (info["n_cases"], info["n_files"], info["n_series"], info["n_patients"]) == (4, 6, 1, 3)
    assert info["inventory"]["kind"] == {"2D image": 3, "series (volume)": 1}
    assert info["inventory"]["size"] == {"16x16": 2, "16x16x3": 1, "24x24": 1}
    assert info["inventory"]["modality"] == {"CR": 2, "CT": 1, "DX": 1}
    assert info["inventory"]["view"] == {"AP": 1, "LL": 1, "PA": 2}  # the CT's too
    assert info["subgroups"]["sex"] == {"F": 3, "M": 1}
    assert info["age"] == {"known": 3, "min": 45.0, "median": 45.0, "max": 45.0}
    assert info["splits"] == {} and info["quarantine"]["reasons"]["empty"][0].startswith("empty file")
    loaded = Manifest.load(out)
    assert (loaded.task, loaded.classes, len(loaded), loaded.digest()) == ("unlabelled", [], 4, m.digest())
    assert json.loads((out / "summary.json").read_text())["task"] == "unlabelled"
    for refused in (loaded.targets, lambda: loaded.split("train")):
        with pytest.raises(ManifestError, match="unlabelled inventory.*at least two classes"):
            refused()


def test_labels_stay_required_by_default_with_the_two_classes_message(tmp_path: Path) -> None:
    data = _unlabelled(tmp_path / "data")
    with pytest.raises(ManifestError, match="need at least two classes.*found none.*none in a class sub-folder"):
        index_scans(data, config=FAST)


def test_a_single_class_folder_is_inventoried_whole(tmp_path: Path) -> None:
    write_dicom(tmp_path / "DICOM" / "a.dcm", chest_like(16), patient_id="A")
    write_dicom(tmp_path / "b.dcm", chest_like(16, seed=1), patient_id="B")  # beside it, not in a class folder
    m = index_scans(tmp_path, config=FAST, require_labels=False)
    assert m.task == "unlabelled" and sorted(m.df["path"]) == ["DICOM/a.dcm", "b.dcm"]
    assert any("only one class sub-folder ('DICOM')" in w for w in m.warnings)
    with pytest.raises(ManifestError, match="at least two classes.*found only 'DICOM'"):
        index_scans(tmp_path, config=FAST)


def test_class_folders_are_used_the_same_whether_labels_are_required_or_not(mixed: Path) -> None:
    required = index_scans(mixed, config=FAST)
    optional = index_scans(mixed, config=FAST, require_labels=False)
    assert optional.task == required.task == "binary"
    pd.testing.assert_frame_equal(optional.df, required.df)


def test_inventory_summary_names_no_file(tmp_path: Path) -> None:
    """Quarantine reasons reach summary.json and the console; a file name a decoder's message quoted does not."""
    data = _unlabelled(tmp_path / "data")
    m = index_scans(data, config=FAST, require_labels=False)
    m.quarantine = pd.DataFrame({"path": [f"x/{CANARY_ID}.dcm"], "problem": ["pixels"],
                                 "reason": [f"decoder error (OSError: cannot read x/{CANARY_ID}.dcm)"]})
    console = Console(record=True, width=200)
    render_summary(m, console)
    text = console.export_text() + json.dumps(summary_dict(m))
    assert "decoder error (OSError: cannot read <file>)" in text and CANARY_ID not in text
    assert "no labels (inventory)" in text and "what was found" in text
