"""RSNA Pneumonia Detection Challenge (2018): one row per training DICOM, its boxes collapsed to a label.

Files (Kaggle's stage 2 release): ``stage_2_train_labels.csv`` (``patientId,x,y,width,height,Target``: one row
per box, so an image with two boxes has two rows; ``Target`` 0 rows have blank boxes), the optional
``stage_2_detailed_class_info.csv`` (``patientId,class``: ``Normal``, ``No Lung Opacity / Not Normal``,
``Lung Opacity``) and ``stage_2_train_images/<patientId>.dcm``. The stage 1 names (``stage_1_...``) are read when
the stage 2 ones are absent.

Finding: ``Pneumonia`` = ``Target`` (a lung opacity suspicious for pneumonia). torchxrayvision gives the same
``Target`` to both Pneumonia and Lung Opacity; here the dataset is single-label (one finding, ``label``
``normal``/``pneumonia``), so only ``Pneumonia`` is written. Note that ``normal`` means "no opacity suspicious
for pneumonia": it includes the ``No Lung Opacity / Not Normal`` images (kept in the ``detailed_class`` column
when the class file is present). ``boxes`` counts the boxes of each image.

Sex, age and view come from each DICOM's header (``PatientSex``, ``PatientAge``, ``ViewPosition``; read without
the pixels). ``patientId`` is a per-image pseudonymous token of the public release: it is ``patient_id`` and
``study_id``. The images are a subset of NIH ChestX-ray14 and RSNA does not link images of the same person, so
patient-level splits hold only as far as those tokens do. The stage 2 test labels were never published: the
test images are not listed and ``split`` is blank (medtransfer splits by patient).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from medtransfer.datasets.public.base import (
    DatasetInfo,
    PrepareOptions,
    age_years,
    read_csv,
    require_file,
    select_views,
    sex_code,
    view_code,
)
from medtransfer.errors import DatasetLayoutError

logger = logging.getLogger(__name__)

INFO = DatasetInfo(
    name="rsna",
    title="RSNA Pneumonia Detection Challenge",
    licence="RSNA/Kaggle competition data terms (non-commercial research)",
    url="https://www.kaggle.com/c/rsna-pneumonia-detection-challenge/data",
    expected=("stage_2_train_labels.csv", "stage_2_detailed_class_info.csv (optional)",
              "stage_2_train_images/<patientId>.dcm"),
    findings=("Pneumonia",),
    harmonise={"Pneumonia": "Pneumonia"},
    single_label=True,
    notes=(
        "several box rows per image collapse to one row; 'boxes' counts them",
        "label normal/pneumonia = Target; 'normal' includes 'No Lung Opacity / Not Normal' (see detailed_class)",
        "sex, age and view from the DICOM headers",
        "patientId is per image (a subset of NIH ChestX-ray14, not linked by person); no public test labels",
    ),
)

_STAGES = ("stage_2", "stage_1")
_TAGS = ("PatientSex", "PatientAge", "ViewPosition")


def read(root: Path, options: PrepareOptions) -> pd.DataFrame:
    """One row per image of the training labels (see the module docstring for the rules).

    Raises:
        DatasetLayoutError: no ``stage_2_train_labels.csv`` (nor stage 1's), a required column is missing, or a
            ``Target`` is not 0/1.
    """
    root = Path(root)
    labels_csv = require_file(root, *(f"{s}_train_labels.csv" for s in _STAGES))
    stage = labels_csv.name[: len("stage_2")]
    boxes = read_csv(labels_csv, columns=("patientId", "x", "y", "width", "height", "Target"))
    boxes = boxes.loc[boxes["patientId"] != ""]
    bad = ~boxes["Target"].isin(["0", "1"])
    if bad.any():
        raise DatasetLayoutError(f"{labels_csv}: Target {boxes.loc[bad, 'Target'].iloc[0]!r} is not 0 or 1 "
                                 f"({int(bad.sum())} row(s)).")
    boxes = boxes.assign(target=boxes["Target"].astype(float), box=(boxes["x"] != "").astype(int))
    per_image = boxes.groupby("patientId", sort=False).agg(target=("target", "max"), low=("target", "min"),
                                                           boxes=("box", "sum"))
    conflicting = int((per_image["target"] != per_image["low"]).sum())
    if conflicting:
        logger.warning("RSNA: %d image(s) have both Target 0 and 1 rows; read as 1 (a box was drawn)", conflicting)
    df = pd.DataFrame({"patient_id": per_image.index.astype(str), "Pneumonia": per_image["target"].to_numpy(),
                       "boxes": per_image["boxes"].to_numpy().astype(int)})
    df["path"] = _image_folder(root, stage) + "/" + df["patient_id"] + ".dcm"
    df["study_id"] = df["patient_id"]
    detail = _detailed_classes(root, stage)
    if detail is not None:
        df["detailed_class"] = df["patient_id"].map(detail).fillna("")
    read_back = [dicom_tags(root / p) for p in df["path"]]
    headers = [h or {} for h in read_back]
    df["sex"] = [sex_code(h.get("PatientSex")) for h in headers]
    df["age"] = [age_years(h.get("PatientAge")) for h in headers]
    df["view"] = [view_code(h.get("ViewPosition")) for h in headers]
    df["split"] = ""
    unreadable = sum(h is None for h in read_back)
    if unreadable:
        logger.warning("RSNA: %d DICOM header(s) could not be read; their sex/age/view are blank", unreadable)
    logger.info("RSNA: %d images from %d box rows (%d with Target 1)", len(df), len(boxes),
                int((df["Pneumonia"] == 1.0).sum()))
    columns = ["path", "Pneumonia", "patient_id", "study_id", "sex", "age", "view", "split", "boxes"]
    columns += ["detailed_class"] if detail is not None else []
    return select_views(df[columns], options.views, keep_unknown=True)  # missing files: reported by prepare


def _image_folder(root: Path, stage: str) -> str:
    """``stage_2_train_images`` (or stage 1's when only that one exists)."""
    for s in (stage, *_STAGES):
        if (root / f"{s}_train_images").is_dir():
            return f"{s}_train_images"
    return f"{stage}_train_images"


def _detailed_classes(root: Path, stage: str) -> pd.Series | None:
    """patientId -> class from the optional class file (its rows repeat per box, with the same class)."""
    path = next((root / f"{s}_detailed_class_info.csv" for s in (stage, *_STAGES)
                 if (root / f"{s}_detailed_class_info.csv").is_file()), None)
    if path is None:
        logger.info("RSNA: no %s_detailed_class_info.csv; the detailed_class column is left out", stage)
        return None
    info = read_csv(path, columns=("patientId", "class"))
    return info.drop_duplicates("patientId").set_index("patientId")["class"]


def dicom_tags(path: Path, tags: Sequence[str] = _TAGS) -> dict[str, str] | None:
    """Some header fields of one DICOM, read without its pixels (RSNA and VinDr-CXR use it).

    Args:
        path: the file.
        tags: DICOM keywords, e.g. ``("PatientSex", "PatientAge", "ViewPosition")``.

    Returns:
        keyword -> value as text (``""`` when absent); ``{}`` when the file is not there (``prepare`` reports
        missing files); None when it cannot be read as DICOM.
    """
    import pydicom

    from medtransfer.data.dicom import quiet_pydicom

    if not path.is_file():
        return {}
    try:
        # quiet: pydicom warns on every non-standard value (RSNA's ages are "51", not "051Y") and its messages
        # can quote raw header values.
        with quiet_pydicom():
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(tags))
            return {tag: str(ds.get(tag) or "").strip() for tag in tags}
    except Exception as exc:  # noqa: BLE001 - pydicom raises many types on corrupt input; all mean "unreadable"
        logger.debug("cannot read the DICOM header of %s (%s)", path.name, type(exc).__name__)
        return None
