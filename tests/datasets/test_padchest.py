"""PadChest adapter on a replica of the 160K labels CSV: term groups, blank labels, age, views, no free text."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from medtransfer.datasets.public import VOCABULARY, prepare
from medtransfer.datasets.public.padchest import TERMS, parse_labels
from medtransfer.errors import DatasetLayoutError
from tests.datasets.replicas_others import PADCHEST_MISSING, PADCHEST_REPORT, PADCHEST_ROWS, make_padchest


def _csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def _positives(row: pd.Series) -> set[str]:
    return {name for name in TERMS if row[name] == "1"}


@pytest.fixture(scope="module")
def padchest_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_padchest(tmp_path_factory.mktemp("padchest"))


@pytest.mark.parametrize(("text", "terms"), [
    ("['normal']", ["normal"]),
    ("['pneumonia', ' pleural effusion', '']", ["pneumonia", "pleural effusion", ""]),
    ("['NSG tube']", ["nsg tube"]),
    ("['exclude']", None), ("['unchanged', '']", None), ("[]", None), ("", None), ("['pneumonia'", None),
    ("__import__('os')", None),
])
def test_label_strings_are_parsed_as_literals_or_read_as_not_stated(text: str, terms: list[str] | None) -> None:
    assert parse_labels(text) == terms


def test_rows_findings_age_view_and_method(padchest_root: Path, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="1 listed image"):
        result = prepare("padchest", padchest_root, out=tmp_path / "pc.csv", allow_missing=True)
    df = _csv(result.csv_path)
    assert len(df) == len(PADCHEST_ROWS) - 1 and PADCHEST_MISSING not in set(df["path"])
    rows = {r["path"].rsplit("/", 1)[1]: r for _, r in df.iterrows()}
    first, lateral, sick, quirky, blank, excluded, infiltrates, _, unparseable = (r[0] for r in PADCHEST_ROWS)
    assert rows[first]["path"] == f"0/{first}"
    assert _positives(rows[first]) == set() and rows[first]["Pneumonia"] == "0"  # ['normal']: all 0
    assert (rows[first]["age"], rows[first]["sex"], rows[first]["view"]) == ("61", "F", "PA")
    assert (rows[lateral]["view"], rows[lateral]["study_id"], rows[lateral]["patient_id"]) == ("LATERAL", "st1", "pat1")
    assert _positives(rows[sick]) == {"Pneumonia", "Effusion", "Fracture"}  # ' callus rib fracture', ''
    assert (rows[sick]["study_id"], rows[sick]["age"], rows[sick]["label_method"]) == ("st2", "64", "RNN_model")
    # false friends of torchxrayvision's substring match: pseudonodule, subcutaneous emphysema
    assert _positives(rows[quirky]) == {"Cardiomegaly"}
    assert rows[quirky]["view"] == "AP SUPINE"
    assert _positives(rows[infiltrates]) == {"Infiltration", "Consolidation", "Hernia", "Tube"}
    assert (rows[infiltrates]["age"], rows[infiltrates]["sex"]) == ("", "")  # no birth year, sex "O"
    for name in (blank, excluded, unparseable):  # no stated findings: blank, never 0
        assert all(rows[name][f] == "" for f in TERMS)
    assert set(df["split"]) == {""}
    assert result.summary["all"]["findings"]["Pneumonia"] == {"positive": 1, "negative": 4, "unknown": 3}
    text = result.csv_path.read_text()
    assert PADCHEST_REPORT not in text and "1948" not in text and "PatientBirth" not in text


def test_harmonised_keeps_vocabulary_groups_and_blanks_the_rest(padchest_root: Path, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="not on disk"):
        df = _csv(prepare("padchest", padchest_root, out=tmp_path / "h.csv", findings="harmonised",
                          allow_missing=True).csv_path)
    assert list(df.columns[1:1 + len(VOCABULARY)]) == list(VOCABULARY)
    assert "Tube" not in df.columns and "Granuloma" not in df.columns
    assert set(df["Lung Opacity"]) == {""} and set(df["Enlarged Cardiomediastinum"]) == {""}
    assert set(df["Hernia"]) == {"0", "1", ""}


def test_frontal_view_filter(padchest_root: Path, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="not on disk"):
        df = _csv(prepare("padchest", padchest_root, out=tmp_path / "f.csv", views=["FRONTAL"],
                          allow_missing=True).csv_path)
    assert "LATERAL" not in set(df["view"]) and {"PA", "AP", "AP SUPINE"} <= set(df["view"])


def test_a_release_with_every_png_in_root_is_read(tmp_path: Path) -> None:
    root = make_padchest(tmp_path / "flat", flat=True)
    with pytest.warns(UserWarning, match="not on disk"):
        df = _csv(prepare("padchest", root, out=tmp_path / "p.csv", allow_missing=True).csv_path)
    assert not df["path"].str.contains("/").any() and len(df) == len(PADCHEST_ROWS) - 1


def test_missing_image_fails_and_missing_csv_names_the_file(padchest_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match=r"1 of the 9 images .* not on disk"):
        prepare("padchest", padchest_root, out=tmp_path / "p.csv")
    with pytest.raises(DatasetLayoutError, match=r"PADCHEST_chest_x_ray_images_labels_160K_01\.02\.19\.csv.*bimcv"):
        prepare("padchest", tmp_path, out=tmp_path / "p.csv")
