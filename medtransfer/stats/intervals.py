"""Closed-form confidence intervals that stay honest at 0 and 1.

Why not the bootstrap everywhere. A percentile bootstrap of a proportion that is 45/45 resamples 45/45 every
time and reports "1.000 (1.000-1.000)", which a clinician reads as certainty. Score intervals do not collapse:
0/45 at 95% gives (0, 0.079), the range of true rates that 0 events in 45 would not reject.

What lives here (all pure functions of counts, no resampling):

- :func:`wilson_interval` — Wilson's score interval for a proportion (Wilson 1927; Newcombe 1998a, method 3),
  accepting a non-integer *effective* sample size.
- :func:`design_effect` / :func:`clustered_wilson` — the same interval with patients as clusters: the
  effective sample size is n / deff, deff from the cluster (ratio-estimator) variance, Rao–Scott style.
- :func:`newcombe_difference` — Newcombe's hybrid score interval for a difference of two proportions
  (Newcombe 1998b, method 10), built from any two single-proportion intervals (the MOVER idea of Zou & Donner
  2008, which is the same formula applied to other estimates).
- :func:`hanley_mcneil_interval`, :func:`auroc_bound_interval`, :func:`auroc_fallback_interval`,
  :func:`auprc_fallback_interval` — what the AUROC/AUPRC bootstrap falls back to when it is degenerate.

Every function returns ``(nan, nan)`` when the estimate itself is undefined (no denominator), never 0 or 1.

References:
    Wilson EB (1927) JASA 22:209. Newcombe RG (1998a) Stat Med 17:857 and (1998b) Stat Med 17:873.
    Rao JNK, Scott AJ (1992) Biometrics 48:577. Kish L (1965) Survey Sampling. Hanley JA, McNeil BJ (1982)
    Radiology 143:29. Birnbaum ZW, Klose OM (1957) Ann Math Stat 28:933. Boyd K et al. (2013) ECML PKDD.
    Zou GY, Donner A (2008) Stat Med 27:1693.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import numpy as np
from scipy.stats import norm

logger = logging.getLogger(__name__)

# Method names recorded next to every interval (``<metric>_ci_method`` columns).
WILSON_CLUSTER = "wilson-cluster"
BOOTSTRAP = "bootstrap"
HANLEY_MCNEIL = "hanley-mcneil"
WILSON_AUC_FALLBACK = "wilson-auc-fallback"
WILSON_AUPRC_FALLBACK = "wilson-auprc-fallback"
NEWCOMBE = "newcombe-wilson-cluster"
BOOTSTRAP_NORMAL = "bootstrap-normal"
MOVER_AUC_FALLBACK = "mover-auc-fallback"
NO_INTERVAL = "none"

_NAN = float("nan")


class ClusteredProportion(NamedTuple):
    """A proportion with its clustering summary.

    Attributes:
        point: successes / denominator rows (NaN when there are none).
        n: denominator rows (images). n_clusters: patients contributing at least one denominator row.
        deff: design effect (>= 1). n_eff: effective sample size used by the interval (n / deff).
        lo, hi: the interval.
    """

    point: float
    n: int
    n_clusters: int
    deff: float
    n_eff: float
    lo: float
    hi: float


def z_value(ci: float) -> float:
    """Two-sided standard normal quantile for coverage ``ci`` in (0, 1) (1.96 for 0.95)."""
    if not 0 < ci < 1:
        raise ValueError(f"ci must lie in (0, 1), e.g. 0.95; got {ci}")
    return float(norm.ppf(1 - (1 - ci) / 2))


def wilson_interval(point: float, n: float, ci: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a proportion, with a possibly non-integer (effective) sample size.

    ``(p + z²/2n -/+ z sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)``. Unlike the Wald or percentile-bootstrap
    interval it has non-zero width at p = 0 and p = 1 and always lies in [0, 1].

    Args:
        point: observed proportion in [0, 1]. n: (effective) sample size > 0. ci: coverage in (0, 1).

    Returns:
        ``(lo, hi)``; ``(nan, nan)`` when ``n <= 0`` or ``point`` is NaN.

    Examples:
        >>> lo, hi = wilson_interval(0 / 45, 45)
        >>> round(lo, 4), round(hi, 4)
        (0.0, 0.0787)
    """
    z = z_value(ci)
    if not (np.isfinite(point) and np.isfinite(n)) or n <= 0:
        return _NAN, _NAN
    if not 0 <= point <= 1:
        raise ValueError(f"a proportion must lie in [0, 1]; got {point}")
    z2n = z * z / n
    centre = (point + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * np.sqrt(point * (1 - point) / n + z2n / (4 * n))
    # exact ends at the boundary (the formula gives them up to rounding)
    lo = 0.0 if point == 0 else max(0.0, centre - half)
    hi = 1.0 if point == 1 else min(1.0, centre + half)
    return float(lo), float(hi)


def design_effect(success: np.ndarray, denom: np.ndarray, codes: np.ndarray) -> tuple[float, int, int, float]:
    """Design effect of patient clustering on a proportion, and the effective sample size.

    The proportion is the ratio estimator p = sum(a_j) / sum(m_j) over patients j (a_j successes among m_j
    denominator rows of patient j, k patients with m_j > 0, n = sum m_j). Its linearised cluster variance
    ``v_c = k/(k-1) * sum_j (a_j - p m_j)^2 / n^2`` is compared with the same estimator applied to single
    rows, ``v_1 = n/(n-1) * p(1-p)/n`` (Rao & Scott 1992): ``deff = max(1, v_c / v_1)``, ``n_eff = n / deff``.
    Both carry their small-sample factor so that with one row per patient deff is exactly 1 and the interval
    is plain Wilson. deff is floored at 1: a negatively correlated patient (rare, and at these sizes mostly
    noise) never makes the interval narrower than treating images as independent.

    At p = 0 or p = 1 (and with a single patient) both variances are 0 and the ratio says nothing. We then
    assume the worst plausible clustering, perfect within-patient correlation (ICC = 1: a patient's images
    all succeed or all fail), whose effective sample size is Kish's ``n^2 / sum m_j^2``. It equals the number
    of patients when every patient contributes equally many images and is smaller otherwise, so 45/45 images
    from 30 patients is reported like 30/30 at most, never like 45/45. With one row per patient it is n.

    Args:
        success: (N,) bool, the numerator rows. denom: (N,) bool, the denominator rows (success implies denom).
        codes: (N,) int patient code per row, 0..K-1.

    Returns:
        ``(point, n, n_clusters, n_eff)``; point NaN and n_eff 0 when there is no denominator row.
    """
    denom = np.asarray(denom, dtype=bool)
    success = np.asarray(success, dtype=bool) & denom
    codes = np.asarray(codes, dtype=np.int64)
    n = int(denom.sum())
    if n == 0:
        return _NAN, 0, 0, 0.0
    size = int(codes.max()) + 1 if codes.size else 0
    m = np.bincount(codes[denom], minlength=size).astype(np.float64)
    a = np.bincount(codes[success], minlength=size).astype(np.float64)
    used = m > 0
    m, a = m[used], a[used]
    k = int(used.sum())
    p = float(a.sum() / n)
    kish = float(n * n / np.sum(m * m))
    if k == n:  # one row per patient: no clustering, plain Wilson (exactly, not up to rounding)
        return p, n, k, float(n)
    if p in (0.0, 1.0) or k < 2:
        return p, n, k, kish
    v_cluster = k / (k - 1) * float(np.sum((a - p * m) ** 2)) / (n * n)
    v_rows = p * (1 - p) / (n - 1)  # = n/(n-1) * p(1-p)/n
    deff = max(1.0, v_cluster / v_rows)
    return p, n, k, n / deff


def clustered_wilson(
    success: np.ndarray, denom: np.ndarray, codes: np.ndarray | None = None, ci: float = 0.95
) -> ClusteredProportion:
    """Wilson interval for a proportion over images, with the sample size deflated for patient clustering.

    See :func:`design_effect` for how the effective sample size is chosen (including at 0 and 1).

    Args:
        success: (N,) bool numerator rows (e.g. true positives). denom: (N,) bool denominator rows (positives).
        codes: (N,) int patient code per row; None = every row its own patient (plain Wilson).
        ci: coverage in (0, 1).

    Returns:
        :class:`ClusteredProportion`; point/lo/hi NaN when there is no denominator row.

    Examples:
        >>> detected = np.array([1, 1, 1, 1, 0, 0], dtype=bool)  # 3 patients x 2 positive images
        >>> r = clustered_wilson(detected, np.ones(6, dtype=bool), np.array([0, 0, 1, 1, 2, 2]))
        >>> round(r.point, 3), r.n, r.n_clusters, round(r.deff, 2), round(r.n_eff, 2)
        (0.667, 6, 3, 2.5, 2.4)
    """
    denom = np.asarray(denom, dtype=bool).reshape(-1)
    success = np.asarray(success, dtype=bool).reshape(-1)
    if success.shape != denom.shape:
        raise ValueError(f"success has {success.size} rows and denom {denom.size}; give one flag per row")
    if codes is None:
        codes = np.arange(denom.size)
    codes = np.asarray(codes).reshape(-1)
    if codes.size != denom.size:
        raise ValueError(
            f"codes has {codes.size} entries for {denom.size} rows; give one patient code per row"
        )
    p, n, k, n_eff = design_effect(success, denom, codes)
    lo, hi = wilson_interval(p, n_eff, ci)
    deff = n / n_eff if n_eff > 0 else _NAN
    return ClusteredProportion(p, n, k, deff, n_eff, lo, hi)


def newcombe_difference(
    p1: float, ci1: tuple[float, float], p2: float, ci2: tuple[float, float]
) -> tuple[float, float, float]:
    """Newcombe's hybrid score interval for ``p1 - p2`` from the two single-proportion intervals.

    ``L = d - sqrt((p1 - l1)^2 + (u2 - p2)^2)``, ``U = d + sqrt((u1 - p1)^2 + (p2 - l2)^2)`` (Newcombe
    1998b, method 10). Each term is the distance from an estimate to the end of its own score interval, so
    the result inherits the score interval's behaviour at 0 and 1: two groups both at 1.0 give an interval
    around 0 of non-zero width. It assumes the two estimates are independent (different patients); patients
    shared by both groups usually correlate them positively, which makes this interval conservative.

    Args:
        p1, ci1: first estimate and its ``(lo, hi)``. p2, ci2: second estimate and its ``(lo, hi)``,
            both at the level wanted for the difference.

    Returns:
        ``(d, lo, hi)`` with d = p1 - p2; NaN interval when any input is NaN.

    Examples:
        >>> a, b = 56 / 70, 48 / 80  # Newcombe 1998b, Table II, example (a)
        >>> d, lo, hi = newcombe_difference(a, wilson_interval(a, 70), b, wilson_interval(b, 80))
        >>> round(lo, 4), round(hi, 4)
        (0.0524, 0.3339)
    """
    (l1, u1), (l2, u2) = ci1, ci2
    d = p1 - p2
    if not np.all(np.isfinite([p1, l1, u1, p2, l2, u2])):
        return float(d), _NAN, _NAN
    lo = d - np.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    hi = d + np.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return float(d), float(max(lo, -1.0)), float(min(hi, 1.0))


def hanley_mcneil_interval(auc: float, n_pos: int, n_neg: int, ci: float = 0.95) -> tuple[float, float]:
    """Normal interval for an AUROC with the Hanley & McNeil (1982) variance, clipped to [0, 1].

    ``var = [A(1-A) + (n1-1)(Q1-A^2) + (n2-1)(Q2-A^2)] / (n1 n2)``, Q1 = A/(2-A), Q2 = 2A^2/(1+A). Callers pass
    the numbers of positive and negative *patients*, which understates n when patients have several images
    and so errs wide. The variance is 0 at A = 0 or 1: use :func:`auroc_fallback_interval`, which switches.

    Args:
        auc: AUROC in [0, 1]. n_pos, n_neg: positive and negative counts (patients). ci: coverage.

    Returns:
        ``(lo, hi)``; NaN when a count is 0 or auc is NaN.
    """
    z = z_value(ci)
    if not np.isfinite(auc) or n_pos < 1 or n_neg < 1:
        return _NAN, _NAN
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2)) / (n_pos * n_neg)
    half = z * float(np.sqrt(max(var, 0.0)))
    return float(max(0.0, auc - half)), float(min(1.0, auc + half))


