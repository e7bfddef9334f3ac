"""Kermany et al. paediatric chest X-rays (Guangzhou, 2018): normal vs pneumonia, from folder and file names.

The dataset is distributed as folders, no CSV: ``chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg`` (Kaggle's
"chest-xray-pneumonia"; Mendeley's original has ``train`` and ``test`` only). ROOT may be the folder holding
``chest_xray`` or ``chest_xray`` itself (or Mendeley's ``CellData/chest_xray``). The Kaggle zip also carries a
duplicate ``chest_xray/chest_xray/`` tree and ``__MACOSX/`` resource forks: both are ignored (logged), so every
image is listed once, at its first-level path.

Patients come from the file names: ``person1_bacteria_1.jpeg`` and ``person1_virus_6.jpeg`` are patient
``person1`` (pneumonia; ``bacterial``/``viral`` kept in the ``subtype`` column); ``IM-0115-0001.jpeg`` is patient
``IM-0115`` and ``NORMAL2-IM-1427-0001.jpeg`` patient ``NORMAL2-IM-1427`` (normal). The ``NORMAL2-`` prefix marks
a second numbering series, so ``NORMAL2-IM-0535`` and ``IM-0535`` stay two patients (nothing in the release says
they are the same child). A name that fits neither pattern is its own patient (logged).

Splits: the official ``test`` folder stays ``test``; the official ``val`` folder (16 images) is merged into
``train`` and ``val`` is carved from it by patient (``options.val_fraction``, deterministic), because 16 images
cannot select a model. A patient found in both test and train is moved wholly to test by ``prepare``.

The images carry no age, sex or view; the dataset describes them as anterior-posterior radiographs of children
aged one to five, so ``view`` is ``AP`` for all of them (from the description, not from each image).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import pandas as pd

from medtransfer.datasets.public.base import DatasetInfo, PrepareOptions, carve_split, select_views
from medtransfer.errors import DatasetLayoutError

logger = logging.getLogger(__name__)

INFO = DatasetInfo(
    name="kermany",
    title="Paediatric chest X-rays (Kermany et al. 2018)",
    licence="CC BY 4.0",
    url="https://data.mendeley.com/datasets/rscbjbr9sj/2 (also Kaggle: paultimothymooney/chest-xray-pneumonia)",
    expected=("chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}/*.jpeg",),
    findings=("Pneumonia",),
    harmonise={"Pneumonia": "Pneumonia"},
    single_label=True,
    notes=(
        "patient from the file name: personN (pneumonia), IM-NNNN / NORMAL2-IM-NNNN (normal)",
        "the 16-image official val is merged into train; val is re-carved from train by patient",
        "bacterial/viral kept in the 'subtype' column; view is AP from the dataset description",
        "the Kaggle zip's duplicate chest_xray/chest_xray/ and __MACOSX/ folders are ignored",
    ),
)

#: Where the ``train``/``val``/``test`` folders may lie under ROOT, in order of preference.
_BASES = ("", "chest_xray", "CellData/chest_xray", "ZhangLabData/CellData/chest_xray")
_SPLITS = ("train", "val", "test")
_CLASSES = {"NORMAL": 0.0, "PNEUMONIA": 1.0}
_SUFFIXES = {".jpeg", ".jpg", ".png"}
_IGNORED = {"chest_xray", "__MACOSX"}

_PNEUMONIA_NAME = re.compile(r"^(person\d+)_(bacteria|virus)_\d+", re.IGNORECASE)
_NORMAL_NAME = re.compile(r"^((?:NORMAL2-)?IM-\d+)-", re.IGNORECASE)
_SUBTYPE = {"bacteria": "bacterial", "virus": "viral"}


def parse_name(filename: str) -> tuple[str, str]:
    """The patient id and pneumonia subtype that a Kermany file name encodes.

    Args:
        filename: the image's file name (no folder), e.g. ``person1_bacteria_1.jpeg``.

    Returns:
        ``(patient_id, subtype)``: ``("person1", "bacterial")``, ``("person1", "viral")``, ``("IM-0115", "")``,
        ``("NORMAL2-IM-1427", "")``; a name that fits neither pattern gives its stem and ``""``.

    Examples:
        >>> parse_name("NORMAL2-IM-1427-0001.jpeg")
        ('NORMAL2-IM-1427', '')
        >>> parse_name("person1527_virus_2661.jpeg")
        ('person1527', 'viral')
    """
    m = _PNEUMONIA_NAME.match(filename)
    if m:
        return m.group(1).lower(), _SUBTYPE[m.group(2).lower()]
    m = _NORMAL_NAME.match(filename)
    if m:
        return m.group(1).upper(), ""
    return Path(filename).stem, ""


def read(root: Path, options: PrepareOptions) -> pd.DataFrame:
    """One row per image of the official folders (see the module docstring for the rules).

    Raises:
        DatasetLayoutError: no ``train``/``test`` folder with ``NORMAL``/``PNEUMONIA`` sub-folders under ROOT.
    """
    root = Path(root)
    base = _find_base(root)
    _log_ignored(root, base)
    rows = []
    unparsed = 0
    for split in _SPLITS:
        split_dir = _child(base, split)
        if split_dir is None:
            continue
        for cls, value in _CLASSES.items():
            cls_dir = _child(split_dir, cls)
            if cls_dir is None:
                continue
            for name in sorted(_image_names(cls_dir)):
                patient, subtype = parse_name(name)
                if patient == Path(name).stem:
                    unparsed += 1
                rows.append({"path": (cls_dir / name).relative_to(root).as_posix(), "Pneumonia": value,
                             "patient_id": patient, "subtype": subtype if value == 1.0 else "",
                             "official_split": split})
    if not rows:
        raise DatasetLayoutError(f"{base}: the train/val/test folders hold no NORMAL/PNEUMONIA images "
                                 f"({', '.join(sorted(_SUFFIXES))}).")
    if unparsed:
        logger.warning("Kermany: %d file name(s) fit neither personN_bacteria|virus_N nor [NORMAL2-]IM-NNNN-...; "
                       "each was made its own patient", unparsed)
    df = pd.DataFrame(rows)
    df["study_id"] = ""
    df["sex"] = ""
    df["age"] = np.nan
    df["view"] = "AP"
    split = df["official_split"].replace({"val": "train"})
    df["split"] = carve_split(split, df["patient_id"], options.val_fraction, options.seed)
    logger.info("Kermany: %d images (%s); official val merged into train, %d image(s) carved to val by patient",
                len(df), ", ".join(f"{k} {v}" for k, v in df["official_split"].value_counts().items()),
                int((df["split"] == "val").sum()))
    return select_views(df, options.views)


def _child(folder: Path, name: str) -> Path | None:
    """The sub-folder ``name`` of ``folder``, matched case-insensitively (``NORMAL`` or ``normal``)."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return None
    for entry in entries:
        if entry.is_dir() and entry.name.lower() == name.lower():
            return Path(entry.path)
    return None


