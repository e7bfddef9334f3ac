"""benchmarks/gpu.py and gpu.sh (issue 17 item 7) in smoke mode: every part runs on the CPU at 32 px.

The GPU figures themselves come from a device machine; these tests keep the script working between such runs:
its throughput rows (bare loop and medtransfer's Stepper path), the training run through ``medtransfer.train``,
the budget guard, the fallback when medtransfer cannot be imported, and the bash wrapper.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import skip_or_fail

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"
TABLE = "=== summary: medtransfer GPU path ==="


def _run(args: list[str], *, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.slow
def test_smoke_runs_every_part_and_prints_the_table(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    proc = _run([sys.executable, str(SCRIPT), "--smoke", "--data", "sample", "--json", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert TABLE in proc.stdout
    table = proc.stdout.split(TABLE, 1)[1]
    for path in ("bare", "medtransfer", "medtransfer-nondet"):
        assert f"resnet50     {path} " in table
    figures = json.loads(out.read_text(encoding="utf-8"))
    rows = figures["throughput"]
    assert [r["path"] for r in rows] == ["bare", "medtransfer", "medtransfer-nondet"]
    for r in rows:
        assert "error" not in r, r
        assert r["img_s"] > 0 and r["steps"] == 3
    # the medtransfer rows ran medtransfer's settings, the bare row plain PyTorch
    assert rows[0]["settings"]["channels_last"] is False
    assert rows[1]["settings"]["channels_last"] is True and rows[1]["settings"]["deterministic"] is True
    assert rows[2]["settings"]["deterministic"] is False
    assert rows[1]["ratio"] == pytest.approx(rows[1]["img_s"] / rows[0]["img_s"])
    train = figures["training"]
    assert "error" not in train, train
    assert train["epochs_run"] == 2 and [h["epoch"] for h in train["history"]] == [1, 2]
    assert train["input_size"] == [32, 32] and train["device"]["device"] == "cpu"
    assert 0.0 <= train["best_val_auroc"] <= 1.0
    assert "generated sample data" in train["data"]
    assert "training run (generated sample data" in table


def test_budget_guard_skips_what_does_not_fit() -> None:
    proc = _run([sys.executable, str(SCRIPT), "--smoke", "--budget-s", "0"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[budget] skipped resnet50 bare" in proc.stdout
    assert "[budget] skipped the training run" in proc.stdout
    assert "(no throughput rows ran)" in proc.stdout
    assert "training run: skipped (the time budget ran out)" in proc.stdout


def test_without_medtransfer_only_the_bare_rows_run() -> None:
    # a device image without medtransfer's dependencies (pydantic here): bare figures still, and a failing status
    code = ("import runpy, sys; sys.modules['pydantic'] = None; "
            f"sys.argv = ['gpu.py', '--smoke']; runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    proc = _run([sys.executable, "-c", code])
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "medtransfer cannot be imported, only the bare rows run" in proc.stdout
    assert "gpu.sh --prepare" in proc.stdout
    table = proc.stdout.split(TABLE, 1)[1]
    assert "resnet50     bare " in table and "resnet50     medtransfer" not in table


@pytest.mark.slow  # three interpreters import torch (and the dependency probe monai): ~10 s, 30 s on a busy CPU
def test_gpu_sh_prints_the_environment_and_passes_arguments_on() -> None:
    if shutil.which("bash") is None or shutil.which("timeout") is None:
        skip_or_fail("benchmarks/gpu.sh needs bash and coreutils' timeout")
    proc = _run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "--smoke", "--no-train", "--models", "resnet18",
                 "--steps", "1", "--warmup", "0", "--budget-s", "200"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "=== environment ===" in out and "torch.cuda.is_available:" in out and "visible GPUs: " in out
    limit = int(re.search(r"\(hard limit (\d+) s\)", out).group(1))
    assert 10 <= limit <= 225  # --budget-s 200 + 25, less the seconds the environment checks took
    assert "mode': 'smoke'" in out and TABLE in out
    assert "resnet18     bare " in out.split(TABLE, 1)[1]
    assert "NCCL DDP test" in out
