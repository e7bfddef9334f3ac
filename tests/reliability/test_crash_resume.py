"""Item 1: crash anywhere, lose nothing.

Each stage of the pipeline is killed with a real SIGKILL at a precise point, through one of two fault points
(medtransfer/faults.py) that are inert unless armed; here they are armed in the CLI subprocess through its
environment (``faults.subprocess_env``):

- ``write`` (in ``io.atomic_path``): SIGKILL during the N-th atomic write of a file whose name matches a
  pattern, after its temporary file is written and before the rename;
- ``step`` (in ``training.loop.Stepper``): SIGKILL just before optimiser step N.

After the kill, no file under a final name is partial; then the same command is run again and its outputs
must equal those of the uninterrupted pipeline (``conftest.pipeline``, CPU, same seed). The mid-epoch kill of
other strategies, resumed with ``--resume``, is covered by tests/training/test_resume.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from medtransfer import faults
from tests.conftest import skip_or_fail
from tests.reliability.conftest import (
    N_BOOT,
    Pipeline,
    assert_no_partial_files,
    assert_ok,
    assert_user_error,
    cli,
    cli_env,
    copy_run,
    evaluation_without_timing,
    history,
    sha256,
    temporaries,
    train_args,
)

pytestmark = pytest.mark.slow

KILLED = -9  # subprocess returncode of a process ended by SIGKILL


def _killed(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == KILLED, f"expected SIGKILL, got exit {proc.returncode}\n{proc.stderr[-3000:]}"


def test_sigkill_while_indexing_then_the_same_command_redoes_it(pipeline: Pipeline, tmp_path: Path) -> None:
    out = tmp_path / "index"
    args = ["--quiet", "index", str(pipeline.data), "--out", str(out)]
    _killed(cli(*args, env=cli_env(**faults.subprocess_env("write", match="manifest.json"))))
    assert (out / "manifest.csv").is_file() and not (out / "manifest.json").exists()
    assert_no_partial_files(out)
    assert temporaries(out), "the kill was meant to land between writing the temporary file and renaming it"

    assert_ok(cli(*args))
    assert temporaries(out) == []  # the next write of that name removed the dead process's temporary
    for name in ("manifest.csv", "manifest.json", "quarantine.csv", "summary.json"):
        assert (out / name).read_bytes() == (pipeline.index / name).read_bytes(), name


# 12 training cases / batch 8 = 2 optimiser steps per epoch: step 3 is the first step of epoch 2. Checkpoint
# writes per epoch: the tensors (staging file, then renamed) and training_state.json, so ":2" is epoch 2's.
KILL_POINTS = {
    "mid-epoch": faults.subprocess_env("step", nth=3),
    "checkpoint-tensors": faults.subprocess_env("write", match="training_state.staging.safetensors", nth=2),
    "checkpoint-json": faults.subprocess_env("write", match="training_state.json", nth=2),
    "model-card": faults.subprocess_env("write", match="model_card.json"),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_while_training_then_the_same_command_resumes_to_the_same_model(
        pipeline: Pipeline, tmp_path: Path, point: str) -> None:
    from medtransfer.models.checkpoint import peek_training_state

    run = tmp_path / "run"
    args = train_args(pipeline.data, run)
    _killed(cli(*args, env=cli_env(**KILL_POINTS[point])))
    assert not (run / "model_card.json").exists()
    assert_no_partial_files(run)
    state = peek_training_state(run / "checkpoints" / "last")  # verifies the sha256 of the tensors too
    assert state["epoch"] == (2 if point == "model-card" else 1)

    if point == "mid-epoch":  # another configuration must not be mixed with this checkpoint: refused
        before = (run / "config.yaml").read_bytes()
        assert_user_error(cli(*train_args(pipeline.data, run, "train.lr=0.5")), "interrupted run", "--resume")
        assert (run / "config.yaml").read_bytes() == before

    resumed = cli(*args)  # the very same command, no --resume
    assert_ok(resumed)
    assert "resuming" in resumed.stderr
    assert history(run) == history(pipeline.run)
    assert sha256(run / "model.safetensors") == sha256(pipeline.run / "model.safetensors")
    card, clean = (json.loads((r / "model_card.json").read_text()) for r in (run, pipeline.run))
    assert (card["thresholds"], card["temperature"]) == (clean["thresholds"], clean["temperature"])
    assert temporaries(run) == []


def test_sigkill_while_evaluating_then_the_same_command_redoes_it(pipeline: Pipeline, tmp_path: Path) -> None:
    run = copy_run(pipeline.run, tmp_path, drop=("evaluation.json", "predictions.csv", "saliency", "report.*",
                                                  "checkpoints"))
    args = ["--quiet", "evaluate", str(run), "--n-boot", N_BOOT]
    _killed(cli(*args, env=cli_env(**faults.subprocess_env("write", match="evaluation.json"))))
    assert (run / "predictions.csv").is_file() and not (run / "evaluation.json").exists()
    assert_no_partial_files(run)

    assert_ok(cli(*args))
    assert (run / "predictions.csv").read_bytes() == (pipeline.run / "predictions.csv").read_bytes()
    assert evaluation_without_timing(run / "evaluation.json") == evaluation_without_timing(
        pipeline.run / "evaluation.json")
    assert temporaries(run) == []


def test_sigkill_while_explaining_then_the_same_command_redoes_it(pipeline: Pipeline, tmp_path: Path) -> None:
    run = copy_run(pipeline.run, tmp_path, drop=("saliency", "report.*", "checkpoints"))
    args = ["--quiet", "explain", str(run), "--cases", "1"]
    _killed(cli(*args, env=cli_env(**faults.subprocess_env("write", match="*.png"))))
    assert not (run / "saliency" / "index.csv").exists()
    assert not list((run / "saliency").rglob("*.png"))
    assert_no_partial_files(run)

    assert_ok(cli(*args))
    sal, clean = run / "saliency", pipeline.run / "saliency"
    assert (sal / "index.csv").read_bytes() == (clean / "index.csv").read_bytes()
    pngs = sorted(p.relative_to(clean) for p in clean.rglob("*.png"))
    assert pngs and sorted(p.relative_to(sal) for p in sal.rglob("*.png")) == pngs
    for rel in pngs:
        assert (sal / rel).read_bytes() == (clean / rel).read_bytes(), rel
    assert temporaries(run) == []


_GENERATED = re.compile(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2} UTC")


def _pdf_text(pdf: Path) -> str:
    text = subprocess.run(["pdftotext", "-layout", str(pdf), "-"], capture_output=True, text=True, check=True).stdout
    return _GENERATED.sub("<generated>", text)


def test_sigkill_while_rendering_the_report_then_the_same_command_redoes_it(pipeline: Pipeline,
                                                                            tmp_path: Path) -> None:
    run = copy_run(pipeline.run, tmp_path, drop=("report.*", "checkpoints"))
    args = ["--quiet", "report", str(run)]
    _killed(cli(*args, env=cli_env(**faults.subprocess_env("write", match="report.pdf"))))
    assert (run / "report.html").is_file() and not (run / "report.pdf").exists()
    assert_no_partial_files(run)

    assert_ok(cli(*args))
    html, clean = ((r / "report.html").read_text(encoding="utf-8") for r in (run, pipeline.run))
    assert _GENERATED.sub("<generated>", html) == _GENERATED.sub("<generated>", clean)
    assert_no_partial_files(run)
    assert temporaries(run) == []
    if not shutil.which("pdftotext"):
        skip_or_fail("pdftotext (poppler-utils) is not installed: the PDF text cannot be compared")
    assert _pdf_text(run / "report.pdf") == _pdf_text(pipeline.run / "report.pdf")
