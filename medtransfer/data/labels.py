"""Labels: from class sub-folders or a labels CSV, validated row by row, plus what the classes mean.

A labels CSV has a ``path`` column relative to the data folder (a file, or the folder of a DICOM series) and
either one ``label`` column (class names) or several 0/1/blank columns chosen with ``label_columns``
(multi-label; blank = unknown, masked from the loss). Optional columns: ``patient_id``, ``study_id``, ``sex``,
``age``, ``site``, ``view``, ``split``; other columns are ignored (they are never copied to outputs, since
they may hold identifiers). Every problem raises one :class:`ManifestError` that names the row.

Row numbers count data rows from 1; the line number (header = line 1) is given too, for editors.
"""

from __future__ import annotations

import difflib
import io
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from medtransfer.data.headers import parse_age, parse_sex
from medtransfer.data.manifest import ACQ_COLUMNS, ID_COLUMNS, SPLITS, SUBGROUP_COLUMNS, Task
from medtransfer.errors import ManifestError

OPTIONAL_COLUMNS = ("patient_id", "study_id", "sex", "age", "site", "view", "split")

#: Class names that mean "no finding". In a binary task such a class is ``classes[0]`` (the negative), so the
#: model's single output is the probability of the finding. Otherwise the classes are sorted alphabetically.
NEGATIVE_NAMES = frozenset(
    {"normal", "negative", "neg", "healthy", "no_finding", "nofinding", "0", "false", "no", "absent", "control",
     "benign", "none"}
)
_PATH_LIKE = {"file", "filename", "file_name", "filepath", "file_path", "image", "image_path", "imagepath",
              "image_file", "relative_path", "relpath", "dicom", "dicom_path", "img", "image_index"}
_MULTILABEL_VALUES = {"1": 1.0, "0": 0.0, "": np.nan, "1.0": 1.0, "0.0": 0.0}


@dataclass
class LabelTable:
    """A validated labels CSV.

    Attributes:
        df: one row per CSV row: ``row`` (1-based data row), ``path`` (normalised, relative to the data folder),
            ``label`` (str) or one float column per class (1.0, 0.0, NaN), and the optional columns present
            (``sex`` normalised to M/F/O/"", ``age`` float years or NaN, the rest stripped strings).
        label_columns: the multi-label class columns, or None for a single ``label`` column.
        name: the CSV's file name, for messages.
    """

    df: pd.DataFrame
    label_columns: list[str] | None
    name: str


def read_labels_csv(csv_path: str | Path, data_dir: str | Path, *, label_columns: list[str] | None = None
                    ) -> LabelTable:
    """Read and validate a labels CSV.

    Args:
        csv_path: the CSV (it may live anywhere; the paths in it are relative to ``data_dir``).
        data_dir: the scan folder.
        label_columns: 0/1/blank columns for a multi-label task; None uses the ``label`` column.

    Raises:
        ManifestError: unreadable or non-UTF-8 file, missing ``path``/label column, blank or duplicate path,
            path escaping the data folder, label value not 0/1/blank (multi-label), bad ``split`` value.
    """
    csv = Path(csv_path).expanduser()
    if not csv.is_file():
        raise ManifestError(f"{csv}: labels CSV not found. Pass an existing file with --labels.")
    df = _read_text_csv(csv)
    name = csv.name
    if "path" not in df.columns:
        close = [c for c in df.columns if c.lower() in _PATH_LIKE] or difflib.get_close_matches(
            "path", list(df.columns), n=1, cutoff=0.5)
        hint = f" (is '{close[0]}' it? rename it to 'path')" if close else ""
        raise ManifestError(f"{name}: no 'path' column; found columns {list(df.columns)}{hint}. Add a 'path' column "
                            "with file paths relative to the data folder.")
    out = pd.DataFrame({"row": np.arange(1, len(df) + 1)})
    out["path"] = _check_paths(df["path"], Path(data_dir), name)
    if label_columns:
        for col in label_columns:
            out[col] = _multilabel_column(df, col, name)
    else:
        out["label"] = _label_column(df, name)
    for col in OPTIONAL_COLUMNS:
        if col in df.columns:
            out[col] = _optional_column(df[col], col, name)
    if "split" in out.columns and (out["split"] == "").all():
        out = out.drop(columns="split")  # an all-blank split column means "let medtransfer split"
    if len(out) == 0:
        raise ManifestError(f"{name}: the CSV has a header but no rows. Add one row per scan.")
    return LabelTable(out, list(label_columns) if label_columns else None, name)


