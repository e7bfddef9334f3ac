"""Subgroup performance and gaps (bias audit) with patient-level uncertainty.

:func:`subgroup_table` reports each group's metrics with patient-level CIs; :func:`subgroup_gaps`
reports, per attribute, the spread between the best and worst group and whether it is distinguishable
from noise.

Where fairlearn fits and where it does not. Per-group point estimates come from
``fairlearn.metrics.MetricFrame`` (scores go in as ``y_pred``; thresholded metrics threshold inside the
callable). Three things MetricFrame does not do, so they are done here: (1) CIs that account for
*patients* (MetricFrame's bootstrap resamples rows, i.e. images); (2) groups too small to evaluate, which
must be reported as insufficient rather than as a number; (3) a gap CI that can include zero (below).

Group CIs. Sensitivity and specificity get the patient-clustered Wilson interval, AUROC the patient
bootstrap with a closed-form fallback where that is degenerate (see :mod:`medtransfer.stats.bootstrap`):
a small group at sensitivity 1.0 reads e.g. "1.00 (0.83-1.00)", never "1.00 (1.00-1.00)". Each interval's
method is in ``<metric>_ci_method``.

Gap metrics. ``auroc``, ``sensitivity`` (equal opportunity) and ``specificity`` (with sensitivity,
equalized odds; its gap equals the FPR gap in size). Lower is worse for all three.

Gap CI method. The gap ``max - min`` over groups is always >= 0 and, re-maximised on every resample, is
biased upward: a max-min CI would exclude zero even when all groups are identical. Instead we fix the
best and worst groups from the point estimates and put an interval on their *difference* (best - worst).
Because that pair was selected as the most extreme of K groups, the interval is widened for the K(K-1)/2
possible pairs (Bonferroni): its level is ``1 - (1 - ci) / (K(K-1)/2)``, reported as ``ci_level``.

- Sensitivity, specificity: Newcombe's hybrid score interval for a difference of proportions, built from
  the two groups' clustered Wilson intervals at ``ci_level`` (``ci_method`` "newcombe-wilson-cluster").
  Two groups both at 1.0 give an interval around 0 of non-zero width, where a bootstrap gives (0, 0).
- AUROC: the bootstrap of the difference, resampling patients over the whole data set and re-evaluating
  both groups on each resample (so patients shared by groups and random group sizes are accounted for).
  At levels such as 99.7% (K = 4) the tails of 1,000 resamples are too sparse for a percentile interval,
  which then comes out too narrow (simulated false-flag rate ~10% at K = 4), so the interval is
  ``gap -/+ z * SE`` with SE the bootstrap standard deviation of the difference (false-flag rate ~5% or
  less in simulation for K = 2 and 4; "bootstrap-normal"). Where that is degenerate (either group's AUROC
  at 0 or 1, which resamples never leave, or a zero-width / undefined interval), the two groups' closed-form
  AUROC intervals are combined by the same Newcombe formula (the MOVER method; "mover-auc-fallback").

``flagged`` means the interval lies entirely above zero. No correction is made across attributes or metrics.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from fairlearn.metrics import MetricFrame

from medtransfer.errors import ConfigError
from medtransfer.stats import intervals
from medtransfer.stats.bootstrap import (
    class_patient_counts,
    cluster_codes,
    metric_intervals,
    normal_ci,
    resample_weights,
)
from medtransfer.stats.calibration import ece
from medtransfer.stats.metrics import clean_binary, fast_auroc, proportion_masks, weighted_binary_metrics

logger = logging.getLogger(__name__)

UNKNOWN = "unknown"
SEP = "×"
#: Metrics reported per group, each with ``_lo``, ``_hi`` and ``_ci_method``.
GROUP_METRICS = ("auroc", "sensitivity", "specificity")
#: Metrics whose best-vs-worst gap is reported; lower is worse for all three.
GAP_METRICS = ("auroc", "sensitivity", "specificity")
TABLE_COLUMNS = (
    "attribute",
    "group",
    "n",
    "n_patients",
    "n_pos",
    "prevalence",
    *(f"{m}{s}" for m in GROUP_METRICS for s in ("", "_lo", "_hi", "_ci_method")),
    "ece",
    "status",
)
GAP_COLUMNS = (
    "attribute",
    "metric",
    "gap",
    "gap_lo",
    "gap_hi",
    "ci_level",
    "ci_method",
    "worst_group",
    "worst_value",
    "best_group",
    "best_value",
    "n_groups",
    "flagged",
    "reason",
)
_NAN = float("nan")
_NO_GAP = {
    "gap": _NAN,
    "gap_lo": _NAN,
    "gap_hi": _NAN,
    "ci_level": _NAN,
    "ci_method": intervals.NO_INTERVAL,
    "worst_group": None,
    "worst_value": _NAN,
    "best_group": None,
    "best_value": _NAN,
    "flagged": False,
}


@dataclass(frozen=True)
class _Data:
    """Labelled rows only: labels y (N,), scores p (N,), patient codes (N,), and the matching frame rows."""

    y: np.ndarray
    p: np.ndarray
    codes: np.ndarray
    frame: pd.DataFrame


def _prepare(
    df: pd.DataFrame, y_col: str, p_col: str, cluster_col: str | None, attributes: Sequence[str]
) -> _Data:
    """Check the columns, drop rows with unknown labels, and code patients."""
    for col in (y_col, p_col):
        if col not in df.columns:
            raise ValueError(f"column {col!r} not in the predictions; columns: {list(df.columns)}")
    missing = [a for a in attributes if a not in df.columns]
    if missing:
        raise ConfigError(
            f"subgroup attributes {missing} are not columns of the predictions; available: {list(df.columns)}. "
            "Remove them from eval.subgroups or add them to the labels CSV."
        )
    if cluster_col is not None and cluster_col not in df.columns:
        raise ConfigError(
            f"patient column {cluster_col!r} not in the predictions; pass cluster_col=None only if every "
            "row is a different patient (otherwise CIs are too narrow)"
        )
    y, p, keep = clean_binary(df[y_col].to_numpy(dtype=np.float64), df[p_col].to_numpy(dtype=np.float64))
    frame = df.loc[keep].reset_index(drop=True)
    codes, _ = cluster_codes(None if cluster_col is None else frame[cluster_col].to_numpy(), len(frame))
    return _Data(y=y, p=p, codes=codes, frame=frame)


def _labels(col: pd.Series) -> tuple[pd.Series, list[str]]:
    """Group label per row as text (missing -> "unknown") and the display order of the labels."""
    values = col.astype(object).where(col.notna(), None)
    present = [v for v in pd.unique(values) if v is not None]
    if isinstance(col.dtype, pd.CategoricalDtype):
        present = [c for c in col.cat.categories if c in set(present)]
    else:
        try:
            present = sorted(present)
        except TypeError:
            present = sorted(present, key=str)

    def text(v: object) -> str:
        if isinstance(v, float) and v.is_integer():
            return str(int(v))
        return str(v)

    order = [text(v) for v in present] + ([UNKNOWN] if values.isna().any() else [])
    return values.map(lambda v: UNKNOWN if v is None else text(v)).astype(str), list(dict.fromkeys(order))


def _group_columns(
    frame: pd.DataFrame, attributes: Sequence[str], intersections: Sequence[tuple[str, str]]
) -> list[tuple[str, pd.Series, list[str]]]:
    """(attribute name, label per row, group order) for each attribute, then each intersection."""
    cols = {
        a: _labels(frame[a])
        for a in dict.fromkeys([*attributes, *(a for pair in intersections for a in pair)])
    }
    out = [(a, *cols[a]) for a in attributes]
    for a, b in intersections:
        (la, oa), (lb, ob) = cols[a], cols[b]
        labels = la + SEP + lb
        seen = set(labels)
        out.append(
            (f"{a}{SEP}{b}", labels, [f"{x}{SEP}{z}" for x in oa for z in ob if f"{x}{SEP}{z}" in seen])
        )
    return out


def _mf_metrics(threshold: float) -> dict:
    """MetricFrame callables f(y_true, scores); thresholded ones compare scores >= threshold."""

    def rate(num: float, den: float) -> float:
        return float(num / den) if den > 0 else float("nan")

    def sensitivity(y: np.ndarray, s: np.ndarray) -> float:
        y, s = np.asarray(y), np.asarray(s)
        return rate(np.sum((y == 1) & (s >= threshold)), np.sum(y == 1))

    def specificity(y: np.ndarray, s: np.ndarray) -> float:
        y, s = np.asarray(y), np.asarray(s)
        return rate(np.sum((y == 0) & (s < threshold)), np.sum(y == 0))

    return {
        "n": lambda y, s: len(y),
        "n_pos": lambda y, s: float(np.sum(y)),
        "auroc": fast_auroc,
        "sensitivity": sensitivity,
        "specificity": specificity,
        "ece": ece,
    }


def _status(n_patients: int, n: int, n_pos: int, min_group_size: int) -> str:
    """ "ok", or "insufficient: <reason>" (too few patients, or one class only)."""
    if n_patients < min_group_size:
        return f"insufficient: {n_patients} patients ({n} cases) < min_group_size {min_group_size}"
    if n_pos in (0, n):
        return f"insufficient: one class only ({n_pos} positives of {n} cases)"
    return "ok"


def _group_points(
    data: _Data, labels: pd.Series, order: list[str], threshold: float, min_group_size: int
) -> pd.DataFrame:
    """Point estimates per group (MetricFrame) with n_patients and status; metrics NaN when insufficient."""
    mf = MetricFrame(metrics=_mf_metrics(threshold), y_true=data.y, y_pred=data.p, sensitive_features=labels)
    points = mf.by_group.reindex(order)
    points.index = pd.Index(order, name="group")
    points["n_patients"] = pd.Series(data.codes).groupby(labels.to_numpy()).nunique().reindex(order)
    points = points.astype({"n": np.int64, "n_pos": np.int64, "n_patients": np.int64})
    points["prevalence"] = points["n_pos"] / points["n"]
    points["status"] = [
        _status(r.n_patients, r.n, r.n_pos, min_group_size)
        for r in points[["n", "n_pos", "n_patients"]].itertuples()
    ]
    points.loc[points["status"] != "ok", ["auroc", "sensitivity", "specificity", "ece"]] = np.nan
    return points


def subgroup_table(
    df: pd.DataFrame,
    *,
    y_col: str,
    p_col: str,
    threshold: float,
    attributes: Sequence[str],
    cluster_col: str | None = "patient_key",
    min_group_size: int = 10,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    intersections: Sequence[tuple[str, str]] = (),
) -> pd.DataFrame:
    """Per-group metrics with patient-level CIs, one binary outcome.

    Args:
        df: one row per case (e.g. predictions.csv): label, probability, patient key, attribute columns.
        y_col: label column, 0/1 (NaN = unknown, row dropped). p_col: probability column in [0, 1].
        threshold: operating point (chosen on validation); prediction is ``p >= threshold``.
        attributes: attribute columns, e.g. ``["sex", "age_band", "site"]``; missing values form "unknown".
        cluster_col: patient key column (a patient is resampled, and counted, as a unit); None = every row
            its own patient.
        min_group_size: fewer patients than this -> status "insufficient: ..." and NaN metrics.
        n_boot: AUROC resamples per group (0 = no CIs at all); ci: coverage; seed: random seed (deterministic).
        intersections: attribute pairs, e.g. ``[("sex", "age_band")]`` -> attribute "sex×age_band",
            groups like "F×40-59".

    Returns:
        One row per (attribute, group): ``attribute, group, n, n_patients, n_pos, prevalence``, then for each
        of ``auroc, sensitivity, specificity`` the value, ``_lo``, ``_hi`` and ``_ci_method`` (module doc),
        then ``ece, status``. Counts are always filled; metrics are NaN (method "none") when the group is
        insufficient (never a fabricated 0 or 1).

    Raises:
        ConfigError: an attribute or the patient column is not in ``df``.
    """
    data = _prepare(
        df, y_col, p_col, cluster_col, [*attributes, *(a for pair in intersections for a in pair)]
    )
    rows = []
    for a_idx, (attribute, labels, order) in enumerate(_group_columns(data.frame, attributes, intersections)):
        points = _group_points(data, labels, order, threshold, min_group_size)
        for g_idx, (group, pt) in enumerate(points.iterrows()):
            row = {"attribute": attribute, "group": group, **pt[["n", "n_patients", "n_pos", "prevalence"]]}
            cis = {m: (_NAN, _NAN, intervals.NO_INTERVAL) for m in GROUP_METRICS}
            if pt["status"] == "ok":
                mask = (labels == group).to_numpy()
                res = metric_intervals(
                    data.y[mask],
                    data.p[mask],
                    threshold,
                    clusters=data.codes[mask],
                    n_boot=n_boot,
                    ci=ci,
                    seed=(seed, a_idx, g_idx),
                    metrics=GROUP_METRICS,
                )
                cis = {m: (res[m].lo, res[m].hi, res[m].method) for m in GROUP_METRICS}
            for m in GROUP_METRICS:
                lo, hi, method = cis[m]
                row.update({m: pt[m], f"{m}_lo": lo, f"{m}_hi": hi, f"{m}_ci_method": method})
            rows.append({**row, "ece": pt["ece"], "status": pt["status"]})
    out = pd.DataFrame(rows, columns=list(TABLE_COLUMNS))
    return out.astype({"n": np.int64, "n_patients": np.int64, "n_pos": np.int64}) if rows else out


def _gap_pair(values: pd.Series) -> tuple[str, str]:
    """(worst group, best group) by point estimate (lower is worse); stable order breaks ties."""
    ordered = values.sort_values(kind="mergesort")
    return ordered.index[0], ordered.index[-1]


def _resampled_group_auroc(
    data: _Data, masks: dict[str, np.ndarray], threshold: float, n_boot: int, seed: int
) -> dict[str, np.ndarray]:
    """Per group: AUROC on each whole-data patient resample -> (n_boot,) array (NaN where undefined)."""
    acc: dict[str, list[np.ndarray]] = {g: [] for g in masks}
    for w in resample_weights(data.codes, n_boot, seed):
        for g, mask in masks.items():
            res = weighted_binary_metrics(data.y[mask], data.p[mask], threshold, w[:, mask], ("auroc",))
            acc[g].append(res["auroc"])
    return {g: np.concatenate(v) if v else np.empty(0) for g, v in acc.items()}


def _rate_gap(
    data: _Data,
    masks: dict[str, np.ndarray],
    metric: str,
    best: str,
    worst: str,
    threshold: float,
    level: float,
) -> tuple[float, float, float, str]:
    """Newcombe interval of ``metric[best] - metric[worst]`` from clustered Wilson intervals at ``level``."""
    ends = {}
    for g in (best, worst):
        m = masks[g]
        success, denom = proportion_masks(data.y[m], data.p[m], threshold, (metric,))[metric]
        r = intervals.clustered_wilson(success, denom, data.codes[m], level)
        ends[g] = (r.point, (r.lo, r.hi))
    gap, lo, hi = intervals.newcombe_difference(*ends[best], *ends[worst])
    return float(gap), lo, hi, intervals.NEWCOMBE


def _auroc_gap(
    data: _Data,
    masks: dict[str, np.ndarray],
    values: pd.Series,
    boot: dict[str, np.ndarray],
    best: str,
    worst: str,
    level: float,
    n_boot: int,
) -> tuple[float, float, float, str]:
    """Bootstrap-normal interval of ``auroc[best] - auroc[worst]``, or MOVER when that is degenerate."""
    gap = float(values[best] - values[worst])
    lo, hi = normal_ci(gap, boot[best] - boot[worst], level, n_boot)
    # a group at AUROC 0 or 1 stays there in every resample, so the SE would ignore its uncertainty
    at_bound = any(not 0 < values[g] < 1 for g in (best, worst))
    if not at_bound and np.isfinite(lo) and hi - lo > 1e-12:
        return gap, lo, hi, intervals.BOOTSTRAP_NORMAL
    ends = {}
    for g in (best, worst):
        n_pos, n_neg = class_patient_counts(data.y[masks[g]], data.codes[masks[g]])
        f_lo, f_hi, _ = intervals.auroc_fallback_interval(float(values[g]), n_pos, n_neg, level)
        ends[g] = (float(values[g]), (f_lo, f_hi))
    _, lo, hi = intervals.newcombe_difference(*ends[best], *ends[worst])
    return gap, lo, hi, intervals.MOVER_AUC_FALLBACK


def _gap_rows(
    attribute: str,
    points: pd.DataFrame,
    labels: pd.Series,
    data: _Data,
    threshold: float,
    n_boot: int,
    ci: float,
    seed: int,
) -> list[dict]:
    """Gap rows (one per metric) for one attribute."""
    # "unknown" (missing attribute) is shown in the table but is not a population: a gap between women and
    # "sex not recorded" says nothing about fairness, so it never takes part in gaps.
    ok = points[(points["status"] == "ok") & (points.index.astype(str) != UNKNOWN)]
    k = len(ok)
    if k < 2:
        reason = f"fewer than 2 groups with enough data ({k} of {len(points)} sufficient)"
        return [
            {**_NO_GAP, "attribute": attribute, "metric": m, "n_groups": k, "reason": reason}
            for m in GAP_METRICS
        ]
    masks = {g: (labels == g).to_numpy() for g in ok.index}
    boot = _resampled_group_auroc(data, masks, threshold, n_boot, seed) if n_boot > 0 else {}
    level = 1 - (1 - ci) / (k * (k - 1) / 2)
    rows = []
    for m in GAP_METRICS:
        worst, best = _gap_pair(ok[m])
        if n_boot == 0:
            gap, lo, hi, method = float(ok[m][best] - ok[m][worst]), _NAN, _NAN, intervals.NO_INTERVAL
        elif m == "auroc":
            gap, lo, hi, method = _auroc_gap(data, masks, ok[m], boot, best, worst, level, n_boot)
        else:
            gap, lo, hi, method = _rate_gap(data, masks, m, best, worst, threshold, level)
        reason = "ok" if np.isfinite(lo) else "CI not requested (n_boot=0)" if n_boot == 0 else "CI undefined"
        rows.append(
            {
                "attribute": attribute,
                "metric": m,
                "gap": gap,
                "gap_lo": lo,
                "gap_hi": hi,
                "ci_level": level,
                "ci_method": method,
                "worst_group": worst,
                "worst_value": float(ok[m][worst]),
                "best_group": best,
                "best_value": float(ok[m][best]),
                "n_groups": k,
                "flagged": bool(lo > 0),
                "reason": reason,
            }
        )
    return rows


def subgroup_gaps(
    df: pd.DataFrame,
    *,
    y_col: str,
    p_col: str,
    threshold: float,
    attributes: Sequence[str],
    cluster_col: str | None = "patient_key",
    min_group_size: int = 10,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: int = 0,
    intersections: Sequence[tuple[str, str]] = (),
) -> pd.DataFrame:
    """Best-vs-worst group gap per attribute and metric, with a patient-level CI that can include zero.

    Metrics: ``auroc``; ``sensitivity`` (equal opportunity); ``specificity`` (with sensitivity, equalized
    odds; the specificity gap equals the FPR gap). Worst = lowest value for all three. Only groups with status
    "ok" (see :func:`subgroup_table`) take part.

    Args:
        df, y_col, p_col, threshold, attributes, cluster_col, min_group_size, intersections: as for
            :func:`subgroup_table`.
        n_boot: whole-data patient resamples for the AUROC gap (0 = no gap CIs at all); ci: nominal coverage
            before the multiplicity widening; seed: random seed (deterministic).

    Returns:
        One row per (attribute, metric): ``attribute, metric, gap`` (max - min over sufficient groups),
        ``gap_lo, gap_hi`` (CI of best - worst, see module doc), ``ci_level`` (the widened level),
        ``ci_method`` ("newcombe-wilson-cluster", "bootstrap-normal", "mover-auc-fallback" or "none"),
        ``worst_group, worst_value, best_group, best_value, n_groups, flagged`` (gap_lo > 0), ``reason``
        ("ok", "CI undefined", "CI not requested (n_boot=0)", or why there is no gap: fewer than 2 sufficient
        groups -> NaN gap, not flagged).
    """
    data = _prepare(
        df, y_col, p_col, cluster_col, [*attributes, *(a for pair in intersections for a in pair)]
    )
    rows: list[dict] = []
    for attribute, labels, order in _group_columns(data.frame, attributes, intersections):
        points = _group_points(data, labels, order, threshold, min_group_size)
        rows += _gap_rows(attribute, points, labels, data, threshold, n_boot, ci, seed)
    flagged = [f"{r['attribute']}/{r['metric']}" for r in rows if r["flagged"]]
    if flagged:
        logger.info("subgroup gaps whose CI excludes 0: %s", ", ".join(flagged))
    return pd.DataFrame(rows, columns=list(GAP_COLUMNS))
