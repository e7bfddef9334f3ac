"""``medtransfer demo --fast`` end to end, as README's first command runs it: a fresh folder, default paths.

Checks what the demo promises: a report, a headline that is above chance but not perfect, the planted weak
site found by the subgroup analysis, the planted marker shortcut found by occlusion, and a re-run that reuses
what is done.
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

from tests.conftest import skip_or_fail

# one worker runs the whole module, so the demo (minutes) runs once, not once per xdist worker
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("demo")]

WEAK_SITE = "Coastal Community Hospital (DEMO)"  # site C of medtransfer.sample_data, the planted weak site


def _medtransfer(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("medtransfer")
    cmd = [exe, *args] if exe else [sys.executable, "-c", "from medtransfer.cli import main; main()", *args]
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=900)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    cwd = tmp_path_factory.mktemp("fresh")
    return cwd, _medtransfer("--quiet", "demo", "--fast", cwd=cwd)


def test_demo_runs_and_writes_the_report(demo) -> None:
    cwd, proc = demo
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    run = cwd / "runs" / "demo"
    assert (cwd / "sample_data" / "generated" / "labels.csv").is_file()
    html = (run / "report.html").read_text(encoding="utf-8")
    assert "Subgroups" in html and "Explainability" in html
    assert f"report: {Path('runs/demo/report.html')}" in proc.stdout
    # fake identifiers of the synthetic DICOMs never reach the report
    assert "DEMO^PATIENT" not in html and "DEMO-P0" not in html


def test_demo_writes_the_pdf_or_says_why_not(demo) -> None:
    cwd, proc = demo
    try:
        import weasyprint  # noqa: F401
    except (ImportError, OSError) as exc:
        assert "PDF not written" in proc.stdout
        skip_or_fail(f"the demo's PDF needs WeasyPrint (pip install 'medtransfer[pdf]') and pango: {exc}")
    assert (cwd / "runs" / "demo" / "report.pdf").stat().st_size > 10_000


def test_headline_is_above_chance_but_not_perfect(demo) -> None:
    cwd, _ = demo
    ev = json.loads((cwd / "runs" / "demo" / "evaluation.json").read_text())
    (row,) = [r for r in ev["overall"]["records"] if r["class"] == "pneumonia"]
    # The --fast demo's test AUROC is deterministic on CPU for a version: 0.9226 (161 test cases), measured by
    # running this module (torch 2.14.1 CPU, pydicom 3.0.2, Python 3.11). README's 0.947 is the full demo's.
    # +-0.02 absorbs float differences between CPUs; a regression of the training or of the planted signal
    # moves it further. If the demo changes on purpose, re-measure (read runs/demo/evaluation.json).
    assert abs(row["auroc"] - 0.923) < 0.02, row
    assert row["auroc_lo"] < row["auroc"] < row["auroc_hi"]


def test_the_planted_weak_site_is_found(demo) -> None:
    cwd, proc = demo
    ev = json.loads((cwd / "runs" / "demo" / "evaluation.json").read_text())
    gaps = pd.DataFrame(ev["gaps"]["records"])
    site = gaps[gaps.attribute == "site"]
    assert site.flagged.any(), site
    # the worst site by AUROC is the one whose opacities were made faint and noisy
    assert site.set_index("metric").loc["auroc", "worst_group"] == WEAK_SITE
    assert "flagged gap: site" in proc.stdout


def test_occlusion_finds_the_planted_marker_shortcut(demo) -> None:
    cwd, proc = demo
    index = pd.read_csv(cwd / "runs" / "demo" / "saliency" / "index.csv", dtype={"hint": str})
    occlusion = index[index.method == "occlusion"]
    assert occlusion.hint.fillna("").str.contains("corner:top_left").any(), occlusion
    assert "occlusion:" in proc.stdout


def test_shortcut_audit_sees_the_sites(demo) -> None:
    cwd, proc = demo
    audit = json.loads((cwd / "runs" / "demo" / "audit" / "shortcuts.json").read_text())
    (site,) = [r for r in audit["probe"] if r["attribute"] == "site"]
    assert site["flagged"] and site["balanced_accuracy"] > 0.8  # scanners differ: the features see the site
    assert "site probe:" in proc.stdout
    html = (cwd / "runs" / "demo" / "report.html").read_text(encoding="utf-8")
    assert "Is the model learning the hospital?" in html


def test_rerun_reuses_the_finished_stages(demo) -> None:
    cwd, _ = demo
    before = (cwd / "runs" / "demo" / "model.safetensors").stat().st_mtime_ns
    proc = _medtransfer("--quiet", "demo", "--fast", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert "train 0 s" in proc.stdout
    assert (cwd / "runs" / "demo" / "model.safetensors").stat().st_mtime_ns == before


def test_demo_refuses_a_folder_it_did_not_make(tmp_path: Path) -> None:
    (tmp_path / "runs" / "demo").mkdir(parents=True)
    (tmp_path / "runs" / "demo" / "my_notes.txt").write_text("keep me")
    from medtransfer.demo import _prepare_out
    from medtransfer.errors import RunDirError

    with pytest.raises(RunDirError, match="not made by 'medtransfer demo'"):
        _prepare_out(tmp_path / "runs" / "demo", "key")
    assert (tmp_path / "runs" / "demo" / "my_notes.txt").read_text() == "keep me"
