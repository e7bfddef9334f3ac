"""CLAIM 2024 and TRIPOD+AI items: published numbering, and a status that follows the report's content.

Contexts come from the real tiny run (``report_run`` / ``run_copy``: trained, evaluated and explained once per
session), re-evaluated or stripped of files for each case, and from small hand-made dicts.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd
import pytest

import medtransfer as mt
from medtransfer.commands import Commands
from medtransfer.reports.context import build_context
from medtransfer.reports.files import load_run_files
from medtransfer.reports.guidelines import FILLED, PARTLY, PROVIDE, STATUSES, guideline_items
from medtransfer.reports.render import TEMPLATES, render_report
from tests.reports.conftest import BuiltRun

#: TRIPOD+AI (Collins et al., BMJ 2024;385:e078378, table 2): 27 items, 52 numbered sub-items.
TRIPOD_NUMBERS = ("1 2 3a 3b 3c 4 5a 5b 6a 6b 6c 7 8a 8b 8c 9a 9b 9c 10 11 12a 12b 12c 12d 12e 12f 12g 13 14 15 16 17 "
                  "18a 18b 18c 18d 18e 18f 19 20a 20b 20c 21 22 23a 23b 24 25 26 27a 27b 27c").split()
SECTION_STARTS = ("Title", "Abstract", "Introduction", "Methods", "Results", "Discussion", "Other", "Open science",
                  "Patient and public involvement")


def _by_item(rows: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    return {r["item"]: r for r in rows}


def _context(run_dir: Path, result: Any = None) -> dict[str, Any]:
    return build_context(load_run_files(run_dir, result))


# -- numbering and row shape --------------------------------------------------------------------------------
def test_every_item_numbered_as_published() -> None:
    out = guideline_items({})
    assert [r["item"] for r in out["claim"]] == [str(i) for i in range(1, 45)]
    assert [r["item"] for r in out["tripod"]] == TRIPOD_NUMBERS
    assert len(TRIPOD_NUMBERS) == 52 and "9d" not in TRIPOD_NUMBERS
    assert {r["guideline"] for r in out["claim"]} == {"CLAIM 2024"}
    assert {r["guideline"] for r in out["tripod"]} == {"TRIPOD+AI"}
    for r in out["claim"] + out["tripod"]:
        assert r["section"].startswith(SECTION_STARTS), r
        assert r["topic"] and len(r["topic"]) < 100, r  # a short paraphrase, not the published wording
    # section headings of a few items that are easy to get wrong
    claim, tripod = _by_item(out["claim"]), _by_item(out["tripod"])
    assert claim["13"]["topic"].startswith("Image acquisition") and claim["21"]["section"].endswith("Testing data")
    assert claim["33"]["topic"] == "Testing on external data" and claim["44"]["section"] == "Other information"
    assert tripod["18f"]["section"] == "Open science — Code sharing" and tripod["19"]["section"].startswith("Patient")


def test_an_empty_context_fills_nothing() -> None:
    """Nothing is filled without content: every item asks the authors, and says what to write."""
    out = guideline_items({})
    for r in out["claim"] + out["tripod"]:
        assert r["status"] == PROVIDE and r["todo"] and not r["where"], r
    assert out["counts"] == {"claim": {"filled": 0, "partly": 0, "provide": 44, "total": 44},
                             "tripod": {"filled": 0, "partly": 0, "provide": 52, "total": 52}}


def _assert_rows_well_formed(out: dict[str, Any]) -> None:
    for key in ("claim", "tripod"):
        for r in out[key]:
            assert r["status"] in STATUSES, r
            if r["status"] == FILLED:
                assert r["where"] and ":" in r["where"], r  # "Section: what"
            elif r["status"] == PARTLY:
                assert r["where"] and r["todo"], r
            else:
                assert r["todo"], r
        counts = out["counts"][key]
        assert counts["total"] == len(out[key]) == counts["filled"] + counts["partly"] + counts["provide"]


# -- the real run ------------------------------------------------------------------------------------------
@pytest.fixture()
def assessed_run(run_copy: Path) -> Path:
    """The run re-evaluated with a group floor of 2 patients, so sex and age groups are assessed."""
    mt.evaluate(run_copy, n_boot=50, min_group_size=2)
    return run_copy


def test_full_run_fills_what_it_shows(assessed_run: Path) -> None:
    ctx = _context(assessed_run)
    out = guideline_items(ctx)
    _assert_rows_well_formed(out)
    claim, tripod = _by_item(out["claim"]), _by_item(out["tripod"])
    filled = {"9", "19", "20", "22", "23", "24", "25", "26", "28", "29", "30", "31", "32", "36", "37", "38"}
    assert {k for k in filled if claim[k]["status"] != FILLED} == set(), {k: claim[k] for k in filled}
    assert {k for k in ("7", "12a", "12b", "12e", "14", "15", "21", "23a") if tripod[k]["status"] != FILLED} == set()
    # where = section and what it shows, from the run's own numbers
    row = ctx["performance"]["classes"][0]
    assert claim["29"]["where"].startswith("Performance: AUROC") and "95% CIs (50 patient-level bootstrap" in claim["29"]["where"]
    assert "(" in row["metric_map"]["AUROC"] and "–" in row["metric_map"]["AUROC"]
    assert claim["30"]["where"].startswith("Subgroups:") and "sex (F, M)" in claim["30"]["where"]
    assert f"0 of {ctx['data']['n_patients']} patients" in claim["20"]["where"]
    assert f"torch {ctx['repro']['versions']['torch']}" in claim["23"]["where"]
    assert "gradcam score" in claim["31"]["where"] and "sanity check" in claim["31"]["where"]
    # internal only: external testing is the authors' to do, and says how
    assert claim["33"]["status"] == PROVIDE and f"{Commands.for_run(assessed_run).evaluate} --data" in claim["33"]["todo"]
    # items only the authors can write stay "provide" however complete the run
    assert {claim[k]["status"] for k in ("4", "14", "15", "16", "17", "18", "34", "44")} == {PROVIDE}
    assert {tripod[k]["status"] for k in ("3c", "17", "18a", "18b", "18c", "18d", "18e", "19")} == {PROVIDE}
    # intended use empty in this run: the intended-use item is only partly filled and says how to fix it
    assert tripod["3b"]["status"] == PARTLY and "report.intended_use" in tripod["3b"]["todo"]


def test_subgroup_items_not_filled_when_no_two_groups_were_assessed(run_copy: Path) -> None:
    """The session run keeps min_group_size 10: sex and age groups are insufficient, the single site is not a comparison."""
    ctx = _context(run_copy)
    rows = ctx["subgroups"]["rows"]
    assert rows and not any(r["ok"] for r in rows if r["attribute"] in ("sex", "age_band"))
    claim, tripod = _by_item(guideline_items(ctx)["claim"]), _by_item(guideline_items(ctx)["tripod"])
    for row in (claim["30"], tripod["14"], tripod["23a"]):
        assert row["status"] == PARTLY and "no attribute has two groups" in row["where"], row
    # every group insufficient (hand-edited copy of the real context): still not filled
    none_ok = copy.deepcopy(ctx)
    for r in none_ok["subgroups"]["rows"]:
        r["ok"] = False
    assert _by_item(guideline_items(none_ok)["claim"])["30"]["status"] != FILLED


def test_lacking_run_asks_for_what_is_missing(run_copy: Path) -> None:
    """No evaluation, no saliency, sex and age blank: nothing that needs them is filled, and blanks are counted."""
    (run_copy / "evaluation.json").unlink()
    (run_copy / "predictions.csv").unlink(missing_ok=True)
    shutil.rmtree(run_copy / "saliency")
    manifest = pd.read_csv(run_copy / "manifest.csv", dtype=str, keep_default_na=False)
    n = len(manifest)
    manifest[["sex", "age", "age_band"]] = ""
    manifest.to_csv(run_copy / "manifest.csv", index=False)
    ctx = _context(run_copy)
    assert ctx["evaluation"] is None and not ctx["explain"]["present"]
    out = guideline_items(ctx)
    _assert_rows_well_formed(out)
    claim, tripod = _by_item(out["claim"]), _by_item(out["tripod"])
    # no evaluation: no metrics, no CIs, no internal or external testing, no subgroups, no fairness results
    for k in ("28", "29", "30", "32", "33", "37", "38"):
        assert claim[k]["status"] == PROVIDE and "medtransfer evaluate" in claim[k]["todo"], claim[k]
    for k in ("12e", "14", "20c", "23a"):
        assert tripod[k]["status"] == PROVIDE, tripod[k]
    # no saliency: explainability asks for 'medtransfer explain'
    assert claim["31"]["status"] == PROVIDE and Commands.for_run(run_copy).explain in claim["31"]["todo"]
    # demographics: sex and age not recorded -> partly, naming both
    assert claim["36"]["status"] == PARTLY and "sex and age" in claim["36"]["todo"]
    # missing data: the blanks actually found
    assert claim["12"]["status"] == PARTLY and f"sex unknown for {n} of {n} cases" in claim["12"]["where"]
    assert f"age_band unknown for {n} of {n} cases" in claim["12"]["where"]
    assert tripod["11"]["where"] == claim["12"]["where"]
    # what the run still has is still filled
    assert claim["19"]["status"] == claim["22"]["status"] == claim["23"]["status"] == FILLED


def test_explainability_needs_a_sanity_check(run_copy: Path) -> None:
    for path in (run_copy / "saliency").glob("sanity_*.csv"):
        path.unlink()
    row = _by_item(guideline_items(_context(run_copy))["claim"])["31"]
    assert row["status"] == PARTLY and "without a sanity check" in row["where"]


def test_external_evaluation_fills_external_testing(run_copy: Path, report_run: BuiltRun) -> None:
    result = mt.evaluate(run_copy, report_run.data_dir, n_boot=20)
    ctx = _context(run_copy, result)
    assert ctx["evaluation"]["external"]
    claim, tripod = _by_item(guideline_items(ctx)["claim"]), _by_item(guideline_items(ctx)["tripod"])
    assert claim["33"]["status"] == FILLED and f"{ctx['evaluation']['n_cases']} cases" in claim["33"]["where"]
    assert claim["32"]["status"] == PARTLY  # the internal test set is no longer what the report shows
    assert tripod["16"]["status"] == PARTLY and tripod["20c"]["status"] == PARTLY


# -- hand-made contexts for single rules ------------------------------------------------------------------
def _perf(value: str) -> dict[str, Any]:
    metrics = [(m, value) for m in ("AUROC", "Sensitivity", "Specificity", "PPV", "NPV")]
    return {"classes": [{"name": "pneumonia", "metrics": metrics, "calibration": {"ece": "0.050"}, "n": 50, "n_pos": 20}],
            "thresholds": []}


@pytest.mark.parametrize(("value", "status"), [("0.812 (0.701–0.903)", FILLED), ("0.812 (no CI)", PARTLY),
                                               ("not provided", PROVIDE)])
def test_confidence_intervals_count_only_when_finite(value: str, status: str) -> None:
    ctx = {"performance": _perf(value), "evaluation": {"ci": "95%", "n_boot": 1000, "external": False}}
    claim = _by_item(guideline_items(ctx)["claim"])
    assert claim["29"]["status"] == claim["37"]["status"] == status
    if status == FILLED:
        assert claim["29"]["where"] == "Performance: AUROC, sensitivity, specificity, PPV, NPV with 95% CIs (1000 patient-level bootstrap resamples)"


def test_leakage_and_intended_use_and_temperature() -> None:
    model = {"present": True, "backbone": "densenet121", "input": "CR", "temperature": "1.000",
             "population": {"modalities": "CR", "views": "PA", "ages": "20–80 years", "sexes": "F, M", "sites": "2: A, B"}}
    data = {"present": True, "splits": ["train", "test"], "counts": [("patients", [80, 20])], "leaked_patients": 3,
            "n_patients": 100}
    ctx = {"model": model, "data": data, "intended_use": "Triage of adult PA chest radiographs"}
    claim, tripod = _by_item(guideline_items(ctx)["claim"]), _by_item(guideline_items(ctx)["tripod"])
    assert claim["20"]["status"] == PARTLY and "3 of 100 patients" in claim["20"]["where"]
    assert tripod["3b"]["status"] == FILLED and "Triage of adult PA chest radiographs" in tripod["3b"]["where"]
    assert "no updating" in tripod["12f"]["where"]  # T = 1 is not recalibration
    # columns never recorded (no demographics rows, no ages) are named as such
    assert claim["12"]["status"] == PARTLY and "sex not recorded; age not recorded" in claim["12"]["where"]
    data["demographics"] = [{"attribute": "sex", "value": "F", "cells": ["40 (50%)", "10 (50%)"]},
                            {"attribute": "", "value": "M", "cells": ["38 (48%)", "10 (50%)"]},
                            {"attribute": "", "value": "unknown", "cells": ["2 (2%)", "0 (0%)"]}]
    data["counts"] = [("patients", [80, 20]), ("cases", [80, 20])]
    data["ages"] = ["61 (20–80)", "58 (22–79)"]
    claim = _by_item(guideline_items(ctx)["claim"])
    assert claim["12"]["where"] == "Intended use and data: sex unknown for 2 of 100 cases"
    assert claim["36"]["status"] == FILLED
    ctx["model"] = {**model, "temperature": "1.734"}
    assert "T = 1.734" in _by_item(guideline_items(ctx)["tripod"])["12f"]["where"]


# -- the template ------------------------------------------------------------------------------------------
def _env(loader: jinja2.BaseLoader) -> jinja2.Environment:
    return jinja2.Environment(loader=loader, undefined=jinja2.StrictUndefined, autoescape=True, trim_blocks=True,
                              lstrip_blocks=True)


def test_partial_renders_alone_and_escapes() -> None:
    ctx = {"intended_use": "<script>alert(1)</script>", "model": {"present": True, "population": {}}}
    guidelines = guideline_items(ctx)
    html = _env(jinja2.FileSystemLoader(str(TEMPLATES))).get_template("_guidelines.html.j2").render(guidelines=guidelines)
    assert html.count('id="checklist"') == 1 and 'aria-labelledby="checklist-h"' in html
    assert html.count('<th scope="row">') == 44 + 52
    c = guidelines["counts"]["claim"]
    assert f"{c['filled']} of 44 items filled by this report, {c['partly']} partly, {c['provide']} to provide" in html
    assert "light-grey" in html and "to provide" in html and "light-amber" in html
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_partial_renders_inside_the_report(run_copy: Path) -> None:
    """The rendered report carries the checklists once, under the contents' #checklist link."""
    html = render_report(run_copy, formats=["html"])["html"].read_text("utf-8")
    assert html.count('id="checklist"') == 1 and 'href="#checklist"' in html
    assert "Level at which partitions are disjoint" in html and "Heterogeneity across clusters" in html
