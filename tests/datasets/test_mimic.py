"""MIMIC-CXR-JPG on a replica: study labels joined to images, official split, views, gzip, negbio, errors."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

import medtransfer as mt
from medtransfer.errors import DatasetLayoutError
from tests.datasets.replicas_nih_chexpert_mimic import CHEXPERT_FINDINGS, MIMIC_LABEL_HEADER, make_mimic

PA = "files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.jpg"
LAT = "files/p10/p10000032/s50414267/174413ec-4ec4c1f7-34ea26b7-c5f994f8-79ef1962.jpg"
AP = "files/p10/p10000032/s53189527/2a2277a9-b0ded155-c0de8eb9-c124d10e-82c5caab.jpg"


def test_the_replica_label_file_has_the_official_header() -> None:
    assert MIMIC_LABEL_HEADER.split(",")[2:] == sorted(CHEXPERT_FINDINGS)  # the 14, alphabetical in MIMIC


def test_study_labels_reach_every_image_of_the_study(tmp_path: Path) -> None:
    root = make_mimic(tmp_path / "mimic", missing=False)
    result = mt.datasets.prepare("mimic", root, out=tmp_path / "m.csv")
    df = result.frame.set_index("path")
    assert list(result.frame.columns) == ["path", *CHEXPERT_FINDINGS, "patient_id", "study_id", "sex", "age",
                                          "view", "split"]
    for path in (PA, LAT):  # one study, two images, the same labels; No Finding zeroes the blank pathologies
        row = df.loc[path]
        assert row["No Finding"] == 1.0 and math.isnan(row["Support Devices"])
        assert all(row[f] == 0.0 for f in CHEXPERT_FINDINGS[1:-1])
        assert (row["patient_id"], row["study_id"]) == ("10000032", "50414267")
    assert (df.loc[PA, "view"], df.loc[LAT, "view"]) == ("PA", "LATERAL")
    ap = df.loc[AP]  # ,-1.0,,1.0,,,,,,0.0,,,,1.0 in alphabetical order
    assert math.isnan(ap["Cardiomegaly"]) and ap["Edema"] == 1.0 and ap["Pleural Effusion"] == 0.0
    assert ap["Support Devices"] == 1.0 and math.isnan(ap["Atelectasis"])
    assert df.loc[AP, "study_id"] == "53189527" and df.loc[AP, "patient_id"] == "10000032"
    # official split, validate -> val; the study without a labels row is left out
    assert df["split"].to_dict() == {
        PA: "train", LAT: "train", AP: "train",
        "files/p10/p10000764/s57375967/ea030e7a-2e3b1346-bc518786-7a8fd698-f673b44c.jpg": "val",
        "files/p10/p10000898/s50771383/096052b7-d256dc40-453a102b-fa7d01c6-1b22c6b4.jpg": "test",
        "files/p10/p10000898/s50771383/b79e55c3-735ce5ac-64412506-cdc9ea79-f1af521f.jpg": "test"}
    assert set(df["sex"]) == {""} and df["age"].isna().all()  # not distributed with MIMIC-CXR-JPG
    assert result.summary["studies"] == 4 and result.summary["patients"] == 3


def test_uncertain_ones_and_the_ll_view_filter(tmp_path: Path) -> None:
    root = make_mimic(tmp_path / "mimic", missing=False)
    result = mt.datasets.prepare("mimic", root, out=tmp_path / "m.csv", uncertain="ones", views=["LL", "AP"])
    df = result.frame.set_index("path")
    assert df["view"].tolist() == ["AP", "AP", "LL"]
    assert df.loc[AP, "Cardiomegaly"] == 1.0
    assert df.loc["files/p10/p10000764/s57375967/ea030e7a-2e3b1346-bc518786-7a8fd698-f673b44c.jpg",
                  "Pneumonia"] == 1.0


def test_plain_csvs_and_the_negbio_labels_are_read_too(tmp_path: Path) -> None:
    gz = mt.datasets.prepare("mimic", make_mimic(tmp_path / "a", missing=False), out=tmp_path / "a.csv")
    plain = mt.datasets.prepare("mimic", make_mimic(tmp_path / "b", gzipped=False, labeler="negbio", missing=False),
                                out=tmp_path / "b.csv")
    assert plain.csv_path.read_text() == gz.csv_path.read_text()


def test_a_missing_image_and_a_missing_split_file(tmp_path: Path) -> None:
    root = make_mimic(tmp_path / "mimic")
    with pytest.raises(DatasetLayoutError, match="4e1ba7e0-3b2f1dc1-5e0c4d6f-2b9e1a3f-6c7d8e9f.jpg"):
        mt.datasets.prepare("mimic", root, out=tmp_path / "m.csv")
    with pytest.warns(UserWarning, match="not on disk"):
        result = mt.datasets.prepare("mimic", root, out=tmp_path / "m.csv", allow_missing=True)
    assert result.summary["missing_files"]["count"] == 1
    (root / "mimic-cxr-2.0.0-split.csv.gz").unlink()
    with pytest.raises(DatasetLayoutError, match=r"'mimic-cxr-2.0.0-split.csv.gz' or 'mimic-cxr-2.0.0-split.csv'"
                       r".*physionet.org/content/mimic-cxr-jpg"):
        mt.datasets.prepare("mimic", root)


def test_a_split_value_outside_the_official_ones_is_refused(tmp_path: Path) -> None:
    root = make_mimic(tmp_path / "mimic", gzipped=False, missing=False)
    path = root / "mimic-cxr-2.0.0-split.csv"
    path.write_text(path.read_text().replace(",validate", ",holdout"))
    with pytest.raises(DatasetLayoutError, match="split 'holdout'"):
        mt.datasets.prepare("mimic", root)


def test_the_written_csv_reads_back_as_a_multilabel_labels_csv(tmp_path: Path) -> None:
    from medtransfer.data.labels import read_labels_csv

    root = make_mimic(tmp_path / "mimic", missing=False)
    result = mt.datasets.prepare("mimic", root, out=tmp_path / "m.csv")
    table = read_labels_csv(result.csv_path, root, label_columns=result.label_columns)
    assert table.label_columns == ["No Finding", "Edema", "Support Devices"]
    assert pd.isna(table.df["Edema"]).sum() == 3
