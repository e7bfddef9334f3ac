"""From an adapter's rows to the files ``medtransfer datasets prepare`` writes: checks, harmonising, CSV, summary.

One adapter returns the rows of :mod:`medtransfer.datasets.public.base`'s contract; this module, the same for
every dataset, normalises them, filters views, walks ROOT once to find the listed images missing on disk,
keeps patients inside one split, maps findings to :data:`~medtransfer.datasets.public.base.VOCABULARY` when
asked, writes the labels CSV and ``<stem>.summary.json`` atomically, and says which ``medtransfer train``
command uses them.
"""

from __future__ import annotations

import logging
import math
import shlex
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medtransfer import io
from medtransfer.datasets.public.base import (
    FINDINGS_MODES,
    SPLIT_VALUES,
    UNCERTAIN_POLICIES,
    VOCABULARY,
    DatasetInfo,
    PrepareOptions,
    index_files,
    select_views,
    sex_code,
    view_code,
)
from medtransfer.errors import ConfigError, DatasetLayoutError

logger = logging.getLogger(__name__)

#: Order of the identity columns in the CSV (after ``path``, ``label`` and the findings).
_ID_ORDER = ("patient_id", "study_id", "sex", "age", "view", "site", "split")
#: When a patient appears in several official splits, all their rows go to the most held-out one.
_HOLD_OUT_RANK = {"test": 2, "val": 1, "train": 0}
_MISSING_LISTED = 20


@dataclass
class PreparedDataset:
    """What ``prepare`` wrote.

    Attributes:
        name: the dataset's registry name.
        csv_path: the labels CSV.
        summary_path: the summary JSON beside it.
        summary: its content (rows, patients, studies, per split counts per finding, missing files, views).
        frame: the rows written (finding columns as floats: 1.0, 0.0, NaN).
        label_columns: the finding columns to train on (at least one positive in train), or None for a
            single-label dataset (its ``label`` column).
        train_command: the ``medtransfer train`` command line that uses the CSV.
    """

    name: str
    csv_path: Path
    summary_path: Path
    summary: dict[str, Any]
    frame: pd.DataFrame
    label_columns: list[str] | None
    train_command: str


def prepare_adapter(info: DatasetInfo, read: Callable[[Path, PrepareOptions], pd.DataFrame], root: str | Path, *,
                    out: str | Path | None = None, findings: str = "native", uncertain: str = "ignore",
                    views: Sequence[str] | None = None, allow_missing: bool = False, val_fraction: float = 0.1,
                    seed: int = 0) -> PreparedDataset:
    """Run one adapter and write its labels CSV and summary (the work of
    :func:`medtransfer.datasets.public.prepare`, which looks the adapter up by name; see it for the arguments)."""
    findings, uncertain = str(findings).strip().lower(), str(uncertain).strip().lower()
    if findings == "harmonized":
        findings = "harmonised"
    if findings not in FINDINGS_MODES:
        raise ConfigError(f"findings '{findings}' is not one of {list(FINDINGS_MODES)}.")
    if uncertain not in UNCERTAIN_POLICIES:
        raise ConfigError(f"uncertain '{uncertain}' is not one of {list(UNCERTAIN_POLICIES)}.")
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction {val_fraction} is not in [0, 1).")
    view_codes = tuple(view_code(v) for v in views if view_code(v)) if views else None
    options = PrepareOptions(uncertain=uncertain, views=view_codes or None, val_fraction=float(val_fraction),
                             seed=int(seed))
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetLayoutError(f"{root}: not a folder. Pass the folder where {info.title} was extracted "
                                 f"(it holds {', '.join(info.expected)}); get the dataset from {info.url}.")
    csv_path = Path(out).expanduser() if out is not None else Path(f"{info.name}_labels.csv")
    if csv_path.is_dir():
        csv_path = csv_path / f"{info.name}_labels.csv"
    with warnings.catch_warnings(record=True) as caught:  # kept in the summary, then passed on
        warnings.simplefilter("always")
        table, columns, missing, duplicates, moved = _rows(info, read, root, options, findings, allow_missing)
    notes = list(dict.fromkeys(str(w.message) for w in caught if _ours(w.filename)))
    for w in caught:
        if not _ours(w.filename):  # another library's warning: passed on as it was
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    summary_path = csv_path.with_name(f"{csv_path.stem}.summary.json")
    label_columns = None if info.single_label else _trainable(table, columns)
    command = _train_command(info, root, csv_path, label_columns)
    summary = _summary(info, root, csv_path, table, columns, options, findings, allow_missing, missing, duplicates,
                       moved, label_columns, command)
    summary["warnings"] = notes
    io.write_text(csv_path, _csv_text(table, columns))
    io.write_json(summary_path, summary)
    logger.info("wrote %s (%d rows) and %s", csv_path, len(table), summary_path)
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=3)
    return PreparedDataset(info.name, csv_path, summary_path, summary, table, label_columns, command)


