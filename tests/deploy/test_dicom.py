"""DICOM outputs of ``medtransfer predict --dicom-out`` on a tiny 2D DICOM run (48 px chest-like radiographs).

Read back with pydicom and highdicom, checked with dciodvfy (dicom3tools): the SR, the heat-map SCs and the PDF
sheet are filed into the source studies (same Patient/Study attributes, new series and instances, references to
the sources, nothing identifying that the source lacked); PNG/NIfTI inputs get the reason and the CSV; the CSV
and the logs of the run carry no PHI (canaries) although the DICOM outputs carry the source's identifiers.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import highdicom as hd  # the dev extra installs it (dicom-out): a missing one fails, never skips
import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.uid import generate_uid
from typer.testing import CliRunner

import medtransfer as mt
from medtransfer.cli import app
from medtransfer.data.privacy import PHI_ATTRIBUTES
from medtransfer.deploy import dicom as dicom_out
from medtransfer.errors import ConfigError
from medtransfer.run_dir import Run
from tests.conftest import skip_or_fail
from tests.factories import CANARIES, CANARY_NAME, chest_like, write_dicom, write_nifti, write_png
from tests.training.conftest import TINY_OVERRIDES, make_tiny_dataset

SIZE = 48


# -- helpers shared with test_dicom_volumes.py ------------------------------------------------------------------
def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's "Error" lines for one file (warnings are allowed); skips (fails on CI) without dicom3tools."""
    if not shutil.which("dciodvfy"):
        skip_or_fail("dciodvfy is not installed (Debian/Ubuntu: apt-get install dicom3tools)")
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


def study_files(folder: Path) -> dict[str, Any]:
    """SR, SHEET and HEATMAP files of one study folder, read back with pydicom (SR also with highdicom)."""
    names = sorted(p.name for p in folder.iterdir())
    assert "SR.dcm" in names and "SHEET.dcm" in names, names
    return {"sr": hd.sr.srread(folder / "SR.dcm"), "sheet": pydicom.dcmread(folder / "SHEET.dcm"),
            "heatmaps": [pydicom.dcmread(folder / n) for n in names if n.startswith("HEATMAP-")],
            "paths": [folder / n for n in names]}


def check_filed_into(objects: list[Any], sources: list[pydicom.Dataset]) -> None:
    """Same Patient/Study attributes as the source, new series and instances, no identifying value the source
    did not have (absent or empty where it lacks one)."""
    src = sources[0]
    source_uids = {str(s.SOPInstanceUID) for s in sources} | {str(s.SeriesInstanceUID) for s in sources}
    for ds in objects:
        assert ds.StudyInstanceUID == src.StudyInstanceUID
        assert ds.PatientID == src.PatientID and str(ds.PatientName) == str(src.PatientName)
        assert str(ds.SeriesInstanceUID) not in source_uids and str(ds.SOPInstanceUID) not in source_uids
        assert ds.Manufacturer == "medtransfer" and ds.SoftwareVersions == mt.__version__
        for keyword in (*PHI_ATTRIBUTES, "PatientSex", "PatientAge", "StudyDate", "StudyTime"):
            value = str(ds.get(keyword, "") or "")
            assert value in ("", str(src.get(keyword, "") or "")), keyword
            if keyword not in src:
                assert not value, f"{keyword} is not in the source but has a value in the output"
    assert len({str(ds.SOPInstanceUID) for ds in objects}) == len(objects)


def sr_groups(sr: Any) -> dict[str, dict[str, Any]]:
    """Measurement groups of the SR by tracking identifier: probability, threshold, decision, finding, sources."""
    out = {}
    for g in sr.content.get_image_measurement_groups():
        values = {m.name.meaning: float(m.value) for m in g.get_measurements()}
        (qual,) = g.get_qualitative_evaluations()
        refs = [item.referenced_sop_instance_uid for item in g.source_images]
        out[g.tracking_identifier] = {"p": values["Probability"], "threshold": values.get("Threshold Value"),
                                      "decision": qual.value.meaning, "finding": g.finding_type.meaning,
                                      "scheme": g.finding_type.scheme_designator, "sources": refs}
    return out