def auroc_bound_interval(auc: float, n_pos: int, n_neg: int, ci: float = 0.95) -> tuple[float, float]:
    """Wilson-type interval for an AUROC at (or near) 0 or 1, where bootstrap and Hanley–McNeil collapse.

    The AUROC is the proportion of concordant positive–negative pairs, but the pairs are not independent.
    Birnbaum & Klose (1957) showed that, whatever the score distributions, ``var(AUROC) <= A(1-A) /
    min(n_pos, n_neg)``: the AUROC is never more variable than a proportion observed on min(n_pos, n_neg)
    independent trials. Treating it as such a proportion and taking its Wilson interval therefore gives the
    widest interval consistent with that bound, and, unlike a variance-based one, it stays open at A = 1:
    a perfect separation of 45 positive and 200 negative patients reads (0.92, 1), not (1, 1). Counts should
    be patients, so that several images of one patient are not counted as independent evidence.

    Args:
        auc: AUROC in [0, 1]. n_pos, n_neg: positive and negative patients. ci: coverage.

    Returns:
        ``(lo, hi)``; NaN when a count is 0 or auc is NaN.

    Examples:
        >>> lo, hi = auroc_bound_interval(1.0, 45, 200)
        >>> round(lo, 3), hi
        (0.921, 1.0)
    """
    if not np.isfinite(auc) or n_pos < 1 or n_neg < 1:
        return _NAN, _NAN
    return wilson_interval(auc, min(n_pos, n_neg), ci)