# ----------------------------------------------------------------------------------------------- the rows


def _ours(filename: str) -> bool:
    """Whether a warning was raised in this package (an adapter or the checks here): it goes in the summary."""
    return "/datasets/public/" in str(filename).replace("\\", "/")


def _rows(info: DatasetInfo, read: Callable[[Path, PrepareOptions], pd.DataFrame], root: Path,
          options: PrepareOptions, findings: str, allow_missing: bool
          ) -> tuple[pd.DataFrame, list[str], list[str], int, int]:
    """(the table to write, its finding columns, missing files, duplicates dropped, patients moved)."""
    try:
        df = read(root, options)
    except DatasetLayoutError as exc:
        raise DatasetLayoutError(f"{exc} {info.title} ({info.name}) expects {', '.join(info.expected)} under ROOT; "
                                 f"get it from {info.url}.") from None
    df, duplicates = _normalise(df, info)
    # rows of unknown view (an adapter keeps them when the view comes from the image's header) reach the
    # missing-file check, then the view filter drops what is left of them
    df = select_views(df, options.views, keep_unknown=True)
    df, missing = _drop_missing(df, root, info, allow_missing)
    df = select_views(df, options.views)
    if df.empty:
        raise DatasetLayoutError(f"{root}: no {info.title} image is left after the view filter "
                                 f"{list(options.views or [])}. Run without --views to see the views present.")
    df, moved = _one_split_per_patient(df)
    if info.single_label and "label" not in df.columns:
        df = _single_label(df, info)
    table = _harmonised(df, info) if findings == "harmonised" else df
    columns = list(VOCABULARY) if findings == "harmonised" else list(info.findings)
    return _ordered(table, columns), columns, missing, duplicates, moved


def _normalise(df: pd.DataFrame, info: DatasetInfo) -> tuple[pd.DataFrame, int]:
    """Check an adapter kept the contract (a bug otherwise, so ValueError) and normalise the identity columns."""
    missing = [c for c in ("path", *info.findings) if c not in df.columns]
    if missing:
        raise ValueError(f"adapter {info.name} returned no column(s) {missing}")
    df = df.reset_index(drop=True).copy()
    df["path"] = df["path"].astype(str).str.replace("\\", "/", regex=False)
    for col in info.findings:
        values = pd.to_numeric(df[col], errors="coerce").astype(float)
        bad = ~values.isin([0.0, 1.0]) & values.notna()
        if bad.any():
            raise ValueError(f"adapter {info.name}: finding {col} holds {values[bad].iloc[0]} (expected 1, 0, NaN)")
        df[col] = values
    for col in ("patient_id", "study_id", "view", "site", "split"):
        if col not in df.columns:
            df[col] = ""
        df[col] = df[col].fillna("").astype(str).str.strip()
    df["sex"] = df["sex"].map(sex_code) if "sex" in df.columns else ""
    df["age"] = pd.to_numeric(df["age"], errors="coerce").astype(float) if "age" in df.columns else np.nan
    df["view"] = df["view"].map(view_code)
    df["split"] = df["split"].str.lower()
    bad_split = ~df["split"].isin([*SPLIT_VALUES, ""])
    if bad_split.any():
        raise ValueError(f"adapter {info.name}: split {df['split'][bad_split].iloc[0]!r} is not train/val/test")
    if (df["split"] == "").any() and (df["split"] != "").any():
        raise ValueError(f"adapter {info.name}: split is blank for some rows only")
    dup = df["path"].duplicated()
    if dup.any():
        warnings.warn(f"{info.title}: {int(dup.sum())} image(s) listed twice in the dataset's files; the first "
                      "listing of each is kept.", stacklevel=2)
        df = df.loc[~dup].reset_index(drop=True)
    return df, int(dup.sum())


