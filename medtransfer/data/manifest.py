"""``Manifest``: one row per case, the table every later stage reads (``runs/<id>/manifest.csv``).

Columns (DESIGN.md §4). Identity: ``case_id`` (pseudonymous, stable), ``patient_key`` and ``study_key``
(salted hashes), ``path`` (relative to the data folder; a series folder for multi-file DICOM series),
``files`` (``;``-joined relative paths of a multi-file series, else empty), ``format``
(dicom/nifti/png/jpeg). Labels: ``label`` (class name) for binary/multi-class tasks; for multi-label
tasks one column per class holding 1, 0 or empty (unknown). ``split``: train/val/test. Subgroups and
acquisition: ``sex``, ``age``, ``age_band``, ``site``, ``manufacturer``, ``view``, ``modality``,
``photometric``, ``rows``, ``cols``, ``frames``, ``spacing_row``, ``spacing_col``.
PHI never appears here: no names, IDs, birth dates or accession numbers.

An **unlabelled** manifest (task ``"unlabelled"``, no classes) is the inventory of a folder without labels
(:func:`~medtransfer.data.discovery.index_scans` with ``require_labels=False``): the same columns without the
label column(s) *and without* ``split``. Splits are not attempted without labels: a split exists to hold
labelled patients out for validation and testing, and one made before the labels exist would not be the
label-stratified split made once they do, so a ``split`` column here would only mislead. Such a manifest can
be summarised, saved and loaded, but not trained on (:meth:`Manifest.targets` refuses it).

``quarantine`` (``quarantine.csv``): one row per file that could not be used: ``path`` (relative; like
``manifest.csv`` it is the user's working file, so it may carry the file name), ``problem`` (short category)
and ``reason`` (what is wrong and what to do).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd

from medtransfer import io
from medtransfer.errors import ManifestError

#: What the labels ask for; ``"unlabelled"`` is an inventory without labels (nothing to train on).
Task = Literal["binary", "multiclass", "multilabel", "unlabelled"]

ID_COLUMNS = ("case_id", "patient_key", "study_key", "path", "files", "format")
SUBGROUP_COLUMNS = ("sex", "age", "age_band", "site", "manufacturer", "view", "modality")
ACQ_COLUMNS = ("photometric", "rows", "cols", "frames", "spacing_row", "spacing_col")
SPLITS = ("train", "val", "test")
QUARANTINE_COLUMNS = ("path", "problem", "reason")
#: What to do with an unlabelled inventory to train on it (ends its errors and the printed inventory).
UNLABELLED_HINT = ("Training needs at least two classes: put the scans in class sub-folders (DATA/<class>/...) or "
                   "pass a labels CSV with --labels.")


def empty_quarantine() -> pd.DataFrame:
    """A quarantine table with no rows (the columns of ``quarantine.csv``)."""
    return pd.DataFrame({c: pd.Series(dtype=str) for c in QUARANTINE_COLUMNS})


def write_quarantine(path: str | Path, quarantine: pd.DataFrame) -> Path:
    """Atomically write ``quarantine.csv`` (a header only when nothing was quarantined)."""
    table = quarantine if len(quarantine) else empty_quarantine()
    with io.atomic_path(path) as tmp:
        table.reindex(columns=list(QUARANTINE_COLUMNS)).to_csv(tmp, index=False)
    return Path(path)


@dataclass
class Manifest:
    """A validated table of cases plus what the labels mean.

    Attributes:
        df: one row per case (columns in the module docstring), indexed 0..N-1.
        classes: class names, in model-output order.
        task: ``"binary"`` (two classes, one sigmoid output for ``classes[1]``), ``"multiclass"`` (softmax),
            ``"multilabel"`` (one sigmoid per class; columns named after the classes) or ``"unlabelled"``
            (an inventory: no classes, no label column, no split).
        data_dir: the scan folder that ``path`` is relative to.
        warnings: human-readable warnings collected while indexing (no PHI).
        quarantine: files that could not be used (columns ``path``, ``problem``, ``reason``).
    """

    df: pd.DataFrame
    classes: list[str]
    task: Task
    data_dir: Path
    warnings: list[str] = field(default_factory=list)
    quarantine: pd.DataFrame = field(default_factory=empty_quarantine)

    def __post_init__(self) -> None:
        missing = [c for c in ("case_id", "patient_key", "path") if c not in self.df.columns]
        if missing:
            raise ManifestError(f"manifest is missing columns {missing}")
        if self.task == "unlabelled":
            if self.classes:
                raise ManifestError(f"an unlabelled manifest has no classes, but {self.classes} were given")
        elif self.task == "multilabel":
            absent = [c for c in self.classes if c not in self.df.columns]
            if absent:
                raise ManifestError(f"multi-label manifest is missing label columns {absent}")
        elif "label" not in self.df.columns:
            raise ManifestError("manifest has no 'label' column")
        self.df = self.df.reset_index(drop=True)

    def __len__(self) -> int:
        return len(self.df)

    @property
    def labelled(self) -> bool:
        """Whether the cases carry labels (False for the inventory of a folder without labels)."""
        return self.task != "unlabelled"

    @property
    def has_labels(self) -> bool:
        """True when at least one case has a known label (an inventory, or new scans to predict, have none)."""
        return any(c in self.df and self.df[c].notna().any() for c in self.label_columns)

    @property
    def label_columns(self) -> list[str]:
        """The columns holding labels: the class columns (multi-label), ``["label"]``, or none (unlabelled)."""
        if self.task == "unlabelled":
            return []
        return list(self.classes) if self.task == "multilabel" else ["label"]

    @property
    def num_outputs(self) -> int:
        """Model outputs: 1 for binary, else one per class (0 for an unlabelled inventory)."""
        return 1 if self.task == "binary" else len(self.classes)

    def targets(self) -> np.ndarray:
        """Targets as the loss expects them.

        Returns:
            binary: float (N,) in {0, 1} (1 = ``classes[1]``); multiclass: int (N,) class indices;
            multilabel: float (N, C) with 1, 0 or NaN (unknown, masked from the loss).

        Raises:
            ManifestError: the manifest is an unlabelled inventory, or a label is not among the classes.
        """
        if self.task == "unlabelled":
            raise ManifestError(f"this manifest is an unlabelled inventory: it has no labels. {UNLABELLED_HINT}")
        if self.task == "multilabel":
            return self.df[self.classes].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float32)
        idx = self.df["label"].map({c: i for i, c in enumerate(self.classes)})
        if idx.isna().any():
            bad = self.df.loc[idx.isna(), "label"].unique()[:5]
            raise ManifestError(f"labels {list(bad)} are not among the classes {self.classes}")
        arr = idx.to_numpy(dtype=np.int64)
        return arr.astype(np.float32) if self.task == "binary" else arr

    def split(self, name: str | Sequence[str]) -> Manifest:
        """The cases of one split (or several), as a new Manifest with the same classes."""
        names = [name] if isinstance(name, str) else list(name)
        if self.task == "unlabelled":
            raise ManifestError(f"an unlabelled inventory has no train/val/test split. {UNLABELLED_HINT}")
        if "split" not in self.df.columns:
            raise ManifestError("manifest has no 'split' column; index the data first")
        sub = self.df[self.df["split"].isin(names)]
        return Manifest(sub.copy(), list(self.classes), self.task, self.data_dir, list(self.warnings))

    def rows(self, start: int, stop: int) -> Manifest:
        """Cases ``start`` to ``stop`` (positions, in order) as a new Manifest: one rank's shard under DDP."""
        return Manifest(self.df.iloc[start:stop].copy(), list(self.classes), self.task, self.data_dir,
                        list(self.warnings))

    def abspath(self, row: pd.Series | dict) -> list[Path]:
        """Absolute file paths of one case (several for a multi-file series).

        Raises:
            ManifestError: a path that is absolute or climbs out of the data folder (``..``). Indexing never
                writes one, so the manifest was edited: nothing outside the data folder is read because a
                CSV said so.
        """
        files = row.get("files") if isinstance(row, dict) else row.get("files", "")
        rels = [f for f in str(files).split(";") if f] if isinstance(files, str) and files else [row["path"]]
        for r in rels:
            norm = posixpath.normpath(str(r).replace("\\", "/"))
            if posixpath.isabs(norm) or norm == ".." or norm.startswith("../") or Path(str(r)).is_absolute():
                raise ManifestError(f"manifest path '{r}' (case {row.get('case_id', '?')}) points outside the data "
                                    "folder; manifest.csv was edited. Index the data again with "
                                    "'medtransfer index'.")
        return [self.data_dir / r for r in rels]

    def digest(self) -> str:
        """SHA-256 of the manifest's identity, labels and splits (reproducibility; no paths or PHI)."""
        cols = [c for c in ("case_id", "patient_key", *self.label_columns, "split") if c in self.df.columns]
        text = self.df[cols].astype(str).to_csv(index=False)
        return hashlib.sha256(text.encode()).hexdigest()

    def check_leakage(self) -> None:
        """Raise :class:`ManifestError` if any patient appears in more than one split."""
        if "split" not in self.df.columns:
            return
        per_patient = self.df.groupby("patient_key")["split"].nunique()
        leaked = per_patient[per_patient > 1]
        if len(leaked):
            raise ManifestError(
                f"patient leakage: {len(leaked)} patient(s) appear in more than one split "
                f"(e.g. patient_key {leaked.index[0]}). Splits must be patient-level; remove the 'split' "
                "column from the labels CSV to let medtransfer split by patient, or fix it."
            )

    def save(self, out_dir: str | Path) -> Path:
        """Write ``manifest.csv``, ``manifest.json`` (classes, task, data folder) and ``quarantine.csv`` atomically.

        Floats are written with ``%g`` so that integer-valued columns with blanks (rows, 0/1 labels) read as
        ``64`` and ``1`` rather than ``64.0`` and ``1.0``.
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with io.atomic_path(out / "manifest.csv") as tmp:
            self.df.to_csv(tmp, index=False, float_format="%g")
        write_quarantine(out / "quarantine.csv", self.quarantine)
        meta = {
            "classes": self.classes,
            "task": self.task,
            "data_dir": str(self.data_dir),
            "n_cases": len(self.df),
            "digest": self.digest(),
            "warnings": self.warnings,
        }
        io.write_json(out / "manifest.json", meta)
        return out / "manifest.csv"

    @classmethod
    def load(cls, path: str | Path, *, data_dir: str | Path | None = None) -> Manifest:
        """Read a manifest written by :meth:`save` (``path`` is the CSV or its folder)."""
        p = Path(path)
        csv = p / "manifest.csv" if p.is_dir() else p
        meta_path = csv.with_suffix(".json")
        if not csv.is_file() or not meta_path.is_file():
            raise ManifestError(f"{csv}: manifest.csv and manifest.json not found; run 'medtransfer index' first")
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        df = pd.read_csv(csv, dtype={"case_id": str, "patient_key": str, "study_key": str, "path": str, "files": str,
                                     "label": str, "sex": str, "site": str, "age_band": str, "view": str,
                                     "split": str},
                         keep_default_na=True)
        df["files"] = df.get("files", pd.Series([""] * len(df))).fillna("")
        root = Path(data_dir) if data_dir is not None else Path(meta["data_dir"])
        qpath = csv.with_name("quarantine.csv")
        quarantine = (pd.read_csv(qpath, dtype=str, keep_default_na=False) if qpath.is_file()
                      else empty_quarantine())
        return cls(df, list(meta["classes"]), meta["task"], root, list(meta.get("warnings", [])), quarantine)
