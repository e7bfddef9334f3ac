"""Patient-level stratified split: no patient straddles splits, determinism, stratification, CSV splits, leakage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medtransfer.config import DataConfig
from medtransfer.data.discovery import index_scans
from medtransfer.data.splits import assign_splits, patient_strata, resolve_keys, split_warnings
from medtransfer.errors import ManifestError
from tests.factories import chest_like, write_dicom, write_png

SPLIT = {"val_fraction": 0.15, "test_fraction": 0.15}


def _cases(n_patients: int, *, seed: int = 0, positive_rate: float = 0.3) -> pd.DataFrame:
    """Patients with 2 studies of 1-3 cases each; label fixed per patient."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_patients):
        label = "sick" if rng.random() < positive_rate else "well"
        for s in range(2):
            rows += [{"patient_key": f"p{p:03d}", "study_key": f"p{p:03d}s{s}", "label": label}] * int(
                rng.integers(1, 4))
    return pd.DataFrame(rows)


@pytest.mark.parametrize("seed", range(12))
def test_a_patient_with_two_studies_never_straddles_splits(seed: int) -> None:
    df = _cases(40, seed=seed)
    df["split"] = assign_splits(df, ["well", "sick"], "binary", seed=seed, **SPLIT)
    assert (df.groupby("patient_key")["split"].nunique() == 1).all()
    assert set(df["split"]) == {"train", "val", "test"}
    assert split_warnings(df, ["well", "sick"], "binary") == []


def test_split_is_deterministic_for_a_seed_and_changes_with_it() -> None:
    df = _cases(60)
    a = assign_splits(df, ["well", "sick"], "binary", seed=3, **SPLIT)
    b = assign_splits(df.sample(frac=1, random_state=1).sort_index(), ["well", "sick"], "binary", seed=3, **SPLIT)
    c = assign_splits(df, ["well", "sick"], "binary", seed=4, **SPLIT)
    pd.testing.assert_series_equal(a, b)
    assert not a.equals(c)


def test_fractions_are_respected_on_a_large_dataset() -> None:
    df = _cases(400, seed=1)
    share = assign_splits(df, ["well", "sick"], "binary", seed=0, val_fraction=0.2, test_fraction=0.1).value_counts(
        normalize=True)
    assert share["train"] == pytest.approx(0.7, abs=0.03)
    assert share["val"] == pytest.approx(0.2, abs=0.03)
    assert share["test"] == pytest.approx(0.1, abs=0.03)


@pytest.mark.parametrize("seed", range(5))
def test_tiny_dataset_gets_every_class_in_every_split(seed: int) -> None:
    df = pd.DataFrame({"patient_key": [f"p{i}" for i in range(7)], "label": ["a"] * 3 + ["b"] * 4})
    df["split"] = assign_splits(df, ["a", "b"], "binary", seed=seed, **SPLIT)
    assert df.groupby("split")["label"].nunique().to_dict() == {"test": 2, "train": 2, "val": 2}


def test_rare_class_is_stratified_not_left_to_chance() -> None:
    df = pd.DataFrame({"patient_key": [f"p{i:02d}" for i in range(43)], "label": ["rare"] * 3 + ["common"] * 40})
    for seed in range(10):
        split = assign_splits(df, ["common", "rare"], "binary", seed=seed, **SPLIT)
        assert sorted(split[:3]) == ["test", "train", "val"]


def test_multilabel_strata_use_the_rarest_positive_class() -> None:
    df = pd.DataFrame({"patient_key": ["a", "a", "b", "c", "d"], "x": [1, 0, 1, 1, np.nan], "y": [0, 1, 0, 0, 0]})
    assert patient_strata(df, ["x", "y"], "multilabel").to_dict() == {"a": "y", "b": "x", "c": "x", "d": "none"}
    assert assign_splits(df, ["x", "y"], "multilabel", seed=0, **SPLIT).notna().all()


def test_single_label_stratum_is_the_majority_class_ties_to_the_rarer() -> None:
    df = pd.DataFrame({"patient_key": ["a", "a", "a", "b", "b", "c"], "label": ["x", "x", "y", "x", "y", "x"]})
    assert patient_strata(df, ["x", "y"], "binary").to_dict() == {"a": "x", "b": "y", "c": "x"}


def test_fractions_leaving_nothing_for_training_are_refused() -> None:
    with pytest.raises(ManifestError, match="must be below 1"):
        assign_splits(_cases(5), ["well", "sick"], "binary", seed=0, val_fraction=0.5, test_fraction=0.5)


def test_split_warnings_name_the_split_and_the_missing_class() -> None:
    df = pd.DataFrame({"label": ["a", "b", "a"], "split": ["train", "train", "test"]})
    warnings = split_warnings(df, ["a", "b"], "binary", fractions={"train": 1, "val": 0.0, "test": 0.2})
    assert len(warnings) == 1 and "split 'test' has no cases of class(es) ['b']" in warnings[0]
    assert "split 'val' has no cases" in split_warnings(df, ["a", "b"], "binary")[0]


