"""Volume runs end to end: each ``model.volume`` kind trains, evaluates, predicts, explains and reports on tiny
NIfTI volumes; a killed volume run resumes to the uninterrupted result; the CLI trains on DICOM series.

The volumes are real NIfTI files written here (16 x 24 x 24 voxels, an oblique-free RAS affine with 2 mm slices);
positives carry a bright 3D blob, so a model can learn them in a few steps (the tests check the pipeline, and
that what it learned is better than chance where that is cheap to establish).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

import medtransfer as mt
from medtransfer import faults

pytestmark = pytest.mark.slow

SHAPE = (24, 24, 16)  # NIfTI (i, j, k) = (R, A, S): read as (D, H, W) = (16, 24, 24)
OVERRIDES = ["input.size=[16,24,24]", "train.epochs=2", "train.freeze_epochs=1", "train.batch_size=4",
             "train.patience=2", "train.num_workers=0", "train.augment.enabled=false", "eval.n_boot=50",
             "data.val_fraction=0.25", "data.test_fraction=0.25"]


def write_volumes(root: Path, n: int = 32, seed: int = 0) -> Path:
    """``n`` NIfTI volumes (half with a bright blob) and labels.csv with patient ids and a site column."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    affine = np.diag([1.5, 1.5, 2.0, 1.0])
    rows = []
    ii, jj, kk = np.meshgrid(*[np.arange(s) for s in SHAPE], indexing="ij")
    for k in range(n):
        label = "lesion" if k % 2 else "normal"
        data = rng.normal(0.0, 20.0, SHAPE).astype(np.float32) + 100.0
        data[4:20, 4:20, 2:14] += 200.0  # an "organ"
        if label == "lesion":
            c = rng.integers([7, 7, 5], [17, 17, 11])
            data[(ii - c[0]) ** 2 + (jj - c[1]) ** 2 + (kk - c[2]) ** 2 <= 9] += 600.0
        name = f"vol-{k:03d}.nii.gz"
        nib.save(nib.Nifti1Image(data, affine), str(root / name))
        rows.append({"path": name, "label": label, "patient_id": f"P{k:03d}", "site": "AB"[k % 4 // 2],
                     "sex": "FM"[k % 3 % 2], "age": 30 + k})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_volumes(tmp_path_factory.mktemp("volumes"))


@pytest.mark.parametrize("kind", ["slices", "acs", "native"])
def test_each_volume_kind_trains_evaluates_predicts_explains_and_reports(volumes: Path, tmp_path: Path,
                                                                         kind: str) -> None:
    strategy = "fine-tune" if kind == "native" else "gradual"
    run = mt.train(volumes, labels=volumes / "labels.csv", out=tmp_path / kind,
                   overrides=[*OVERRIDES, f"model.volume={kind}", f"train.strategy={strategy}"])
    card = json.loads((run.path / "model_card.json").read_text())
    assert card["volume"] == kind and card["input"]["size"] == [16, 24, 24]
    assert card["backbone"] == ("resnet10_3d" if kind == "native" else "efficientnet_lite0")
    assert card["slice_context"] == (3 if kind == "slices" else None)

    # the saved model is rebuilt from its card and predicts like the trained one
    loaded = mt.load_run(run.path)
    assert loaded.model.volume == kind
    x = mt.data.dataset.preprocess(volumes / "vol-001.nii.gz", loaded.card.input)
    assert tuple(x.shape) == (1, 16, 24, 24)
    p_tensor = loaded.predict(x[None])[f"p_{loaded.card.classes[1]}"].iloc[0]
    p_file = loaded.predict([volumes / "vol-001.nii.gz"])
    assert p_file["error"].fillna("").eq("").all()
    assert p_file[f"p_{loaded.card.classes[1]}"].iloc[0] == pytest.approx(p_tensor, abs=1e-5)
    if kind == "slices":  # "which slices?": the attention weights come with the prediction
        weights = np.array([float(w) for w in p_file["slice_attention"].iloc[0].split(";")])
        assert len(weights) == 16 and weights.sum() == pytest.approx(1.0, abs=2e-3)
        assert int(p_file["peak_slice"].iloc[0]) == int(weights.argmax())
    else:
        assert "slice_attention" not in p_file.columns

    result = mt.evaluate(run, subgroups=("site",))
    row = result.overall.iloc[0]
    assert 0.0 <= row["auroc"] <= 1.0 and row["n"] == len(run.manifest.split("test"))
    preds = pd.read_csv(run.path / "predictions.csv")
    assert preds["error"].isna().all()
    assert ("slice_attention" in preds.columns) == (kind == "slices")

    mt.explain_run(run.path, method="gradcam", cases=1)
    index = pd.read_csv(run.path / "saliency" / "index.csv")
    assert len(index) >= 1
    maps = np.load(run.path / "saliency" / index["map_file"].iloc[0], allow_pickle=False)
    assert maps["saliency"].shape == (16, 24, 24)
    assert (run.path / "saliency" / index["file"].iloc[0]).is_file()

    html = mt.render_report(run.path, formats=("html",))["html"].read_text(encoding="utf-8")
    assert "reoriented to RAS" in html and "16×24×24 voxels" in html
    assert "Volume geometry" in html


def test_slices_model_learns_the_planted_lesion(volumes: Path, tmp_path: Path) -> None:
    """Frozen ImageNet slice features + attention-MIL head separate blob from no blob on held-out volumes."""
    run = mt.train(volumes, labels=volumes / "labels.csv", out=tmp_path / "probe",
                   overrides=[*OVERRIDES, "model.volume=slices", "train.strategy=linear-probe", "train.epochs=6",
                              "train.patience=6"])
    result = mt.evaluate(run, split="test", subgroups=())
    assert result.overall.iloc[0]["auroc"] >= 0.8


def _cmd(data: Path, out: Path, *, resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "medtransfer.cli", "--quiet", "train"]
    if resume:
        return [*cmd, "--resume", "--out", str(out)]
    cmd += [str(data), "--labels", str(data / "labels.csv"), "--out", str(out)]
    for item in [*OVERRIDES, "model.volume=acs", "train.strategy=fine-tune", "train.epochs=3",
                 "train.patience=3"]:
        cmd += ["--set", item]
    return cmd


def test_killed_volume_run_resumes_to_the_uninterrupted_result(volumes: Path, tmp_path: Path) -> None:
    env = {**os.environ, "MEDTRANSFER_SALT": "test-salt-not-secret"}
    clean = tmp_path / "clean"
    subprocess.run(_cmd(volumes, clean), env=env, check=True, capture_output=True)
    crashed = tmp_path / "crashed"
    # 16 training volumes / batch 4 = 4 steps per epoch: step 6 is in the middle of epoch 2
    proc = subprocess.run(_cmd(volumes, crashed), env={**env, **faults.subprocess_env("step", nth=6)},
                          capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    state = json.loads((crashed / "checkpoints" / "last" / "training_state.json").read_text())
    assert state["epoch"] == 1
    resumed = subprocess.run(_cmd(volumes, crashed, resume=True), env=env, capture_output=True)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    pd.testing.assert_frame_equal(pd.read_csv(clean / "history.csv").drop(columns=["seconds", "attempt"]),
                                  pd.read_csv(crashed / "history.csv").drop(columns=["seconds", "attempt"]))
    assert (clean / "model.safetensors").read_bytes() == (crashed / "model.safetensors").read_bytes()


def test_cli_trains_on_dicom_series_and_quarantines_images_in_a_volume_run(tmp_path: Path) -> None:
    """The synthetic CT series (DICOM, one folder per series) index as volumes; a PNG in the folder is
    quarantined with a reason instead of stopping the run."""
    from PIL import Image

    from medtransfer.datasets.synthetic import generate_sample_volumes

    data = generate_sample_volumes(tmp_path / "ct", n=16, size=(16, 32, 32))
    Image.fromarray((np.arange(32 * 32).reshape(32, 32) % 255).astype(np.uint8)).save(data / "stray.png")
    labels = pd.read_csv(data / "labels.csv")
    pd.concat([labels, pd.DataFrame([{"path": "stray.png", "label": labels["label"].iloc[0],
                                      "patient_id": "STRAY"}])]).to_csv(data / "labels_png.csv", index=False)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "medtransfer.cli", "--quiet", "train", str(data), "--labels",
           str(data / "labels_png.csv"), "--out", str(out)]
    for item in ["input.size=[16,32,32]", "input.windows=[lung]", "train.strategy=linear-probe", "train.epochs=1",
                 "train.batch_size=4", "data.val_fraction=0.25", "data.test_fraction=0.25"]:
        cmd += ["--set", item]
    proc = subprocess.run(cmd, env={**os.environ, "MEDTRANSFER_SALT": "test-salt-not-secret"}, capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    manifest = pd.read_csv(out / "manifest.csv")
    assert len(manifest) == 16 and manifest["format"].eq("dicom").all()
    quarantine = pd.read_csv(out / "quarantine.csv")
    stray = quarantine[quarantine["path"] == "stray.png"]
    assert len(stray) == 1 and "2D image" in stray["reason"].iloc[0]