def auroc_fallback_interval(auc: float, n_pos: int, n_neg: int, ci: float = 0.95) -> tuple[float, float, str]:
    """The AUROC interval used when the bootstrap is degenerate: Hanley–McNeil inside (0, 1), else the bound.

    Returns:
        ``(lo, hi, method)`` with method :data:`HANLEY_MCNEIL` or :data:`WILSON_AUC_FALLBACK`.
    """
    if np.isfinite(auc) and 0 < auc < 1:
        lo, hi = hanley_mcneil_interval(auc, n_pos, n_neg, ci)
        if hi > lo:
            return lo, hi, HANLEY_MCNEIL
    return (*auroc_bound_interval(auc, n_pos, n_neg, ci), WILSON_AUC_FALLBACK)


def auprc_fallback_interval(ap: float, n_pos: int, ci: float = 0.95) -> tuple[float, float, str]:
    """Interval for average precision when its bootstrap is degenerate (typically AP = 1, perfect ranking).

    There is no standard closed form for AP. Boyd et al. (2013) recommend a binomial-style interval on the
    logit scale with the number of positives as n; it is infinite at AP = 1. We keep their sample size and
    take the Wilson score interval instead, which stays finite and open at 1. Use it as a guard against a
    zero-width interval, not as an exact one.

    Args:
        ap: average precision in [0, 1]. n_pos: positive patients. ci: coverage.

    Returns:
        ``(lo, hi, method)`` with method :data:`WILSON_AUPRC_FALLBACK`.
    """
    if not np.isfinite(ap) or n_pos < 1:
        return _NAN, _NAN, WILSON_AUPRC_FALLBACK
    return (*wilson_interval(ap, n_pos, ci), WILSON_AUPRC_FALLBACK)


def is_degenerate(point: float, lo: float, hi: float, *, tol: float = 1e-12) -> bool:
    """True when a resampling interval cannot be reported as it is.

    Degenerate means: the estimate is defined but the interval is not (too few defined resamples), the
    interval has zero width, or the estimate sits at 0 or 1 (resamples of a perfect result stay perfect,
    so the percentile interval collapses onto it).
    """
    if not np.isfinite(point):
        return False
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return True
    return bool(hi - lo <= tol or point <= tol or point >= 1 - tol)
