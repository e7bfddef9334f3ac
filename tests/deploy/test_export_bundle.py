"""The MONAI bundle runs with ``python -m monai.bundle run`` where medtransfer cannot be imported, and its CSV gives
Run.predict's probabilities and decisions for the same files (DICOM and PNG images, NIfTI volumes).

Environment without medtransfer: a virtual environment made with ``--system-site-packages`` (torch, MONAI, pydicom,
Pillow, nibabel come from this interpreter, nothing is installed) whose own site-packages holds a ``medtransfer``
package that raises ImportError. The venv's site-packages precede the system ones on ``sys.path`` and the editable
install's finder is consulted after the path, so ``import medtransfer`` fails there (checked). A clean venv with its
own torch would take minutes and a network; this one takes a second and shadows medtransfer the same way.

Tolerance: the bundle rebuilds the preprocessing with MONAI transforms and numpy (another operation order than
medtransfer's, e.g. torch vs numpy normalisation), and runs the traced model (all slices of a 2.5D model in one call,
default memory format) where Run.predict runs the PyTorch model (chunks of slices, channels_last): measured at most
2e-7 (DICOM images), 1.3e-7 (PNG), 2e-6 (NIfTI volumes, 2.5D model) and 9.5e-6 (DICOM CT series, 2.5D model), with
heads scaled so that logits spread with standard deviation 3 (steep: float32 noise in the logits shows). The tests
allow 5e-5, inside the issue's 1e-4, and require identical decisions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

import medtransfer as mt
from medtransfer.data.spec import InputSpec
from medtransfer.deploy.export import export
from tests.conftest import skip_or_fail
from tests.deploy.test_export import make_run, write_cxr_dicoms, write_niftis
from tests.factories import chest_like, write_png

#: measured up to 9.5e-6 (module docstring); the issue's bound is 1e-4
BUNDLE_TOLERANCE = 5e-5


@pytest.fixture(scope="module")
def no_medtransfer_python(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A Python that has this interpreter's packages except medtransfer (module docstring)."""
    try:
        import fire  # noqa: F401 - MONAI's command line (python -m monai.bundle) needs it
    except ImportError:
        skip_or_fail('python -m monai.bundle needs the "fire" package: pip install "medtransfer[export]"')
    venv = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    assert purelib != sysconfig.get_paths()["purelib"]
    shadow = Path(purelib) / "medtransfer"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ImportError("medtransfer is not installed in this environment")\n')
    probe = subprocess.run([python, "-c", "import monai, torch, pydicom, PIL, nibabel, fire\nimport medtransfer"],
                           capture_output=True, text=True, env=_env(), cwd=venv.parent)
    assert probe.returncode == 1 and "medtransfer is not installed" in probe.stderr, probe.stderr[-2000:]
    return python


def _env() -> dict[str, str]:
    """The test's environment without PYTHONPATH (which could point at the source tree)."""
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def run_bundle(python: str, bundle: Path, scans: Path, out: Path) -> pd.DataFrame:
    """``python -m monai.bundle run`` from a neutral folder, as a user would; its predictions.csv."""
    cmd = [python, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs" / "inference.json"),
           "--workflow_type", "infer", "--bundle_root", str(bundle), "--dataset_dir", str(scans),
           "--output_dir", str(out)]
    proc = subprocess.run(cmd, cwd=out.parent, capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]  # importing medtransfer would have failed (shadowed)
    return pd.read_csv(out / "predictions.csv")


def compare(run: mt.run_dir.Run, files: list[Path], scans: Path, got: pd.DataFrame) -> float:
    """Largest |bundle - Run.predict| over files and classes; decisions must agree exactly."""
    want = run.predict([str(f) for f in files], device="cpu")
    want["file"] = [Path(f).relative_to(scans).as_posix() for f in want["file"]]
    merged = want.merge(got, on="file", suffixes=("_mt", "_bundle"), validate="one_to_one")
    assert len(merged) == len(files) == len(got)
    scored = run.card.classes[1:] if run.card.task == "binary" else run.card.classes
    worst = 0.0
    for c in scored:
        worst = max(worst, float((merged[f"p_{c}_mt"] - merged[f"p_{c}_bundle"]).abs().max()))
        assert (merged[f"pred_{c}_mt"].astype(int) == merged[f"pred_{c}_bundle"]).all()
    assert (merged["predicted_mt"] == merged["predicted_bundle"]).all()
    return worst


@pytest.mark.slow
def test_dicom_bundle_classifies_a_folder_without_medtransfer_like_run_predict(no_medtransfer_python, tmp_path):
    files = write_cxr_dicoms(tmp_path / "scans")  # MONOCHROME1, with/without VOI window, shrink and enlarge
    run = make_run(tmp_path / "run", files)
    bundle = export(run, ("bundle",), out=tmp_path / "export")["bundle"]
    got = run_bundle(no_medtransfer_python, bundle, tmp_path / "scans", tmp_path / "out")
    assert list(got.columns) == ["file", "p_pneumonia", "pred_pneumonia", "predicted"]
    assert compare(run, files, tmp_path / "scans", got) <= BUNDLE_TOLERANCE
    assert np.ptp(got["p_pneumonia"]) > 0.3


