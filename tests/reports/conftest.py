"""A small evaluated and explained run directory, built once per session for the report tests.

Real files end to end: 40 DICOMs (48 px) whose PatientName and AccessionNumber carry the PHI canaries
(``tests.factories.write_dicom`` defaults), a 3-epoch EfficientNet-Lite0 fine-tune, an evaluation with 100
bootstrap resamples and Grad-CAM overlays for one case per class and kind.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

import medtransfer as mt
from tests.conftest import skip_or_fail
from tests.training.conftest import TINY_OVERRIDES, make_tiny_dataset


@dataclass(frozen=True)
class BuiltRun:
    """The run directory and the data folder it was trained on (for the PHI / path checks)."""

    run_dir: Path
    data_dir: Path


@pytest.fixture(scope="session")
def report_run(tmp_path_factory: pytest.TempPathFactory) -> BuiltRun:
    """Train, evaluate and explain a tiny run once (about 20 s on a CPU)."""
    from medtransfer.explain.run import explain_run

    root = tmp_path_factory.mktemp("report-run")
    data = make_tiny_dataset(root / "scans")
    run_dir = root / "run"
    mt.train(data, overrides=[*TINY_OVERRIDES, "train.strategy=linear-probe", "train.lr=0.01"], out=run_dir)
    mt.evaluate(run_dir, n_boot=100)
    explain_run(run_dir, method="gradcam", cases=1)
    return BuiltRun(run_dir=run_dir, data_dir=data)


@pytest.fixture()
def run_copy(report_run: BuiltRun, tmp_path: Path) -> Path:
    """A private copy of the run (tests may delete or edit files); checkpoints and caches left out."""
    dest = tmp_path / "run"
    shutil.copytree(report_run.run_dir, dest, ignore=shutil.ignore_patterns("checkpoints", "cache", "report.*"))
    return dest


def pdf_tools_or_skip() -> None:
    """Skip (with the reason; fail under CI=true) unless WeasyPrint imports and poppler's tools are installed."""
    try:
        import weasyprint  # noqa: F401
    except (ImportError, OSError) as exc:
        skip_or_fail(f"PDF checks need WeasyPrint (pip install 'medtransfer[pdf]') and pango: {exc}")
    for tool in ("pdftoppm", "pdftotext"):
        if shutil.which(tool) is None:
            skip_or_fail(f"PDF checks need poppler's {tool} (apt-get install poppler-utils)")


def pdf_text(pdf: Path) -> str:
    """The PDF's text via ``pdftotext`` (layout kept)."""
    return subprocess.run(["pdftotext", "-layout", str(pdf), "-"], check=True, capture_output=True,
                          text=True, timeout=120).stdout
