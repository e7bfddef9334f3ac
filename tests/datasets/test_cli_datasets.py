"""``medtransfer datasets list|prepare`` in-process: the table, the files, the train command, one-line errors."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medtransfer.cli import app
from tests.datasets.replicas_nih_chexpert_mimic import make_chexpert, make_nih

runner = CliRunner()
WIDE = {"COLUMNS": "250"}


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's rich console is made at import, with whatever width the first importer had (80 under xdist when
    another test imported it first): COLUMNS alone does not widen it, and wrapped table cells split names."""
    from medtransfer import cli

    monkeypatch.setattr(cli.console, "width", 250)
    monkeypatch.setattr(cli.err_console, "width", 250)


def test_list_shows_every_dataset_with_its_licence_and_expected_files() -> None:
    result = runner.invoke(app, ["datasets", "list"], env=WIDE)
    assert result.exit_code == 0, result.output
    for text in ("nih", "chexpert", "mimic", "NIH ChestX-ray14", "CC0", "Data_Entry_2017_v2020.csv",
                 "mimic-cxr-2.0.0-metadata.csv.gz", "physionet.org", "Research Use Agreement"):
        assert text in result.stdout, text


def test_prepare_prints_the_counts_writes_csv_and_summary_and_a_train_command_that_parses(tmp_path: Path) -> None:
    root = make_nih(tmp_path / "nih")
    out = tmp_path / "labels" / "nih.csv"
    result = runner.invoke(app, ["datasets", "prepare", "nih", str(root), "--out", str(out), "--allow-missing",
                                 "--findings", "harmonised", "--val-fraction", "0.2", "--seed", "3"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert out.is_file() and (tmp_path / "labels" / "nih.summary.json").is_file()
    summary = json.loads((tmp_path / "labels" / "nih.summary.json").read_text())
    assert summary["options"]["val_fraction"] == 0.2 and summary["options"]["seed"] == 3
    assert "NIH ChestX-ray14: 10 images, 6 patients" in result.stdout
    cell = summary["splits"]["train"]["findings"]["Cardiomegaly"]  # printed as positive/negative/unknown
    row = next(x for x in result.stdout.splitlines() if x.strip().startswith("Cardiomegaly"))
    assert f"{cell['positive']}/{cell['negative']}/{cell['unknown']}" in row
    # a vocabulary name NIH never labels: unknown in every row of every split, never negative
    assert next(x for x in result.stdout.splitlines() if x.strip().startswith("Fracture")).split()[1:] == [
        "0/0/2", "0/0/5", "0/0/3"]
    assert "missing files left out: 1" in result.stdout
    assert "warning: NIH ChestX-ray14: 1 listed image(s) are not on disk" in result.stderr
    line = next(x for x in result.stdout.splitlines() if x.startswith("train: "))
    argv = shlex.split(line.removeprefix("train: "))
    assert argv[:5] == ["medtransfer", "train", str(root), "--labels", str(out)]
    assert argv[5] == "--label-columns" and argv[6].split(",") == summary["label_columns"]


def test_prepare_passes_uncertain_and_views(tmp_path: Path) -> None:
    make_chexpert(tmp_path / "cx", missing=False)
    out = tmp_path / "c.csv"
    result = runner.invoke(app, ["datasets", "prepare", "chexpert", str(tmp_path / "cx"), "--out", str(out),
                                 "--uncertain", "zeros", "--views", "PA,AP"], env=WIDE)
    assert result.exit_code == 0, result.output
    summary = json.loads(out.with_name("c.summary.json").read_text())
    assert summary["options"]["uncertain"] == "zeros" and summary["options"]["views"] == ["PA", "AP"]
    assert "LATERAL" not in summary["views"] and summary["all"]["findings"]["Cardiomegaly"]["unknown"] < 7


def test_layout_errors_are_one_line_naming_the_file_and_exit_1(tmp_path: Path) -> None:
    (tmp_path / "nih").mkdir()
    result = runner.invoke(app, ["datasets", "prepare", "nih", str(tmp_path / "nih")], env=WIDE)
    assert result.exit_code == 1
    assert "DatasetLayoutError" in result.stderr and "Data_Entry_2017_v2020.csv" in result.stderr
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    missing = runner.invoke(app, ["datasets", "prepare", "nih", str(make_nih(tmp_path / "n2")),
                                  "--out", str(tmp_path / "x.csv")], env=WIDE)
    assert missing.exit_code == 1 and "--allow-missing" in missing.stderr
    unknown = runner.invoke(app, ["datasets", "prepare", "nihh", str(tmp_path)], env=WIDE)
    assert unknown.exit_code == 1 and "unknown dataset 'nihh'" in unknown.stderr
