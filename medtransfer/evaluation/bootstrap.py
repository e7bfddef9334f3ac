"""Patient-level (cluster) bootstrap confidence intervals.

Why patients, not images: two images of one patient are not two independent pieces of evidence. An
image-level bootstrap treats them as such and reports intervals that are too narrow; resampling
patients with replacement and taking all of their images keeps the correlation inside a patient
(the cluster bootstrap, Field & Welsh 2007).

Why weights: a resample is represented by how often each row was drawn, a (B, N) count matrix built
in chunks. Metrics are then weighted sums over that matrix (see
:func:`medtransfer.evaluation.metrics.weighted_binary_metrics`), so 1,000 resamples of 1,000 cases
cost a handful of array passes instead of 1,000 scikit-learn calls.

Every function here draws from the same resampler (:func:`resample_weights`), so for one seed and one
set of patient keys, :func:`bootstrap_metrics`, :func:`bootstrap_statistic` and
:func:`resample_indices` see the same resamples.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import pandas as pd
from scipy.stats import norm

from medtransfer.evaluation.metrics import BINARY_METRICS, clean_binary, weighted_binary_metrics

logger = logging.getLogger(__name__)

#: A CI is reported only when at least this fraction of resamples gave a defined value.
MIN_VALID_FRACTION = 0.5
#: Upper bound on elements of one (chunk, N) weight matrix; bounds memory for large test sets.
_CHUNK_ELEMENTS = 2_000_000

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


def bootstrap_metrics(
    y: np.ndarray,
    p: np.ndarray,
    threshold: float,
    *,
    clusters: np.ndarray | pd.Series | None = None,
    n_boot: int = 1000,
    ci: float = 0.95,
    seed: Seed = 0,
    metrics: Sequence[str] = ("auroc", "auprc", "sensitivity", "specificity", "ppv", "npv", "f1", "accuracy"),
) -> dict[str, tuple[float, float, float]]:
    """Binary metrics with percentile bootstrap CIs, resampling patients (when given) rather than images.

    Args:
        y: labels (N,) in {0, 1}; NaN rows (unknown) dropped, together with their patient keys.
        p: probabilities (N,); prediction is ``p >= threshold``.
        threshold: operating point.
        clusters: patient key per row (N,); None = every row is its own patient.
        n_boot: resamples; 0 gives point estimates with (nan, nan) intervals.
        ci: interval coverage in (0, 1).
        seed: random seed; results are deterministic for a seed.
        metrics: names from ``auroc auprc sensitivity specificity ppv npv f1 accuracy``.

    Returns:
        name -> ``(point, lo, hi)``. Resamples where a metric is undefined (e.g. no positives drawn) are
        skipped for that metric; with fewer than half of ``n_boot`` defined, the interval is (nan, nan).

    Examples:
        >>> rng = np.random.default_rng(0)
        >>> y = rng.integers(0, 2, 500); p = np.clip(0.3 * y + 0.7 * rng.random(500), 0, 1)
        >>> point, lo, hi = bootstrap_metrics(y, p, 0.5, n_boot=200)["auroc"]
        >>> lo < point < hi
        True
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
    codes = y.size if keys is None else keys[keep]
    point = weighted_binary_metrics(y, p, threshold, np.ones((1, y.size)), metrics)
    draws: dict[str, list[np.ndarray]] = {m: [] for m in metrics}
    for w in resample_weights(codes, n_boot, seed):
        res = weighted_binary_metrics(y, p, threshold, w, metrics)
        for m in metrics:
            draws[m].append(res[m])
    out = {}
    for m in metrics:
        values = np.concatenate(draws[m]) if draws[m] else np.empty(0)
        out[m] = (float(point[m][0]), *percentile_ci(values, ci, n_boot))
    return out


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

    Slower than :func:`bootstrap_metrics` (one Python call per resample); prefer that for the standard
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
