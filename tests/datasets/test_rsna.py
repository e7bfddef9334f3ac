"""RSNA Pneumonia adapter on a replica of Kaggle's stage 2 files: boxes collapsed, headers read, missing handled."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from medtransfer.datasets.public import VOCABULARY, prepare
from medtransfer.datasets.public.rsna import dicom_tags
from medtransfer.errors import DatasetLayoutError
from tests.datasets.replicas_others import RSNA_EXPECTED, RSNA_IDS, make_rsna
from tests.factories import CANARIES


def _csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def rsna_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_rsna(tmp_path_factory.mktemp("rsna"))


def test_one_row_per_image_with_target_boxes_class_and_header_fields(rsna_root: Path, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="1 listed image"):
        result = prepare("rsna", rsna_root, out=tmp_path / "rsna.csv", allow_missing=True)
    df = _csv(result.csv_path)
    assert list(df.columns) == ["path", "label", "Pneumonia", "patient_id", "study_id", "sex", "age", "view", "split",
                                "boxes", "detailed_class"]
    assert set(df["patient_id"]) == set(RSNA_EXPECTED)  # the missing image is dropped, the test image not listed
    for pid, (target, boxes, detail, sex, age, view) in RSNA_EXPECTED.items():
        row = df.loc[df["patient_id"] == pid].iloc[0]
        assert row["path"] == f"stage_2_train_images/{pid}.dcm"
        assert row["study_id"] == pid
        assert row["Pneumonia"] == str(int(target))
        assert row["label"] == ("pneumonia" if target else "normal")
        assert (row["boxes"], row["detailed_class"], row["sex"], row["view"]) == (str(boxes), detail, sex, view)
        assert row["age"] == ("" if math.isnan(age) else str(int(age)))
    assert set(df["split"]) == {""}  # no public test labels: medtransfer splits by patient
    summary = result.summary
    assert summary["missing_files"] == {"count": 1, "first": [f"stage_2_train_images/{RSNA_IDS['missing']}.dcm"]}
    assert summary["labels"] == {"normal": 3, "pneumonia": 2} and summary["official_split"] is False
    text = result.csv_path.read_text()
    assert not any(canary in text for canary in CANARIES)


def test_a_listed_image_missing_on_disk_fails_without_allow_missing(rsna_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match=r"1 of the 6 images .* not on disk .*0a1b2c3d-5555.*--allow-missing"):
        prepare("rsna", rsna_root, out=tmp_path / "rsna.csv")
    assert not (tmp_path / "rsna.csv").exists()


def test_view_filter_and_harmonised_columns(rsna_root: Path, tmp_path: Path) -> None:
    # the missing image has no header, so no view: it is still reported missing, not dropped by the PA filter
    with pytest.raises(DatasetLayoutError, match=r"not on disk .*0a1b2c3d-5555"):
        prepare("rsna", rsna_root, out=tmp_path / "pa.csv", views=["PA"], findings="harmonised")
    with pytest.warns(UserWarning, match="not on disk"):
        result = prepare("rsna", rsna_root, out=tmp_path / "pa.csv", views=["PA"], findings="harmonised",
                         allow_missing=True)
    assert result.summary["missing_files"]["count"] == 1
    df = _csv(result.csv_path)
    assert set(df["view"]) == {"PA"} and len(df) == 3
    assert list(df.columns[2:2 + len(VOCABULARY)]) == list(VOCABULARY)
    assert df.set_index("patient_id").loc[RSNA_IDS["one_box"], "Pneumonia"] == "1"
    assert (df["Lung Opacity"] == "").all() and (df["Effusion"] == "").all()  # never labelled: blank, not 0


def test_without_the_detailed_class_file_the_column_is_left_out(tmp_path: Path) -> None:
    root = make_rsna(tmp_path / "rsna", detailed=False)
    with pytest.warns(UserWarning, match="not on disk"):
        df = _csv(prepare("rsna", root, out=tmp_path / "r.csv", allow_missing=True).csv_path)
    assert "detailed_class" not in df.columns and len(df) == 5


def test_missing_labels_csv_names_the_file_and_where_to_get_it(tmp_path: Path) -> None:
    (tmp_path / "stage_2_train_images").mkdir()
    with pytest.raises(DatasetLayoutError, match=r"stage_2_train_labels\.csv.*kaggle\.com/c/rsna-pneumonia"):
        prepare("rsna", tmp_path, out=tmp_path / "r.csv")


def test_a_target_other_than_0_or_1_is_refused(tmp_path: Path) -> None:
    (tmp_path / "stage_2_train_labels.csv").write_text("patientId,x,y,width,height,Target\nabc,,,,,2\n")
    with pytest.raises(DatasetLayoutError, match=r"stage_2_train_labels\.csv: Target '2' is not 0 or 1"):
        prepare("rsna", tmp_path, out=tmp_path / "r.csv")


def test_dicom_tags_reads_the_header_and_tells_missing_from_unreadable(rsna_root: Path, tmp_path: Path) -> None:
    path = rsna_root / "stage_2_train_images" / f"{RSNA_IDS['not_normal']}.dcm"
    assert dicom_tags(path) == {"PatientSex": "M", "PatientAge": "048Y", "ViewPosition": "AP"}
    assert dicom_tags(tmp_path / "absent.dcm") == {}
    (tmp_path / "bad.dcm").write_bytes(b"not a dicom file at all")
    assert dicom_tags(tmp_path / "bad.dcm") is None
