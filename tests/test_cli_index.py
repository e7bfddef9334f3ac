"""``medtransfer index`` in-process (typer's CliRunner): summary printed, files written, user errors as one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from typer.testing import CliRunner

from medtransfer.cli import app
from tests.factories import chest_like, write_dicom

runner = CliRunner()


def _data(root: Path) -> Path:
    for p in range(6):
        cls = "pneumonia" if p % 2 else "normal"
        write_dicom(root / cls / f"p{p}.dcm", chest_like(16, seed=p), patient_id=f"PAT{p}",
                    sex="MF"[p % 2], age=f"0{20 + 10 * p}Y")
    (root / "normal" / "broken.dcm").write_bytes(b"")
    return root


def test_index_prints_the_summary_and_writes_manifest_and_quarantine(tmp_path: Path) -> None:
    data = _data(tmp_path / "data")
    out = tmp_path / "out"
    result = runner.invoke(app, ["index", str(data), "--out", str(out), "--set", "data.seed=2"])
    assert result.exit_code == 0, result.output
    for text in ("6 cases from 6 patients", "normal", "pneumonia", "patients", "age_band", "quarantined: 1",
                 "manifest.csv"):
        assert text in result.stdout
    manifest = pd.read_csv(out / "manifest.csv")
    assert len(manifest) == 6 and set(manifest["split"]) == {"train", "val", "test"}
    quarantine = pd.read_csv(out / "quarantine.csv")
    assert quarantine["path"].tolist() == ["normal/broken.dcm"]
    assert (out / "summary.json").is_file() and (out / "manifest.json").is_file()


def test_index_with_labels_csv_and_quiet(tmp_path: Path) -> None:
    data = tmp_path / "data"
    for i in range(4):
        write_dicom(data / f"{i}.dcm", chest_like(16, seed=i), patient_id=f"P{i}")
    csv = tmp_path / "labels.csv"
    csv.write_text("path,effusion,mass\n0.dcm,1,0\n1.dcm,0,1\n2.dcm,,1\n3.dcm,1,\n")
    result = runner.invoke(app, ["--quiet", "index", str(data), "--labels", str(csv), "--label-columns",
                                 "effusion, mass", "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "multilabel" in result.stdout
    assert list(pd.read_csv(tmp_path / "out" / "manifest.csv").columns[6:8]) == ["effusion", "mass"]


def test_bad_path_exits_1_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    result = runner.invoke(app, ["index", str(tmp_path / "missing"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "data folder not found" in lines[0] and "ManifestError" in lines[0]
    assert "Traceback" not in result.output


def test_bad_labels_csv_exits_1_naming_the_row(tmp_path: Path) -> None:
    data = tmp_path / "data"
    write_dicom(data / "a.dcm", chest_like(16))
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\na.dcm,x\n../../etc/passwd,y\n")
    result = runner.invoke(app, ["index", str(data), "--labels", str(csv), "--out", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert "row 2 (line 3)" in result.stderr and "outside the data folder" in result.stderr
    assert "Traceback" not in result.output
    assert np.isscalar(result.exit_code)


def _unlabelled(root: Path) -> Path:
    """A folder of DICOM files as an export leaves it: no class sub-folders, no labels CSV."""
    for p in range(3):
        write_dicom(root / f"IM{p}.dcm", chest_like(16, seed=p), patient_id=f"PAT{p}", sex="MF"[p % 2],
                    age=f"0{30 + 10 * p}Y", modality="DX" if p else "CR", view="PA")
    (root / "broken.dcm").write_bytes(b"\0" * 128 + b"DICM")  # a header and nothing else
    return root


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def test_index_inventories_a_folder_without_labels(tmp_path: Path) -> None:
    data = _unlabelled(tmp_path / "data")
    out = tmp_path / "out"
    result = runner.invoke(app, ["--quiet", "index", str(data), "--out", str(out)])
    assert result.exit_code == 0, result.output
    text = " ".join(result.stdout.split())  # rich wraps table cells
    for expected in ("3 cases (3 files) from 3 patients", "no labels (inventory)", "what was found",
                     "2D image (3)", "16x16 (3)", "DX (2), CR (1)", "F (1)", "M (2)", "quarantined: 1",
                     "Training needs at least two classes", "summary.json"):
        assert expected in text, expected
    manifest = pd.read_csv(out / "manifest.csv")
    assert len(manifest) == 3 and not {"label", "split"} & set(manifest.columns)
    assert pd.read_csv(out / "quarantine.csv")["path"].tolist() == ["broken.dcm"]
    assert json.loads((out / "summary.json").read_text())["task"] == "unlabelled"


def test_train_refuses_a_folder_without_labels_and_leaves_it_untouched(tmp_path: Path) -> None:
    data = _unlabelled(tmp_path / "data")
    before = _snapshot(data)
    result = runner.invoke(app, ["--quiet", "train", str(data), "--out", str(tmp_path / "run"),
                                 "--set", "input.size=[32, 32]"])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "need at least two classes to train a classifier" in lines[0], lines
    assert "Traceback" not in result.output
    assert _snapshot(data) == before
