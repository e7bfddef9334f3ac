"""``EvaluationResult``: the tables an evaluation produces, and how they are stored.

``evaluation.json`` holds every table except the predictions, plus ``meta``; the predictions go to
``predictions.csv`` beside it (the user's working file, the only one that names scan files). Tables are
stored as ``{"columns", "dtypes", "records"}`` so that a load gives back the same DataFrames (NaN is
written as null). Nothing here imports torch: reports render from a saved result.

Privacy: ``evaluation.json`` never holds a file path, PatientID, name or accession number; cases and
patients appear only as pseudonymous ``case_id`` / ``patient_key``, and the data source by folder name.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medtransfer import io
from medtransfer.errors import RunDirError
from medtransfer.predictions import PREDICTIONS_FILE, read_predictions

EVALUATION_FILE = "evaluation.json"
FORMAT = "medtransfer-evaluation"
FORMAT_VERSION = 2  # 2: gap metrics sensitivity/specificity (were tpr/fpr), CI methods, checks
TABLES = ("overall", "per_class", "by_group", "gaps", "calibration", "reliability", "thresholds")

def _empty() -> pd.DataFrame:
    return pd.DataFrame()


@dataclass
class EvaluationResult:
    """Metrics with confidence intervals, calibration, operating points and subgroup gaps of one evaluation.

    Attributes:
        overall: one row per evaluated class (binary: the positive class) plus ``macro`` for multi-class and
            multi-label tasks: ``class``, ``n``, ``n_patients``, ``n_pos``, ``prevalence``, ``threshold`` and
            ``auroc``, ``auprc``, ``sensitivity``, ``specificity``, ``ppv``, ``npv``, ``f1``, ``accuracy``, each
            with ``_lo``/``_hi`` and ``_ci_method`` (proportions: Wilson score interval clustered by patient;
            F1/AUROC/AUPRC: patient bootstrap, AUROC/AUPRC with a closed-form fallback where the bootstrap
            is degenerate; NaN for ``macro``).
        per_class: the operating point per class: ``class``, ``threshold`` and the confusion counts
            (``tp``, ``fp``, ``tn``, ``fn``) with the point metrics.
        by_group: per subgroup (``class``, ``attribute``, ``group``): n, patients, prevalence, AUROC,
            sensitivity, specificity with CIs and ``_ci_method``, ECE and ``status`` (``ok`` or why a group was
            not assessed).
        gaps: per ``class`` x ``attribute`` x ``metric`` (auroc/sensitivity/specificity): worst-minus-best gap
            with CI (``ci_method``), the groups involved and ``flagged`` (the CI excludes zero).
        calibration: per class: ``temperature``; ``ece``, ``ece_adaptive`` and ``brier`` after temperature
            scaling and the same with ``_uncalibrated``.
        reliability: reliability-curve bins per ``class`` and ``stage`` (``uncalibrated``/``calibrated``).
        thresholds: per class: ``threshold``, ``method``, ``target``, ``source`` (where it was chosen).
        predictions: the predictions table (see :mod:`medtransfer.inference`).
        meta: split, data (folder name), n_cases, n_patients, run_id, n_boot, ci, seed, prevalence, warnings,
            model (card summary), timing, checks (:mod:`medtransfer.checks`: passed / flagged / not assessed).
        saved_to: the folder of the last :meth:`save` / :meth:`load` (not stored).
    """

    overall: pd.DataFrame = field(default_factory=_empty)
    per_class: pd.DataFrame = field(default_factory=_empty)
    by_group: pd.DataFrame = field(default_factory=_empty)
    gaps: pd.DataFrame = field(default_factory=_empty)
    calibration: pd.DataFrame = field(default_factory=_empty)
    reliability: pd.DataFrame = field(default_factory=_empty)
    thresholds: pd.DataFrame = field(default_factory=_empty)
    predictions: pd.DataFrame = field(default_factory=_empty)
    meta: dict[str, Any] = field(default_factory=dict)
    saved_to: Path | None = field(default=None, compare=False, repr=False)

    def to_json(self) -> dict[str, Any]:
        """Everything but the predictions as a JSON-able dict (tables as columns + dtypes + records)."""
        doc: dict[str, Any] = {"format": FORMAT, "version": FORMAT_VERSION, "meta": _plain(self.meta)}
        for name in TABLES:
            doc[name] = table_to_json(getattr(self, name))
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any], predictions: pd.DataFrame | None = None) -> EvaluationResult:
        """Rebuild a result from :meth:`to_json` output (``predictions`` come from ``predictions.csv``).

        Raises:
            RunDirError: not an evaluation document, or one from a newer medtransfer.
        """
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise RunDirError("not a medtransfer evaluation document (expected format "
                              f"'{FORMAT}'); re-run 'medtransfer evaluate'.")
        if int(doc.get("version", 0)) > FORMAT_VERSION:
            raise RunDirError(f"evaluation format version {doc.get('version')} is newer than this medtransfer "
                              f"reads ({FORMAT_VERSION}); upgrade medtransfer.")
        tables = {name: table_from_json(doc.get(name)) for name in TABLES}
        return cls(**tables, predictions=predictions if predictions is not None else _empty(),
                   meta=dict(doc.get("meta") or {}))

    def save(self, out_dir: str | os.PathLike[str]) -> Path:
        """Write ``evaluation.json`` and ``predictions.csv`` into ``out_dir`` atomically; returns the folder."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with io.atomic_path(out / PREDICTIONS_FILE) as tmp:
            self.predictions.to_csv(tmp, index=False)
        io.write_json(out / EVALUATION_FILE, self.to_json())
        self.saved_to = out
        return out

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> EvaluationResult:
        """Read a result written by :meth:`save` (``path``: the folder or its ``evaluation.json``).

        Raises:
            RunDirError: no ``evaluation.json`` there, or it is not valid JSON.
        """
        p = Path(path)
        folder = p.parent if p.name == EVALUATION_FILE else p
        doc_path = folder / EVALUATION_FILE
        if not doc_path.is_file():
            raise RunDirError(f"{doc_path}: not found; evaluate the run first ('medtransfer evaluate RUN_DIR').")
        try:
            doc = io.read_json(doc_path)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RunDirError(f"{doc_path}: not valid JSON ({exc}); re-run 'medtransfer evaluate'.") from exc
        csv = folder / PREDICTIONS_FILE
        preds = read_predictions(csv) if csv.is_file() else None
        result = cls.from_json(doc, preds)
        result.saved_to = folder
        return result

    def equals(self, other: EvaluationResult, *, predictions: bool = True) -> bool:
        """Whether every table (and meta) is equal, NaN matching NaN."""
        names = [f.name for f in fields(self) if f.name not in ("saved_to", "meta")]
        if not predictions:
            names.remove("predictions")
        return _plain(self.meta) == _plain(other.meta) and all(
            getattr(self, n).equals(getattr(other, n)) for n in names)


