"""COVID-19 collection adapter on a replica of metadata.csv: the finding hierarchy, X-ray only, notes never copied."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from medtransfer.datasets.public import VOCABULARY, prepare
from medtransfer.datasets.public.covid import FINDINGS, finding_row
from medtransfer.errors import DatasetLayoutError
from tests.datasets.replicas_others import COVID_MISSING, COVID_NOTE, make_covid

N = math.nan


def _csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


@pytest.fixture(scope="module")
def covid_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_covid(tmp_path_factory.mktemp("covid"))


# Pneumonia, Viral, Bacterial, Fungal, COVID-19, Tuberculosis
@pytest.mark.parametrize(("finding", "values"), [
    ("Pneumonia/Viral/COVID-19", (1, 1, 0, 0, 1, 0)),
    ("Pneumonia/Viral/SARS", (1, 1, 0, 0, 0, 0)),
    ("Pneumonia/Viral/Influenza/H1N1", (1, 1, 0, 0, 0, 0)),
    ("Pneumonia/Viral", (1, 1, 0, 0, N, 0)),
    ("Pneumonia/Bacterial/Staphylococcus/MRSA", (1, 0, 1, 0, 0, 0)),
    ("Pneumonia/Fungal/Aspergillosis", (1, 0, 0, 1, 0, 0)),
    ("Pneumonia/Lipoid", (1, 0, 0, 0, 0, 0)),
    ("Pneumonia", (1, N, N, N, N, 0)),
    ("Tuberculosis", (0, 0, 0, 0, 0, 1)),
    ("No Finding", (0, 0, 0, 0, 0, 0)),
    ("todo", (N,) * 6), ("Unknown", (N,) * 6), ("", (N,) * 6),
])
def test_the_finding_hierarchy(finding: str, values: tuple[float, ...]) -> None:
    row = finding_row(finding)
    assert row is not None
    got = [row[name] for name in FINDINGS]
    assert [v if v == v else "nan" for v in got] == [float(v) if v == v else "nan" for v in values]


def test_values_outside_the_hierarchy_are_not_guessed() -> None:
    assert finding_row("COVID-19, ARDS") is None and finding_row("/") is None


def test_xray_rows_with_their_findings_views_site_and_licence(covid_root: Path, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="1 listed image"):
        result = prepare("covid", covid_root, out=tmp_path / "c.csv", allow_missing=True)
    df = _csv(result.csv_path).set_index("path")
    assert len(df) == 9 and COVID_MISSING not in df.index
    assert not df.index.str.startswith("volumes/").any()  # CT rows left out
    first = df.loc["images/auntminnie-a-2020_01_28_23_51_6665_2020_01_28_Vietnam_coronavirus.jpeg"]
    assert (first["COVID-19"], first["Pneumonia"], first["patient_id"], first["sex"], first["age"]) == (
        "1", "1", "2", "M", "65")
    assert first["site"] == "Cho Ray Hospital, Ho Chi Minh City, Vietnam" and first["view"] == "PA"
    assert df.loc["images/auntminnie-b-2020_01_28_Vietnam_coronavirus.jpeg", "view"] == "AP SUPINE"
    assert df.loc["images/strep-lateral.jpg", "view"] == "LATERAL"
    assert df.loc["images/strep-lateral.jpg", "Bacterial Pneumonia"] == "1"
    unspecified = df.loc["images/ARDSSevere.png"]
    assert (unspecified["Pneumonia"], unspecified["COVID-19"], unspecified["license"]) == ("1", "", "CC BY-SA")
    assert all(df.loc["images/pending-review.png", f] == "" for f in FINDINGS)  # todo
    assert all(df.loc["images/normal-chest.jpg", f] == "0" for f in FINDINGS)
    assert df.loc["images/tb-case.png", "Tuberculosis"] == "1"
    assert df.loc["images/pcp.jpeg", "finding"] == "Pneumonia/Fungal/Pneumocystis"
    assert set(df["split"]) == {""} and set(df["study_id"]) == {""}
    text = result.csv_path.read_text()
    assert COVID_NOTE not in text and "clinical_notes" not in text and "doi" not in text


def test_harmonised_and_frontal_only(covid_root: Path, tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="not on disk"):
        df = _csv(prepare("covid", covid_root, out=tmp_path / "h.csv", findings="harmonised", views=["FRONTAL"],
                          allow_missing=True).csv_path)
    assert list(df.columns[1:1 + len(VOCABULARY)]) == list(VOCABULARY)
    assert "LATERAL" not in set(df["view"]) and len(df) == 8
    assert set(df["Pneumonia"]) == {"0", "1", ""} and set(df["Effusion"]) == {""}


def test_missing_metadata_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetLayoutError, match=r"metadata\.csv.*github\.com/ieee8023"):
        prepare("covid", tmp_path, out=tmp_path / "c.csv")
