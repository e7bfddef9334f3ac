"""Kermany adapter on a replica of the Kaggle layout: patients from file names, val re-carved, test kept."""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
import pytest

from medtransfer.datasets.public import VOCABULARY, prepare
from medtransfer.datasets.public.base import PrepareOptions
from medtransfer.datasets.public.kermany import parse_name, read
from medtransfer.errors import DatasetLayoutError
from tests.datasets.replicas_others import KERMANY_FILES, make_kermany

# person1 is in the official train and test of the replica (as a child may be in the real release)
pytestmark = pytest.mark.filterwarnings("ignore:1 patient.s. appear in more than one:UserWarning")


def _csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def kermany_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_kermany(tmp_path_factory.mktemp("kermany"))


@pytest.mark.parametrize(("name", "patient", "subtype"), [
    ("person1_bacteria_1.jpeg", "person1", "bacterial"),
    ("person1527_virus_2661.jpeg", "person1527", "viral"),
    ("IM-0115-0001.jpeg", "IM-0115", ""),
    ("IM-0119-0001-0002.jpeg", "IM-0119", ""),
    ("NORMAL2-IM-1427-0001.jpeg", "NORMAL2-IM-1427", ""),
    ("scan 7.jpeg", "scan 7", ""),
])
def test_file_names_give_the_patient_and_the_subtype(name: str, patient: str, subtype: str) -> None:
    assert parse_name(name) == (patient, subtype)


def test_every_image_is_listed_once_with_its_class_patient_and_subtype(kermany_root: Path, tmp_path: Path) -> None:
    result = prepare("kermany", kermany_root, out=tmp_path / "k.csv")
    df = _csv(result.csv_path)
    expected = {f"chest_xray/{split}/{cls}/{name}" for split, cls, name in KERMANY_FILES}
    assert set(df["path"]) == expected and len(df) == len(KERMANY_FILES)  # no duplicate tree, no ._ forks
    rows = df.set_index("path")
    assert list(df.columns[:3]) == ["path", "label", "Pneumonia"]
    viral = rows.loc["chest_xray/train/PNEUMONIA/person1527_virus_2661.jpeg"]
    assert (viral["label"], viral["Pneumonia"], viral["patient_id"], viral["subtype"]) == (
        "pneumonia", "1", "person1527", "viral")
    normal = rows.loc["chest_xray/train/NORMAL/NORMAL2-IM-0535-0001.jpeg"]
    assert (normal["label"], normal["Pneumonia"], normal["patient_id"], normal["subtype"]) == (
        "normal", "0", "NORMAL2-IM-0535", "")
    assert rows.loc["chest_xray/train/NORMAL/IM-0535-0001.jpeg", "patient_id"] == "IM-0535"
    assert set(df["view"]) == {"AP"} and set(df["sex"]) == {""} and set(df["age"]) == {""}
    assert result.summary["labels"] == {"normal": 9, "pneumonia": 8}
    assert result.label_columns is None and "--label-columns" not in result.train_command


def test_official_test_is_kept_val_is_merged_and_recarved_by_patient(kermany_root: Path, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match=r"1 patient\(s\) appear in more than one of the dataset's splits"):
        df = _csv(prepare("kermany", kermany_root, out=tmp_path / "k.csv", val_fraction=0.3).csv_path)
    official_test = df["official_split"] == "test"
    assert (df.loc[official_test, "split"] == "test").all()
    # person1 has images in the official train and test: prepare moves the whole patient to test
    assert set(df.loc[df["patient_id"] == "person1", "split"]) == {"test"}
    rest = df.loc[~official_test & (df["patient_id"] != "person1")]
    assert set(rest["split"]) == {"train", "val"}
    assert set(df.loc[df["official_split"] == "val", "split"]) <= {"train", "val"}
    assert df.groupby("patient_id")["split"].nunique().max() == 1
    again = _csv(prepare("kermany", kermany_root, out=tmp_path / "k2.csv", val_fraction=0.3).csv_path)
    assert again.equals(df)  # deterministic


def test_harmonised_output_labels_pneumonia_only(kermany_root: Path, tmp_path: Path) -> None:
    df = _csv(prepare("kermany", kermany_root, out=tmp_path / "h.csv", findings="harmonised").csv_path)
    assert list(df.columns[2:2 + len(VOCABULARY)]) == list(VOCABULARY)
    assert set(df["Pneumonia"]) == {"0", "1"}
    assert all(set(df[name]) == {""} for name in VOCABULARY if name != "Pneumonia")


def test_root_may_be_chest_xray_itself_and_the_extra_folders_are_logged(
        kermany_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="medtransfer.datasets.public.kermany"):
        inner = read(kermany_root / "chest_xray", PrepareOptions())
    outer = read(kermany_root, PrepareOptions())
    assert len(inner) == len(outer) == len(KERMANY_FILES)
    assert inner["path"].str.startswith("train/").any() and not inner["path"].str.contains("chest_xray/").any()
    assert "ignoring chest_xray" in caplog.text


def test_a_folder_without_the_layout_names_what_it_expects(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetLayoutError, match=r"chest_xray/train.*NORMAL.*PNEUMONIA"):
        prepare("kermany", tmp_path, out=tmp_path / "k.csv")


@pytest.mark.realdata
def test_patient_ids_agree_with_the_real_subsets_labels(kermany_dir: str) -> None:
    """../shared/data/kermany-cxr-600 (real file names): parsed ids equal its labels.csv patient ids."""
    labels = pd.read_csv(Path(kermany_dir) / "labels.csv", dtype=str, keep_default_na=False)
    parsed = [parse_name(Path(p).name) for p in labels["path"]]
    assert [p for p, _ in parsed] == labels["patient_id"].tolist()
    subtype = {"bacterial": "bacterial", "viral": "viral", "none": ""}
    assert [s for _, s in parsed] == labels["pneumonia_type"].map(subtype).tolist()
