"""The shared framework of ``prepare``: helpers of base.py, harmonising, missing files, splits, CSV and summary.

Most tests run a small in-test adapter through :func:`prepare_adapter`, so each rule is checked on rows whose
expected output is written out here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import medtransfer as mt
from medtransfer.data.labels import read_labels_csv
from medtransfer.datasets.public import ADAPTERS, list_datasets, load_adapter
from medtransfer.datasets.public.base import (
    VOCABULARY,
    DatasetInfo,
    PrepareOptions,
    age_years,
    carve_split,
    finding_values,
    index_files,
    locate_by_name,
    patient_split,
    read_csv,
    require_file,
    select_views,
    sex_code,
    view_code,
)
from medtransfer.datasets.public.prepared import PreparedDataset, prepare_adapter
from medtransfer.errors import ConfigError, DatasetLayoutError, ManifestError

TOY = DatasetInfo(name="toy", title="Toy CXR", licence="CC0", url="https://example.org/toy",
                  expected=("labels.csv", "img/*.png"), findings=("Effusion A", "Effusion B", "Mass", "Other"),
                  harmonise={"Effusion A": "Effusion", "Effusion B": "Effusion", "Mass": "Mass"})


def _toy_rows() -> pd.DataFrame:
    nan = math.nan
    return pd.DataFrame({
        "path": ["img/a.png", "img/b.png", "img/c.png", "img/d.png", "img/e.png"],
        "Effusion A": [1.0, 0.0, nan, 0.0, nan],
        "Effusion B": [0.0, 0.0, nan, 1.0, 0.0],
        "Mass": [nan, 1.0, 0.0, 0.0, 1.0],
        "Other": [1.0, nan, nan, 0.0, 0.0],
        "patient_id": ["p1", "p1", "p2", "p3", "p4"],
        "study_id": ["s1", "s2", "s3", "s4", "s5"],
        "sex": ["Male", "F", "Unknown", "female", ""],
        "age": [40.0, 41.0, nan, 70.0, 33.5],
        "view": ["PA", "Lateral", "AP", "PA", ""],
        "split": ["train", "train", "test", "val", "train"],
        "subtype": ["x", "y", "z", "w", "v"],
    })


def _toy_root(tmp_path: Path, missing: tuple[str, ...] = ()) -> Path:
    root = tmp_path / "toy"
    for name in "abcde":
        if f"img/{name}.png" not in missing:
            (root / "img").mkdir(parents=True, exist_ok=True)
            (root / "img" / f"{name}.png").write_bytes(b"png")
    return root


def _run(tmp_path: Path, rows: pd.DataFrame | None = None, info: DatasetInfo = TOY, **kw) -> PreparedDataset:
    frame = _toy_rows() if rows is None else rows
    root = kw.pop("root", None) or _toy_root(tmp_path)
    return prepare_adapter(info, lambda root, options: frame.copy(), root, out=tmp_path / "out" / "toy.csv", **kw)


# ------------------------------------------------------------------------------------------ registry, API


def test_the_registry_names_all_eight_datasets_and_each_module_defines_the_contract() -> None:
    assert list(ADAPTERS) == ["nih", "chexpert", "mimic", "rsna", "kermany", "vindr", "padchest", "covid"]
    for info in list_datasets():
        module = load_adapter(info.name)
        assert module.INFO is info and callable(module.read)
        assert info.url.startswith("http") and info.licence and info.expected and info.findings
        assert set(info.harmonise.values()) <= set(VOCABULARY)
    assert {i.name for i in list_datasets()} >= {"nih", "chexpert", "mimic"}


def test_the_public_api_is_reachable_from_the_package_without_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, medtransfer as mt; mt.datasets.prepare; mt.datasets.list_datasets(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_an_unknown_dataset_name_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="unknown dataset 'chexpret'.*nih, chexpert, mimic"):
        mt.datasets.prepare("chexpret", ".")


def test_bad_option_values_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="findings 'vocab'"):
        _run(tmp_path, findings="vocab")
    with pytest.raises(ConfigError, match="uncertain 'maybe'"):
        _run(tmp_path, uncertain="maybe")
    with pytest.raises(ConfigError, match="val_fraction 1.0"):
        _run(tmp_path, val_fraction=1.0)


def test_vocabulary_is_torchxrayvisions_default_pathologies_in_order() -> None:
    assert VOCABULARY == ("Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema",
                          "Fibrosis", "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule",
                          "Mass", "Hernia", "Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum")


def test_dataset_info_refuses_a_mapping_outside_the_vocabulary() -> None:
    with pytest.raises(ValueError, match="outside VOCABULARY"):
        DatasetInfo("x", "X", "", "", (), ("A",), harmonise={"A": "Pleural Effusion"})
    with pytest.raises(ValueError, match="exactly one finding"):
        DatasetInfo("x", "X", "", "", (), ("A", "B"), single_label=True)


# ---------------------------------------------------------------------------------------------- helpers


def test_require_file_returns_the_first_candidate_present_and_names_all_when_none_is(tmp_path: Path) -> None:
    (tmp_path / "b.csv.gz").write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c_2020.csv").write_text("x")
    assert require_file(tmp_path, "a.csv", "b.csv.gz") == tmp_path / "b.csv.gz"
    assert require_file(tmp_path, "a.csv", "sub/c_*.csv") == tmp_path / "sub" / "c_2020.csv"
    with pytest.raises(DatasetLayoutError, match=r"expected 'x.csv' or 'y\*.csv' in this folder, found none"):
        require_file(tmp_path, "x.csv", "y*.csv")


def test_read_csv_keeps_strings_drops_unnamed_trailing_columns_and_names_missing_ones(tmp_path: Path) -> None:
    path = tmp_path / "f.csv"
    path.write_text("A,B ,C,\n 1.0,,-1.0,\n0,x,1,\n")
    df = read_csv(path, columns=("A", "B"))
    assert list(df.columns) == ["A", "B", "C"]
    assert df.to_dict("list") == {"A": ["1.0", "0"], "B": ["", "x"], "C": ["-1.0", "1"]}
    with pytest.raises(DatasetLayoutError, match=r"column\(s\) \['Z'\] not found; the file has \['A', 'B', 'C'\]"):
        read_csv(path, columns=("A", "Z"))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(DatasetLayoutError, match="empty.csv: the file is empty"):
        read_csv(tmp_path / "empty.csv")


def test_finding_values_resolve_the_uncertain_label_by_policy() -> None:
    raw = pd.Series(["1.0", "0.0", "-1.0", "", "1", "0", "-1"])
    nan = math.nan
    expected = {"ignore": [1, 0, nan, nan, 1, 0, nan], "ones": [1, 0, 1, nan, 1, 0, 1],
                "zeros": [1, 0, 0, nan, 1, 0, 0]}
    for policy, want in expected.items():
        np.testing.assert_array_equal(finding_values(raw, policy).to_numpy(), np.array(want, dtype=float))
    with pytest.raises(DatasetLayoutError, match="value '2.0' is not 1, 0, -1 or blank"):
        finding_values(pd.Series(["1", "2.0"]), where="f.csv column 'X'")


def test_sex_age_and_view_codes() -> None:
    assert [sex_code(v) for v in ("M", "Male", "female", "F", "Unknown", "O", "", None, math.nan)] == [
        "M", "M", "F", "F", "", "", "", "", ""]
    assert age_years("58") == 58.0 and age_years("058Y") == 58.0 and age_years("006M") == 0.5
    assert age_years(44) == 44.0 and age_years(7.25) == 7.25
    assert all(math.isnan(age_years(v)) for v in ("413", "", "abc", "-3", None, 121))
    assert [view_code(v) for v in ("pa", "AP", "Lateral", "L", "LL", " ap  axial ", "", None, "UNKNOWN")] == [
        "PA", "AP", "LATERAL", "LATERAL", "LL", "AP AXIAL", "", "", ""]


def test_select_views_expands_the_frontal_and_lateral_groups() -> None:
    df = pd.DataFrame({"view": ["PA", "AP", "LATERAL", "LL", "AP AXIAL", ""]})
    assert select_views(df, ["FRONTAL"])["view"].tolist() == ["PA", "AP", "AP AXIAL"]
    assert select_views(df, ["lateral"])["view"].tolist() == ["LATERAL", "LL"]
    assert select_views(df, ["PA", "LL"])["view"].tolist() == ["PA", "LL"]
    assert select_views(df, None)["view"].tolist() == df["view"].tolist()


def test_patient_split_is_by_patient_deterministic_and_stable_when_patients_are_added() -> None:
    ids = [f"p{i}" for i in range(2000)]
    chosen = patient_split(ids, 0.1, seed=0)
    assert 150 < chosen.sum() < 250  # about 10 % of the patients
    assert (patient_split(ids, 0.1, seed=0) == chosen).all()
    assert (patient_split(ids, 0.1, seed=1) != chosen).any()
    more = patient_split([*ids, *(f"q{i}" for i in range(500))], 0.1, seed=0)
    assert (more[:2000] == chosen).all()  # adding patients moves no one already there
    rows = ["a", "a", "b", "c", "c", "c"]
    per_row = patient_split(rows, 0.34, seed=3)
    assert len({(r, bool(v)) for r, v in zip(rows, per_row, strict=True)}) == 3  # a patient's rows land together


def test_a_tiny_dataset_still_gets_one_carved_patient_and_no_fraction_means_none() -> None:
    assert patient_split(["a", "b"], 0.1, seed=0).sum() == 1
    assert patient_split(["a", "b"], 0.0, seed=0).sum() == 0
    assert patient_split(["a", "a"], 0.1, seed=0).sum() == 0  # one patient: nothing to carve from
    split = pd.Series(["train", "train", "test", "train"])
    out = carve_split(split, pd.Series(["a", "b", "c", "b"]), 0.1, seed=0)
    assert out[2] == "test" and sorted(out[[0, 1, 3]]) in (["train", "val", "val"], ["train", "train", "val"])
    assert out[1] == out[3]


def test_index_files_walks_once_skipping_hidden_folders_and_locate_by_name_prefers_the_shortest(
        tmp_path: Path) -> None:
    for rel in ("a/x.png", "a/deep/y.PNG", ".cache/z.png", "b/x.png", "c.txt", "x.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    assert index_files(tmp_path, {".png"}) == {"a/x.png", "a/deep/y.PNG", "b/x.png", "x.png"}
    assert "c.txt" in index_files(tmp_path)
    assert locate_by_name(index_files(tmp_path, {".png"})) == {"x.png": "x.png", "y.PNG": "a/deep/y.PNG"}


# --------------------------------------------------------------------------------------------- prepare


def test_native_findings_ids_and_extras_are_written_as_the_labels_contract_reads_them(tmp_path: Path) -> None:
    result = _run(tmp_path)
    text = result.csv_path.read_text()
    assert text.splitlines() == [
        "path,Effusion A,Effusion B,Mass,Other,patient_id,study_id,sex,age,view,split,subtype",
        "img/a.png,1,0,,1,p1,s1,M,40,PA,train,x",
        "img/b.png,0,0,1,,p1,s2,F,41,LATERAL,train,y",
        "img/c.png,,,0,,p2,s3,,,AP,test,z",
        "img/d.png,0,1,0,0,p3,s4,F,70,PA,val,w",
        "img/e.png,,0,1,0,p4,s5,,33.5,,train,v",
    ]
    table = read_labels_csv(result.csv_path, result.csv_path.parent, label_columns=["Effusion A", "Mass"])
    assert table.df["Mass"].isna().tolist() == [True, False, False, False, False]


def test_harmonised_writes_all_18_names_in_order_taking_the_max_and_never_inventing_zeros(tmp_path: Path) -> None:
    result = _run(tmp_path, findings="harmonised")
    df = pd.read_csv(result.csv_path, keep_default_na=False, dtype=str)
    assert list(df.columns[1:19]) == list(VOCABULARY)
    # Effusion = max(Effusion A, Effusion B): 1 if any is 1, 0 if the known ones are 0, blank if both blank
    assert df["Effusion"].tolist() == ["1", "0", "", "1", "0"]
    assert df["Mass"].tolist() == ["", "1", "0", "0", "1"]
    never = [v for v in VOCABULARY if v not in ("Effusion", "Mass")]
    assert (df[never] == "").all().all()  # never labelled by the dataset: blank, never 0
    assert "Other" not in df.columns  # a native name outside the mapping is dropped
    assert result.summary["finding_columns"] == list(VOCABULARY)
    assert result.label_columns == ["Effusion", "Mass"]


def test_the_summary_counts_per_split_and_finding_and_names_the_train_command(tmp_path: Path) -> None:
    result = _run(tmp_path)
    summary = json.loads(result.summary_path.read_text())
    assert result.summary_path == tmp_path / "out" / "toy.summary.json"
    assert summary["dataset"] == "toy" and summary["rows"] == 5 and summary["patients"] == 4
    assert summary["studies"] == 5
    assert summary["splits"]["train"]["rows"] == 3 and summary["splits"]["train"]["patients"] == 2
    assert summary["splits"]["train"]["findings"]["Mass"] == {"positive": 2, "negative": 0, "unknown": 1}
    assert summary["splits"]["test"]["findings"]["Effusion A"] == {"positive": 0, "negative": 0, "unknown": 1}
    assert summary["views"] == {"PA": 2, "LATERAL": 1, "AP": 1, "unknown": 1}
    assert summary["missing_files"] == {"count": 0, "first": []}
    assert summary["options"] == {"findings": "native", "uncertain": "ignore", "views": [], "allow_missing": False,
                                  "val_fraction": 0.1, "seed": 0}
    # columns with a positive in train, in the dataset's order
    assert result.label_columns == ["Effusion A", "Mass", "Other"]
    assert result.train_command == (f"medtransfer train {tmp_path / 'toy'} --labels {tmp_path / 'out' / 'toy.csv'} "
                                    "--label-columns 'Effusion A,Mass,Other' --out runs/toy")


def test_listed_images_missing_on_disk_fail_with_their_names_or_are_dropped_and_counted(tmp_path: Path) -> None:
    root = _toy_root(tmp_path, missing=("img/b.png", "img/e.png"))
    with pytest.raises(DatasetLayoutError, match=r"2 of the 5 images .* not on disk \(e.g. img/b.png, img/e.png\)"
                       r".*--allow-missing"):
        _run(tmp_path, root=root)
    assert not (tmp_path / "out" / "toy.csv").exists()
    with pytest.warns(UserWarning, match="2 listed image"):
        result = _run(tmp_path, root=root, allow_missing=True)
    assert result.frame["path"].tolist() == ["img/a.png", "img/c.png", "img/d.png"]
    assert result.summary["missing_files"] == {"count": 2, "first": ["img/b.png", "img/e.png"]}
    assert any("2 listed image(s)" in w for w in result.summary["warnings"])


def test_when_no_listed_image_is_on_disk_the_message_asks_whether_root_is_right(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetLayoutError, match="None of the listed images is there: is ROOT"):
        _run(tmp_path, root=tmp_path / "empty")
    with pytest.raises(DatasetLayoutError, match="none of the 5 images"):
        _run(tmp_path, root=tmp_path / "empty", allow_missing=True)


def test_a_layout_error_from_an_adapter_gains_the_expected_files_and_the_download_address(tmp_path: Path) -> None:
    def read(root: Path, options: PrepareOptions) -> pd.DataFrame:
        require_file(root, "labels.csv")
        raise AssertionError("unreachable")

    with pytest.raises(DatasetLayoutError, match=r"expected 'labels.csv'.*Toy CXR \(toy\) expects labels.csv, "
                       r"img/\*.png under ROOT; get it from https://example.org/toy"):
        prepare_adapter(TOY, read, tmp_path, out=tmp_path / "x.csv")
    with pytest.raises(DatasetLayoutError, match="not a folder.*https://example.org/toy"):
        prepare_adapter(TOY, read, tmp_path / "nope", out=tmp_path / "x.csv")
    assert issubclass(DatasetLayoutError, ManifestError)


def test_views_filter_rows_and_a_filter_that_leaves_nothing_says_so(tmp_path: Path) -> None:
    result = _run(tmp_path, views=["pa", "AP"])
    assert result.frame["path"].tolist() == ["img/a.png", "img/c.png", "img/d.png"]
    assert result.summary["options"]["views"] == ["PA", "AP"]
    with pytest.raises(DatasetLayoutError, match="no Toy CXR image is left after the view filter"):
        _run(tmp_path, views=["LL"])


def test_a_patient_in_several_official_splits_moves_wholly_to_the_most_held_out_one(tmp_path: Path) -> None:
    rows = _toy_rows()
    rows.loc[2, "patient_id"] = "p1"  # p1: train, train and test
    with pytest.warns(UserWarning, match="1 patient"):
        result = _run(tmp_path, rows)
    assert result.frame.loc[result.frame["patient_id"] == "p1", "split"].tolist() == ["test", "test", "test"]
    assert result.summary["patients_moved_to_one_split"] == 1


def test_duplicate_paths_keep_the_first_listing(tmp_path: Path) -> None:
    rows = pd.concat([_toy_rows(), _toy_rows().iloc[[0]].assign(Mass=1.0)], ignore_index=True)
    with pytest.warns(UserWarning, match="1 image"):
        result = _run(tmp_path, rows)
    assert len(result.frame) == 5 and math.isnan(result.frame.loc[0, "Mass"])
    assert result.summary["duplicates_dropped"] == 1


def test_a_single_label_dataset_gets_a_label_column_and_no_label_columns_flag(tmp_path: Path) -> None:
    info = DatasetInfo(name="bin", title="Binary", licence="", url="https://example.org", expected=(),
                       findings=("Pneumonia",), harmonise={"Pneumonia": "Pneumonia"}, single_label=True)
    rows = _toy_rows()[["path", "patient_id", "split"]].assign(Pneumonia=[1.0, 0.0, 1.0, 0.0, math.nan])
    rows["split"] = ""
    with pytest.warns(UserWarning, match=r"1 image\(s\) without a Pneumonia label"):
        result = _run(tmp_path, rows, info=info, findings="harmonised")
    df = pd.read_csv(result.csv_path, keep_default_na=False, dtype=str)
    assert df["label"].tolist() == ["pneumonia", "normal", "pneumonia", "normal"]
    assert df["Pneumonia"].tolist() == ["1", "0", "1", "0"] and (df["Mass"] == "").all()
    assert result.label_columns is None and "--label-columns" not in result.train_command
    assert result.summary["labels"] == {"pneumonia": 2, "normal": 2}
    assert "split" not in result.summary["splits"]
    assert read_labels_csv(result.csv_path, result.csv_path.parent).df["label"].tolist()[0] == "pneumonia"


def test_an_adapter_that_breaks_the_contract_is_a_bug_not_a_user_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="returned no column"):
        _run(tmp_path, _toy_rows().drop(columns="Mass"))
    with pytest.raises(ValueError, match="blank for some rows only"):
        _run(tmp_path, _toy_rows().assign(split=["train", "", "test", "val", "train"]))
    with pytest.raises(ValueError, match="holds 2.0"):
        _run(tmp_path, _toy_rows().assign(Mass=2.0))


def test_out_may_be_a_folder_and_writes_are_repeatable(tmp_path: Path) -> None:
    (tmp_path / "outdir").mkdir()
    first = prepare_adapter(TOY, lambda r, o: _toy_rows(), _toy_root(tmp_path), out=tmp_path / "outdir")
    assert first.csv_path == tmp_path / "outdir" / "toy_labels.csv"
    text = first.csv_path.read_text()
    again = prepare_adapter(TOY, lambda r, o: _toy_rows(), tmp_path / "toy", out=tmp_path / "outdir")
    assert again.csv_path.read_text() == text
    assert sorted(p.name for p in (tmp_path / "outdir").iterdir()) == ["toy_labels.csv", "toy_labels.summary.json"]
