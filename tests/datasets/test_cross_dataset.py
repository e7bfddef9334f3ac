"""Cross-dataset use, one command each way: train on one public dataset's harmonised CSV, ``evaluate --data`` on
another's. The run's classes the other dataset never labels are reported "not evaluable" (no crash, no 0.5).

Also the end-to-end check that a prepared CSV trains with the command ``prepare`` prints (NIH and CheXpert).
"""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medtransfer.cli import app
from medtransfer.datasets.public import load_adapter
from medtransfer.evaluation.result import EvaluationResult
from tests.datasets.replicas_nih_chexpert_mimic import make_chexpert, make_nih

runner = CliRunner()
TINY = ["input.size=[48, 48]", "train.batch_size=8", "train.epochs=2", "train.freeze_epochs=1",
        "train.num_workers=0", "train.augment.enabled=false"]
WIDE = {"COLUMNS": "250"}


def _prepare(name: str, root: Path, out: Path) -> list[str]:
    """Run ``datasets prepare --findings harmonised``; return the printed train command's arguments."""
    result = runner.invoke(app, ["datasets", "prepare", name, str(root), "--out", str(out), "--findings",
                                 "harmonised"], env=WIDE)
    assert result.exit_code == 0, result.output
    line = next(x for x in result.stdout.splitlines() if x.startswith("train: "))
    return shlex.split(line.removeprefix("train: "))


def _train(argv: list[str], run: Path) -> None:
    assert argv[:2] == ["medtransfer", "train"]
    args = argv[2:argv.index("--out")] + ["--out", str(run)] + [a for o in TINY for a in ("--set", o)]
    result = runner.invoke(app, ["-q", "train", *args], env=WIDE)
    assert result.exit_code == 0, result.output
    assert (run / "model_card.json").is_file() and (run / "model.safetensors").is_file()


def _evaluate(run: Path, root: Path, csv: Path) -> EvaluationResult:
    result = runner.invoke(app, ["-q", "evaluate", str(run), "--data", str(root), "--labels", str(csv),
                                 "--n-boot", "20"], env=WIDE)
    assert result.exit_code == 0, result.output
    assert "is not evaluable on these cases" in result.output
    return EvaluationResult.load(run / "external" / root.name)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, list[str]]]:
    """Both replicas (with enough generated patients to train) and their harmonised CSVs."""
    base = tmp_path_factory.mktemp("cross")
    nih = make_nih(base / "nih", extra_patients=24, missing=False)
    cx = base / "chexpert"
    make_chexpert(cx, extra_patients=24, missing=False)
    return {"nih": (nih, base / "nih.csv", _prepare("nih", nih, base / "nih.csv")),
            "chexpert": (cx, base / "chexpert.csv", _prepare("chexpert", cx, base / "chexpert.csv"))}


def _classes(argv: list[str]) -> list[str]:
    return argv[argv.index("--label-columns") + 1].split(",")


@pytest.mark.slow
@pytest.mark.parametrize(("source", "target"), [("nih", "chexpert"), ("chexpert", "nih")])
def test_train_on_one_dataset_and_evaluate_on_the_other(prepared: dict, tmp_path: Path, source: str,
                                                         target: str) -> None:
    root, csv, argv = prepared[source]
    classes = _classes(argv)
    run = tmp_path / f"run-{source}"
    _train(argv, run)
    t_root, t_csv, t_argv = prepared[target]
    evaluation = _evaluate(run, t_root, t_csv)
    meta = evaluation.meta
    assert meta["classes"] == classes
    # the target labels only its own findings: the run's others are not evaluable there, and say why
    labelled = set(load_adapter(target).INFO.harmonise.values())
    never = {c for c in classes if c not in labelled}
    assert never, "the two datasets must differ in what they label for this test to mean anything"
    assert set(meta["not_evaluable"]) >= never
    assert all(meta["not_evaluable"][c].startswith("no labelled case") for c in never)
    overall = evaluation.overall.set_index("class")
    for c in classes:
        auroc = float(overall.loc[c, "auroc"])
        if c in meta["not_evaluable"]:
            assert math.isnan(auroc), c  # blank, never 0.5
        else:
            assert 0.0 <= auroc <= 1.0, c
    shared = [c for c in classes if c not in meta["not_evaluable"]]
    assert shared, "some classes must be evaluable across the two datasets"
    assert meta["n_cases"] == json.loads(t_csv.with_name(f"{t_csv.stem}.summary.json").read_text())["rows"]