def _has_layout(folder: Path) -> bool:
    for split in ("train", "test"):
        split_dir = _child(folder, split)
        if split_dir is not None and any(_child(split_dir, cls) is not None for cls in _CLASSES):
            return True
    return False


def _find_base(root: Path) -> Path:
    for rel in _BASES:
        candidate = root / rel if rel else root
        if _has_layout(candidate):
            return candidate
    raise DatasetLayoutError(f"{root}: no chest_xray/train or chest_xray/test folder with NORMAL and PNEUMONIA "
                             "sub-folders here. Pass the folder that holds chest_xray/ (or chest_xray/ itself).")


def _image_names(folder: Path) -> list[str]:
    """Image file names directly in ``folder`` (no hidden files: macOS ``._x.jpeg`` forks are not images)."""
    with os.scandir(folder) as it:
        return [e.name for e in it if e.is_file() and not e.name.startswith(".")
                and os.path.splitext(e.name)[1].lower() in _SUFFIXES]


def _log_ignored(root: Path, base: Path) -> None:
    for folder in {root, base}:
        try:
            names = [e.name for e in os.scandir(folder) if e.is_dir()]
        except OSError:
            continue
        for name in names:
            if name in _IGNORED and (folder / name) != base:
                logger.info("Kermany: ignoring %s (a duplicate tree or macOS metadata in the Kaggle zip)",
                            (folder / name).relative_to(root).as_posix() or name)
