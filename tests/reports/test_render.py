"""render_report: outputs, missing pieces, no torch, speed, PDF pages, checks and redaction."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from medtransfer.commands import Commands
from medtransfer.errors import ConfigError, MissingDependency, RunDirError
from medtransfer.evaluation.result import EvaluationResult
from medtransfer.reports import render
from medtransfer.reports.context import NOT_PROVIDED, plain_config, with_ci
from medtransfer.reports.render import PdfUnavailable, render_report, scrub
from tests.conftest import on_ci
from tests.reports.conftest import BuiltRun, pdf_tools_or_skip

SECTION_IDS = ("facts", "data", "model", "performance", "subgroups", "explainability", "limitations", "checklist",
               "reproducibility")


def test_html_has_every_section_and_is_self_contained(run_copy: Path) -> None:
    out = render_report(run_copy, formats=["html"])
    assert out == {"html": run_copy / "report.html"}
    html = out["html"].read_text("utf-8")
    for sid in SECTION_IDS:
        assert f'id="{sid}"' in html, sid
    assert 'id="audit"' not in html  # the optional slot stays empty without audit.json
    assert "Research use only" in html
    # one self-contained file: no external resources
    assert 'src="http' not in html and "<link" not in html and 'src="file:' not in html
    assert html.count('src="data:image/png;base64,') >= 4  # curves, ROC/PR, reliability, forest, overlays
    assert not list(run_copy.glob(".tmp-*"))  # atomic writes leave nothing behind


def test_report_numbers_come_from_the_evaluation(run_copy: Path) -> None:
    result = EvaluationResult.load(run_copy)
    html = render_report(run_copy, formats=["html"])["html"].read_text("utf-8")
    row = result.overall.iloc[0]
    assert with_ci(row["auroc"], row["auroc_lo"], row["auroc_hi"]) in html
    assert with_ci(row["sensitivity"], row["sensitivity_lo"], row["sensitivity_hi"]) in html
    assert f"{result.calibration['ece'].iloc[0]:.3f}" in html
    pc = result.per_class.iloc[0]
    assert f"TP {int(pc['tp'])}" in html and f"FN {int(pc['fn'])}" in html


def test_render_from_a_result_object_to_another_folder(run_copy: Path, tmp_path: Path) -> None:
    result = EvaluationResult.load(run_copy)
    out = render_report(result, tmp_path / "elsewhere", formats=("html",))
    assert out["html"] == tmp_path / "elsewhere" / "report.html"
    assert 'id="model"' in out["html"].read_text("utf-8")
    with pytest.raises(RunDirError, match="never saved"):
        render_report(EvaluationResult(), formats=("html",))


def test_missing_saliency_and_evaluation_say_how_to_produce_them(run_copy: Path) -> None:
    import shutil

    shutil.rmtree(run_copy / "saliency")
    html = render_report(run_copy, formats=["html"])["html"].read_text("utf-8")
    cmds = Commands.for_run(run_copy)
    assert "Saliency maps: not provided" in html and cmds.explain in html
    (run_copy / "evaluation.json").unlink()
    html = render_report(run_copy, formats=["html"])["html"].read_text("utf-8")
    assert "Not evaluated" in html and cmds.evaluate in html
    assert "Performance: not provided" in html
    for sid in SECTION_IDS:
        assert f'id="{sid}"' in html, sid


def test_not_a_run_dir_and_unknown_format(tmp_path: Path, run_copy: Path) -> None:
    with pytest.raises(RunDirError, match="medtransfer train"):
        render_report(tmp_path, formats=["html"])
    with pytest.raises(RunDirError, match="not a folder"):
        render_report(tmp_path / "nope", formats=["html"])
    with pytest.raises(ConfigError, match="docx"):
        render_report(run_copy, formats=["html", "docx"])


def test_pdf_unavailable_still_writes_html(run_copy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def missing() -> None:
        raise MissingDependency('\'weasyprint\' is needed. Install it with: pip install "medtransfer[pdf]"')

    monkeypatch.setattr(render, "_weasyprint", missing)
    with pytest.raises(PdfUnavailable, match=r"medtransfer\[pdf\]") as info:
        render_report(run_copy, formats=["pdf"])
    assert info.value.outputs == {"html": run_copy / "report.html"}
    assert (run_copy / "report.html").is_file() and not (run_copy / "report.pdf").exists()


def test_audit_section_renders_from_the_audit_folder(run_copy: Path) -> None:
    from medtransfer.audit.transfer import summarise
    from tests.audit.test_audit import _cells

    audit = run_copy / "audit"
    audit.mkdir()
    summarise(*_cells(scratch=0.95, pretrained=0.80)).save(audit / "transfer.json")  # negative transfer
    (audit / "shortcuts.json").write_text(json.dumps({
        "probe": [{"attribute": "site", "n": 120, "balanced_accuracy": 0.97, "chance": 0.33, "flagged": True,
                   "status": "ok"}],
        "loso": [{"site": "Northside", "n_test": 40, "auroc_all_sites": 0.9, "all_lo": 0.8, "all_hi": 0.97,
                  "auroc_left_out": 0.84, "out_lo": 0.7, "out_hi": 0.93, "drop": 0.06, "drop_lo": 0.01,
                  "drop_hi": 0.14, "flagged": True, "status": "ok"}],
        "warnings": ["the site can be read from the features (probe warning text)"]}))
    html = render_report(run_copy, formats=["html"])["html"].read_text("utf-8")
    assert 'id="audit"' in html and "Does transfer help, and does it generalise?" in html
    assert "Negative transfer (strong)" in html  # the transfer warning, from transfer.json
    assert "probe warning text" in html and "Northside" in html and "0.97" in html
    assert "Test AUROC by fraction of training data" in html  # the learning-curve figure (alt text)


def test_leakage_and_quarantine_become_warnings(run_copy: Path) -> None:
    manifest = pd.read_csv(run_copy / "manifest.csv", dtype=str)
    test_row = manifest.index[manifest["split"] == "test"][0]
    train_key = manifest.loc[manifest["split"] == "train", "patient_key"].iloc[0]
    manifest.loc[test_row, "patient_key"] = train_key  # one patient now in train and test
    manifest.to_csv(run_copy / "manifest.csv", index=False)
    pd.DataFrame({"path": ["x/a.dcm", "x/b.dcm"], "problem": ["unreadable", "unreadable"],
                  "reason": ["r", "r"]}).to_csv(run_copy / "quarantine.csv", index=False)
    html = render_report(run_copy, formats=["html"])["html"].read_text("utf-8")
    assert "Patient leakage." in html and "1 patient(s) appear in more than one split" in html
    assert "Files quarantined." in html and "unreadable: 2" in html
    assert "x/a.dcm" not in html  # counts only, never the paths


def test_config_paths_are_reduced_to_names() -> None:
    cfg = {"data": {"data_dir": "/secure/site/cxr", "labels": "C:\\data\\labels.csv", "seed": 0},
           "model": {"weights": "imagenet"}}
    assert plain_config(cfg) == {"data": {"data_dir": "<cxr>", "labels": "<labels.csv>", "seed": 0},
                                 "model": {"weights": "imagenet"}}
    text = "see /secure/site/cxr/a.dcm; data:image/png;base64,AB/secure/site/cxrCD="
    assert scrub(text, ["/secure/site/cxr"]) == "see cxr/a.dcm; data:image/png;base64,AB/secure/site/cxrCD="
    assert with_ci(float("nan"), 0.1, 0.2) == NOT_PROVIDED


#: CPU seconds a re-render in a fresh process may take (imports included), by formats. Measured on the project's
#: 2-core machine while other test runs kept it at load 5-7 (9 runs): html 1.75-2.0 s, html+pdf 3.65-4.6 s CPU
#: (wall 2-5 s and 5-11 s). The bounds are ~2.5x the typical figure: a 3x slower renderer trips them, while a CI
#: machine ~1.5x slower per core on top of the contention seen here stays under. CPU time, not wall time: a
#: loaded machine stretches wall time by its load (up to ~3x here) but the render's CPU time only by ~1.25x.
RERENDER_CPU_BOUND = {"html": 5.0, "html+pdf": 10.0}
#: Wall-clock safety net for what CPU time cannot see (waiting: a network fetch, a lock): ~3x the loaded figure.
RERENDER_WALL_BOUND = 30.0


def test_rerender_does_not_import_torch_and_is_fast(report_run: BuiltRun, tmp_path: Path) -> None:
    formats = ["html", "pdf"] if _weasyprint_ok() else ["html"]
    code = ("import sys, time; t = time.perf_counter(); c = time.process_time(); "
            "from medtransfer.reports.render import render_report; "
            f"render_report({str(report_run.run_dir)!r}, {str(tmp_path)!r}, formats={formats!r}); "
            "print(round(time.perf_counter() - t, 2), round(time.process_time() - c, 2)); "
            "bad = [m for m in ('torch', 'monai', 'captum') if m in sys.modules]; assert not bad, bad")
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]
    wall, cpu = map(float, proc.stdout.strip().splitlines()[-1].split())
    kind = "+".join(formats)
    print(f"re-render ({kind}) in a fresh process: {wall:.1f} s wall, {cpu:.1f} s CPU "
          f"(process wall {time.perf_counter() - started:.1f} s)")
    assert cpu < RERENDER_CPU_BOUND[kind], f"rendering {kind} used {cpu:.1f} s of CPU (bound {RERENDER_CPU_BOUND[kind]} s)"
    assert wall < RERENDER_WALL_BOUND, f"rendering {kind} took {wall:.1f} s wall, {cpu:.1f} s CPU: waiting on something?"
    for fmt in formats:
        assert (tmp_path / f"report.{fmt}").stat().st_size > 10_000


def test_pdf_pages_are_numbered_and_not_blank(report_run: BuiltRun, tmp_path: Path) -> None:
    pdf_tools_or_skip()
    pdf = render_report(report_run.run_dir, tmp_path, formats=["pdf"])["pdf"]
    assert pdf == tmp_path / "report.pdf" and not (tmp_path / "report.html").exists()
    subprocess.run(["pdftoppm", "-r", "40", "-png", str(pdf), str(tmp_path / "page")], check=True, timeout=120)
    pages = sorted(tmp_path.glob("page-*.png"))
    assert len(pages) >= 3, f"only {len(pages)} page(s)"
    for page in pages:
        grey = np.asarray(Image.open(page).convert("L"), dtype=float)
        body = grey[: int(0.9 * len(grey))]  # every page has the footer; the body must have content too
        assert body.std() > 5 and (body < 250).mean() > 0.005, f"{page.name} looks blank"
    from tests.reports.conftest import pdf_text

    text = pdf_text(pdf)
    assert f"Page 1 of {len(pages)}" in text and "Model Facts" in text


def _weasyprint_ok() -> bool:
    """Whether the PDF can be made here; on CI (which installs WeasyPrint and pango) its absence fails."""
    try:
        import weasyprint  # noqa: F401
    except (ImportError, OSError) as exc:
        if on_ci():
            pytest.fail(f"WeasyPrint or pango is missing on CI ({exc}); .ci/run installs them")
        return False
    return True
