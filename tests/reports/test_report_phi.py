"""PHI canaries: DICOM names/IDs/accession numbers and the data folder's absolute path never reach a report."""

from __future__ import annotations

import re
from pathlib import Path

from medtransfer.reports.render import render_report
from tests.factories import CANARIES
from tests.reports.conftest import BuiltRun, pdf_text, pdf_tools_or_skip

#: write_dicom also stores this institution address.
FORBIDDEN = (*CANARIES, "CANARYSTREET")


def _text_only(html: str) -> str:
    """The HTML without embedded images (base64 can hold '/root' or a canary-like run of letters by chance)."""
    return re.sub(r"data:image/[a-z]+;base64,[A-Za-z0-9+/=]+", "", html)


def _forbidden(run: BuiltRun) -> list[str]:
    data = run.data_dir.resolve()
    return [*FORBIDDEN, str(data), str(run.data_dir), str(run.run_dir.resolve()), str(Path.home())]


def test_canaries_are_in_the_source_dicoms(report_run: BuiltRun) -> None:
    """The check below means something only if the canaries are really in the scans."""
    raw = next(report_run.data_dir.rglob("*.dcm")).read_bytes()
    assert b"CANARYNAME" in raw and b"CANARYACC4471" in raw


def test_html_has_no_phi_or_absolute_paths(report_run: BuiltRun, tmp_path: Path) -> None:
    html = _text_only(render_report(report_run.run_dir, tmp_path, formats=["html"])["html"].read_text("utf-8"))
    # the config.yaml holds the absolute data path: make sure the test would catch it
    assert str(report_run.data_dir) in (report_run.run_dir / "config.yaml").read_text()
    found = [s for s in _forbidden(report_run) if s.lower() in html.lower()]
    assert not found, f"found in report.html: {found}"
    assert "&lt;scans&gt;" in html or "<scans>" in html  # the folder shows by name only


def test_pdf_text_has_no_phi_or_absolute_paths(report_run: BuiltRun, tmp_path: Path) -> None:
    pdf_tools_or_skip()
    pdf = render_report(report_run.run_dir, tmp_path, formats=["pdf"])["pdf"]
    text = pdf_text(pdf)
    assert "Model Facts" in text
    flat = " ".join(text.split()).lower()
    found = [s for s in _forbidden(report_run) if s.lower() in text.lower() or s.lower() in flat]
    assert not found, f"found in report.pdf: {found}"


def test_saliency_pngs_are_embedded_not_linked(report_run: BuiltRun, tmp_path: Path) -> None:
    html = _text_only(render_report(report_run.run_dir, tmp_path, formats=["html"])["html"].read_text("utf-8"))
    assert "saliency/" not in html and "gradcam/" not in html  # no file references, pseudonymous IDs only