def _read_text_csv(csv: Path) -> pd.DataFrame:
    """Decode as UTF-8 (BOM allowed) and parse every cell as a string, blanks as ``""``."""
    raw = csv.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ManifestError(
            f"{csv.name} row {line - 1} (line {line}): byte 0x{raw[exc.start]:02x} is not UTF-8. Save the file as "
            "UTF-8 (in Excel: 'CSV UTF-8 (comma delimited)')."
        ) from None
    try:
        df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise ManifestError(f"{csv.name}: the file is empty. Expected a header with 'path' and label columns.") from None
    except pd.errors.ParserError as exc:
        raise ManifestError(f"{csv.name}: not a valid CSV ({exc}). Check the quoting and the number of commas per "
                            "row.") from None
    df.columns = [str(c).strip() for c in df.columns]
    return df.apply(lambda s: s.str.strip())


def _where(name: str, i: int) -> str:
    return f"{name} row {i + 1} (line {i + 2})"


def _check_paths(paths: pd.Series, data_dir: Path, name: str) -> list[str]:
    """Normalise every path and refuse blanks, duplicates and anything that leaves the data folder."""
    root = data_dir.resolve()
    seen: dict[str, int] = {}
    out: list[str] = []
    for i, raw in enumerate(paths.tolist()):
        text = raw.replace("\\", "/")
        if not text:
            raise ManifestError(f"{_where(name, i)}: the path is blank. Fill it in or remove the row.")
        if any(ord(ch) < 32 for ch in text):  # a NUL stops path functions with ValueError; no file has one
            raise ManifestError(f"{_where(name, i)}: the path {text!r} holds a control character (NUL, tab, line "
                                "break...). Fix the cell.")
        norm = posixpath.normpath(text)
        escapes = posixpath.isabs(norm) or norm == ".." or norm.startswith("../")
        if not escapes:
            escapes = not (root / norm).resolve().is_relative_to(root)  # catches symlinks pointing outside too
        if escapes:
            raise ManifestError(f"{_where(name, i)}: path '{raw}' points outside the data folder. Paths must be "
                                "relative to the data folder and stay inside it.")
        if norm in seen:
            j = seen[norm]
            raise ManifestError(f"{_where(name, i)}: path '{raw}' is already listed in row {j + 1}. List each scan "
                                "once (remove the duplicate row).")
        seen[norm] = i
        out.append(norm)
    return out


def _label_column(df: pd.DataFrame, name: str) -> pd.Series:
    if "label" not in df.columns:
        raise ManifestError(f"{name}: no 'label' column; found columns {list(df.columns)}. Add a 'label' column "
                            "(class names), or pass --label-columns for a multi-label CSV with 0/1/blank columns.")
    blank = np.flatnonzero((df["label"] == "").to_numpy())
    if len(blank):
        raise ManifestError(f"{_where(name, int(blank[0]))}: the label is blank ({len(blank)} blank row(s) in "
                            "all). Fill in the class or remove the row.")
    return df["label"].astype(str)


def _multilabel_column(df: pd.DataFrame, col: str, name: str) -> pd.Series:
    if col not in df.columns:
        close = difflib.get_close_matches(col, list(df.columns), n=1)
        hint = f" — did you mean '{close[0]}'?" if close else f"; found columns {list(df.columns)}"
        raise ManifestError(f"{name}: label column '{col}' not found{hint}")
    values = df[col].map(_MULTILABEL_VALUES)
    bad = np.flatnonzero((values.isna() & (df[col] != "")).to_numpy())
    if len(bad):
        i = int(bad[0])
        raise ManifestError(f"{_where(name, i)}: column '{col}' holds '{df[col].iloc[i]}'; expected 1, 0 or blank "
                            "(unknown). Fix the value.")
    return values.astype(float)


def _optional_column(values: pd.Series, col: str, name: str) -> pd.Series:
    if col == "sex":
        return values.map(parse_sex)
    if col == "age":
        return values.map(parse_age).astype(float)
    if col == "split":
        norm = values.str.lower()
        bad = np.flatnonzero((~norm.isin([*SPLITS, ""])).to_numpy())
        blank = np.flatnonzero((norm == "").to_numpy())
        if len(bad):
            i = int(bad[0])
            raise ManifestError(f"{_where(name, i)}: split '{values.iloc[i]}' is not one of {list(SPLITS)}. Fix it, "
                                "or remove the 'split' column to let medtransfer split by patient.")
        if len(blank) and len(blank) < len(norm):
            raise ManifestError(f"{_where(name, int(blank[0]))}: split is blank while other rows have one. Give every "
                                "row train/val/test, or remove the 'split' column.")
        return norm
    return values


def folder_label(path: str) -> str | None:
    """The class of a scan in a class sub-folder layout: the first folder of its relative path (None at top)."""
    head, sep, _ = path.partition("/")
    return head if sep and head != "." else None


