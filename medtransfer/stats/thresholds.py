"""Choose an operating point (probability threshold) on validation data.

The threshold is learned state: chosen on the validation split, stored in the model card, and applied
unchanged to test and external data (choosing it on the test set would flatter sensitivity/specificity).

How a threshold is placed. With distinct validation scores u_0 < u_1 < ... < u_{U-1}, every threshold in
the gap (u_{k-1}, u_k] gives the same validation predictions (``p >= threshold``). We return the
*midpoint* of the chosen gap rather than its edge u_k: the validation results are identical, and a new
case scoring a hair below a validation score is not flipped by an arbitrary edge choice. Below the
lowest score the cut is u_0 / 2; above the highest it is (u_{U-1} + 1) / 2. Thresholds are kept in (0, 1].
"""

from __future__ import annotations

import logging
import warnings

import numpy as np

from medtransfer.errors import ConfigError
from medtransfer.stats.metrics import clean_binary

logger = logging.getLogger(__name__)

METHODS = ("youden", "sensitivity", "specificity")
#: Returned when a threshold cannot be chosen (one class only, no data).
DEFAULT_THRESHOLD = 0.5


def operating_curve(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every distinct operating point of the scores that a threshold in (0, 1] can realise.

    Args:
        y: clean labels (N,) in {0, 1} with both classes present. p: probabilities (N,) in [0, 1].

    Returns:
        ``(thresholds, sensitivity, specificity)``, each (M,), thresholds ascending. Cut k predicts
        positive exactly the cases scoring >= u_k (k = 0: all positive; k = U: all negative). The
        all-positive cut is dropped when a score is exactly 0, the all-negative cut when one is exactly 1
        (no threshold in (0, 1] realises them).
    """
    u, group = np.unique(p, return_inverse=True)
    pos = np.bincount(group, weights=y, minlength=u.size)
    neg = np.bincount(group, weights=1 - y, minlength=u.size)
    sens = np.r_[np.cumsum(pos[::-1])[::-1], 0.0] / pos.sum()  # positives at or above cut k
    spec = np.r_[0.0, np.cumsum(neg)] / neg.sum()  # negatives below cut k
    edges = np.r_[0.0, u, 1.0]
    thresholds = (edges[:-1] + edges[1:]) / 2
    ok = np.ones(thresholds.size, dtype=bool)
    ok[0], ok[-1] = u[0] > 0, u[-1] < 1
    return thresholds[ok], sens[ok], spec[ok]


def _target_cut(rate: np.ndarray, method: str, target: float) -> int:
    """Index of the highest cut with sensitivity >= target, or the lowest with specificity >= target.

    When no realisable cut reaches the target (scores of exactly 0 or 1), the closest one, with a warning.
    """
    reached = np.flatnonzero(rate >= target - 1e-12)
    if reached.size:
        return int(reached.max() if method == "sensitivity" else reached.min())
    k = int(np.argmax(rate))
    warnings.warn(
        f"no threshold in (0, 1] reaches {method} >= {target} on the validation data (scores of exactly 0 or 1); "
        f"using the closest, {method} = {rate[k]:.3f}",
        stacklevel=3,
    )
    return k


def choose_threshold(
    y: np.ndarray, p: np.ndarray, *, method: str = "youden", target: float | None = None,
    finite_sample: bool = False,
) -> float:
    """A probability threshold chosen on validation data; predictions are ``p >= threshold``.

    Args:
        y: validation labels (N,) in {0, 1}; NaN rows dropped.
        p: validation probabilities (N,) in [0, 1].
        method: ``"youden"``: maximise sensitivity + specificity - 1. Ties (several cuts equally good) go
            to the threshold closest to 0.5, then to the higher one: the operating point least dependent
            on where the score scale happens to sit.
            ``"sensitivity"``: the highest threshold whose validation sensitivity is >= ``target``
            (the most specific operating point meeting the sensitivity requirement).
            ``"specificity"``: the lowest threshold whose validation specificity is >= ``target``.
        target: required for ``sensitivity`` / ``specificity``, in (0, 1].
        finite_sample: for a sensitivity (specificity) target, place the cut so that a *new* positive
            (negative) case is expected to be caught with probability >= ``target``, not only the validation
            ones: the j-th lowest of the n positive scores with j = max(1, floor((1 - target) * (n + 1))) (a
            new exchangeable score falls at or above it with probability (n + 1 - j) / (n + 1); conformal
            prediction's rank rule). The plain rule allows floor((1 - target) * n) misses, whose expected
            sensitivity on new cases is below the target, markedly so with few cases (20 positives, target
            0.9: 0.857). Site adaptation, which refits on 25-100 cases, uses it.

    Returns:
        threshold in (0, 1] (the midpoint of the chosen gap between validation scores; see module doc).
        With only one class (or no labelled rows), 0.5 with a warning.

    Raises:
        ConfigError: unknown method, or a missing/out-of-range target.

    Examples:
        >>> choose_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.3, 0.7, 0.9]))
        0.5
        >>> choose_threshold(np.array([0, 0, 1, 1]), np.array([0.1, 0.3, 0.6, 0.9]), method="sensitivity", target=0.5)
        0.75
    """
    if method not in METHODS:
        raise ConfigError(f"threshold method {method!r} is unknown; choose one of {METHODS}")
    if method != "youden" and (target is None or not 0 < target <= 1):
        raise ConfigError(f"threshold method {method!r} needs a target in (0, 1], e.g. 0.9; got {target}")
    y, p, _ = clean_binary(y, p)
    if p.size and (p.min() < 0 or p.max() > 1):
        raise ValueError(
            f"choose_threshold needs probabilities in [0, 1]; got [{p.min():.3g}, {p.max():.3g}]"
        )
    if not 0 < y.sum() < y.size:
        warnings.warn(
            f"cannot choose a threshold from validation data with {int(y.sum())} positives of {y.size} "
            f"labelled cases (both classes needed); using {DEFAULT_THRESHOLD}",
            stacklevel=2,
        )
        return DEFAULT_THRESHOLD
    thresholds, sens, spec = operating_curve(y, p)
    if method == "youden":
        j = sens + spec - 1
        best = np.flatnonzero(j >= j.max() - 1e-12)
        # closest to 0.5; among equals the higher threshold (lexsort: last key is primary)
        k = best[np.lexsort((-thresholds[best], np.abs(thresholds[best] - 0.5)))[0]]
    else:
        goal = float(target)
        if finite_sample:
            n = int(y.sum()) if method == "sensitivity" else int(y.size - y.sum())
            j = max(1, int(np.floor((1 - goal) * (n + 1) + 1e-9)))
            goal = max(goal, (n - j + 1) / n)
        k = _target_cut(sens if method == "sensitivity" else spec, method, goal)
    logger.info(
        "threshold (%s%s): %.4f, validation sensitivity %.3f, specificity %.3f",
        method,
        "" if target is None else f" >= {target}",
        thresholds[k],
        sens[k],
        spec[k],
    )
    return float(thresholds[k])
