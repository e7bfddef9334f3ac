"""NIH ChestX-ray14: ``Data_Entry_2017*.csv``, ``train_val_list.txt``/``test_list.txt``, PNGs in ``images*/``.

What the adapter handles:

- ``Finding Labels`` is ``|``-separated; ``No Finding`` means all 14 findings are 0 (every NIH finding is stated,
  so none is blank: torchxrayvision reads them the same way);
- the label file: ``Data_Entry_2017_v2020.csv`` is preferred to ``Data_Entry_2017.csv`` (whose lines end with a
  comma and which holds ages over 100, fixed in 2020); ages over 120 become unknown with a warning; the sex column
  is ``Patient Gender`` (or ``Patient Sex``);
- images may lie in ``images/``, ``images_001/images/`` ... ``images_012/images/`` (the Box archives) or any
  sub-folder: each ``Image Index`` is found by one walk;
- the official test split (``test_list.txt``) is kept; ``val`` is carved from ``train_val_list.txt`` by patient
  (the official lists are patient-wise); without the lists, ``split`` is blank and medtransfer splits by patient;
- the study is the patient and the follow-up number (``00000013_005``), as in the image name.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from medtransfer.datasets.public.base import (
    DatasetInfo,
    PrepareOptions,
    age_years,
    carve_split,
    index_files,
    locate_by_name,
    read_csv,
    read_lines,
    require_file,
    select_views,
    sex_code,
    view_code,
)
from medtransfer.errors import DatasetLayoutError

logger = logging.getLogger(__name__)

FINDINGS = ("Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
            "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia")

INFO = DatasetInfo(
    name="nih",
    title="NIH ChestX-ray14",
    licence="CC0 1.0 (public domain); cite Wang et al. 2017 and acknowledge the NIH Clinical Center",
    url="https://nihcc.app.box.com/v/ChestXray-NIHCC",
    expected=("Data_Entry_2017_v2020.csv (or Data_Entry_2017.csv)", "train_val_list.txt", "test_list.txt",
              "images*/ (PNG files, e.g. images_001/images/00000001_000.png)"),
    findings=FINDINGS,
    harmonise={f: f for f in FINDINGS},
    notes=(
        "'No Finding' = all 14 findings 0; every finding is stated (no blanks)",
        "official test split from test_list.txt; val carved from train_val_list.txt by patient",
        "ages over 120 (Data_Entry_2017.csv before the 2020 fix) become unknown",
        "images found by name anywhere under ROOT (images/ or images_0NN/images/)",
    ),
)

_LABEL_FILES = ("Data_Entry_2017_v2020.csv", "Data_Entry_2017.csv", "Data_Entry_2017_v2020.csv.gz",
                "Data_Entry_2017.csv.gz", "Data_Entry_2017*.csv")


def read(root: Path, options: PrepareOptions) -> pd.DataFrame:
    """One row per image of ``Data_Entry_2017*.csv`` (see the module docstring for the conventions)."""
    csv_path = require_file(root, *_LABEL_FILES)
    df = read_csv(csv_path, columns=("Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
                                     "View Position"))
    sex_col = next((c for c in ("Patient Gender", "Patient Sex") if c in df.columns), None)
    if sex_col is None:
        raise DatasetLayoutError(f"{csv_path}: no 'Patient Gender' column; the file has {list(df.columns)}.")
    logger.info("NIH ChestX-ray14 labels from %s (%d rows)", csv_path.name, len(df))

    out = pd.DataFrame({"image": df["Image Index"]})
    out = pd.concat([out, _findings(df["Finding Labels"], csv_path)], axis=1)
    out["patient_id"] = df["Patient ID"].map(_strip_zeros)
    out["study_id"] = [_study(p, f) for p, f in zip(df["Patient ID"], df["Follow-up #"], strict=True)]
    out["sex"] = df[sex_col].map(sex_code)
    ages = df["Patient Age"].map(age_years)
    implausible = ages.isna() & (df["Patient Age"] != "")
    if implausible.any():
        warnings.warn(f"{csv_path.name}: {int(implausible.sum())} age(s) over 120 or unreadable were set to unknown "
                      "(Data_Entry_2017_v2020.csv has them fixed).", stacklevel=2)
    out["age"] = ages.astype(float)
    out["view"] = df["View Position"].map(view_code)
    out["split"] = _official_split(root, out["image"], out["patient_id"], options)
    out = select_views(out, options.views)

    where = locate_by_name(index_files(root, {".png"}))
    out.insert(0, "path", [where.get(name, f"images/{name}") for name in out["image"]])
    return out.drop(columns="image")


def _findings(labels: pd.Series, csv_path: Path) -> pd.DataFrame:
    """The 14 finding columns from ``Cardiomegaly|Effusion`` / ``No Finding`` (all 0)."""
    known = set(FINDINGS)
    sets = [{part.strip() for part in str(text).split("|") if part.strip()} for text in labels]
    for i, names in enumerate(sets):
        stray = names - known - {"No Finding"}
        if stray:
            raise DatasetLayoutError(f"{csv_path.name} row {i + 1}: finding {sorted(stray)[0]!r} is not one of the "
                                     "14 ChestX-ray14 findings or 'No Finding'. Is it the dataset's own file?")
        if not names:
            raise DatasetLayoutError(f"{csv_path.name} row {i + 1}: 'Finding Labels' is blank (the dataset writes "
                                     "'No Finding'). Is it the dataset's own file?")
    return pd.DataFrame({f: np.array([1.0 if f in names else 0.0 for names in sets]) for f in FINDINGS},
                        index=labels.index)


def _strip_zeros(value: str) -> str:
    text = str(value).strip()
    return str(int(text)) if text.isdigit() else text


def _study(patient: str, follow_up: str) -> str:
    """``00000013_005`` for patient 13, follow-up 5: the image name's stem."""
    p, f = str(patient).strip(), str(follow_up).strip()
    if p.isdigit() and f.isdigit():
        return f"{int(p):08d}_{int(f):03d}"
    return f"{p}_{f}"


def _official_split(root: Path, images: pd.Series, patients: pd.Series, options: PrepareOptions) -> pd.Series:
    """``test`` from test_list.txt, ``train`` from train_val_list.txt minus a by-patient ``val`` carve."""
    try:
        test = set(read_lines(require_file(root, "test_list.txt")))
    except DatasetLayoutError:
        warnings.warn("NIH ChestX-ray14: test_list.txt not found, so the official test split is not used; split is "
                      "left blank and medtransfer splits by patient (put test_list.txt and train_val_list.txt in "
                      "ROOT to keep the official split).", stacklevel=3)
        return pd.Series([""] * len(images), index=images.index)
    try:
        train_val = set(read_lines(require_file(root, "train_val_list.txt")))
    except DatasetLayoutError:
        train_val = None
    split = pd.Series(np.where(images.isin(test), "test", "train"), index=images.index)
    if train_val is not None:
        neither = ~images.isin(test) & ~images.isin(train_val)
        if neither.any():
            logger.warning("NIH ChestX-ray14: %d image(s) in neither list were put in train", int(neither.sum()))
    return carve_split(split, patients, options.val_fraction, options.seed)
