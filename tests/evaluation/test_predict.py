"""Predictions: the table's columns, batched = per case, the card's temperature and thresholds, new scans."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import medtransfer as mt
from medtransfer.cli import app
from medtransfer.errors import ManifestError
from medtransfer.evaluation.predict import predict
from medtransfer.evaluation.result import read_predictions
from medtransfer.run_dir import Run
from tests.evaluation.test_evaluate import CANARY_FILE, trained_run, write_case
from tests.factories import CANARIES


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    return trained_run(tmp_path_factory, "binary")


def test_predictions_table_columns_and_operating_point(run: Run) -> None:
    test = run.manifest.split("test")
    table = run.predict(test)
    assert table.columns[:5].tolist() == ["case_id", "patient_key", "split", "path", "label"]
    assert {"true_normal", "true_pneumonia", "p_pneumonia", "p_raw_pneumonia", "pred_pneumonia", "predicted",
            "sex", "age", "age_band", "site", "manufacturer", "view", "modality", "error"} <= set(table.columns)
    assert "p_normal" not in table.columns  # binary: the positive class only
    assert table["case_id"].tolist() == test.df["case_id"].tolist()
    assert (table["true_normal"] + table["true_pneumonia"] == 1).all()
    assert (table["true_pneumonia"] == (table["label"] == "pneumonia")).all()
    thr = run.card.thresholds["pneumonia"]
    assert (table["pred_pneumonia"] == (table["p_pneumonia"] >= thr).astype(int)).all()
    assert (table["predicted"] == np.where(table["p_pneumonia"] >= thr, "pneumonia", "normal")).all()
    # calibrated = raw logits divided by the card's temperature
    raw = table["p_raw_pneumonia"].to_numpy()
    logit = np.log(raw / (1 - raw))
    np.testing.assert_allclose(table["p_pneumonia"], 1 / (1 + np.exp(-logit / run.card.temperature)), rtol=1e-5)
    assert (table["error"] == "").all()


def test_batched_equals_per_case(run: Run) -> None:
    cases = run.manifest.split("val")
    batched = run.predict(cases, batch_size=16)
    single = run.predict(cases, batch_size=1)
    np.testing.assert_allclose(batched["p_raw_pneumonia"], single["p_raw_pneumonia"], rtol=1e-4, atol=1e-6)
    # and equal to Run.predict on the same files, the engine's own preprocessing path;
    # Run.predict returns calibrated probabilities, like the evaluation table's p_<class>
    files = [str(cases.abspath(r)[0]) for _, r in cases.df.iterrows()]
    np.testing.assert_allclose(batched["p_pneumonia"], run.predict(files)["p_pneumonia"], rtol=1e-4, atol=1e-6)


def test_predict_with_a_manifest_writes_the_table(run: Run, tmp_path: Path) -> None:
    cases = run.manifest.split("test")
    table = mt.predict(run.path, cases, out=tmp_path / "p.csv")
    pd.testing.assert_frame_equal(read_predictions(tmp_path / "p.csv"), table)


def test_predict_paths_scores_new_scans_and_reports_unreadable_files(run: Run, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    new = tmp_path / "new_scans"
    for i in range(3):
        write_case(new, f"ward/{CANARY_FILE}_{i}.dcm", ("pneumonia",) if i else (), rng, patient=f"N{i}", size=64)
    write_case(tmp_path, "one.dcm", (), rng, patient="N9")
    (new / "ward" / "broken.dcm").write_bytes(b"DICM not really")
    (new / "notes.txt").write_text("not a scan")
    (new / "ward" / "truncated.dcm").write_bytes((new / "ward" / f"{CANARY_FILE}_1.dcm").read_bytes()[:400])
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "preds.csv"
    table = predict(run, ["new_scans", "one.dcm"], out=out)
    assert table.columns.tolist() == ["case_id", "file", "p_pneumonia", "pred_pneumonia", "predicted", "error"]
    by_file = table.set_index("file")
    good = [f"new_scans/ward/{CANARY_FILE}_{i}.dcm" for i in range(3)] + ["one.dcm"]
    assert sorted(by_file.index) == sorted([*good, "new_scans/ward/broken.dcm", "new_scans/ward/truncated.dcm"])
    assert (by_file.loc[good, "error"] == "").all() and by_file.loc[good, "p_pneumonia"].between(0, 1).all()
    for bad in ("new_scans/ward/broken.dcm", "new_scans/ward/truncated.dcm"):
        assert by_file.loc[bad, "error"] and np.isnan(by_file.loc[bad, "p_pneumonia"])
        assert by_file.loc[bad, "predicted"] == ""
    assert table["case_id"].str.match(r"^c[0-9a-f]{10}$").all() and table["case_id"].is_unique
    text = out.read_text()
    assert not any(c in text for c in CANARIES) and str(tmp_path) not in text


def test_predict_paths_refuses_a_missing_path(run: Run, tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not found"):
        predict(run, [tmp_path / "nope"])


def test_cli_and_load_run_predict_give_the_evaluations_calibrated_probabilities(run: Run, tmp_path: Path) -> None:
    """The round trip: ``medtransfer predict RUN FILES`` and ``load_run(RUN).predict(FILES)`` give the test scans
    the calibrated probabilities (and labels) that ``evaluate`` wrote to predictions.csv for the same cases."""
    evaluated = tmp_path / "evaluated"
    mt.evaluate(run.path, split="test", n_boot=0, out_dir=evaluated)
    expected = pd.read_csv(evaluated / "predictions.csv")
    assert len(expected) == len(run.manifest.split("test")) and expected["p_pneumonia"].std() > 0.05
    files = [str((run.manifest.data_dir / rel).resolve()) for rel in expected["path"]]

    out = tmp_path / "cli.csv"
    result = CliRunner().invoke(app, ["--quiet", "predict", str(run.path), *files, "--out", str(out)])
    assert result.exit_code == 0, result.output
    by_cli = pd.read_csv(out).set_index("file").loc[files]
    assert by_cli["error"].isna().all(), by_cli["error"].dropna()
    np.testing.assert_allclose(by_cli["p_pneumonia"], expected["p_pneumonia"], rtol=0, atol=1e-5)
    by_api = mt.load_run(run.path).predict(files)
    np.testing.assert_allclose(by_api["p_pneumonia"], expected["p_pneumonia"], rtol=0, atol=1e-5)

    # the same label at the card's operating point (cases within the tolerance of the threshold aside)
    clear = (expected["p_pneumonia"] - run.card.thresholds["pneumonia"]).abs() > 1e-5
    assert (by_cli["predicted"].to_numpy()[clear] == expected["predicted"][clear]).all()

    # all three share one inference path, so anchor it outside that path: dataset -> model -> logit / T
    cases = run.manifest.split("test")
    order = cases.df.set_index("case_id").index.get_indexer(expected["case_id"])
    ds = mt.ScanDataset(cases, run.card.input, train=False)
    with torch.no_grad():
        logits = run.model(torch.stack([ds[int(i)]["image"] for i in order])).numpy().reshape(-1)
    temperature = run.card.temperature or 1.0
    np.testing.assert_allclose(expected["p_pneumonia"], 1 / (1 + np.exp(-logits / temperature)), rtol=0, atol=1e-5)
