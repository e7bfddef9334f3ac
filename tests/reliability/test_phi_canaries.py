"""Item 6: PHI canaries end to end.

The pipeline (``conftest.pipeline``: index -> train -> evaluate -> explain -> report through the CLI, with
``--verbose`` logs captured) runs on DICOMs whose PatientName, PatientID, PatientBirthDate, AccessionNumber,
InstitutionAddress and file names carry canaries. No output file and no log line may hold one, except the
documented ``path`` (and series ``files``) columns of manifest.csv / predictions.csv / quarantine.csv, where
the file name is there by design (DESIGN.md §4, Privacy).
"""

from __future__ import annotations

import base64
import csv
import io
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import skip_or_fail
from tests.reliability.conftest import FILE_CANARY, PHI_CANARIES, Pipeline

pytestmark = pytest.mark.slow

#: file name -> the columns allowed to name files
PATH_COLUMNS = {"manifest.csv": {"path", "files"}, "predictions.csv": {"path"}, "quarantine.csv": {"path"}}
_DATA_URI = re.compile(rb"data:image/png;base64,([A-Za-z0-9+/=]+)")


def _hits(text: str | bytes) -> list[str]:
    low = text.lower() if isinstance(text, str) else text.lower().decode("latin-1")
    return [c for c in PHI_CANARIES if c.lower() in low]


def _png_metadata(data: bytes) -> str:
    with Image.open(io.BytesIO(data)) as im:
        return " ".join(f"{k}={v}" for k, v in im.info.items() if isinstance(v, (str, bytes)))


def _leaks(path: Path) -> list[str]:
    """Canaries found in one output file, outside the columns allowed to name files."""
    raw = path.read_bytes()
    found: list[str] = []
    if path.suffix == ".csv":
        allowed = PATH_COLUMNS.get(path.name, set())
        rows = list(csv.reader(io.StringIO(raw.decode("utf-8"))))
        header = rows[0] if rows else []
        found += _hits(",".join(header))
        for row in rows[1:]:
            found += [h for col, cell in zip(header, row, strict=True) if col not in allowed for h in _hits(cell)]
        return found
    if path.suffix == ".png":
        found += _hits(_png_metadata(raw))
    if path.suffix == ".html":
        for match in _DATA_URI.finditer(raw):  # figures embedded as base64: their PNG metadata too
            found += _hits(_png_metadata(base64.b64decode(match.group(1))))
        raw = _DATA_URI.sub(b"", raw)  # base64 text can spell anything by chance
    if path.suffix == ".pdf" and shutil.which("pdftotext"):
        text = subprocess.run(["pdftotext", str(path), "-"], capture_output=True, text=True, check=True).stdout
        found += _hits(text) + _hits(" ".join(text.split()))
    return found + _hits(raw)


def _outputs(p: Pipeline) -> list[Path]:
    return sorted(f for root in (p.index, p.run, p.logs) for f in root.rglob("*") if f.is_file())


def test_the_canaries_are_in_the_inputs_and_the_check_can_see_them(pipeline: Pipeline) -> None:
    """A control: the canaries really are in the DICOMs, and the file-name canary where it is allowed."""
    raw = next(pipeline.data.rglob("*.dcm")).read_bytes()
    for needle in (b"CANARYNAME", b"CANARYPID", b"19010203", b"CANARYACC", b"CANARYSTREET"):
        assert needle in raw
    manifest = (pipeline.run / "manifest.csv").read_text(encoding="utf-8")
    assert FILE_CANARY in manifest
    assert _leaks(pipeline.run / "manifest.csv") == []  # ... and only in the path column
    # the checker itself finds a canary outside an allowed column
    probe = pipeline.run.parent / "probe.csv"
    probe.write_text("case_id,path\nCANARYPID9,a.dcm\n", encoding="utf-8")
    try:
        assert _leaks(probe)
    finally:
        probe.unlink()


def test_every_expected_output_was_produced(pipeline: Pipeline) -> None:
    names = {p.name for p in _outputs(pipeline)}
    expected = {"manifest.csv", "quarantine.csv", "summary.json", "manifest.json", "config.yaml", "history.csv",
                "model.safetensors", "model_card.json", "predictions.csv", "evaluation.json", "index.csv",
                "report.html", "report.pdf", "train.stderr", "evaluate.stdout", "explain.stderr"}
    assert expected <= names, expected - names
    assert any(p.suffix == ".png" for p in (pipeline.run / "saliency").rglob("*.png"))


def test_no_output_or_log_holds_a_canary(pipeline: Pipeline) -> None:
    if shutil.which("pdftotext") is None:  # the PDF's raw bytes are still searched; its text is compressed
        skip_or_fail("pdftotext (poppler-utils) is not installed: the PDF text cannot be extracted "
                     "(apt-get install poppler-utils)")
    leaks = {str(f.relative_to(f.parents[1])): hits for f in _outputs(pipeline) if (hits := _leaks(f))}
    assert not leaks, f"PHI canaries found: {leaks}"


def test_logs_are_not_empty(pipeline: Pipeline) -> None:
    """The logs were really captured at INFO level (else the check above would be vacuous)."""
    text = "".join(f.read_text(encoding="utf-8") for f in pipeline.logs.iterdir())
    assert "INFO medtransfer" in text
    assert "wrote" in text
