"""PadChest (BIMCV, Hospital San Juan, Alicante): 160,000 radiographs with findings mined from their reports.

File: ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv`` (or ``.csv.gz``): ``ImageID`` (the PNG's file
name), ``ImageDir`` (its folder, ``0`` to ``54``), ``StudyDate_DICOM``, ``StudyID``, ``PatientID``,
``PatientBirth`` (year), ``PatientSex_DICOM``, ``Projection`` (``PA``, ``L``, ``AP``, ``AP_horizontal``...),
``MethodLabel`` (``Physician`` for the ~27% labelled by hand, ``RNN_model`` for the rest) and ``Labels``, a
Python-list-like string of English terms (``['pneumonia', 'pleural effusion']``, ``['normal']``). Images lie in
``<ImageDir>/<ImageID>``; a release with every PNG in ROOT itself (no numbered folders) is read too.

Findings: PadChest's 174 terms are grouped into torchxrayvision's ``PC_Dataset`` pathologies. torchxrayvision
matches each pathology as a substring of the label string; here each group is an explicit list of terms
(:data:`TERMS`) that reproduces those matches minus their false friends: ``pseudonodule`` is not a nodule,
``subcutaneous emphysema`` not emphysema, ``pericardial effusion`` not a pleural effusion, and a breast or soft
tissue mass not a lung mass. The term list of a report is exhaustive (PadChest labels every finding the report
names), so a finding absent from a labelled image is 0, and ``['normal']`` is 0 for all. An image whose label
list is missing, empty, unparseable, or holds only ``exclude``/``unchanged``/``suboptimal study`` has no stated
findings: every finding is blank (unknown), and the rows are counted in the log and in the summary's unknowns.

Other columns: ``age`` = study year - birth year (the birth year itself is never written); ``view`` from
``Projection`` (``L`` -> ``LATERAL``, ``AP_horizontal`` -> ``AP SUPINE``, as torchxrayvision's "AP Supine");
``label_method`` keeps ``MethodLabel`` (evaluate on the ``Physician`` rows for hand-labelled ground truth).
PadChest defines no split: ``split`` is blank and medtransfer splits by patient. About twenty images of the
release are known to be unreadable; they are found by ``prepare``'s missing-file check or at indexing.
"""

from __future__ import annotations

import ast
import logging
import math
from pathlib import Path

import numpy as np
import pandas as pd

from medtransfer.datasets.public.base import (
    VOCABULARY,
    DatasetInfo,
    PrepareOptions,
    read_csv,
    require_file,
    select_views,
    sex_code,
    view_code,
)

logger = logging.getLogger(__name__)

#: Native finding -> the PadChest terms (lower case) that make it positive; torchxrayvision's PC_Dataset groups.
TERMS: dict[str, tuple[str, ...]] = {
    "Atelectasis": ("atelectasis", "laminar atelectasis", "lobar atelectasis", "segmental atelectasis",
                    "round atelectasis", "total atelectasis", "atelectasis basal"),
    "Consolidation": ("consolidation", "air bronchogram"),
    "Infiltration": ("infiltrates", "interstitial pattern", "ground glass pattern", "reticular interstitial pattern",
                     "reticulonodular interstitial pattern", "alveolar pattern", "consolidation", "air bronchogram",
                     "miliary opacities"),
    "Pneumothorax": ("pneumothorax", "hydropneumothorax"),
    "Edema": ("pulmonary edema",),
    "Emphysema": ("emphysema",),
    "Fibrosis": ("pulmonary fibrosis",),
    "Effusion": ("pleural effusion", "loculated pleural effusion", "loculated fissural effusion"),
    "Pneumonia": ("pneumonia", "atypical pneumonia"),
    "Pleural_Thickening": ("pleural thickening", "apical pleural thickening", "calcified pleural thickening"),
    "Cardiomegaly": ("cardiomegaly",),
    "Nodule": ("nodule", "multiple nodules"),
    "Mass": ("mass", "pulmonary mass", "mediastinal mass", "pleural mass"),
    "Hernia": ("hiatal hernia",),
    "Fracture": ("fracture", "rib fracture", "callus rib fracture", "clavicle fracture", "humeral fracture",
                 "vertebral fracture"),
    "Granuloma": ("granuloma", "calcified granuloma"),
    "Flattened Diaphragm": ("flattened diaphragm",),
    "Bronchiectasis": ("bronchiectasis",),
    "Aortic Elongation": ("aortic elongation", "descendent aortic elongation", "ascendent aortic elongation",
                          "supra aortic elongation"),
    "Scoliosis": ("scoliosis",),
    "Hilar Enlargement": ("hilar enlargement", "vascular hilar enlargement", "adenopathy", "calcified adenopathy",
                          "calcified mediastinal adenopathy", "pulmonary artery enlargement"),
    "Tuberculosis": ("tuberculosis", "tuberculosis sequelae"),
    "Air Trapping": ("air trapping",),
    "Costophrenic Angle Blunting": ("costophrenic angle blunting",),
    "Aortic Atheromatosis": ("aortic atheromatosis",),
    "Hemidiaphragm Elevation": ("hemidiaphragm elevation",),
    "Support Devices": ("pacemaker", "single chamber device", "dual chamber device", "electrical device"),
    "Tube": ("nsg tube", "endotracheal tube", "tracheostomy tube", "chest drain tube",
             "ventriculoperitoneal drain tube", "double j stent"),
}