@pytest.mark.slow
def test_png_bundle_reads_grey_and_colour_pictures_like_medtransfer(no_medtransfer_python, tmp_path):
    from PIL import Image

    scans = tmp_path / "scans" / "nested"
    files = [write_png(scans / f"grey{i}.png", (chest_like(48, seed=i)[:44 - 8 * i] / 16).astype(np.uint8))
             for i in range(3)]
    rgb = (chest_like(56, seed=9) / 16).astype(np.uint8)
    Image.fromarray(np.stack([rgb, rgb // 2, 255 - rgb], axis=-1)).save(scans / "colour.png")
    files.append(scans / "colour.png")
    run = make_run(tmp_path / "run", files, task="multiclass")
    from medtransfer.deploy.bundle import write_bundle
    from medtransfer.deploy.export import CalibratedModel, _trace, example_input, sidecar

    traced, diff = _trace(CalibratedModel(run.model, run.card), example_input(run.card, 3))
    bundle = write_bundle(run, traced, tmp_path / "bundle", sidecar=sidecar(run, "bundle", None, verified=diff),
                          kind="picture")
    got = run_bundle(no_medtransfer_python, bundle, tmp_path / "scans", tmp_path / "out")
    assert sorted(got["file"]) == sorted(f.relative_to(tmp_path / "scans").as_posix() for f in files)
    assert compare(run, files, tmp_path / "scans", got) <= BUNDLE_TOLERANCE
    np.testing.assert_allclose(got[[f"p_{c}" for c in run.card.classes]].sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_volume_bundle_with_ct_windows_and_spacing_matches_run_predict(no_medtransfer_python, tmp_path):
    """NIfTI volumes (one axis flipped), reoriented, resampled to 3 x 2 x 2 mm, three CT windows as channels,
    resized, through a 2.5D model: Orientationd, Spacingd, ScaleIntensityRanged x 3 + ConcatItemsd."""
    files = write_niftis(tmp_path / "scans")
    spec = InputSpec(size=(8, 16, 16), windows=("lung", "mediastinum", "bone"), spacing=(3.0, 2.0, 2.0),
                     mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    run = make_run(tmp_path / "run", files, volume="slices", spec=spec)
    from medtransfer.deploy.bundle import write_bundle
    from medtransfer.deploy.export import CalibratedModel, _trace, example_input, sidecar

    traced, diff = _trace(CalibratedModel(run.model, run.card), example_input(run.card, 3))
    bundle = write_bundle(run, traced, tmp_path / "bundle", sidecar=sidecar(run, "bundle", None, verified=diff),
                          kind="nifti")
    steps = [t["_target_"] for t in json.loads((bundle / "configs" / "inference.json").read_text())
             ["preprocessing"]["transforms"]]
    assert {"Orientationd", "Spacingd", "ConcatItemsd", "NormalizeIntensityd"} <= set(steps)
    got = run_bundle(no_medtransfer_python, bundle, tmp_path / "scans", tmp_path / "out")
    assert compare(run, files, tmp_path / "scans", got) <= BUNDLE_TOLERANCE


def test_bundle_layout_follows_the_monai_bundle_specification(tmp_path):
    files = write_cxr_dicoms(tmp_path / "scans")[:2]
    run = make_run(tmp_path / "run", files)
    bundle = export(run, ("bundle",), out=tmp_path / "export")["bundle"]
    for rel in ("configs/metadata.json", "configs/inference.json", "models/model.ts", "docs/README.md",
                "models/model.json", "scripts/medtransfer_steps.py"):
        assert (bundle / rel).is_file(), rel
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    for key in ("version", "monai_version", "pytorch_version", "numpy_version", "optional_packages_version", "task",
                "description", "authors", "copyright", "network_data_format"):
        assert key in meta, key
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [40, 40]
    assert meta["network_data_format"]["outputs"]["pred"]["channel_def"] == {"0": "pneumonia"}
    assert meta["medtransfer"]["thresholds"] == {"pneumonia": 0.42} and meta["data_type"] == "dicom"
    config = json.loads((bundle / "configs" / "inference.json").read_text())
    for key in ("imports", "bundle_root", "device", "dataset_dir", "network_def", "network", "preprocessing",
                "dataset", "dataloader", "inferer", "postprocessing", "evaluator", "run"):
        assert key in config, key
    steps = (bundle / "scripts" / "medtransfer_steps.py").read_text()
    assert "import medtransfer" not in steps and "from medtransfer" not in steps
    extra = {"metadata.json": "", "inference.json": ""}
    model = torch.jit.load(str(bundle / "models" / "model.ts"), _extra_files=extra)
    assert json.loads(extra["metadata.json"])["medtransfer"]["classes"] == ["normal", "pneumonia"]
    x = run.preprocess(files)
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), run.predict(x)[["p_pneumonia"]].to_numpy(), atol=1e-5)


@pytest.mark.slow
def test_dicom_series_bundle_reads_one_volume_per_series_folder(no_medtransfer_python, tmp_path):
    """CT series (one folder of slices each, HU via RescaleIntercept) through a lung window and a 2.5D model."""
    from medtransfer.datasets.synthetic import generate_sample_volumes

    data = generate_sample_volumes(tmp_path / "ct", n=4, size=(12, 32, 32))
    series = sorted({p.parent for p in (data / "dicom").rglob("*.dcm")})
    assert len(series) == 4
    spec = InputSpec(size=(8, 16, 16), windows=("lung",), mean=(0.5,), std=(0.5,))
    run = make_run(tmp_path / "run", series, volume="slices", spec=spec)
    bundle = export(run, ("bundle",), out=tmp_path / "export")["bundle"]
    got = run_bundle(no_medtransfer_python, bundle, data / "dicom", tmp_path / "out")
    assert compare(run, series, data / "dicom", got) <= BUNDLE_TOLERANCE
