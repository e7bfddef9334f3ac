"""On real chest X-rays without demographics (one site), the report and console say only what was assessed.

``../shared/data/kermany-cxr-600``: 600 real paediatric radiographs, labels and patient IDs only (no sex, age
or site). The run is trained as a user would (CLI), evaluated with the defaults (which ask for sex, age band
and site), explained, audited for shortcuts (one site: nothing to compare) and reported.
"""

from __future__ import annotations

import html as htmllib
import re
import shlex
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from medtransfer.cli import app
from medtransfer.evaluation.result import EvaluationResult
from tests.reports.conftest import pdf_tools_or_skip

pytestmark = [pytest.mark.slow, pytest.mark.realdata]
runner = CliRunner()
PROPORTIONS = ("sensitivity", "specificity", "ppv", "npv")


def _cli(*args: str) -> str:
    result = runner.invoke(app, ["--quiet", *args], env={"COLUMNS": "300"})
    assert result.exit_code == 0, (args, result.output)
    return result.output


@pytest.fixture(scope="module")
def kermany_run(kermany_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("kermany-report")
    run = root / "cxr1"
    _cli("train", kermany_dir, "--labels", f"{kermany_dir}/labels.csv", "--strategy", "linear-probe",
         "--image-size", "128", "--epochs", "6", "--out", str(run), "--set", "train.num_workers=0")
    return run


def test_kermany_report_says_only_what_was_assessed(kermany_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pdf_tools_or_skip()
    monkeypatch.chdir(kermany_run.parent)
    console = _cli("evaluate", kermany_run.name)
    assert "passed: No subgroup gap flagged" not in console
    assert "not assessed: Subgroup gaps not assessed" in " ".join(console.split())
    _cli("explain", kermany_run.name, "--cases", "1")
    # both audits, the transfer one at a small grid (the suggested commands are then evaluate/explain/report)
    _cli("audit", kermany_run.name, "--strategy", "linear-probe", "--strategy", "scratch", "--seeds", "1",
         "--fraction", "0.5", "--fraction", "1.0", "--epochs", "1")
    _cli("report", kermany_run.name)
    page = htmllib.unescape((kermany_run / "report.html").read_text("utf-8"))
    facts = page[page.index('id="facts"'):page.index('id="data"')]
    # nothing not assessed shows as OK on page 1
    assert "Hospital signal not assessed" in facts and "No hospital signal found" not in facts
    assert "Subgroup gaps not assessed" in facts and "No subgroup gap flagged" not in facts
    # text that degrades gracefully when fields are missing
    for broken in ("not provided images", "sites 1:", "one site ()", "<dd>medtransfer model report</dd>",
                   "<dd>medtransfer model</dd>", "<h1>medtransfer model report</h1>"):
        assert broken not in page, broken
    assert "<dd>efficientnet_lite0 normal vs pneumonia classifier (run cxr1)</dd>" in facts
    assert "not recorded: " in facts and "sex" in facts
    # no zero-width interval for a proportion from 10+ cases, overall or by group
    r = EvaluationResult.load(kermany_run)
    row = r.overall.iloc[0]
    for m in PROPORTIONS:
        assert row[f"{m}_hi"] > row[f"{m}_lo"], (m, row[m])
    # page 1 of the PDF holds the whole facts card
    pdf = kermany_run / "report.pdf"
    page1 = subprocess.run(["pdftotext", "-f", "1", "-l", "1", str(pdf), "-"], capture_output=True, text=True,
                           check=True).stdout
    assert "Other information" in page1 and "Warnings" in page1
    # every command the report and the console suggest runs as printed
    suggested = set(re.findall(r"'(medtransfer [^']+)'", page + console))
    for cmd in sorted(suggested):
        if "EXTERNAL_FOLDER" in cmd:
            continue  # names another site's data, which the user supplies; run with a real folder in test_truthful
        _cli(*shlex.split(cmd)[1:])
    assert np.isfinite(row["auroc"])
