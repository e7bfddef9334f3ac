"""COVID-19 Image Data Collection (ieee8023/covid-chestxray-dataset): X-rays of COVID-19 and other pneumonias.

File: ``metadata.csv`` at the root of the repository clone (``patientid``, ``offset``, ``sex``, ``age``,
``finding``, ..., ``view``, ``modality``, ``date``, ``location``, ``folder``, ``filename``, ``doi``, ``url``,
``license``, ``clinical_notes``, ``other_notes``); images ``<folder>/<filename>`` (``images/``; CT volumes under
``volumes/`` are left out with the rest of the CT rows: only ``modality == "X-ray"`` is kept).

Findings come from the ``/``-separated ``finding`` hierarchy (``Pneumonia/Viral/COVID-19``,
``Pneumonia/Bacterial/Streptococcus``, ``Pneumonia/Fungal/Pneumocystis``, ``Pneumonia/Lipoid``, ``Tuberculosis``,
``No Finding``): each level that is named is 1 and its named siblings are 0 (``Pneumonia/Viral/SARS``: Pneumonia
1, Viral Pneumonia 1, Bacterial and Fungal 0, COVID-19 0); a level the path stops above is unknown
(``Pneumonia/Viral``: COVID-19 blank; ``Pneumonia``: the cause blank). ``No Finding`` is 0 for every finding;
``todo``, ``Unknown`` and blank are blank for every finding. torchxrayvision's ``COVID19_Dataset`` uses the same
hierarchy but reads every unnamed level as 0.

Kept: ``license`` (it varies per image: check it before redistributing anything), ``finding`` (the hierarchy as
written), ``site`` from ``location`` (the hospital or source, where given). Never copied: ``clinical_notes``,
``other_notes`` (free text about the patient), ``doi``/``url``. The collection has no split and no study ids; a
patient's images over several days share ``patient_id``.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
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

logger = logging.getLogger(__name__)

FINDINGS = ("Pneumonia", "Viral Pneumonia", "Bacterial Pneumonia", "Fungal Pneumonia", "COVID-19", "Tuberculosis")

INFO = DatasetInfo(
    name="covid",
    title="COVID-19 Image Data Collection (ieee8023)",
    licence="per image (the 'license' column: CC BY, CC BY-NC-SA, Apache 2.0...); check before redistributing",
    url="https://github.com/ieee8023/covid-chestxray-dataset",
    expected=("metadata.csv", "images/<filename>"),
    findings=FINDINGS,
    harmonise={"Pneumonia": "Pneumonia"},
    notes=(
        "X-ray rows only (CT rows and volumes/ are left out)",
        "findings from the finding hierarchy: named level 1, named siblings 0, levels not reached blank",
        "todo/Unknown findings are blank; license kept per image; clinical notes never copied",
    ),
)

_COLUMNS = ("patientid", "sex", "age", "finding", "view", "modality", "filename")
_KINDS = {"viral": "Viral Pneumonia", "bacterial": "Bacterial Pneumonia", "fungal": "Fungal Pneumonia"}
_UNKNOWN = {"", "todo", "unknown"}


def finding_row(finding: str) -> dict[str, float] | None:
    """The six finding values one ``finding`` cell gives, or None for a value outside the hierarchy.

    Examples:
        >>> finding_row("Pneumonia/Viral/COVID-19")["COVID-19"]
        1.0
        >>> import math; math.isnan(finding_row("Pneumonia")["Viral Pneumonia"])
        True
    """
    text = str(finding).strip()
    nan = math.nan
    if text.lower() in _UNKNOWN:
        return dict.fromkeys(FINDINGS, nan)
    tokens = [t.strip() for t in text.split("/") if t.strip()]
    if not tokens:
        return None
    top = tokens[0].lower()
    if top == "no finding":
        return dict.fromkeys(FINDINGS, 0.0)
    if top == "tuberculosis":
        return {**dict.fromkeys(FINDINGS, 0.0), "Tuberculosis": 1.0}
    if top != "pneumonia":
        return None
    row = {"Pneumonia": 1.0, "Tuberculosis": 0.0, **dict.fromkeys(_KINDS.values(), nan), "COVID-19": nan}
    if len(tokens) == 1:
        return row
    kind = tokens[1].lower()
    for key, name in _KINDS.items():
        row[name] = 1.0 if kind == key else 0.0
    if kind != "viral":
        row["COVID-19"] = 0.0
    elif len(tokens) > 2:
        row["COVID-19"] = 1.0 if tokens[2].upper() == "COVID-19" else 0.0
    return row


def read(root: Path, options: PrepareOptions) -> pd.DataFrame:
    """One row per X-ray image of ``metadata.csv`` (see the module docstring for the rules).

    Raises:
        DatasetLayoutError: no ``metadata.csv`` under ROOT, or a required column is missing.
    """
    root = Path(root)
    csv = require_file(root, "metadata.csv")
    raw = read_csv(csv, columns=_COLUMNS)
    xray = raw["modality"].str.lower().isin(["x-ray", "xray", "x ray", "cr", "dx"])
    if (~xray).any():
        logger.info("COVID-19 collection: %d non-X-ray row(s) (%s) left out", int((~xray).sum()),
                    ", ".join(f"{k or 'blank'} {v}" for k, v in raw.loc[~xray, "modality"].value_counts().items()))
    raw = raw.loc[xray & (raw["filename"] != "")].reset_index(drop=True)
    rows = []
    outside: Counter[str] = Counter()
    for finding in raw["finding"]:
        row = finding_row(finding)
        if row is None:
            outside[finding] += 1
            row = dict.fromkeys(FINDINGS, math.nan)
        rows.append(row)
    if outside:
        logger.warning("COVID-19 collection: finding value(s) outside the Pneumonia/... hierarchy are blank: %s",
                       ", ".join(f"{k!r} ({v})" for k, v in outside.most_common(10)))
    df = pd.DataFrame(rows, columns=list(FINDINGS))
    folder = raw["folder"] if "folder" in raw.columns else pd.Series("images", index=raw.index)
    folder = folder.where(folder != "", "images")
    df.insert(0, "path", folder + "/" + raw["filename"])
    df["patient_id"] = raw["patientid"]
    df["study_id"] = ""
    df["sex"] = raw["sex"].map(sex_code)
    df["age"] = raw["age"].map(age_years)
    df["view"] = raw["view"].map(view_code)
    df["site"] = raw["location"] if "location" in raw.columns else ""
    df["split"] = ""
    df["finding"] = raw["finding"]
    df["license"] = raw["license"] if "license" in raw.columns else ""
    licences = df["license"].replace("", "unstated").value_counts()
    logger.info("COVID-19 collection: %d X-ray images of %d patients; licences: %s", len(df),
                df["patient_id"].nunique(), ", ".join(f"{k} {v}" for k, v in licences.items()))
    return select_views(df, options.views)
