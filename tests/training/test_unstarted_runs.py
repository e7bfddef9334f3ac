"""A train that fails before training starts leaves no run folder; quarantined files are always announced."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from medtransfer.cli import app
from tests.factories import chest_like, write_dicom
from tests.training.conftest import TINY_OVERRIDES

runner = CliRunner()


def _flat_folder(root: Path, n: int = 4) -> Path:
    for i in range(n):
        write_dicom(root / f"scan_{i}.dcm", chest_like(48, seed=i).astype(np.uint16), patient_id=f"F{i}")
    return root


def _sets(overrides: list[str]) -> list[str]:
    return [arg for o in overrides for arg in ("--set", o)]


def test_a_config_typo_leaves_no_run_folder(tmp_path: Path) -> None:
    data = _flat_folder(tmp_path / "data")
    out = tmp_path / "runs" / "r1"
    result = runner.invoke(app, ["train", str(data), "--out", str(out), "--set", "train.pateince=3"])
    assert result.exit_code == 1, result.output
    assert "pateince" in result.output and not out.exists()


def test_data_without_classes_leaves_no_run_folder(tmp_path: Path) -> None:
    data = _flat_folder(tmp_path / "data")
    out = tmp_path / "r2"
    result = runner.invoke(app, ["train", str(data), "--out", str(out), *_sets(TINY_OVERRIDES)])
    assert result.exit_code == 1 and "two classes" in result.output, result.output
    assert not out.exists()
    assert sorted(p.name for p in data.iterdir()) == [f"scan_{i}.dcm" for i in range(4)]  # data untouched


def test_when_every_file_is_quarantined_only_the_quarantine_list_is_kept_and_named(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for label in ("normal", "pneumonia"):
        (data / label).mkdir(parents=True)
        for i in range(2):
            (data / label / f"{i}.dcm").write_bytes(b"DICM" + b"\0" * 50)  # not DICOM at all
    out = tmp_path / "r3"
    result = runner.invoke(app, ["train", str(data), "--out", str(out), *_sets(TINY_OVERRIDES)],
                           env={"COLUMNS": "400"})
    assert result.exit_code == 1, result.output
    assert [p.name for p in out.iterdir()] == ["quarantine.csv"]
    assert "quarantine.csv" in " ".join(result.output.split())


def test_an_existing_folder_is_never_removed(tmp_path: Path) -> None:
    data = _flat_folder(tmp_path / "data")
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("the user's own file")
    result = runner.invoke(app, ["train", str(data), "--out", str(out), *_sets(TINY_OVERRIDES)])
    assert result.exit_code == 1
    assert (out / "notes.txt").read_text() == "the user's own file"


def test_train_announces_quarantined_files_like_index_does(tiny_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "normal" / "broken.dcm").write_bytes(b"DICM not really a scan")
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", str(data), "--out", str(out), "--epochs", "1",
                                 *_sets([o for o in TINY_OVERRIDES if not o.startswith("train.epochs")]),
                                 "--set", "train.freeze_epochs=1"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert "1 file(s) could not be used and were quarantined" in text and str(out / "quarantine.csv") in text
