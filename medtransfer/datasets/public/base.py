"""What every public-dataset adapter shares: its description, the options, the vocabulary and small readers.

The contract (issue 20). An adapter module ``medtransfer.datasets.public.<name>`` defines ``INFO: DatasetInfo``
and ``read(root: Path, options: PrepareOptions) -> pd.DataFrame`` returning one row per image with:

- ``path``: posix path relative to ``root`` of the image as it lies in the official layout (never checked by the
  adapter: :func:`medtransfer.datasets.public.prepare` walks the folder once and reports what is missing);
- one float column per name in ``INFO.findings``: 1.0 positive, 0.0 negative, NaN unknown / not stated (an
  uncertain ``-1`` is resolved inside the adapter with :func:`finding_values` and ``options.uncertain``);
- ``patient_id``, ``study_id`` (strings, never blank when the dataset identifies them), ``sex`` (``"M"``, ``"F"``
  or ``""``: :func:`sex_code`), ``age`` (float years or NaN: :func:`age_years`), ``view`` (``PA``, ``AP``,
  ``LATERAL``, ``LL``...; ``""`` unknown: :func:`view_code`), ``site`` (optional), ``split`` (``train``/``val``/
  ``test`` for every row, or ``""`` for every row when the dataset defines none: never a mix);
- extra columns where useful (Kermany ``subtype``, RSNA ``boxes``); never names, identifiers other than the
  dataset's own pseudonymous patient/study ids, or free-text reports.

Notes for adapter authors (additions to the contract, none of them a change to it):

- ``options.views`` is applied once more by ``prepare`` on the ``view`` column (:func:`select_views`), so an
  adapter may filter early (cheaper) or leave it to ``prepare``. ``"FRONTAL"`` and ``"LATERAL"`` in
  ``options.views`` stand for the groups :data:`FRONTAL_VIEWS` and :data:`LATERAL_VIEWS`.
- A single-label dataset (``INFO.single_label``) has exactly one finding; ``prepare`` writes its ``label`` column
  (``finding.lower()`` for 1.0, ``"normal"`` for 0.0) unless the adapter returned a ``label`` column itself.
- :func:`require_file` raises :class:`~medtransfer.errors.DatasetLayoutError`; ``prepare`` adds the dataset's
  download address and expected layout to the message, so adapters need not.
- :func:`carve_split` gives the deterministic by-patient val (or test) carve that ``options.val_fraction`` and
  ``options.seed`` ask for.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medtransfer.errors import DatasetLayoutError

logger = logging.getLogger(__name__)

#: torchxrayvision's 18 default pathology names, in its order: the ``--findings harmonised`` columns.
VOCABULARY: tuple[str, ...] = (
    "Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema", "Fibrosis", "Effusion",
    "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule", "Mass", "Hernia", "Lung Lesion", "Fracture",
    "Lung Opacity", "Enlarged Cardiomediastinum",
)

UNCERTAIN_POLICIES = ("ignore", "ones", "zeros")
FINDINGS_MODES = ("native", "harmonised")
SPLIT_VALUES = ("train", "val", "test")

#: Columns every adapter returns (besides ``path`` and the findings); ``site`` may be absent.
ID_COLUMNS = ("patient_id", "study_id", "sex", "age", "view", "site", "split")

#: View codes counted as frontal / lateral when ``options.views`` names the group.
FRONTAL_VIEWS = frozenset({"PA", "AP", "AP AXIAL", "PA LLD", "AP LLD", "AP RLD", "PA RLD", "AP SUPINE",
                           "AP ERECT", "FRONTAL"})
LATERAL_VIEWS = frozenset({"LATERAL", "LL", "RL", "XTABLE LATERAL", "LAO", "RAO", "LPO", "RPO"})


@dataclass(frozen=True)
class DatasetInfo:
    """What a public dataset is and how its files are read.

    Attributes:
        name: the registry name (``nih``, ``chexpert``...), as typed on the command line.
        title: the dataset's usual name.
        licence: the licence or agreement it is distributed under, in a few words.
        url: where to request or download it.
        expected: the files and folders the adapter reads, relative to ROOT (for error messages and
            ``medtransfer datasets list``).
        findings: the native finding names, in the order of the adapter's columns.
        harmonise: native finding name -> :data:`VOCABULARY` name; a native name absent from it is dropped under
            ``--findings harmonised``.
        single_label: a binary dataset (one finding; ``prepare`` writes a ``label`` column).
        notes: the awkward cases the adapter handles, one line each (shown in the guide and ``datasets list``).
    """

    name: str
    title: str
    licence: str
    url: str
    expected: tuple[str, ...]
    findings: tuple[str, ...]
    harmonise: Mapping[str, str] = field(default_factory=dict)
    single_label: bool = False
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        unknown = sorted(set(self.harmonise.values()) - set(VOCABULARY))
        if unknown:
            raise ValueError(f"{self.name}: harmonise maps to names outside VOCABULARY: {unknown}")
        stray = sorted(set(self.harmonise) - set(self.findings))
        if stray:
            raise ValueError(f"{self.name}: harmonise names findings the dataset does not have: {stray}")
        if self.single_label and len(self.findings) != 1:
            raise ValueError(f"{self.name}: a single-label dataset has exactly one finding")


@dataclass(frozen=True)
class PrepareOptions:
    """The choices that change what an adapter returns.

    Attributes:
        uncertain: how an uncertain label (CheXpert/MIMIC ``-1``) is read: ``ignore`` -> NaN (unknown, masked
            from the loss), ``ones`` -> 1.0, ``zeros`` -> 0.0.
        views: keep only these view codes (upper case; ``FRONTAL``/``LATERAL`` name the groups); None keeps all.
        val_fraction: the share of patients moved from an official train split to ``val`` where the dataset has
            no validation split of its own.
        seed: salts the by-patient carve, so another seed gives another (still deterministic) val set.
    """

    uncertain: str = "ignore"
    views: tuple[str, ...] | None = None
    val_fraction: float = 0.1
    seed: int = 0


# --------------------------------------------------------------------------------------------------- files


def require_file(root: Path, *candidates: str) -> Path:
    """The first of ``candidates`` (paths relative to ``root``; ``*`` globs allowed) that exists.

    Args:
        root: the dataset folder.
        candidates: relative paths in order of preference, e.g. ``"Data_Entry_2017_v2020.csv",
            "Data_Entry_2017.csv"``, or ``"x.csv", "x.csv.gz"``.

    Raises:
        DatasetLayoutError: none exists; the message names every candidate and the folder searched.
    """
    root = Path(root)
    for cand in candidates:
        if any(ch in cand for ch in "*?["):
            hits = sorted(p for p in root.glob(cand) if p.is_file())
            if hits:
                return hits[0]
        elif (root / cand).is_file():
            return root / cand
    names = " or ".join(f"'{c}'" for c in candidates)
    raise DatasetLayoutError(f"{root}: expected {names} in this folder, found none. Pass the folder that holds the "
                             "dataset's files as distributed.")


def read_csv(path: Path, *, columns: Iterable[str] = ()) -> pd.DataFrame:
    """Read an official CSV (``.csv`` or ``.csv.gz``) with every cell a stripped string and blanks as ``""``.

    Strings keep the dataset's own spelling (``-1.0``, ``Male``); convert with :func:`finding_values`,
    :func:`sex_code`, :func:`age_years`. Unnamed trailing columns (NIH's 2017 file ends each line with a comma)
    are dropped.

    Args:
        path: the file.
        columns: header names that must be present (the message lists the ones missing and the ones found).

    Raises:
        DatasetLayoutError: unreadable, empty, not a CSV, or a required column is missing.
    """
    path = Path(path)
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False, compression="infer", encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise DatasetLayoutError(f"{path}: the file is empty; expected the dataset's CSV with a header. Download it "
                                 "again.") from None
    except (pd.errors.ParserError, UnicodeDecodeError, OSError, EOFError) as exc:
        raise DatasetLayoutError(f"{path}: cannot be read as a CSV ({type(exc).__name__}: {exc}). Download it "
                                 "again; do not edit it by hand.") from None
    df.columns = [str(c).strip() for c in df.columns]
    df = df.loc[:, [c for c in df.columns if c and not c.startswith("Unnamed:")]]
    df = df.apply(lambda s: s.str.strip()) if len(df.columns) else df
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise DatasetLayoutError(f"{path}: column(s) {missing} not found; the file has {list(df.columns)}. Is it "
                                 "the dataset's own file, unmodified?")
    return df


def read_lines(path: Path) -> list[str]:
    """The non-blank lines of a text file (NIH's ``train_val_list.txt``), stripped."""
    try:
        text = Path(path).read_text("utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetLayoutError(f"{path}: cannot be read ({exc}). Download it again.") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def index_files(root: Path, suffixes: Iterable[str] | None = None) -> set[str]:
    """Every file under ``root`` (one walk), as posix paths relative to it; only ``suffixes`` when given.

    Hidden folders (``.cache``...) are skipped; symlinked folders are not followed.

    Args:
        root: the dataset folder.
        suffixes: lower-case suffixes to keep (``{".png", ".jpg"}``); None keeps every file.
    """
    root = Path(root)
    keep = {s.lower() for s in suffixes} if suffixes is not None else None
    out: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = os.path.relpath(dirpath, root)
        prefix = "" if rel == "." else rel.replace(os.sep, "/") + "/"
        for fname in filenames:
            if keep is None or os.path.splitext(fname)[1].lower() in keep:
                out.add(prefix + fname)
    return out


def locate_by_name(relpaths: Iterable[str]) -> dict[str, str]:
    """File name -> relative path, for datasets whose CSV gives only the file name (NIH's ``Image Index``).

    Where a name occurs twice (a re-extracted archive), the shortest path wins, deterministically.
    """
    out: dict[str, str] = {}
    for rel in sorted(relpaths, key=lambda p: (p.count("/"), p)):
        out.setdefault(rel.rsplit("/", 1)[-1], rel)
    return out


# -------------------------------------------------------------------------------------------------- values

_SEX = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F"}


def sex_code(value: Any) -> str:
    """``"M"``, ``"F"`` or ``""`` from ``M``/``F``/``Male``/``Female`` (any case); anything else (``Unknown``,
    ``O``, blank, NaN) is ``""``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    return _SEX.get(str(value).strip().upper(), "")


_AGE = re.compile(r"^(\d+(?:\.\d+)?)\s*([YMWD]?)$")
_AGE_UNITS = {"": 1.0, "Y": 1.0, "M": 12.0, "W": 52.1775, "D": 365.25}


def age_years(value: Any, *, max_age: float = 120.0) -> float:
    """Age in years (float) from a number (``58``, ``58.0``) or a DICOM age string (``058Y``, ``006M``).

    Blank, unparseable, negative and implausible values (over ``max_age``) give NaN; the caller counts and warns.
    """
    if value is None:
        return math.nan
    if isinstance(value, int | float):
        years = float(value)
    else:
        m = _AGE.match(str(value).strip().upper())
        if not m:
            return math.nan
        years = float(m.group(1)) / _AGE_UNITS[m.group(2)]
    if math.isnan(years) or not 0 <= years <= max_age:
        return math.nan
    return round(years, 2)


_VIEW_ALIASES = {"L": "LATERAL", "LAT": "LATERAL", "LATERAL": "LATERAL", "FRONTAL": "FRONTAL",
                 "POSTEROANTERIOR": "PA", "ANTEROPOSTERIOR": "AP", "AP_AXIAL": "AP AXIAL"}


def view_code(value: Any) -> str:
    """Upper-case view code: ``PA``, ``AP``, ``LATERAL`` (also from ``L``/``Lateral``), ``LL``... ``""`` unknown."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    text = " ".join(str(value).strip().upper().split())
    if text in {"", "NAN", "NONE", "UNKNOWN"}:
        return ""
    return _VIEW_ALIASES.get(text, text)


def select_views(df: pd.DataFrame, views: Iterable[str] | None, *, keep_unknown: bool = False) -> pd.DataFrame:
    """The rows whose ``view`` is one of ``views`` (``FRONTAL``/``LATERAL`` expand to their groups).

    ``keep_unknown`` also keeps rows whose view is blank: adapters that read the view from the image's own header
    (RSNA, VinDr) pass it, so that a listed image missing on disk (hence of unknown view) reaches the
    missing-file check and is reported rather than silently filtered out; ``prepare`` filters again after it.
    """
    if not views:
        return df
    wanted: set[str] = set()
    for v in views:
        code = view_code(v)
        wanted |= FRONTAL_VIEWS if code == "FRONTAL" else LATERAL_VIEWS if code == "LATERAL" else {code}
    keep = df["view"].isin(wanted)
    if keep_unknown:
        keep |= df["view"].astype(str).eq("")
    return df.loc[keep].reset_index(drop=True)


_FINDING = {"1": 1.0, "1.0": 1.0, "0": 0.0, "0.0": 0.0, "-1": -1.0, "-1.0": -1.0, "": math.nan,
            "nan": math.nan}


def finding_values(values: pd.Series, uncertain: str = "ignore", *, where: str = "") -> pd.Series:
    """Float finding column from the dataset's strings ``1``/``1.0``, ``0``/``0.0``, ``-1``/``-1.0``, blank.

    Args:
        values: the column as read by :func:`read_csv` (strings).
        uncertain: what ``-1`` becomes: ``ignore`` -> NaN, ``ones`` -> 1.0, ``zeros`` -> 0.0.
        where: the file and column, for the error message.

    Raises:
        DatasetLayoutError: a value other than those.
    """
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain must be one of {UNCERTAIN_POLICIES}, not {uncertain!r}")
    text = values.astype(str).str.strip().str.lower()
    out = text.map(_FINDING)
    bad = out.isna() & ~text.isin(["", "nan"])
    if bad.any():
        first = values[bad].iloc[0]
        raise DatasetLayoutError(f"{where or 'a finding column'}: value {first!r} is not 1, 0, -1 or blank "
                                 f"({int(bad.sum())} such cell(s)). Is the file the dataset's own, unmodified?")
    uncertain_value = {"ignore": math.nan, "ones": 1.0, "zeros": 0.0}[uncertain]
    return out.where(out != -1.0, uncertain_value).astype(float)


# -------------------------------------------------------------------------------------------------- splits


def patient_fraction(patient_id: str, seed: int, salt: str = "val") -> float:
    """A stable number in [0, 1) for one patient: the by-patient carve keeps patients below the fraction.

    It depends only on the patient id, the seed and the salt, so adding rows or patients never moves another
    patient between splits (what a random permutation would do).
    """
    digest = hashlib.sha256(f"{salt}:{seed}:{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def patient_split(patient_ids: Iterable[str], fraction: float, seed: int, *, salt: str = "val") -> np.ndarray:
    """Which rows fall in the carved-out share (boolean per row), chosen by patient, deterministically.

    A patient is carved out when :func:`patient_fraction` is below ``fraction``. So that a small dataset (or a
    test replica) still gets a val set, when no patient falls below the fraction but ``fraction > 0`` and there
    are at least two patients, the patient with the lowest number is carved out.

    Args:
        patient_ids: one per row (rows of the same patient always land together).
        fraction: the share of patients to carve out, in [0, 1).
        seed: salts the choice.
        salt: distinguishes two carves of the same rows (``val`` and ``test``).
    """
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), not {fraction}")
    ids = [str(p) for p in patient_ids]
    unique = sorted(set(ids))
    score = {p: patient_fraction(p, seed, salt) for p in unique}
    chosen = {p for p, s in score.items() if s < fraction}
    if fraction > 0 and not chosen and len(unique) >= 2:
        chosen = {min(unique, key=lambda p: score[p])}
    return np.array([p in chosen for p in ids], dtype=bool)


def carve_split(split: pd.Series, patient_ids: pd.Series, fraction: float, seed: int, *, source: str = "train",
                target: str = "val") -> pd.Series:
    """Move a by-patient share of the ``source`` rows to ``target`` (``val`` carved from an official train).

    Returns a new split column; rows outside ``source`` are unchanged.
    """
    out = split.copy()
    rows = out == source
    if rows.any():
        moved = patient_split(patient_ids[rows], fraction, seed, salt=target)
        out.loc[out.index[rows.to_numpy()][moved]] = target
    return out

