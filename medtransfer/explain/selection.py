"""Which cases to explain in a report: the most confident successes and failures, per class and group.

Input is a predictions table as written to ``predictions.csv``: ``case_id``, ``split``, and per class
``true_<class>`` (0/1), ``p_<class>`` (probability) and ``pred_<class>`` (0/1 decision at the chosen
threshold), plus subgroup columns (``sex``, ``age_band``, ``site``...). Binary tasks carry the positive
class's columns only. Per class (and group) we take:

- **TP**: true positives with the highest ``p`` (what the model is surest about, and right);
- **FP**: false positives with the highest ``p`` (confidently wrong: where shortcuts show);
- **FN**: false negatives with the lowest ``p`` (missed worst).

Rows with an unknown label (blank ``true_<class>``) or no score (a case that could not be decoded) are
skipped for that class. When ``pred_<class>`` is
absent, decisions are ``p >= 0.5`` (logged).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import pandas as pd

from medtransfer.errors import ConfigError

logger = logging.getLogger(__name__)

KINDS = ("TP", "FP", "FN")
SELECTION_COLUMNS = ["case_id", "class", "kind", "group", "p"]


def prediction_classes(predictions: pd.DataFrame) -> list[str]:
    """Classes that have both ``p_<class>`` and ``true_<class>`` columns, in column order (not ``p_raw_``)."""
    return [c[2:] for c in predictions.columns
            if c.startswith("p_") and not c.startswith("p_raw_") and f"true_{c[2:]}" in predictions.columns]


def select_cases(
    predictions: pd.DataFrame,
    *,
    n: int = 4,
    classes: Sequence[str] | None = None,
    group_by: str | None = None,
    kinds: Sequence[str] = KINDS,
) -> pd.DataFrame:
    """The cases to explain.

    Args:
        predictions: the predictions table (see the module docstring), already filtered to one split.
        n: cases per class, kind (and group).
        classes: classes to select for (default: every class with ``p_``/``true_`` columns).
        group_by: a subgroup column (e.g. ``"sex"``): select ``n`` per value; missing values form "unknown".
        kinds: any of ``TP``, ``FP``, ``FN``.

    Returns:
        DataFrame(case_id, class, kind, group, p), ordered by class, group, kind, then confidence (highest
        p first for TP/FP, lowest first for FN). ``group`` is ``"all"`` or ``"<column>=<value>"``.

    Examples:
        >>> select_cases(pd.read_csv("runs/cxr1/predictions.csv"), n=2, group_by="sex")  # doctest: +SKIP
    """
    if "case_id" not in predictions.columns:
        raise ValueError("predictions need a 'case_id' column")
    if group_by is not None and group_by not in predictions.columns:
        raise ConfigError(f"no subgroup column '{group_by}' in predictions; columns: {list(predictions.columns)}")
    bad = set(kinds) - set(KINDS)
    if bad:
        raise ValueError(f"unknown kinds {sorted(bad)}; expected some of {KINDS}")
    classes = list(classes) if classes is not None else prediction_classes(predictions)
    if group_by is None:
        groups = [("all", predictions)]
    else:
        keys = predictions[group_by].astype("string").fillna("unknown")
        groups = [(f"{group_by}={value}", predictions[keys == value]) for value in sorted(keys.unique())]
    parts = [_select(df, cls, group, n, kinds) for cls in classes for group, df in groups]
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=SELECTION_COLUMNS)
    return out.reindex(columns=SELECTION_COLUMNS)


def case_kind(predictions: pd.DataFrame, cls: str) -> pd.Series:
    """TP / FP / FN / TN for class ``cls`` per row ("" where the label is unknown)."""
    true = pd.to_numeric(predictions[f"true_{cls}"], errors="coerce")
    pred = _decisions(predictions, cls)
    kind = pd.Series("", index=predictions.index, dtype=object)
    known = true.notna()
    kind[known & (true == 1) & pred] = "TP"
    kind[known & (true == 0) & pred] = "FP"
    kind[known & (true == 1) & ~pred] = "FN"
    kind[known & (true == 0) & ~pred] = "TN"
    return kind


def _decisions(predictions: pd.DataFrame, cls: str) -> pd.Series:
    col = f"pred_{cls}"
    if col in predictions.columns:
        return pd.to_numeric(predictions[col], errors="coerce").fillna(0).astype(bool)
    logger.info("no %s column: deciding p_%s >= 0.5", col, cls)
    return pd.to_numeric(predictions[f"p_{cls}"], errors="coerce") >= 0.5


def _select(df: pd.DataFrame, cls: str, group: str, n: int, kinds: Sequence[str]) -> pd.DataFrame:
    p = pd.to_numeric(df[f"p_{cls}"], errors="coerce")
    kind = case_kind(df, cls).where(p.notna(), "")  # cases that could not be scored (``error``) are skipped
    parts = []
    for k in KINDS:
        if k not in kinds:
            continue
        rows = pd.DataFrame({"case_id": df["case_id"].astype(str), "p": p})[kind == k]
        rows = rows.sort_values(["p", "case_id"], ascending=[k == "FN", True]).head(n)
        parts.append(rows.assign(**{"class": cls, "kind": k, "group": group}))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=SELECTION_COLUMNS)
