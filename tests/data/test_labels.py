"""Labels: CSV parsing and validation (every error names the row), class order, CSV-driven indexing."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medtransfer.config import DataConfig
from medtransfer.data.discovery import index_scans
from medtransfer.data.labels import order_classes, read_labels_csv, resolve_classes, task_for
from medtransfer.data.privacy import pseudonym
from medtransfer.errors import ManifestError
from tests.factories import chest_like, write_dicom, write_png

FAST = DataConfig(verify_pixels=False)


def _csv(path: Path, text: str | bytes) -> Path:
    if isinstance(text, str):
        path.write_text(text, encoding="utf-8")
    else:
        path.write_bytes(text)
    return path


def test_single_label_csv_is_read_and_paths_normalised(tmp_path: Path) -> None:
    csv = _csv(tmp_path / "labels.csv", "path,label,sex,age,split,extra\n./a/x.png,sick, female ,045Y,Train,zz\n"
                                        "a\\y.png,well,,7,test,\n")
    table = read_labels_csv(csv, tmp_path)
    df = table.df
    assert table.label_columns is None
    assert df["path"].tolist() == ["a/x.png", "a/y.png"]
    assert df["label"].tolist() == ["sick", "well"]
    assert df["sex"].tolist() == ["F", ""] and df["age"].tolist() == [45.0, 7.0]
    assert df["split"].tolist() == ["train", "test"] and "extra" not in df.columns
    assert df["row"].tolist() == [1, 2]


def test_multilabel_csv_blank_is_nan(tmp_path: Path) -> None:
    csv = _csv(tmp_path / "l.csv", "path,effusion,nodule,label\na.png,1,,x\nb.png,0,1.0,x\nc.png,,0,x\n")
    table = read_labels_csv(csv, tmp_path, label_columns=["effusion", "nodule"])
    values = table.df[["effusion", "nodule"]].to_numpy()
    np.testing.assert_array_equal(np.isnan(values), [[False, True], [False, False], [True, False]])
    assert values[0, 0] == 1 and values[1, 1] == 1 and values[2, 1] == 0
    assert "label" not in table.df.columns


@pytest.mark.parametrize(
    ("text", "columns", "pattern"),
    [
        ("file,label\na.png,x\n", None, r"no 'path' column.*'file' it\?"),
        ("path,label\na.png,x\nb.png,y\na.png,x\n", None, r"row 3 \(line 4\).*already listed in row 1"),
        ("path,label\na.png,x\n./b/../a.png,y\n", None, r"row 2 \(line 3\).*already listed in row 1"),
        ("path,e,n\na.png,1,0\nb.png,yes,1\n", ["e", "n"], r"row 2 \(line 3\): column 'e' holds 'yes'.*1, 0 or blank"),
        ("path,label\na.png,x\n../../etc/passwd,y\n", None, r"row 2 \(line 3\): path '../../etc/passwd' points "
                                                            "outside the data folder"),
        ("path,label\n/etc/passwd,y\n", None, r"row 1 \(line 2\).*outside the data folder"),
        ("path,label\na.png,x\n,y\n", None, r"row 2 \(line 3\): the path is blank"),
        ("path,label\na.png,x\nb.png,\n", None, r"row 2 \(line 3\): the label is blank"),
        ("path,diagnosis\na.png,x\n", None, r"no 'label' column.*--label-columns"),
        ("path,e\na.png,1\n", ["e", "nodul"], r"label column 'nodul' not found"),
        ("path,label,split\na.png,x,train\nb.png,y,holdout\n", None, r"row 2 \(line 3\): split 'holdout' is not one"),
        ("path,label,split\na.png,x,train\nb.png,y,\n", None, r"row 2 \(line 3\): split is blank"),
        ("", None, r"the file is empty"),
        ("path,label\n", None, r"no rows"),
    ],
)
def test_bad_csv_raises_one_clear_error_naming_the_row(tmp_path: Path, text: str, columns, pattern: str) -> None:
    csv = _csv(tmp_path / "labels.csv", text)
    with pytest.raises(ManifestError, match=pattern):
        read_labels_csv(csv, tmp_path, label_columns=columns)


def test_non_utf8_csv_names_the_row(tmp_path: Path) -> None:
    csv = _csv(tmp_path / "labels.csv", "path,label\na.png,x\nb.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(ManifestError, match=r"row 2 \(line 3\): byte 0xe9 is not UTF-8.*CSV UTF-8"):
        read_labels_csv(csv, tmp_path)
    utf8_bom = _csv(tmp_path / "bom.csv", "\ufeffpath,label\na.png,caf\xe9\n".encode())
    assert read_labels_csv(utf8_bom, tmp_path).df["label"].tolist() == ["caf\xe9"]


def test_symlink_escaping_the_data_folder_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    os.symlink(tmp_path, data / "escape")
    csv = _csv(tmp_path / "labels.csv", "path,label\nescape/secret.png,x\n")
    with pytest.raises(ManifestError, match=r"row 1 \(line 2\).*outside the data folder"):
        read_labels_csv(csv, data)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        (["pneumonia", "normal"], ["normal", "pneumonia"]),
        (["Normal", "Abnormal"], ["Normal", "Abnormal"]),
        (["No Finding", "effusion"], ["No Finding", "effusion"]),
        (["positive", "negative"], ["negative", "positive"]),
        (["1", "0", "1"], ["0", "1"]),
        (["tb", "pneumonia"], ["pneumonia", "tb"]),
        (["normal", "healthy"], ["healthy", "normal"]),
        (["c", "a", "b"], ["a", "b", "c"]),
    ],
)
def test_class_order_puts_the_no_finding_class_first(values: list[str], expected: list[str]) -> None:
    assert order_classes(values) == expected


def test_task_needs_two_classes() -> None:
    assert task_for(["a", "b"], multilabel=False) == "binary"
    assert task_for(["a", "b", "c"], multilabel=False) == "multiclass"
    assert task_for(["a"], multilabel=True) == "multilabel"
    with pytest.raises(ManifestError, match="at least two classes.*found only 'a'"):
        task_for(["a"], multilabel=False)


def test_fewer_than_two_classes_are_an_inventory_only_when_labels_are_optional() -> None:
    one = pd.DataFrame({"path": ["a/x.png", "a/y.png"], "label": ["a", "a"]})
    assert resolve_classes(one, None, require_labels=False) == ([], "unlabelled")
    with pytest.raises(ManifestError, match="at least two classes.*found only 'a'"):
        resolve_classes(one, None)
    two = one.assign(label=["normal", "sick"])
    assert resolve_classes(two, None, require_labels=False) == (["normal", "sick"], "binary")


def test_a_labels_csv_with_one_class_is_an_inventory_for_index(tmp_path: Path) -> None:
    _pngs(tmp_path / "data", ["a.png", "b.png", "c.png"])
    csv = _csv(tmp_path / "labels.csv", "path,label,sex\na.png,normal,F\nb.png,normal,M\n")
    m = index_scans(tmp_path / "data", labels=csv, config=FAST, require_labels=False)
    assert m.task == "unlabelled" and "label" not in m.df.columns and sorted(m.df["path"]) == ["a.png", "b.png"]
    assert sorted(m.df["sex"]) == ["F", "M"]  # the CSV's other columns still count
    assert any("one label in labels.csv ('normal')" in w for w in m.warnings)
    with pytest.raises(ManifestError, match="at least two classes.*found only 'normal'"):
        index_scans(tmp_path / "data", labels=csv, config=FAST)


def _pngs(data: Path, names: list[str]) -> None:
    for i, name in enumerate(names):
        write_png(data / name, (chest_like(16, seed=i) // 16).astype(np.uint8))


def test_index_with_csv_uses_its_labels_fields_and_ignores_unlisted_files(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _pngs(data, ["img/a.png", "img/b.png", "img/c.png", "img/d.png", "img/unlisted.png"])
    write_dicom(data / "img" / "e.dcm", chest_like(16), sex="F", age="030Y", institution="Dicom Site")
    csv = _csv(tmp_path / "labels.csv", "path,label,patient_id,sex,age,site,view\n"
                                        "img/a.png,pneumonia,PAT1,M,70,SiteA,AP\nimg/b.png,normal,PAT1,,,,\n"
                                        "img/c.png,normal,PAT2,,,,\nimg/d.png,pneumonia,PAT3,,,,\n"
                                        "img/e.dcm,normal,PAT4,M,,,\n")
    m = index_scans(data, labels=csv, config=FAST)
    df = m.df.set_index("path")
    assert m.classes == ["normal", "pneumonia"] and m.task == "binary"
    assert sorted(df.index) == ["img/a.png", "img/b.png", "img/c.png", "img/d.png", "img/e.dcm"]
    assert (df.loc["img/a.png", "sex"], df.loc["img/a.png", "age_band"], df.loc["img/a.png", "site"]) == (
        "M", "60-79", "SiteA")
    e = df.loc["img/e.dcm"]
    assert (e["sex"], e["age"], e["site"]) == ("M", 30.0, "Dicom Site")  # CSV wins where given, DICOM fills the rest
    assert df.loc["img/a.png", "patient_key"] == df.loc["img/b.png", "patient_key"] == pseudonym("PAT1",
                                                                                                  kind="patient")
    assert "PAT1" not in m.df.to_csv()
    assert any("1 scan(s) in the data folder are not listed in labels.csv" in w for w in m.warnings)


def test_csv_path_not_found_names_the_row(tmp_path: Path) -> None:
    _pngs(tmp_path / "data", ["a.png", "b.png"])
    csv = _csv(tmp_path / "labels.csv", "path,label\na.png,x\nb.png,y\nmissing.png,y\n")
    with pytest.raises(ManifestError, match=r"row 3 \(line 4\): 'missing.png' not found.*1 missing"):
        index_scans(tmp_path / "data", labels=csv, config=FAST)


def test_multilabel_index_and_zero_positive_column(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _pngs(data, [f"{k}.png" for k in range(6)])
    csv = _csv(tmp_path / "l.csv", "path,effusion,nodule,mass\n" + "".join(
        f"{k}.png,{k % 2},{'' if k == 0 else int(k > 2)},0\n" for k in range(6)))
    with pytest.raises(ManifestError, match=r"\['mass'\] have no positive"):
        index_scans(data, labels=csv, label_columns=["effusion", "nodule", "mass"], config=FAST)
    m = index_scans(data, labels=csv, label_columns=["effusion", "nodule"], config=FAST)
    assert m.task == "multilabel" and m.classes == ["effusion", "nodule"]
    targets = m.targets()
    assert targets.shape == (6, 2) and np.isnan(targets[0, 1]) and np.nansum(targets) == 6


def test_csv_row_per_slice_labels_the_series_and_conflicts_are_refused(tmp_path: Path) -> None:
    from tests.data.test_discovery import ct_series

    data = tmp_path / "data"
    ct_series(data / "s1", 2, patient_id="P1")
    write_dicom(data / "cr.dcm", chest_like(16), patient_id="P2")
    ok = _csv(tmp_path / "ok.csv", "path,label\ns1/slice00.dcm,a\ns1/slice01.dcm,a\ncr.dcm,b\n")
    m = index_scans(data, labels=ok, config=FAST)
    assert sorted(m.df["path"]) == ["cr.dcm", "s1"] and m.df.set_index("path").loc["s1", "label"] == "a"
    folder = _csv(tmp_path / "folder.csv", "path,label\ns1/,a\ncr.dcm,b\n")
    assert len(index_scans(data, labels=folder, config=FAST)) == 2
    bad = _csv(tmp_path / "bad.csv", "path,label\ns1/slice00.dcm,a\ns1/slice01.dcm,b\ncr.dcm,b\n")
    with pytest.raises(ManifestError, match=r"row 2 \(line 3\).*same DICOM series as row 1"):
        index_scans(data, labels=bad, config=FAST)