def table_to_json(df: pd.DataFrame) -> dict[str, Any]:
    """A DataFrame as ``{"columns", "dtypes", "records"}`` (``DataFrame.to_dict("records")``, NaN kept)."""
    records = [{k: _scalar(v) for k, v in row.items()} for row in df.to_dict("records")]
    return {"columns": [str(c) for c in df.columns], "dtypes": [str(t) for t in df.dtypes], "records": records}


def table_from_json(doc: dict[str, Any] | None) -> pd.DataFrame:
    """Inverse of :func:`table_to_json`: same columns, order and (numeric/bool) dtypes; null → NaN."""
    if not doc:
        return pd.DataFrame()
    columns = list(doc.get("columns", []))
    df = pd.DataFrame.from_records(doc.get("records", []), columns=columns)
    for col, dtype in zip(columns, doc.get("dtypes", []), strict=False):
        if dtype.startswith(("float", "int", "bool", "Int", "Float", "boolean")):
            df[col] = df[col].astype(dtype if not dtype.startswith("float") else "float64")
        elif dtype == "object":
            df[col] = df[col].astype(object).where(df[col].notna(), np.nan)
    return df


def _scalar(v: Any) -> Any:
    if isinstance(v, np.generic):
        v = v.item()
    if v is pd.NA or v is None:
        return float("nan")
    return v


def _plain(obj: Any) -> Any:
    """JSON-able copy of ``obj`` (numpy scalars → Python, tuples → lists, NaN kept for JSON writing)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, float) and math.isnan(obj):
        return None
    return obj