def sr_texts(item: Any) -> list[str]:
    """Every TEXT value of an SR content tree."""
    out = [str(item.TextValue)] if "TextValue" in item else []
    for child in item.get("ContentSequence", []):
        out += sr_texts(child)
    return out


def evidence_uids(ds: Any) -> set[str]:
    return {str(r.ReferencedSOPInstanceUID) for s in ds.CurrentRequestedProcedureEvidenceSequence
            for series in s.ReferencedSeriesSequence for r in series.ReferencedSOPSequence}


def pdf_text(ds: pydicom.Dataset, tmp_path: Path) -> str:
    doc = bytes(ds.EncapsulatedDocument)[:int(ds.EncapsulatedDocumentLength)]
    assert doc.startswith(b"%PDF") and ds.MIMETypeOfEncapsulatedDocument == "application/pdf"
    if not shutil.which("pdftotext"):
        skip_or_fail("pdftotext (poppler-utils) is not installed: the sheet's text cannot be read")
    path = tmp_path / f"{ds.SOPInstanceUID}.pdf"
    path.write_bytes(doc)
    return subprocess.run(["pdftotext", "-layout", str(path), "-"], capture_output=True, text=True,
                          check=True).stdout


# -- fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    root = tmp_path_factory.mktemp("dicom-out-run")
    data = make_tiny_dataset(root / "data", n_per_class=8)
    return mt.train(data, overrides=[*TINY_OVERRIDES, "train.strategy=linear-probe", "train.epochs=2"],
                    out=root / "run")


def _image(seed: int, blob: bool) -> np.ndarray:
    img = chest_like(SIZE, seed=seed).astype(np.float64)
    if blob:
        yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
        img += 1800 * np.exp(-(((xx - 0.33) ** 2 + (yy - 0.45) ** 2) / (2 * 0.06**2)))
    return np.clip(img, 0, 4095).astype(np.uint16)


