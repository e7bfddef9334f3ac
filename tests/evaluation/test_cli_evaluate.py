"""``medtransfer evaluate`` and ``medtransfer predict`` in-process (typer's CliRunner)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from medtransfer.cli import app
from medtransfer.run_dir import Run
from tests.evaluation.test_evaluate import trained_run, write_case

runner = CliRunner()


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return trained_run(tmp_path_factory, "binary")


def test_evaluate_prints_the_summary_and_writes_the_result(run: Run, tmp_path: Path) -> None:
    out = tmp_path / "ev"
    result = runner.invoke(app, ["--quiet", "evaluate", str(run.path), "--n-boot", "100", "--subgroups",
                                 "sex,site,ethnicity", "--min-group-size", "5", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for text in ("AUROC", "pneumonia", "sens", "ECE", str(out / "evaluation.json"), str(out / "predictions.csv")):
        assert text in result.stdout, text
    assert "ubgroup gap" in result.output  # the subgroup check, whatever its state
    assert "ethnicity" in result.stderr  # absent subgroup: a warning, not a failure
    assert (out / "evaluation.json").is_file()
    assert len(pd.read_csv(out / "predictions.csv")) == len(run.manifest.split("test"))


def test_predict_writes_a_csv(run: Run, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    for i in range(2):
        write_case(tmp_path / "new", f"s{i}.dcm", ("pneumonia",) if i else (), rng, patient=f"Q{i}")
    (tmp_path / "new" / "bad.dcm").write_bytes(b"garbage")
    csv = tmp_path / "p.csv"
    result = runner.invoke(app, ["--quiet", "predict", str(run.path), str(tmp_path / "new"), "--out", str(csv)])
    assert result.exit_code == 0, result.output
    assert "predicted 2 scan(s) (1 could not be read" in result.stdout and str(csv) in result.stdout
    table = pd.read_csv(csv)
    assert table.columns.tolist() == ["case_id", "file", "p_pneumonia", "pred_pneumonia", "predicted", "error"]
    assert len(table) == 3


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_a_bad_run_dir_is_one_line_and_exit_1(tmp_path: Path, command: str) -> None:
    args = [command, str(tmp_path / "no_run")] + ([str(tmp_path)] if command == "predict" else [])
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "model_card.json" in lines[0]