def _drop_missing(df: pd.DataFrame, root: Path, info: DatasetInfo, allow: bool) -> tuple[pd.DataFrame, list[str]]:
    """One walk of ROOT: the listed images not on disk fail the run, or are dropped with ``allow``."""
    suffixes = {Path(p).suffix.lower() for p in df["path"]}
    present = index_files(root, suffixes)
    gone = ~df["path"].isin(present)
    missing = df.loc[gone, "path"].tolist()
    if not missing:
        return df, []
    n, total = len(missing), len(df)
    examples = ", ".join(missing[:5])
    if not allow:
        hint = (" None of the listed images is there: is ROOT the dataset's top folder?" if n == total else "")
        raise DatasetLayoutError(f"{root}: {n} of the {total} images that {info.title}'s files list are not on "
                                 f"disk (e.g. {examples}).{hint} Finish the download and extraction, or pass "
                                 "--allow-missing to leave them out (they are counted in the summary).")
    if n == total:
        raise DatasetLayoutError(f"{root}: none of the {total} images that {info.title}'s files list is on disk "
                                 f"(e.g. {examples}). Is ROOT the dataset's top folder?")
    warnings.warn(f"{info.title}: {n} listed image(s) are not on disk and were left out (e.g. {examples}).",
                  stacklevel=2)
    return df.loc[~gone].reset_index(drop=True), missing


