"""``medtransfer demo --volumes --fast`` end to end in a fresh folder: synthetic CT series (DICOM) are made,
indexed as volumes, a 2.5D linear probe trains, and evaluation, 3-plane saliency montages, the shortcut audit and
the report follow.

What the demo's model learns is not asserted beyond "a valid AUROC": the full demo reaches a test AUROC of about
0.83 from ~220 training volumes (configs/demo-volumes.yaml, README); the --fast demo trains fewer epochs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("demo")]


def _medtransfer(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("medtransfer")
    cmd = [exe, *args] if exe else [sys.executable, "-c", "from medtransfer.cli import main; main()", *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "PYTHONHASHSEED": "0"},
                          timeout=900)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    cwd = tmp_path_factory.mktemp("fresh-volumes")
    return cwd, _medtransfer("--quiet", "demo", "--volumes", "--fast", cwd=cwd)


def test_volume_demo_runs_every_stage_on_dicom_series(demo) -> None:
    cwd, proc = demo
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    run = cwd / "runs" / "demo-volumes"
    card = json.loads((run / "model_card.json").read_text())
    assert card["volume"] == "slices" and card["input"]["size"] == [32, 128, 128]
    manifest = pd.read_csv(run / "manifest.csv")
    assert manifest["format"].eq("dicom").all() and manifest["frames"].gt(1).all()  # series read as volumes
    ev = json.loads((run / "evaluation.json").read_text())
    (row,) = ev["overall"]["records"]
    assert 0.0 <= row["auroc"] <= 1.0 and row["auroc_lo"] <= row["auroc"] <= row["auroc_hi"]
    index = pd.read_csv(run / "saliency" / "index.csv")
    assert set(index["method"]) == {"gradcam"}
    for _, r in index.iterrows():
        assert (run / "saliency" / r["file"]).is_file() and (run / "saliency" / r["map_file"]).is_file()
    assert (run / "audit" / "shortcuts.json").is_file()
    preds = pd.read_csv(run / "predictions.csv")
    assert preds["slice_attention"].notna().all()  # which slices: saved with every prediction


def test_volume_demo_report_describes_the_volumes_and_leaks_no_identifiers(demo) -> None:
    cwd, _ = demo
    html = (cwd / "runs" / "demo-volumes" / "report.html").read_text(encoding="utf-8")
    assert "reoriented to RAS" in html and "32×128×128 voxels" in html and "attention-MIL" in html
    assert "Volume geometry" in html
    assert "DEMO^CT" not in html and "DEMO-CT0" not in html  # the synthetic patients' fake names and IDs


def test_volume_demo_rerun_reuses_the_finished_run(demo) -> None:
    cwd, _ = demo
    weights = cwd / "runs" / "demo-volumes" / "model.safetensors"
    before = weights.stat().st_mtime_ns
    proc = _medtransfer("--quiet", "demo", "--volumes", "--fast", cwd=cwd)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert weights.stat().st_mtime_ns == before