@pytest.fixture(scope="module")
def new_scans(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Study A: two radiographs of one patient (canary identifiers); study B: one radiograph without a birth
    date; plus a PNG, a 2D NIfTI and a broken file."""
    root = tmp_path_factory.mktemp("new-scans") / "ward"
    study_a, study_b, series_a = generate_uid(), generate_uid(), generate_uid()
    files = {
        "a1": write_dicom(root / "a1.dcm", _image(1, True), study_uid=study_a, series_uid=series_a, instance=1,
                          StudyID="A1", StudyTime="101500", SeriesNumber=3, PatientOrientation=["L", "F"]),
        "a2": write_dicom(root / "a2.dcm", _image(2, False), study_uid=study_a, series_uid=series_a, instance=2,
                          StudyID="A1", StudyTime="101500", SeriesNumber=3, PatientOrientation=["L", "F"]),
        "b1": write_dicom(root / "b1.dcm", _image(3, True), study_uid=study_b, patient_id="OTHERPATIENT7",
                          StudyID="B1", StudyTime="111500", SeriesNumber=1),
    }
    ds = pydicom.dcmread(files["b1"])
    del ds.PatientBirthDate  # an attribute the source lacks must not appear in the outputs
    ds.save_as(files["b1"], enforce_file_format=True)
    write_png(root / "photo.png", (chest_like(SIZE, seed=4) // 16).astype(np.uint8))
    write_nifti(root / "slice.nii.gz", chest_like(SIZE, seed=5).astype(np.float32)[:, :, None])
    (root / "broken.dcm").write_bytes(b"DICM not really")
    return {"root": root, "files": files, "studies": {"a": study_a, "b": study_b}}


@pytest.fixture(scope="module")
def cli_result(run: Run, new_scans: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """``medtransfer -v predict RUN ward/ --out preds.csv --dicom-out dicom/`` once for the module."""
    tmp = tmp_path_factory.mktemp("dicom-out")
    out = tmp / "dicom"
    result = CliRunner().invoke(app, ["-v", "predict", str(run.path), str(new_scans["root"]), "--out",
                                      str(tmp / "preds.csv"), "--dicom-out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp / "preds.csv", keep_default_na=False)
    return {"out": out, "table": table, "csv": (tmp / "preds.csv").read_text(), "output": result.output,
            "tmp": tmp}


# -- tests ------------------------------------------------------------------------------------------------------
def test_each_study_gets_an_sr_a_heatmap_per_image_and_a_pdf_sheet(run: Run, new_scans: dict[str, Any],
                                                                  cli_result: dict[str, Any]) -> None:
    table = cli_result["table"].set_index(cli_result["table"]["file"].map(lambda f: Path(f).name))
    folders = table.loc[["a1.dcm", "a2.dcm", "b1.dcm"], "dicom_out"]
    assert folders["a1.dcm"] == folders["a2.dcm"] != folders["b1.dcm"] and folders.str.startswith("study-").all()
    assert sorted(p.name for p in cli_result["out"].iterdir()) == sorted(set(folders))
    assert (table.loc[["a1.dcm", "a2.dcm", "b1.dcm"], "dicom_note"] == "").all()
    for study, names in (("a", ["a1", "a2"]), ("b", ["b1"])):
        sources = [pydicom.dcmread(new_scans["files"][n]) for n in names]
        got = study_files(cli_result["out"] / folders[f"{names[0]}.dcm"])
        check_filed_into([got["sr"], got["sheet"], *got["heatmaps"]], sources)
        assert got["sr"].SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
        assert got["sheet"].SOPClassUID == dicom_out.ENCAPSULATED_PDF_STORAGE and got["sheet"].Modality == "DOC"
        assert evidence_uids(got["sr"]) == {str(s.SOPInstanceUID) for s in sources}
        assert {str(r.ReferencedSOPInstanceUID) for r in got["sheet"].SourceInstanceSequence} == {
            str(s.SOPInstanceUID) for s in sources}
        # one heat map per image, each referencing its own source image
        assert len(got["heatmaps"]) == len(sources)
        assert sorted(str(sc.SourceImageSequence[0].ReferencedSOPInstanceUID) for sc in got["heatmaps"]) == sorted(
            str(s.SOPInstanceUID) for s in sources)
        for path in got["paths"]:
            assert dciodvfy_errors(path) == [], path.name
        if study == "b":  # the source has no birth date: no output has one
            assert "PatientBirthDate" not in sources[0]
            assert not any(ds.get("PatientBirthDate") for ds in [got["sr"], got["sheet"], *got["heatmaps"]])


def test_sr_holds_the_csv_probabilities_decisions_and_operating_point(run: Run, new_scans: dict[str, Any],
                                                                     cli_result: dict[str, Any]) -> None:
    table = cli_result["table"]
    threshold = run.card.thresholds["pneumonia"]
    for folder, rows in table[table["dicom_out"] != ""].groupby("dicom_out"):
        got = study_files(cli_result["out"] / folder)
        groups = sr_groups(got["sr"])
        assert set(groups) == {f"{c} pneumonia" for c in rows["case_id"]}
        for _, row in rows.iterrows():
            g = groups[f"{row['case_id']} pneumonia"]
            assert g["p"] == pytest.approx(float(row["p_pneumonia"]), abs=1e-9)
            assert g["threshold"] == pytest.approx(threshold, abs=1e-9)
            assert g["decision"] == ("Present" if int(row["pred_pneumonia"]) == 1 else "Absent")
            assert g["finding"] == "pneumonia" and g["scheme"] == dicom_out.CODING_SCHEME
            source = pydicom.dcmread(row["file"], stop_before_pixels=True)
            assert g["sources"] == [str(source.SOPInstanceUID)]
        sr = got["sr"]
        assert [i.CodingSchemeDesignator for i in sr.CodingSchemeIdentificationSequence] == [dicom_out.CODING_SCHEME]
        assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE"
        observer = {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in sr.ContentSequence}
        assert observer["Observer Type"].ConceptCodeSequence[0].CodeMeaning == "Device"
        assert "NOT FOR CLINICAL USE" in observer["Comment"].TextValue
        text = " ".join(sr_texts(sr))
        card_sha = dicom_out.sha256_file(run.path / "model_card.json")
        assert card_sha in text and f"medtransfer {mt.__version__}" in text


def test_heatmaps_are_colour_secondary_captures_with_burned_in_warning(run: Run, cli_result: dict[str, Any],
                                                                      new_scans: dict[str, Any]) -> None:
    coloured = 0
    for folder in cli_result["out"].iterdir():
        for sc in study_files(folder)["heatmaps"]:
            assert sc.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and sc.Modality == "OT"
            assert sc.BurnedInAnnotation == "YES" and sc.PhotometricInterpretation == "RGB"
            assert "NOT FOR CLINICAL USE" in sc.ImageComments and sc.ImageType[:2] == ["DERIVED", "SECONDARY"]
            px = sc.pixel_array
            assert px.shape[2] == 3 and max(px.shape[:2]) >= dicom_out.SC_MIN_SIDE
            band = round(max(12, round(px.shape[1] * 0.032)) * 1.8)
            top = px[:band]
            yellow = (top[..., 0] > 200) & (top[..., 1] > 180) & (top[..., 2] < 80)
            assert yellow.sum() > 50  # the burned-in warning
            image = px[band:-band].astype(int)
            path = next(p for p in new_scans["files"].values() if pydicom.dcmread(
                p, stop_before_pixels=True).SOPInstanceUID == sc.SourceImageSequence[0].ReferencedSOPInstanceUID)
            source = pydicom.dcmread(path)
            # colour where the model's Grad-CAM map (recomputed here) has evidence; grey where it is empty
            sal = mt.explain(run, mt.data.dataset.preprocess(path, run.card.input)[None]).maps[0, 0]
            colour = (np.abs(image[..., 0] - image[..., 2]) > 30).mean()
            assert colour > 0.01 if sal.max() > 0 else colour == 0 and "empty map" in sc.ImageComments
            coloured += colour > 0.01
            scale = image.shape[0] / source.Rows
            assert image.shape[:2] == (round(source.Rows * scale), round(source.Columns * scale))
            assert float(sc.PixelSpacing[0]) == pytest.approx(float(source.PixelSpacing[0]) / scale, rel=1e-3)
            assert list(sc.PatientOrientation) == list(source.get("PatientOrientation", [])) or (
                "PatientOrientation" not in source and not sc.PatientOrientation)
    assert coloured >= 1  # the scans with an opacity have a map


def test_pdf_sheet_lists_probabilities_decisions_and_the_warning(run: Run, cli_result: dict[str, Any]) -> None:
    table = cli_result["table"]
    for folder, rows in table[table["dicom_out"] != ""].groupby("dicom_out"):
        sheet = study_files(cli_result["out"] / folder)["sheet"]
        assert sheet.BurnedInAnnotation == "NO" and "NOT FOR CLINICAL USE" in sheet.DocumentTitle
        text = pdf_text(sheet, cli_result["tmp"])
        assert "NOT FOR CLINICAL USE" in text and f"medtransfer {mt.__version__}" in text
        assert f"{run.card.thresholds['pneumonia']:.3f}" in text
        for _, row in rows.iterrows():
            line = next(line for line in text.splitlines() if row["case_id"] in line)
            assert f"{float(row['p_pneumonia']):.3f}" in line
            assert ("present" if int(row["pred_pneumonia"]) == 1 else "absent") in line
        assert not any(c in text for c in CANARIES)  # the sheet names no patient (BurnedInAnnotation NO)


def test_non_dicom_and_unreadable_inputs_get_a_reason_and_stay_in_the_csv(cli_result: dict[str, Any]) -> None:
    table = cli_result["table"].set_index(cli_result["table"]["file"].map(lambda f: Path(f).name))
    for name in ("photo.png", "slice.nii.gz"):
        assert table.loc[name, "error"] == "" and 0 <= float(table.loc[name, "p_pneumonia"]) <= 1
        assert table.loc[name, "dicom_out"] == "" and "no DICOM study" in table.loc[name, "dicom_note"]
    assert table.loc["broken.dcm", "error"] and table.loc["broken.dcm", "dicom_note"] == dicom_out.NOT_SCORED
    assert "no DICOM study to file its results into" in cli_result["output"]
    assert "DICOM outputs (NOT FOR CLINICAL USE) for 3 case(s) in 2 study folder(s)" in cli_result["output"]


def test_png_only_input_says_why_and_still_writes_the_csv(run: Run, tmp_path: Path) -> None:
    png = write_png(tmp_path / "scans" / "one.png", (chest_like(SIZE, seed=7) // 16).astype(np.uint8))
    result = CliRunner().invoke(app, ["predict", str(run.path), str(png), "--out", str(tmp_path / "p.csv"),
                                      "--dicom-out", str(tmp_path / "dicom"), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "not a DICOM input (PNG, JPEG or NIfTI): there is no DICOM study" in result.output
    assert "for 0 case(s) in 0 study folder(s)" in result.output
    table = pd.read_csv(tmp_path / "p.csv", keep_default_na=False)
    assert len(table) == 1 and table["dicom_out"].tolist() == [""] and table["p_pneumonia"].between(0, 1).all()
    assert not (tmp_path / "dicom").exists() or not any((tmp_path / "dicom").iterdir())


def test_csv_and_logs_carry_no_phi_but_the_dicom_outputs_carry_the_sources_identifiers(
        new_scans: dict[str, Any], cli_result: dict[str, Any]) -> None:
    uids = [*new_scans["studies"].values(), *[str(pydicom.dcmread(f).SOPInstanceUID)
                                                for f in new_scans["files"].values()]]
    for text in (cli_result["csv"], cli_result["output"]):
        assert not [c for c in (*CANARIES, "OTHERPATIENT7", *uids) if c in text]
    assert "INFO" in cli_result["output"]  # the verbose logs were captured
    # the clinical records do carry them: they are filed into the patient's study
    sr = study_files(next(cli_result["out"].iterdir()))["sr"]
    assert CANARY_NAME in str(sr.PatientName) or "OTHERPATIENT7" == sr.PatientID


def test_a_case_or_study_that_fails_does_not_stop_the_others(run: Run, new_scans: dict[str, Any],
                                                             tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Study B's SR fails (nothing of B is written), case a2's heat map fails (A is written without it); the
    notes give the exception type only, never its message (which may quote header values)."""
    table = run.predict([new_scans["root"]])
    real_sr, real_maps = dicom_out._structured_report, dicom_out._heatmaps
    a2 = str(pydicom.dcmread(new_scans["files"]["a2"], stop_before_pixels=True).SOPInstanceUID)

    def sr_fails_for_b(model: Any, cases: list[Any]) -> Any:
        if cases[0].study_uid == new_scans["studies"]["b"]:
            raise ValueError(f"broken header {cases[0].headers[0].PatientID}")
        return real_sr(model, cases)

    def map_fails_for_a2(model: Any, case: Any, **kw: Any) -> Any:
        if str(case.headers[0].SOPInstanceUID) == a2:
            raise RuntimeError(f"decoder failed for {case.headers[0].PatientName}")
        return real_maps(model, case, **kw)

    monkeypatch.setattr(dicom_out, "_structured_report", sr_fails_for_b)
    monkeypatch.setattr(dicom_out, "_heatmaps", map_fails_for_a2)
    result = dicom_out.write_dicom_outputs(run, table, tmp_path / "dicom")
    notes = result.annotate(table).set_index(table["file"].map(lambda f: Path(f).name))
    assert notes.loc["b1.dcm", "dicom_note"] == "writing its study's DICOM objects failed (ValueError)"
    assert notes.loc["b1.dcm", "dicom_out"] == ""
    assert notes.loc["a2.dcm", "dicom_note"] == "no heat map (RuntimeError); its SR and PDF entries were written"
    assert notes.loc["a1.dcm", "dicom_note"] == "" and notes.loc["a1.dcm", "dicom_out"] == notes.loc["a2.dcm",
                                                                                                    "dicom_out"]
    assert [p.name for p in (tmp_path / "dicom").iterdir()] == [notes.loc["a1.dcm", "dicom_out"]]  # nothing of B
    got = study_files(tmp_path / "dicom" / notes.loc["a1.dcm", "dicom_out"])
    assert len(got["heatmaps"]) == 1 and len(sr_groups(got["sr"])) == 2
    assert not any(c in " ".join(result.summary()) for c in CANARIES)


def test_dicom_out_with_a_manifest_is_refused(run: Run, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="scan files or folders"):
        mt.predict(run, run.manifest, dicom_out=tmp_path / "dicom")


def test_multiclass_sr_reports_the_argmax_class_present_and_no_threshold(run: Run,
                                                                        new_scans: dict[str, Any]) -> None:
    """Multi-class classes exclude each other: the decision is the predicted (arg-max) class, not a threshold."""
    classes = ["normal", "pneumonia", "effusion"]
    card = run.card.model_copy(update={"task": "multiclass", "classes": classes, "num_outputs": 3, "thresholds": {}})
    model = dicom_out._Model.of(dataclasses.replace(run, card=card))
    header = pydicom.dcmread(new_scans["files"]["a1"], stop_before_pixels=True)
    row = pd.Series({"case_id": "c0123456789", "p_normal": 0.2, "p_pneumonia": 0.3, "p_effusion": 0.5,
                     "pred_normal": 0, "pred_pneumonia": 1, "pred_effusion": 1, "predicted": "effusion"})
    case = dicom_out._Case("c0123456789", row, [new_scans["files"]["a1"]], [header], volume=False)
    groups = sr_groups(hd.sr.ComprehensiveSR.from_dataset(dicom_out._structured_report(model, [case])))
    assert {k: (g["decision"], g["threshold"]) for k, g in groups.items()} == {
        "c0123456789 normal": ("Absent", None), "c0123456789 pneumonia": ("Absent", None),
        "c0123456789 effusion": ("Present", None)}
    assert model.explained(row) == (2, "effusion")


def test_sheet_falls_back_to_matplotlib_without_weasyprint(run: Run, new_scans: dict[str, Any], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "weasyprint", None)  # import weasyprint -> ImportError
    header = pydicom.dcmread(new_scans["files"]["a1"], stop_before_pixels=True)
    row = pd.Series({"case_id": "c0123456789", "p_pneumonia": 0.8123, "pred_pneumonia": 1, "predicted": "pneumonia"})
    case = dicom_out._Case("c0123456789", row, [new_scans["files"]["a1"]], [header], volume=False)
    sheet = dicom_out._sheet(dicom_out._Model.of(run), [case])
    assert dicom_out._save(sheet, tmp_path / "SHEET.dcm").is_file() and dciodvfy_errors(tmp_path / "SHEET.dcm") == []
    text = pdf_text(pydicom.dcmread(tmp_path / "SHEET.dcm"), tmp_path)
    assert "NOT FOR CLINICAL USE" in text and "0.812" in text and "present" in text


def test_class_codes_fit_dicom_code_values() -> None:
    assert dicom_out._code("pneumonia").value == "pneumonia"
    long = dicom_out._code("ground-glass opacity, peripheral")
    assert re.fullmatch(r"C[0-9a-f]{15}", long.value) and long.meaning == "ground-glass opacity, peripheral"
