"""Patient-level (cluster) bootstrap confidence intervals.

Why patients, not images: two images of one patient are not two independent pieces of evidence. An
image-level bootstrap treats them as such and reports intervals that are too narrow; resampling
patients with replacement and taking all of their images keeps the correlation inside a patient
(the cluster bootstrap, Field & Welsh 2007).

Why weights: a resample is represented by how often each row was drawn, a (B, N) count matrix built
in chunks. Metrics are then weighted sums over that matrix (see
:func:`medtransfer.stats.metrics.weighted_binary_metrics`), so 1,000 resamples of 1,000 cases
cost a handful of array passes instead of 1,000 scikit-learn calls.

Every function here draws from the same resampler (:func:`resample_weights`), so for one seed and one
set of patient keys, :func:`metric_intervals`, :func:`bootstrap_statistic` and
:func:`resample_indices` see the same resamples.

Where the bootstrap is not used. A percentile bootstrap collapses at 0 and 1: 45 positives all detected
resample to 45/45 every time and the "interval" is (1.000-1.000). So :func:`metric_intervals` gives the
proportions (sensitivity, specificity, PPV, NPV, accuracy) a Wilson score interval whose sample size is
deflated for patient clustering (:func:`medtransfer.stats.intervals.clustered_wilson`), keeps the
bootstrap for F1, AUROC and AUPRC, and replaces an AUROC/AUPRC bootstrap interval that is degenerate
(zero width, too few defined resamples, or an estimate at 0 or 1) by a closed-form one that is not
(:func:`medtransfer.stats.intervals.auroc_fallback_interval`). Each interval says which method made it.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy.stats import norm

from medtransfer.stats import intervals
from medtransfer.stats.metrics import (
    BINARY_METRICS,
    PROPORTION_METRICS,
    clean_binary,
    proportion_masks,
    weighted_binary_metrics,
)

logger = logging.getLogger(__name__)

#: A CI is reported only when at least this fraction of resamples gave a defined value.
MIN_VALID_FRACTION = 0.5
#: Upper bound on elements of one (chunk, N) weight matrix; bounds memory for large test sets.
_CHUNK_ELEMENTS = 2_000_000
_NAN = float("nan")

Seed = int | Sequence[int]


def cluster_codes(clusters: np.ndarray | pd.Series | None, n: int) -> tuple[np.ndarray, int]:
    """Integer patient code per row (N,) and the number of patients.

    Args:
        clusters: patient key per row (N,), any hashable values, or None (every row its own patient).
            Missing keys (NaN/None) are treated as one patient each, with a warning.
        n: number of rows.
    """
    if clusters is None:
        return np.arange(n), n
    codes, uniques = pd.factorize(np.asarray(clusters, dtype=object).reshape(-1))
    if codes.size != n:
        raise ValueError(f"clusters has {codes.size} entries for {n} rows; give one patient key per row")
    missing = codes < 0
    if missing.any():
        warnings.warn(
            f"{int(missing.sum())} rows have no patient key; each is treated as its own patient",
            stacklevel=3,
        )
        codes = codes.copy()
        codes[missing] = len(uniques) + np.arange(int(missing.sum()))
    return codes, int(codes.max()) + 1 if codes.size else 0


def resample_weights(
    clusters_or_n: np.ndarray | pd.Series | int, n_boot: int, seed: Seed = 0
) -> Iterator[np.ndarray]:
    """Patient-level bootstrap resamples as row-count matrices, in chunks.

    Each resample draws as many patients as there are, with replacement, and takes all of each drawn
    patient's rows. Deterministic for a seed (and the same patient keys).

    Args:
        clusters_or_n: patient key per row (N,), or an int N for an ordinary row bootstrap.
        n_boot: number of resamples B.
        seed: seed for ``numpy.random.default_rng``.

    Yields:
        float arrays (b, N) with b <= B (together B rows): entry [r, i] = copies of row i in resample r.
    """
    if isinstance(clusters_or_n, (int, np.integer)):
        codes, n_clusters = np.arange(int(clusters_or_n)), int(clusters_or_n)
    else:
        n_rows = len(clusters_or_n)
        codes, n_clusters = cluster_codes(clusters_or_n, n_rows)
    yield from _weights_from_codes(codes, n_clusters, n_boot, seed)


def _weights_from_codes(codes: np.ndarray, n_clusters: int, n_boot: int, seed: Seed) -> Iterator[np.ndarray]:
    """:func:`resample_weights` for patient codes (N,) in 0..n_clusters-1 that are already computed."""
    rng = np.random.default_rng(seed)
    chunk = int(np.clip(_CHUNK_ELEMENTS // max(codes.size, n_clusters, 1), 1, 256))
    for first in range(0, n_boot, chunk):
        b = min(chunk, n_boot - first)
        if n_clusters == 0:
            yield np.zeros((b, 0))
            continue
        draws = rng.integers(0, n_clusters, size=(b, n_clusters))
        flat = (draws + (np.arange(b) * n_clusters)[:, None]).ravel()
        counts = np.bincount(flat, minlength=b * n_clusters).reshape(b, n_clusters)
        yield counts[:, codes].astype(np.float64)


def resample_indices(
    clusters_or_n: np.ndarray | pd.Series | int, n_boot: int, seed: Seed = 0
) -> Iterator[np.ndarray]:
    """Patient-level bootstrap resamples as row-index arrays (the shared resampler, one resample at a time).

    Args:
        clusters_or_n: patient key per row (N,), or an int N for an ordinary row bootstrap.
        n_boot: number of resamples.
        seed: seed; the same seed gives the same resamples as :func:`resample_weights`.

    Yields:
        int arrays of row indices (length varies with the patients drawn), sorted, with repeats.

    Examples:
        >>> counts = [np.bincount(i, minlength=3) for i in resample_indices(np.array(["a", "a", "b"]), 20)]
        >>> all(c[0] == c[1] for c in counts)  # rows 0 and 1 (patient a) always travel together
        True
    """
    for counts in resample_weights(clusters_or_n, n_boot, seed):
        rows = np.arange(counts.shape[1])
        for c in counts.astype(np.int64):
            yield np.repeat(rows, c)


def percentile_ci(values: np.ndarray, ci: float, n_boot: int) -> tuple[float, float]:
    """Percentile interval of the defined resampled values; (nan, nan) when too few are defined.

    Args:
        values: (B,) statistic per resample, NaN where undefined (skipped).
        ci: coverage in (0, 1), e.g. 0.95.
        n_boot: resamples requested; fewer than ``MIN_VALID_FRACTION * n_boot`` defined values -> no CI.
    """
    if not 0 < ci < 1:
        raise ValueError(f"ci must lie in (0, 1), e.g. 0.95; got {ci}")
    valid = values[np.isfinite(values)]
    if n_boot == 0 or valid.size < MIN_VALID_FRACTION * n_boot:
        if n_boot:
            logger.debug("CI undefined: %d of %d resamples gave a value", valid.size, n_boot)
        return float("nan"), float("nan")
    alpha = 1 - ci
    lo, hi = np.quantile(valid, [alpha / 2, 1 - alpha / 2])
    return float(lo), float(hi)


def normal_ci(point: float, values: np.ndarray, ci: float, n_boot: int) -> tuple[float, float]:
    """Normal-approximation interval ``point -/+ z * SE``, SE = standard deviation of the resampled values.

    Used where the level is extreme (multiplicity-adjusted gap CIs): the tails of 1,000 percentile draws
    cannot resolve a 99.7% interval, while their standard deviation is stable.

    Args:
        point: estimate on the data. values: (B,) resampled statistic, NaN = undefined (skipped).
        ci: coverage in (0, 1). n_boot: resamples requested (fewer than half defined -> (nan, nan)).
    """
    if not 0 < ci < 1:
        raise ValueError(f"ci must lie in (0, 1), e.g. 0.95; got {ci}")
    valid = values[np.isfinite(values)]
    if n_boot == 0 or valid.size < max(MIN_VALID_FRACTION * n_boot, 2) or not np.isfinite(point):
        return float("nan"), float("nan")
    half = float(norm.ppf(1 - (1 - ci) / 2) * valid.std(ddof=1))
    return point - half, point + half


class MetricInterval(NamedTuple):
    """A metric with its confidence interval and the method that produced the interval.

    Attributes:
        point: the estimate on the data (NaN when undefined). lo, hi: the interval (NaN when not reported).
        method: ``wilson-cluster`` (proportions), ``bootstrap`` (percentile, patient-level), ``hanley-mcneil``
            / ``wilson-auc-fallback`` (AUROC) or ``wilson-auprc-fallback`` (AUPRC) where the bootstrap was
            degenerate, or ``none`` (no interval: undefined estimate, or ``n_boot=0``).
    """

    point: float
    lo: float
    hi: float
    method: str


def class_patient_counts(y: np.ndarray, codes: np.ndarray) -> tuple[int, int]:
    """Distinct patients with at least one positive row and with at least one negative row."""
    return int(np.unique(codes[y == 1]).size), int(np.unique(codes[y == 0]).size)


def guard_ranking_interval(
    metric: str, point: float, lo: float, hi: float, *, n_pos: int, n_neg: int, ci: float
) -> MetricInterval:
    """Keep a bootstrap AUROC/AUPRC interval, or replace it when it is degenerate.

    See :func:`medtransfer.stats.intervals.is_degenerate`. AUROC falls back to Hanley–McNeil inside
    (0, 1) and to the Birnbaum–Klose/Wilson bound at 0 or 1; AUPRC to a Wilson interval over the positive
    patients. Both use patient counts, so repeated images of a patient are not counted as new evidence.

    Args:
        metric: ``auroc`` or ``auprc``. point, lo, hi: estimate and percentile bootstrap interval.
        n_pos, n_neg: positive and negative patients. ci: coverage.
    """
    if not intervals.is_degenerate(point, lo, hi):
        method = intervals.BOOTSTRAP if np.isfinite(lo) else intervals.NO_INTERVAL
        return MetricInterval(point, lo, hi, method)
    if metric == "auroc":
        f_lo, f_hi, method = intervals.auroc_fallback_interval(point, n_pos, n_neg, ci)
    else:
        f_lo, f_hi, method = intervals.auprc_fallback_interval(point, n_pos, ci)
    logger.debug(
        "%s bootstrap interval degenerate (%.4g: %.4g-%.4g); using %s", metric, point, lo, hi, method
    )
    return MetricInterval(point, f_lo, f_hi, method)


def metric_intervals(
    y: np.ndarray,
    p: np.ndarray,
    threshold: float,
    *,
    clusters: np.ndarray | pd.Series | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: Seed = 0,
    metrics: Sequence[str] = BINARY_METRICS,
) -> dict[str, MetricInterval]:
    """Binary metrics with patient-level CIs that do not collapse at 0 and 1, and the method of each.

    Proportions (sensitivity, specificity, PPV, NPV, accuracy) get the patient-clustered Wilson interval;
    F1, AUROC and AUPRC the percentile bootstrap over patients, with a closed-form fallback for AUROC/AUPRC
    when that is degenerate (module doc). The bootstrap runs only for the metrics that need it.

    Args:
        y: labels (N,) in {0, 1}; NaN rows (unknown) dropped, together with their patient keys.
        p: probabilities (N,); prediction is ``p >= threshold``.
        threshold: operating point.
        clusters: patient key per row (N,); None = every row is its own patient.
        n_boot: resamples; 0 = no intervals at all (point estimates, NaN intervals, method ``none``).
        ci: interval coverage in (0, 1).
        seed: random seed; results are deterministic for a seed.
        metrics: names from ``auroc auprc sensitivity specificity ppv npv f1 accuracy``.

    Returns:
        name -> :class:`MetricInterval` ``(point, lo, hi, method)``. An undefined metric (e.g. PPV with nothing
        predicted positive) has NaN everywhere and method ``none``; so has an F1 interval when fewer than half
        the resamples define it.

    Examples:
        >>> y = np.r_[np.ones(45), np.zeros(55)]; p = np.r_[np.full(45, 0.9), np.full(55, 0.1)]
        >>> res = metric_intervals(y, p, 0.5, n_boot=200)
        >>> res["sensitivity"].point, round(res["sensitivity"].lo, 3), res["sensitivity"].method
        (1.0, 0.921, 'wilson-cluster')
        >>> res["auroc"].lo < res["auroc"].hi == 1.0, res["auroc"].method
        (True, 'wilson-auc-fallback')
    """
    metrics = tuple(metrics)
    unknown = set(metrics) - set(BINARY_METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {list(BINARY_METRICS)}")
    y, p, keep = clean_binary(y, p)
    keys = None if clusters is None else np.asarray(clusters, dtype=object).reshape(-1)
    if keys is not None and keys.size != keep.size:
        raise ValueError(
            f"clusters has {keys.size} entries for {keep.size} rows; give one patient key per row"
        )
    codes, n_clusters = cluster_codes(None if keys is None else keys[keep], y.size)
    point = weighted_binary_metrics(y, p, threshold, np.ones((1, y.size)), metrics)
    if n_boot == 0:
        return {m: MetricInterval(float(point[m][0]), _NAN, _NAN, intervals.NO_INTERVAL) for m in metrics}
    out: dict[str, MetricInterval] = {}
    props = tuple(m for m in metrics if m in PROPORTION_METRICS)
    for m, (success, denom) in proportion_masks(y, p, threshold, props).items():
        r = intervals.clustered_wilson(success, denom, codes, ci)
        method = intervals.WILSON_CLUSTER if np.isfinite(r.lo) else intervals.NO_INTERVAL
        out[m] = MetricInterval(float(point[m][0]), r.lo, r.hi, method)
    boot = tuple(m for m in metrics if m not in PROPORTION_METRICS)
    draws: dict[str, list[np.ndarray]] = {m: [] for m in boot}
    if boot:
        for w in _weights_from_codes(codes, n_clusters, n_boot, seed):
            res = weighted_binary_metrics(y, p, threshold, w, boot)
            for m in boot:
                draws[m].append(res[m])
    n_pos, n_neg = class_patient_counts(y, codes)
    for m in boot:
        values = np.concatenate(draws[m]) if draws[m] else np.empty(0)
        est, (lo, hi) = float(point[m][0]), percentile_ci(values, ci, n_boot)
        if m in ("auroc", "auprc"):
            out[m] = guard_ranking_interval(m, est, lo, hi, n_pos=n_pos, n_neg=n_neg, ci=ci)
        else:
            out[m] = MetricInterval(
                est, lo, hi, intervals.BOOTSTRAP if np.isfinite(lo) else intervals.NO_INTERVAL
            )
    return {m: out[m] for m in metrics}


def bootstrap_statistic(
    stat: Callable[[np.ndarray], float],
    n: int,
    *,
    clusters: np.ndarray | pd.Series | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: Seed = 0,
) -> tuple[float, float, float]:
    """Percentile bootstrap CI of any statistic of the rows (gaps, custom metrics).

    Slower than :func:`metric_intervals` (one Python call per resample); prefer that for the standard
    binary metrics.

    Args:
        stat: function of a row-index array (M,) -> float; NaN = undefined for that resample (skipped).
        n: number of rows N.
        clusters: patient key per row (N,); None = every row is its own patient.
        n_boot: resamples; ci: coverage in (0, 1); seed: random seed.

    Returns:
        ``(stat(all rows), lo, hi)``; (nan, nan) interval when fewer than half the resamples are defined.

    Examples:
        >>> x = np.arange(100.0)
        >>> point, lo, hi = bootstrap_statistic(lambda idx: x[idx].mean(), 100, n_boot=200)
        >>> point, lo < point < hi
        (49.5, True)
    """
    source: np.ndarray | pd.Series | int = n if clusters is None else clusters
    if clusters is not None and len(clusters) != n:
        raise ValueError(f"clusters has {len(clusters)} entries for n={n} rows")
    values = np.array([stat(idx) for idx in resample_indices(source, n_boot, seed)], dtype=np.float64)
    return (float(stat(np.arange(n))), *percentile_ci(values, ci, n_boot))
