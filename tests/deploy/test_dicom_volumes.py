"""DICOM outputs for a volume run on DICOM CT series (the synthetic chest CT, 16 x 32 x 32, lung window).

A series is one case: the SR's measurement group and the evidence reference every slice; each key-slice heat
map (the saliency peak's slice and, for the 2.5D model, the slice with the largest attention weight) references
the source slice at the same height, i.e. the model's slice axis runs inferior to superior like the sources'
ImagePositionPatient z. One patient has two studies: two study folders.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
import torch.nn.functional as F

import medtransfer as mt
from medtransfer.run_dir import Run
from tests.deploy.test_dicom import check_filed_into, dciodvfy_errors, evidence_uids, sr_groups, study_files

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ct(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from medtransfer.datasets.synthetic import generate_sample_volumes

    root = tmp_path_factory.mktemp("ct-dicom-out")
    data = generate_sample_volumes(root / "ct", n=8, size=(16, 32, 32))
    run = mt.train(data, labels=data / "labels.csv", out=root / "run",
                   overrides=["input.size=[16,32,32]", "input.windows=[lung]", "train.strategy=linear-probe",
                              "train.epochs=1", "train.batch_size=4", "train.num_workers=0",
                              "data.val_fraction=0.25", "data.test_fraction=0.25"])
    labels = pd.read_csv(data / "labels.csv")
    twice = labels["patient_id"].value_counts()
    patient = str(twice.index[0])
    assert twice.iloc[0] == 2, twice  # the generator gives some patients a second study
    folder = data / Path(labels.loc[labels["patient_id"] == patient, "path"].iloc[0]).parent
    out = root / "dicom"
    table = mt.predict(run, [folder], out=root / "preds.csv", dicom_out=out, device="cpu")
    return {"run": run, "table": table, "out": out, "folder": folder}


def _series(path: Path) -> list[pydicom.Dataset]:
    """The slices of a series folder, inferior to superior (LPS z ascending)."""
    slices = [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(path.glob("*.dcm"))]
    return sorted(slices, key=lambda s: float(s.ImagePositionPatient[2]))


def _files(folder: Path, uids: list[str]) -> list[Path]:
    """The series' files in the order of ``uids``."""
    by_uid = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in folder.rglob("*.dcm")}
    return [by_uid[u] for u in uids]


def _shrunk(sc: pydicom.Dataset, side: int) -> np.ndarray:
    """The SC's image without its text bands, grey (channel mean), area-shrunk to ``side`` x ``side``."""
    px = sc.pixel_array.astype(np.float32)
    band = round(max(12, round(px.shape[1] * 0.032)) * 1.8)
    grey = torch.from_numpy(px[band:-band].mean(axis=2))[None, None]
    return F.interpolate(grey, size=(side, side), mode="area")[0, 0].numpy()


def test_volume_series_get_sr_key_slice_heatmaps_and_sheet_in_their_studies(ct: dict[str, Any]) -> None:
    run: Run = ct["run"]
    table = ct["table"]
    assert len(table) == 2 and (table["error"] == "").all() and (table["dicom_note"] == "").all()
    assert table["dicom_out"].nunique() == 2  # two studies of one patient: two folders
    cls = run.card.classes[1]
    for _, row in table.iterrows():
        slices = _series(Path(row["file"]))
        assert len(slices) == 16
        got = study_files(ct["out"] / row["dicom_out"])
        check_filed_into([got["sr"], got["sheet"], *got["heatmaps"]], slices)
        uids = [str(s.SOPInstanceUID) for s in slices]
        assert evidence_uids(got["sr"]) == set(uids)
        (group,) = sr_groups(got["sr"]).values()
        assert group["p"] == pytest.approx(float(row[f"p_{cls}"]), abs=1e-9) and sorted(group["sources"]) == sorted(uids)
        assert group["decision"] == ("Present" if int(row[f"pred_{cls}"]) == 1 else "Absent")
        # key slices: the saliency peak's, and the attention peak's (2.5D model) when it is another slice
        assert 1 <= len(got["heatmaps"]) <= 2
        shown = []
        for sc in got["heatmaps"]:
            (ref,) = sc.SourceImageSequence
            assert list(sc.PatientOrientation) == ["L", "P"]  # RAS axial: as a viewer shows the source slice
            k, depth = map(int, re.search(r"slice (\d+)/(\d+)", sc.ImageComments).groups())
            assert depth == 16 and ref.ReferencedSOPInstanceUID == uids[k - 1]  # the slice at the same height
            assert float(sc.PixelSpacing[0]) == pytest.approx(
                float(slices[0].PixelSpacing[0]) * 32 / sc.Columns, rel=1e-3)
            # and the pixels agree: of all source slices, the SC (shrunk back to 32 px) matches the referenced one
            pixels = [pydicom.dcmread(p).pixel_array.astype(float) for p in _files(Path(row["file"]), uids)]
            image = _shrunk(sc, 32)
            corr = [np.corrcoef(a.ravel(), image.ravel())[0, 1] for a in pixels]
            assert int(np.argmax(corr)) == k - 1, np.round(corr, 2)
            shown.append(k - 1)
        if pd.notna(row.get("peak_slice")):
            assert int(row["peak_slice"]) in shown
        for path in got["paths"]:
            assert dciodvfy_errors(path) == [], path.name
