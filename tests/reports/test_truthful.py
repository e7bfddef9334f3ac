"""The report and the console never say OK about what they did not check, and their advice works when followed."""

from __future__ import annotations

import html as htmllib
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import medtransfer as mt
from medtransfer import checks
from medtransfer.cli import app
from medtransfer.commands import Commands, run_ref
from medtransfer.evaluation.result import EvaluationResult
from medtransfer.reports.render import render_report
from tests.reports.conftest import BuiltRun, pdf_tools_or_skip

runner = CliRunner()
SUGGESTION = re.compile(r"'(medtransfer [^']+)'")


def _suggestions(text: str) -> list[str]:
    return sorted(set(SUGGESTION.findall(htmllib.unescape(text))))


# -- three states --------------------------------------------------------------------------------------------
def _result(**meta: object) -> EvaluationResult:
    overall = pd.DataFrame([{"class": "pneumonia", "n": 120, "n_pos": 45, "auroc": 0.9, "auroc_lo": 0.85,
                             "auroc_hi": 0.95, "sensitivity": 1.0, "sensitivity_lo": 0.92, "sensitivity_hi": 1.0}])
    calibration = pd.DataFrame([{"class": "pneumonia", "ece": 0.062, "ece_uncalibrated": 0.057}])
    return EvaluationResult(overall=overall, calibration=calibration,
                            meta={"n_cases": 120, "min_group_size": 10, **meta})


def test_no_subgroup_data_is_not_assessed_and_says_what_to_do() -> None:
    r = _result(subgroups=[], warnings=["subgroup 'sex' is not in the data (no value for any case); it was skipped.",
                                        "subgroup 'site' is not in the data (no value for any case); it was skipped."])
    c = checks.gap_check(r, Commands("runs/cxr1"))
    assert c.status == checks.NOT_ASSESSED and c.level == "grey"
    assert "no sex, age or site" in c.detail and "labels CSV" in c.action
    assert "--subgroups" not in c.action  # no command naming columns the data do not have


def test_all_groups_too_small_is_not_assessed() -> None:
    r = _result(subgroups=["sex"], warnings=[])
    c = checks.gap_check(r, Commands("runs/cxr1", ("sex",)))
    assert c.status == checks.NOT_ASSESSED and "fewer than 10 patients" in c.detail


def test_temperature_that_worsened_calibration_is_said_not_hidden() -> None:
    r = _result(model={"temperature": 1.3, "calibration": {"applied": True}})
    c = checks.calibration_check(r)
    assert c.status == checks.PASSED and "made calibration worse for pneumonia" in c.detail


def test_single_site_hospital_signal_is_not_assessed_never_passed() -> None:
    shortcuts = {"probe": [{"attribute": "site", "status": "insufficient: needs 2+ values with 5+ cases each"}],
                 "loso": [], "notes": ["leave-one-site-out needs at least 2 sites"]}
    c = checks.hospital_check(shortcuts, Commands("runs/cxr1"))
    assert c.status == checks.NOT_ASSESSED and "needs at least 2 sites" in c.detail
    assert "medtransfer evaluate runs/cxr1 --data" in c.action


def test_a_degenerate_sanity_check_is_not_assessed() -> None:
    table = pd.DataFrame([{"randomised": "stage0", "mean_spearman": np.nan, "std_spearman": np.nan, "n_images": 6,
                           "n_constant": 6, "status": "not assessed", "reason": "the maps were constant"}])
    c = checks.sanity_check_of("occlusion", table, Commands("r"))
    assert c.status == checks.NOT_ASSESSED and c.level == "grey"


# -- on a real run ---------------------------------------------------------------------------------------------
def test_console_and_report_agree_and_never_pass_a_not_assessed_check(report_run: BuiltRun, run_copy: Path) -> None:
    r = mt.evaluate(run_copy, subgroups=(), n_boot=200)
    assert r.gaps[r.gaps.flagged].empty  # README's API line works on data without subgroups
    stored = {c["key"]: c for c in r.meta["checks"]}
    assert stored["subgroup_gaps"]["status"] == "not assessed"
    page = render_report(run_copy, formats=["html"])["html"].read_text("utf-8")
    facts = page[page.index('id="facts"'):page.index('id="data"')]
    assert "Subgroup gaps not assessed" in facts and "No subgroup gap flagged" not in facts
    green = re.findall(r'<li class="check check-green">.*?</li>', facts, flags=re.S)
    assert not green  # passed checks are one line, never a green item for something not assessed
    passed_line = re.search(r'class="passed-line">(.*?)</p>', facts, flags=re.S)
    assert passed_line is None or "not assessed" not in passed_line.group(1).lower()


