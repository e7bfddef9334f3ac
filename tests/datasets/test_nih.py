"""NIH ChestX-ray14 on a replica of its official layout: exact rows written, split, ages, errors."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

import medtransfer as mt
from medtransfer.errors import DatasetLayoutError
from tests.datasets.replicas_nih_chexpert_mimic import NIH_FINDINGS, NIH_HEADER, NIH_ROWS, make_nih


def _read(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False, dtype=str)


def test_the_replica_has_the_official_header_and_field_count(tmp_path: Path) -> None:
    root = make_nih(tmp_path / "nih", version="2017")
    lines = (root / "Data_Entry_2017.csv").read_text().splitlines()
    assert lines[0] == NIH_HEADER + ","  # the 2017 file ends every line with a comma
    assert {line.count(",") for line in lines} == {11}


def test_every_image_becomes_one_row_with_its_findings_ids_and_official_split(tmp_path: Path) -> None:
    root = make_nih(tmp_path / "nih", missing=False)
    result = mt.datasets.prepare("nih", root, out=tmp_path / "nih.csv")
    df = _read(result.csv_path)
    assert list(df.columns) == ["path", *NIH_FINDINGS, "patient_id", "study_id", "sex", "age", "view", "split"]
    assert df["path"].tolist()[:6] == [f"images_001/images/0000000{p}.png" for p in
                                       ("1_000", "1_001", "1_002", "2_000", "3_000")] + [
        "images_002/images/00000003_001.png"]
    row = df.set_index("path").loc["images_001/images/00000001_002.png"]
    assert row[list(NIH_FINDINGS)].tolist() == ["0", "1", "1", *["0"] * 11]  # Cardiomegaly|Effusion
    assert (row["patient_id"], row["study_id"], row["sex"], row["age"], row["view"]) == (
        "1", "00000001_002", "M", "58", "PA")
    many = df.set_index("path").loc["images_002/images/00000006_000.png"]
    assert {f for f in NIH_FINDINGS if many[f] == "1"} == {"Atelectasis", "Consolidation", "Edema", "Fibrosis",
                                                          "Pneumonia"}
    # No Finding: all 14 are 0, never blank (every NIH finding is stated)
    healthy = df[df["path"].str.endswith(("00000002_000.png", "00000005_000.png"))]
    assert (healthy[list(NIH_FINDINGS)] == "0").all().all()
    assert (df[list(NIH_FINDINGS)] != "").all().all()
    # official test split kept; val carved from train_val by patient (whole patients)
    test_images = {r[0] for r in NIH_ROWS if r[8]}
    assert set(df.loc[df["split"] == "test", "path"].str.rsplit("/", n=1).str[-1]) == test_images
    assert set(df["split"]) == {"train", "val", "test"}
    assert df.groupby("patient_id")["split"].nunique().max() == 1
    assert result.summary["studies"] == 10 and result.summary["patients"] == 6


def test_the_2017_file_trailing_comma_and_implausible_age_are_handled(tmp_path: Path) -> None:
    root = make_nih(tmp_path / "nih", version="2017", missing=False)
    with pytest.warns(UserWarning, match="1 age"):
        result = mt.datasets.prepare("nih", root, out=tmp_path / "nih.csv")
    df = _read(result.csv_path).set_index("path")
    assert df.loc["images_001/images/00000003_000.png", "age"] == ""  # 413 years
    assert "Unnamed: 11" not in df.columns
    fixed = mt.datasets.prepare("nih", make_nih(tmp_path / "nih20", missing=False), out=tmp_path / "n20.csv")
    assert _read(fixed.csv_path).set_index("path").loc["images_001/images/00000003_000.png", "age"] == "74"


def test_the_v2020_file_is_preferred_when_both_are_there(tmp_path: Path) -> None:
    root = make_nih(tmp_path / "nih", missing=False)
    (root / "Data_Entry_2017.csv").write_text(NIH_HEADER + ",\nbogus.png,No Finding,0,1,50,M,PA,1,1,1,1,\n")
    result = mt.datasets.prepare("nih", root, out=tmp_path / "nih.csv")
    assert result.summary["rows"] == 10


def test_views_keep_only_the_asked_positions(tmp_path: Path) -> None:
    root = make_nih(tmp_path / "nih", missing=False)
    result = mt.datasets.prepare("nih", root, out=tmp_path / "nih.csv", views=["AP"])
    assert set(_read(result.csv_path)["view"]) == {"AP"} and result.summary["rows"] == 3


def test_without_the_split_lists_split_is_left_to_medtransfer(tmp_path: Path) -> None:
    root = make_nih(tmp_path / "nih", lists=False, missing=False)
    with pytest.warns(UserWarning, match="test_list.txt not found"):
        result = mt.datasets.prepare("nih", root, out=tmp_path / "nih.csv")
    assert set(_read(result.csv_path)["split"]) == {""} and result.summary["splits"] == {}


def test_a_listed_image_missing_on_disk_is_reported_and_dropped_with_allow_missing(tmp_path: Path) -> None:
    root = make_nih(tmp_path / "nih")
    with pytest.raises(DatasetLayoutError, match=r"1 of the 11 images .*images/00000007_000.png"):
        mt.datasets.prepare("nih", root, out=tmp_path / "nih.csv")
    with pytest.warns(UserWarning, match="not on disk"):
        result = mt.datasets.prepare("nih", root, out=tmp_path / "nih.csv", allow_missing=True)
    assert result.summary["missing_files"] == {"count": 1, "first": ["images/00000007_000.png"]}
    assert result.summary["rows"] == 10


def test_a_missing_label_file_names_it_and_where_to_get_the_dataset(tmp_path: Path) -> None:
    (tmp_path / "nih").mkdir()
    with pytest.raises(DatasetLayoutError, match=r"expected 'Data_Entry_2017_v2020.csv' or 'Data_Entry_2017.csv'"
                       r".*https://nihcc.app.box.com/v/ChestXray-NIHCC"):
        mt.datasets.prepare("nih", tmp_path / "nih")


def test_an_unknown_finding_name_is_refused(tmp_path: Path) -> None:
    root = make_nih(tmp_path / "nih", missing=False)
    path = root / "Data_Entry_2017_v2020.csv"
    path.write_text(path.read_text().replace("Cardiomegaly|Emphysema", "Cardiomegaly|Emphysem"))
    with pytest.raises(DatasetLayoutError, match="row 2: finding 'Emphysem' is not one of the 14"):
        mt.datasets.prepare("nih", root)
