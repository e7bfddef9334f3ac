"""CheXpert (v1.0 and v1.0-small): ``train.csv``, ``valid.csv`` and, where present, the test labels.

What the adapter handles:

- ROOT may be the folder that holds ``CheXpert-v1.0-small/`` (or ``CheXpert-v1.0/``) or that folder itself; the
  ``Path`` column starts with the release folder's name (``CheXpert-v1.0-small/train/patient00001/study1/
  view1_frontal.jpg``), which is re-rooted either way;
- the 14 observations read ``1.0``, ``0.0``, ``-1.0`` (uncertain) or blank (not mentioned): ``-1`` follows
  ``--uncertain`` (ignore -> blank, masked; ones; zeros); blank stays unknown, except that a row with
  ``No Finding`` = 1 has 0 for every blank pathology (not ``Support Devices``), as torchxrayvision reads it;
- the view is ``AP``/``PA`` (the ``AP/PA`` column) for a frontal image and ``LATERAL`` for a lateral one;
- patient and study come from the path (``patient00001``, ``patient00001_study1``); ``Sex`` Male/Female/
  Unknown, ``Age`` in years;
- splits: ``train.csv`` -> train, ``valid.csv`` -> val (the 200 radiologist-labelled studies); the test set's
  labels (``test_labels.csv`` or ``test.csv``, released with CheXlocalize) -> test when present; otherwise a test
  set is carved from train by patient (``val_fraction`` of the patients, deterministic), so the CSV always has
  all three splits and no patient crosses them.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pandas as pd

from medtransfer.datasets.public.base import (
    DatasetInfo,
    PrepareOptions,
    age_years,
    carve_split,
    finding_values,
    read_csv,
    require_file,
    select_views,
    sex_code,
    view_code,
)
from medtransfer.errors import DatasetLayoutError

logger = logging.getLogger(__name__)

FINDINGS = ("No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
            "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
            "Fracture", "Support Devices")

#: The 12 pathologies with a torchxrayvision name (Pleural Other, Support Devices and No Finding have none).
HARMONISE = {"Enlarged Cardiomediastinum": "Enlarged Cardiomediastinum", "Cardiomegaly": "Cardiomegaly",
             "Lung Opacity": "Lung Opacity", "Lung Lesion": "Lung Lesion", "Edema": "Edema",
             "Consolidation": "Consolidation", "Pneumonia": "Pneumonia", "Atelectasis": "Atelectasis",
             "Pneumothorax": "Pneumothorax", "Pleural Effusion": "Effusion", "Fracture": "Fracture"}

INFO = DatasetInfo(
    name="chexpert",
    title="CheXpert",
    licence="Stanford University School of Medicine CheXpert Dataset Research Use Agreement (non-commercial "
            "research; registration required)",
    url="https://stanfordaimi.azurewebsites.net/datasets/8cbd9ed4-2eb9-4565-affc-111cf4f7ebe2",
    expected=("CheXpert-v1.0-small/train.csv (or CheXpert-v1.0/train.csv, or train.csv in ROOT)", "valid.csv",
              "train/patientNNNNN/studyN/viewN_frontal.jpg, valid/...",
              "optional: test_labels.csv or test.csv with test/..."),
    findings=FINDINGS,
    harmonise=HARMONISE,
    notes=(
        "-1 (uncertain) by --uncertain: ignore (blank, masked), ones, zeros; blank = not mentioned = unknown",
        "'No Finding' = 1 sets blank pathologies (not Support Devices) to 0, as torchxrayvision does",
        "patient and study from the path; view AP/PA for frontal, LATERAL for lateral images",
        "train.csv -> train, valid.csv -> val, test labels -> test if present, else test carved from train "
        "by patient",
    ),
)

_PATIENT = re.compile(r"(patient\d+)/(study\d+)/")
_RELEASE = re.compile(r"^CheXpert-v1\.0[^/]*/", re.IGNORECASE)
_PATHOLOGIES = tuple(f for f in FINDINGS if f not in ("No Finding", "Support Devices"))


def read(root: Path, options: PrepareOptions) -> pd.DataFrame:
    """One row per image of ``train.csv``, ``valid.csv`` and the test labels where present."""
    train_csv = require_file(root, "train.csv", "CheXpert-v1.0-small/train.csv", "CheXpert-v1.0/train.csv",
                             "CheXpert-v1.0*/train.csv")
    base = train_csv.parent
    prefix = "" if base == root else base.relative_to(root).as_posix() + "/"
    parts = [_read_one(train_csv, "train", prefix, options),
             _read_one(require_file(base, "valid.csv"), "val", prefix, options)]
    test_csv = next((base / n for n in ("test_labels.csv", "test.csv") if (base / n).is_file()), None)
    if test_csv is not None:
        parts.append(_read_one(test_csv, "test", prefix, options))
    df = pd.concat(parts, ignore_index=True)
    if test_csv is None:
        logger.info("CheXpert: no test labels (test_labels.csv / test.csv); test carved from train by patient")
        df["split"] = carve_split(df["split"], df["patient_id"], options.val_fraction, options.seed, target="test")
    return select_views(df, options.views)


def _read_one(csv_path: Path, split: str, prefix: str, options: PrepareOptions) -> pd.DataFrame:
    """The rows of one of the official CSVs (the test labels may lack Sex, Age and the view columns)."""
    required = ("Path", *FINDINGS) if split == "test" else ("Path", "Sex", "Age", "Frontal/Lateral", "AP/PA",
                                                             *FINDINGS)
    df = read_csv(csv_path, columns=required)
    raw = df["Path"].str.replace("\\", "/", regex=False)
    ids = raw.str.extract(_PATIENT)
    if ids[0].isna().any():
        bad = raw[ids[0].isna()].iloc[0]
        raise DatasetLayoutError(f"{csv_path}: path {bad!r} does not hold patientNNNNN/studyN/; is it the dataset's "
                                 "own file?")
    out = pd.DataFrame({"path": prefix + raw.str.replace(_RELEASE, "", regex=True)})
    for name in FINDINGS:
        out[name] = finding_values(df[name], options.uncertain, where=f"{csv_path.name} column {name!r}")
    healthy = out["No Finding"] == 1.0
    for name in _PATHOLOGIES:
        out.loc[healthy & out[name].isna(), name] = 0.0
    out["patient_id"] = ids[0].to_numpy()
    out["study_id"] = (ids[0] + "_" + ids[1]).to_numpy()
    out["sex"] = df["Sex"].map(sex_code) if "Sex" in df.columns else ""
    out["age"] = df["Age"].map(age_years).astype(float) if "Age" in df.columns else np.nan
    out["view"] = _views(df, raw)
    out["split"] = split
    return out


def _views(df: pd.DataFrame, raw: pd.Series) -> pd.Series:
    """``AP``/``PA`` (or ``FRONTAL`` when unstated) for frontal images, ``LATERAL`` for lateral ones."""
    if "Frontal/Lateral" in df.columns:
        side = df["Frontal/Lateral"].str.lower()
    else:  # the test labels: the file name says it (view1_frontal.jpg)
        side = pd.Series(np.where(raw.str.contains("lateral", case=False), "lateral", "frontal"), index=df.index)
    appa = df["AP/PA"] if "AP/PA" in df.columns else pd.Series([""] * len(df), index=df.index)
    frontal = appa.map(view_code).replace("", "FRONTAL")
    return pd.Series(np.where(side == "lateral", "LATERAL", frontal), index=df.index)