def _one_split_per_patient(df: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """Move every patient found in several splits wholly to the most held-out of them (test > val > train).

    ``medtransfer train`` refuses a CSV whose patients cross splits (leakage); official splits that do (or a
    patient id shared by two studies in different splits) are mended here, keeping the test set whole.
    """
    known = (df["split"] != "") & (df["patient_id"] != "")
    if not known.any():
        return df, 0
    ranks = df.loc[known, "split"].map(_HOLD_OUT_RANK)
    per_patient = ranks.groupby(df.loc[known, "patient_id"]).agg(["min", "max"])
    crossing = per_patient[per_patient["min"] != per_patient["max"]]
    if crossing.empty:
        return df, 0
    by_rank = {v: k for k, v in _HOLD_OUT_RANK.items()}
    target = crossing["max"].map(by_rank)
    rows = known & df["patient_id"].isin(target.index)
    df = df.copy()
    df.loc[rows, "split"] = df.loc[rows, "patient_id"].map(target)
    warnings.warn(f"{len(crossing)} patient(s) appear in more than one of the dataset's splits; each was moved "
                  "wholly to the most held-out one (test, then val), so no patient crosses splits.", stacklevel=2)
    return df, len(crossing)


def _single_label(df: pd.DataFrame, info: DatasetInfo) -> pd.DataFrame:
    """A binary dataset's ``label``: the finding's name (lower case) when 1, ``normal`` when 0; blank rows go."""
    finding = info.findings[0]
    values = df[finding]
    unknown = values.isna()
    if unknown.any():
        warnings.warn(f"{info.title}: {int(unknown.sum())} image(s) without a {finding} label were left out.",
                      stacklevel=2)
        df = df.loc[~unknown].reset_index(drop=True)
        values = df[finding]
    df = df.copy()
    df["label"] = np.where(values == 1.0, finding.lower(), "normal")
    return df


def _harmonised(df: pd.DataFrame, info: DatasetInfo) -> pd.DataFrame:
    """The 18 vocabulary columns: the max over the native columns mapped to each (NaN where none is known);
    a vocabulary finding the dataset never labels is NaN for every row, never 0."""
    out = df.drop(columns=list(info.findings))
    for name in VOCABULARY:
        sources = [f for f in info.findings if info.harmonise.get(f) == name]
        out[name] = df[sources].max(axis=1, skipna=True) if sources else np.nan
    return out


def _ordered(df: pd.DataFrame, findings: list[str]) -> pd.DataFrame:
    """``path``, ``label`` (single-label), findings, identity columns, then the adapter's extra columns."""
    head = ["path", *(["label"] if "label" in df.columns else []), *findings]
    ids = [c for c in _ID_ORDER if c in df.columns and not (c == "site" and (df[c] == "").all())]
    rest = [c for c in df.columns if c not in head and c not in ids and c not in _ID_ORDER]
    return df[head + ids + rest].reset_index(drop=True)


def _trainable(df: pd.DataFrame, findings: list[str]) -> list[str]:
    """Finding columns with at least one positive in the training rows (all rows when there is no split)."""
    train = df.loc[df["split"] == "train"] if (df["split"] == "train").any() else df
    return [f for f in findings if (train[f] == 1.0).any()]


def _train_command(info: DatasetInfo, root: Path, csv_path: Path, label_columns: list[str] | None) -> str:
    parts = ["medtransfer", "train", str(root), "--labels", str(csv_path)]
    if label_columns is not None:
        parts += ["--label-columns", ",".join(label_columns)]
    parts += ["--out", f"runs/{info.name}"]
    return shlex.join(parts)


# ------------------------------------------------------------------------------------------------- output


def _csv_text(df: pd.DataFrame, findings: list[str]) -> str:
    """CSV text with findings as ``1``/``0``/blank and ages without a trailing ``.0``."""
    out = df.copy()
    for col in findings:
        out[col] = out[col].map(lambda v: "" if v != v else str(int(v)))
    out["age"] = out["age"].map(lambda v: "" if v != v else (str(int(v)) if float(v).is_integer() else str(v)))
    return out.to_csv(index=False, lineterminator="\n")


def _counts(df: pd.DataFrame, findings: list[str]) -> dict[str, Any]:
    return {
        "rows": len(df),
        "patients": int(df.loc[df["patient_id"] != "", "patient_id"].nunique()),
        "findings": {f: {"positive": int((df[f] == 1.0).sum()), "negative": int((df[f] == 0.0).sum()),
                         "unknown": int(df[f].isna().sum())} for f in findings},
    }


def _summary(info: DatasetInfo, root: Path, csv_path: Path, df: pd.DataFrame, findings: list[str],
             options: PrepareOptions, mode: str, allow_missing: bool, missing: list[str], duplicates: int,
             moved: int, label_columns: list[str] | None, command: str) -> dict[str, Any]:
    splits = {s: _counts(df.loc[df["split"] == s], findings) for s in SPLIT_VALUES if (df["split"] == s).any()}
    studies = df.loc[df["study_id"] != "", ["patient_id", "study_id"]].drop_duplicates()
    ages = df["age"].dropna()
    return {
        "dataset": info.name,
        "title": info.title,
        "licence": info.licence,
        "url": info.url,
        "root": str(root),
        "csv": str(csv_path),
        "options": {"findings": mode, "uncertain": options.uncertain, "views": list(options.views or []),
                    "allow_missing": allow_missing, "val_fraction": options.val_fraction, "seed": options.seed},
        "rows": len(df),
        "patients": int(df.loc[df["patient_id"] != "", "patient_id"].nunique()),
        "studies": len(studies),
        "finding_columns": findings,
        "label_columns": label_columns,
        "single_label": info.single_label,
        "labels": ({str(k): int(v) for k, v in df["label"].value_counts().items()} if "label" in df.columns
                   else None),
        "all": _counts(df, findings),
        "splits": splits,
        "official_split": bool(splits),
        "views": {(k or "unknown"): int(v) for k, v in df["view"].value_counts().items()},
        "sex": {(k or "unknown"): int(v) for k, v in df["sex"].value_counts().items()},
        "age": {"known": len(ages), "median": float(ages.median()) if len(ages) else math.nan},
        "missing_files": {"count": len(missing), "first": missing[:_MISSING_LISTED]},
        "duplicates_dropped": duplicates,
        "patients_moved_to_one_split": moved,
        "train_command": command,
    }