#: Terms that state no finding: a list holding only these is "not stated" (blank), not "normal".
UNINFORMATIVE = frozenset({"", "exclude", "unchanged", "suboptimal study"})

CSV_NAMES = ("PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv",
             "PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv.gz", "PADCHEST_chest_x_ray_images_labels_160K*.csv*")

INFO = DatasetInfo(
    name="padchest",
    title="PadChest",
    licence="PadChest Dataset Research Use Agreement (BIMCV; non-commercial research, request required)",
    url="https://bimcv.cipf.es/bimcv-projects/padchest/",
    expected=("PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv", "<ImageDir>/<ImageID> (0/ ... 54/)"),
    findings=tuple(TERMS),
    harmonise={name: name for name in TERMS if name in VOCABULARY},
    notes=(
        "174 report terms grouped as torchxrayvision's PC_Dataset, by explicit term lists (no substring matches)",
        "absent from a labelled image = 0 (term lists are exhaustive); empty/unparseable/'exclude' labels = blank",
        "age = study year - birth year; label_method: Physician (hand) or RNN_model; no official split",
    ),
)

_COLUMNS = ("ImageID", "ImageDir", "StudyDate_DICOM", "StudyID", "PatientID", "PatientBirth", "PatientSex_DICOM",
            "Projection", "Labels")
_PROJECTIONS = {"AP_HORIZONTAL": "AP SUPINE", "EXCLUDE": "", "UNK": ""}


def parse_labels(text: str) -> list[str] | None:
    """The terms of one ``Labels`` cell, stripped and lower case; None when the cell states no finding.

    Examples:
        >>> parse_labels("['pneumonia', ' pleural effusion', '']")
        ['pneumonia', 'pleural effusion', '']
        >>> parse_labels("['exclude']") is None
        True
    """
    text = str(text).strip()
    if not text.startswith("["):
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    if not isinstance(value, list | tuple):
        return None
    terms = [str(t).strip().lower() for t in value]
    return terms if any(t not in UNINFORMATIVE for t in terms) else None


def read(root: Path, options: PrepareOptions) -> pd.DataFrame:
    """One row per image of the labels CSV (see the module docstring for the rules).

    Raises:
        DatasetLayoutError: no PadChest labels CSV under ROOT, or a required column is missing.
    """
    root = Path(root)
    csv = require_file(root, *CSV_NAMES)
    raw = read_csv(csv, columns=_COLUMNS)
    raw = raw.loc[raw["ImageID"] != ""].reset_index(drop=True)
    terms = [parse_labels(t) for t in raw["Labels"]]
    stated = np.array([t is not None for t in terms])
    df = pd.DataFrame({"path": _paths(root, raw)})
    for name, group in TERMS.items():
        wanted = set(group)
        df[name] = [(1.0 if wanted.intersection(t) else 0.0) if t is not None else math.nan for t in terms]
    df["patient_id"] = raw["PatientID"]
    df["study_id"] = raw["StudyID"]
    df["sex"] = raw["PatientSex_DICOM"].map(sex_code)
    df["age"] = _ages(raw["StudyDate_DICOM"], raw["PatientBirth"])
    df["view"] = [_PROJECTIONS.get(p.strip().upper(), view_code(p)) for p in raw["Projection"]]
    df["split"] = ""
    if "MethodLabel" in raw.columns:
        df["label_method"] = raw["MethodLabel"]
    unknown = int((~stated).sum())
    if unknown:
        logger.warning("PadChest: %d of %d image(s) have no stated findings (label list missing, empty, "
                       "unparseable or only exclude/unchanged/suboptimal study); their findings are blank",
                       unknown, len(df))
    known_terms = {t for group in TERMS.values() for t in group} | UNINFORMATIVE | {"normal"}
    other = sorted({t for ts in terms if ts for t in ts} - known_terms)
    logger.info("PadChest: %d images of %d patients; %d report term(s) outside the finding groups are not "
                "written (e.g. %s)", len(df), df["patient_id"].nunique(), len(other), ", ".join(other[:5]))
    return select_views(df, options.views)


def _paths(root: Path, raw: pd.DataFrame) -> pd.Series:
    """``<ImageDir>/<ImageID>``; ``<ImageID>`` alone when ROOT holds none of the numbered folders."""
    dirs = raw["ImageDir"].str.replace(r"\.0$", "", regex=True)
    names = raw["ImageID"].where(raw["ImageID"].str.lower().str.endswith(".png"), raw["ImageID"] + ".png")
    if not any((root / d).is_dir() for d in dirs.unique() if d):
        logger.info("PadChest: no numbered image folders (0/ ... 54/) under %s; reading the PNGs from ROOT itself",
                    root)
        return names
    return dirs.where(dirs == "", dirs + "/") + names


def _ages(study_dates: pd.Series, birth_years: pd.Series) -> pd.Series:
    """Study year minus birth year (NaN when either is missing or the result is outside 0-120)."""
    study = pd.to_numeric(study_dates.str[:4], errors="coerce")
    birth = pd.to_numeric(birth_years, errors="coerce")
    age = (study - birth).astype(float)
    return age.where((age >= 0) & (age <= 120))
