"""MIMIC-CXR-JPG 2.0.0: ``mimic-cxr-2.0.0-{chexpert|negbio,split,metadata}.csv(.gz)`` and ``files/p1N/...``.

What the adapter handles:

- labels are per study (``subject_id``, ``study_id``) and are joined to every image of the study through the
  metadata file (``dicom_id``, ``ViewPosition``); images of a study without a label row are left out (logged);
- the CheXpert labeler's file is preferred; the NegBio one is read when it is the only one (same 14 columns);
  ``-1`` follows ``--uncertain``; blank stays unknown, except that ``No Finding`` = 1 gives 0 for every blank
  pathology (not ``Support Devices``), as torchxrayvision reads it;
- images lie at ``files/p10/p10000032/s50414267/<dicom_id>.jpg``; the CSVs may be gzipped;
- the official split (``train``/``validate``/``test``; ``validate`` -> ``val``) is kept; ``ViewPosition`` (PA,
  AP, LATERAL, LL, AP AXIAL...) is the view;
- sex and age are not part of MIMIC-CXR-JPG (they are in MIMIC-IV's ``patients`` table), so they are blank.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from medtransfer.datasets.public.base import (
    DatasetInfo,
    PrepareOptions,
    finding_values,
    read_csv,
    require_file,
    select_views,
    view_code,
)
from medtransfer.datasets.public.chexpert import FINDINGS, HARMONISE
from medtransfer.errors import DatasetLayoutError

logger = logging.getLogger(__name__)

INFO = DatasetInfo(
    name="mimic",
    title="MIMIC-CXR-JPG",
    licence="PhysioNet Credentialed Health Data License 1.5.0 (credentialed access, CITI training and the data "
            "use agreement)",
    url="https://physionet.org/content/mimic-cxr-jpg/2.0.0/",
    expected=("mimic-cxr-2.0.0-chexpert.csv.gz (or -negbio.csv.gz; .csv too)", "mimic-cxr-2.0.0-split.csv.gz",
              "mimic-cxr-2.0.0-metadata.csv.gz", "files/p10/p10000032/s50414267/<dicom_id>.jpg"),
    findings=FINDINGS,
    harmonise=HARMONISE,
    notes=(
        "study-level labels joined to each image of the study via the metadata file",
        "-1 by --uncertain; blank = unknown; 'No Finding' = 1 sets blank pathologies (not Support Devices) to 0",
        "official split kept (validate -> val); view from ViewPosition; sex and age not distributed (blank)",
        "chexpert labels preferred to negbio; gzipped or plain CSVs",
    ),
)

_PATHOLOGIES = tuple(f for f in FINDINGS if f not in ("No Finding", "Support Devices"))
_SPLITS = {"train": "train", "validate": "val", "val": "val", "test": "test"}


def _csv(stem: str) -> tuple[str, ...]:
    return (f"mimic-cxr-2.0.0-{stem}.csv.gz", f"mimic-cxr-2.0.0-{stem}.csv")


def read(root: Path, options: PrepareOptions) -> pd.DataFrame:
    """One row per image of the metadata file whose study has labels."""
    labels_path = require_file(root, *_csv("chexpert"), *_csv("negbio"))
    meta_path = require_file(root, *_csv("metadata"))
    split_path = require_file(root, *_csv("split"))
    labels = read_csv(labels_path, columns=("subject_id", "study_id", *FINDINGS))
    meta = read_csv(meta_path, columns=("dicom_id", "subject_id", "study_id", "ViewPosition"))
    splits = read_csv(split_path, columns=("dicom_id", "split"))
    logger.info("MIMIC-CXR-JPG labels from %s", labels_path.name)

    table = pd.DataFrame({"subject_id": labels["subject_id"], "study_id": labels["study_id"]})
    for name in FINDINGS:
        table[name] = finding_values(labels[name], options.uncertain, where=f"{labels_path.name} column {name!r}")
    healthy = table["No Finding"] == 1.0
    for name in _PATHOLOGIES:
        table.loc[healthy & table[name].isna(), name] = 0.0
    if table.duplicated(["subject_id", "study_id"]).any():
        raise DatasetLayoutError(f"{labels_path}: a study is listed twice. Is it the dataset's own file?")

    images = meta[["dicom_id", "subject_id", "study_id", "ViewPosition"]].merge(
        table, on=["subject_id", "study_id"], how="left", indicator=True)
    unlabelled = images["_merge"] == "left_only"
    if unlabelled.any():
        logger.info("MIMIC-CXR-JPG: %d image(s) of %d studies without labels left out", int(unlabelled.sum()),
                    images.loc[unlabelled, "study_id"].nunique())
    images = images.loc[~unlabelled].drop(columns="_merge").reset_index(drop=True)

    split_of = dict(zip(splits["dicom_id"], splits["split"].str.lower(), strict=True))
    raw_split = images["dicom_id"].map(split_of).fillna("")
    bad = ~raw_split.isin(list(_SPLITS))
    if bad.any():
        value = raw_split[bad].iloc[0]
        raise DatasetLayoutError(f"{split_path}: {int(bad.sum())} image(s) have split {value!r} (or none); "
                                 "expected train, validate or test. Is it the dataset's own file?")
    out = pd.DataFrame({
        "path": [f"files/p{s[:2]}/p{s}/s{t}/{d}.jpg" for s, t, d in
                 zip(images["subject_id"], images["study_id"], images["dicom_id"], strict=True)],
    })
    for name in FINDINGS:
        out[name] = images[name].to_numpy()
    out["patient_id"] = images["subject_id"].to_numpy()
    out["study_id"] = images["study_id"].to_numpy()
    out["sex"] = ""
    out["age"] = np.nan
    out["view"] = images["ViewPosition"].map(view_code).to_numpy()
    out["split"] = raw_split.map(_SPLITS).to_numpy()
    return select_views(out, options.views)
