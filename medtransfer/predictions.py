"""The predictions table (``predictions.csv``): its text columns and dtypes, so that the table in memory equals
its CSV read back. Torch-free: the inference path writes it, evaluation and the report read it.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

PREDICTIONS_FILE = "predictions.csv"
#: Predictions columns that hold text (read back as text even when every value looks like a number).
TEXT_COLUMNS = ("case_id", "patient_key", "split", "path", "file", "label", "predicted", "error", "sex",
                "age_band", "site", "manufacturer", "view", "modality", "slice_attention")


def normalise_predictions(df: pd.DataFrame) -> pd.DataFrame:
    """The predictions table with fixed dtypes, so that the table in memory equals its CSV read back.

    Text columns are ``object`` (missing = NaN; ``predicted`` and ``error`` missing = ""), ``pred_*`` are
    and ``peak_slice`` nullable ``Int64``, ``true_*``/``p_*``/``age`` are float.
    """
    out = df.copy()
    for col in out.columns:
        if col in TEXT_COLUMNS:
            s = out[col].astype(object)
            out[col] = s.where(s.notna(), "" if col in ("predicted", "error") else np.nan)
        elif col.startswith("pred_") or col == "peak_slice":
            out[col] = pd.to_numeric(out[col], errors="coerce").astype("Int64")
        elif col.startswith(("true_", "p_")) or col == "age":
            out[col] = pd.to_numeric(out[col], errors="coerce").astype(np.float64)
    return out


def read_predictions(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a ``predictions.csv`` written by :meth:`EvaluationResult.save` (or ``medtransfer predict``)."""
    df = pd.read_csv(path, dtype={c: object for c in TEXT_COLUMNS}, keep_default_na=True)
    return normalise_predictions(df)
