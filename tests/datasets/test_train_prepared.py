"""End to end: a prepared labels CSV trains with `medtransfer train ROOT --labels CSV` (Kermany, RSNA replicas).

The CSVs are used unchanged, as a user would: the single ``label`` column (no --label-columns), paths relative to
ROOT, the official test split kept in the run's manifest (Kermany) or a patient-level split made by medtransfer
when the dataset has none (RSNA).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from medtransfer.cli import app
from medtransfer.datasets.public import prepare
from tests.datasets.replicas_others import make_kermany, make_rsna
from tests.training.conftest import TINY_OVERRIDES

pytestmark = [pytest.mark.slow,
              pytest.mark.filterwarnings("ignore:1 patient.s. appear in more than one:UserWarning"),
              pytest.mark.filterwarnings("ignore:.*listed image.s. are not on disk:UserWarning")]

runner = CliRunner()


def _train(root: Path, labels: Path, out: Path) -> pd.DataFrame:
    sets = [a for o in [*TINY_OVERRIDES, "train.epochs=2"] for a in ("--set", o)]
    result = runner.invoke(app, ["train", str(root), "--labels", str(labels), "--out", str(out), "--device", "cpu",
                                 *sets], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file() and (out / "model_card.json").is_file()
    return pd.read_csv(out / "manifest.csv", dtype=str, keep_default_na=False)


def test_kermany_csv_trains_and_the_run_keeps_the_official_test_split(tmp_path: Path) -> None:
    root = make_kermany(tmp_path / "kermany", extra_patients=8)
    prepared = prepare("kermany", root, out=tmp_path / "kermany_labels.csv", val_fraction=0.2)
    labels = pd.read_csv(prepared.csv_path, dtype=str, keep_default_na=False)
    manifest = _train(root, prepared.csv_path, tmp_path / "run")
    assert len(manifest) == len(labels)
    split_of = dict(zip(labels["path"], labels["split"], strict=True))
    assert {p: split_of[p] for p in manifest["path"]} == dict(zip(manifest["path"], manifest["split"], strict=True))
    official_test = set(labels.loc[labels["official_split"] == "test", "path"])
    assert official_test and set(manifest.loc[manifest["split"] == "test", "path"]) >= official_test
    assert set(manifest["label"]) == {"normal", "pneumonia"}


def test_rsna_csv_trains_with_a_patient_split_made_by_medtransfer(tmp_path: Path) -> None:
    root = make_rsna(tmp_path / "rsna", extra_images=24)
    prepared = prepare("rsna", root, out=tmp_path / "rsna_labels.csv", allow_missing=True)
    labels = pd.read_csv(prepared.csv_path, dtype=str, keep_default_na=False)
    assert set(labels["split"]) == {""}
    manifest = _train(root, prepared.csv_path, tmp_path / "run")
    assert set(manifest["path"]) == set(labels["path"])
    assert set(manifest["split"]) == {"train", "val", "test"}
    assert set(manifest["label"]) == {"normal", "pneumonia"}
