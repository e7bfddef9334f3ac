"""VinDr-CXR (PhysioNet 1.0.0): image-level labels of 15,000 training and 3,000 test radiographs from Vietnam.

Files: ``annotations/image_labels_train.csv`` (``image_id``, ``rad_id``, then 28 0/1 columns: 22 local findings,
5 global diagnoses and ``No finding``; three radiologists read each training image, one row each) and
``annotations/image_labels_test.csv`` (one consensus row per image, no ``rad_id``; its "Other diseases" column is
spelt ``Other disease``); images ``train/<image_id>.dicom`` and ``test/<image_id>.dicom``. The CSVs are also found
at ROOT itself (some mirrors flatten ``annotations/``). The test file is optional (then only train is written).

Readers: a finding is positive when any radiologist marked it, as torchxrayvision's ``VinBrain_Dataset`` does
(it unions the three readers' boxes); ``No finding`` is 1 only when every reader said so, so it never
contradicts a positive finding. The test labels are the consensus of five radiologists, used as given.

Splits: the official train/test split is kept; ``val`` is carved from train by image. VinDr publishes no
patient identifiers, so each image is its own patient (``patient_id`` = ``study_id`` = ``image_id``): if one
person has several images, they may fall in different splits, and nothing in the release can prevent it.

Sex and age come from each DICOM header (read without pixels). VinDr-CXR is a PA-only release; the header's
``ViewPosition`` is used when present, else ``PA``.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

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
from medtransfer.datasets.public.rsna import dicom_tags

logger = logging.getLogger(__name__)

#: The 28 label columns of the image-level CSVs, in the files' order (test's ``Other disease`` is renamed).
FINDINGS = (
    "Aortic enlargement", "Atelectasis", "Calcification", "Cardiomegaly", "Clavicle fracture", "Consolidation",
    "Edema", "Emphysema", "Enlarged PA", "ILD", "Infiltration", "Lung Opacity", "Lung cavity", "Lung cyst",
    "Mediastinal shift", "Nodule/Mass", "Pleural effusion", "Pleural thickening", "Pneumothorax",
    "Pulmonary fibrosis", "Rib fracture", "Other lesion", "COPD", "Lung tumor", "Pneumonia", "Tuberculosis",
    "Other diseases", "No finding",
)

INFO = DatasetInfo(
    name="vindr",
    title="VinDr-CXR",
    licence="PhysioNet Credentialed Health Data License 1.5.0 (credentialed access, data use agreement)",
    url="https://physionet.org/content/vindr-cxr/1.0.0/",
    expected=("annotations/image_labels_train.csv", "annotations/image_labels_test.csv (optional)",
              "train/<image_id>.dicom", "test/<image_id>.dicom"),
    findings=FINDINGS,
    harmonise={
        "Atelectasis": "Atelectasis", "Consolidation": "Consolidation", "Infiltration": "Infiltration",
        "Pneumothorax": "Pneumothorax", "Edema": "Edema", "Emphysema": "Emphysema", "Pulmonary fibrosis": "Fibrosis",
        "Pleural effusion": "Effusion", "Pneumonia": "Pneumonia", "Pleural thickening": "Pleural_Thickening",
        "Cardiomegaly": "Cardiomegaly", "Clavicle fracture": "Fracture", "Rib fracture": "Fracture",
        "Lung Opacity": "Lung Opacity",
    },
    notes=(
        "training images: a finding is positive when any of the three radiologists marked it (torchxrayvision)",
        "no patient ids in the release: each image is its own patient; val is carved by image",
        "Nodule/Mass is not harmonised (it is neither Nodule nor Mass alone); Fracture = rib or clavicle fracture",
        "sex and age from the DICOM headers; view PA (a PA-only release) unless the header says otherwise",
    ),
)

_ALIASES = {"other disease": "Other diseases"}


def read(root: Path, options: PrepareOptions) -> pd.DataFrame:
    """One row per image of the train (and test) label files (see the module docstring for the rules).

    Raises:
        DatasetLayoutError: no ``image_labels_train.csv``, or a file without ``image_id``.
    """
    root = Path(root)
    train_csv = require_file(root, "annotations/image_labels_train.csv", "image_labels_train.csv")
    parts = [_read_labels(train_csv, "train", options)]
    test_csv = next((root / p for p in ("annotations/image_labels_test.csv", "image_labels_test.csv")
                     if (root / p).is_file()), None)
    if test_csv is not None:
        parts.append(_read_labels(test_csv, "test", options))
    else:
        logger.info("VinDr-CXR: no image_labels_test.csv; only the training images are written")
    df = pd.concat(parts, ignore_index=True)
    df["patient_id"] = df["image_id"]
    df["study_id"] = df["image_id"]
    df["path"] = df["split"] + "/" + df["image_id"] + ".dicom"
    read_back = [dicom_tags(root / p) for p in df["path"]]
    headers = [h or {} for h in read_back]
    if any(h is None for h in read_back):
        logger.warning("VinDr-CXR: %d DICOM header(s) could not be read; their sex/age are blank",
                       sum(h is None for h in read_back))
    df["sex"] = [sex_code(h.get("PatientSex")) for h in headers]
    df["age"] = [age_years(h.get("PatientAge")) for h in headers]
    df["view"] = [view_code(h.get("ViewPosition")) or "PA" for h in headers]
    df["split"] = carve_split(df["split"], df["patient_id"], options.val_fraction, options.seed)
    logger.info("VinDr-CXR: %d images (%s); no patient ids, so each image is its own patient", len(df),
                ", ".join(f"{k} {v}" for k, v in df["split"].value_counts().items()))
    return select_views(df[["path", *FINDINGS, "patient_id", "study_id", "sex", "age", "view", "split"]],
                        options.views, keep_unknown=True)  # a missing file's view is unknown: prepare reports it


def _read_labels(path: Path, split: str, options: PrepareOptions) -> pd.DataFrame:
    """One row per image: readers combined (any positive -> 1; ``No finding`` only when all say so)."""
    raw = read_csv(path, columns=("image_id",))
    raw = raw.loc[raw["image_id"] != ""]
    by_lower = {c.lower(): c for c in raw.columns}
    values = pd.DataFrame({"image_id": raw["image_id"]})
    absent = []
    for name in FINDINGS:
        source = by_lower.get(name.lower()) or next((by_lower[a] for a, n in _ALIASES.items()
                                                    if n == name and a in by_lower), None)
        if source is None:
            absent.append(name)
            values[name] = math.nan
        else:
            values[name] = finding_values(raw[source], options.uncertain, where=f"{path}: column '{source}'")
    if absent:
        logger.warning("VinDr-CXR: %s has no column(s) %s; they are blank (unknown) for its images",
                       path.name, absent)
    readers = values.groupby("image_id", sort=False)
    out = readers[list(FINDINGS[:-1])].max()
    out["No finding"] = readers["No finding"].min()
    n_readers = readers.size()
    logger.info("VinDr-CXR: %s: %d rows, %d images (%s readers per image)", path.name, len(values), len(out),
                "/".join(str(int(n)) for n in sorted(n_readers.unique())))
    out = out.reset_index()
    out["split"] = split
    return out