def order_classes(values: list[str]) -> list[str]:
    """Class order for a single-label task (model-output order).

    Two classes: the one named like "no finding" (see :data:`NEGATIVE_NAMES`) first, so the single sigmoid
    output is the probability of the finding; if neither or both are, alphabetical. More classes: alphabetical.

    Examples:
        >>> order_classes(["pneumonia", "normal"])
        ['normal', 'pneumonia']
        >>> order_classes(["tb", "pneumonia"])
        ['pneumonia', 'tb']
    """
    classes = sorted(set(values))
    if len(classes) == 2:
        neg = [c for c in classes if c.strip().lower().replace("-", "_").replace(" ", "_") in NEGATIVE_NAMES
               or c.strip().lower() in NEGATIVE_NAMES]
        if len(neg) == 1:
            classes = [neg[0], next(c for c in classes if c != neg[0])]
    return classes


def task_for(classes: list[str], *, multilabel: bool) -> Task:
    """``multilabel`` when label columns were chosen, else ``binary`` (2 classes) or ``multiclass`` (more).

    Raises:
        ManifestError: fewer than two classes (single-label), since nothing could be learned.
    """
    if multilabel:
        return "multilabel"
    if len(classes) < 2:
        found = f"only {classes[0]!r}" if classes else "none"
        raise ManifestError(f"need at least two classes to train a classifier; found {found}. Add scans of another "
                            "class (another class sub-folder, or other values in the 'label' column).")
    return "binary" if len(classes) == 2 else "multiclass"


def match_rows(table: LabelTable, lookup: dict[str, int], *, existing: set[str], quarantined: set[str]
               ) -> tuple[dict[int, int], list[int]]:
    """Match CSV rows to discovered cases.

    Args:
        table: the validated CSV.
        lookup: a case's path, and each of its files, mapped to the case's index.
        existing: every file and folder found under the data folder (relative paths).
        quarantined: relative paths already quarantined (their rows are skipped, not errors).

    Returns:
        ``{case index: table row position}``, and the positions of rows that name an existing file which is
        not a scan (the caller quarantines them).

    Raises:
        ManifestError: a row names a path that does not exist, or two rows label one series differently.
    """
    matched: dict[int, int] = {}
    not_scans: list[int] = []
    missing: list[int] = []
    label_cols = table.label_columns or ["label"]
    for pos, path in enumerate(table.df["path"].tolist()):
        case = lookup.get(path)
        if case is None:
            if path in quarantined:
                continue
            (not_scans if path in existing else missing).append(pos)
            continue
        if case in matched:
            first = table.df.iloc[matched[case]]
            here = table.df.iloc[pos]
            if not first[label_cols].equals(here[label_cols]):
                raise ManifestError(f"{_where(table.name, pos)}: labels a file of the same DICOM series as row "
                                    f"{first['row']} but with different labels. A series is one case: give its rows "
                                    "the same labels, or list the series folder once.")
            continue
        matched[case] = pos
    if missing:
        pos = missing[0]
        raise ManifestError(f"{_where(table.name, pos)}: '{table.df['path'].iloc[pos]}' not found in the data folder "
                            f"({len(missing)} missing path(s) in all). Paths must be relative to the data folder; fix "
                            "them or remove the rows.")
    return matched, not_scans


def resolve_classes(df: pd.DataFrame, table: LabelTable | None, *, quarantined: Iterable[str] = (),
                    require_labels: bool = True) -> tuple[list[str], Task]:
    """The classes in model-output order (see :func:`order_classes`) and the task, for the indexed cases.

    Args:
        df: the cases with their labels (``label``, or the multi-label columns).
        table: the labels CSV, or None for class sub-folders.
        quarantined: quarantined relative paths; in the class-folder layout, a folder whose every scan was
            quarantined is a class without cases and an error rather than a silently missing class.
        require_labels: True (training, evaluation) refuses fewer than two single-label classes; False (an
            inventory) returns ``([], "unlabelled")`` for them instead, since one class teaches nothing.

    Raises:
        ManifestError: fewer than two classes (with ``require_labels``), a class (folder or label column)
            without cases, or a label column named like a manifest column.
    """
    if table is not None and table.label_columns:
        reserved = {*ID_COLUMNS, *SUBGROUP_COLUMNS, *ACQ_COLUMNS, "split", "label"}
        clash = [c for c in table.label_columns if c in reserved]
        if clash:
            raise ManifestError(f"label column(s) {clash} have the names of manifest columns; rename them in "
                                f"{table.name}.")
        empty = [c for c in table.label_columns if not (df[c] == 1).any()]
        if empty:
            raise ManifestError(f"label column(s) {empty} have no positive (1) case among the {len(df)} indexed "
                                "scans; drop them from --label-columns or add positive cases.")
        return list(table.label_columns), "multilabel"
    if table is None:
        lost = sorted({folder_label(q) for q in quarantined} - set(df["label"]) - {None})
        if lost:
            raise ManifestError(f"class folder(s) {lost} have no usable scan (all quarantined; see quarantine.csv). "
                                "Fix or remove those files, or remove the folder(s).")
    classes = order_classes(df["label"].astype(str).tolist())
    if len(classes) < 2 and not require_labels:
        return [], "unlabelled"
    return classes, task_for(classes, multilabel=False)