def test_resolve_keys_falls_back_to_study_then_case_and_warns() -> None:
    df = pd.DataFrame({"path": ["a", "b", "c", "d"], "patient_key": ["k1", "", "", ""],
                       "study_key": ["s1", "s2", "s2", ""], "csv_patient_id": ["", "", "", ""]})
    out, warnings = resolve_keys(df)
    keys = out["patient_key"].tolist()
    assert keys[0] == "k1" and keys[1] == keys[2] != "" and keys[3] not in ("", keys[1])
    assert out["study_key"].iloc[3] != "" and "csv_patient_id" not in out.columns
    assert len(warnings) == 1 and "3 case(s) have no patient ID" in warnings[0] and "leakage" in warnings[0]
    full, none = resolve_keys(df.assign(csv_patient_id=["x", "y", "y", "z"]))
    assert none == [] and full["patient_key"].iloc[1] == full["patient_key"].iloc[2] != keys[1]


def _two_study_folder(data: Path, n_patients: int = 8) -> None:
    """DICOM class folders where each patient has two studies (two files, different StudyInstanceUIDs)."""
    for p in range(n_patients):
        cls = "sick" if p % 2 else "well"
        for s in range(2):
            write_dicom(data / cls / f"p{p}_s{s}.dcm", chest_like(16, seed=p * 2 + s), patient_id=f"PAT{p}")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_indexed_two_study_patients_stay_together(tmp_path: Path, seed: int) -> None:
    _two_study_folder(tmp_path)
    m = index_scans(tmp_path, config=DataConfig(verify_pixels=False, seed=seed))
    assert m.df["patient_key"].nunique() == 8 and m.df["study_key"].nunique() == 16
    assert (m.df.groupby("patient_key")["split"].nunique() == 1).all()
    assert m.df.groupby("split")["label"].nunique().to_dict() == {"test": 2, "train": 2, "val": 2}


def _png_folder(data: Path, n: int) -> None:
    for i in range(n):
        write_png(data / f"{i}.png", (chest_like(16, seed=i) // 16).astype(np.uint8))


def test_csv_split_is_honoured_and_leakage_fails_loudly(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _png_folder(data, 6)
    rows = [(0, "a", "P1", "train"), (1, "b", "P2", "train"), (2, "a", "P3", "val"), (3, "b", "P4", "val"),
            (4, "a", "P5", "test"), (5, "b", "P6", "test")]
    good = tmp_path / "good.csv"
    good.write_text("path,label,patient_id,split\n" + "".join(f"{i}.png,{lab},{p},{s}\n" for i, lab, p, s in rows))
    m = index_scans(data, labels=good, config=DataConfig(verify_pixels=False, seed=5))
    assert m.df.set_index("path")["split"].to_dict() == {f"{i}.png": s for i, _, _, s in rows}
    leaky = tmp_path / "leaky.csv"
    leaky.write_text(good.read_text().replace("5.png,b,P6,test", "5.png,b,P1,test"))
    with pytest.raises(ManifestError, match=r"patient leakage: 1 patient\(s\) appear in more than one split"):
        index_scans(data, labels=leaky, config=DataConfig(verify_pixels=False))


def test_split_without_positives_is_warned_in_the_manifest(tmp_path: Path) -> None:
    data = tmp_path / "data"
    _png_folder(data, 4)
    csv = tmp_path / "l.csv"
    csv.write_text("path,label,split\n0.png,a,train\n1.png,b,train\n2.png,a,test\n3.png,a,val\n")
    m = index_scans(data, labels=csv, config=DataConfig(verify_pixels=False))
    assert any("split 'test' has no cases of class(es) ['b']" in w for w in m.warnings)
    assert any("split 'val' has no cases of class(es) ['b']" in w for w in m.warnings)


def test_split_does_not_depend_on_the_machine_salt(tmp_path: Path) -> None:
    # Patient keys are salted per machine; the split must not be, or the same folder and seed would split
    # differently on a colleague's machine (and the demo's results would depend on who runs it).
    import os
    import subprocess
    import sys

    _two_study_folder(tmp_path / "data")
    code = ("import sys; from medtransfer.config import DataConfig; from medtransfer.data.discovery import "
            "index_scans; m = index_scans(sys.argv[1], config=DataConfig(verify_pixels=False, seed=3)); "
            "print(m.df.patient_key.iloc[0], ','.join(m.df.sort_values('path')['split']))")
    splits, keys = [], []
    for salt in ("salt-one", "salt-two"):
        env = {**os.environ, "MEDTRANSFER_SALT": salt}
        out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "data")], capture_output=True, text=True,
                             env=env, check=True)
        key, split = out.stdout.split()
        keys.append(key)
        splits.append(split)
    assert keys[0] != keys[1]  # the salt did change the pseudonyms
    assert splits[0] == splits[1]