def test_proportion_intervals_never_collapse(report_run: BuiltRun) -> None:
    r = EvaluationResult.load(report_run.run_dir)
    for m in ("sensitivity", "specificity", "ppv", "npv"):
        row = r.overall.iloc[0]
        if np.isfinite(row[m]):
            assert row[f"{m}_hi"] - row[f"{m}_lo"] > 0, (m, row[m], row[f"{m}_lo"], row[f"{m}_hi"])
            assert row[f"{m}_ci_method"] == "wilson-cluster"


@pytest.mark.slow
def test_every_suggested_command_runs_on_the_run_that_produced_it(run_copy: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Commands are collected from the report (with saliency and evaluation removed, so that it suggests
    producing them) and from the console, then each is run as printed, from the folder the report was made in."""
    monkeypatch.chdir(run_copy.parent)
    shutil.rmtree(run_copy / "saliency")
    ext = run_copy.parent / "external_site"  # for the external-evaluation suggestion's placeholders
    data = Path(mt.load_run(run_copy).manifest.data_dir)
    shutil.copytree(data, ext)
    first = _suggestions(render_report(run_copy, formats=["html"])["html"].read_text("utf-8"))
    (run_copy / "evaluation.json").unlink()
    first += _suggestions(render_report(run_copy, formats=["html"])["html"].read_text("utf-8"))
    assert any(s.startswith("medtransfer explain") for s in first) and any(s.startswith("medtransfer evaluate")
                                                                           for s in first), first
    ran = set()
    for cmd in sorted(set(first)):
        argv = shlex.split(cmd.replace("EXTERNAL_FOLDER", str(ext.name)).replace("LABELS.csv", "__none__"))[1:]
        if "--labels" in argv and argv[argv.index("--labels") + 1] == "__none__":
            del argv[argv.index("--labels"):argv.index("--labels") + 2]  # class folders need no labels CSV
        result = runner.invoke(app, ["--quiet", *argv], env={"COLUMNS": "300"})
        assert result.exit_code == 0, (cmd, result.output)
        ran.add(argv[0])
    assert {"evaluate", "explain"} <= ran
    out = runner.invoke(app, ["--quiet", "evaluate", run_ref(run_copy)], env={"COLUMNS": "300"})
    for cmd in _suggestions(out.output):
        argv = shlex.split(cmd)[1:]
        assert runner.invoke(app, argv).exit_code == 0, cmd


def test_pdf_page_one_holds_the_whole_facts_card(run_copy: Path) -> None:
    pdf_tools_or_skip()
    pdf = render_report(run_copy, formats=["pdf"])["pdf"]
    page1 = subprocess.run(["pdftotext", "-f", "1", "-l", "1", "-layout", str(pdf), "-"], capture_output=True,
                           text=True, check=True).stdout
    page2 = subprocess.run(["pdftotext", "-f", "2", "-l", "2", "-layout", str(pdf), "-"], capture_output=True,
                           text=True, check=True).stdout
    for heading in ("Model Facts", "Summary", "Mechanism", "Validation and performance", "Warnings",
                    "Other information"):
        assert heading in page1, (heading, page1[-800:])
    assert "Contact" in page1 and "Other information" not in page2


def test_external_evaluations_under_the_run_appear_in_its_report(run_copy: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    ext = tmp_path / "other_site"
    shutil.copytree(Path(mt.load_run(run_copy).manifest.data_dir), ext)
    mt.evaluate(run_copy, ext, n_boot=50)
    monkeypatch.chdir(run_copy.parent)
    page = htmllib.unescape(render_report(run_copy, formats=["html"])["html"].read_text("utf-8"))
    assert "External evaluations of this run" in page and "other_site" in page
    assert "medtransfer report run/external/other_site" in page  # not rendered yet: how to render it
    own = render_report(run_copy / "external" / "other_site", formats=["html"])["html"]
    assert own == run_copy / "external" / "other_site" / "report.html"
    text = own.read_text("utf-8")
    assert "external data set" in text and 'id="model"' in text and "Model card: not provided" not in text
