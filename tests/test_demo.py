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

WEAK_SITE = "Coastal Community Hospital (DEMO)"  # site C of medtransfer.datasets.synthetic, the planted weak site


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


# last in the module: following the advice re-evaluates and adds heat maps to the shared demo run
def test_demo_report_says_only_what_was_assessed_and_its_advice_runs(demo) -> None:
    """Issue 13 on the demo: no OK for what was not assessed, no zero-width interval for a proportion from 10+
    cases, page 1 of the PDF holds the facts card, and every suggested command runs as printed."""
    import html as htmllib
    import re
    import shlex

    cwd, proc = demo
    run = cwd / "runs" / "demo"
    page = htmllib.unescape((run / "report.html").read_text(encoding="utf-8"))
    facts = page[page.index('id="facts"'):page.index('id="data"')]
    assert not re.findall(r'<li class="check check-green">', facts)  # passed checks: one line, never a green item
    passed = re.search(r'class="passed-line">(.*?)</p>', facts, flags=re.S)
    assert passed is None or "not assessed" not in passed.group(1).lower()
    doc = json.loads((run / "evaluation.json").read_text(encoding="utf-8"))
    from medtransfer.evaluation.result import EvaluationResult

    result = EvaluationResult.from_json(doc)
    for m in ("sensitivity", "specificity", "ppv", "npv"):
        row = result.overall.iloc[0]
        assert row[f"{m}_hi"] > row[f"{m}_lo"], m
    groups = result.by_group[(result.by_group["status"] == "ok") & (result.by_group["n"] >= 10)]
    for m in ("sensitivity", "specificity"):
        assert (groups[f"{m}_hi"] > groups[f"{m}_lo"]).all(), groups[["attribute", "group", m]]
    if shutil.which("pdftotext"):
        page1 = subprocess.run(["pdftotext", "-f", "1", "-l", "1", str(run / "report.pdf"), "-"],
                               capture_output=True, text=True, check=True).stdout
        assert "Other information" in page1 and "Warnings" in page1
    suggested = sorted(set(re.findall(r"'(medtransfer [^']+)'", page + proc.stdout + proc.stderr)))
    for cmd in suggested:
        if "EXTERNAL_FOLDER" in cmd:
            continue  # names another site's data, which the user supplies (run with real data in tests/reports)
        done = _medtransfer("--quiet", *shlex.split(cmd)[1:], cwd=cwd)
        assert done.returncode == 0, (cmd, done.stdout[-2000:], done.stderr[-2000:])
