"""CheXpert on a replica of v1.0-small: -1 policies, blanks and No Finding, views, patient from path, roots."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

import medtransfer as mt
from medtransfer.errors import DatasetLayoutError
from tests.datasets.replicas_nih_chexpert_mimic import CHEXPERT_FINDINGS, CHEXPERT_HEADER, make_chexpert

P2 = "CheXpert-v1.0-small/train/patient00002/study2/view1_frontal.jpg"


def _frame(result) -> pd.DataFrame:  # noqa: ANN001
    return result.frame.set_index("path")


def test_the_replica_has_the_official_header_and_field_count(tmp_path: Path) -> None:
    base = make_chexpert(tmp_path)
    for name in ("train.csv", "valid.csv"):
        lines = (base / name).read_text().splitlines()
        assert lines[0] == CHEXPERT_HEADER
        assert {line.count(",") for line in lines} == {18}


@pytest.mark.parametrize(("policy", "uncertain"), [("ignore", math.nan), ("ones", 1.0), ("zeros", 0.0)])
def test_uncertain_labels_follow_the_policy_and_blanks_stay_unknown(tmp_path: Path, policy: str,
                                                                    uncertain: float) -> None:
    make_chexpert(tmp_path / "cx", missing=False)
    result = mt.datasets.prepare("chexpert", tmp_path / "cx", out=tmp_path / "c.csv", uncertain=policy)
    row = _frame(result).loc[P2]  # ,,-1.0,1.0,,-1.0,-1.0,,-1.0,,-1.0,,1.0,
    for name in ("Cardiomegaly", "Edema", "Consolidation", "Atelectasis", "Pleural Effusion"):
        assert row[name] == uncertain or (math.isnan(uncertain) and math.isnan(row[name])), name
    assert row["Lung Opacity"] == 1.0 and row["Fracture"] == 1.0
    for name in ("No Finding", "Enlarged Cardiomediastinum", "Lung Lesion", "Pneumonia", "Pneumothorax",
                 "Pleural Other", "Support Devices"):
        assert math.isnan(row[name]), name  # blank = not mentioned = unknown, never 0


def test_no_finding_sets_blank_pathologies_to_zero_but_not_support_devices(tmp_path: Path) -> None:
    make_chexpert(tmp_path / "cx", missing=False)
    result = mt.datasets.prepare("chexpert", tmp_path / "cx", out=tmp_path / "c.csv")
    row = _frame(result).loc["CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"]
    assert row["No Finding"] == 1.0 and row["Support Devices"] == 1.0
    assert all(row[f] == 0.0 for f in CHEXPERT_FINDINGS[1:-1])
    other = _frame(result).loc["CheXpert-v1.0-small/train/patient00004/study1/view1_frontal.jpg"]
    assert other["Support Devices"] == 0.0  # stated 0.0 stays


def test_patients_studies_views_sex_and_splits(tmp_path: Path) -> None:
    make_chexpert(tmp_path / "cx", missing=False)
    result = mt.datasets.prepare("chexpert", tmp_path / "cx", out=tmp_path / "c.csv")
    df = _frame(result)
    lateral = df.loc["CheXpert-v1.0-small/train/patient00002/study1/view2_lateral.jpg"]
    assert (lateral["patient_id"], lateral["study_id"], lateral["view"], lateral["sex"], lateral["age"]) == (
        "patient00002", "patient00002_study1", "LATERAL", "F", 83.0)
    assert df.loc[P2, "study_id"] == "patient00002_study2"  # the same patient's other study
    assert df.loc["CheXpert-v1.0-small/train/patient00004/study1/view1_frontal.jpg", "sex"] == ""  # Unknown
    assert df.loc["CheXpert-v1.0-small/train/patient00004/study1/view1_frontal.jpg", "view"] == "PA"
    valid = df[df.index.str.contains("/valid/")]
    assert set(valid["split"]) == {"val"} and len(valid) == 3
    # no test labels: test carved from train by patient; every split present, no patient in two
    assert set(df["split"]) == {"train", "val", "test"}
    assert df.groupby("patient_id")["split"].nunique().max() == 1
    assert result.summary["patients"] == 6 and result.summary["studies"] == 7


def test_root_may_be_the_release_folder_itself(tmp_path: Path) -> None:
    base = make_chexpert(tmp_path / "cx", missing=False)
    outer = mt.datasets.prepare("chexpert", tmp_path / "cx", out=tmp_path / "a.csv")
    inner = mt.datasets.prepare("chexpert", base, out=tmp_path / "b.csv")
    assert [p.removeprefix("CheXpert-v1.0-small/") for p in outer.frame["path"]] == inner.frame["path"].tolist()
    assert inner.frame["path"][0] == "train/patient00001/study1/view1_frontal.jpg"
    assert (base / inner.frame["path"][0]).is_file()


def test_test_labels_when_present_become_the_test_split(tmp_path: Path) -> None:
    make_chexpert(tmp_path / "cx", missing=False, test_labels=True)
    result = mt.datasets.prepare("chexpert", tmp_path / "cx", out=tmp_path / "c.csv")
    df = result.frame
    test = df[df["split"] == "test"]
    assert test["path"].tolist() == [f"CheXpert-v1.0-small/test/patient6474{p}" for p in
                                     ("1/study1/view1_frontal.jpg", "1/study1/view2_lateral.jpg",
                                      "2/study1/view1_frontal.jpg")]
    assert test["view"].tolist() == ["FRONTAL", "LATERAL", "FRONTAL"]  # from the file name
    assert set(df.loc[df["path"].str.contains("/train/"), "split"]) == {"train"}


def test_frontal_only_and_harmonised_names(tmp_path: Path) -> None:
    make_chexpert(tmp_path / "cx", missing=False)
    result = mt.datasets.prepare("chexpert", tmp_path / "cx", out=tmp_path / "c.csv", views=["FRONTAL"],
                                 findings="harmonised")
    df = pd.read_csv(result.csv_path, keep_default_na=False, dtype=str).set_index("path")
    assert not df.index.str.contains("lateral").any() and len(df) == 7
    assert df.loc[P2, "Effusion"] == "" and df.loc[P2, "Lung Opacity"] == "1"  # Pleural Effusion -1 -> blank
    row = df.loc["CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg"]
    assert row["Effusion"] == "0" and row["Infiltration"] == "" and row["Nodule"] == ""  # never labelled: blank
    assert "No Finding" not in df.columns and "Support Devices" not in df.columns


def test_missing_image_and_missing_valid_csv(tmp_path: Path) -> None:
    base = make_chexpert(tmp_path / "cx")
    with pytest.raises(DatasetLayoutError, match="patient00005/study1/view1_frontal.jpg"):
        mt.datasets.prepare("chexpert", tmp_path / "cx", out=tmp_path / "c.csv")
    (base / "valid.csv").unlink()
    with pytest.raises(DatasetLayoutError, match=r"expected 'valid.csv'.*stanfordaimi"):
        mt.datasets.prepare("chexpert", tmp_path / "cx", out=tmp_path / "c.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetLayoutError, match=r"'train.csv' or 'CheXpert-v1.0-small/train.csv'"):
        mt.datasets.prepare("chexpert", tmp_path / "empty")


def test_a_renamed_column_is_named_in_the_error(tmp_path: Path) -> None:
    base = make_chexpert(tmp_path / "cx", missing=False)
    text = (base / "train.csv").read_text()
    (base / "train.csv").write_text(text.replace("Pleural Effusion", "Effusion", 1))
    with pytest.raises(DatasetLayoutError, match=r"column\(s\) \['Pleural Effusion'\] not found"):
        mt.datasets.prepare("chexpert", tmp_path / "cx")
