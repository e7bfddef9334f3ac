"""Operating points chosen on validation data."""

from __future__ import annotations

import numpy as np
import pytest

from medtransfer.errors import ConfigError
from medtransfer.stats.thresholds import choose_threshold


def rates(y: np.ndarray, p: np.ndarray, t: float) -> tuple[float, float]:
    pred = p >= t
    return float(pred[y == 1].mean()), float((~pred[y == 0]).mean())


def noisy(n: int = 400, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, np.round(expit_(1.2 * (y - 0.5) + rng.normal(size=n)), 3)


def expit_(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def test_youden_separable_lands_between_classes():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.9])
    t = choose_threshold(y, p)
    assert 0.3 < t <= 0.6
    assert t == pytest.approx(0.45)  # midpoint of the gap
    assert rates(y, p, t) == (1.0, 1.0)


def test_youden_is_optimal_against_brute_force():
    y, p = noisy()
    t = choose_threshold(y, p)
    best = max(sum(rates(y, p, c)) for c in np.unique(p))
    assert sum(rates(y, p, t)) == pytest.approx(best)


def test_youden_tie_goes_to_threshold_closest_to_half():
    # cut at 0.15 (sens 1, spec .5) and at 0.8 (sens .5, spec 1) both give J = 0.5; 0.8 is closer to 0.5
    assert choose_threshold(np.array([0, 1, 0, 1]), np.array([0.1, 0.2, 0.7, 0.9])) == pytest.approx(0.8)


@pytest.mark.parametrize("target", [0.8, 0.9, 0.95])
def test_sensitivity_target_reached_with_highest_threshold(target):
    y, p = noisy(seed=1)
    t = choose_threshold(y, p, method="sensitivity", target=target)
    assert rates(y, p, t)[0] >= target
    above = np.unique(p[p >= t])[0]  # the next validation score: any higher threshold drops below target
    assert rates(y, p, above + 1e-9)[0] < target


@pytest.mark.parametrize("target", [0.8, 0.9])
def test_specificity_target_reached_with_lowest_threshold(target):
    y, p = noisy(seed=2)
    t = choose_threshold(y, p, method="specificity", target=target)
    assert rates(y, p, t)[1] >= target
    below = np.unique(p[p < t])[-1]
    assert rates(y, p, below)[1] < target


def test_threshold_in_unit_interval_with_scores_at_bounds():
    y = np.array([0, 0, 1, 1])
    p = np.array([0.0, 0.2, 0.8, 1.0])
    for method, target in (("youden", None), ("sensitivity", 1.0), ("specificity", 1.0)):
        t = choose_threshold(y, p, method=method, target=target)
        assert 0 < t <= 1
        assert rates(y, p, t) == (1.0, 1.0)


def test_one_class_gives_half_with_warning():
    with pytest.warns(UserWarning, match="both classes"):
        assert choose_threshold(np.zeros(5), np.linspace(0.1, 0.9, 5)) == 0.5


def test_bad_method_or_target():
    with pytest.raises(ConfigError, match="unknown"):
        choose_threshold(np.array([0, 1]), np.array([0.2, 0.8]), method="f1")
    with pytest.raises(ConfigError, match="target"):
        choose_threshold(np.array([0, 1]), np.array([0.2, 0.8]), method="sensitivity")


def test_finite_sample_rule_keeps_the_target_on_new_cases():
    """Plain rule: 20 positives, target 0.9 -> 2 misses allowed, new-case sensitivity 18/21 = 0.857 < 0.9.
    Finite-sample rule: the 2nd-lowest positive -> 1 miss, 19/21 = 0.905; checked by simulation too."""
    rng = np.random.default_rng(0)
    y = np.r_[np.ones(20), np.zeros(30)]
    p = np.r_[np.linspace(0.30, 0.95, 20), np.linspace(0.05, 0.6, 30)]
    plain = choose_threshold(y, p, method="sensitivity", target=0.9)
    fs = choose_threshold(y, p, method="sensitivity", target=0.9, finite_sample=True)
    pos = np.sort(p[:20])
    assert pos[2] > plain > pos[1] and pos[1] > fs > pos[0]  # cut below the 3rd vs the 2nd lowest positive
    spec_plain = choose_threshold(y, p, method="specificity", target=0.9)
    spec_fs = choose_threshold(y, p, method="specificity", target=0.9, finite_sample=True)
    # 30 negatives: plain allows 3 false positives (27/30 = 0.9), the rank rule 2 (j = floor(0.1 * 31) = 3)
    assert (p[20:] < spec_plain).sum() == 27 and (p[20:] < spec_fs).sum() == 28
    # coverage on new cases over many draws of 20 positives
    hits_plain, hits_fs = [], []
    for _ in range(400):
        sy = np.r_[np.ones(20), np.zeros(20)]
        sp = np.r_[rng.uniform(0.2, 1.0, 20), rng.uniform(0.0, 0.8, 20)]
        new = rng.uniform(0.2, 1.0, 200)
        hits_plain.append((new >= choose_threshold(sy, sp, method="sensitivity", target=0.9)).mean())
        hits_fs.append((new >= choose_threshold(sy, sp, method="sensitivity", target=0.9, finite_sample=True)).mean())
    assert np.mean(hits_plain) < 0.88 and np.mean(hits_fs) >= 0.895
