"""VinDr-CXR adapter on a replica of PhysioNet 1.0.0: readers combined, official split kept, no patient ids."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from medtransfer.datasets.public import VOCABULARY, prepare
from medtransfer.datasets.public.base import PrepareOptions
from medtransfer.datasets.public.vindr import FINDINGS, read
from medtransfer.errors import DatasetLayoutError
from tests.datasets.replicas_others import VINDR_IDS, make_vindr
from tests.factories import CANARIES


def _csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _positives(row: pd.Series) -> set[str]:
    return {name for name in FINDINGS if row[name] == "1"}


@pytest.fixture(scope="module")
def vindr_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_vindr(tmp_path_factory.mktemp("vindr"))


def test_readers_are_combined_and_the_official_split_is_kept(vindr_root: Path, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="1 listed image"):
        result = prepare("vindr", vindr_root, out=tmp_path / "v.csv", allow_missing=True, val_fraction=0.4)
    df = _csv(result.csv_path).set_index("patient_id")
    ids = VINDR_IDS
    assert set(df.index) == {ids["cardio"], ids["clear"], ids["effusion"], ids["pneumonia"], ids["test_clear"]}
    # one reader of three marked cardiomegaly + aortic enlargement: positive; "No finding" needs all three
    assert _positives(df.loc[ids["cardio"]]) == {"Cardiomegaly", "Aortic enlargement"}
    assert _positives(df.loc[ids["clear"]]) == {"No finding"}
    assert _positives(df.loc[ids["effusion"]]) == {"Pleural effusion", "Rib fracture", "Nodule/Mass",
                                                   "Other diseases"}
    # the test file spells the column "Other disease"
    assert _positives(df.loc[ids["pneumonia"]]) == {"Pneumonia", "Lung Opacity", "Consolidation", "Other diseases"}
    assert _positives(df.loc[ids["test_clear"]]) == {"No finding"}
    assert (df.index == df["study_id"]).all()  # each image its own patient and study
    assert df.loc[ids["pneumonia"], "path"] == f"test/{ids['pneumonia']}.dicom"
    assert df.loc[ids["cardio"], "path"] == f"train/{ids['cardio']}.dicom"
    assert set(df.loc[[ids["pneumonia"], ids["test_clear"]], "split"]) == {"test"}
    assert set(df.loc[[ids["cardio"], ids["clear"], ids["effusion"]], "split"]) <= {"train", "val"}
    carved = read(vindr_root, PrepareOptions(val_fraction=0.4))  # val is carved from train, by image
    assert (carved["split"] == "val").sum() >= 1 and set(carved["split"]) == {"train", "val", "test"}
    assert (df.loc[ids["cardio"], "sex"], df.loc[ids["cardio"], "age"]) == ("F", "61")
    assert (df.loc[ids["effusion"], "sex"], df.loc[ids["clear"], "age"]) == ("", "")  # "O" and a blank age
    assert set(df["view"]) == {"PA"}
    assert result.summary["missing_files"]["first"] == [f"train/{ids['missing']}.dicom"]
    assert not any(canary in result.csv_path.read_text() for canary in CANARIES)


def test_harmonised_columns_map_fractures_and_effusion_and_leave_nodule_mass_out(vindr_root: Path,
                                                                                tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="not on disk"):
        df = _csv(prepare("vindr", vindr_root, out=tmp_path / "h.csv", findings="harmonised",
                          allow_missing=True).csv_path).set_index("patient_id")
    assert list(df.columns[1:1 + len(VOCABULARY)]) == list(VOCABULARY)
    row = df.loc[VINDR_IDS["effusion"]]
    assert (row["Effusion"], row["Fracture"], row["Nodule"], row["Mass"]) == ("1", "1", "", "")
    assert (df["Hernia"] == "").all() and (df["Enlarged Cardiomediastinum"] == "").all()
    assert df.loc[VINDR_IDS["cardio"], "Fracture"] == "0" and df.loc[VINDR_IDS["pneumonia"], "Pneumonia"] == "1"


def test_without_the_test_file_only_train_is_written(tmp_path: Path) -> None:
    root = make_vindr(tmp_path / "vindr", test=False)
    with pytest.warns(UserWarning, match="not on disk"):
        df = _csv(prepare("vindr", root, out=tmp_path / "v.csv", allow_missing=True).csv_path)
    assert set(df["split"]) <= {"train", "val"} and len(df) == 3


def test_missing_label_file_names_it(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(DatasetLayoutError, match=r"annotations/image_labels_train\.csv.*physionet\.org"):
        prepare("vindr", tmp_path, out=tmp_path / "v.csv")


def test_a_label_value_other_than_0_1_blank_is_refused(tmp_path: Path) -> None:
    labels = tmp_path / "annotations" / "image_labels_train.csv"
    labels.parent.mkdir()
    labels.write_text("image_id,rad_id,Cardiomegaly,No finding\nabc,R1,yes,0\n")
    with pytest.raises(DatasetLayoutError, match=r"column 'Cardiomegaly': value 'yes' is not 1, 0, -1 or blank"):
        prepare("vindr", tmp_path, out=tmp_path / "v.csv")
